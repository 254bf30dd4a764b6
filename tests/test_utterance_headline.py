"""The utterance-level claim, reduced to fit CI: on negotiation, the utterance-level critic's policy beats
behaviour cloning.

The full experiment (``python scripts/reproduce.py negotiation``: separate runs per method, 3 seeds) is in the
README. Here one run of ``configs/tasks/negotiation.yaml`` with ``rl.objective: utterance_q``, cut to ``STEPS``
steps, trains the LM head (plain behaviour cloning, the critic's proposal distribution) beside the critic on the
same trunk and data; at the end both policies play every buyer once: ``bc`` samples the LM head, ``utterance``
samples ``eval.candidates`` offers from it and says the one the critic values most. No seller style in the data
reads the buyer's counteroffers, so only the critic's choice among sampled offers can beat the cloned one, by
``MARGIN`` normalised points.

What this does not show: greedy behaviour cloning replays the data's most common seller (the haggler, 80.8),
which neither the critic's sampled choice nor token-level ILQL beats in this budget (README, negotiation).

The run goes through ``scripts/train.py`` in a subprocess, as tests/test_headline.py does (and for its reason).
"""

import json
import os
import subprocess
import sys

from jaxrl_lm.config import REPO_ROOT

STEPS = 300
MARGIN = 10.0
BACKUP = "expectile"  # IQL at the utterance level: no samples while training, the cheapest utterance critic


def test_utterance_critic_beats_behaviour_cloning_on_negotiation(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    command = [sys.executable, "scripts/train.py", "--config", "configs/tasks/negotiation.yaml", "--no-progress",
               "rl.objective=utterance_q", f"utterance_q.backup={BACKUP}", "utterance_q.expectile_tau=0.9",
               "utterance_q.cql_alpha=0", "utterance_q.max_turns=12", f"train.steps={STEPS}",
               f"eval.every={STEPS}", "eval.policies=[bc,utterance]", f"train.out_dir={tmp_path}"]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    bc, utterance = final["eval/bc/normalized_score"], final["eval/utterance/normalized_score"]
    assert utterance >= bc + MARGIN, f"utterance {utterance:.1f} vs bc {bc:.1f}: the critic should win by {MARGIN}"
