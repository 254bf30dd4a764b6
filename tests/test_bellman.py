"""Reference tests of the Bellman core (docs/design.md section 2) against the loop reference in tests/reference.py.

The implementation is tested end to end without a model: the hidden state at position ``i`` of row ``b`` is the
float id ``b*L + i`` (``[B, L, 1]``), and every head looks its output up in a random table indexed by that id.
The reference reads the same tables directly, so any index slip (V at the wrong position, a backup crossing a
segment, a padded vocabulary id in a softmax) shows up as a mismatch. Gradients are checked against the
reference's analytic ones with ``jax.grad`` with respect to the tables.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_lm.batch import check_batch
from jaxrl_lm.rl import Heads, bellman_objective, transitions
from jaxrl_lm.rl.token_q import heads_from_logits

from reference import LossConfig, ref_objective, ref_transitions

PAD_LOGIT = 1.0e6  # value of every padded-vocabulary logit: it would dominate any softmax / max it entered
TOL = dict(rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------------------------------------------
# Random valid batches.


def random_episode(rng: np.random.Generator, vocab: int) -> dict[str, np.ndarray]:
    """One episode: alternating observation / agent turns, rewards on agent tokens, done if it really ended."""
    toks, am, rew, turn = [], [], [], []
    agent = rng.random() < 0.1  # rarely, the episode opens with an agent turn (no decision scores its first token)
    for t in range(int(rng.integers(2, 8))):
        if agent:
            n = int(rng.integers(1, 5))
            for p in range(n):
                toks.append(int(rng.integers(vocab)))
                am.append(1)
                turn.append(t)
                r = 0.0
                if p == n - 1 and rng.random() < 0.6:  # end-of-turn reward
                    r = float(np.round(rng.normal(), 3))
                elif rng.random() < 0.1:  # a reward in the middle of a turn
                    r = float(np.round(rng.normal(), 3))
                rew.append(r)
            agent = rng.random() < 0.15  # usually the environment answers; sometimes two agent turns in a row
        else:
            for _ in range(int(rng.integers(1, 4))):
                toks.append(int(rng.integers(vocab)))
                am.append(0)
                turn.append(t)
                rew.append(0.0)
            agent = True
    ep = dict(tokens=np.array(toks), action_mask=np.array(am), reward=np.array(rew), turn_ids=np.array(turn),
              done=np.zeros(len(toks), np.int64))
    if rng.random() < 0.6 and ep["action_mask"].any():  # the episode really ended (maybe with a last observation)
        ep["done"][np.nonzero(ep["action_mask"])[0][-1]] = 1
    if rng.random() < 0.15 and len(toks) > 2:  # left truncation: the start of a long episode was cut off
        k = int(rng.integers(1, len(toks) // 2 + 1))
        ep = {name: a[k:] for name, a in ep.items()}
    return ep


def random_batch(seed: int, batch_size: int = 4, seq_len: int = 24, vocab: int = 7) -> dict[str, np.ndarray]:
    """A valid packed batch: segments 1, 2, 3, ... as contiguous runs, the last one cut at the row end (truncated
    unless its done token survives the cut), and trailing padding (segment 0, garbage tokens) in some rows."""
    rng = np.random.default_rng(seed)
    out = {
        "tokens": rng.integers(vocab, size=(batch_size, seq_len)),  # padding tokens are garbage on purpose
        "action_mask": np.zeros((batch_size, seq_len)),
        "reward": np.zeros((batch_size, seq_len)),
        "done": np.zeros((batch_size, seq_len)),
        "segment_ids": np.zeros((batch_size, seq_len)),
        "turn_ids": np.zeros((batch_size, seq_len)),
    }
    for b in range(batch_size):
        content = seq_len if rng.random() < 0.4 else int(rng.integers(seq_len // 2, seq_len))
        pos, sid = 0, 1
        while pos < content:
            ep = random_episode(rng, vocab)
            n = min(len(ep["tokens"]), content - pos)
            for name, a in ep.items():
                out[name][b, pos:pos + n] = a[:n]
            out["segment_ids"][b, pos:pos + n] = sid
            pos += n
            sid += 1
    batch = {name: out[name].astype(np.float32 if name == "reward" else np.int32) for name in out}
    check_batch(batch)
    return batch


def assert_valid_batch(batch: dict[str, np.ndarray]) -> None:
    """The contract of docs/design.md section 2 / jaxrl_lm.batch (guards the generator)."""
    seg, am, rew, done, turn = (batch[k] for k in ("segment_ids", "action_mask", "reward", "done", "turn_ids"))
    assert set(np.unique(am)) <= {0, 1} and set(np.unique(done)) <= {0, 1}
    assert not am[seg == 0].any() and not done[seg == 0].any() and not rew[seg == 0].any()
    assert not rew[am == 0].any(), "reward only on action tokens"
    assert not done[am == 0].any(), "done only on action tokens"
    for b in range(seg.shape[0]):
        ids = [int(s) for s in seg[b]]
        runs = [s for i, s in enumerate(ids) if i == 0 or s != ids[i - 1]]
        nonzero = [s for s in runs if s != 0]
        assert len(nonzero) == len(set(nonzero)), "an id is not reused in its row"
        for s in nonzero:
            where = np.nonzero(seg[b] == s)[0]
            assert np.all(np.diff(turn[b, where]) >= 0), "turn ids never decrease within an episode"
            d = np.nonzero(done[b, where])[0]
            assert len(d) <= 1
            if len(d):
                assert not am[b, where[d[0] + 1:]].any(), "done is on the episode's last action token"


SEEDS = [0, 1, 2]
# transitions is pure array code: jit it (compiles once per shape and setting; eager op-by-op is far slower here)
jit_transitions = jax.jit(transitions, static_argnames=("gamma", "time_step"))


def test_generator_is_valid_and_covers_the_contract():
    features = dict(done=0, truncated=0, packed=0, padding=0, obs_between_turns=0, mid_reward=0, left_cut=0,
                    two_agent_turns=0)
    for seed in range(12):
        batch = random_batch(seed)
        assert_valid_batch(batch)
        seg, am, rew, done, turn = (batch[k] for k in ("segment_ids", "action_mask", "reward", "done", "turn_ids"))
        for b in range(seg.shape[0]):
            features["padding"] += int((seg[b] == 0).any())
            features["packed"] += int(len(set(seg[b].tolist()) - {0}) >= 3)
            for s in set(seg[b].tolist()) - {0}:
                w = np.nonzero(seg[b] == s)[0]
                features["done" if done[b, w].any() else "truncated"] += 1
                features["left_cut"] += int(am[b, w[0]] == 1 or turn[b, w[0]] > 0)
                a = am[b, w]
                features["obs_between_turns"] += int(any(a[i] == 1 and a[i + 1] == 0 and a[i + 2:].any()
                                                         for i in range(len(a) - 1)))
                t = turn[b, w]
                features["two_agent_turns"] += int(any(a[i] == 1 and a[i + 1] == 1 and t[i + 1] > t[i]
                                                       for i in range(len(a) - 1)))
                last_action = np.nonzero(a)[0][-1] if a.any() else -1
                features["mid_reward"] += int(any(rew[b, w[i]] != 0 and i < last_action for i in range(len(w))))
    assert all(v > 0 for v in features.values()), features


# ----------------------------------------------------------------------------------------------------------------
# Transitions.


@pytest.mark.parametrize("time_step", ["token", "utterance"])
@pytest.mark.parametrize("seed", SEEDS + [3, 4])
def test_transitions_match_reference(seed, time_step):
    batch = random_batch(seed)
    B, L = batch["tokens"].shape
    tr = jit_transitions({k: jnp.asarray(v) for k, v in batch.items()}, gamma=0.9, time_step=time_step)
    for name, shape_dtype in {
        "decision": jnp.bool_, "action": jnp.int32, "reward": jnp.float32, "done": jnp.float32,
        "discount": jnp.float32, "next_index": jnp.int32, "next_is_decision": jnp.bool_, "next_action": jnp.int32,
    }.items():
        chex.assert_shape(getattr(tr, name), (B, L))
        chex.assert_type(getattr(tr, name), shape_dtype)

    ref = ref_transitions(batch, 0.9, time_step)
    dec = ref["decision"]
    assert dec.any() and not dec.all()
    np.testing.assert_array_equal(np.asarray(tr.decision), dec)
    for name in ("action", "reward", "done", "discount", "next_index", "next_is_decision", "next_action"):
        got = np.asarray(getattr(tr, name))
        np.testing.assert_allclose(got[dec], ref[name][dec], rtol=1e-6, err_msg=name)
        # documented off D: zeros, and next_index = the position itself
        np.testing.assert_array_equal(got[~dec], ref[name][~dec], err_msg=f"{name} off D")


def test_padding_is_never_a_decision_even_with_garbage_fields():
    batch = random_batch(5)
    pad = batch["segment_ids"] == 0
    assert pad.any()
    batch["action_mask"] = np.where(pad, 1, batch["action_mask"]).astype(np.int32)  # violates the contract
    tr = jit_transitions({k: jnp.asarray(v) for k, v in batch.items()}, gamma=0.9, time_step="token")
    ref = ref_transitions(batch, 0.9, "token")
    np.testing.assert_array_equal(np.asarray(tr.decision), ref["decision"])
    assert not np.asarray(tr.decision)[pad].any()


# ----------------------------------------------------------------------------------------------------------------
# Table-lookup heads.


def table_heads(tabs: dict[str, jnp.ndarray], vocab_size: int) -> Heads:
    """Heads reading tables at the integer id carried by ``h [..., 1]``."""

    def idx(h):
        return h[..., 0].astype(jnp.int32)

    return heads_from_logits(
        q_logits=lambda h: tabs["q"][:, idx(h)],  # [K, ..., V]
        q_at=lambda h, a: tabs["q"][:, idx(h), a],  # [K, ...]
        value=lambda h: tabs["v"][idx(h)],
        lm_logits=lambda h: tabs["lm"][idx(h)],
        target_q_logits=lambda h: tabs["qbar"][:, idx(h)],
        target_q_at=lambda h, a: tabs["qbar"][:, idx(h), a],
        vocab_size=vocab_size,
    )


def random_tables(seed: int, k: int, n_pos: int, vocab: int, padded_vocab: int, pad_value=PAD_LOGIT) -> dict:
    """Q / LM tables over the online ids [0, n_pos), Qbar over [0, 2*n_pos) (ids >= n_pos: the target trunk)."""
    rng = np.random.default_rng(1000 + seed)
    tabs = {
        "q": rng.normal(size=(k, n_pos, padded_vocab)) * 1.5,
        "v": rng.normal(size=(n_pos,)),
        "lm": rng.normal(size=(n_pos, padded_vocab)) * 1.5,
        "qbar": rng.normal(size=(k, 2 * n_pos, padded_vocab)) * 1.5,
    }
    for name in ("q", "lm", "qbar"):
        tabs[name][..., vocab:] = pad_value
    return {name: jnp.asarray(t, jnp.float32) for name, t in tabs.items()}


def position_ids(batch_size: int, seq_len: int, offset: int = 0) -> jnp.ndarray:
    return (offset + jnp.arange(batch_size * seq_len, dtype=jnp.float32)).reshape(batch_size, seq_len, 1)


@functools.lru_cache(maxsize=None)
def objective_fn(rl: LossConfig, vocab_size: int):
    """jit(value_and_grad) of bellman_objective w.r.t. the tables; one compile per (config, shapes)."""

    def f(tabs, batch, hidden, target_hidden, denominator):
        return bellman_objective(rl.q, rl.rl, batch, hidden, target_hidden, table_heads(tabs, vocab_size), vocab_size=vocab_size,
                                 denominator=denominator)

    return jax.jit(jax.value_and_grad(f, has_aux=True))


def run_objective(rl, batch, tabs, *, vocab, target_scope="heads", denominator=None):
    B, L = batch["tokens"].shape
    hidden = position_ids(B, L)
    target_hidden = position_ids(B, L, offset=B * L if target_scope == "full" else 0)
    (loss, metrics), grads = objective_fn(rl, vocab)(
        tabs, {k: jnp.asarray(v) for k, v in batch.items()}, hidden, target_hidden,
        None if denominator is None else jnp.float32(denominator))
    return loss, {k: float(v) for k, v in metrics.items()}, jax.tree.map(np.asarray, grads)


def run_reference(rl, batch, tabs, *, vocab, target_scope="heads", capacity=None, denominator=None):
    B, L = batch["tokens"].shape
    n = B * L
    off = n if target_scope == "full" else 0
    t = {name: np.asarray(a, np.float64) for name, a in tabs.items()}
    k = t["q"].shape[0]
    return ref_objective(
        rl, batch,
        q=t["q"][:, :, :vocab].reshape(k, B, L, vocab),
        qbar=t["qbar"][:, off:off + n, :vocab].reshape(k, B, L, vocab),
        value=t["v"].reshape(B, L),
        lm=t["lm"][:, :vocab].reshape(B, L, vocab),
        capacity=capacity, denominator=denominator,
    )


LOSS_KEYS = ("loss", "q_loss", "v_loss", "cql_loss", "bc_loss")
METRIC_KEYS = ("q_mean", "v_mean", "target_mean", "td_error", "decisions", "decisions_dropped")


def assert_matches_reference(rl, loss, metrics, grads, ref, *, vocab, batch_shape):
    B, L = batch_shape
    np.testing.assert_allclose(float(loss), ref["loss"], **TOL)
    expected = dict(ref)
    if rl.lambda_bc == 0:
        expected["bc_loss"] = 0.0  # not computed when it has no weight
    if rl.cql_alpha == 0:
        expected["cql_loss"] = 0.0
    for key in LOSS_KEYS + METRIC_KEYS:
        np.testing.assert_allclose(metrics[key], expected[key], err_msg=key, **TOL)
    assert ("cql_gap" in metrics) == (rl.cql_alpha > 0)
    if rl.cql_alpha > 0:
        np.testing.assert_allclose(metrics["cql_gap"], ref["cql_gap"], **TOL)
    assert ("awr_weight_mean" in metrics) == (rl.lambda_bc > 0)
    if rl.lambda_bc > 0:
        np.testing.assert_allclose(metrics["awr_weight_mean"], ref["awr_weight_mean"], **TOL)

    # gradients: the reference's analytic ones; nothing into the target tables or the padded vocabulary
    k = grads["q"].shape[0]
    np.testing.assert_allclose(grads["q"][..., :vocab], ref["grad_q"].reshape(k, B * L, vocab), err_msg="dL/dQ",
                               **TOL)
    np.testing.assert_allclose(grads["v"], ref["grad_value"].reshape(B * L), err_msg="dL/dV", **TOL)
    np.testing.assert_allclose(grads["lm"][..., :vocab], ref["grad_lm"].reshape(B * L, vocab), err_msg="dL/dLM",
                               **TOL)
    assert not grads["q"][..., vocab:].any() and not grads["lm"][..., vocab:].any(), "gradient into padded vocab"
    assert not grads["qbar"].any(), "gradient into the target tables"


CONFIGS = {
    "expectile-token": LossConfig(backup="expectile", time_step="token", gamma=0.9),
    "expectile-utterance-awr-clip": LossConfig(
        backup="expectile", time_step="utterance", gamma=0.8, expectile_tau=0.9, lambda_v=0.5, cql_alpha=0.3,
        cql_temperature=0.7, lambda_bc=2.0, awr_beta=1.5, awr_max_weight=1.3, value_min=-1.0, value_max=1.5),
    "max-utterance-upper-clip": LossConfig(backup="max", time_step="utterance", gamma=0.7, cql_alpha=0.5,
                                         cql_temperature=2.0, lambda_bc=0.5, awr_beta=0.5, value_max=1.0),
    "sarsa-utterance-awr-lower-clip": LossConfig(backup="sarsa", time_step="utterance", gamma=0.85, awr_beta=1.0,
                                               awr_max_weight=2.0, value_min=-0.5),
    "mc-utterance-half-q-clip": LossConfig(backup="mc", time_step="utterance", gamma=0.8, lambda_q=0.5,
                                         cql_alpha=0.2, value_min=-1.0),
    "mc-token": LossConfig(backup="mc", time_step="token", gamma=0.9),
    "expectile-token-q-only": LossConfig(backup="expectile", time_step="token", gamma=0.9, lambda_v=0.0,
                                       cql_alpha=0.0, lambda_bc=0.0),
}
VOCAB, PADDED_VOCAB = 7, 12


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_objective_matches_reference(name, seed):
    rl = CONFIGS[name]
    batch = random_batch(seed)
    B, L = batch["tokens"].shape
    scope = "full" if seed % 2 else "heads"
    tabs = random_tables(seed, 2, B * L, VOCAB, PADDED_VOCAB)
    loss, metrics, grads = run_objective(rl, batch, tabs, vocab=VOCAB, target_scope=scope)
    ref = run_reference(rl, batch, tabs, vocab=VOCAB, target_scope=scope)
    assert metrics["decisions"] > 0 and metrics["decisions_dropped"] == 0
    if rl.awr_beta > 0 and rl.awr_max_weight < 2:
        w = ref["awr_weights"][ref["kept"]]
        assert (w == rl.awr_max_weight).any() and (w < rl.awr_max_weight).any()  # some weights clipped, some not
    assert_matches_reference(rl, loss, metrics, grads, ref, vocab=VOCAB, batch_shape=(B, L))


@pytest.mark.parametrize("n_heads, rl", [
    (3, LossConfig(backup="sarsa", time_step="token", gamma=0.95, awr_beta=0.7)),
    (1, LossConfig(backup="max", time_step="token", gamma=0.9, awr_beta=0.7, cql_alpha=0.2)),
], ids=["K3-sarsa-token", "K1-max-token"])
def test_objective_other_head_counts(n_heads, rl):
    batch = random_batch(7)
    B, L = batch["tokens"].shape
    tabs = random_tables(7, n_heads, B * L, VOCAB, PADDED_VOCAB)
    loss, metrics, grads = run_objective(rl, batch, tabs, vocab=VOCAB, target_scope="full")
    ref = run_reference(rl, batch, tabs, vocab=VOCAB, target_scope="full")
    assert_matches_reference(rl, loss, metrics, grads, ref, vocab=VOCAB, batch_shape=(B, L))


def test_value_clipping_is_exercised():
    """The clipped configurations of test_objective_matches_reference really clip (on both sides, and one)."""
    for name, sides in [("expectile-utterance-awr-clip", "both"), ("max-utterance-upper-clip", "upper"),
                        ("sarsa-utterance-awr-lower-clip", "lower")]:
        rl = CONFIGS[name]
        for seed in SEEDS:
            batch = random_batch(seed)
            tabs = random_tables(seed, 2, batch["tokens"].size, VOCAB, PADDED_VOCAB)
            y = run_reference(rl, batch, tabs, vocab=VOCAB)["targets"]
            kept = ref_transitions(batch, rl.gamma, rl.time_step)["decision"]
            unclipped = run_reference(dataclasses.replace(rl, value_min=None, value_max=None), batch, tabs,
                                      vocab=VOCAB)["targets"]
            if sides in ("both", "lower"):
                assert (unclipped[kept] < rl.value_min).any() and np.isclose(y[kept], rl.value_min).any(), name
            if sides in ("both", "upper"):
                assert (unclipped[kept] > rl.value_max).any() and np.isclose(y[kept], rl.value_max).any(), name


@pytest.mark.parametrize("name", ["expectile-utterance-awr-clip", "max-utterance-upper-clip",
                                  "sarsa-utterance-awr-lower-clip"])
def test_padded_vocab_never_matters(name):
    """Padded logit columns (ids >= vocab_size) change nothing, whatever they hold; no gradient reaches them."""
    rl = CONFIGS[name]
    batch = random_batch(11)
    B, L = batch["tokens"].shape
    ref = run_reference(rl, batch, random_tables(11, 2, B * L, VOCAB, PADDED_VOCAB), vocab=VOCAB)
    for pad_value in (PAD_LOGIT, -3.0, 0.0, -PAD_LOGIT):
        tabs = random_tables(11, 2, B * L, VOCAB, PADDED_VOCAB, pad_value=pad_value)
        loss, metrics, grads = run_objective(rl, batch, tabs, vocab=VOCAB)
        assert_matches_reference(rl, loss, metrics, grads, ref, vocab=VOCAB, batch_shape=(B, L))
    if name == "max-utterance-upper-clip":  # logits exactly vocab_size wide (no padding at all)
        tabs = {n: t[..., :VOCAB] if n != "v" else t
                for n, t in random_tables(11, 2, B * L, VOCAB, PADDED_VOCAB).items()}
        loss, metrics, grads = run_objective(rl, batch, tabs, vocab=VOCAB)
        assert_matches_reference(rl, loss, metrics, grads, ref, vocab=VOCAB, batch_shape=(B, L))


def test_q_loss_without_cql_uses_q_at_and_agrees():
    """cql_alpha = 0 takes the q_at path (no full Q projection); its L_Q equals the CQL path's."""
    rl = CONFIGS["sarsa-utterance-awr-lower-clip"]
    no_cql = dataclasses.replace(rl, cql_alpha=0.0)
    batch = random_batch(4)
    B, L = batch["tokens"].shape
    tabs = random_tables(4, 2, B * L, VOCAB, PADDED_VOCAB)
    _, with_cql, _ = run_objective(rl, batch, tabs, vocab=VOCAB)

    loss, without, grads = run_objective(no_cql, batch, tabs, vocab=VOCAB)
    for key in ("q_loss", "v_loss", "bc_loss", "q_mean", "target_mean", "td_error", "awr_weight_mean"):
        np.testing.assert_allclose(without[key], with_cql[key], err_msg=key, **TOL)
    assert without["cql_loss"] == 0.0 and "cql_gap" not in without
    ref = run_reference(no_cql, batch, tabs, vocab=VOCAB)
    assert_matches_reference(no_cql, loss, without, grads, ref, vocab=VOCAB, batch_shape=(B, L))


