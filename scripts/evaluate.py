"""Evaluate a checkpoint as a policy on a built-in task: mean return, normalised score, 95% CI, success rate.

    python scripts/evaluate.py runs/maze --task maze --policy ilql --beta 4 --episodes 50

CKPT is a run directory (``train.out_dir``) or its ``checkpoints`` directory; the newest complete step is used
unless ``--step`` is given. Prints a Markdown table and writes ``<out>/<task>_<policy>_step<S>.md``, ``.json``
and ``.episodes.jsonl`` (default ``<out>`` = ``<run>/eval``). Normalisation anchors come from ``--stats`` or
from the dataset the run trained on (``jaxrl_lm.eval.load_task_stats``). A run of several seeds trained together
(``--seeds`` / an experiment's method) holds one model per seed: each is evaluated, one row per seed, unless
``--train-seed`` picks one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from jaxrl_lm import envs
from jaxrl_lm.checkpoints import load_params, run_dir, run_seeds
from jaxrl_lm.config import POLICY_KINDS
from jaxrl_lm.eval import evaluate_policy, load_task_stats, markdown_table, write_report
from jaxrl_lm.model_policy import load_policy


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="run directory or its checkpoints/ directory")
    parser.add_argument("--task", required=True, choices=envs.task_names(), help="built-in task to play")
    parser.add_argument("--policy", default="ilql", choices=POLICY_KINDS,
                        help="policy extraction (docs/design.md section 3)")
    parser.add_argument("--beta", type=float, default=1.0, help="ilql advantage weight")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k best tokens; 0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 = off")
    parser.add_argument("--best-of", type=int, default=1, help="candidate turns per step; highest Q wins")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="token budget of one action turn")
    parser.add_argument("--max-turns", type=int, default=None,
                        help="most recent turns a prompt keeps; default: the task's context_turns (or all that fit)")
    parser.add_argument("--episodes", type=int, default=None, help="default: every evaluation start once")
    parser.add_argument("--batch-size", type=int, default=64, help="episodes rolled out together")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step; default: the newest")
    parser.add_argument("--stats", type=Path, default=None, help="task stats JSON (generate_task_data.py)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="of a run of several seeds trained together, evaluate this one; default: each")
    parser.add_argument("--out", type=Path, default=None, help="report directory; default <run>/eval")
    parser.add_argument("--legal-actions", action="store_true",
                        help="on a task with legal actions (wordle, twenty_questions, endgames): report the legal-move "
                             "rate, and the same policy again decoding only legal actions (columns 'constrained')")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg, params, step = load_params(args.checkpoint, args.step)
    seeds = run_seeds(args.checkpoint)  # None: one model
    if args.train_seed is not None and args.train_seed not in (seeds or [cfg.train.seed]):
        raise SystemExit(f"--train-seed {args.train_seed}: the run holds the seeds {seeds or [cfg.train.seed]}")
    chosen = [s for s in seeds if args.train_seed in (None, s)] if seeds else [None]
    stats = load_task_stats(args.task, cfg, args.stats)
    results = []
    for seed in chosen:
        model = params if seed is None else jax.tree.map(lambda x, i=seeds.index(seed): x[i], params)
        policy = load_policy(model, args.policy, cfg=cfg, beta=args.beta, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, best_of=args.best_of,
                             max_new_tokens=args.max_new_tokens, seed=args.seed,
                             max_turns=args.max_turns or envs.get_task(args.task).context_turns)
        result = evaluate_policy(policy, args.task, episodes=args.episodes, task_stats=stats,
                                 batch_size=args.batch_size, legality=args.legal_actions)
        result.update(checkpoint=str(args.checkpoint), step=step, **({} if seed is None else {"train_seed": seed}))
        results.append(result)
    name = f"{args.task}_{args.policy}_step{step}" + ("" if args.train_seed is None else f"_seed{args.train_seed}")
    md, js = write_report(results, args.out or run_dir(args.checkpoint) / "eval", name)
    print(markdown_table(results), end="")
    print(f"{sum(r['episodes'] for r in results)} episodes in {sum(r['seconds'] for r in results):.1f} s; "
          f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
