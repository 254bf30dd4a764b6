"""Hooks of the training loop that reach above ``train/``: evaluation in the environments during training.

``evaluation_hook(cfg)`` plays the ``eval`` section's policies every ``eval.every`` steps and after the last (and
at every checkpoint when ``train.keep_best_metric`` names an evaluation metric), with the online parameters of
the run or of each stacked seed, once per decoding of ``eval.decodings`` (greedy and sampled). It appends every
result to ``<train.out_dir>/eval.jsonl`` and returns the ``eval/<policy>/<decoding>/<field>`` metrics and the
better decoding's ``eval/<policy>/<field>`` (``jaxrl_lm.eval.best_of_decodings``; for a stacked run the mean over
seeds, the decoding chosen by that mean), which the loop logs and hands to the checkpoint. ``curves`` (when
given) collects the first policy's learning curve per decoding and seed:
``{decoding: {seed: [(step, score), ...]}}``.
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from jaxrl_lm.config import Config
from jaxrl_lm.eval import best_of_decodings, evaluate_training_policies, result_score, training_metrics
from jaxrl_lm.train.loop import Hook, StepContext, json_default
from jaxrl_lm.train.seeds import unstack

Curves = dict[str, dict[int, list[tuple[int, float]]]]  # decoding -> seed -> [(step, score)]


def evaluation_hook(cfg: Config, curves: Optional[Curves] = None, *, progress: bool = True) -> Hook:
    """The loop's evaluation hook for ``cfg.eval`` (module docstring)."""

    def evaluate(ctx: StepContext) -> dict[str, float]:
        params = ctx.state.params  # read now, before the next update donates the state
        runs = [(cfg.train.seed, params)] if ctx.seeds is None else list(zip(ctx.seeds, unstack(params)))
        metrics: list[dict[str, float]] = []
        lines = []
        for seed, seed_params in runs:
            results = evaluate_training_policies(cfg, seed_params, seed=seed)
            metrics.append(training_metrics(results, best=False))
            lines += [{"step": ctx.step, **({"seed": seed} if ctx.seeds is not None else {}), **r} for r in results]
            if curves is not None:
                for r in results:
                    if r["policy"]["kind"] == results[0]["policy"]["kind"]:
                        curves.setdefault(r["decoding"], {}).setdefault(seed, []).append((ctx.step, result_score(r)))
        if ctx.is_main:
            with (ctx.out_dir / "eval.jsonl").open("a") as f:
                f.writelines(json.dumps(line, default=json_default) + "\n" for line in lines)
            if progress:
                tqdm.write(f"step {ctx.step}: " + ", ".join(
                    f"{line['policy']['kind']} {line['decoding']}"
                    f"{'' if ctx.seeds is None else ' seed ' + str(line['seed'])} {result_score(line):.1f}"
                    for line in lines))
        return best_of_decodings({k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]})

    rank_by_eval = cfg.train.keep_best_metric.startswith("eval/")
    return Hook(evaluate, every=cfg.eval.every, at_end=True, at_checkpoints=rank_by_eval)
