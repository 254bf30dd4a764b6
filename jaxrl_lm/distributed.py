"""Multi-process start-up: ``jax.distributed.initialize`` from the config and the environment.

Call ``initialize(cfg)`` first, before anything touches a JAX device. Every process then sees every device
(``jax.devices()``) but holds only its own (``jax.local_devices()``); the mesh spans all of them, each process
loads its own share of the data (``make_loader(process_index=..., process_count=...)``) and only process 0
writes logs, metrics and files.

Where the coordinator comes from, per field: ``mesh.coordinator_address`` / ``mesh.num_processes`` /
``mesh.process_id``, else ``$JAX_COORDINATOR_ADDRESS`` / ``$JAX_NUM_PROCESSES`` / ``$JAX_PROCESS_ID``, else
JAX's own cluster detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes), which needs no arguments.
``mesh.distributed`` decides whether to initialise: ``auto`` does when any of those fields is given or a
multi-process launcher (SLURM ``srun``, Open MPI, a GKE TPU slice) is found in the environment; ``on``
always does (a Cloud TPU VM pod: JAX asks the TPU metadata server); ``off`` never does.

A process that dies (a SIGKILL, a lost host) stops sending heartbeats to the coordination service (on process
0). Once none came for ``$JAXRL_LM_HEARTBEAT_TIMEOUT_S`` seconds (JAX's default, 100 s, when unset), JAX
aborts every other process (SIGABRT) with ``Terminating process because the JAX distributed service detected
fatal errors ... The following tasks are unhealthy (stopped sending heartbeats): <process index>``; without
that, the survivors would wait in their next collective forever. If process 0 dies, the others lose the service
and stop the same way. Then relaunch every process with ``--resume`` (docs/reliability.md, multi-process faults).
Short timeouts find a dead process sooner, but a live one whose heartbeat thread stalls that long (a swapping
or badly overloaded host) is then taken for dead and the whole run stops.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping, Optional

import jax

from jaxrl_lm.config import Config, ConfigError, MeshConfig

ENV_VARS = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
            "process_id": "JAX_PROCESS_ID"}
# Seconds without a heartbeat after which a process counts as dead and the run stops (module docstring).
HEARTBEAT_TIMEOUT_VAR = "JAXRL_LM_HEARTBEAT_TIMEOUT_S"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the run. initialized: whether ``jax.distributed`` was started."""

    index: int
    count: int
    initialized: bool

    @property
    def is_main(self) -> bool:
        return self.index == 0


def _env_int(environ: Mapping[str, str], name: str) -> Optional[int]:
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"${name} must be an integer, got {raw!r}") from None


def explicit_arguments(m: MeshConfig, environ: Mapping[str, str]) -> dict[str, object]:
    """The ``jax.distributed.initialize`` arguments given by the config or the environment (others are
    left to JAX's cluster detection)."""
    found: dict[str, object] = {}
    address = m.coordinator_address or environ.get(ENV_VARS["coordinator_address"], "")
    if address:
        found["coordinator_address"] = address
    count = m.num_processes or _env_int(environ, ENV_VARS["num_processes"])
    if count:
        found["num_processes"] = count
    index = m.process_id if m.process_id >= 0 else _env_int(environ, ENV_VARS["process_id"])
    if index is not None:
        found["process_id"] = index
    return found


def detected_launcher(environ: Mapping[str, str]) -> Optional[str]:
    """The multi-process launcher this process was started by, or None (a single process)."""
    if "SLURM_STEP_NODELIST" in environ and (_env_int(environ, "SLURM_NTASKS") or 1) > 1:
        return "SLURM"
    if (_env_int(environ, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "Open MPI"
    if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "TPU pod"
    return None


def should_initialize(m: MeshConfig, environ: Mapping[str, str]) -> bool:
    if m.distributed != "auto":
        return m.distributed == "on"
    return bool(explicit_arguments(m, environ)) or detected_launcher(environ) is not None


def _check_complete(args: dict[str, object], environ: Mapping[str, str]) -> None:
    """Without a launcher to ask, an explicit coordinator needs the process count and index too."""
    missing = [k for k in ENV_VARS if k not in args]
    if missing and detected_launcher(environ) is None and "coordinator_address" in args:
        keys = ", ".join(f"mesh.{k} (or ${ENV_VARS[k]})" for k in missing)
        raise ConfigError(f"mesh.coordinator_address is {args['coordinator_address']!r} but no cluster launcher "
                          f"was detected: also set {keys}")


def initialize(cfg: Config, environ: Mapping[str, str] | None = None) -> ProcessInfo:
    """Starts ``jax.distributed`` when ``cfg.mesh`` and the environment call for it (a no-op for a single
    process, and when it is already running); quiets ``jaxrl_lm``'s logging below warnings on processes other
    than 0. Returns this process's index and the process count."""
    environ = os.environ if environ is None else environ
    if not jax.distributed.is_initialized() and should_initialize(cfg.mesh, environ):
        args = explicit_arguments(cfg.mesh, environ)
        _check_complete(args, environ)
        heartbeat = _env_int(environ, HEARTBEAT_TIMEOUT_VAR)
        if heartbeat is not None:
            if heartbeat < 1:
                raise ConfigError(f"${HEARTBEAT_TIMEOUT_VAR} must be at least 1 (seconds), got {heartbeat}")
            args["heartbeat_timeout_seconds"] = heartbeat
        jax.distributed.initialize(**args)
    info = ProcessInfo(jax.process_index(), jax.process_count(), jax.distributed.is_initialized())
    if not info.is_main:
        logging.getLogger("jaxrl_lm").setLevel(logging.WARNING)
    return info
