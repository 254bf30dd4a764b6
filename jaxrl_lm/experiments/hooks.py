"""Hooks of the training loop that reach above ``train/``: evaluation in the environments during training.

``evaluation_hook(cfg)`` plays the ``eval`` section's policies every ``eval.every`` steps and after the last (and
at every checkpoint when ``train.keep_best_metric`` names an evaluation metric), with the online parameters of
the run or of each stacked seed. It appends every result to ``<train.out_dir>/eval.jsonl`` and returns the
``eval/<policy>/<field>`` metrics (the mean over seeds for a stacked run), which the loop logs and hands to the
checkpoint. ``curves`` (when given) collects each seed's learning curve: ``{seed: [(step, score), ...]}``.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import numpy as np
from tqdm.auto import tqdm

from jaxrl_lm.config import Config
from jaxrl_lm.eval import evaluate_training_policies, training_metrics
from jaxrl_lm.train.loop import Hook, StepContext, json_default
from jaxrl_lm.train.seeds import unstack

Curves = dict[int, list[tuple[int, float]]]


def score(result: Mapping[str, Any]) -> float:
    """The number a learning curve plots: the normalised score, else the mean return."""
    return float(result.get("normalized_score", result["mean_return"]))


def evaluation_hook(cfg: Config, curves: Optional[Curves] = None, *, progress: bool = True) -> Hook:
    """The loop's evaluation hook for ``cfg.eval`` (module docstring)."""

    def evaluate(ctx: StepContext) -> dict[str, float]:
        params = ctx.state.params  # read now, before the next update donates the state
        runs = [(cfg.train.seed, params)] if ctx.seeds is None else list(zip(ctx.seeds, unstack(params)))
        metrics: list[dict[str, float]] = []
        lines = []
        for seed, seed_params in runs:
            results = evaluate_training_policies(cfg, seed_params, seed=seed)
            metrics.append(training_metrics(results))
            lines += [{"step": ctx.step, **({"seed": seed} if ctx.seeds is not None else {}), **r} for r in results]
            if curves is not None:
                curves.setdefault(seed, []).append((ctx.step, score(results[0])))
        if ctx.is_main:
            with (ctx.out_dir / "eval.jsonl").open("a") as f:
                f.writelines(json.dumps(line, default=json_default) + "\n" for line in lines)
            if progress:
                tqdm.write(f"step {ctx.step}: " + ", ".join(
                    f"{line['policy']['kind']}{'' if ctx.seeds is None else ' seed ' + str(line['seed'])} "
                    f"{score(line):.1f}" for line in lines))
        return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}

    rank_by_eval = cfg.train.keep_best_metric.startswith("eval/")
    return Hook(evaluate, every=cfg.eval.every, at_end=True, at_checkpoints=rank_by_eval)
