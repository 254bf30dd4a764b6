"""Statistics of built-in tasks' offline data, and whether imitating the data greedily is already optimal.

    python scripts/data_stats.py                                   # the default table (docs/results/data_stats.md)
    python scripts/data_stats.py maze maze:legacy --episodes 3000 --seed 1
    python scripts/data_stats.py grid --markdown table.md --json stats.json

A task is ``NAME`` or ``NAME:BEHAVIOUR`` (one of the task's datasets, ``data.task_behaviour``); by default every
dataset of grid, maze, maze_po, wordle and twenty_questions. Its data is
``--episodes`` episodes drawn with ``--seed``: with the defaults (2000, 0), exactly the data ``configs/tasks/*.yaml``
train on. Per task, the data's success rate (episodes that reach the goal: ``jaxrl_lm.eval.is_success``), mean
length (actions per episode, within the data's step budget), mean return, and the normalisation anchors; then the
**count-based behaviour cloning** of the data, with no training: at each key (the latest observation where it is
the state or shows all the policy is given to read; the exact history so far otherwise) the data's action counts,
played under the evaluation protocol from every evaluation start,

- greedily (the most frequent action; ties: the one seen first), the policy a perfectly fitted BC model decodes
  at temperature 0, and
- sampled (an action drawn in proportion to its count), the BC model at temperature 1,

with success rate, mean return and normalised score (``jaxrl_lm.envs.normalize``) of each. A key the data never
shows gets the data's most frequent action overall (``fallback`` counts those decisions). ``argmax optimal`` is the
share of evaluation starts at which the greedy action is an optimal one (the reference policy, after it, still
gets the reference return), for tasks whose reference policy is optimal and deterministic (grid, maze, maze_po).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from jaxrl_lm import envs
from jaxrl_lm.envs.base import EpisodeRecord, Policy, Transcript
from jaxrl_lm.eval import is_success

DEFAULT_TASKS = ("grid", "maze", "maze_po", "wordle", "twenty_questions")  # each with every one of its datasets
# Tasks whose latest observation is what count-based cloning keys on: the whole state (grid, maze), or for
# maze_po all a policy that reads only the current observation sees (its history is not a state the data repeats).
OBSERVATION_KEYED = ("grid", "maze", "maze_po")
# Reference policies that are optimal (shortest paths), so "the greedy action is optimal" can be checked.
OPTIMAL_REFERENCE = ("grid", "maze", "maze_po")
SAMPLED_REPEATS = 8  # sampled cloning plays every evaluation start this many times (1 when there are over 1000)


def parse_task(text: str) -> tuple[str, str]:
    """``"maze:legacy"`` -> ``("maze", "legacy")``; ``"maze"`` -> ``("maze", "")`` (the task's own data)."""
    name, _, behaviour = text.partition(":")
    if name not in envs.task_names():
        raise ValueError(f"unknown task {name!r}; known: {envs.task_names()}")
    envs.get_task(name).with_behaviour(behaviour)  # an unknown behaviour raises here, naming the known ones
    return name, behaviour


def decision_key(turns: Sequence[str], key: str) -> str:
    """What count-based cloning conditions on: the latest observation (``key="observation"``) or the whole
    history so far (``"history"``), from the turn texts up to and including the observation acted on."""
    return turns[-1] if key == "observation" else "\n".join(turns)


def action_counts(episodes: Sequence[EpisodeRecord], key: str) -> dict[str, Counter]:
    """Per decision key, how often the data took each action (a Counter in first-seen order)."""
    counts: dict[str, Counter] = {}
    for episode in episodes:
        texts = [turn["text"] for turn in episode["turns"]]
        for i, turn in enumerate(episode["turns"]):
            if turn["role"] == "action":
                counts.setdefault(decision_key(texts[:i], key), Counter())[turn["text"]] += 1
    return counts


class CountPolicy:
    """Count-based behaviour cloning: ``greedy`` plays each key's most frequent data action (ties: first seen),
    otherwise an action is drawn in proportion to its count; an unseen key gets the most frequent action overall.
    ``decisions`` and ``fallbacks`` count the calls' decisions and the unseen keys among them."""

    def __init__(self, counts: dict[str, Counter], key: str, greedy: bool, seed: int = 0):
        self.counts, self.key, self.greedy = counts, key, greedy
        total: Counter = Counter()
        for counter in counts.values():
            total.update(counter)
        self.fallback = total.most_common(1)[0][0]
        self.rng = np.random.default_rng(seed)
        self.decisions = self.fallbacks = 0

    def action(self, turns: Sequence[str]) -> str:
        self.decisions += 1
        counter = self.counts.get(decision_key(turns, self.key))
        if counter is None:
            self.fallbacks += 1
            return self.fallback
        if self.greedy:
            return counter.most_common(1)[0][0]
        actions = list(counter)
        weights = np.array([counter[a] for a in actions], dtype=np.float64)
        return actions[self.rng.choice(len(actions), p=weights / weights.sum())]

    def __call__(self, transcripts: list[Transcript]) -> list[str]:
        return [self.action(t.turns) for t in transcripts]


def greedy_is_optimal(spec: envs.TaskSpec, policy: CountPolicy) -> float:
    """Share of the evaluation starts at which ``policy``'s action is optimal: the reference policy played after
    it still earns the return it earns from the start itself."""
    reference = spec.optimal()
    hits = 0
    for seed in range(spec.num_instances):
        env = spec.make_env()
        observation = env.reset(seed)
        action = policy.action([observation])
        after = copy.deepcopy(env)
        best, _ = _play(env, reference, observation, spec.eval_steps)
        _, reward, done = after.step(action)
        rest = 0.0 if done else _play(after, reference, None, spec.eval_steps - 1)[0]
        hits += bool(np.isclose(reward + rest, best))
    return hits / spec.num_instances


def _play(env: Any, act: Policy, observation: str | None, steps: int) -> tuple[float, bool]:
    """Return and done of ``act`` (a policy that reads only the live env) run on ``env`` for up to ``steps``."""
    total, done = 0.0, False
    for _ in range(steps):
        text = observation if observation is not None else ""
        _, reward, done = env.step(act([Transcript(text, env, 0, (text,))])[0])
        total += reward
        if done:
            break
    return total, done


def play_summary(spec: envs.TaskSpec, policy: Policy, repeats: int, anchors: envs.TaskStats) -> dict[str, float]:
    """Success rate, mean return and normalised score of ``policy`` under the evaluation protocol."""
    episodes = envs.evaluate(spec, policy, repeats=repeats)
    mean = envs.mean_return(episodes)
    return {"success": float(np.mean([is_success(e) for e in episodes])), "return": mean,
            "score": float(envs.normalize(mean, anchors))}


def task_stats(task: str, behaviour: str = "", episodes: int = 2000, seed: int = 0, key: str = "",
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The statistics of one task's data (module docstring) as a dict; ``key``: what count-based cloning keys on,
    ``"observation"`` or ``"history"`` ("" = the task's usual one, ``OBSERVATION_KEYED``)."""
    spec = envs.get_task(task).with_behaviour(behaviour)
    data, stats = envs.make_dataset(spec, episodes=episodes, seed=seed)
    anchors = envs.TaskStats.from_dict(stats)
    key = key or ("observation" if task in OBSERVATION_KEYED else "history")
    if key not in ("observation", "history"):
        raise ValueError(f"key must be 'observation' or 'history', got {key!r}")
    counts = action_counts(data, key)
    row: dict[str, Any] = {
        "task": task, "behaviour": spec.behaviour_name, "episodes": len(data), "seed": seed,
        "data_steps": spec.data_steps, "success": float(np.mean([is_success(e) for e in data])),
        "mean_length": float(np.mean([sum(t["role"] == "action" for t in e["turns"]) for e in data])),
        "mean_return": float(np.mean([e["meta"]["return"] for e in data])),
        "anchors": anchors.to_dict(), "anchor_source": stats["normalisation_source"]["dataset"],
        "key": key, "keys": len(counts),
    }
    greedy = CountPolicy(counts, key, greedy=True)
    row["greedy"] = play_summary(spec, greedy, 1, anchors)
    row["greedy"]["fallback"] = greedy.fallbacks / max(greedy.decisions, 1)
    row["greedy"]["argmax_optimal"] = greedy_is_optimal(spec, greedy) if task in OPTIMAL_REFERENCE else None
    sampled = CountPolicy(counts, key, greedy=False, seed=seed)
    repeats = SAMPLED_REPEATS if spec.num_instances <= 1000 else 1
    row["sampled"] = play_summary(spec, sampled, repeats, anchors)
    row["sampled"]["fallback"] = sampled.fallbacks / max(sampled.decisions, 1)
    if progress is not None:
        progress(f"{task}:{spec.behaviour_name} done")
    return row


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One table row per task."""
    head = ("| task | data | episodes | success | mean length (budget) | mean return | 50 mark | key | "
            "argmax optimal | greedy BC success | greedy BC return | greedy BC score | greedy fallback | "
            "sampled BC success | sampled BC score |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        g, s = r["greedy"], r["sampled"]
        optimal = "n/a" if g["argmax_optimal"] is None else f"{g['argmax_optimal']:.0%}"
        lines.append(
            f"| {r['task']} | {r['behaviour']} | {r['episodes']} | {r['success']:.3f} | {r['mean_length']:.1f} "
            f"({r['data_steps']}) | {r['mean_return']:.2f} | {r['anchors']['dataset']:.2f} | {r['key']} | {optimal} | "
            f"{g['success']:.3f} | {g['return']:.2f} | {g['score']:.1f} | {g['fallback']:.0%} | {s['success']:.3f} | "
            f"{s['score']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", nargs="*", help="NAME or NAME:BEHAVIOUR (default: every dataset of "
                        f"{', '.join(DEFAULT_TASKS)})")
    parser.add_argument("--episodes", type=int, default=2000, help="episodes of data per task (data.task_episodes)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (data.seed)")
    parser.add_argument("--history", action="store_true", help="key count-based cloning on the exact history "
                        "for every task (default: the latest observation for grid, maze and maze_po)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--json", type=Path, help="also write every statistic to this JSON file")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    names = args.tasks or [f"{name}:{behaviour}" for name in DEFAULT_TASKS
                           for behaviour in envs.get_task(name).behaviour_names]
    try:
        tasks = [parse_task(t) for t in names]
    except ValueError as e:
        parser.error(str(e))
    rows = [task_stats(name, behaviour, args.episodes, args.seed, "history" if args.history else "",
                       lambda m: print(m, file=sys.stderr))
            for name, behaviour in tasks]
    table = markdown(rows)
    print(table, end="")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table, encoding="utf-8")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
