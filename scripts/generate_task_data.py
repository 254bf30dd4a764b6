"""Write a task's offline dataset (JSON Lines of episodes) and its stats JSON next to it.

    python scripts/generate_task_data.py maze --episodes 1000 --seed 0 --out data/maze.jsonl
    python scripts/generate_task_data.py maze --behaviour legacy --episodes 1000 --out data/maze_legacy.jsonl

writes ``data/maze.jsonl`` and ``data/maze.stats.json`` (return summary and the worst / dataset / optimal
returns that ``jaxrl_lm.envs.normalize`` reads). The same seed and behaviour always write the same data.
``--behaviour`` picks one of the task's datasets (``data.task_behaviour``; default: the task's own).
Statistics of the data, and how count-based imitation of it plays: ``scripts/data_stats.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from jaxrl_lm import envs


def stats_path(out: Path) -> Path:
    """``FILE.jsonl`` -> ``FILE.stats.json`` (the suffix is replaced whatever it is)."""
    return out.with_suffix(".stats.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=envs.task_names(), help="built-in task to generate data for")
    parser.add_argument("--episodes", type=int, required=True, help="number of episodes to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of starts / secrets and of the behaviour policy")
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl file (stats go beside it)")
    parser.add_argument("--batch-size", type=int, default=64, help="episodes rolled out together")
    parser.add_argument("--behaviour", default="", help="which of the task's datasets (data.task_behaviour); "
                        "default: the task's own")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    try:
        envs.get_task(args.task).with_behaviour(args.behaviour)
    except ValueError as e:
        parser.error(str(e))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=args.episodes, desc=f"{args.task} episodes", unit="ep") as bar:
        episodes, stats = envs.make_dataset(args.task, args.episodes, args.seed, args.batch_size, bar.update,
                                            behaviour=args.behaviour)
    envs.write_jsonl(args.out, episodes)
    stats_file = stats_path(args.out)
    stats_file.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    summary = stats["dataset"]
    print(
        f"wrote {len(episodes)} {stats['behaviour']} episodes to {args.out} (mean return {summary['mean_return']:.3f}, "
        f"done {summary['done_fraction']:.1%}); stats in {stats_file}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
