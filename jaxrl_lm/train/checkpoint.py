"""Writing checkpoints and restoring a whole TrainState, so that a run continues exactly.

The layout (``<train.out_dir>/checkpoints/<step>/`` with ``state``, ``data`` and ``config`` items) and reading a
run's parameters are ``jaxrl_lm.checkpoints``, below this package; here is what only training needs: the
asynchronous manager, ``save``, ``restore`` of a TrainState onto any shardings (any mesh), the resume checks and
the preemption notice.

Saves are asynchronous: ``save`` returns once the arrays are copied off the devices, and files are written in a
background thread. Orbax writes into ``<s>.orbax-checkpoint-tmp`` and renames it to ``<s>`` only when every
item is written, so a crash mid-write leaves a tmp directory that is never listed as a step (the next run's
manager deletes it before its first save). A write that fails (a full disk, a read-only directory) surfaces at the
next ``save`` or at ``close`` as a ``CheckpointError`` naming the directory, the OS error and the newest complete
step, which the failure leaves intact. A step that cannot be read back raises a ``CheckpointError`` naming the
step's directory and the cause; ``refuse`` moves such a step aside so that ``--resume`` continues from the one
before it (``jaxrl_lm.train.loop``). Bytes changed inside an array file are not detected (docs/reliability.md).

    manager = make_manager(checkpoint_dir(cfg), cfg.train)
    save(manager, step, state, loader_state=loader.get_state(), cfg=cfg, metrics={"loss": 0.3})
    ...
    restored = restore(checkpoint_dir(cfg), abstract_state(cfg, sharding))  # newest complete step
    state, loader_state = restored.state, restored.loader_state
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from jaxrl_lm.checkpoints import (
    CHECKPOINT_SUBDIR,
    ITEMS,
    LEGACY_TARGET,
    REFUSED_SUBDIR,
    CheckpointError,
    cause,
    checkpoint_dir,
    complete_steps,
    config_of,
    existing_step,
    latest_step,
    read_config,
    reader,
    saved_state_keys,
)
from jaxrl_lm.config import Config, ConfigError, TrainConfig, from_dict
from jaxrl_lm.train.state import TrainState, abstract_train_state

__all__ = [
    "CHECKPOINT_SUBDIR", "ITEMS", "REFUSED_SUBDIR", "RESUME_KEYS", "CheckpointError", "PreemptionNotice",
    "Restored", "abstract_state", "check_resume_config", "checkpoint_dir", "close", "complete_steps",
    "latest_step", "make_manager", "read_config", "refuse", "restore", "save",
]

# Config keys a checkpoint's arrays and meaning depend on: a resume must not change them. A key ending in "."
# covers its whole section; the chosen objective's own section is watched too. Everything else (train.steps,
# optim.learning_rate, logging) may change on resume.
RESUME_KEYS = ("model.", "rl.", "data.seq_len", "data.batch_size")


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint: ``state`` on the requested shardings, the loader position and the saved config."""

    step: int
    state: TrainState
    loader_state: dict[str, Any]
    config: dict[str, Any]
    loader_arrays: Optional[dict[str, np.ndarray]] = None  # an online run's replay buffer; None offline


def _preservation(t: TrainConfig) -> preservation.PreservationPolicy:
    latest = preservation.LatestN(n=t.keep_checkpoints)
    if not t.keep_best_metric:
        return latest
    # BestN sorts ascending (descending with reverse) and keeps the tail: reverse=True keeps the lowest value.
    best = preservation.BestN(get_metric_fn=_metric_fn(t.keep_best_metric), reverse=t.keep_best_mode == "min",
                              n=1, keep_checkpoints_without_metrics=False)
    return preservation.AnyPreservationPolicy([latest, best])


def _metric_fn(name: str):
    return lambda metrics: metrics[name]


