"""Ahead-of-time compilation of the real update for a TPU slice or GPU node that this machine does not have.

Before renting a pod: does the step of this config fit, on which mesh, and how long would it take? libtpu
describes TPU chips and the CUDA plugin describes GPUs from a target file (``configs/topologies/*.txtpb``), so
a laptop's CPU lowers and compiles the very program a pod run would: the TrainState built abstractly
(nothing materialised), the mesh and shardings of ``setup_parallelism`` (with its start-up checks), and
``make_update``'s jit with the same in/out shardings and the donated state::

    cfg = load_config("configs/models/gpt2_small.yaml", ["mesh.topology=v5p-128", "mesh.fsdp=64"])
    report = compile_for_topology(cfg)
    print(format_report(report))           # per-device memory, HBM headroom, compile time, FLOPs, step time

The TPU compiler refuses a step that does not fit the chip's HBM (RESOURCE_EXHAUSTED): the report then has
``fits = False`` and XLA's message. Otherwise the measure is XLA's simulated per-device peak (its memory
analysis; the TPU compiler checks the same figure). The GPU compiler only warns, so a GPU report is an
estimate: that peak compared with the HBM table of ``jaxrl_lm/topology.py``. FLOPs come from
``train/flops.py`` (XLA's cost analysis counts a scanned layer body once); the step time is those FLOPs at a
stated MFU of the chips' bf16 peak. ``scripts/aot_compile.py`` is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Any

import jax

from jaxrl_lm.batch import BATCH_FIELDS
from jaxrl_lm.config import REPO_ROOT, Config, ConfigError, load_config
from jaxrl_lm.topology import GIB, Topology, parse_topology
from jaxrl_lm.train.flops import update_flops
from jaxrl_lm.train.sharding import compiled_bytes_per_device, setup_parallelism
from jaxrl_lm.models import model_graphdef
from jaxrl_lm.train.update import make_update

# The compiler each platform needs on a machine without the hardware: module to find, package that brings it.
COMPILERS = {"tpu": ("libtpu", "libtpu"), "cuda": ("jax_plugins.xla_cuda12", "jax-cuda12-plugin")}


class MissingCompilerError(RuntimeError):
    """This machine lacks the compiler for a platform; the message names the package."""


def missing_compiler(platform: str) -> str | None:
    """Why this machine cannot compile for ``platform`` ("tpu" | "cuda"), or None when it can."""
    module, package = COMPILERS[platform]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the jax_plugins namespace itself is absent
        found = False
    if found:
        return None
    return f"compiling for {platform} needs {package}: pip install -e '.[aot]' (see pyproject.toml)"


def topology_devices(topology: Topology) -> list[jax.Device]:
    """Compile-only devices of ``topology`` (every slice): enough to lower and compile for, never to run on."""
    from jax.experimental import topologies

    if topology.chip.platform == "tpu":
        # libtpu takes /tmp/libtpu_lockfile so that one process owns the chips; a compile-only client owns none,
        # and must not fail because another JAX process on this machine initialised libtpu first.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        desc = topologies.get_topology_desc(
            topology_name=topology.libtpu_topology, platform="tpu", chip_config_name=topology.chip.chip_config,
            chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=topology.num_slices,
            wrap=topology.wrap)
    else:  # XLA's GPU topology string: slices x hosts per slice x devices per host; one node is one slice
        desc = topologies.get_topology_desc(
            platform="cuda", topology=f"{topology.num_slices}x1x{topology.devices_per_slice}",
            target_config=(REPO_ROOT / topology.chip.target_config).read_text())
    return list(desc.devices)


def abstract_batch(cfg: Config, sharding: jax.sharding.Sharding) -> dict[str, jax.ShapeDtypeStruct]:
    """The global ``[data.batch_size, data.seq_len]`` batch (``jaxrl_lm.batch`` fields) on ``sharding``."""
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for name, dtype in BATCH_FIELDS.items()}


@dataclasses.dataclass(frozen=True)
class AotReport:
    """One compile of the update for a topology.

    mesh: axis sizes. memory: one device's bytes (``compiled_bytes_per_device``; ``peak`` is what must fit),
    None when XLA refused the step; error: XLA's RESOURCE_EXHAUSTED message then. flops_per_step: model FLOPs
    of one optimizer step (``train/flops.py``); mfu: the assumed model-FLOPs utilisation for ``step_s``.
    """

    config: str
    topology: Topology
    mesh: dict[str, int]
    batch_size: int
    seq_len: int
    remat: str
    dtype: str
    compile_s: float
    memory: dict[str, int] | None
    error: str
    flops_per_step: float
    mfu: float

    @property
    def hbm_bytes(self) -> int:
        return self.topology.chip.hbm_bytes

    @property
    def peak_bytes(self) -> int | None:
        return None if self.memory is None else self.memory["peak"]

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory["peak"] <= self.hbm_bytes

    @property
    def estimate(self) -> bool:
        """True where the compiler does not enforce the memory limit itself (GPUs)."""
        return self.topology.chip.platform != "tpu"

    @property
    def step_s(self) -> float:
        """Seconds per optimizer step at ``mfu`` of every device's bf16 peak."""
        return self.flops_per_step / (self.topology.n_devices * self.topology.chip.peak_flops * self.mfu)

    def to_dict(self) -> dict[str, Any]:
        gib = lambda b: None if b is None else round(b / GIB, 3)  # noqa: E731
        return {
            "config": self.config, "topology": self.topology.name, "num_slices": self.topology.num_slices,
            "devices": self.topology.n_devices, "device_kind": self.topology.chip.device_kind,
            "mesh": self.mesh, "batch_size": self.batch_size, "seq_len": self.seq_len, "remat": self.remat,
            "dtype": self.dtype, "fits": self.fits, "estimate": self.estimate,
            "memory_gib": None if self.memory is None else {k: gib(v) for k, v in self.memory.items()},
            "peak_gib": gib(self.peak_bytes), "hbm_gib": gib(self.hbm_bytes), "error": self.error,
            "compile_s": round(self.compile_s, 1), "model_flops_per_step": self.flops_per_step, "mfu": self.mfu,
            "step_s": round(self.step_s, 4),
        }


