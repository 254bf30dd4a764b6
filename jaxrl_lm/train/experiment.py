"""Experiments: train every method of a task over several seeds, evaluate them as they train, tabulate and plot.

    python scripts/reproduce.py grid                   # configs/reproduce/grid.yaml -> runs/reproduce/grid

An experiment file (YAML) names a training config, the seeds, and the methods, each a set of dotted overrides
of that config plus the policy extraction that scores it::

    config: ../tasks/grid.yaml        # relative to the experiment file
    seeds: [0, 1, 2]                  # train.seed of each run; the dataset (data.seed) is the same for all
    methods:
      bc:   {policy: bc,   overrides: {rl.lambda_q: 0, rl.lambda_v: 0, rl.cql_alpha: 0}}
      ilql: {policy: ilql, overrides: {rl.backup: expectile}}

``include: other.yaml`` (relative to the file) starts from another experiment file, whose keys this file's own
replace: ``include: maze.yaml`` with ``config: ../tasks/maze_po.yaml`` runs the maze's methods on another task.

All seeds of a method train side by side in one compiled update (``jaxrl_lm.train.seeds.train_seeds``: the
update under ``jax.vmap``, every seed reading the same batches), and every ``eval.every`` steps and at the end
each seed's parameters play the task with the method's policy, which gives the learning curves (normalised
score against steps). The final score of a seed is its last evaluation. Outputs in the output directory:
``<method>/result.json`` per method (its curves, final scores and training-metric history; a method whose file
exists is not retrained), ``results.json`` (all of them), ``results.md`` (the table: mean, standard deviation,
minimum and maximum over seeds, and each seed's score) and ``learning_curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import yaml

from jaxrl_lm.config import Config, ConfigError, load_config
from jaxrl_lm.rl.policy import KINDS


@dataclasses.dataclass(frozen=True)
class Method:
    """One line of the table: ``overrides`` of the experiment's config, scored with the ``policy`` extraction."""

    name: str
    policy: str
    overrides: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A parsed experiment file (module docstring)."""

    name: str
    config: Path
    seeds: tuple[int, ...]
    methods: tuple[Method, ...]
    overrides: dict[str, Any]  # applied to every method (e.g. from the command line), after the method's own


def load_experiment(path: str | Path, overrides: Optional[Mapping[str, Any]] = None) -> Experiment:
    """Reads and checks an experiment file; every error names the file and the field."""
    path = Path(path)
    raw = _read_experiment(path)
    missing = [key for key in ("config", "methods") if key not in raw]
    if missing:
        raise ConfigError(f"{path}: an experiment needs {missing} (here or in a file it includes)")
    seeds = tuple(raw.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers, got {raw.get('seeds')!r}")
    methods = []
    for name, m in raw["methods"].items():
        if not isinstance(m, dict) or set(m) - {"policy", "overrides"} or m.get("policy") not in KINDS:
            raise ConfigError(f"{path}: methods.{name} needs policy (one of {list(KINDS)}) and optional overrides")
        methods.append(Method(name, m["policy"], dict(m.get("overrides") or {})))
    return Experiment(name=path.stem, config=raw["config"], seeds=seeds,
                      methods=tuple(methods), overrides=dict(overrides or {}))


def _read_experiment(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's keys over those of the file it includes; ``config`` resolved against the file that names it."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: include cycle through {[str(p) for p in seen]}")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        where = f" (included by {seen[-1]})" if seen else ""
        raise FileNotFoundError(f"experiment file {path} does not exist{where} (see configs/reproduce/)") from None
    if not isinstance(raw, dict) or set(raw) - {"include", "config", "seeds", "methods"}:
        raise ConfigError(f"{path}: an experiment has the keys include, config, seeds, methods; got "
                          f"{sorted(raw or {})}")
    if "config" in raw:
        raw["config"] = (path.parent / raw["config"]).resolve()
    base = _read_experiment(path.parent / raw.pop("include"), (*seen, path.resolve())) if "include" in raw else {}
    return {**base, **raw}


def method_config(exp: Experiment, method: Method, out_dir: Path) -> Config:
    """The training config of a method: the experiment's config, the method's overrides, the common overrides,
    then the method's directory and its policy as the one evaluated."""
    cfg = load_config(exp.config, **_keywords({**method.overrides, **exp.overrides, "eval.policies": [method.policy],
                                               "train.out_dir": str(out_dir / method.name)}))
    if not cfg.eval.every:
        raise ConfigError(f"{exp.config}: eval.every must be set for an experiment (its learning curves)")
    return cfg