def make_manager(directory: str | Path, t: TrainConfig) -> ocp.CheckpointManager:
    """An asynchronous manager that keeps the newest ``t.keep_checkpoints`` steps (plus the best by
    ``t.keep_best_metric``).

    Opening it starts deleting tmp directories that a crashed save left behind (its first save waits for that).
    ``manager.close()`` waits for a pending save.
    """
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_preservation(t),
        # best_fn is what makes Orbax store each step's metrics (which the preservation policy ranks).
        best_fn=_metric_fn(t.keep_best_metric) if t.keep_best_metric else None,
        best_mode=t.keep_best_mode,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=True,
        # A step's directories are made before save() returns (a few mkdirs), so that a directory that cannot be
        # written fails that save at once. Made in the background, such a failure left Orbax's signalling threads
        # waiting for the directories until their timeout: the process hung for minutes after the error.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        create=True,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), item_names=ITEMS, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, *, loader_state: Mapping[str, Any],
         cfg: Config, metrics: Mapping[str, float] | None = None,
         loader_arrays: Optional[Mapping[str, np.ndarray]] = None) -> None:
    """Starts an asynchronous save of ``state`` as step ``step``; returns once the arrays are off the devices.

    ``loader_arrays`` (host arrays: an online run's replay buffer, ``BatchSource.get_arrays``) are saved as the
    ``replay`` item beside the loader state; with several processes, each process's buffer is its own row of
    ``[processes, ...]`` arrays (``_replay_item``), written by that process.

    ``step`` is the host's count (``state.step`` may live on devices of other hosts). ``metrics`` (host
    floats) rank checkpoints when ``train.keep_best_metric`` is set, which must name one of them. The state may
    be donated to the next update right after this returns.
    """
    name = cfg.train.keep_best_metric
    if name and (metrics is None or name not in metrics):
        raise ConfigError(f"train.keep_best_metric: {name!r} is not a metric of this step; "
                          f"known: {sorted(metrics or {})}")
    items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(_every_process(loader_state)),
                 config=ocp.args.JsonSave(cfg.to_dict()))
    if loader_arrays is not None:
        items["replay"] = ocp.args.StandardSave(_replay_item(loader_arrays))
    try:
        manager.save(
            step,
            args=ocp.args.Composite(**items),
            metrics=dict(metrics) if metrics is not None else None,
            force=True,  # the loop decides when to save; Orbax's own interval policy is not used
        )
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise ValueError/OSError/...: all are write faults
        raise _write_error(manager, f"while saving step {step}", e) from e


# The data item of a multi-process run: every process's loader state, in process order.
PER_PROCESS = "per_process"


def _every_process(loader_state: Mapping[str, Any]) -> dict[str, Any]:
    """The loader state to save. With several processes each one reads its own share of the data, so each has its
    own position, but Orbax writes a JSON item from process 0 alone: every process's state is gathered (two small
    collectives; every process saves at the same steps) and saved as ``{PER_PROCESS: [state_0, state_1, ...]}``."""
    if jax.process_count() == 1:
        return dict(loader_state)
    raw = np.frombuffer(json.dumps(dict(loader_state)).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded))  # [processes, longest] uint8
    return {PER_PROCESS: [json.loads(row[:n].tobytes()) for row, n in zip(rows, lengths)]}


def _this_process(saved: Any) -> Any:
    """This process's loader state from a saved data item (``_every_process``). A single process reading a
    multi-process checkpoint gets process 0's; a different process count is refused by the loader's own check
    (the state names its process index and count)."""
    if not isinstance(saved, Mapping) or PER_PROCESS not in saved:
        return saved  # one process's state, as single-process runs save it
    states = saved[PER_PROCESS]
    return dict(states[jax.process_index()] if jax.process_index() < len(states) else states[0])


