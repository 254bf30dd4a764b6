"""Batched rollouts of a policy on a task -> mean return, normalised score, 95% interval, success rate.

    result = evaluate_policy(policy, "maze", episodes=50, task_stats=stats)
    result = evaluate_params(cfg, params, "maze", kind="ilql", beta=4.0)   # from the training loop
    write_report([result], "runs/maze/eval", "maze_ilql")                   # .md table + .json

Episodes run through ``jaxrl_lm.envs.run_policy`` under the task's evaluation step budget, ``batch_size`` at a
time (the policy decodes all running episodes of a batch together). Seeds: by default every evaluation start
once (``envs.evaluate``'s protocol, exact for deterministic policies); ``episodes=N`` uses N seeds spread evenly
over the starts (cycling through them when N exceeds their number).

The interval is Student's t 95% interval of the mean return over episodes (normalised the same way: the
normalisation is monotone and piecewise linear, so the interval's ends are normalised separately).

Legal actions (``legality=True``; off by default, and then evaluation costs what it always did): on a task whose
env exposes its legal action texts (``legal_actions()``, ``jaxrl_lm.envs.base``), ``legal_rate`` is the fraction
of agent turns whose action text is exactly one of them, over ``legal_turns`` turns. For a ``ModelPolicy`` that
is not already held to a set, the same policy is then rolled out again held to the env's sets (a token-trie mask
while decoding, ``jaxrl_lm.model_policy``) and that run's summary is under ``"constrained"``: its return and
score with every action legal (its ``legal_rate`` is 1 unless the constraint failed). A task without sets gets
neither field and no second run.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import scipy.stats

from jaxrl_lm import envs
from jaxrl_lm.config import DECODINGS, Config, ModelConfig, eval_task
from jaxrl_lm.data.episodes import EpisodeRecord
from jaxrl_lm.envs.base import transcript_legal_actions
from jaxrl_lm.envs.normalize import TaskStats
from jaxrl_lm.envs.tasks import TaskSpec, get_task
from jaxrl_lm.models import Params
from jaxrl_lm.model_policy import ModelPolicy, describe, load_policy


def is_success(episode: EpisodeRecord) -> bool:
    """The episode really ended (``done``) on an unpenalised move: in every built-in task the move that reaches
    the goal (solves the word, names the object) is the only ending move that earns 0, and a lost game's last
    move costs -1."""
    actions = [t for t in episode["turns"] if t["role"] == "action"]
    return bool(episode["done"]) and bool(actions) and actions[-1]["reward"] >= 0


def eval_seeds(spec: TaskSpec, episodes: Optional[int]) -> list[int]:
    """Evaluation seeds (module docstring); seed ``s`` starts the env at start ``s % num_instances``."""
    n = spec.num_instances
    if episodes is None:
        return list(range(n))
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    return [i * n // episodes for i in range(episodes)] if episodes <= n else list(range(episodes))


def mean_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean. ``[n] -> (low, high)``; NaN for a single value."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    half = scipy.stats.t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return float(values.mean() - half), float(values.mean() + half)


def summarize(episodes: Sequence[EpisodeRecord], task_stats: Optional[TaskStats | Mapping[str, Any]] = None,
              success: Callable[[EpisodeRecord], bool] = is_success) -> dict[str, Any]:
    """Return statistics of episode records; the normalised fields need ``task_stats``."""
    returns = np.array([e["meta"]["return"] for e in episodes], np.float64)
    low, high = mean_interval(returns)
    out: dict[str, Any] = {
        "episodes": len(returns),
        "mean_return": float(returns.mean()),
        "return_ci95": [low, high],
        "success_rate": float(np.mean([success(e) for e in episodes])),
        "mean_steps": float(np.mean([sum(t["role"] == "action" for t in e["turns"]) for e in episodes])),
    }
    if task_stats is not None:
        out["normalized_score"] = _normalize(out["mean_return"], task_stats)
        out["normalized_ci95"] = [_normalize(low, task_stats), _normalize(high, task_stats)]
    return out


def _normalize(value: float, task_stats: TaskStats | Mapping[str, Any]) -> float:
    return float(envs.normalize(value, task_stats)) if math.isfinite(value) else math.nan


@functools.lru_cache(maxsize=None)
def _generated_task_stats(task: str, episodes: int, seed: int, behaviour: str = "") -> TaskStats:
    return TaskStats.from_dict(envs.make_dataset(task, episodes=episodes, seed=seed, behaviour=behaviour)[1])


def load_task_stats(task: str, cfg: Optional[Config] = None, stats_file: Optional[str | Path] = None) -> TaskStats:
    """The normalisation anchors of ``task`` (worst, dataset, optimal returns).

    From ``stats_file`` (``scripts/generate_task_data.py``'s ``*.stats.json``) when given; else from the dataset
    ``cfg`` trained on: the stats file beside a JSONL ``data.path``, or, for ``data.path: task:NAME``, the
    same in-memory dataset regenerated (``data.task_episodes``, ``data.seed``, ``data.task_behaviour``; cached per
    process). Without either, the anchors of a 1000-episode seed-0 dataset (``generate_task_data.py``'s defaults).
    """
    if stats_file is not None:
        return TaskStats.from_dict(json.loads(Path(stats_file).read_text()))
    if cfg is not None and cfg.data.path.endswith(".jsonl"):
        beside = Path(cfg.data.path).with_suffix(".stats.json")
        if beside.is_file():
            return load_task_stats(task, stats_file=beside)
    if cfg is not None and cfg.data.path == f"task:{task}":
        return _generated_task_stats(task, cfg.data.task_episodes, cfg.data.seed, cfg.data.task_behaviour)
    return _generated_task_stats(task, 1000, 0)


class LegalityCounter:
    """Wraps a policy; counts the agent turns whose env exposed legal action texts (``turns``) and how many of
    those turns' actions were exactly one of them (``legal``)."""

    def __init__(self, act: Callable[[list[str]], list[str]]):
        self.act, self.turns, self.legal = act, 0, 0
        self._sets: dict[int, tuple[Any, frozenset[str]]] = {}  # id(set) -> (set, frozenset): Wordle's 12 972
        #                                                          words are hashed once, not once per turn

    def __call__(self, transcripts: list[str]) -> list[str]:
        legal_sets = [transcript_legal_actions(t) for t in transcripts]  # before acting: the state acted in
        actions = self.act(transcripts)
        if isinstance(actions, (list, tuple)) and len(actions) == len(transcripts):  # else rollout reports it
            for legal, action in zip(legal_sets, actions):
                if legal is not None:
                    self.turns += 1
                    self.legal += isinstance(action, str) and action in self._as_set(legal)
        return actions

    def _as_set(self, legal: Sequence[str]) -> frozenset[str]:
        hit = self._sets.get(id(legal))
        if hit is None or hit[0] is not legal:
            if len(self._sets) >= 256:  # chess: a new tuple every position
                self._sets.clear()
            hit = self._sets[id(legal)] = (legal, frozenset(legal))
        return hit[1]


def evaluate_policy(act: Callable[[list[str]], list[str]], task: str | TaskSpec, *, episodes: Optional[int] = None,
                    task_stats: Optional[TaskStats | Mapping[str, Any]] = None, batch_size: int = 64,
                    success: Callable[[EpisodeRecord], bool] = is_success, legality: bool = False) -> dict[str, Any]:
    """Rolls ``act`` out on ``task`` (module docstring) and summarises; adds ``task``, ``seconds`` and, for a
    ``ModelPolicy``, its knobs under ``"policy"``. The episode records are under ``"records"``.

    ``legality``: also report ``legal_rate`` / ``legal_turns`` and, for an unconstrained ``ModelPolicy``, the
    ``"constrained"`` run (module docstring), when the task's env exposes legal actions.
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    counter = LegalityCounter(act) if legality else None
    t0 = time.perf_counter()
    records = envs.run_policy(spec, counter or act, eval_seeds(spec, episodes), spec.eval_steps, batch_size)
    result = {"task": spec.name, **summarize(records, task_stats, success), "seconds": time.perf_counter() - t0}
    if isinstance(act, ModelPolicy):
        result["policy"] = describe(act)
    if counter is not None and counter.turns:
        result["legal_rate"] = counter.legal / counter.turns
        result["legal_turns"] = counter.turns
        if isinstance(act, ModelPolicy) and act.actions is None:
            constrained = evaluate_policy(act.with_actions(transcript_legal_actions), spec, episodes=episodes,
                                          task_stats=task_stats, batch_size=batch_size, success=success,
                                          legality=True)
            result["constrained"] = {k: v for k, v in constrained.items() if k not in ("task", "policy", "records")}
    result["records"] = records
    return result


def evaluate_params(cfg: Config | ModelConfig, params: Params, task: str, *, episodes: Optional[int] = None,
                    task_stats: Optional[TaskStats | Mapping[str, Any]] = None, batch_size: int = 64,
                    legality: bool = False, **policy_kw: Any) -> dict[str, Any]:
    """``evaluate_policy`` of ``load_policy(params, cfg=cfg, **policy_kw)`` (kind, beta, temperature, ...), for
    calling every N training steps: the decoder is compiled once per shape and reused by later calls.

    ``task_stats`` defaults to ``load_task_stats(task, cfg)`` when ``cfg`` is a full ``Config``; the normalised
    fields are left out for a bare ``ModelConfig`` without stats. ``max_turns`` defaults to the task's
    ``context_turns``. ``legality``: as in ``evaluate_policy``.
    """
    if task_stats is None and isinstance(cfg, Config):
        task_stats = load_task_stats(task, cfg)
    policy_kw.setdefault("max_turns", get_task(task).context_turns)
    policy = load_policy(params, cfg=cfg, **policy_kw)
    return evaluate_policy(policy, task, episodes=episodes, task_stats=task_stats, batch_size=batch_size,
                           legality=legality)


# Summary fields logged as eval/<policy>/<decoding>/<field> during training (jaxrl_lm.train.loop), and as
# eval/<policy>/<field> from the better decoding (best_of_decodings).
TRAINING_FIELDS = ("normalized_score", "mean_return", "success_rate", "mean_steps")


def decoding_of(policy: Mapping[str, Any]) -> str:
    """``"greedy"`` or ``"sampled"``: how a described policy (``describe``) decodes. The utterance policy always
    samples its candidates, so it is ``"sampled"`` (its choice among them is the argmax of Q)."""
    return "sampled" if policy["temperature"] > 0 else "greedy"


def evaluate_training_policies(cfg: Config, params: Params, *, seed: int = 0) -> list[dict[str, Any]]:
    """Evaluates ``params`` as each policy of ``cfg.eval.policies`` on ``eval_task(cfg)``, once per decoding of
    ``cfg.eval.decodings`` (greedy: temperature 0; sampled: ``eval.temperature``), with the ``eval`` section's
    other knobs (what the training loop runs every ``eval.every`` steps; ``eval.legal_actions`` decodes only the
    env's legal actions). The utterance policy chooses among sampled candidates, so it is evaluated once (its
    ``"sampled"`` row) whatever the decodings. One result per policy and decoding, policy-major, each with
    ``"records"`` removed, ``"policy"`` describing its knobs and ``"decoding"`` naming the decoding."""
    e = cfg.eval
    task = eval_task(cfg)
    results = []
    for kind in e.policies:
        # The utterance policy samples its candidates (eval.candidate_temperature) and picks the best by Q.
        runs = [dict(best_of=e.candidates, temperature=e.candidate_temperature,
                     greedy_candidate=e.greedy_candidate)] if kind == "utterance" else \
            [dict(temperature=0.0 if d == "greedy" else e.temperature) for d in e.decodings]
        for knobs in runs:
            if e.legal_actions:  # constrained decoding: each turn is one of the env's legal actions
                knobs["actions"] = transcript_legal_actions
            result = evaluate_params(cfg, params, task, episodes=e.episodes or None, batch_size=e.batch_size,
                                     kind=kind, beta=e.beta, max_new_tokens=e.max_new_tokens, seed=seed, **knobs)
            result.pop("records")
            result["decoding"] = decoding_of(result["policy"])
            results.append(result)
    return results


def result_score(result: Mapping[str, Any]) -> float:
    """The number results are ranked by: the normalised score, else the mean return."""
    return float(result.get("normalized_score", result["mean_return"]))


def best_of_decodings(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` (``eval/<policy>/<decoding>/<field>``) with ``eval/<policy>/<field>`` added from each policy's
    better decoding (higher normalised score, else mean return; greedy on a tie) and
    ``eval/<policy>/best_is_greedy`` (1.0 or 0.0). A method "beats BC" only against BC's better decoding, and
    this is the number that says so. For a stack of seeds, average the per-decoding metrics first: the decoding
    is chosen by the mean, not seed by seed."""
    out = dict(metrics)
    per_policy: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "eval" and parts[2] in DECODINGS:
            per_policy.setdefault(parts[1], {}).setdefault(parts[2], {})[parts[3]] = value
    for kind, decodings in per_policy.items():
        def rank(d: str) -> tuple[float, bool]:
            fields = decodings[d]
            return fields.get("normalized_score", fields.get("mean_return", -math.inf)), d == "greedy"
        best = max(decodings, key=rank)
        out.update({f"eval/{kind}/{field}": value for field, value in decodings[best].items()})
        out[f"eval/{kind}/best_is_greedy"] = float(best == "greedy")
    return out


def training_metrics(results: Sequence[Mapping[str, Any]], *, best: bool = True) -> dict[str, float]:
    """``{"eval/<policy>/<decoding>/<field>": value}`` for TensorBoard, metrics.jsonl and keep-best ranking,
    with the better decoding's ``eval/<policy>/<field>`` (``best_of_decodings``) unless ``best`` is False."""
    metrics = {f"eval/{r['policy']['kind']}/{r.get('decoding', decoding_of(r['policy']))}/{field}": float(r[field])
               for r in results for field in TRAINING_FIELDS if field in r}
    return best_of_decodings(metrics) if best else metrics


_COLUMNS = (("task", "task", "{}"), ("policy", "policy", "{}"), ("episodes", "episodes", "{}"),
            ("mean return", "mean_return", "{:.3f}"), ("return 95% CI", "return_ci95", "[{:.3f}, {:.3f}]"),
            ("normalised", "normalized_score", "{:.1f}"), ("normalised 95% CI", "normalized_ci95", "[{:.1f}, {:.1f}]"),
            ("success", "success_rate", "{:.1%}"))
# Added when a result reports legality (evaluate_policy(..., legality=True)); "constrained." reads that sub-dict.
_LEGALITY_COLUMNS = (("legal", "legal_rate", "{:.1%}"), ("legal-only return", "constrained.mean_return", "{:.3f}"),
                     ("legal-only normalised", "constrained.normalized_score", "{:.1f}"),
                     ("legal-only success", "constrained.success_rate", "{:.1%}"))


def _policy_label(result: Mapping[str, Any]) -> str:
    p = result.get("policy")
    if p is None:
        return "-"
    label = p["kind"] + (f" beta={p['beta']:g}" if p["kind"] == "ilql" else "")
    label += " greedy" if p["temperature"] == 0 else f" T={p['temperature']:g}"
    label += f" top-k={p['top_k']}" if p["top_k"] else ""
    label += f" top-p={p['top_p']:g}" if p["top_p"] < 1 else ""
    label += " legal-only" if p.get("actions") else ""
    label += f" best-of-{p['best_of']}" if p["best_of"] > 1 else ""
    return label + (" +greedy" if p.get("greedy_candidate") else "")


def _cell(result: Mapping[str, Any], key: str, fmt: str) -> str:
    if key == "policy":
        return _policy_label(result)
    if key.startswith("constrained."):
        result, key = result.get("constrained") or {}, key.split(".", 1)[1]
    value = result.get(key)
    if value is None:
        return "-"
    return fmt.format(*value) if isinstance(value, (list, tuple)) else fmt.format(value)


def markdown_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per evaluation result (with the legality columns when any result reports legality)."""
    columns = _COLUMNS + (_LEGALITY_COLUMNS if any("legal_rate" in r for r in results) else ())
    lines = ["| " + " | ".join(name for name, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, key, fmt) for _, key, fmt in columns) + " |" for r in results]
    return "\n".join(lines) + "\n"


def write_report(results: Sequence[Mapping[str, Any]], out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Writes ``out_dir/name.md`` (the table) and ``out_dir/name.json`` (every field; episode records in
    ``out_dir/name.episodes.jsonl``). Returns the two paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md.write_text(markdown_table(results), encoding="utf-8")
    js.write_text(json.dumps([{k: v for k, v in r.items() if k != "records"} for r in results], indent=2) + "\n",
                  encoding="utf-8")
    envs.write_jsonl(out_dir / f"{name}.episodes.jsonl", [e for r in results for e in r.get("records", [])])
    return md, js
