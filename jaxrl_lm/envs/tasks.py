"""Task specs: an env plus its behaviour policy, reference policy, step budgets and normalisation anchors.

Every built-in task registers a :class:`TaskSpec`; :func:`make_dataset` turns one into an offline JSONL dataset
and the stats that normalise scores on it, :func:`evaluate` runs any policy over the task's evaluation seeds.

Seeds: ``reset(seed)`` picks start / secret number ``seed % num_instances``, so the evaluation seeds
``0 .. num_instances - 1`` visit every start cell, hidden word or hidden object exactly once and the reference
policy's mean return over them is exact, not a sample.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from jaxrl_lm.config import DataConfig
from jaxrl_lm.data.loader import TASK_PREFIX  # data.path: task:NAME names a built-in task's offline data
from jaxrl_lm.data.episodes import read_jsonl
from jaxrl_lm.envs.base import Env, EpisodeRecord, Policy, legal_actions, register_env, rollout
from jaxrl_lm.envs.normalize import TaskStats

# Dataset anchors: the 50 mark is the dataset's mean return, unless the dataset's episodes are not whole
# evaluation episodes (grid stitching: short truncated walks), where it is the behaviour policy run under the
# evaluation protocol.
ANCHOR_DATASET = "dataset"
ANCHOR_BEHAVIOUR = "behaviour"


@dataclass(frozen=True)
class DataRecipe:
    """A named alternative to a task's own dataset settings (``TaskSpec.other_behaviours``); the fields mean
    what the ``TaskSpec`` fields of the same names mean."""

    behaviour: Callable[[int], Policy]
    data_steps: int
    data_min_steps: Optional[int] = None
    anchor: str = ANCHOR_DATASET


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to generate data for a task and score policies on it.

    Attributes:
      name: task name, used in episode ids and ``meta["task"]``.
      make_env: builds a fresh env.
      behaviour: ``behaviour(seed)`` builds the data-writing policy, random choices drawn from ``seed``.
      optimal: builds the scripted reference policy that defines the 100 mark.
      data_steps: step budget of a dataset episode (truncated past it); with ``data_min_steps``, the largest.
      data_min_steps: when set, each dataset episode's budget is drawn uniformly from ``data_min_steps ..
        data_steps`` (grid: walks of varied length, so that a walk's last state, where it bootstraps, is a state
        at which other, longer walks act, and the value there is trained).
      eval_steps: step budget of an evaluation episode.
      worst_return: lowest return possible within ``eval_steps`` (the 0 mark).
      anchor: ``"dataset"`` or ``"behaviour"``; where the 50 mark comes from (see module constants).
      context_turns: most recent turns an evaluated model policy reads (``load_policy(max_turns=...)``); None =
        as many as fit its context. Set when evaluation episodes outlast the dataset's, so that a model never
        reads a longer history (positions it never trained on) than the data showed it.
      behaviour_name: the name of the data that ``behaviour``, ``data_steps``, ``data_min_steps`` and ``anchor``
        write (``data.task_behaviour``; "" there names this one).
      other_behaviours: other datasets of the task by name (the maze keeps its earlier data as ``legacy``);
        :meth:`with_behaviour` picks one.
    """

    name: str
    make_env: Callable[[], Env]
    behaviour: Callable[[int], Policy]
    optimal: Callable[[], Policy]
    data_steps: int
    eval_steps: int
    worst_return: float
    anchor: str = ANCHOR_DATASET
    context_turns: Optional[int] = None
    data_min_steps: Optional[int] = None
    behaviour_name: str = "default"
    other_behaviours: Mapping[str, DataRecipe] = dataclasses.field(default_factory=dict, compare=False)

    @functools.cached_property
    def num_instances(self) -> int:
        """Number of distinct starts / secrets (the env's ``num_instances``); evaluation seeds are
        ``range(num_instances)``. Read lazily so that registering a task loads no data."""
        return int(self.make_env().num_instances)

    @functools.cached_property
    def optimal_return(self) -> float:
        """Mean return of the reference policy over every evaluation seed: exact, computed once per spec."""
        return mean_return(evaluate(self, self.optimal()))

    def __post_init__(self) -> None:
        if self.anchor not in (ANCHOR_DATASET, ANCHOR_BEHAVIOUR):
            raise ValueError(f"TaskSpec {self.name!r}: anchor must be 'dataset' or 'behaviour', got {self.anchor!r}")
        if self.behaviour_name in self.other_behaviours or not self.behaviour_name:
            raise ValueError(f"TaskSpec {self.name!r}: behaviour_name {self.behaviour_name!r} must be non-empty "
                             f"and not also in other_behaviours")

    @property
    def behaviour_names(self) -> list[str]:
        """Names of the task's datasets, its own first."""
        return [self.behaviour_name, *self.other_behaviours]

    def with_behaviour(self, name: str) -> "TaskSpec":
        """This task with the dataset settings called ``name`` ("" or ``behaviour_name``: this spec itself)."""
        if name in ("", self.behaviour_name):
            return self
        if name not in self.other_behaviours:
            raise ValueError(f"task {self.name!r} has no behaviour {name!r} (data.task_behaviour); "
                             f"known: {self.behaviour_names}")
        recipe = self.other_behaviours[name]
        others = {self.behaviour_name: DataRecipe(self.behaviour, self.data_steps, self.data_min_steps, self.anchor),
                  **{k: v for k, v in self.other_behaviours.items() if k != name}}
        return dataclasses.replace(self, behaviour=recipe.behaviour, data_steps=recipe.data_steps,
                                   data_min_steps=recipe.data_min_steps, anchor=recipe.anchor, behaviour_name=name,
                                   other_behaviours=others)


_TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, overwrite: bool = False) -> None:
    """Add a task to the table that :func:`get_task` and ``scripts/generate_task_data.py`` read, and its env to the
    env registry under the same name (``make_env(spec.name)``)."""
    if spec.name in _TASKS and not overwrite:
        raise ValueError(f"register_task: {spec.name!r} is already registered; pass overwrite=True to replace it")
    register_env(spec.name, spec.make_env, overwrite=overwrite)
    _TASKS[spec.name] = spec


def get_task(name: str) -> TaskSpec:
    """The registered task called ``name``."""
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; registered: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def task_names() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_TASKS)


def _as_spec(task: str | TaskSpec) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else get_task(task)


def run_policy(
    task: str | TaskSpec,
    act: Policy,
    seeds: list[int],
    max_steps: int | Sequence[int],
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[EpisodeRecord]:
    """Roll ``act`` out on the task for each seed, ``batch_size`` episodes at a time; ids number from 0.
    ``max_steps``: one step budget for all episodes, or one per seed.

    ``progress(n)``, when given, is called after each batch with the number of episodes it finished.
    """
    spec = _as_spec(task)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    envs = [spec.make_env() for _ in range(min(batch_size, len(seeds)))]
    episodes: list[EpisodeRecord] = []
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start : start + batch_size])
        budgets = max_steps if isinstance(max_steps, int) else list(max_steps[start : start + batch_size])
        episodes += rollout(envs[: len(chunk)], act, chunk, budgets, spec.name, first_id=start)
        if progress is not None:
            progress(len(chunk))
    return episodes


def evaluate(task: str | TaskSpec, act: Policy, repeats: int = 1, batch_size: int = 64) -> list[EpisodeRecord]:
    """Episodes of ``act`` from every evaluation seed (``repeats`` times each) under the evaluation budget."""
    spec = _as_spec(task)
    seeds = [i + spec.num_instances * r for r in range(repeats) for i in range(spec.num_instances)]
    return run_policy(spec, act, seeds, spec.eval_steps, batch_size)


def mean_return(episodes: list[EpisodeRecord]) -> float:
    """Mean of ``meta["return"]`` over episode records."""
    if not episodes:
        raise ValueError("mean_return of no episodes")
    return float(np.mean([episode["meta"]["return"] for episode in episodes]))


def optimal_return(task: str | TaskSpec) -> float:
    """Mean return of the task's reference policy over all evaluation seeds (the 100 mark)."""
    return _as_spec(task).optimal_return


def behaviour_return(task: str | TaskSpec, seed: int, repeats: int = 8, behaviour: str = "") -> float:
    """Mean return of the behaviour policy under the evaluation protocol, ``repeats`` runs per start;
    ``behaviour``: which of the task's datasets' ("" = its own)."""
    spec = _as_spec(task).with_behaviour(behaviour)
    return mean_return(evaluate(spec, spec.behaviour(seed), repeats=repeats))


