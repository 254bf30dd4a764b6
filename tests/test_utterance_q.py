"""The utterance-level critic (jaxrl_lm/rl/utterance_q.py): its loss against a NumPy loop written from the module
docstring, the shared-history candidate layout against N separate copies, cached sampling against one forward."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxrl_lm
from jaxrl_lm.batch import trunk_inputs
from jaxrl_lm.config import RLConfig
from jaxrl_lm.eval import _policy_label
from jaxrl_lm.experiments.run import batches
from jaxrl_lm.generate import DecodeSpec, Sampling, decode
from jaxrl_lm.model_policy import describe
from jaxrl_lm.rl import ModelView, TrunkFeed, UtteranceQConfig
from jaxrl_lm.rl.utterance import turn_slots, turn_transitions
from jaxrl_lm.rl.utterance_q import (
    candidate_q, extended_feed, sample_candidates, stop_ids, utterance_q_loss,
)
from jaxrl_lm.train.update import model_view
from test_utterance import random_batch, reference as turn_reference

VOCAB, DIM, S, N, C = 200, 6, 16, 3, 4


def linear_view(rng: np.random.Generator, k: int) -> tuple[ModelView, dict]:
    """Heads that are plain linear maps, so that the NumPy reference can apply them position by position."""
    w = {"q": rng.normal(size=(k, VOCAB, DIM)), "qb": rng.normal(size=(k, VOCAB)), "v": rng.normal(size=DIM),
         "lm": rng.normal(size=(VOCAB, DIM))}
    f = {name: jnp.asarray(x, jnp.float32) for name, x in w.items()}
    view = ModelView(
        hidden=None, q_logits=None,
        q_at=lambda h, a: jnp.einsum("...d,k...d->k...", h, f["q"][:, a]) + f["qb"][:, a],
        value=lambda h: h @ f["v"], lm_logits=lambda h: h @ f["lm"].T, trunk=None, init_cache=None,
        lm_logsumexp=lambda h: jax.nn.logsumexp(h @ f["lm"].T, axis=-1),
        lm_at=lambda h, a: jnp.einsum("...d,...d->...", h, f["lm"][a]))
    return view, w


def np_q(w, h, a):
    return w["q"][:, a] @ h + w["qb"][:, a]  # [K]


def loop_reference(batch, hidden, cands, lengths, online, target, cfg, gamma):
    """Every term of the loss, one turn at a time (float64)."""
    tokens = batch["tokens"]
    rows, length = tokens.shape
    tr = turn_reference(batch, gamma)
    totals = dict(q=0.0, v=0.0, cql=0.0, bc=0.0)
    n_turns = int(tr["turn_end"].sum())
    for b in range(rows):
        ends = list(np.flatnonzero(tr["turn_end"][b]))
        seg = batch["segment_ids"][b]
        states = set(int(tr["state_index"][b, e]) for e in ends)
        states |= {int(tr["next_index"][b, e]) for e in ends if not tr["next_is_turn"][b, e] and not tr["done"][b, e]}
        states = sorted(states)
        assert len(ends) <= S and len(states) <= S

        def cand_q(w, slot, j):
            n = int(lengths[b, slot, j])
            at = states[slot] if n == 1 else length + (n - 2) * S * N + slot * N + j
            return np_q(w, hidden[b, at], int(cands[b, slot, j, n - 1]))

        for m, e in enumerate(ends):
            q = np_q(online, hidden[b, e - 1], tokens[b, e])
            tq = np_q(target, hidden[b, e - 1], tokens[b, e])
            v = hidden[b, tr["state_index"][b, e]] @ online["v"]
            nxt = int(tr["next_index"][b, e])
            if cfg.backup == "expectile":
                backup = hidden[b, nxt] @ online["v"]
            elif tr["done"][b, e]:
                backup = 0.0  # an ended episode does not back up
            else:
                backup = max(min(cand_q(target, states.index(nxt), j)) for j in range(N))
                if tr["next_is_turn"][b, e]:
                    ne = int(tr["next_turn_end"][b, e])
                    backup = max(backup, min(np_q(target, hidden[b, ne - 1], tokens[b, ne])))
            y = tr["reward"][b, e] + (1 - tr["done"][b, e]) * gamma * backup
            totals["q"] += np.sum((q - y) ** 2)
            if cfg.backup == "expectile":
                x = min(tq) - v
                totals["v"] += abs(cfg.expectile_tau - (x < 0)) * x ** 2
            slot = states.index(int(tr["state_index"][b, e]))
            for k in range(len(q)):
                scores = np.array([cand_q(online, slot, j)[k] for j in range(N)] + [q[k]]) / cfg.cql_temperature
                totals["cql"] += np.log(np.sum(np.exp(scores - scores.max()))) + scores.max() - q[k] / cfg.cql_temperature
        for i in range(1, length):
            if batch["action_mask"][b, i] and seg[i] != 0 and seg[i - 1] == seg[i]:
                logits = online["lm"] @ hidden[b, i - 1]
                totals["bc"] += np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[tokens[b, i]]
    return {name: value / n_turns for name, value in totals.items()}, n_turns


@pytest.mark.parametrize("backup,k,seed", [("max", 1, 0), ("max", 2, 1), ("expectile", 2, 2), ("expectile", 1, 3)])
def test_loss_matches_the_loop_reference(backup, k, seed):
    rng = np.random.default_rng(seed)
    batch = random_batch(rng, rows=5, length=40)
    total = 40 + C * S * N
    hidden = rng.normal(size=(5, total, DIM))
    cands = rng.integers(4, VOCAB, size=(5, S, N, C)).astype(np.int32)
    lengths = rng.integers(1, C + 1, size=(5, S, N)).astype(np.int32)
    online, w_online = linear_view(rng, k)
    target, w_target = linear_view(rng, k)
    cfg = UtteranceQConfig(backup=backup, cql_alpha=0.3, cql_temperature=0.7, max_turns=S, candidates=N,
                           candidate_tokens=C, expectile_tau=0.8)
    rl = RLConfig(gamma=0.9, decision_fraction=1.0)
    ref, n_turns = loop_reference(batch, hidden, cands, lengths, w_online, w_target, cfg, 0.9)
    full = {**batch, "candidate_tokens": cands, "candidate_lengths": lengths}
    loss, metrics = jax.jit(lambda bt, h: utterance_q_loss(
        cfg, rl, bt, h, {"online": online, "target": target}, jnp.float32(n_turns), vocab_size=VOCAB))(
        full, jnp.asarray(hidden, jnp.float32))
    assert float(metrics["decisions"]) == n_turns and float(metrics["decisions_dropped"]) == 0
    for name in ("q", "v", "cql", "bc"):
        np.testing.assert_allclose(float(metrics[f"{name}_loss"]), ref[name], rtol=2e-4, atol=1e-4, err_msg=name)
    expected = ref["q"] + ref["v"] + 0.3 * ref["cql"] + ref["bc"]
    np.testing.assert_allclose(float(loss), expected, rtol=2e-4)


def test_slots_count_what_does_not_fit():
    batch = random_batch(np.random.default_rng(7), rows=4, length=48)
    tt = turn_transitions(batch, gamma=0.9)
    turns = np.sum(np.asarray(tt.turn_end), axis=-1)
    slots = turn_slots(tt, 2)
    assert float(slots.dropped) >= np.sum(np.maximum(turns - 2, 0)) > 0
    chex.assert_shape([slots.turn_end, slots.state, slots.turn_state, slots.turn_next], (4, 2))


# ----------------------------------------------------------------------------------------------------------------
# The shared-history layout with a real model.


def tiny_model(context="history"):
    cfg = jaxrl_lm.load_config("configs/base.yaml", model__vocab_size=64, model__d_model=32, model__n_layers=2,
                               model__n_heads=2, model__max_seq_len=256, model__n_q_heads=2, model__context=context)
    model = jaxrl_lm.models.build(cfg.model, seed=0)
    return cfg, model


def small_batch(seed):
    batch = random_batch(np.random.default_rng(seed), rows=3, length=32)
    batch["tokens"] = batch["tokens"] % 60 + 4
    return batch


@pytest.mark.parametrize("context", ["history", "observation"])
def test_shared_history_equals_separate_copies(context):
    cfg, model = tiny_model(context)
    batch = small_batch(11)
    rng = np.random.default_rng(0)
    n, c = 2, 3
    tt = turn_transitions(batch, gamma=0.9)
    slots = turn_slots(tt, 12)
    assert float(slots.dropped) == 0
    cands = rng.integers(4, 64, size=(3, 12, n, c)).astype(np.int32)
    lengths = rng.integers(1, c + 1, size=(3, 12, n)).astype(np.int32)
    base = TrunkFeed(jnp.asarray(batch["tokens"]), *trunk_inputs(batch, context))
    feed = extended_feed(base, slots, jnp.asarray(cands))
    hidden = model.hidden(feed.tokens, feed.positions, None, mask=feed.mask)
    shared = np.asarray(candidate_q(model.q_at, hidden, slots, jnp.asarray(cands), jnp.asarray(lengths)))

    positions, ids = (np.asarray(x) for x in trunk_inputs(batch, context))
    checked = 0
    for b in range(3):
        for m in range(int(np.sum(slots.state_used[b]))):
            p = int(slots.state[b, m])
            history = [i for i in range(p + 1) if ids[b, i] == ids[b, p]]
            for j in range(n):
                seq = list(batch["tokens"][b, history]) + list(cands[b, m, j, :lengths[b, m, j]])
                pos = list(positions[b, history]) + [positions[b, p] + 1 + t for t in range(lengths[b, m, j])]
                tok = np.array([seq], np.int32)
                h = model.hidden(tok, np.array([pos], np.int32), np.ones_like(tok))[0]
                copy = np.asarray(model.q_at(h[len(seq) - 2], jnp.int32(seq[-1])))
                np.testing.assert_allclose(shared[:, b, m, j], copy, atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked > 10
    # Data positions are untouched by the candidates appended after them.
    plain = model.hidden(base.tokens, base.positions, base.attention_ids)
    np.testing.assert_allclose(np.asarray(hidden[:, :32]), np.asarray(plain), atol=1e-5)


def test_cached_sampling_reads_what_one_forward_reads():
    """Sampling writes each candidate token through the KV cache; re-reading the sampled candidates in one
    forward must give the same LM distributions that drew them (so the tokens are samples of that LM)."""
    cfg, model = tiny_model()
    batch = small_batch(3)
    tt = turn_transitions(batch, gamma=0.9)
    slots = turn_slots(tt, 12)
    base = TrunkFeed(jnp.asarray(batch["tokens"]), *trunk_inputs(batch, "history"))
    view = model_view(model, "history")
    n, c = 3, 4
    cands, lengths = sample_candidates(view, base, slots, stop_ids(batch, slots), jax.random.key(0), n=n, tokens=c,
                                       temperature=1.0, vocab_size=64)
    chex.assert_shape(cands, (3, 12, n, c))
    chex.assert_type([cands, lengths], jnp.int32)
    assert int(jnp.min(lengths)) >= 1 and int(jnp.max(lengths)) <= c
    stop = np.asarray(stop_ids(batch, slots))
    for b in range(3):  # after the first stop token, only stop tokens
        for m in range(12):
            for j in range(n):
                row = np.asarray(cands[b, m, j])
                assert np.all(row[int(lengths[b, m, j]):] == stop[b])
    # Greedy decoding through the cache equals greedy decoding by full forwards: the argmax at every offset of
    # the one-pass forward over the sampled sequence reproduces the next token at temperature -> 0.
    greedy, _ = sample_candidates(view, base, slots, stop_ids(batch, slots), jax.random.key(1), n=n, tokens=c,
                                  temperature=1e-6, vocab_size=64)
    feed = extended_feed(base, slots, greedy)
    hidden = model.hidden(feed.tokens, feed.positions, None, mask=feed.mask)
    logits = np.asarray(model.lm_logits(hidden))[..., :64]
    L, SN = 32, 12 * n
    for b in range(3):
        for m in range(int(np.sum(slots.state_used[b]))):
            for j in range(n):
                prev = int(slots.state[b, m])
                for off in range(c):
                    tok = int(greedy[b, m, j, off])
                    if off > 0 and int(greedy[b, m, j, off - 1]) == stop[b]:
                        break
                    assert tok == int(np.argmax(logits[b, prev])), (b, m, j, off)
                    prev = L + off * SN + m * n + j


def test_a_train_step_through_the_engine(tmp_path):
    """The objective through make_update on a task's data: finite loss, a sampler snapshot group that refreshes."""
    cfg = jaxrl_lm.load_config("configs/demo.yaml", rl__objective="utterance_q", model__d_model=32,
                               model__n_layers=1, data__task_episodes=50, data__batch_size=4, data__seq_len=64,
                               utterance_q__candidate_refresh=2, utterance_q__candidate_tokens=4,
                               utterance_q__candidates=2, utterance_q__max_turns=8)
    state = jaxrl_lm.init_state(cfg)
    assert set(state.groups) == {"target", "sampler"}
    update = jaxrl_lm.make_update(cfg)
    sampler0 = jax.device_get(state.groups["sampler"])
    for i, batch in enumerate(batches(cfg, steps=2)):
        state, metrics = update(state, batch)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["decisions_dropped"]) == 0
        sampler = jax.device_get(state.groups["sampler"])
        same = jax.tree.all(jax.tree.map(np.array_equal, sampler, sampler0))
        assert same == (i == 0)  # refreshed after the 2nd step only
        params = jax.device_get({k: state.params[k] for k in sampler})
        # (XLA may fuse the copy into another computation of the same update: equal up to float rounding.)
        gap = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), sampler, params)))
        assert (gap < 1e-6) == (i == 1)