@pytest.mark.parametrize("backup", ["expectile", "max", "sarsa", "mc"])
@pytest.mark.parametrize("cql_alpha, lambda_bc", [(0.0, 0.0), (0.1, 1.0)])
def test_full_vocabulary_projections_only_when_needed(backup, cql_alpha, lambda_bc):
    """Reductions over the vocabulary only where needed: online Q for CQL, target Q for max / sarsa backups, LM for BC
    (traced with eval_shape: nothing compiles)."""
    rl = LossConfig(backup=backup, cql_alpha=cql_alpha, lambda_bc=lambda_bc)
    batch = random_batch(0)
    B, L = batch["tokens"].shape
    tabs = random_tables(0, 2, B * L, VOCAB, PADDED_VOCAB)
    calls = set()

    def counting(name, fn):
        def wrapped(*args):
            calls.add(name)
            return fn(*args)
        return wrapped

    def f(tabs):
        heads = table_heads(tabs, VOCAB)
        heads = Heads(**{name: counting(name, fn) for name, fn in heads._asdict().items()})
        return bellman_objective(rl.q, rl.rl, {k: jnp.asarray(v) for k, v in batch.items()}, position_ids(B, L),
                                 position_ids(B, L), heads, vocab_size=VOCAB)

    jax.eval_shape(f, tabs)
    assert ("q_logsumexp" in calls) == (cql_alpha > 0)
    assert ("target_q_max" in calls) == (backup in ("max", "sarsa"))
    assert ("lm_logsumexp" in calls) == ("lm_at" in calls) == (lambda_bc > 0)
    assert {"value", "q_at", "target_q_at"} <= calls


