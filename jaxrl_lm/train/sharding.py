"""Where every array of the TrainState lives on the mesh: logical axis names -> mesh axes, by the rule table.

Every parameter carries logical axis names (``jaxrl_lm/models/layers.py``); ``cfg.mesh.rules`` maps them to
mesh axes. For each dimension, in order, the rules naming its logical axis are tried in order and the first
whose mesh axes are (a) not yet used by an earlier dimension of the same parameter, (b) larger than 1 together
and (c) a divisor of the dimension shards it; a ``null`` rule, or no usable rule, replicates the dimension.
So a dimension that a mesh axis does not divide is replicated (and reported), never an XLA error. Groups and
optimizer moments follow their parameters (``optax.tree_map_params`` finds the parameter-shaped trees in the
optimizer state); counters, schedules and the RNG key are replicated.

``setup_parallelism`` does it all at start-up and refuses a run (``fsdp > 1``) whose rules leave more than
``mesh.max_replicated_fraction`` of the parameter bytes replicated, or whose padded vocabulary the mesh axis
of its ``vocab`` rule does not divide (``check_vocab_padding``)::

    distributed.initialize(cfg)                          # first: before anything touches a device
    par = setup_parallelism(cfg)
    state = init_sharded_state(cfg, par)                  # or shard_state(cfg, par.mesh, host_state)
    update = make_update(cfg, graphdef, state_sharding=par.state_sharding, batch_sharding=par.batch_sharding)
    state, metrics = update(state, place_batch(next(loader), par.mesh))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl_lm import models
from jaxrl_lm.config import Config, ConfigError, ModelConfig, ShardingRule
from jaxrl_lm.train.mesh import batch_sharding, check_batch_size, make_mesh
from jaxrl_lm.models import Params
from jaxrl_lm.models.partition import Partition
from jaxrl_lm.train.state import TrainState, abstract_train_state, init_state, make_optimizer

WEIGHT_AXES = ("fsdp", "tensor")  # the axes parameters are meant to be split over; data keeps whole copies
_LISTED = 5  # replicated parameters named in the start-up error


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


# ----------------------------------------------------------------------------------------------------------------
# Logical names -> one parameter's PartitionSpec.


@dataclasses.dataclass(frozen=True)
class Placement:
    """One parameter on the mesh.

    path: dotted name (``transformer.h.mlp.c_fc.kernel``). shape / logical: its dims and their logical names.
    spec: the mesh PartitionSpec. nbytes: the whole parameter's bytes. shards: devices one copy is split over.
    notes: why each named dimension left replicated is (``"vocab: 260 not divisible by tensor=8"``).
    """

    path: str
    shape: tuple[int, ...]
    logical: tuple[Optional[str], ...]
    spec: PartitionSpec
    nbytes: int
    shards: int
    notes: tuple[str, ...]

    def replicated_bytes(self, weight_devices: int) -> float:
        """Bytes not split over the ``weight_devices = fsdp x tensor`` devices (0 when fully sharded)."""
        return self.nbytes * (1.0 - min(self.shards, weight_devices) / weight_devices)


def _mesh_axes(axes: Optional[str | tuple[str, ...]]) -> Optional[tuple[str, ...]]:
    return (axes,) if isinstance(axes, str) else axes or None


def _choose(dim: int, name: str, rules: Sequence[ShardingRule], sizes: dict[str, int],
            used: set[str]) -> tuple[Optional[tuple[str, ...]], str]:
    """The mesh axes that shard one dimension (None = replicated) and, when replicated, why."""
    reasons = []
    for logical, axes in rules:
        if logical != name:
            continue
        axes = _mesh_axes(axes)
        if axes is None:
            return None, f"{name}: null"
        size = math.prod(sizes[a] for a in axes)
        label = "x".join(axes)
        if used.intersection(axes):
            reasons.append(f"{label} already used")
        elif size == 1:
            reasons.append(f"{label} has size 1")
        elif dim % size:
            reasons.append(f"{dim} not divisible by {label}={size}")
        else:
            used.update(axes)
            return axes, ""
    return None, f"{name}: " + ("; ".join(reasons) if reasons else "no rule")


def resolve_spec(shape: Sequence[int], logical: Sequence[Optional[str]], rules: Sequence[ShardingRule],
                 mesh: Mesh) -> tuple[PartitionSpec, int, tuple[str, ...]]:
    """``(spec, shards, notes)`` of one parameter: its PartitionSpec, the devices a copy is split over, and
    the reason for each named dimension that stays replicated."""
    sizes = dict(mesh.shape)
    used: set[str] = set()
    entries, notes, shards = [], [], 1
    for dim, name in zip(shape, logical):
        axes, why = _choose(dim, name, rules, sizes, used) if name is not None else (None, "")
        entries.append(axes[0] if axes and len(axes) == 1 else axes)
        shards *= math.prod(sizes[a] for a in axes or ())
        if why:
            notes.append(why)
    return PartitionSpec(*entries), shards, tuple(notes)


def _abstract_model(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: models.build(model_cfg)), nnx.Param)


def param_logical_axes(model_cfg: ModelConfig) -> tuple[Params, Params]:
    """``(shapes, names)``: the parameters as ``ShapeDtypeStruct`` and their logical names as ``PartitionSpec``
    leaves, both nested dicts shaped like ``split_model``'s params. Nothing is allocated."""
    state = _abstract_model(model_cfg)[1]
    return nnx.to_pure_dict(state), nnx.to_pure_dict(nnx.get_partition_spec(state))


