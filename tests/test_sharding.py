"""Sharding on 8 forced CPU devices: the update on any mesh equals the one-device update, the rule table, the
replication check, per-device memory, the mesh and batch placement."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrl_lm import models
from jaxrl_lm.config import ConfigError, MeshConfig, replace
from jaxrl_lm.rl import count_decisions
from jaxrl_lm.train import make_update, sharding
from jaxrl_lm.train.mesh import device_grid, make_mesh, mesh_shape, place_batch
from jaxrl_lm.models import model_graphdef, split_model
from jaxrl_lm.train.state import init_state
from multihost_worker import make_cfg, synthetic_batch, train_steps

STEPS = 2
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


def mesh_cfg(shape, **kw):
    data, fsdp, tensor = shape
    return make_cfg(mesh__data=data, mesh__fsdp=fsdp, mesh__tensor=tensor, **kw)


def run(shape, **kw):
    cfg = mesh_cfg(shape, **kw)
    par = sharding.setup_parallelism(cfg, jax.devices()[:int(np.prod(shape))])
    losses, state = train_steps(cfg, par, STEPS)
    return par, losses, state


@pytest.fixture(scope="module")
def one_device():
    """The one-device run of each target scope, computed once."""
    runs = {}

    def get(scope):
        if scope not in runs:
            runs[scope] = run((1, 1, 1), token_q__target_scope=scope)
        return runs[scope]

    return get


@pytest.mark.parametrize("scope", ["heads", "full"])
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_update_on_a_mesh_equals_one_device(shape, scope, one_device):
    _, want_losses, want = one_device(scope)
    par, losses, state = run(shape, token_q__target_scope=scope)
    assert par.replicated_fraction <= 0.02
    np.testing.assert_allclose(losses, want_losses, atol=1e-5)
    for (path, got), ref in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, err_msg=jax.tree_util.keystr(path))
    for got, sh in zip(jax.tree.leaves(state), jax.tree.leaves(par.state_sharding)):
        assert got.sharding.is_equivalent_to(sh, got.ndim)


def test_gradient_accumulation_on_a_mesh_equals_one_device():
    # make_update pins each [n, B / n, L] micro-batch to the batch devices (update.py: _micro_sharding).
    _, want_losses, want = run((1, 1, 1), optim__grad_accum=2)
    par, losses, state = run((2, 2, 1), optim__grad_accum=2)
    np.testing.assert_allclose(losses, want_losses, atol=1e-5)
    for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


def test_loss_denominator_counts_decisions_of_every_device():
    cfg = mesh_cfg((8, 1, 1))
    mesh = make_mesh(cfg.mesh)
    batch = synthetic_batch(cfg, 0)
    counted = jax.jit(lambda b: count_decisions(b, cfg.rl))(place_batch(batch, mesh))
    assert float(counted) == float(count_decisions(batch, cfg.rl)) == 40.0  # rows hold 3 or 7 decisions


def test_sharded_init_equals_host_init():
    cfg = mesh_cfg((2, 2, 2))
    par = sharding.setup_parallelism(cfg)
    state = sharding.init_sharded_state(cfg, par)
    graphdef = model_graphdef(cfg.model)
    host_graphdef, params = split_model(models.build(cfg.model, seed=cfg.train.seed))
    host = init_state(cfg, params)
    placed = sharding.shard_state(cfg, par.mesh, host)
    assert graphdef == host_graphdef
    for a, b, c, sh in zip(*(jax.tree.leaves(t) for t in (state, placed, host, par.state_sharding))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
        assert a.sharding == b.sharding == sh


def test_rules_shard_parameters_targets_and_moments():
    cfg = mesh_cfg((1, 2, 4), token_q__target_scope="full")
    s = sharding.setup_parallelism(cfg).state_sharding
    specs = {
        ("transformer", "wte", "embedding"): P("tensor", "fsdp"),
        ("transformer", "h", "mlp", "c_fc", "kernel"): P(None, "fsdp", "tensor"),
        ("transformer", "h", "attn", "c_proj", "kernel"): P(None, "tensor", "fsdp"),
        ("q_heads", "out_kernel"): P(None, "tensor", "fsdp"),  # vocab took tensor, so mlp falls back to fsdp
        ("v_head", "out_bias"): P(),
    }
    adam = s.opt_state[1][0]
    for path, spec in specs.items():
        for tree in (s.params, s.groups["target"], adam.mu, adam.nu):
            if path[0] not in tree:  # the target group: the trunk and Q-heads only
                continue
            leaf = tree
            for key in path:
                leaf = leaf[key]
            assert leaf.spec == spec, path
    assert s.step.spec == s.rng.spec == adam.count.spec == P()


@pytest.mark.parametrize("dim,logical,rules,spec,note", [
    (250, ("vocab", "embed"), [("vocab", "tensor"), ("embed", "fsdp")], P(None, "fsdp"),
     "vocab: 250 not divisible by tensor=4"),
    (256, ("vocab", "embed"), [("vocab", "tensor"), ("embed", "fsdp")], P("tensor", "fsdp"), None),
    (256, ("vocab", "embed"), [("vocab", "data"), ("vocab", "tensor"), ("embed", "fsdp")], P("tensor", "fsdp"),
     None),  # data has size 1: the next rule is used
    (256, ("vocab", "embed"), [("vocab", ("fsdp", "tensor")), ("embed", "fsdp")], P(("fsdp", "tensor"), None),
     "embed: fsdp already used"),
    (256, ("vocab", "embed"), [("vocab", None), ("vocab", "tensor"), ("embed", "fsdp")], P(None, "fsdp"),
     "vocab: null"),
    (256, ("vocab", None), [], P(None, None), "vocab: no rule"),
])
def test_resolve_spec(dim, logical, rules, spec, note):
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    got, shards, notes = sharding.resolve_spec((dim, 64), logical, rules, mesh)
    assert got == spec
    assert shards == np.prod([mesh.shape[a] for e in spec if e for a in ((e,) if isinstance(e, str) else e)])
    assert notes == ((note,) if note else ())


def test_dims_a_mesh_axis_does_not_divide_are_replicated_and_counted():
    overrides = dict(model__vocab_size=250, mesh__max_replicated_fraction=1.0)
    par, losses, _ = run((1, 2, 4), **overrides)
    par_cfg = mesh_cfg((1, 2, 4), **overrides)
    wte = next(p for p in par.placements if p.path == "transformer.wte.embedding")
    assert wte.spec == P(None, "fsdp") and wte.notes == ("vocab: 250 not divisible by tensor=4",)
    assert par.replicated_fraction > 0.1
    assert np.all(np.isfinite(losses))
    with pytest.raises(ConfigError, match="vocab: 250 not divisible by tensor=4"):
        sharding.setup_parallelism(replace(par_cfg, mesh__max_replicated_fraction=0.02))


def test_a_vocabulary_the_tensor_axis_does_not_divide_names_the_padding_key():
    cfg = mesh_cfg((2, 1, 4), model__vocab_size=250)  # no fsdp: the replication check alone would let it pass
    with pytest.raises(ConfigError, match=r"vocab: 250 not divisible by tensor=4, .* set "
                                          r"model.vocab_pad_multiple=4 \(or a multiple of it, e.g. 128\)"):
        sharding.setup_parallelism(cfg)
    wte = next(p for p in sharding.setup_parallelism(replace(cfg, model__vocab_pad_multiple=4)).placements
               if p.path == "transformer.wte.embedding")
    assert wte.shape == (252, 64) and wte.spec == P("tensor", None)


def test_replication_check_names_the_biggest_replicated_params():
    rules = [["vocab", "tensor"], ["heads", "tensor"], ["mlp", "tensor"], ["layers", None]]
    with pytest.raises(ConfigError) as err:
        sharding.setup_parallelism(mesh_cfg((1, 8, 1), mesh__rules=rules))
    message = str(err.value)
    print(message)
    assert "of the parameter bytes are replicated over fsdp x tensor = 8 x 1" in message
    assert "mesh.max_replicated_fraction = 0.02" in message
    assert "q_heads.out_kernel [2, 256, 128]" in message and "mlp: tensor has size 1" in message
    assert "embed: no rule" in message and "Fix: map their logical axes" in message
    # Without fsdp there is nothing to check, and the threshold is the user's to raise.
    sharding.setup_parallelism(mesh_cfg((8, 1, 1), mesh__rules=rules))
    sharding.setup_parallelism(mesh_cfg((1, 8, 1), mesh__rules=rules, mesh__max_replicated_fraction=1.0))


def test_fsdp8_holds_an_eighth_of_the_state_per_device():
    figures = {}
    for name, shape in {"replicated": (8, 1, 1), "fsdp8": (1, 8, 1)}.items():
        cfg = mesh_cfg(shape)
        par = sharding.setup_parallelism(cfg)
        graphdef = split_model(models.build(cfg.model))[0]
        update = make_update(cfg, graphdef, state_sharding=par.state_sharding, batch_sharding=par.batch_sharding)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=par.batch_sharding)
                 for k, v in synthetic_batch(cfg, 0).items()}
        print(par.summary())
        assert par.summary().startswith(f"mesh data={shape[0]} fsdp={shape[1]} tensor=1 (8 devices, 1 processes)")
        figures[name] = {**sharding.state_bytes_per_device(par.abstract_state),
                         **sharding.compiled_bytes_per_device(update.lower(par.abstract_state, batch).compile())}
    print("per-device bytes:", figures)
    rep, fsdp = figures["replicated"], figures["fsdp8"]
    for key in ("params", "opt_state", "total", "argument"):
        assert fsdp[key] / rep[key] == pytest.approx(1 / 8, abs=0.005), key
    assert fsdp["alias"] == fsdp["total"]  # the donated state's buffers are reused for the new state


@pytest.mark.parametrize("mesh,n,shape", [
    (MeshConfig(), 8, (8, 1, 1)), (MeshConfig(fsdp=2, tensor=2), 8, (2, 2, 2)),
    (MeshConfig(data=1, fsdp=8), 8, (1, 8, 1)), (MeshConfig(fsdp=4, num_slices=2), 8, (2, 4, 1)),
])
def test_mesh_shape_fills_the_data_axis(mesh, n, shape):
    assert mesh_shape(mesh, n) == shape


@pytest.mark.parametrize("mesh,message", [
    (MeshConfig(fsdp=3), "mesh.fsdp x mesh.tensor = 3 x 1 = 3 does not divide the 8 devices"),
    (MeshConfig(data=2, fsdp=2), "= 4 but there are 8 devices; set mesh.data=-1"),
    (MeshConfig(fsdp=8, num_slices=2), "the data axis (1) must be divisible by mesh.num_slices (2)"),
])
def test_mesh_shape_errors_name_the_key(mesh, message):
    with pytest.raises(ConfigError) as err:
        mesh_shape(mesh, 8)
    assert message in str(err.value)


def test_hybrid_mesh_puts_data_across_slices():
    devices = [SimpleNamespace(id=i, process_index=i // 4, platform="cpu", device_kind="cpu") for i in range(8)]
    grid = device_grid(MeshConfig(data=4, fsdp=2, num_slices=2), devices)
    assert grid.shape == (4, 2, 1)
    assert [{d.process_index for d in row.ravel()} for row in grid] == [{0}, {0}, {1}, {1}]
    with pytest.raises(ConfigError, match="mesh.num_slices is 4 but the devices form 2 processes"):
        device_grid(MeshConfig(fsdp=2, num_slices=4), devices)


def test_batch_is_split_over_data_and_fsdp():
    cfg = mesh_cfg((2, 2, 2))
    mesh = make_mesh(cfg.mesh)
    batch = place_batch(synthetic_batch(cfg, 0), mesh)
    tokens = batch["tokens"]
    assert tokens.shape == (8, 16) and tokens.sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in tokens.addressable_shards} == {(2, 16)}
    with pytest.raises(ConfigError, match=r"data.batch_size / optim.grad_accum = 8 / 2 rows per micro-batch"):
        sharding.setup_parallelism(mesh_cfg((8, 1, 1), optim__grad_accum=2))