@pytest.mark.parametrize("seed", SEEDS)
def test_decision_capacity_drops_are_counted_and_denominator(seed):
    rl = dataclasses.replace(CONFIGS["expectile-utterance-awr-clip"], decision_fraction=0.25)
    batch = random_batch(seed)
    B, L = batch["tokens"].shape
    capacity = math.ceil(rl.decision_fraction * L)
    tabs = random_tables(seed, 2, B * L, VOCAB, PADDED_VOCAB)
    per_row = ref_transitions(batch, rl.gamma, rl.time_step)["decision"].sum(axis=1)
    # an explicit denominator (the decision count of a whole optimizer step) scales the losses, not the metrics
    denominator = per_row.sum() * (1.0 + seed)
    loss, metrics, grads = run_objective(rl, batch, tabs, vocab=VOCAB, denominator=denominator)
    ref = run_reference(rl, batch, tabs, vocab=VOCAB, capacity=capacity, denominator=denominator)
    assert metrics["decisions_dropped"] == np.maximum(per_row - capacity, 0).sum() > 0
    assert metrics["decisions"] == per_row.sum()
    # documented behaviour: a row's first `capacity` decisions are scored, the loss still divides by all of |D|
    assert_matches_reference(rl, loss, metrics, grads, ref, vocab=VOCAB, batch_shape=(B, L))


