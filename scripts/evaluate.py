"""Evaluate a checkpoint as a policy on a built-in task (mean return, normalised score, 95% CI, success rate), and/or
diagnose its values on its own dataset.

    python scripts/evaluate.py runs/maze --task maze                   # the run's own eval settings
    python scripts/evaluate.py runs/maze --task maze --policy bc --decodings greedy --episodes 50
    python scripts/evaluate.py runs/demo --diagnostics

The policy kind, ILQL beta, decodings and sampling temperature default to those the run was evaluated with (its
saved config's ``eval`` section: the last of ``eval.policies``, ``eval.beta``, ``eval.decodings``,
``eval.temperature``). Each policy is evaluated once per decoding, greedy (temperature 0) and sampled, side by
side: one row each (the utterance policy chooses among sampled candidates, so it has one row).

CKPT is a run directory (``train.out_dir``) or its ``checkpoints`` directory; the newest complete step is used
unless ``--step`` is given. Prints a Markdown table and writes ``<out>/<task>_<policy>_step<S>.md``, ``.json``
and ``.episodes.jsonl`` (default ``<out>`` = ``<run>/eval``). Normalisation anchors come from ``--stats`` or
from the dataset the run trained on (``jaxrl_lm.eval.load_task_stats``). A run of several seeds trained together
(``--seeds`` / an experiment's method) holds one model per seed: each is evaluated, one row per seed, unless
``--train-seed`` picks one.

``--diagnostics`` (``jaxrl_lm.experiments.diagnostics``) reads the dataset of the run's config (``data`` section:
a built-in ``task:NAME``'s episodes or the JSONL / built dataset at ``data.path``), packed as training packs it,
and writes under ``<out>`` (default ``<run>/diagnostics``), for step S (and seed s): ``calibration_stepS.png``
(Q and V against the Monte-Carlo return-to-go), ``turn_errors_stepS.png`` (their bias and RMSE per turn index),
``cql_gap_stepS.png``, ``summary_stepS.json``, ``advantages_stepS.html`` (episodes with every agent token
coloured by ``Q - V``) and ``decisions_stepS.npz`` (the per-decision arrays). ``--task`` is needed only for the
policy evaluation; with both, both run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jaxrl_lm  # noqa: F401  (before jax: picks the CPU platform quietly where no accelerator is visible)
import jax

from jaxrl_lm import envs
from jaxrl_lm.checkpoints import load_params, run_dir, run_seeds
from jaxrl_lm.config import DECODINGS, POLICY_KINDS
from jaxrl_lm.data import load_tokenizer
from jaxrl_lm.eval import evaluate_policy, load_task_stats, markdown_table, write_report
from jaxrl_lm.experiments.diagnostics import dataset_batches, value_diagnostics, write_diagnostics
from jaxrl_lm.model_policy import load_policy


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="run directory or its checkpoints/ directory")
    parser.add_argument("--task", default=None, choices=envs.task_names(),
                        help="built-in task to play (the policy evaluation; not needed for --diagnostics alone)")
    parser.add_argument("--policy", default=None, choices=POLICY_KINDS,
                        help="policy extraction (docs/design.md section 3); default: the last of the run's "
                             "eval.policies")
    parser.add_argument("--beta", type=float, default=None, help="ilql advantage weight; default: eval.beta")
    parser.add_argument("--decodings", nargs="+", default=None, choices=DECODINGS,
                        help="greedy (temperature 0) and/or sampled (at --temperature); default: eval.decodings")
    parser.add_argument("--temperature", type=float, default=None,
                        help="the sampled decoding's temperature; default: eval.temperature (0 = greedy only)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k best tokens; 0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 = off")
    parser.add_argument("--best-of", type=int, default=None,
                        help="candidate turns per step, highest Q wins; default 1 (utterance: eval.candidates)")
    parser.add_argument("--greedy-candidate", action=argparse.BooleanOptionalAction, default=None,
                        help="one of the best-of candidates is the greedy turn; default: eval.greedy_candidate "
                             "for the utterance policy")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="token budget of one action turn; default: eval.max_new_tokens")
    parser.add_argument("--max-turns", type=int, default=None,
                        help="most recent turns a prompt keeps; default: the task's context_turns (or all that fit)")
    parser.add_argument("--episodes", type=int, default=None, help="default: every evaluation start once")
    parser.add_argument("--batch-size", type=int, default=64, help="episodes rolled out together")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step; default: the newest")
    parser.add_argument("--stats", type=Path, default=None, help="task stats JSON (generate_task_data.py)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="of a run of several seeds trained together, evaluate this one; default: each")
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory; default <run>/eval (and <run>/diagnostics for --diagnostics)")
    parser.add_argument("--legal-actions", action="store_true",
                        help="on a task with legal actions (wordle, twenty_questions, endgames): report the legal-move "
                             "rate, and the same policy again decoding only legal actions (columns 'constrained')")
    parser.add_argument("--diagnostics", action="store_true",
                        help="Q and V against the Monte-Carlo returns of the run's dataset, the CQL gap and a "
                             "per-token advantage page (PNG, JSON, HTML; module docstring)")
    parser.add_argument("--diagnostics-episodes", type=int, default=8, help="episodes the advantage page shows")
    parser.add_argument("--diagnostics-records", type=int, default=4096,
                        help="dataset records (episodes or windows) read, in the loader's order; 0 = all")
    args = parser.parse_args(argv)
    if args.task is None and not args.diagnostics:
        parser.error("give --task (evaluate the policy on a built-in task), --diagnostics, or both")
    if args.temperature is not None and args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg, params, step = load_params(args.checkpoint, args.step)
    seeds = run_seeds(args.checkpoint)  # None: one model
    if args.train_seed is not None and args.train_seed not in (seeds or [cfg.train.seed]):
        raise SystemExit(f"--train-seed {args.train_seed}: the run holds the seeds {seeds or [cfg.train.seed]}")
    chosen = [s for s in seeds if args.train_seed in (None, s)] if seeds else [None]
    models = [(seed, params if seed is None else jax.tree.map(lambda x, i=seeds.index(seed): x[i], params))
              for seed in chosen]
    if args.task is not None:
        evaluate(args, cfg, models, step)
    if args.diagnostics:
        diagnose(args, cfg, models, step)
    return 0


def decoding_runs(args: argparse.Namespace, cfg, kind: str) -> list[tuple[str, float | None]]:
    """``[(decoding, temperature)]`` to evaluate ``kind`` with: the run's ``eval.decodings`` unless ``--decodings``
    says otherwise; ``--temperature 0`` means greedy only. The utterance policy samples its candidates: one run at
    ``--temperature`` (None: the run's ``eval.candidate_temperature``)."""
    if kind == "utterance":
        return [("sampled", args.temperature)]
    decodings = args.decodings or (["greedy"] if args.temperature == 0 else list(cfg.eval.decodings))
    sampled = args.temperature or cfg.eval.temperature
    return [(d, 0.0 if d == "greedy" else sampled) for d in dict.fromkeys(decodings)]


def evaluate(args: argparse.Namespace, cfg, models: list, step: int) -> None:
    """The policy of each model on ``args.task``, once per decoding: a Markdown table and the report files."""
    stats = load_task_stats(args.task, cfg, args.stats)
    kind = args.policy or cfg.eval.policies[-1]
    results = []
    for seed, model in models:
        for decoding, temperature in decoding_runs(args, cfg, kind):
            policy = load_policy(model, kind, cfg=cfg, beta=args.beta, temperature=temperature,
                                 top_k=args.top_k, top_p=args.top_p, best_of=args.best_of,
                                 greedy_candidate=args.greedy_candidate,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed,
                                 max_turns=args.max_turns or envs.get_task(args.task).context_turns)
            result = evaluate_policy(policy, args.task, episodes=args.episodes, task_stats=stats,
                                     batch_size=args.batch_size, legality=args.legal_actions)
            result.update(checkpoint=str(args.checkpoint), step=step, decoding=decoding,
                          **({} if seed is None else {"train_seed": seed}))
            results.append(result)
    name = f"{args.task}_{kind}_step{step}" + ("" if args.train_seed is None else f"_seed{args.train_seed}")
    md, js = write_report(results, args.out or run_dir(args.checkpoint) / "eval", name)
    print(markdown_table(results), end="")
    print(f"{sum(r['episodes'] for r in results)} episodes in {sum(r['seconds'] for r in results):.1f} s; "
          f"wrote {md} and {js}")


def _fit_line(name: str, fit: dict) -> str:
    if not fit["count"]:
        return f"{name}: no decision with a complete return"
    r = "-" if fit["correlation"] is None else f"{fit['correlation']:.3f}"
    return f"{name}: bias {fit['bias']:+.4f}, RMSE {fit['rmse']:.4f}, correlation {r}"


def diagnose(args: argparse.Namespace, cfg, models: list, step: int) -> None:
    """Value diagnostics of each model on the run's dataset (jaxrl_lm.experiments.diagnostics)."""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    batches = dataset_batches(cfg, tokenizer, max_records=args.diagnostics_records or None)
    out = args.out or run_dir(args.checkpoint) / "diagnostics"
    for seed, model in models:
        result = value_diagnostics(cfg, model, batches)
        tag = f"step{step}" + ("" if seed is None else f"_seed{seed}")
        title = f"{run_dir(args.checkpoint).name} {tag}"
        paths = write_diagnostics(out, result, batches, tokenizer, episodes=args.diagnostics_episodes, title=title,
                                  suffix=f"_{tag}")
        s = result["summary"]
        print(f"diagnostics of {title}: {s['decisions']} decisions in {len(batches)} batches, "
              f"{s['calibrated_decisions']} with a complete return ({s['truncated_decisions']} in truncated windows, "
              f"left out of the calibration)")
        print("  " + _fit_line("Q(h, a_data) vs return", s["q"]))
        print("  " + _fit_line("V(h) vs return", s["v"]))
        gap = s["cql_gap"]
        print(f"  CQL gap (max_a Q - Q(a_data)): mean {gap['mean']:.4f}, median {gap['median']:.4f}; the data action "
              f"is the greedy one at {100 * gap['data_action_is_greedy']:.1f}%")
        print(f"  advantage Q - V: mean {s['advantage']['mean']:+.4f}, std {s['advantage']['std']:.4f}")
        print(f"  wrote {out}/: " + ", ".join(p.name for p in paths.values()))


if __name__ == "__main__":
    sys.exit(main())
