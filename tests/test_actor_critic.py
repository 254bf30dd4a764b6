"""The actor-critics (jaxrl_lm/rl/actor_critic.py): the actor losses against NumPy loops written from the module
docstring, where the actor loss's gradients go (and do not go), the KL at the reference, and exact resume of a
run that starts from another run's parameters with every group."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxrl_lm
from jaxrl_lm import envs
from jaxrl_lm.config import ConfigError, RLConfig
from jaxrl_lm.experiments.run import batches
from jaxrl_lm.models import model_graphdef
from jaxrl_lm.rl import ArcherConfig, KLActorConfig, get_objective, token_kl
from jaxrl_lm.rl.actor_critic import actor_critic_loss, leave_one_out_mean
from jaxrl_lm.rl.losses import awr_weights
from jaxrl_lm import checkpoints
from jaxrl_lm.train import loop
from jaxrl_lm.train.update import loss_fn
from test_utterance import random_batch, reference as turn_reference
from test_utterance_q import C, DIM, N, S, VOCAB, linear_view, np_q

PADDED = 8  # vocabulary padding ids above VOCAB in the KL test


def np_log_softmax(x):
    x = x - x.max()
    return x - np.log(np.sum(np.exp(x)))


def np_kl(logits, ref_logits):
    """KL(softmax(logits) || softmax(ref_logits)), one id at a time."""
    lp, lq = np_log_softmax(logits), np_log_softmax(ref_logits)
    return sum(np.exp(lp[a]) * (lp[a] - lq[a]) for a in range(len(lp)))


def test_token_kl_matches_the_loop_and_ignores_vocabulary_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, VOCAB + PADDED)) * 2
    ref = rng.normal(size=(3, 5, VOCAB + PADDED)) * 2
    got = np.asarray(token_kl(jnp.asarray(logits, jnp.float32), jnp.asarray(ref, jnp.float32), VOCAB))
    want = np.array([[np_kl(logits[i, j, :VOCAB], ref[i, j, :VOCAB]) for j in range(5)] for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    same = np.asarray(token_kl(jnp.asarray(logits, jnp.float32), jnp.asarray(logits, jnp.float32), VOCAB))
    np.testing.assert_allclose(same, 0.0, atol=1e-6)
    assert np.all(got >= 0)


def test_advantage_weights_and_their_clipping_match_the_loop():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 7)) * 3  # [K, ...]
    v = rng.normal(size=7)
    got = np.asarray(awr_weights(jnp.asarray(q, jnp.float32), jnp.asarray(v, jnp.float32), 1.5, 4.0))
    want = [min(np.exp(1.5 * (min(q[0, i], q[1, i]) - v[i])), 4.0) for i in range(7)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.any(got == 4.0) and np.any(got < 4.0)  # the cap binds on some and not on others
    x = rng.normal(size=(4, 5))
    np.testing.assert_allclose(np.asarray(leave_one_out_mean(jnp.asarray(x))),
                               [[np.mean(np.delete(row, j)) for j in range(5)] for row in x], rtol=1e-5)


def loop_actor(batch, hidden, ref_hidden, cands, lengths, online, target, reference, cfg, gamma):
    """The actor loss of the module docstring, one state (pg) or one turn (awr) at a time, float64."""
    tokens = batch["tokens"]
    rows, length = tokens.shape
    tr = turn_reference(batch, gamma)
    n_turns = int(tr["turn_end"].sum())
    total = 0.0

    def lm(w, h):
        return w["lm"] @ h

    for b in range(rows):
        ends = list(np.flatnonzero(tr["turn_end"][b]))
        if cfg.actor_update == "awr":
            for e in ends:
                adv = min(np_q(target, hidden[b, e - 1], tokens[b, e])) - hidden[b, tr["state_index"][b, e]] @ online["v"]
                w = min(np.exp(cfg.awr_beta * adv), cfg.awr_max_weight)
                for p in range(tr["state_index"][b, e] + 1, e + 1):
                    logits, ref = lm(online, hidden[b, p - 1]), lm(reference, ref_hidden[b, p - 1])
                    kl = np_kl(logits, ref)
                    total += -w * np_log_softmax(logits)[tokens[b, p]] + cfg.kl_coef * kl
            continue
        states = set(int(tr["state_index"][b, e]) for e in ends)
        states |= {int(tr["next_index"][b, e]) for e in ends if not tr["next_is_turn"][b, e] and not tr["done"][b, e]}
        states = sorted(states)
        for m, state in enumerate(states):
            q, logp, kl = np.zeros(N), np.zeros(N), np.zeros(N)
            for j in range(N):
                n = int(lengths[b, m, j])
                at = state if n == 1 else length + (n - 2) * S * N + m * N + j
                q[j] = min(np_q(target, hidden[b, at], int(cands[b, m, j, n - 1])))
                for c in range(n):
                    prefix = state if c == 0 else length + (c - 1) * S * N + m * N + j
                    logits, ref = lm(online, hidden[b, prefix]), lm(reference, ref_hidden[b, prefix])
                    logp[j] += np_log_softmax(logits)[cands[b, m, j, c]]
                    kl[j] += np_kl(logits, ref)
            for j in range(N):
                base = (np.sum(q) - q[j]) / (N - 1) if cfg.baseline == "samples" else hidden[b, state] @ online["v"]
                total += (-(q[j] - base) * logp[j] + cfg.kl_coef * kl[j]) / N
    return total / n_turns, n_turns


@pytest.mark.parametrize("update,baseline,seed", [("pg", "samples", 0), ("pg", "value", 1), ("awr", "value", 2)])
def test_actor_loss_matches_the_loop_reference(update, baseline, seed):
    rng = np.random.default_rng(seed)
    batch = random_batch(rng, rows=4, length=40)
    total = 40 + C * S * N
    hidden = rng.normal(size=(4, total, DIM))
    ref_hidden = rng.normal(size=(4, total, DIM))
    cands = rng.integers(4, VOCAB, size=(4, S, N, C)).astype(np.int32)
    lengths = rng.integers(1, C + 1, size=(4, S, N)).astype(np.int32)
    online, w_online = linear_view(rng, 2)
    target, w_target = linear_view(rng, 2)
    reference, w_reference = linear_view(rng, 2)
    cfg = KLActorConfig(backup="expectile", cql_alpha=0.0, max_turns=S, candidates=N, candidate_tokens=C,
                        actor_update=update, baseline=baseline, kl_coef=0.3, awr_beta=0.7, awr_max_weight=3.0)
    rl = RLConfig(gamma=0.9, decision_fraction=1.0)
    ref, n_turns = loop_actor(batch, hidden, ref_hidden, cands, lengths, w_online, w_target, w_reference, cfg, 0.9)
    full = {**batch, "candidate_tokens": cands, "candidate_lengths": lengths,
            "reference_hidden": jnp.asarray(ref_hidden, jnp.float32)}
    views = {"online": online, "target": target, "reference": reference}
    _, metrics = jax.jit(lambda bt, h: actor_critic_loss(cfg, rl, bt, h, views, jnp.float32(n_turns),
                                                          vocab_size=VOCAB))(full, jnp.asarray(hidden, jnp.float32))
    np.testing.assert_allclose(float(metrics["actor_loss"]), ref, rtol=2e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Through the engine: the real model, the parameter groups and the training loop.

SMALL = dict(model__d_model=32, model__n_layers=1, data__task_episodes=60, data__batch_size=8, data__seq_len=64,
             optim__schedule="constant", train__log_every=1, train__checkpoint_every=0)


def small_cfg(objective, **kw):
    section = {f"{objective}__{k}": v for k, v in dict(max_turns=8, candidates=2, candidate_tokens=4).items()}
    return jaxrl_lm.load_config("configs/demo.yaml", **{"rl__objective": objective, **SMALL, **section, **kw})


@pytest.mark.parametrize("objective", ["kl_actor", "archer"])
def test_actor_gradients_reach_neither_the_critic_nor_the_reference(objective):
    """With every critic term off, the loss is the actor's: it moves the LM head and the trunk, never the Q or V
    heads, and the frozen reference gets no gradient; at the start the actor is the reference, KL 0."""
    off = {f"{objective}__{k}": 0.0 for k in ("lambda_q", "lambda_v", "cql_alpha", "lambda_bc")}
    cfg = small_cfg(objective, **off)
    state = jaxrl_lm.init_state(cfg)
    assert set(state.groups) == {"target", "reference"}
    batch = {k: jnp.asarray(v) for k, v in next(iter(batches(cfg, steps=1))).items()}
    objective_ = get_objective(objective)
    denominator = objective_.denominator(cfg.section(objective), cfg.rl, batch)
    graphdef = model_graphdef(cfg.model)

    def loss(params, groups):
        return loss_fn(cfg, graphdef, params, groups, batch, denominator, jax.random.key(3))

    (value, metrics), (g_params, g_groups) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state.params, state.groups)
    norm = lambda tree: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))  # noqa: E731
    assert norm(g_params["q_heads"]) == 0.0 and norm(g_params["v_head"]) == 0.0
    assert norm(g_groups) == 0.0
    assert norm(g_params["transformer"]) > 0.0
    assert float(metrics["critic_loss"]) == 0.0 and float(value) == pytest.approx(float(metrics["actor_loss"]))
    assert abs(float(metrics["kl_to_reference"])) < 1e-5


def test_bad_actor_settings_name_their_key():
    with pytest.raises(ConfigError, match="kl_actor.candidate_refresh"):
        small_cfg("kl_actor", kl_actor__candidate_refresh=2)
    with pytest.raises(ConfigError, match="kl_actor.candidates must be at least 2"):
        small_cfg("kl_actor", kl_actor__candidates=1)
    with pytest.raises(ConfigError, match="archer.actor_update: awr"):
        small_cfg("archer", archer__backup="max", archer__baseline="samples")
    with pytest.raises(ConfigError, match="archer.baseline: value"):
        small_cfg("archer", archer__backup="max", archer__actor_update="pg")
    with pytest.raises(ConfigError, match="archer.kl_coef"):
        small_cfg("archer", archer__kl_coef=-1.0)
    assert ArcherConfig().actor_update == "awr" and KLActorConfig().actor_update == "pg"
    # Without the KL term there is no prior: no reference group (nor its forward).
    groups = get_objective("archer").groups(ArcherConfig(kl_coef=0.0, cql_alpha=0.0), RLConfig())
    assert [g.name for g in groups] == ["target"]


def restored(out_dir):
    """The whole saved state of a run's newest checkpoint (a stack of seeds), as the file lays it out."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with checkpoints.reader(checkpoints.resolve(out_dir)) as r:
        step = checkpoints.existing_step(r, None)
        tree = r.item_metadata(step)["state"].tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        return r.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state