def test_expectile_backup_is_stop_gradient():
    """L_Q alone puts no gradient into V (the backup is sg(V(h_n(i)))) nor into any target table."""
    rl = CONFIGS["expectile-token-q-only"]
    batch = random_batch(3)
    B, L = batch["tokens"].shape
    tabs = random_tables(3, 2, B * L, VOCAB, PADDED_VOCAB)
    loss, metrics, grads = run_objective(rl, batch, tabs, vocab=VOCAB)
    assert float(loss) > 0 and grads["q"].any()
    assert not grads["v"].any() and not grads["qbar"].any() and not grads["lm"].any()


def test_no_gradient_into_target_states_or_next_states():
    """With heads smooth in h: no gradient into target_hidden; none into h_j at positions that are not decisions
    (a segment's last position, an observation token, padding), though the backups read some of them."""
    batch = random_batch(6)
    B, L = batch["tokens"].shape
    rng = np.random.default_rng(0)
    D, K = 3, 2
    w = {name: jnp.asarray(rng.normal(size=s), jnp.float32)
         for name, s in dict(q=(K, D, PADDED_VOCAB), v=(D,), lm=(D, PADDED_VOCAB), qbar=(K, D, PADDED_VOCAB)).items()}

    def at(table, h, a):
        return jnp.take_along_axis(jnp.einsum("...d,kdv->k...v", h, table), a[None, ..., None], axis=-1)[..., 0]

    heads = heads_from_logits(
        q_logits=lambda h: jnp.einsum("...d,kdv->k...v", h, w["q"]),
        q_at=lambda h, a: at(w["q"], h, a),
        value=lambda h: h @ w["v"],
        lm_logits=lambda h: h @ w["lm"],
        target_q_logits=lambda h: jnp.einsum("...d,kdv->k...v", h, w["qbar"]),
        target_q_at=lambda h, a: at(w["qbar"], h, a),
        vocab_size=VOCAB,
    )
    hidden = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    target_hidden = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    dec = ref_transitions(batch, 0.9, "token")["decision"]
    rl = LossConfig(backup="expectile", gamma=0.9, awr_beta=1.0, cql_alpha=0.2)  # sg(V(h_n(i))), Qbar(hbar_i, a_i)
    g_h, g_t = jax.jit(jax.grad(lambda h, t: bellman_objective(rl.q, rl.rl, jbatch, h, t, heads, vocab_size=VOCAB)[0],
                                argnums=(0, 1)))(hidden, target_hidden)
    assert not np.asarray(g_t).any()
    g_h = np.abs(np.asarray(g_h)).sum(-1)
    assert not g_h[~dec].any()
    assert (g_h[dec] > 0).all()