def _dotted(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def plan_params(cfg: Config, mesh: Mesh) -> tuple[Params, list[Placement]]:
    """``(specs, placements)``: every parameter's mesh ``PartitionSpec`` (a params-shaped dict) and its
    ``Placement``, in tree order."""
    shapes, names = param_logical_axes(cfg.model)
    flat_names = dict(jax.tree_util.tree_flatten_with_path(names, is_leaf=_is_spec)[0])
    placements = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        logical = tuple(flat_names[path])
        spec, shards, notes = resolve_spec(leaf.shape, logical, cfg.mesh.rules, mesh)
        placements.append(Placement(_dotted(path), tuple(leaf.shape), logical, spec,
                                    math.prod(leaf.shape) * leaf.dtype.itemsize, shards, notes))
    specs = jax.tree.unflatten(jax.tree.structure(shapes), [p.spec for p in placements])
    return specs, placements


# ----------------------------------------------------------------------------------------------------------------
# The replication check.


def weight_devices(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in WEIGHT_AXES)


def replicated_fraction(placements: Sequence[Placement], mesh: Mesh) -> float:
    """Fraction of parameter bytes not split over ``fsdp x tensor`` (0 = fully sharded, 1 = all replicated)."""
    total = sum(p.nbytes for p in placements)
    return sum(p.replicated_bytes(weight_devices(mesh)) for p in placements) / total


def _human(nbytes: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = min(int(math.log(max(nbytes, 1), 1024)), len(units) - 1)
    return f"{nbytes / 1024 ** power:.1f} {units[power]}"


def check_replication(placements: Sequence[Placement], mesh: Mesh, max_fraction: float) -> float:
    """The replicated fraction; with ``fsdp > 1`` a ConfigError above ``max_fraction`` that lists the biggest
    replicated parameters, why each dimension stayed whole, and what to change."""
    fraction = replicated_fraction(placements, mesh)
    if mesh.shape["fsdp"] == 1 or fraction <= max_fraction:
        return fraction
    w = weight_devices(mesh)
    worst = sorted(placements, key=lambda p: -p.replicated_bytes(w))[:_LISTED]
    lines = [f"  {p.path} {list(p.shape)} {p.logical} -> {p.spec}: {_human(p.replicated_bytes(w))} replicated"
             f" ({'; '.join(p.notes) or 'all dims unnamed'})" for p in worst]
    raise ConfigError(
        f"mesh: {fraction:.1%} of the parameter bytes are replicated over fsdp x tensor = "
        f"{mesh.shape['fsdp']} x {mesh.shape['tensor']}, above mesh.max_replicated_fraction = {max_fraction}. "
        f"Largest replicated parameters:\n" + "\n".join(lines) + "\n"
        "Fix: map their logical axes to fsdp or tensor in mesh.rules (e.g. [embed, fsdp]), make the dimensions "
        "divisible by the mesh axis (model.vocab_pad_multiple pads the vocabulary), or raise "
        "mesh.max_replicated_fraction."
    )


def check_vocab_padding(cfg: Config, mesh: Mesh) -> None:
    """A ConfigError naming ``model.vocab_pad_multiple`` when the ``vocab`` rules want the vocabulary split over
    mesh axes (larger than 1) and none of them divides the padded vocabulary: the embedding and the LM and
    Q-head output matrices, the largest of the model, would stay whole on every device.

    A check rather than padding derived from the mesh: parameter shapes must not depend on the mesh, or a
    checkpoint would not restore onto another one. ``mesh.max_replicated_fraction: 1.0`` allows it.
    """
    if cfg.mesh.max_replicated_fraction >= 1.0:
        return
    vocab = cfg.model.padded_vocab_size
    wanted = []  # (mesh axes, size) of each vocab rule before the first null one
    for logical, axes in cfg.mesh.rules:
        axes = _mesh_axes(axes) if logical == "vocab" else ()
        if axes is None:
            break
        size = math.prod(mesh.shape[a] for a in axes)
        if size > 1:
            wanted.append(("x".join(axes), size))
    if not wanted or any(vocab % size == 0 for _, size in wanted):
        return
    label, size = wanted[0]
    m = cfg.model
    raise ConfigError(
        f"vocab: {vocab} not divisible by {label}={size}, so the vocabulary would be replicated on every device. "
        f"model.vocab_pad_multiple = {m.vocab_pad_multiple} pads model.vocab_size = {m.vocab_size} to {vocab}; set "
        f"model.vocab_pad_multiple={math.lcm(m.vocab_pad_multiple, size)} (or a multiple of it, e.g. 128), or "
        f"mesh.max_replicated_fraction=1.0 to accept the replication."
    )


# ----------------------------------------------------------------------------------------------------------------
# TrainState shardings and placement.


def shardings_from_specs(cfg: Config, mesh: Mesh, specs: Params, abstract_state: TrainState) -> TrainState:
    """A TrainState of ``NamedSharding``: params and every parameter group by ``specs`` (a group's key is
    placed like the same key of the model), optimizer moments by their params, everything else replicated."""
    if jax.tree.structure(abstract_state.params) != jax.tree.structure(specs, is_leaf=_is_spec):
        raise ConfigError("the state's parameters do not match the model of cfg.model; build the state from the "
                          "same config")
    named = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
    replicated = NamedSharding(mesh, PartitionSpec())
    # The optimizer and the groups hold the trained part (a frozen trunk bottom's stacked blocks are sliced along
    # their replicated layer axis, so a slice keeps its parameter's sharding).
    trained = Partition.of(cfg).trained(named, take=lambda leaf, rows: leaf)
    opt = optax.tree_map_params(make_optimizer(cfg), lambda _, s: s, abstract_state.opt_state, trained,
                                transform_non_params=lambda _: replicated)
    groups = {name: {k: trained[k] for k in group} for name, group in abstract_state.groups.items()}
    return TrainState(params=named, groups=groups, opt_state=opt, step=replicated, skipped=replicated, rng=replicated)


def state_shardings(cfg: Config, mesh: Mesh, abstract_state: TrainState) -> TrainState:
    """A TrainState of ``NamedSharding`` for ``abstract_state`` (arrays or ``ShapeDtypeStruct``) on ``mesh``."""
    return shardings_from_specs(cfg, mesh, plan_params(cfg, mesh)[0], abstract_state)


def _place(x: Any, sharding: NamedSharding) -> jax.Array:
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_state(cfg: Config, mesh: Mesh, state: TrainState) -> TrainState:
    """``state`` (host-local arrays, the same on every process, e.g. a fresh ``init_state``) on ``mesh``."""
    return jax.tree.map(_place, state, state_shardings(cfg, mesh, state))


# ----------------------------------------------------------------------------------------------------------------
# Memory per device.


def _leaf_bytes(x: Any) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


def state_bytes_per_device(state: TrainState) -> dict[str, int]:
    """Bytes of each part of ``state`` held by one device, from its leaves' shardings.

    ``state``: a TrainState of ``jax.Array`` or of ``ShapeDtypeStruct`` with ``.sharding``. Returns
    ``{"params", "groups", "opt_state", "other" (step, skipped, rng), "total"}``.
    """
    parts = {"params": state.params, "groups": state.groups, "opt_state": state.opt_state,
             "other": (state.step, state.skipped, state.rng)}
    out = {k: sum(_leaf_bytes(x) for x in jax.tree.leaves(v)) for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def compiled_bytes_per_device(compiled: jax.stages.Compiled) -> dict[str, int]:
    """One device's buffers of a compiled step (``update.lower(state, batch).compile()``), from XLA's memory
    analysis: arguments (state + batch), outputs, temporaries, outputs aliased to donated arguments, the
    generated code (which an accelerator keeps in its own memory) and ``peak``, the high-water mark of XLA's
    simulation of the program's allocations (what has to fit; the sizes above are not simultaneous)."""
    mem = compiled.memory_analysis()
    return {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
            "temp": mem.temp_size_in_bytes, "alias": mem.alias_size_in_bytes,
            "code": mem.generated_code_size_in_bytes, "peak": mem.peak_memory_in_bytes}


# ----------------------------------------------------------------------------------------------------------------
# Start-up.


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """The mesh and every sharding a run needs.

    state_sharding: TrainState of ``NamedSharding`` (``make_update``'s ``state_sharding``).
    batch_sharding: the sharding of every ``[B, L]`` batch field (``make_update``'s ``batch_sharding``).
    abstract_state: the fresh TrainState as ``ShapeDtypeStruct`` leaves carrying those shardings (a checkpoint
      restore target: ``checkpoint.restore(directory, par.abstract_state)``).
    placements: every parameter's ``Placement``. replicated_fraction: parameter bytes not split over
      ``fsdp x tensor``.
    """

    mesh: Mesh
    state_sharding: TrainState
    batch_sharding: NamedSharding
    abstract_state: TrainState
    placements: tuple[Placement, ...]
    replicated_fraction: float

    def summary(self) -> str:
        """One line for the start-up log (process 0)."""
        shape = " ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        per_device = state_bytes_per_device(self.abstract_state)
        return (f"mesh {shape} ({self.mesh.size} devices, {jax.process_count()} processes); parameters "
                f"{_human(sum(p.nbytes for p in self.placements))}, {self.replicated_fraction:.1%} replicated; "
                f"state per device {_human(per_device['total'])} (params {_human(per_device['params'])}, "
                f"optimizer {_human(per_device['opt_state'])})")


def setup_parallelism(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Parallelism:
    """Mesh, shardings and the start-up checks (batch split, vocabulary padding, replication) for ``cfg`` over
    ``devices`` (default: every device of every process). Call ``jaxrl_lm.distributed.initialize(cfg)`` before
    it in multi-process runs."""
    mesh = make_mesh(cfg.mesh, devices)
    check_batch_size(cfg.data.batch_size, cfg.optim.grad_accum, mesh)
    check_vocab_padding(cfg, mesh)
    specs, placements = plan_params(cfg, mesh)
    fraction = check_replication(placements, mesh, cfg.mesh.max_replicated_fraction)
    shapes = abstract_train_state(cfg)
    sharding = shardings_from_specs(cfg, mesh, specs, shapes)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding)
    return Parallelism(mesh, sharding, batch_sharding(mesh), abstract, tuple(placements), fraction)


def init_sharded_state(cfg: Config, par: Parallelism) -> TrainState:
    """``init_state(cfg)`` initialised directly on its shardings (no device or host ever holds a whole copy);
    its graph is ``model_graphdef(cfg.model)``."""
    return jax.jit(lambda: init_state(cfg), out_shardings=par.state_sharding)()