@pytest.mark.slow
def test_init_from_a_multi_seed_run_and_exact_resume_with_every_group(tmp_path, compile_once):
    """A 2-seed source run; a kl_actor run of the same seeds starts from it (params and the frozen reference are
    each seed's source parameters, the EMA target too), and 4 steps straight equal 2 + resume + 2 bitwise."""
    seeds = (0, 1)
    source_cfg = small_cfg("utterance_q", train__steps=2, train__out_dir=str(tmp_path / "source"))
    episodes = envs.task_dataset(source_cfg.data)  # every run here reads the same data section
    train = lambda cfg, **kw: loop.train(cfg, progress=False, episodes=episodes, **kw)  # noqa: E731
    train(source_cfg, seeds=seeds)
    source = restored(tmp_path / "source")["params"]

    def actor_cfg(name, steps):
        return small_cfg("kl_actor", train__steps=steps, train__init_from=str(tmp_path / "source"),
                         train__out_dir=str(tmp_path / name))

    first = train(actor_cfg("b", 2), seeds=seeds)
    assert first["step"] == 2
    train(actor_cfg("a", 4), seeds=seeds)
    train(actor_cfg("b", 4), seeds=seeds, resume=True)
    a, b = restored(tmp_path / "a"), restored(tmp_path / "b")
    assert jax.tree.structure(a) == jax.tree.structure(b) and set(a["groups"]) == {"target", "reference"}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):  # params, groups, optimizer state, step, rng
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    reference = a["groups"]["reference"]
    assert set(reference) == {k for k in ("transformer", "lm_head") if k in source}
    for key in reference:  # frozen at the source's parameters, seed by seed
        for x, y in zip(jax.tree.leaves(reference[key]), jax.tree.leaves(source[key])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    moved = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                                         a["params"]["transformer"], source["transformer"]))
    assert max(moved) > 0  # the actor trained away from it

    with pytest.raises(ConfigError, match=r"holds the seeds \[0, 1\]; this run trains \[0, 2\]"):
        train(actor_cfg("c", 1), seeds=(0, 2))
    with pytest.raises(ConfigError, match="model sections must match"):
        train(small_cfg("kl_actor", model__d_model=48, train__steps=1, train__init_from=str(tmp_path / "source"),
                        train__out_dir=str(tmp_path / "d")), seeds=seeds)