def _oom_message(error: Exception) -> str | None:
    """XLA's out-of-memory line, or None when ``error`` is something else."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    return next(line for line in text.splitlines() if "RESOURCE_EXHAUSTED" in line).strip()


def compile_for_topology(cfg: Config, *, mfu: float = 0.4, config_name: str = "") -> AotReport:
    """Lowers and compiles ``cfg``'s update for ``mesh.topology`` x ``mesh.num_slices`` on this machine.

    Args:
      cfg: the run's config, ``mesh.topology`` set; its mesh, batch and model are compiled as they are.
      mfu: model-FLOPs utilisation assumed for the implied step time (0 < mfu <= 1).
      config_name: where ``cfg`` came from, for the report.

    Raises ConfigError for a config the mesh cannot take (the same start-up checks a pod run makes) and
    MissingCompilerError when this machine lacks the compiler (``missing_compiler``). A step that does not fit is
    not an error: the report says so.
    """
    if not cfg.mesh.topology:
        raise ConfigError("mesh.topology is '': name the slice to compile for, e.g. mesh.topology=v5p-128")
    if not 0.0 < mfu <= 1.0:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    topology = parse_topology(cfg.mesh.topology, cfg.mesh.num_slices)
    reason = missing_compiler(topology.chip.platform)
    if reason:
        raise MissingCompilerError(reason)
    par = setup_parallelism(cfg, topology_devices(topology))
    update = make_update(cfg, model_graphdef(cfg.model), state_sharding=par.state_sharding,
                         batch_sharding=par.batch_sharding)
    start = time.perf_counter()
    lowered = update.lower(par.abstract_state, abstract_batch(cfg, par.batch_sharding))
    try:
        memory, error = compiled_bytes_per_device(lowered.compile()), ""
    except jax.errors.JaxRuntimeError as e:
        oom = _oom_message(e)
        if oom is None:
            raise
        memory, error = None, oom
    b, length = cfg.data.batch_size, cfg.data.seq_len
    return AotReport(config=config_name, topology=topology, mesh=dict(par.mesh.shape), batch_size=b,
                     seq_len=length, remat=cfg.model.remat, dtype=cfg.model.dtype,
                     compile_s=time.perf_counter() - start, memory=memory, error=error,
                     flops_per_step=update_flops(cfg, b, length).total, mfu=mfu)


def what_to_change(cfg: Config) -> list[str]:
    """The knobs that shrink a step's per-device memory, each with its current value."""
    m, o, mesh = cfg.model, cfg.optim, cfg.mesh
    hints = [f"data.batch_size={cfg.data.batch_size}: fewer rows per step, or the same rows in more micro-batches "
             f"(optim.grad_accum={o.grad_accum})"]
    if m.remat != "full":
        hints.append(f"model.remat={m.remat}: 'full' recomputes each block in the backward pass instead of keeping "
                     f"its activations ('dots' keeps only matmul outputs)")
    hints.append(f"mesh.fsdp={mesh.fsdp}: shard parameters, targets and optimizer state over more devices")
    if m.dtype == "float32":
        hints.append("model.dtype=float32: bfloat16 halves the activations (parameters stay float32)")
    if cfg.rl.decision_fraction == 1.0:
        hints.append("rl.decision_fraction=1.0: run the vocabulary-sized heads on fewer positions per row")
    return hints


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:8.3f} GiB"