# ----------------------------------------------------------------------------------------------------------------
# Hand-written cases with hand-computed targets. The targets y_i are read back from the implementation through the
# gradient of L_Q: with Q = 0 and only L_Q in the loss, dL/dQ_k(h_i, a_i) = 2 (0 - y_i) / N.
# All hand batches are [3, 10] so that they share compiled functions.

HAND_L = 10


def hand_batch(rows: list[dict[str, list]]) -> dict[str, np.ndarray]:
    out = {}
    for name in ("tokens", "action_mask", "reward", "done", "segment_ids", "turn_ids"):
        out[name] = np.array([r[name] + [0] * (HAND_L - len(r[name])) for r in rows],  # right padding
                             np.float32 if name == "reward" else np.int32)
    check_batch(out)
    assert_valid_batch(out)
    return out


# Row 0: one terminal episode then padding.   pos: 0  1  2  3   4  5  6 | 7  8  9
EPISODE = dict(tokens=[0, 1, 2, 0, 1, 2, 1],
               action_mask=[0, 0, 1, 1, 0, 1, 1],  # prompt, agent turn (2, 3), observation, agent turn (5, 6)
               reward=[0, 0, 0, 0.5, 0, 0, 1.0],  # a mid-episode reward at 3, the final one at 6
               done=[0, 0, 0, 0, 0, 0, 1],
               segment_ids=[1, 1, 1, 1, 1, 1, 1],
               turn_ids=[0, 0, 1, 1, 2, 3, 3])
