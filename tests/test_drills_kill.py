"""Kill drills (docs/reliability.md): training launches killed with SIGKILL or sent SIGTERM at chosen and random
moments, then resumed with ``--resume`` until done, end bitwise equal to an uninterrupted run.

The launches are ``scripts/train.py``'s entry point (``jaxrl_lm.experiments.run.main``) run by
``tests/drill_worker.py``, which says where each signal landed: right after an update was dispatched (the step
computing), while a checkpoint's files were being written in the background, just before Orbax's commit rename,
inside the loader's prefetch thread, during an evaluation, and at random times (``JAXRL_LM_DRILL_SCALE=k``: k
chains of random moments instead of one; ``JAXRL_LM_DRILL_SEED`` seeds them); ``JAXRL_LM_DRILL_REPORT=FILE``
writes the counts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrl_lm.config import REPO_ROOT
from jaxrl_lm.train import checkpoint
from helpers import assert_bitwise_equal

STEPS, EVERY, KEEP = 24, 4, 2
SCALE = int(os.environ.get("JAXRL_LM_DRILL_SCALE", "1"))
SEED = int(os.environ.get("JAXRL_LM_DRILL_SEED", "0"))
TINY = ["model.d_model=32", "model.n_layers=1", "data.task_episodes=200", "data.batch_size=8", "data.seq_len=64",
        "optim.schedule=constant", f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}",
        f"train.keep_checkpoints={KEEP}", "train.log_every=4"]
EVAL = ["eval.every=12", "eval.episodes=4", "eval.batch_size=4", "eval.policies=[bc]", "eval.decodings=[greedy]",
        "eval.max_new_tokens=8"]


def argv(out_dir, *extra):
    return ["--config", "configs/demo.yaml", "--no-progress", "--no-eval", *TINY, *extra, f"train.out_dir={out_dir}"]


def kill(at, **kw):
    return {"at": at, "signal": "KILL", **kw}


def term(at, **kw):
    return {"at": at, "signal": "TERM", **kw}


def plan(root: Path) -> dict:
    sigkill = [kill("step", n=3), kill("prefetch", n=7), kill("save", n=1, delay_ms=0), kill("commit", n=1),
               kill("save", n=2, delay_ms=20)]
    sigterm = [term("step", n=2), term("save", n=1, delay_ms=5), term("prefetch", n=6)]
    # Random moments: a chain of its own per SCALE (a chain stops drawing once its run is done).
    randoms = [kill("random", delay_s=-1), term("random", delay_s=-1), kill("random", delay_s=-1),
               kill("random", delay_s=-1)]

    def chain(name, launches, *extra, finish=3):
        out = root / name
        return {"name": name, "out_dir": str(out), "steps": STEPS, "argv": argv(out, *extra), "launches": launches,
                "finish": finish}

    return {"seed": SEED, "chains": [
        chain("reference", [{"at": "none"}], finish=0),
        chain("sigkill", sigkill),
        chain("sigterm", sigterm),
        chain("eval", [kill("eval", n=1, delay_ms=300), term("eval", n=1, delay_ms=300)], *EVAL),
        *[chain(f"random{i}", randoms) for i in range(SCALE)],
    ]}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill_drills")
    (root / "plan.json").write_text(json.dumps(plan(root)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
                        "--xla_cpu_use_fusion_emitters=false",
           # every launch loads the update compiled by the first one (bitwise the same program, less time)
           "JAX_COMPILATION_CACHE_DIR": str(root / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "drill_worker.py"), str(root / "plan.json"),
                           str(root / "report.json")], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    chains = {c["name"]: c for c in json.loads((root / "report.json").read_text())}
    if os.environ.get("JAXRL_LM_DRILL_REPORT"):
        Path(os.environ["JAXRL_LM_DRILL_REPORT"]).write_text(json.dumps(summary(chains), indent=1))
    return chains


def summary(chains):
    out = {}
    for name, chain in chains.items():
        launches = chain["launches"]
        out[name] = {"launches": len(launches), "signals_landed": sum(bool(x["fired"]) for x in launches),
                     "ended": [x["ended"] for x in launches], "where": [x["fired"] for x in launches],
                     "seconds": round(sum(x["seconds"] for x in launches), 1)}
    return out


def log_of(launch):
    return Path(launch["log"]).read_text()[-4000:] if Path(launch["log"]).is_file() else "(no log)"


def state_at_end(chain):
    directory = Path(chain["out_dir"]) / checkpoint.CHECKPOINT_SUBDIR
    return checkpoint.restore(directory, jax.sharding.SingleDeviceSharding(jax.devices()[0]), STEPS)


def check_chain(chains, name):
    """Every launch ended by its signal or normally (never an error or a hang), the last one finished the run,
    the run's newest checkpoints are the rotation's, and the state and data position equal the reference's."""
    chain = chains[name]
    for launch in chain["launches"]:
        assert launch["ended"] in ("SIGKILL", "exit 0"), (launch["trigger"], launch["ended"], log_of(launch))
        assert not launch["fired"] or launch["ended"] == ("SIGKILL" if launch["trigger"]["signal"] == "KILL"
                                                          else "exit 0"), (launch, log_of(launch))
    last = chain["launches"][-1]
    assert last["final"] is not None and last["final"]["step"] == STEPS and not last["final"]["preempted"], last
    # KEEP checkpoints, the last at STEPS (the one before may be a SIGTERM's), and no interrupted write left
    assert len(last["steps_after"]) == KEEP and last["steps_after"][-1] == STEPS and last["debris_after"] == []
    got, want = state_at_end(chain), state_at_end(chains["reference"])
    assert_bitwise_equal(got.state, want.state)  # params, groups, optimizer state, step, skipped, rng
    assert got.loader_state == want.loader_state
    return chain["launches"]


