"""A frozen trunk bottom (train.frozen_layers): the split of the parameters, the gradient of the trained part, a
run that leaves the bottom bitwise unchanged, keeps no optimizer moments or EMA copy of it and resumes exactly."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrl_lm
from jaxrl_lm import envs
from jaxrl_lm.config import ConfigError, load_config
from jaxrl_lm.models.partition import Partition
from jaxrl_lm.train.flops import update_flops
from jaxrl_lm.train.state import abstract_train_state
from jaxrl_lm.train.update import loss_fn
from helpers import restore_state, straight_and_resumed

SMALL = dict(model__d_model=32, model__n_layers=3, model__n_heads=4, data__task_episodes=200, data__batch_size=8,
             data__seq_len=64, optim__schedule="constant", train__checkpoint_every=0)


def small_cfg(**kw):
    return load_config("configs/demo.yaml", **{**SMALL, **kw})


def leaves_equal(a, b) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("frozen", [0, 1, 3, -1])
def test_split_and_join_are_inverse_and_slice_the_stacked_blocks(family, frozen):
    cfg = small_cfg(model__family=family, train__frozen_layers=frozen)
    params = jaxrl_lm.split_model(jaxrl_lm.build_model(cfg.model, seed=0))[1]
    part = Partition.of(cfg)
    trained, bottom = part.split(params)
    assert leaves_equal(part.join(trained, bottom), params)
    blocks = "h" if family == "gpt2" else "layers"
    embedding = "wte" if family == "gpt2" else "embed_tokens"
    if frozen == 0:
        assert bottom == {} and leaves_equal(trained, params)
        return
    n = 3 if frozen < 0 else frozen
    assert embedding in bottom["transformer"] and embedding not in trained.get("transformer", {})
    for leaf in jax.tree.leaves(bottom["transformer"][blocks]):
        assert leaf.shape[0] == n
    if n < 3:
        for leaf in jax.tree.leaves(trained["transformer"][blocks]):
            assert leaf.shape[0] == 3 - n
    else:
        assert blocks not in trained.get("transformer", {})
    assert ("transformer" in trained) == (frozen != -1)  # -1: the final norm is frozen too; only heads train
    for head in ("q_heads", "v_head"):
        assert leaves_equal(trained[head], params[head])


@pytest.mark.parametrize("frozen", [1, -1])
def test_the_trained_part_gets_the_gradient_the_whole_model_would_get(frozen):
    """Freezing changes which parameters move, not the loss or the gradient of those that do."""
    cfg = small_cfg(train__frozen_layers=frozen)
    whole_cfg = small_cfg()
    params = jaxrl_lm.split_model(jaxrl_lm.build_model(cfg.model, seed=1))[1]
    batch = next(iter(jaxrl_lm.batches(cfg, steps=1)))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    groups = jaxrl_lm.init_state(whole_cfg, params).groups
    denominator = jnp.float32(100.0)
    (loss_whole, _), grads_whole = jax.value_and_grad(
        lambda p: loss_fn(whole_cfg, jaxrl_lm.split_model(jaxrl_lm.build_model(cfg.model))[0], p, groups, batch,
                          denominator, None), has_aux=True)(params)
    part = Partition.of(cfg)
    trained, bottom = part.split(params)
    graphdef = jaxrl_lm.split_model(jaxrl_lm.build_model(cfg.model))[0]
    frozen_groups = jaxrl_lm.init_state(cfg, params).groups
    (loss_frozen, _), grads_frozen = jax.value_and_grad(
        lambda t: loss_fn(cfg, graphdef, part.join(t, bottom), frozen_groups, batch, denominator, None),
        has_aux=True)(trained)
    np.testing.assert_allclose(loss_frozen, loss_whole, rtol=1e-6)
    chex.assert_trees_all_equal_shapes(grads_frozen, part.trained(grads_whole))
    chex.assert_trees_all_close(grads_frozen, part.trained(grads_whole), rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def frozen_runs(tmp_path_factory):
    """A 4-step run with 2 of 3 blocks frozen and a full-scope EMA target; the same run as 2 steps + resume."""
    root = tmp_path_factory.mktemp("frozen")
    kw = dict(train__frozen_layers=2, token_q__target_scope="full", train__log_every=2)
    return root, straight_and_resumed(small_cfg, root, envs.task_dataset(small_cfg().data), **kw)


@pytest.mark.slow
def test_a_run_leaves_the_frozen_bottom_bitwise_unchanged_and_resumes_exactly(frozen_runs):
    root, cfg = frozen_runs
    state, first = restore_state(cfg), restore_state(cfg, step=1)
    part = Partition.of(cfg)
    trained, bottom = part.split(state.params)
    # The embeddings and blocks 0, 1 did not move over steps 2..4 (bitwise), nor in step 1: the loop's initial
    # draw (sharded, compiled apart) matches init_state's to rounding.
    assert leaves_equal(bottom, part.split(first.params)[1])
    initial = jaxrl_lm.init_state(cfg).params
    chex.assert_trees_all_close(bottom, part.split(initial)[1], rtol=0, atol=1e-7)
    assert not leaves_equal(trained, part.trained(first.params))  # the top block and the heads did
    # No optimizer moments and no EMA copy of the frozen bottom: both hold exactly the trained part's shapes.
    chex.assert_trees_all_equal_shapes(state.opt_state[1][0].mu, trained)
    chex.assert_trees_all_equal_shapes(state.groups["target"], {k: trained[k] for k in state.groups["target"]})
    assert leaves_equal(state, restore_state(small_cfg(train__out_dir=str(root / "b"))))


def test_a_frozen_run_loads_whole_for_policies_and_target_views(frozen_runs):
    root, cfg = frozen_runs
    _, params, _ = jaxrl_lm.load_params(root / "a")
    _, target, _ = jaxrl_lm.load_params(root / "a", group="target")
    chex.assert_trees_all_equal_shapes(params, target)  # the target's trunk completed by the frozen bottom
    part = Partition.of(cfg)
    assert leaves_equal(part.split(target)[1], part.split(params)[1])
    policy = jaxrl_lm.load_policy(root / "a", kind="ilql")
    observation = envs.make_env("grid").reset(0)
    (action,) = policy([envs.render_transcript([{"role": "observation", "text": observation}])])
    assert isinstance(action, str)


def test_frozen_layers_cut_the_update_flops_and_the_optimizer_state():
    whole, frozen, heads_only = small_cfg(), small_cfg(train__frozen_layers=2), small_cfg(train__frozen_layers=-1)
    f = [update_flops(c, 8, 64) for c in (whole, frozen, heads_only)]
    assert f[0].heads == f[1].heads == f[2].heads
    # 3 blocks trained cost 9 block-forwards; 1 trained + 2 frozen cost 5; 3 frozen cost 3.
    np.testing.assert_allclose([f[1].trunk / f[0].trunk, f[2].trunk / f[0].trunk], [5 / 9, 3 / 9], rtol=1e-12)
    # Read from the feature cache, the frozen blocks cost nothing in the step.
    np.testing.assert_allclose(update_flops(frozen, 8, 64, cached_features=True).trunk / f[0].trunk, 3 / 9,
                               rtol=1e-12)
    assert update_flops(heads_only, 8, 64, cached_features=True).trunk == 0
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    states = [abstract_train_state(c) for c in (whole, frozen, heads_only)]
    assert size(states[0].params) == size(states[1].params) == size(states[2].params)
    moments = [size(s.opt_state[1][0].mu) for s in states]
    assert moments[0] == size(states[0].params) and moments[0] > moments[1] > moments[2]
    assert moments[2] == size({k: states[2].params[k] for k in ("q_heads", "v_head")})


def test_frozen_layers_out_of_range_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="train.frozen_layers"):
        small_cfg(train__frozen_layers=4)
    with pytest.raises(ConfigError, match="train.frozen_layers"):
        small_cfg(train__frozen_layers=-2)
