"""Many seeds in one compile: the vmapped update gives every seed the state its own update would, compiled once."""

import chex
import jax
import numpy as np
import pytest

import jaxrl_lm
from jaxrl_lm.train import seeds as seeds_lib
from test_update import make_cfg, random_batch

SEEDS = (0, 1, 2)
STEPS = 3
# vmap batches the matmuls, so XLA may sum in another order than the unbatched program: float32 rounding,
# which AdamW's normalised steps can grow a little over a few steps.
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def cfg():
    # The byte tokenizer's vocabulary, so that train_seeds can read real episodes with the same config.
    # Batch 8: the loop shards rows over the 8 forced host devices.
    return make_cfg(model__vocab_size=260, rl__target_ema=0.25, train__steps=STEPS, data__batch_size=8)


@pytest.fixture(scope="module")
def single_update(cfg):
    """One ``make_update``, shared by every reference run (one compile for the module)."""
    return jaxrl_lm.make_update(cfg)


@pytest.fixture(scope="module")
def initial_states(cfg):
    """``init_state(cfg, seed=s)`` per seed, on the host: updates donate their input, so each run starts from
    its own device copy of these."""
    return [jax.device_get(jaxrl_lm.init_state(cfg, seed=s)) for s in SEEDS]


def separate_runs(update, initial_states, batches_per_seed):
    """Each seed trained alone on its own batches. Returns the final states and last metrics (host arrays)."""
    states, metrics = [], []
    for state, seed_batches in zip(initial_states, batches_per_seed):
        for batch in seed_batches:
            state, m = update(state, batch)
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states, metrics


def check_seed_axis(stacked, reference, n):
    """Leaves of ``stacked`` are ``[n]`` + the reference leaf's shape, with its dtype."""
    chex.assert_tree_shape_prefix(stacked, (n,))
    for seed_tree in jaxrl_lm.unstack(stacked):
        chex.assert_trees_all_equal_shapes_and_dtypes(seed_tree, reference)


def test_init_states_stacks_the_single_seed_states_exactly(cfg, initial_states):
    states = jaxrl_lm.init_states(cfg, SEEDS)
    check_seed_axis(states, initial_states[0], len(SEEDS))
    for stacked, single in zip(jaxrl_lm.unstack(states), initial_states):
        chex.assert_trees_all_equal(stacked, single)
    first, second = (jax.tree.leaves(single.params) for single in initial_states[:2])
    assert not any(np.allclose(a, b) for a, b in zip(first, second) if np.std(a) > 0)  # seeds really differ


def test_per_seed_batches_match_separate_updates_and_compile_once(cfg, single_update, initial_states):
    batches = [[random_batch(cfg, seed=10 * seed + t) for t in range(STEPS)] for seed in SEEDS]
    expected_states, expected_metrics = separate_runs(single_update, initial_states, batches)

    update = jaxrl_lm.make_multi_seed_update(cfg)
    states = seeds_lib.stack(initial_states)  # == init_states(cfg, SEEDS), tested above
    for t in range(STEPS):
        stacked_batch = {k: np.stack([batches[i][t][k] for i in range(len(SEEDS))]) for k in batches[0][t]}
        states, metrics = update(states, stacked_batch)
    assert update._cache_size() == 1

    check_seed_axis(states, expected_states[0], len(SEEDS))
    for value in metrics.values():
        chex.assert_shape(value, (len(SEEDS),))
        chex.assert_type(value, np.float32)
    for i, seed_state in enumerate(jaxrl_lm.unstack(jax.device_get(states))):
        assert int(seed_state.step) == STEPS and int(seed_state.skipped) == 0
        chex.assert_trees_all_equal(seed_state.rng, expected_states[i].rng)
        chex.assert_trees_all_close(seed_state.params, expected_states[i].params, **TOL)
        chex.assert_trees_all_close(seed_state.groups["target"], expected_states[i].groups["target"], **TOL)
        chex.assert_trees_all_close(seed_state.opt_state, expected_states[i].opt_state, **TOL)
        chex.assert_trees_all_close({k: v[i] for k, v in metrics.items()}, expected_metrics[i], **TOL)


def test_shared_batch_is_the_broadcast_case(cfg, single_update, initial_states):
    batches = [random_batch(cfg, seed=100 + t) for t in range(STEPS)]
    expected_states, _ = separate_runs(single_update, initial_states, [batches] * len(SEEDS))

    update = jaxrl_lm.make_multi_seed_update(cfg)
    states = seeds_lib.stack(initial_states)
    for batch in batches:
        states, _ = update(states, batch)
    assert update._cache_size() == 1
    for seed_state, expected in zip(jaxrl_lm.unstack(jax.device_get(states)), expected_states):
        chex.assert_trees_all_close(seed_state.params, expected.params, **TOL)

    with pytest.raises(ValueError, match=r"\[3, B, L\]"):
        update(states, {k: np.stack([v, v]) for k, v in batches[0].items()})


def test_train_seeds_is_one_run_per_seed_on_the_same_batches(cfg, single_update, initial_states):
    episodes = jaxrl_lm.data.synthetic_episodes(40, seed=0)
    runs = jaxrl_lm.train_seeds(cfg, SEEDS, episodes=episodes, log_every=2)

    assert runs.seeds == SEEDS
    np.testing.assert_array_equal(runs.history["step"], [2, STEPS])
    chex.assert_shape([runs.history["loss"], runs.history["q_mean"]], (2, len(SEEDS)))
    assert np.all(np.isfinite(runs.history["loss"]))
    # Seed s is the run that train.seed=s would make: its own initial state, the loader's batches in order.
    loader_batches = list(jaxrl_lm.batches(cfg, episodes, steps=STEPS))
    expected_states, _ = separate_runs(single_update, initial_states, [loader_batches] * len(SEEDS))
    assert len(runs.params) == len(SEEDS)
    for params, expected in zip(runs.params, expected_states):
        chex.assert_trees_all_close(params, expected.params, **TOL)
