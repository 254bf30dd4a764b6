"""Experiments: train every method of a task over several seeds, evaluate them as they train, tabulate and plot.

    python scripts/reproduce.py grid                   # configs/reproduce/grid.yaml -> runs/reproduce/grid

An experiment file (YAML) names a training config, the seeds, and the methods, each a set of dotted overrides
of that config plus the policy extraction that scores it::

    config: ../tasks/grid.yaml        # relative to the experiment file
    seeds: [0, 1, 2]                  # train.seed of each run; the dataset (data.seed) is the same for all
    methods:
      bc:   {policy: bc,   overrides: {token_q.lambda_q: 0, token_q.lambda_v: 0, token_q.cql_alpha: 0}}
      ilql: {policy: ilql, overrides: {token_q.backup: expectile}}

``include: other.yaml`` (relative to the file) starts from another experiment file, whose keys this file's own
replace: ``include: maze.yaml`` with ``config: ../tasks/maze_po.yaml`` runs the maze's methods on another task.
A method may start from an earlier method's trained parameters, seed by seed (``init_from: bc``: an actor-critic
whose actor starts at, and is held near, the cloned policy); that method is trained first when it is not chosen.

A method with ``online.enabled: true`` in its overrides plays its task as it trains
(``jaxrl_lm.experiments.online``); its seeds train one after the other (each collects its own episodes), in
``<method>/seed_<s>/``, and its result adds each seed's environment episodes against steps (``env_episodes``).
Every other method's seeds train side by side in one compiled update, through the training loop
(``jaxrl_lm.experiments.run.run(cfg, seeds=...)``: the update under ``jax.vmap``, every seed reading the same
batches, with the loop's checks), and every ``eval.every`` steps and at the end each seed's parameters play the
task with the method's policy (``jaxrl_lm.experiments.hooks.evaluation_hook``), greedily and sampled
(``eval.decodings``), which gives the learning curves (normalised score against steps), one per decoding. The
final score of a seed is its last evaluation; a method's ``best_decoding`` is the one with the higher mean over
seeds, and a method beats BC only if it beats BC's better decoding. Outputs in the output
directory: ``<method>/`` per method (the loop's run directory: config, metrics, ``eval.jsonl``, the final stacked
checkpoint, and ``result.json`` with its curves, final scores and training-metric history; a method whose
``result.json`` exists is not retrained, and a method trained again starts from an emptied directory),
``results.json`` (all of them), ``results.md`` (the table, a row per method and decoding: mean, standard deviation,
minimum and maximum over seeds, each seed's score, the margin over BC's better decoding, and an actor's final KL
to its reference policy) and ``learning_curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import yaml

from jaxrl_lm import config as config_lib
from jaxrl_lm.config import POLICY_KINDS, Config, ConfigError, load_config
from jaxrl_lm.experiments.hooks import Curves, evaluation_hook
from jaxrl_lm.experiments.plots import plot_curves, results_table
from jaxrl_lm.experiments.run import History, resolve_episodes, run
from jaxrl_lm.train.loop import train


@dataclasses.dataclass(frozen=True)
class Method:
    """One line of the table: ``overrides`` of the experiment's config, scored with the ``policy`` extraction;
    ``init_from``: an earlier method whose trained parameters (same seed) start this one (``train.init_from``),
    e.g. an actor held near the behaviour-cloning policy it starts from."""

    name: str
    policy: str
    overrides: dict[str, Any]
    init_from: Optional[str] = None


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
    methods: list[Method] = []
    for name, m in raw["methods"].items():
        if not isinstance(m, dict) or set(m) - {"policy", "overrides", "init_from"} \
                or m.get("policy") not in POLICY_KINDS:
            raise ConfigError(f"{path}: methods.{name} needs policy (one of {list(POLICY_KINDS)}) and optional "
                              f"overrides and init_from")
        source = m.get("init_from")
        if source is not None and source not in [earlier.name for earlier in methods]:
            raise ConfigError(f"{path}: methods.{name}.init_from must name a method listed before it (it is trained "
                              f"first), got {source!r}")
        methods.append(Method(name, m["policy"], dict(m.get("overrides") or {}), source))
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
    start = {"train.init_from": str(out_dir / method.init_from)} if method.init_from else {}
    cfg = load_config(exp.config, **_keywords({**method.overrides, **exp.overrides, **start,
                                               "eval.policies": [method.policy],
                                               "train.out_dir": str(out_dir / method.name)}))
    if not cfg.eval.every:
        raise ConfigError(f"{exp.config}: eval.every must be set for an experiment (its learning curves)")
    return cfg


def _keywords(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"token_q.backup": v}`` -> ``{"token_q__backup": v}`` (``load_config``'s keyword form)."""
    return {k.replace(".", "__"): v for k, v in dotted.items()}