def _per_process_sharding() -> jax.sharding.NamedSharding:
    """Row ``p`` of a ``[processes, ...]`` array on (every device of) process ``p``."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(jax.process_count(), -1), ("process", "local"))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("process"))


def _replay_item(loader_arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """What the ``replay`` item saves. One process: its host arrays. Several: every process's buffer is its own
    (it plays its own episodes), so each field becomes a global ``[processes, *shape]`` array whose row ``p`` is
    process ``p``'s, held by that process's devices: Orbax writes every row from the process that has it. (A
    host array would be written by process 0 alone.)"""
    arrays = {k: np.asarray(v) for k, v in loader_arrays.items()}
    if jax.process_count() == 1:
        return arrays
    sharding = _per_process_sharding()
    return {k: jax.make_array_from_process_local_data(sharding, v[None], (jax.process_count(), *v.shape))
            for k, v in arrays.items()}


def _replay_restore_args(r: ocp.CheckpointManager, step: int) -> ocp.args.StandardRestore:
    """How to read a ``replay`` item: in one process, whole arrays (the ``[processes, ...]`` rows of a
    multi-process run onto this process's first device: they name the saving devices); in several, each process's
    own row (the item must come from as many processes: a buffer cannot be split or merged)."""
    meta = r.item_metadata(step)["replay"].tree
    saved_by = meta["lengths"].shape[0] if len(meta["lengths"].shape) == 2 else 1
    if jax.process_count() == 1:
        if saved_by == 1:
            return ocp.args.StandardRestore()
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return ocp.args.StandardRestore({k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local)
                                         for k, m in meta.items()})
    if saved_by != jax.process_count():
        raise ConfigError(f"{Path(r.directory) / str(step)}: the replay buffers were saved by {saved_by} "
                          f"process(es); an online run resumes with the same number of processes "
                          f"({jax.process_count()} now)")
    sharding = _per_process_sharding()
    return ocp.args.StandardRestore({k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)
                                     for k, m in meta.items()})


def _this_process_replay(replay: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """This process's buffer from a restored ``replay`` item: the arrays themselves, this process's row when
    several processes saved it, or row 0 for one process reading such a checkpoint (as ``_this_process``)."""
    if replay["lengths"].ndim == 1:
        return {k: np.asarray(v) for k, v in replay.items()}
    if jax.process_count() > 1:
        return {k: np.asarray(v.addressable_shards[0].data)[0] for k, v in replay.items()}
    return {k: np.asarray(v)[0] for k, v in replay.items()}


def close(manager: ocp.CheckpointManager) -> None:
    """``manager.close()``: waits for the pending asynchronous save; a failed write raises ``CheckpointError``."""
    try:
        manager.close()
    except Exception as e:  # noqa: BLE001
        raise _write_error(manager, "while finishing the last save", e) from e


def _write_error(manager: ocp.CheckpointManager, when: str, error: BaseException) -> CheckpointError:
    """The error of a failed write: an asynchronous write reports at the next save (or at close), so the step in
    the cause (its ``<step>.orbax-checkpoint-tmp`` path) may be the one before ``when``."""
    directory = Path(manager.directory)
    try:
        newest = latest_step(directory)
        kept = f"step {newest} ({directory / str(newest)}) is intact" if newest is not None else "there is none"
    except Exception as e:  # noqa: BLE001 - the directory itself may be unreadable
        kept = f"unknown (listing the directory failed: {cause(e, 200)})"
    return CheckpointError(f"writing a checkpoint in {directory} failed ({when}): {cause(error)}. The newest "
                           f"complete checkpoint: {kept}. Fix the cause (free disk space, make the directory "
                           f"writable) and continue with --resume")


def abstract_state(cfg: Config, sharding: jax.sharding.Sharding | Any) -> TrainState:
    """The TrainState of ``cfg`` as ``jax.ShapeDtypeStruct`` leaves (no memory is allocated) on ``sharding``.

    ``sharding`` is one ``jax.sharding.Sharding`` for every leaf (e.g. ``SingleDeviceSharding`` or a replicated
    ``NamedSharding(mesh, P())``) or a TrainState-shaped pytree of shardings (one per leaf).
    """
    shapes = abstract_train_state(cfg)
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding)


def restore(directory: str | Path, target: TrainState | jax.sharding.Sharding, step: int | None = None) -> Restored:
    """Restores step ``step`` (default: the newest complete one) from a checkpoint directory.

    Args:
      directory: ``<train.out_dir>/checkpoints`` of a run.
      target: where the arrays go. Either an abstract TrainState whose leaves are ``jax.ShapeDtypeStruct`` with
        a ``.sharding`` (``abstract_state(cfg, shardings)``; any mesh or device count, not necessarily the one
        that saved) or one ``jax.sharding.Sharding`` for every leaf, the structure then coming from the
        checkpoint's own config.
      step: a complete step; None = the newest.
    Returns:
      ``Restored``: state (float32 params, groups and optimizer moments, int32 step/skipped, uint32 rng key
      data), the loader state and the saved config dict.

    A checkpoint from before parameter groups (``target_params``) restores with its target as
    ``groups["target"]``. A step that cannot be read (a file cut short, missing or not valid JSON) raises
    ``CheckpointError`` naming its directory and the cause.
    """
    with reader(directory) as r:
        step = existing_step(r, step)
    try:
        return _restore(directory, target, step)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - TensorStore, JSON and Orbax each raise their own types
        raise CheckpointError(f"{Path(directory).absolute() / str(step)}: cannot read checkpoint step {step}: "
                              f"{cause(e)}") from e


def _restore(directory: str | Path, target: TrainState | jax.sharding.Sharding, step: int) -> Restored:
    with reader(directory) as r:
        saved_config = config_of(r, step)
        if isinstance(target, jax.sharding.Sharding):
            target = abstract_state(from_dict(saved_config), target)
        legacy = LEGACY_TARGET in saved_state_keys(r, step)
        if legacy:
            if set(target.groups) != {"target"}:
                raise ConfigError(f"{Path(directory) / str(step)} was written before parameter groups and holds "
                                  f"one EMA target; the objective of this config declares the groups "
                                  f"{sorted(target.groups)}: resume it with the objective that wrote it")
            fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(target) if f.name != "groups"}
            item = {**fields, LEGACY_TARGET: target.groups["target"]}
        else:
            item = target
        has_replay = _has_item(r, step, "replay")
        args = dict(state=ocp.args.StandardRestore(item), data=ocp.args.JsonRestore())
        if has_replay:
            args["replay"] = _replay_restore_args(r, step)
        items = r.restore(step, args=ocp.args.Composite(**args))
    arrays = _this_process_replay(items.replay) if has_replay else None
    state = items.state
    if legacy:
        state = TrainState(params=state["params"], groups={"target": state[LEGACY_TARGET]},
                           opt_state=state["opt_state"], step=state["step"], skipped=state["skipped"],
                           rng=state["rng"])
    return Restored(step=step, state=state, loader_state=_this_process(items.data), config=saved_config,
                    loader_arrays=arrays)


def refuse(directory: str | Path, step: int) -> Path:
    """Moves the unreadable step ``step`` out of ``directory`` into ``<train.out_dir>/checkpoints_refused/``
    (kept for inspection, no longer listed or rotated); returns where it went. One process only."""
    source = Path(directory).absolute() / str(step)
    parent = Path(directory).absolute().parent / REFUSED_SUBDIR
    parent.mkdir(exist_ok=True)
    target, n = parent / str(step), 1
    while target.exists():
        target, n = parent / f"{step}.{n}", n + 1
    source.rename(target)
    return target


def _has_item(r: ocp.CheckpointManager, step: int, name: str) -> bool:
    """Whether step ``step`` holds item ``name`` (a checkpoint lists its items as subdirectories)."""
    return (Path(r.directory) / str(step) / name).is_dir()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: Mapping[str, Any], cfg: Config, where: str | Path) -> None:
    """Refuses to resume when a key in ``RESUME_KEYS`` differs between the checkpoint and ``cfg``.

    The error lists every such key with both values; ``train.steps`` and other keys may change.
    """
    old, new = _flatten(from_dict(saved).to_dict()), _flatten(cfg.to_dict())  # older layouts read as today's
    prefixes = (*RESUME_KEYS, f"{cfg.rl.objective}.")
    watched = sorted(k for k in old.keys() | new.keys()
                     if any(k.startswith(p) if p.endswith(".") else k == p for p in prefixes))
    diffs = [f"{k}: checkpoint {old.get(k, '<absent>')!r}, config {new.get(k, '<absent>')!r}"
             for k in watched if old.get(k) != new.get(k)]
    if diffs:
        listed = "\n  ".join(diffs)
        raise ConfigError(f"cannot resume from {where}: the config differs on keys that change the state's shapes "
                          f"or meaning:\n  {listed}\nuse the checkpoint's values (its config is saved beside it) "
                          f"or start a new run in another train.out_dir")


class PreemptionNotice:
    """Turns a preemption notice (SIGTERM) into a save at the next step boundary.

    Single process: a SIGTERM handler sets a flag (installed only in the main thread; ``uninstall`` puts the
    previous handler back). Several processes: JAX's preemption sync manager (started by
    ``jax.distributed.initialize``) catches the signal and makes every process agree on the same step, so all of
    them take part in the same save.

        notice = PreemptionNotice().install()
        for step in ...:
            if notice.reached(step): save; break
        notice.uninstall()
    """

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None
        self._installed = False

    def install(self) -> "PreemptionNotice":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def reached(self, step: int) -> bool:
        """True once a notice arrived (every process must call this at every step when there are several)."""
        if jax.process_count() > 1:
            self.received = self.received or ocp.multihost.reached_preemption(step)
        return self.received