# Row 1: the same episode, truncated (done = 0 everywhere).
TRUNCATED = dict(EPISODE, done=[0] * 7)
# D = {1, 2, 4, 5}; a = (2, 0, 2, 1); n = (2, 4, 5, 6): 2 -> 4 skips the observation at 3, 5 -> 6 (segment end,
# never the padding at 7). Utterance discounts: 1 within a turn (1, 4), gamma into the next turn (2), and 1 for
# 5 -> 6 because turn(6) = turn_ids[6] = 3 = turn_ids[6] (the segment ends inside the agent's turn).
EPISODE_D, EPISODE_N = [1, 2, 4, 5], [2, 4, 5, 6]

# Row 2: two packed truncated episodes then padding.   pos: 0  1  2  3 | 4  5  6  7 | 8  9
PACKED = dict(tokens=[0, 1, 2, 0, 1, 2, 0, 1],
              action_mask=[0, 1, 1, 0, 1, 0, 1, 1],  # episode 2 was left-cut: it opens with an agent token
              reward=[0, 0, 2.0, 0, 0, 0, 0, 3.0],
              done=[0] * 8,
              segment_ids=[1, 1, 1, 1, 2, 2, 2, 2],
              turn_ids=[0, 1, 1, 2, 3, 4, 5, 5])
# D = {0, 1, 5, 6}: 3 is not a decision (x[4] is an agent token of the next episode), nor 7 (padding follows).
# n = (1, 3, 6, 7): 1 -> 3 (episode 1's last position, not episode 2's decision 5), 6 -> 7 (not the padding).
PACKED_D, PACKED_N = [0, 1, 5, 6], [1, 3, 6, 7]

HAND_D = [EPISODE_D, EPISODE_D, PACKED_D]
HAND_N = [EPISODE_N, EPISODE_N, PACKED_N]
G = 0.5


def v_table(n_pos: int) -> list[float]:
    return [0.1 * (p % HAND_L + 1) for p in range(n_pos)]  # V(h_p) = 0.1 (p + 1) in every row


# Target Q at the next states of rows 0 and 1 (K = 2 rows each; the padded id 3 holds PAD_LOGIT everywhere;
# all other target Q-values, row 2's included, are 0).
QBAR_AT = {
    2: [[1, 5, 2], [3, 4, 0]],  # min_k = (1, 4, 0): max 4; sarsa with x[3] = 0: 1
    4: [[3, 1, 2], [2, 6, -1]],  # min_k = (2, 1, -1): max 2; sarsa with x[5] = 2: -1
    5: [[1, 1, 1], [0, -2, 4]],  # min_k = (0, -2, 1): max 1; sarsa with x[6] = 1: -2
    6: [[-1, -2, -3], [-4, 0, 0]],  # min_k = (-4, -2, -3): max -2; 6 is a truncation state (row 1): sarsa = max
}