def format_report(report: AotReport) -> str:
    """The report as the command line prints it."""
    t = report.topology
    mesh = " ".join(f"{k}={v}" for k, v in report.mesh.items())
    lines = [
        f"{t.describe()}",
        f"config {report.config or '(in memory)'}: batch {report.batch_size} x {report.seq_len} tokens, "
        f"model.remat={report.remat}, model.dtype={report.dtype}",
        f"mesh {mesh} ({t.n_devices} devices)",
        f"compile {report.compile_s:.1f} s",
    ]
    if report.memory is None:
        lines.append(f"does not fit: {report.error}")
    else:
        mem = report.memory
        verdict = "fits" if report.fits else "does NOT fit"
        lines += [
            "per-device memory" + (" (estimate: the GPU compiler does not check it)" if report.estimate else ""),
            f"  arguments    {_gib(mem['argument'])}   state + batch",
            f"  outputs      {_gib(mem['output'])}   {mem['alias'] / GIB:.3f} GiB of them in the donated state's buffers",
            f"  temporaries  {_gib(mem['temp'])}",
            f"  code         {_gib(mem['code'])}",
            f"  peak         {_gib(mem['peak'])}   of {report.hbm_bytes / GIB:.0f} GiB HBM per {t.chip.name}: "
            f"{verdict}, headroom {(report.hbm_bytes - mem['peak']) / GIB:.2f} GiB",
        ]
    tokens = report.batch_size * report.seq_len
    lines += [
        f"model FLOPs per step {report.flops_per_step:.3e} (jaxrl_lm/train/flops.py)",
        f"at MFU {report.mfu:.2f} of {t.chip.peak_flops / 1e12:.0f} TFLOP/s bf16 per device: {report.step_s:.3g} s "
        f"per step, {tokens / report.step_s:,.0f} tokens/s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``scripts/aot_compile.py``: 0 when the step fits, 1 when it does not, 2 for a config error."""
    ap = argparse.ArgumentParser(description="Compile the update for a TPU slice or GPU node on this machine and "
                                             "report per-device memory, compile time and the implied step time.")
    ap.add_argument("--config", required=True, help="YAML config, as scripts/train.py takes it")
    ap.add_argument("--topology", help="overrides mesh.topology: v5e-16, v5p-128, v5e:4x4, h100-8, ...")
    ap.add_argument("--slices", type=int, help="overrides mesh.num_slices (TPU slices or GPU nodes)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model-FLOPs utilisation for the step time (0.4)")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON line")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=256 mesh.fsdp=64")
    args = ap.parse_intermixed_args(argv)  # overrides may come before and after the options
    overrides = list(args.overrides)
    if args.topology is not None:
        overrides.append(f"mesh.topology={args.topology}")
    if args.slices is not None:
        overrides.append(f"mesh.num_slices={args.slices}")
    try:
        cfg = load_config(args.config, overrides)
        report = compile_for_topology(cfg, mfu=args.mfu, config_name=args.config)
    except (ValueError, MissingCompilerError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict()) if args.json else format_report(report), flush=True)
    if report.fits:
        return 0
    print("\nThe step does not fit. To make it smaller, change one of:\n"
          + "\n".join(f"  {hint}" for hint in what_to_change(cfg)), file=sys.stderr)
    return 1
