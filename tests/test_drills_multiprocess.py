"""Multi-process fault drills (docs/reliability.md): in a two-process CPU run (``jax.distributed`` on
127.0.0.1, 2 host devices per process), one process is killed with SIGKILL mid-run. The other must stop within
a bounded time with an error that names the lost process, never hang; relaunching both with ``--resume`` must end
bitwise equal to an uninterrupted two-process run.

One chain of launches, each process ``tests/multiprocess_drill_worker.py`` (``scripts/train.py``'s entry point):
process 1 killed right after its second save (step 8, its write in flight; step 4 is complete: a save commits
only when every process has written its part); both resumed, and process 0 (the coordinator) killed after the
second save of that launch; both resumed to the end. ``JAXRL_LM_DRILL_REPORT=FILE`` writes each launch's return
codes, the survivor's exit time and the steps saved.

The bound. Process 1's death is seen by the coordination service (on process 0) when no heartbeat came for
``$JAXRL_LM_HEARTBEAT_TIMEOUT_S`` (``jaxrl_lm.distributed``), set here to ``HEARTBEAT_S``; JAX then aborts
process 0. Process 0's death takes the service with it: process 1's next poll fails at once. ``BOUND_S`` allows
the heartbeat timeout twice over (the check runs on a period, not at the instant) plus 30 s for a machine under
load. A survivor still running at ``BOUND_S`` is killed and the test fails: a hang.
"""

import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrl_lm import distributed
from jaxrl_lm.config import REPO_ROOT, ConfigError, load_config
from jaxrl_lm.train import checkpoint
from helpers import assert_bitwise_equal

WORKER = Path(__file__).with_name("multiprocess_drill_worker.py")
STEPS, EVERY, KEEP = 24, 4, 2
HEARTBEAT_S = 10
BOUND_S = 2 * HEARTBEAT_S + 30
LAUNCH_TIMEOUT_S = 300  # a launch running longer is a hang: killed, and the test fails
TINY = ["model.d_model=32", "model.n_layers=1", "data.task_episodes=200", "data.batch_size=8", "data.seq_len=64",
        "optim.schedule=constant", f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}",
        f"train.keep_checkpoints={KEEP}", "train.log_every=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAXRL_LM_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_S),
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                         "--xla_cpu_use_fusion_emitters=false"}


def no_core_dump() -> None:  # the survivor ends by SIGABRT: no core file in the repository
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def launch(out_dir: Path, logs: Path, name: str, kill: dict[int, int] | None = None, resume: bool = False) -> dict:
    """Both processes of one launch; ``kill``: {process: its save after which it SIGKILLs itself}. Returns each
    process's return code (None: still running at the bound, killed), its log, which process ended first with a
    nonzero code (killed or failed) and the seconds from then to the other's exit (None: it hung)."""
    kill = kill or {}
    port = free_port()
    procs, files = [], []
    for i in range(2):
        argv = ["--config", "configs/demo.yaml", "--no-progress", "--no-eval", *TINY, f"train.out_dir={out_dir}",
                f"mesh.coordinator_address=127.0.0.1:{port}", "mesh.num_processes=2", f"mesh.process_id={i}",
                *(["--resume"] if resume else [])]
        log = (logs / f"{name}.p{i}.log").open("w")
        files.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "--kill-after-save", str(kill.get(i, 0)), "--",
                                       *argv], cwd=REPO_ROOT, env=worker_env(), stdout=log, stderr=subprocess.STDOUT,
                                      preexec_fn=no_core_dump))
    start, died, first_dead, codes, ended = time.monotonic(), None, None, [None, None], [None, None]
    try:
        while None in codes:
            for i, p in enumerate(procs):
                if codes[i] is None and p.poll() is not None:
                    codes[i], ended[i] = p.returncode, time.monotonic()
                    if codes[i] != 0 and died is None:  # killed, or failed: the other must follow in bounded time
                        died, first_dead = ended[i], i
            now = time.monotonic()
            if now - start > LAUNCH_TIMEOUT_S or (died is not None and now - died > BOUND_S):
                break  # a hang: the processes still running are killed below and reported as None
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    texts = [(logs / f"{name}.p{i}.log").read_text() for i in range(2)]
    survivor = None if first_dead is None else 1 - first_dead
    exit_s = ended[survivor] - died if survivor is not None and ended[survivor] is not None else None
    return {"codes": codes, "logs": texts, "exit_s": exit_s, "first_dead": first_dead}


def tails(result: dict) -> str:
    return "\n".join(f"--- process {i} (code {c})\n{t[-3000:]}" for i, (c, t) in
                     enumerate(zip(result["codes"], result["logs"])))