def hand_tables(batch, vocab=3, padded_vocab=4):
    B, L = batch["tokens"].shape
    qbar = np.zeros((2, 2 * B * L, padded_vocab))
    for row in (0, 1):
        for pos, values in QBAR_AT.items():
            qbar[:, row * L + pos, :vocab] = values
    q = np.zeros((2, B * L, padded_vocab))
    lm = np.zeros((B * L, padded_vocab))
    for t in (q, lm, qbar):
        t[..., vocab:] = PAD_LOGIT
    return {name: jnp.asarray(t, jnp.float32)
            for name, t in dict(q=q, v=np.array(v_table(B * L)), lm=lm, qbar=qbar).items()}


HAND = hand_batch([EPISODE, TRUNCATED, PACKED])


@pytest.mark.parametrize("time_step, discounts", [
    ("token", [[G] * 4] * 3),
    # row 2: turn(1) = turn_ids[2] = 1 = turn_ids[1]; turn(3) = turn_ids[3] = 2 > 1; turn(6) = 5; turn(7) = 5
    ("utterance", [[1, G, 1, 1], [1, G, 1, 1], [1, G, 1, 1]]),
])
def test_hand_transitions(time_step, discounts):
    tr = jit_transitions({k: jnp.asarray(v) for k, v in HAND.items()}, gamma=G, time_step=time_step)
    ref = ref_transitions(HAND, G, time_step)
    for row in range(3):
        for got in (jax.tree.map(np.asarray, tr._asdict()), ref):
            assert np.nonzero(got["decision"][row])[0].tolist() == HAND_D[row]
            assert got["next_index"][row, HAND_D[row]].tolist() == HAND_N[row]
            np.testing.assert_allclose(got["discount"][row, HAND_D[row]], discounts[row], rtol=1e-6)
    # sarsa's next action: x[n(i)+1] where n(i) is a decision
    np.testing.assert_array_equal(np.asarray(tr.next_is_decision)[0, EPISODE_D], [True, True, True, False])
    np.testing.assert_array_equal(np.asarray(tr.next_action)[0, EPISODE_D[:3]], [0, 2, 1])


def implied_targets(rl, batch, tabs, vocab=3):
    """Per row, the targets y_i at the row's decisions (in order), read from the gradient of L_Q at Q = 0."""
    rl = dataclasses.replace(rl, lambda_v=0.0, cql_alpha=0.0, lambda_bc=0.0)
    _, metrics, grads = run_objective(rl, batch, tabs, vocab=vocab)
    n = metrics["decisions"]
    out = []
    for row, positions in enumerate(HAND_D):
        flat = row * HAND_L + np.asarray(positions)
        g = grads["q"][:, flat, batch["tokens"][row, np.asarray(positions) + 1]]  # [K, n_positions]
        np.testing.assert_allclose(g[0], g[1], rtol=1e-6)
        out.append(-n / 2.0 * g[0])
    return out


@pytest.mark.parametrize("rl, expected", [
    (LossConfig(backup="expectile", time_step="token", gamma=G), [
        # y_5 = 1 (terminal: no bootstrap, in particular not from V(h_5) itself)
        # y_4 = 0 + g V(h_5);  y_2 = 0.5 + g V(h_4);  y_1 = 0 + g V(h_2)
        [G * 0.3, 0.5 + G * 0.5, G * 0.6, 1.0],
        # truncated: y_5 = 1 + g V(h_6) (not 1: truncation is not terminal; not V(h_5): no self-bootstrap)
        [G * 0.3, 0.5 + G * 0.5, G * 0.6, 1.0 + G * 0.7],
        # packed: y_0 = g V(h_1); y_1 = 2 + g V(h_3); y_5 = g V(h_6); y_6 = 3 + g V(h_7)
        [G * 0.2, 2.0 + G * 0.4, G * 0.7, 3.0 + G * 0.8]]),
    (LossConfig(backup="expectile", time_step="utterance", gamma=G), [
        [0.3, 0.5 + G * 0.5, 0.6, 1.0],
        [0.3, 0.5 + G * 0.5, 0.6, 1.0 + 0.7],
        [0.2, 2.0 + G * 0.4, 0.7, 3.0 + 0.8]]),
    (LossConfig(backup="max", time_step="token", gamma=G, value_max=2.5), [
        [G * 4, 0.5 + G * 2, G * 1, 1.0],
        [G * 4, 0.5 + G * 2, G * 1, 1.0 + G * -2],
        [0.0, 2.0, 0.0, 2.5]]),  # all-zero target Q: a padded id (PAD_LOGIT) must not win the max; 3 clipped
    (LossConfig(backup="sarsa", time_step="token", gamma=G, value_min=-0.75), [
        [G * 1, 0.5 + G * -1, -0.75, 1.0],  # G * -2 = -1 clipped
        [G * 1, 0.5 + G * -1, -0.75, 1.0 + G * -2],  # the truncation state 6 backs up as max
        [0.0, 2.0, 0.0, 3.0]]),
], ids=["expectile-token", "expectile-utterance", "max-token-upper-clip", "sarsa-token-lower-clip"])
def test_hand_targets(rl, expected):
    tabs = hand_tables(HAND)
    for row, y in enumerate(implied_targets(rl, HAND, tabs)):
        np.testing.assert_allclose(y, expected[row], rtol=1e-5, atol=1e-6, err_msg=f"row {row}")
    ref = run_reference(rl, HAND, tabs, vocab=3)
    for row in range(3):
        np.testing.assert_allclose(ref["targets"][row, HAND_D[row]], expected[row], rtol=1e-6, atol=1e-7)