def _keywords(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"rl.backup": v}`` -> ``{"rl__backup": v}`` (``load_config``'s keyword form)."""
    return {k.replace(".", "__"): v for k, v in dotted.items()}


def train_method(cfg: Config, method: Method, seeds: Sequence[int], progress: bool = True) -> dict[str, Any]:
    """Trains ``seeds`` of one method together and evaluates them as they train; the method's result dict."""
    from jaxrl_lm.eval import evaluate_training_policies  # heavy imports only when an experiment really runs
    from jaxrl_lm.train.seeds import train_seeds, unstack

    curves: dict[int, list[tuple[int, float]]] = {s: [] for s in seeds}

    def evaluate(step: int, states: Any) -> None:
        for seed, params in zip(seeds, unstack(states.params)):
            (r,) = evaluate_training_policies(cfg, params, seed=seed)
            curves[seed].append((step, float(r.get("normalized_score", r["mean_return"]))))
        if progress:
            print(f"{method.name} step {step}: " + " ".join(f"{c[-1][1]:.1f}" for c in curves.values()), flush=True)

    runs = train_seeds(cfg, seeds, hook=evaluate, hook_every=cfg.eval.every)
    finals = {s: c[-1][1] for s, c in curves.items()}
    scores = np.array(list(finals.values()))
    return {"policy": method.policy, "overrides": method.overrides, "curves": curves, "final": finals,
            "mean": float(scores.mean()), "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
            "min": float(scores.min()), "max": float(scores.max()),
            "history": {k: v.tolist() for k, v in runs.history.items()}}


def _json_keys_to_int(result: dict[str, Any]) -> dict[str, Any]:
    """JSON turned the seed keys into strings; make them ints again."""
    for field in ("curves", "final"):
        result[field] = {int(k): v for k, v in result[field].items()}
    return result


def run_experiment(exp: Experiment, out_dir: str | Path, *, fresh: bool = False, progress: bool = True,
                   methods: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Trains (or, when its result file exists, reuses) every method; writes and returns the results.

    ``fresh`` retrains methods that already have a result; ``methods`` limits the experiment to those names.
    """
    out_dir = Path(out_dir)
    chosen = [m for m in exp.methods if methods is None or m.name in methods]
    if methods is not None and len(chosen) != len(set(methods)):
        unknown = sorted(set(methods) - {m.name for m in exp.methods})
        raise ConfigError(f"unknown methods {unknown}; the experiment has {[m.name for m in exp.methods]}")
    results: dict[str, Any] = {"experiment": exp.name, "config": str(exp.config), "seeds": list(exp.seeds),
                               "methods": {}}
    for method in chosen:
        cfg = method_config(exp, method, out_dir)
        result_file = Path(cfg.train.out_dir) / "result.json"
        if result_file.exists() and not fresh:
            result = _json_keys_to_int(json.loads(result_file.read_text()))
            if sorted(result["final"]) != sorted(exp.seeds):
                raise ValueError(f"{result_file} holds seeds {sorted(result['final'])}, the experiment asks for "
                                 f"{sorted(exp.seeds)}: pass --fresh to retrain, or another --out")
        else:
            result = train_method(cfg, method, exp.seeds, progress)
            result_file.parent.mkdir(parents=True, exist_ok=True)
            result_file.write_text(json.dumps(result) + "\n")
        results["methods"][method.name] = result
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {**results, "methods": {n: {k: v for k, v in m.items() if k != "history"}
                                      for n, m in results["methods"].items()}}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_table(results))
    plot_curves(results, out_dir / "learning_curves.png")
    return results


def results_table(results: Mapping[str, Any]) -> str:
    """Markdown: one row per method, normalised final scores over seeds."""
    seeds = results["seeds"]
    head = ["method", "policy", "normalised (mean)", "std", "min", "max", *[f"seed {s}" for s in seeds]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        cells = [name, m["policy"], f"{m['mean']:.1f}", f"{m['std']:.1f}", f"{m['min']:.1f}", f"{m['max']:.1f}"]
        cells += [f"{m['final'][s]:.1f}" for s in seeds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: Mapping[str, Any], path: Path) -> None:
    """Normalised score against steps: each method's mean over seeds, its min-max band shaded."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for name, m in results["methods"].items():
        curves = list(m["curves"].values())
        steps = [s for s, _ in curves[0]]
        scores = np.array([[v for _, v in c] for c in curves if len(c) == len(steps)])
        ax.plot(steps, scores.mean(axis=0), marker="o", ms=3, label=f"{name} ({m['policy']})")
        if len(scores) > 1:
            ax.fill_between(steps, scores.min(axis=0), scores.max(axis=0), alpha=0.2)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.axhline(100, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("normalised score (50 = data, 100 = optimal)")
    ax.set_title(f"{results['experiment']}: {len(results['seeds'])} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