# ----------------------------------------------------------------------------------------------------------------
# A two-turn chain MDP at the utterance level: the max backup over sampled turns recovers Q*.
#
# Turns are two tokens, a word and EOT. At s0 (observation S0), "L" leads to s1 (observation S1, reward 0) and
# "R" ends the episode with 0.5; at s1, "L" ends with 1 and "R" with 0. gamma 0.9:
#   Q*(s1, L) = 1, Q*(s1, R) = 0, Q*(s0, L) = 0.9, Q*(s0, R) = 0.5.
# The data says "R" 80% of the time in both states; the LM head that proposes candidates learns those odds, so
# the backup at s1 sees "L" only when one of the N samples (or the data's next turn) says it: the sampled max is
# an approximate max, Q(s0, L) -> gamma (1 - 0.8^(N+1)). N = 2 gives 0.44 (half of Q*), N = 4 0.61, N = 16 0.88;
# the test runs N = 4 (N = 16 costs three times as long: each step samples N candidates per row).

S0_, S1_, L_, R_, EOT_ = 1, 2, 3, 4, 5
CHAIN_ROWS, CHAIN_BATCH, CHAIN_STEPS = 4096, 256, 300


def chain_data(seed):
    rng = np.random.default_rng(seed)
    rows = {k: np.zeros((CHAIN_ROWS, 6), np.int32) for k in ("tokens", "action_mask", "done", "segment_ids",
                                                               "turn_ids")}
    rows["reward"] = np.zeros((CHAIN_ROWS, 6), np.float32)
    for b in range(CHAIN_ROWS):
        first, second = (R_ if rng.random() < 0.8 else L_), (R_ if rng.random() < 0.8 else L_)
        if first == R_:
            tok, act, rew = [S0_, R_, EOT_], [0, 1, 1], [0, 0, 0.5]
        else:
            tok, act, rew = [S0_, L_, EOT_, S1_, second, EOT_], [0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, float(second == L_)]
        n = len(tok)
        rows["tokens"][b, :n], rows["action_mask"][b, :n], rows["reward"][b, :n] = tok, act, rew
        rows["done"][b, n - 1], rows["segment_ids"][b, :n] = 1, 1
        rows["turn_ids"][b, :n] = [0, 1, 1, 2, 3, 3][:n]
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("n,expected_s0_l", [(4, 0.9 * (1 - 0.8 ** 5))])  # (2, 0.44) and (16, 0.88) also hold
def test_chain_mdp_max_backup_over_sampled_turns(n, expected_s0_l):
    cfg = jaxrl_lm.load_config(
        "configs/base.yaml", model__vocab_size=8, model__d_model=32, model__n_layers=1, model__n_heads=2,
        model__max_seq_len=8, data__seq_len=6, data__batch_size=CHAIN_BATCH, rl__objective="utterance_q",
        rl__gamma=0.9, rl__target_ema=0.1, utterance_q__backup="max", utterance_q__cql_alpha=0.01,
        utterance_q__candidates=n, utterance_q__candidate_tokens=2, utterance_q__max_turns=2,
        optim__learning_rate=3e-3, optim__schedule="cosine", optim__grad_clip=0.0, train__steps=CHAIN_STEPS)
    model = jaxrl_lm.models.build(cfg.model, seed=0)
    graphdef, params = jaxrl_lm.split_model(model)
    state = jaxrl_lm.train.init_state(cfg, params)
    update = jaxrl_lm.train.make_update(cfg, graphdef)
    data = chain_data(0)
    for step in range(CHAIN_STEPS):
        lo = (step * CHAIN_BATCH) % CHAIN_ROWS
        state, metrics = update(state, {k: v[lo:lo + CHAIN_BATCH] for k, v in data.items()})
    assert float(metrics["decisions_dropped"]) == 0
    model = nnx.merge(graphdef, jax.device_get(state.params))

    def q(prefix):  # min_k Q(s, u) of u = prefix's last word + EOT
        tok = np.array([prefix], np.int32)
        h = model.hidden(tok, np.arange(len(prefix), dtype=np.int32)[None], np.ones_like(tok))[0, -1]
        return float(jnp.min(model.q_at(h, jnp.int32(EOT_))))

    got = {"s0 L": q([S0_, L_]), "s0 R": q([S0_, R_]), "s1 L": q([S0_, L_, EOT_, S1_, L_]),
           "s1 R": q([S0_, L_, EOT_, S1_, R_])}
    np.testing.assert_allclose([got["s0 L"], got["s0 R"], got["s1 L"], got["s1 R"]], [expected_s0_l, 0.5, 1.0, 0.0], atol=0.06,
                               err_msg=str(got))


