"""The jitted update: target EMA, no gradient into targets, accumulation, the non-finite guard, one compile."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrl_lm
from jaxrl_lm.train import update as update_lib

TINY = dict(model__d_model=32, model__n_layers=2, model__n_heads=2, model__vocab_size=16, model__max_seq_len=16,
            data__seq_len=16, data__batch_size=4)


def make_cfg(**kw):
    return jaxrl_lm.load_config("configs/base.yaml", **{**TINY, **kw})


def random_batch(cfg, seed=0, batch_size=None):
    """Two packed episodes per row with observation and agent turns, the second cut by the row end."""
    rng = np.random.default_rng(seed)
    b, length = batch_size or cfg.data.batch_size, cfg.data.seq_len
    tokens = rng.integers(0, cfg.model.vocab_size, (b, length), dtype=np.int32)
    turn = (np.arange(length) // 3).astype(np.int32)
    action_mask = np.tile((turn % 2 == 1).astype(np.int32), (b, 1))
    seg = np.ones((b, length), np.int32)
    seg[:, length // 2:] = 2
    reward = np.where(action_mask == 1, rng.normal(size=(b, length)), 0).astype(np.float32)
    done = np.zeros((b, length), np.int32)
    last_action_seg1 = max(i for i in range(length // 2) if action_mask[0, i])
    done[:, last_action_seg1] = 1
    turn_ids = np.where(seg == 1, turn, turn - turn[length // 2]).astype(np.int32)
    return {"tokens": tokens, "action_mask": action_mask, "reward": reward, "done": done,
            "segment_ids": seg, "turn_ids": turn_ids}


def setup(cfg, seed=0):
    model = jaxrl_lm.models.build(cfg.model, seed=seed)
    graphdef, params = jaxrl_lm.split_model(model)
    return graphdef, jaxrl_lm.train.init_state(cfg, params)


def copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


@pytest.mark.parametrize("scope", ["heads", "full"])
def test_no_gradient_reaches_target_params(scope):
    cfg = make_cfg(token_q__target_scope=scope, token_q__backup="max")
    graphdef, state = setup(cfg)
    batch = jax.tree.map(jnp.asarray, random_batch(cfg))
    denom = jaxrl_lm.rl.count_decisions(batch, cfg.rl)

    def loss_wrt_target(target):
        return update_lib.loss_fn(cfg, graphdef, state.params, {"target": target}, batch, denom, None)[0]

    grads = jax.grad(loss_wrt_target)(state.groups["target"])
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.asarray(leaf) == 0)
    online = jax.grad(lambda p: update_lib.loss_fn(cfg, graphdef, p, state.groups, batch, denom, None)[0])(
        state.params)
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(online["q_heads"]))


@pytest.mark.parametrize("scope", ["heads", "full"])
def test_target_ema_follows_formula(scope):
    cfg = make_cfg(token_q__target_scope=scope, rl__target_ema=0.25)
    graphdef, state = setup(cfg)
    # Make the target differ from the online parameters so the formula is checked, not an identity.
    state = state.replace(groups={"target": jax.tree.map(lambda x: x + 0.5, state.groups["target"])})
    target_before = copy(state.groups["target"])
    new_state, metrics = jaxrl_lm.train.make_update(cfg, graphdef)(state, random_batch(cfg))
    assert float(metrics["update_applied"]) == 1.0
    assert set(new_state.groups["target"]) == set(jaxrl_lm.train.param_groups(cfg)[0].keys)
    expected = jax.tree.map(lambda t, p: t + 0.25 * (np.asarray(p) - t), target_before,
                            {k: new_state.params[k] for k in target_before})
    chex.assert_trees_all_close(new_state.groups["target"], expected, atol=1e-6)


def test_accumulation_equals_full_batch_and_syncs_target_once():
    base = make_cfg(data__batch_size=8, rl__target_ema=0.5, optim__grad_clip=0.0)
    accum = make_cfg(data__batch_size=8, rl__target_ema=0.5, optim__grad_clip=0.0, optim__grad_accum=4)
    batch = random_batch(base, batch_size=8)
    graphdef, state_a = setup(base)
    _, state_b = setup(accum)
    new_a, m_a = jaxrl_lm.train.make_update(base, graphdef)(state_a, batch)
    new_b, m_b = jaxrl_lm.train.make_update(accum, graphdef)(state_b, batch)
    np.testing.assert_allclose(float(m_a["loss"]), float(m_b["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_a["decisions"]), float(m_b["decisions"]))
    chex.assert_trees_all_close(new_a.params, new_b.params, atol=1e-5)
    # One optimizer step, one EMA application: with eta = 0.5 the target is the midpoint exactly once.
    chex.assert_trees_all_close(new_a.groups["target"], new_b.groups["target"], atol=1e-5)
    assert int(new_b.step) == 1
    assert int(new_b.opt_state[-1][0].count) == 1  # Adam's step counter: one real optimizer step


def test_non_finite_batch_is_skipped_and_counted():
    cfg = make_cfg()
    graphdef, state = setup(cfg)
    update = jaxrl_lm.train.make_update(cfg, graphdef)
    before = copy((state.params, state.groups["target"], state.opt_state))
    bad = random_batch(cfg)
    bad["reward"][0, np.argmax(bad["action_mask"][0])] = np.nan
    state, metrics = update(state, bad)
    assert float(metrics["update_applied"]) == 0.0
    assert int(state.skipped) == 1 and int(state.step) == 1
    chex.assert_trees_all_equal((state.params, state.groups["target"], state.opt_state), before)
    state, metrics = update(state, random_batch(cfg, seed=1))
    assert float(metrics["update_applied"]) == 1.0 and int(state.skipped) == 1
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.params))


def test_update_compiles_once_and_reports_metrics():
    cfg = make_cfg()
    graphdef, state = setup(cfg)
    update = jaxrl_lm.train.make_update(cfg, graphdef)
    for seed in range(3):
        state, metrics = update(state, random_batch(cfg, seed=seed))
    assert update._cache_size() == 1
    for key in ("loss", "q_loss", "v_loss", "cql_loss", "bc_loss", "q_mean", "v_mean", "target_mean", "td_error",
                "cql_gap", "grad_norm", "tokens", "skipped", "decisions", "decisions_dropped"):
        assert key in metrics, key
        chex.assert_shape(metrics[key], ())
        assert np.isfinite(float(metrics[key])), key
    assert float(metrics["tokens"]) == cfg.data.batch_size * cfg.data.seq_len
    assert int(state.step) == 3


@pytest.mark.parametrize("backup", ["expectile", "max", "sarsa"])
def test_loss_decreases_on_a_fixed_batch(backup):
    cfg = make_cfg(token_q__backup=backup, optim__learning_rate=3e-3)
    graphdef, state = setup(cfg)
    update = jaxrl_lm.train.make_update(cfg, graphdef)
    batch = random_batch(cfg)
    losses = []
    for _ in range(30):
        state, metrics = update(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses


def test_weight_decay_reaches_weights_and_never_biases_or_norm_scales():
    """With zero gradients, one AdamW step changes a parameter only through weight decay: every kernel and
    embedding shrinks by lr * wd, and no bias or norm scale moves, whatever its rank (the layer scan stacks the
    blocks' biases and scales into [n_layers, d] matrices, the K Q-heads stack theirs)."""
    lr, wd = 0.1, 0.5
    cfg = make_cfg(optim__learning_rate=lr, optim__weight_decay=wd, optim__warmup_steps=0, optim__grad_clip=0.0,
                   optim__schedule="constant")
    _, state = setup(cfg)
    optimizer = jaxrl_lm.train.state.make_optimizer(cfg)
    params = copy(state.params)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    seen = {True: 0, False: 0}
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        name = jax.tree_util.keystr(path)
        leaf = params
        for key in path:
            leaf = leaf[key.key]
        decayed = not (name.endswith("bias']") or name.endswith("['scale']"))
        expected = -lr * wd * np.asarray(leaf) if decayed else np.zeros_like(leaf)
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, atol=1e-9, err_msg=name)
        seen[decayed] += 1
    assert seen[True] and seen[False]
    assert np.ndim(params["transformer"]["h"]["ln_1"]["scale"]) == 2  # the stacked case a rank rule decayed