def make_dataset(
    task: str | TaskSpec,
    episodes: int,
    seed: int,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    behaviour: str = "",
) -> tuple[list[EpisodeRecord], dict]:
    """Offline dataset of ``episodes`` behaviour episodes and its stats (same seed, same data).
    ``behaviour`` names one of the task's datasets (``TaskSpec.with_behaviour``; "" = its own).

    Returns:
      (episode records, stats) where stats holds the dataset's return summary and, under ``"normalisation"``,
      the worst / dataset / optimal returns that :func:`jaxrl_lm.envs.normalize.normalize` reads.
    """
    spec = _as_spec(task).with_behaviour(behaviour)
    if episodes < 1:
        raise ValueError(f"make_dataset: episodes must be >= 1, got {episodes}")
    rng = np.random.default_rng(seed)
    env_seeds = rng.integers(0, 2**31 - 1, size=episodes).tolist()
    policy_seed = int(rng.integers(0, 2**31 - 1))
    budgets = spec.data_steps
    if spec.data_min_steps is not None:  # drawn after the seeds above, so fixed-budget tasks' data is unchanged
        budgets = rng.integers(spec.data_min_steps, spec.data_steps + 1, size=episodes).tolist()
    data = run_policy(spec, spec.behaviour(policy_seed), env_seeds, budgets, batch_size, progress)
    return data, dataset_stats(spec, data, seed)


def dataset_stats(task: str | TaskSpec, episodes: list[EpisodeRecord], seed: int) -> dict:
    """Return summary of a dataset plus the normalisation anchors of its task (a spec from ``with_behaviour``
    for another of its datasets)."""
    spec = _as_spec(task)
    returns = np.array([episode["meta"]["return"] for episode in episodes], dtype=np.float64)
    if spec.anchor == ANCHOR_DATASET:
        reference = float(returns.mean())
        source = "mean return of the dataset"
    else:
        reference = behaviour_return(spec, seed)
        source = "behaviour policy over every evaluation start, 8 runs each, under the evaluation step budget"
    anchors = TaskStats(worst=spec.worst_return, dataset=reference, optimal=spec.optimal_return)
    return {
        "task": spec.name,
        "behaviour": spec.behaviour_name,
        "episodes": len(episodes),
        "seed": seed,
        "dataset": {
            "mean_return": float(returns.mean()),
            "min_return": float(returns.min()),
            "max_return": float(returns.max()),
            "done_fraction": float(np.mean([episode["done"] for episode in episodes])),
            "data_steps": spec.data_steps,
        },
        "normalisation": anchors.to_dict(),
        "normalisation_source": {
            "worst": f"lowest possible return within {spec.eval_steps} steps",
            "dataset": source,
            "optimal": f"reference policy over all {spec.num_instances} evaluation starts",
        },
        "eval_steps": spec.eval_steps,
        "num_instances": spec.num_instances,
    }


def task_dataset(data_cfg: DataConfig) -> list[EpisodeRecord]:
    """The offline dataset of ``data.path: task:NAME``: ``data.task_episodes`` episodes of ``data.task_behaviour``
    drawn with ``data.seed``.

    The entry points that build a loader resolve such a path with this (``jaxrl_lm.experiments.run``), so the
    data pipeline never imports the environments.
    """
    if not data_cfg.path.startswith(TASK_PREFIX):
        raise ValueError(f"data.path {data_cfg.path!r} is not a built-in task (task:NAME)")
    name = data_cfg.path[len(TASK_PREFIX):]
    if name not in task_names():
        raise ValueError(f"data.path: unknown built-in task {name!r}; known: {task_names()}")
    episodes, _ = make_dataset(name, episodes=data_cfg.task_episodes, seed=data_cfg.seed,
                               behaviour=data_cfg.task_behaviour)
    return episodes


def vocabulary_texts(data_cfg: DataConfig) -> list[str]:
    """Every distinct turn text of the run's data, and for a built-in task the texts its env can say or accept:
    the first observations of every start and the legal actions (``legal_actions()``) there, sorted.

    What a vocabulary trimmed for the run must tokenize as the full one does (``scripts/import_hf.py
    --trim-vocab``, ``jaxrl_lm.data.vocab_trim``). ``data.path`` is ``task:NAME`` or a JSONL file.
    """
    if data_cfg.path.startswith(TASK_PREFIX):
        episodes = task_dataset(data_cfg)
        texts = {turn["text"] for episode in episodes for turn in episode["turns"]}
        spec = get_task(data_cfg.path[len(TASK_PREFIX):])
        env = spec.make_env()
        for seed in range(spec.num_instances):
            texts.add(env.reset(seed))
            texts.update(legal_actions(env) or ())
    else:
        episodes, _ = read_jsonl(data_cfg.path)
        texts = {turn.text for episode in episodes for turn in episode.turns}
    return sorted(texts)
