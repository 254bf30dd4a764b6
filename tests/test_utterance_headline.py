"""The utterance-level claim, reduced to fit CI: on negotiation, the utterance-level critic's policy beats
behaviour cloning.

The full experiment (``python scripts/reproduce.py negotiation``: separate runs per method, 3 seeds) is in the
README. Here, through ``scripts/train.py`` in a subprocess (as tests/test_headline.py does, and for its
reason), one run of ``configs/tasks/negotiation.yaml`` with ``rl.objective: utterance_q`` (expectile), cut to
``STEPS`` steps, trains the LM head (plain behaviour cloning, the critic's proposal distribution) beside the
critic on the same trunk and data; at the end both policies play every buyer once: ``bc`` decodes the LM head
(its better decoding is compared), ``utterance`` samples ``eval.candidates`` offers from it and says the one the
critic values most.

No seller style in the data reads the buyer's counteroffers, so only a critic can lift either policy above the
cloned one; the critic's choice must win by ``MARGIN`` normalised points: against sampled BC, the distribution it
chooses from (passes), and against BC's better decoding (a strict expected failure, below).

What this does not show: greedy behaviour cloning replays the data's most common seller (the haggler, 80.8),
which the critic's sampled choice does not beat in this budget (README, negotiation). The KL-constrained actor
has no reduced check here: 300 actor steps from this run cost 224 s to confirm a known miss (50.9 against greedy
BC's 71.5; README, actor-critics); its losses, gradients and resume are checked in tests/test_actor_critic.py.
"""

import json
import os
import subprocess
import sys

import pytest

from jaxrl_lm.config import REPO_ROOT

STEPS = 300
MARGIN = 10.0
CRITIC = ["expectile_tau=0.9", "cql_alpha=0", "max_turns=12"]


def train(*overrides):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    command = [sys.executable, "scripts/train.py", "--config", "configs/tasks/negotiation.yaml", "--no-progress",
               *overrides]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((REPO_ROOT / overrides[-1].split("=", 1)[1] / "final_metrics.json").read_text())


@pytest.fixture(scope="module")
def critic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("critic")
    final = train("rl.objective=utterance_q", "utterance_q.backup=expectile", *[f"utterance_q.{c}" for c in CRITIC],
                  f"train.steps={STEPS}", f"eval.every={STEPS}", "eval.policies=[bc,utterance]",
                  f"train.out_dir={out}")
    return final


# Since evaluations compare against BC's better decoding (issue 21), the claim is missed: on negotiation greedy BC
# scores 71.5 and the utterance critic 74.6 (2026-12-05). Strict: it fails CI once it holds.
@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="missed against BC's better (greedy) decoding: greedy BC 71.5, utterance "
                                       "74.6 (issue 21)")
def test_utterance_critic_beats_behaviour_cloning_on_negotiation(critic_run):
    final = critic_run
    bc, utterance = final["eval/bc/normalized_score"], final["eval/utterance/normalized_score"]
    assert utterance >= bc + MARGIN, f"utterance {utterance:.1f} vs bc {bc:.1f}: the critic should win by {MARGIN}"


@pytest.mark.slow
def test_the_critics_choice_beats_sampling_the_policy_it_chooses_from(critic_run):
    """What the same run does show: the utterance policy samples ``eval.candidates`` turns from the LM head and
    says the one the critic values most; that beats saying one sample of the LM head by ``MARGIN`` points, so
    the critic ranks the candidates by their worth (a random ranking would score as sampled BC does)."""
    sampled_bc = critic_run["eval/bc/sampled/normalized_score"]
    utterance = critic_run["eval/utterance/normalized_score"]
    assert utterance >= sampled_bc + MARGIN, (f"utterance {utterance:.1f} vs sampled bc {sampled_bc:.1f}: the "
                                              f"critic's choice should win by {MARGIN}")
