"""The soak, reduced for CI (docs/reliability.md): ``scripts/soak.py`` for 200 steps of the tiny model,
with a checkpoint every 5 steps (keep 3) and an evaluation every 25, sampled every 10 steps.

What it can catch in 200 steps, and the bounds. Open file descriptors: the count moves by about ten between
samples (Orbax's background writes hold files for a moment), so the test allows the second half's most 4 above
the first half's most; a descriptor leaked per checkpoint adds 20 there (one per evaluation, 4, is the full
soak's to measure).
Resident memory: it grows while the first compilations, evaluations and rotations settle (about 40 MB over the
first 750 steps of the 3,000-step soak) and then moves by up to ~20 MB between samples, so the bound is
generous: the least-squares growth over the second half (100 steps) under ``RSS_BOUND_MB`` (10 MB measured under
load). A copy of the train state kept per step (0.93 MB: the size of one checkpoint's arrays) adds about 90 MB,
and an update recompiled every step more; a slow leak (0.1 MB per checkpoint) is the full soak's to measure, not
this test's.
"""

import json
import os
import subprocess
import sys

import pytest

from jaxrl_lm.config import REPO_ROOT

STEPS, SAMPLE_EVERY, CHECKPOINT_EVERY, KEEP, EVAL_EVERY = 200, 10, 5, 3, 25
FD_SLACK = 4
RSS_BOUND_MB = 60.0


@pytest.mark.slow
def test_a_short_soak_keeps_descriptors_flat_memory_bounded_and_checkpoints_rotating(tmp_path):
    report = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, "scripts/soak.py", "--steps", str(STEPS), "--sample-every",
                           str(SAMPLE_EVERY), "--checkpoint-every", str(CHECKPOINT_EVERY), "--keep", str(KEEP),
                           "--eval-every", str(EVAL_EVERY), "--out", str(tmp_path / "run"), "--report", str(report)],
                          cwd=REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(report.read_text())
    samples = result["samples"]
    assert result["steps"] == STEPS and [s["step"] for s in samples] == list(range(SAMPLE_EVERY, STEPS + 1,
                                                                                     SAMPLE_EVERY))

    # Rotation: KEEP steps at the end, the newest ones; one more at most while a save is being committed. A
    # sample runs before its step's save, and the save before it may still be writing: the listing lags by two.
    assert result["checkpoints_at_end"] == [STEPS - (KEEP - 1 - i) * CHECKPOINT_EVERY for i in range(KEEP)]
    assert all(len(s["checkpoints"]) <= KEEP + 1 for s in samples), [s["checkpoints"] for s in samples]
    assert all(len(s["checkpoints"]) >= KEEP and s["checkpoints"][-1] >= s["step"] - 2 * CHECKPOINT_EVERY
               for s in samples if s["step"] >= (KEEP + 2) * CHECKPOINT_EVERY), [s["checkpoints"] for s in samples]

    early = [s for s in samples if s["step"] <= STEPS / 2]
    late = [s for s in samples if s["step"] > STEPS / 2]
    assert max(s["fds"] for s in late) <= max(s["fds"] for s in early) + FD_SLACK, [s["fds"] for s in samples]
    growth_mb = result["second_half"]["rss_mb_per_1000_steps"] * (late[-1]["step"] - late[0]["step"]) / 1000
    assert growth_mb < RSS_BOUND_MB, [round(s["rss_mb"], 1) for s in samples]
