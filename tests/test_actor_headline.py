"""The actor-critic claim, reduced to fit CI: on the dialogue task, the KL-constrained actor beats the behaviour-
cloning policy it starts from, and stays near it.

The full experiment (``python scripts/reproduce.py dialogue``: bc, ilql, chai, utterance_iql, kl_actor, archer;
3 seeds) is in the README. Here two runs of ``configs/tasks/dialogue.yaml`` through ``scripts/train.py`` (in a
subprocess, as tests/test_headline.py does, and for its reason): first the utterance-level critic (expectile)
with its LM head cloning the data, for ``SOURCE_STEPS`` steps, whose ``bc`` policy plays every user once at the
end; then ``kl_actor`` started from it (``train.init_from``: the cloned head is both the actor's start and its
frozen reference), ``ACTOR_STEPS`` steps of policy gradient on its own sampled turns against the critic, whose
``actor`` policy (the LM head, sampled) plays every user once. The actor must beat the cloned policy by ``MARGIN``
normalised points, with a KL to it below ``MAX_KL`` nats per turn.
"""

import json
import os
import subprocess
import sys

from jaxrl_lm.config import REPO_ROOT

SOURCE_STEPS = 300
ACTOR_STEPS = 150
MARGIN = 15.0
MAX_KL = 10.0
CRITIC = ["utterance_q.expectile_tau=0.9", "utterance_q.cql_alpha=0", "utterance_q.max_turns=12"]


def train(*overrides):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    command = [sys.executable, "scripts/train.py", "--config", "configs/tasks/dialogue.yaml", "--no-progress",
               *overrides]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_kl_constrained_actor_beats_the_cloned_policy_it_starts_from(tmp_path):
    source, actor = tmp_path / "source", tmp_path / "actor"
    train("rl.objective=utterance_q", "utterance_q.backup=expectile", *CRITIC, f"train.steps={SOURCE_STEPS}",
          f"eval.every={SOURCE_STEPS}", "eval.policies=[bc]", f"train.out_dir={source}")
    train("rl.objective=kl_actor", *[c.replace("utterance_q.", "kl_actor.") for c in CRITIC],
          "kl_actor.candidates=4", "kl_actor.candidate_tokens=7", "kl_actor.kl_coef=0.05",
          "optim.learning_rate=3.0e-4", f"train.steps={ACTOR_STEPS}", f"eval.every={ACTOR_STEPS}",
          "eval.policies=[actor]", f"train.init_from={source}", f"train.out_dir={actor}")
    bc = json.loads((source / "final_metrics.json").read_text())["eval/bc/normalized_score"]
    final = json.loads((actor / "final_metrics.json").read_text())
    score, kl = final["eval/actor/normalized_score"], final["kl_to_reference"]
    assert score >= bc + MARGIN, f"actor {score:.1f} vs its reference bc {bc:.1f}: should win by {MARGIN}"
    assert 0.0 < kl < MAX_KL, f"KL to the reference {kl:.2f} nats per turn"