SINGLE = hand_batch([
    # pos 0 a prompt, pos 1 the agent's token 0, pos 2 an observation: one decision at 0 with a = 0, n(0) = 2
    dict(tokens=[2, 0, 1], action_mask=[0, 1, 0], reward=[0, 0, 0], done=[0, 0, 0], segment_ids=[1, 1, 1],
         turn_ids=[0, 1, 2]),
    dict(tokens=[2, 0, 1], action_mask=[0, 1, 0], reward=[0, 0, 0], done=[0, 0, 0], segment_ids=[1, 1, 1],
         turn_ids=[0, 1, 2]),
    dict(tokens=[], action_mask=[], reward=[], done=[], segment_ids=[], turn_ids=[]),
])


def single_tables():
    tabs = {n: np.asarray(t).copy() for n, t in hand_tables(SINGLE).items()}
    tabs["qbar"][:] = 0.0
    tabs["qbar"][..., 3:] = PAD_LOGIT
    for row in (0, 1):
        p = row * HAND_L
        tabs["q"][0, p, :3] = [0.0, 0.0, 0.0]  # CE(Q_1 / T) = log 3
        tabs["q"][1, p, :3] = [0.0, 2 * math.log(2.0), 0.0]  # T = 2: CE(Q_2 / T) = log(1 + 2 + 1) = log 4
        tabs["qbar"][:, p, 0] = [2.0, 1.0]  # min_k Qbar(h_0, a_0) = 1
    tabs["v"][0] = 0.0  # row 0: advantage u = 1 - 0 = 1 > 0 -> expectile weight tau, AWR exp(1) clipped to 2
    tabs["v"][HAND_L] = 3.0  # row 1: u = 1 - 3 = -2 < 0 -> weight 1 - tau, AWR exp(-2)
    return {n: jnp.asarray(t) for n, t in tabs.items()}  # LM logits all 0: CE = log 3


def test_hand_cql_bc_awr_expectile():
    rl = LossConfig(backup="expectile", time_step="token", gamma=G, expectile_tau=0.7, cql_alpha=0.1,
                  cql_temperature=2.0, awr_beta=1.0, awr_max_weight=2.0, lambda_v=1.0, lambda_bc=1.0)
    loss, m, _ = run_objective(rl, SINGLE, single_tables(), vocab=3)
    assert m["decisions"] == 2
    y = G * 0.3  # y = g V(h_2) in both rows: n(0) = 2, the segment's last position (1 is not a decision)
    q = 2 * y ** 2  # both heads have Q(h_0, 0) = 0
    v = (0.7 * 1.0 ** 2 + 0.3 * 2.0 ** 2) / 2
    cql = math.log(3.0) + math.log(4.0)
    w = (2.0, math.exp(-2.0))
    bc = (w[0] + w[1]) * math.log(3.0) / 2
    for key, want in dict(q_loss=q, v_loss=v, cql_loss=cql, bc_loss=bc, awr_weight_mean=sum(w) / 2,
                          target_mean=y, loss=q + v + 0.1 * cql + bc, v_mean=1.5).items():
        np.testing.assert_allclose(m[key], want, rtol=1e-5, err_msg=key)
    # cql_gap is logsumexp_a Q - Q(a_data) at T = 1: head 1 log 3, head 2 log(1 + 4 + 1), mean over heads
    np.testing.assert_allclose(m["cql_gap"], (math.log(3.0) + math.log(6.0)) / 2, rtol=1e-5)

    # no decisions at all: a zero loss, finite metrics and zero gradients
    empty = dict(SINGLE, action_mask=np.zeros_like(SINGLE["action_mask"]), reward=np.zeros_like(SINGLE["reward"]))
    loss, m, grads = run_objective(rl, empty, single_tables(), vocab=3)
    assert float(loss) == 0.0 and m["decisions"] == 0.0 and np.isfinite(list(m.values())).all()
    assert all(np.isfinite(g).all() and not g.any() for g in grads.values())


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_imitate_mark_keeps_bc_to_the_marked_episodes(seed):
    """The batch's optional ``imitate`` field (the online loader's offline share): BC counts only the marked
    decisions, every other term and the denominator are unchanged; all ones is the unmarked loss."""
    rl = CONFIGS["expectile-utterance-awr-clip"]
    batch = random_batch(seed)
    B, L = batch["tokens"].shape
    tabs = random_tables(seed, 2, B * L, VOCAB, PADDED_VOCAB)
    rng = np.random.default_rng(seed)
    episode_mark = rng.integers(0, 2, size=(B, int(batch["segment_ids"].max()) + 1))  # one mark per episode
    marked = dict(batch, imitate=np.take_along_axis(episode_mark, batch["segment_ids"], 1).astype(np.int32))
    loss, metrics, grads = run_objective(rl, marked, tabs, vocab=VOCAB)
    ref = run_reference(rl, marked, tabs, vocab=VOCAB)
    assert_matches_reference(rl, loss, metrics, grads, ref, vocab=VOCAB, batch_shape=(B, L))
    plain = run_reference(rl, batch, tabs, vocab=VOCAB)
    assert 0 < ref["bc_loss"] < plain["bc_loss"]  # the mark removed some BC terms, not all
    for key in ("q_loss", "v_loss", "cql_loss", "decisions"):
        np.testing.assert_allclose(ref[key], plain[key], err_msg=key)
    ones = run_objective(rl, dict(batch, imitate=np.ones((B, L), np.int32)), tabs, vocab=VOCAB)
    np.testing.assert_allclose(float(ones[0]), plain["loss"], **TOL)