def state_at_end(out_dir: Path):
    return checkpoint.restore(out_dir / checkpoint.CHECKPOINT_SUBDIR,
                              jax.sharding.SingleDeviceSharding(jax.devices()[0]), STEPS)


def saved_positions(out_dir: Path) -> list[dict]:
    """Every process's loader position in the last checkpoint, read from the ``data`` item's JSON file (restoring
    here, in one process, gives process 0's alone)."""
    directory = out_dir / checkpoint.CHECKPOINT_SUBDIR / str(STEPS) / "data"
    found = [json.loads(p.read_text()) for p in sorted(directory.rglob("*")) if p.is_file()
             and '"per_process"' in p.read_text(errors="replace")]
    assert len(found) == 1, sorted(directory.rglob("*"))
    return found[0]["per_process"]


def steps_saved(text: str) -> list[int]:
    return [int(line.split()[-1]) for line in text.splitlines() if line.startswith("drill: saved step")]


@pytest.mark.slow
def test_a_killed_process_stops_the_other_and_both_resume_exactly(tmp_path):
    reference, drilled = tmp_path / "reference", tmp_path / "drilled"
    straight = launch(reference, tmp_path, "reference")
    assert straight["codes"] == [0, 0], tails(straight)

    # Process 1 dies after saving step 8; process 0 runs into its next collective and must be stopped.
    first = launch(drilled, tmp_path, "kill1", kill={1: 2})
    assert first["codes"][1] == -9 and first["first_dead"] == 1, tails(first)  # SIGKILL
    assert first["exit_s"] is not None and first["exit_s"] <= BOUND_S, ("process 0 hung", tails(first))
    assert first["codes"][0] not in (0, None), tails(first)
    assert "The following tasks are unhealthy (stopped sending heartbeats):\n1\n" in first["logs"][0], tails(first)
    assert "Terminating process because the JAX distributed service detected fatal errors" in first["logs"][0]
    assert not (drilled / "final_metrics.json").exists()

    # Both relaunched with --resume; now process 0 (the coordinator) dies after this launch's second save.
    second = launch(drilled, tmp_path, "kill0", kill={0: 2}, resume=True)
    assert second["codes"][0] == -9 and second["first_dead"] == 0, tails(second)
    assert second["exit_s"] is not None and second["exit_s"] <= BOUND_S, ("process 1 hung", tails(second))
    assert second["codes"][1] not in (0, None), tails(second)
    assert "the leader task was preempted/died/restarted unexpectedly" in second["logs"][1], tails(second)
    resumed_at = steps_saved(second["logs"][0])
    assert len(resumed_at) == 2 and resumed_at[-1] < STEPS, tails(second)

    last = launch(drilled, tmp_path, "finish", resume=True)
    if os.environ.get("JAXRL_LM_DRILL_REPORT"):
        Path(os.environ["JAXRL_LM_DRILL_REPORT"]).write_text(json.dumps({
            name: {"codes": r["codes"], "survivor_exit_s": r["exit_s"], "saved": [steps_saved(t) for t in r["logs"]]}
            for name, r in [("reference", straight), ("kill1", first), ("kill0", second), ("finish", last)]},
            indent=1))
    assert last["codes"] == [0, 0], tails(last)
    final = json.loads((drilled / "final_metrics.json").read_text())
    assert final["step"] == STEPS and not final["preempted"] and final["resumed_from"] < STEPS, final
    steps = sorted(int(p.name) for p in (drilled / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [STEPS - EVERY, STEPS]
    assert not [p.name for p in (drilled / "checkpoints").iterdir() if "tmp" in p.name]

    got, want = state_at_end(drilled), state_at_end(reference)
    assert_bitwise_equal(got.state, want.state)  # params, groups, optimizer state, step, skipped, rng
    assert got.loader_state == want.loader_state
    positions = saved_positions(drilled)
    assert [p["identity"]["process_index"] for p in positions] == [0, 1]
    assert positions == saved_positions(reference)


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_a_heartbeat_timeout_that_is_not_a_positive_integer_is_refused(value):
    cfg = load_config("configs/demo.yaml", ["mesh.coordinator_address=127.0.0.1:1", "mesh.num_processes=2",
                                            "mesh.process_id=1"])
    with pytest.raises(ConfigError, match=r"\$JAXRL_LM_HEARTBEAT_TIMEOUT_S must be"):
        distributed.initialize(cfg, environ={distributed.HEARTBEAT_TIMEOUT_VAR: value})
