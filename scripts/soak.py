"""A soak (docs/reliability.md): a long run of a tiny model, with evaluation and checkpoints every few steps,
that watches the process for leaks.

    JAX_PLATFORMS=cpu python scripts/soak.py --steps 3000 --report /tmp/soak.json

Trains ``configs/demo.yaml`` shrunk (d_model 32, one layer, 64-token rows) through ``scripts/train.py``'s
``run`` with one more loop hook: every ``--sample-every`` steps it records this process's resident memory
(``VmRSS`` of ``/proc/self/status``), its open file descriptors (the entries of ``/proc/self/fd``) and the step
directories in ``<out>/checkpoints``. It reports, over the second half of the run (the first half holds the
compilations, the first evaluation and the first rotation, which grow once and then stay), the least-squares
slope of RSS in MB per 1000 steps and of the descriptors per 1000 steps, and checks that the checkpoint
directory holds ``train.keep_checkpoints`` steps (never more than one above it while a save is being written:
Orbax deletes the oldest once the new one is committed). Extra arguments are config overrides (``key=value``).
Exit 0 when rotation held; the slopes are reported, not judged (``tests/test_soak.py`` sets the bounds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxrl_lm.config import load_config
from jaxrl_lm.experiments.run import run
from jaxrl_lm.train.loop import Hook, StepContext

# The demo config shrunk to a tiny model: a step is milliseconds, so checkpoints and evaluations dominate.
TINY = ["model.d_model=32", "model.n_layers=1", "data.task_episodes=200", "data.batch_size=8", "data.seq_len=64",
        "optim.schedule=constant", "train.log_every=50"]
EVAL = ["eval.episodes=4", "eval.batch_size=4", "eval.policies=[bc]", "eval.decodings=[greedy]",
        "eval.max_new_tokens=8"]


def rss_mb() -> float:
    """This process's resident set size in MB (``VmRSS``, kB in ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line (not Linux?)")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def step_dirs(out_dir: Path) -> list[int]:
    """Complete checkpoint steps (Orbax's tmp directories carry a suffix, so only digit names count)."""
    directory = out_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def slope_per_1000(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of ``values`` against ``steps``, per 1000 steps (0 with fewer than two points)."""
    if len(steps) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(steps, np.float64), np.asarray(values, np.float64), 1)[0] * 1000)


def soak(steps: int, sample_every: int, checkpoint_every: int, keep: int, eval_every: int, out_dir: Path,
         overrides: list[str]) -> dict:
    cfg = load_config("configs/demo.yaml", [*TINY, *EVAL, f"train.steps={steps}",
                                            f"train.checkpoint_every={checkpoint_every}",
                                            f"train.keep_checkpoints={keep}", f"eval.every={eval_every}",
                                            f"train.out_dir={out_dir}", *overrides])
    samples: list[dict] = []
    start = time.perf_counter()

    def sample(ctx: StepContext) -> None:
        samples.append({"step": ctx.step, "rss_mb": rss_mb(), "fds": open_fds(), "checkpoints": step_dirs(out_dir),
                        "seconds": time.perf_counter() - start})

    final = run(cfg, hooks=[Hook(sample, every=sample_every, at_end=True)], progress=False)
    late = [s for s in samples if s["step"] > steps / 2]
    after = step_dirs(out_dir)
    most = max(len(s["checkpoints"]) for s in samples)
    return {
        "steps": final["step"], "seconds": round(time.perf_counter() - start, 1), "samples": samples,
        "config": {"checkpoint_every": cfg.train.checkpoint_every, "keep_checkpoints": cfg.train.keep_checkpoints,
                   "eval_every": cfg.eval.every, "sample_every": sample_every},
        "second_half": {
            "samples": len(late),
            "rss_mb_per_1000_steps": slope_per_1000([s["step"] for s in late], [s["rss_mb"] for s in late]),
            "fds_per_1000_steps": slope_per_1000([s["step"] for s in late], [s["fds"] for s in late]),
            "rss_mb": [min(s["rss_mb"] for s in late), max(s["rss_mb"] for s in late)] if late else None,
            "fds": [min(s["fds"] for s in late), max(s["fds"] for s in late)] if late else None,
        },
        "rss_mb_first_last": [samples[0]["rss_mb"], samples[-1]["rss_mb"]],
        "checkpoints_at_end": after, "most_checkpoints_seen": most,
        "rotation_ok": len(after) == keep and after[-1] == steps and most <= keep + 1,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--sample-every", type=int, default=25, help="steps between samples (a loop hook)")
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--keep", type=int, default=3, help="train.keep_checkpoints")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: a new temporary one)")
    ap.add_argument("--report", type=Path, default=None, help="write the samples and slopes here as JSON")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = ap.parse_args(argv)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="soak_")) / "run"
    result = soak(args.steps, args.sample_every, args.checkpoint_every, args.keep, args.eval_every, out_dir,
                  args.overrides)
    if args.report:
        args.report.write_text(json.dumps(result, indent=1))
    half = result["second_half"]
    print(f"soak: {result['steps']} steps in {result['seconds']} s, {len(result['samples'])} samples; second half "
          f"({half['samples']} samples): RSS {half['rss_mb_per_1000_steps']:+.2f} MB per 1000 steps "
          f"(range {half['rss_mb']}), open fds {half['fds_per_1000_steps']:+.2f} per 1000 steps "
          f"(range {half['fds']}); RSS first/last sample {result['rss_mb_first_last']}; checkpoints at the end "
          f"{result['checkpoints_at_end']} (keep {args.keep}; most seen at once {result['most_checkpoints_seen']})",
          flush=True)
    if not result["rotation_ok"]:
        print(f"soak: checkpoint rotation broken: {result['checkpoints_at_end']} at the end, up to "
              f"{result['most_checkpoints_seen']} at once, keep {args.keep}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