def train_method(cfg: Config, method: Method, seeds: Sequence[int], progress: bool = True) -> dict[str, Any]:
    """Trains ``seeds`` of one method together in ``train.out_dir`` (an online method: one seed after the other,
    in ``seed_<s>/``) and evaluates them as they train; the method's result dict."""
    out_dir = Path(cfg.train.out_dir)
    if out_dir.exists():  # the harness owns the method's directory: a retrained method starts from nothing
        shutil.rmtree(out_dir)
    curves: Curves = {}
    episodes: dict[int, list[tuple[int, float]]] = {}
    if cfg.online.enabled:
        histories = []
        for seed in seeds:
            seed_cfg = config_lib.replace(cfg, train__seed=seed, train__out_dir=str(out_dir / f"seed_{seed}"))
            history = History(cfg.train.log_every)
            final = run(seed_cfg, hooks=[history.hook()], curves=curves, progress=progress)
            _check_finished(final, method, cfg, out_dir)
            episodes[seed] = online_episodes(Path(seed_cfg.train.out_dir))
            histories.append(history.arrays())
        arrays = {k: np.stack([h[k] for h in histories], axis=-1) for k in histories[0] if k != "step"}
        arrays["step"] = histories[0]["step"]
    else:
        history = History(cfg.train.log_every)
        final = train(cfg, seeds=seeds, hooks=[evaluation_hook(cfg, curves, progress=progress), history.hook()],
                      episodes=resolve_episodes(cfg), progress=progress)
        _check_finished(final, method, cfg, out_dir)
        arrays = history.arrays()
    # Per decoding (greedy, sampled: eval.decodings): each seed's last evaluation and their spread over seeds.
    finals = {d: {s: by_seed[s][-1][1] for s in seeds} for d, by_seed in curves.items()}
    spread = {d: _spread(np.array(list(f.values()))) for d, f in finals.items()}
    kl = arrays.get("kl_to_reference")
    return {"policy": method.policy, "overrides": method.overrides, "init_from": method.init_from,
            "final_kl": None if kl is None else float(np.mean(kl[-1])), "curves": curves, "final": finals,
            **{k: {d: v[k] for d, v in spread.items()} for k in ("mean", "std", "min", "max")},
            "best_decoding": max(spread, key=lambda d: (spread[d]["mean"], d == "greedy")),
            "history": {k: v.tolist() for k, v in arrays.items()},
            **({"env_episodes": {s: episodes[s] for s in seeds}} if episodes else {})}


def _spread(scores: np.ndarray) -> dict[str, float]:
    return {"mean": float(scores.mean()), "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
            "min": float(scores.min()), "max": float(scores.max())}


def online_episodes(run_dir: Path) -> list[tuple[int, float]]:
    """``[(step, environment episodes played so far)]`` of an online run, from its ``metrics.jsonl``."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(line["step"], line["online/episodes"]) for line in lines if "online/episodes" in line]


def _check_finished(final: Mapping[str, Any], method: Method, cfg: Config, out_dir: Path) -> None:
    if final["preempted"]:
        raise RuntimeError(f"method {method.name!r} was stopped by SIGTERM at step {final['step']} of "
                           f"{cfg.train.steps} (its checkpoint is in {out_dir}); run the experiment again to retrain it")


def _json_keys_to_int(result: dict[str, Any]) -> dict[str, Any]:
    """JSON turned the seed keys into strings; make them ints again."""
    for field in ("curves", "final"):  # decoding -> seed -> ...
        result[field] = {d: {int(k): v for k, v in by_seed.items()} for d, by_seed in result[field].items()}
    if "env_episodes" in result:
        result["env_episodes"] = {int(k): v for k, v in result["env_episodes"].items()}
    return result


def run_experiment(exp: Experiment, out_dir: str | Path, *, fresh: bool = False, progress: bool = True,
                   methods: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Trains (or, when its result file exists, reuses) every method; writes and returns the results.

    ``fresh`` retrains methods that already have a result; ``methods`` limits the experiment to those names.
    """
    out_dir = Path(out_dir)
    unknown = sorted(set(methods or ()) - {m.name for m in exp.methods})
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; the experiment has {[m.name for m in exp.methods]}")
    chosen = [m for m in exp.methods if methods is None or m.name in methods]
    for m in chosen:  # a method's source is trained (or reused) first
        if m.init_from and m.init_from not in [c.name for c in chosen]:
            chosen.insert(chosen.index(m), next(e for e in exp.methods if e.name == m.init_from))
    results: dict[str, Any] = {"experiment": exp.name, "config": str(exp.config), "seeds": list(exp.seeds),
                               "methods": {}}
    for method in chosen:
        cfg = method_config(exp, method, out_dir)
        result_file = Path(cfg.train.out_dir) / "result.json"
        if result_file.exists() and not fresh:
            result = _json_keys_to_int(json.loads(result_file.read_text()))
            held = sorted(next(iter(result["final"].values())))
            if held != sorted(exp.seeds):
                raise ValueError(f"{result_file} holds seeds {held}, the experiment asks for "
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