@pytest.mark.slow
def test_the_reference_runs_straight(report):
    (launch,) = report["reference"]["launches"]
    assert launch["ended"] == "exit 0" and launch["final"]["step"] == STEPS, log_of(launch)
    assert launch["steps_after"] == [STEPS - EVERY, STEPS]


def test_sigkill_anywhere_then_resume_is_bitwise_the_uninterrupted_run(report):
    launches = check_chain(report, "sigkill")
    triggered = [x for x in launches if x["trigger"]["at"] not in ("none", "random")]
    assert all(x["fired"] and x["ended"] == "SIGKILL" for x in triggered), triggered  # each chosen moment was hit
    commit = next(x for x in launches if x["trigger"]["at"] == "commit")
    assert commit["debris_after"], commit  # killed with every file written and no rename: a tmp directory is left
    assert any(x["resumed"] for x in launches[1:])
    assert sum(x["ended"] == "SIGKILL" for x in launches) >= len(triggered)


def test_sigterm_saves_at_the_next_step_then_resume_is_bitwise_the_uninterrupted_run(report):
    launches = check_chain(report, "sigterm")
    preempted = 0
    for x in launches:
        if x["fired"] and x["final"]["step"] < STEPS:  # (a signal after the last step's boundary ends nothing)
            assert x["ended"] == "exit 0" and x["final"]["preempted"], (x, log_of(x))
            assert x["saves"] and x["steps_after"][-1] == x["saves"][-1] == x["final"]["step"], x
            assert "SIGTERM: saved the checkpoint of step" in log_of(x)
            preempted += 1
    triggered = [x for x in launches if x["trigger"]["at"] not in ("none", "random")]
    assert all(x["fired"] and x["final"]["preempted"] for x in triggered), triggered
    assert preempted >= len(triggered)


def test_random_signals_then_resume_is_bitwise_the_uninterrupted_run(report):
    landed = 0
    for name in [n for n in report if n.startswith("random")]:
        for x in check_chain(report, name):
            if x["fired"] and x["trigger"]["signal"] == "TERM" and x["final"]["step"] < STEPS:
                assert x["final"]["preempted"] and x["steps_after"][-1] == x["final"]["step"], x
            landed += bool(x["fired"])
    assert landed >= 2 * SCALE  # delays are drawn within the work left: most signals land


def test_killed_or_preempted_during_evaluation(report):
    launches = check_chain(report, "eval")
    killed, preempted = launches[0], launches[1]
    assert killed["fired"] and killed["ended"] == "SIGKILL" and killed["fired"][0].startswith("eval"), killed
    assert preempted["fired"] and preempted["final"]["preempted"] and preempted["steps_after"][-1] == 12, preempted