def test_utterance_policy_samples_the_lm_and_keeps_the_best_final_q():
    """The utterance policy is the LM head's samples ranked by the critic: the decoder's best-of-N over ``bc``
    proposals (whose ranking tests/test_generate.py checks), never the token-level Q in the proposals."""
    cfg, model = tiny_model()
    graphdef, params = jaxrl_lm.split_model(model)
    prompt = np.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], np.int32)
    lengths = np.array([3, 5], np.int32)
    stop, pad = np.array([3], np.int32), jnp.int32(0)
    outs = {kind: jax.device_get(decode(graphdef, params, prompt, lengths, jax.random.key(2),
                                        Sampling.make(temperature=1.0), stop, pad,
                                        spec=DecodeSpec(kind=kind, max_new_tokens=6, best_of=4)))
            for kind in ("utterance", "bc")}
    np.testing.assert_array_equal(outs["utterance"].tokens, outs["bc"].tokens)
    np.testing.assert_allclose(outs["utterance"].score, outs["bc"].score)
    with pytest.raises(ValueError, match="best_of >= 2"):
        jaxrl_lm.load_policy(params, "utterance", cfg=cfg, best_of=1)
    with pytest.raises(ValueError, match="temperature > 0"):
        jaxrl_lm.load_policy(params, "utterance", cfg=cfg, best_of=4, temperature=0.0)
    # eval.greedy_candidate is the utterance policy's default; an explicit argument wins; other kinds ignore it
    cfg = jaxrl_lm.load_config("configs/base.yaml", model__d_model=32, model__n_layers=1, model__n_heads=2,
                               model__n_q_heads=2)  # the byte tokenizer's vocabulary
    params = jaxrl_lm.split_model(jaxrl_lm.models.build(cfg.model, seed=0))[1]
    greedy_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, greedy_candidate=True))
    assert describe(jaxrl_lm.load_policy(params, "utterance", cfg=greedy_cfg))["greedy_candidate"]
    assert not describe(jaxrl_lm.load_policy(params, "utterance", cfg=cfg))["greedy_candidate"]
    assert not describe(jaxrl_lm.load_policy(params, "utterance", cfg=greedy_cfg,
                                             greedy_candidate=False))["greedy_candidate"]
    assert not describe(jaxrl_lm.load_policy(params, "bc", cfg=greedy_cfg))["greedy_candidate"]
    label = _policy_label({"policy": describe(jaxrl_lm.load_policy(params, "utterance", cfg=greedy_cfg))})
    assert label.endswith("best-of-4 +greedy"), label


def test_bad_settings_name_their_key():
    from jaxrl_lm.config import ConfigError
    from jaxrl_lm.rl import ParamGroup

    for key, value, field in (("utterance_q__candidates", 0, "utterance_q.candidates"),
                              ("utterance_q__candidate_temperature", 0.0, "utterance_q.candidate_temperature"),
                              ("utterance_q__candidate_refresh", -1, "utterance_q.candidate_refresh"),
                              ("utterance_q__expectile_tau", 1.0, "utterance_q.expectile_tau")):
        with pytest.raises(ConfigError, match=field):
            jaxrl_lm.load_config("configs/base.yaml", rl__objective="utterance_q", **{key: value})
    with pytest.raises(ValueError, match="refresh_every >= 1"):
        ParamGroup("sampler", "snapshot", ("transformer",))
    cfg = jaxrl_lm.load_config("configs/base.yaml", rl__objective="utterance_q", utterance_q__candidate_refresh=0)
    assert [(g.name, g.role) for g in jaxrl_lm.train.state.param_groups(cfg)] == [("target", "ema"),
                                                                                 ("sampler", "frozen")]
