"""Reading run directories: where a run's checkpoints are, which steps are complete, and their parameters.

The one place that resolves a run directory. A run writes into ``train.out_dir``; its checkpoints are
``<train.out_dir>/checkpoints/<step>/`` (written by ``jaxrl_lm.train.checkpoint``) with three items:

    state/    the TrainState after ``step`` optimizer steps: ``params`` (the trained model), ``groups`` (the
              objective's EMA and frozen parameter groups by name), float32 optax state, step, skipped, rng key
    data/     the data loader's position (JSON)
    config/   the resolved config (JSON)

Beside them the run keeps ``tokenizer/``, a copy of its tokenizer written when training starts (``RUN_TOKENIZER``), so
that a run directory moved or shared without the repository's ``configs/`` still loads and acts.

A checkpoint written before parameter groups existed holds ``target_params`` instead of ``groups``: it reads
as ``groups["target"]``. This module sits below ``train/`` so that policies, evaluation and export load
parameters without importing the training code::

    cfg, params, step = load_params("runs/demo")             # newest complete step, online parameters
    cfg, params, step = load_params("runs/demo/checkpoints", step=100)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp

from jaxrl_lm.config import Config, from_dict
from jaxrl_lm.models import Params
from jaxrl_lm.models.partition import Partition

CHECKPOINT_SUBDIR = "checkpoints"
REFUSED_SUBDIR = "checkpoints_refused"  # <train.out_dir>/checkpoints_refused/<step>: unreadable steps moved aside
RUN_TOKENIZER = "tokenizer"  # <train.out_dir>/tokenizer: the run's own copy, so a moved run directory still loads
ITEMS = ("state", "data", "config", "replay")  # replay: an online run's buffer contents (absent offline)
LEGACY_TARGET = "target_params"  # the field that held the EMA target before parameter groups


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory or step and the cause."""


def cause(error: BaseException, limit: int = 600) -> str:
    """``Type: message`` of ``error`` on one line, at most about ``limit`` characters: the start and the end of a
    longer one (TensorStore's messages can hold a whole store spec; the start says what failed, the end of a
    write error the OS error, e.g. ``No space left on device [os_error_code='28']``)."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = f"{text[:limit * 3 // 5]} ... {text[-(limit * 2 // 5):]}"
    return f"{type(error).__name__}: {text}"


def checkpoint_dir(cfg: Config) -> Path:
    """``<train.out_dir>/checkpoints``, absolute (Orbax requires absolute paths)."""
    return (Path(cfg.train.out_dir) / CHECKPOINT_SUBDIR).absolute()


def resolve(path: str | Path) -> Path:
    """A run's ``train.out_dir`` or its ``checkpoints`` directory -> the absolute directory holding the steps."""
    path = Path(path).absolute()
    return path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).is_dir() else path


def run_dir(path: str | Path) -> Path:
    """The run directory (``train.out_dir``) of a run's path or of its ``checkpoints`` directory."""
    directory = resolve(path)
    return directory.parent if directory.name == CHECKPOINT_SUBDIR else directory


def run_seeds(path: str | Path) -> Optional[list[int]]:
    """The seeds a run trained side by side (one model each, stacked), from its ``final_metrics.json``; None for
    a one-model run, or a run that has not finished."""
    final = run_dir(path) / "final_metrics.json"
    return json.loads(final.read_text()).get("seeds") if final.is_file() else None


class _NoReadOnlyNotice(logging.Filter):
    """Drops Orbax's "Given directory is read only" warning, which every read-only manager logs: reading a run
    (evaluation, export, a policy) is not something to warn about."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_NoReadOnlyNotice())


def reader(directory: str | Path) -> ocp.CheckpointManager:
    """A read-only manager of a checkpoint directory (use as a context manager)."""
    path = Path(directory).absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(), "replay": ocp.StandardCheckpointHandler()}
    # Options a read-only manager would otherwise overwrite, with a warning each time a run is read.
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, max_to_keep=None, create=False)
    return ocp.CheckpointManager(path, item_names=ITEMS, item_handlers=handlers, options=options)


def complete_steps(directory: str | Path) -> list[int]:
    """Steps with a finished checkpoint under ``directory``, ascending (tmp directories are not steps)."""
    if not Path(directory).is_dir():
        return []
    with reader(directory) as r:
        return sorted(r.all_steps())


def latest_step(directory: str | Path) -> int | None:
    """The newest complete step under ``directory``; None when there is none (or no directory)."""
    steps = complete_steps(directory)
    return steps[-1] if steps else None


def existing_step(r: ocp.CheckpointManager, step: int | None) -> int:
    """``step`` if it is complete in ``r``'s directory, or the newest complete step when None."""
    steps = sorted(r.all_steps())
    if step is None and steps:
        return steps[-1]
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {r.directory}")
    if step not in steps:
        raise FileNotFoundError(f"no complete checkpoint of step {step} in {r.directory}; complete: {steps}")
    return step


def config_of(r: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return r.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def read_config(directory: str | Path, step: int | None = None) -> dict[str, Any]:
    """The resolved config dict saved with step ``step`` (default: the newest complete one)."""
    with reader(directory) as r:
        return config_of(r, existing_step(r, step))


def saved_state_keys(r: ocp.CheckpointManager, step: int) -> tuple[str, ...]:
    """The top-level fields of the saved TrainState (``groups`` now; ``target_params`` in older checkpoints)."""
    return tuple(r.item_metadata(step)["state"].tree.keys())


def load_state_params(path: str | Path, step: Optional[int] = None
                      ) -> tuple[Config, Params, dict[str, Params], int]:
    """``(config, params, groups, step)`` of a checkpoint: the trained parameters and every parameter group by
    name (an older checkpoint's ``target_params`` as ``"target"``), on the default device (``load_params``'s
    arguments)."""
    directory = resolve(path)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with reader(directory) as r:
        step = existing_step(r, step)
        cfg = from_dict(config_of(r, step))
        tree = r.item_metadata(step)["state"].tree
        # The whole saved state is read (optimizer moments too): its structure comes from the file itself, so
        # any objective's groups load without building its TrainState.
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        state = r.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    groups: Mapping[str, Params] = state.get("groups") or {}
    if LEGACY_TARGET in state:
        groups = {"target": state[LEGACY_TARGET]}
    # Under train.frozen_layers a group holds its keys' trained part; complete them with the frozen trunk bottom
    # (the trained parameters'), so that every caller may swap a group's keys in whole.
    part = Partition.of(cfg)
    whole = {name: {k: part.with_group(state["params"], group)[k] for k in group} for name, group in groups.items()}
    return cfg, state["params"], whole, step


def load_params(path: str | Path, step: Optional[int] = None, *, group: str = "online"
                ) -> tuple[Config, Params, int]:
    """``(config, params, step)`` of a checkpoint, the parameters on the default device.

    Args:
      path: a run directory (``train.out_dir``) or its ``checkpoints`` directory.
      step: a complete step; None = the newest.
      group: ``"online"`` (the trained parameters) or a parameter group's name, e.g. ``"target"``: the model
        with that group's keys swapped in (the EMA target's Q-heads on the online trunk, for ``target_scope:
        heads``).
    """
    cfg, params, groups, step = load_state_params(path, step)
    if group == "online":
        return cfg, params, step
    if group not in groups:
        raise KeyError(f"{resolve(path) / str(step)}: no parameter group {group!r}; it holds {sorted(groups)}")
    return cfg, {**params, **groups[group]}, step
