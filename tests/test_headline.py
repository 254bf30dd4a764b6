"""The headline claim, reduced to fit CI: on grid stitching, offline Q-learning beats behaviour cloning.

The full experiment (``python scripts/reproduce.py grid``: separate runs per method, 3 seeds) is in the README.
Here one run of ``configs/tasks/grid.yaml``, cut to ``STEPS`` steps, trains the LM head (plain behaviour cloning:
``awr_beta`` is 0) beside the Q and V heads on the same trunk and data; at the end both policies play every
start of the grid ``EPISODES_PER_START`` times, greedily and sampled (``eval.decodings``). The data's most frequent
move at every node is a lure away from the goal, and only bootstrapping across its short truncated walks can find
the long shortest paths, so the ILQL policy, under each decoding, must beat the cloned one's better decoding (the
strongest simple baseline) by ``MARGIN`` normalised points.

The run goes through ``scripts/train.py`` in a subprocess: this suite's XLA flags (conftest.py) trade run time
for compile time, and this is the one test whose cost is all run time.
"""

import json
import os
import subprocess
import sys

import pytest

from jaxrl_lm.config import REPO_ROOT
from jaxrl_lm.envs import get_task

STEPS = 1500
EPISODES_PER_START = 3
MARGIN = 10.0


@pytest.mark.slow
def test_q_learning_beats_behaviour_cloning_on_grid(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    command = [sys.executable, "scripts/train.py", "--config", "configs/tasks/grid.yaml", "--no-progress",
               f"train.steps={STEPS}", f"eval.every={STEPS}", "eval.policies=[bc,ilql]",
               f"eval.episodes={get_task('grid').num_instances * EPISODES_PER_START}", f"train.out_dir={tmp_path}"]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    bc = final["eval/bc/normalized_score"]  # BC's better decoding (jaxrl_lm.eval.best_of_decodings)
    assert bc == max(final["eval/bc/greedy/normalized_score"], final["eval/bc/sampled/normalized_score"])
    for decoding in ("greedy", "sampled"):
        ilql = final[f"eval/ilql/{decoding}/normalized_score"]
        assert ilql >= bc + MARGIN, (f"ilql {decoding} {ilql:.1f} vs the better bc {bc:.1f}: Q-learning should win "
                                     f"by {MARGIN} points")
