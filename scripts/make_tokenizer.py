"""Train a byte-level BPE tokenizer on the turn texts of a dataset and write its tokenizer.json.

    python scripts/make_tokenizer.py task:maze --out configs/tokenizers/maze.json [--vocab-size 512]
    python scripts/make_tokenizer.py episodes.jsonl --out tokenizer.json --vocab-size 1024

The source is a JSONL file of episodes or ``task:NAME`` (the built-in task's offline data: ``--episodes`` episodes
of ``--behaviour`` drawn with ``--seed``, as ``data.path: task:NAME`` generates them). Ids 0..3 are the special
tokens, then the 256 bytes, then the merges (``jaxrl_lm.data.train_bpe_tokenizer``); training stops early when
no pair of tokens repeats, so the file may hold fewer ids than ``--vocab-size``. Set ``model.vocab_size`` to at
least the printed size and ``data.tokenizer`` to the file. The same source and options always write the same file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jaxrl_lm.data import read_jsonl, train_bpe_tokenizer
from jaxrl_lm.data.loader import TASK_PREFIX


def turn_texts(source: str, episodes: int, seed: int, behaviour: str = "") -> list[str]:
    """Every turn's text of the source's episodes, in order."""
    if source.startswith(TASK_PREFIX):
        from jaxrl_lm import envs  # only built-in task data needs the environments

        name = source[len(TASK_PREFIX):]
        if name not in envs.task_names():
            raise ValueError(f"unknown built-in task {name!r}; known: {envs.task_names()}")
        records, _ = envs.make_dataset(name, episodes=episodes, seed=seed, behaviour=behaviour)
        return [turn["text"] for record in records for turn in record["turns"]]
    parsed, _ = read_jsonl(source)
    return [turn.text for episode in parsed for turn in episode.turns]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="episodes JSONL file, or task:NAME for a built-in task's offline data")
    p.add_argument("--out", type=Path, required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=512, help="most ids, specials and the 256 bytes included")
    p.add_argument("--episodes", type=int, default=2000, help="task:NAME only: episodes generated (data.task_episodes)")
    p.add_argument("--seed", type=int, default=0, help="task:NAME only: data seed (data.seed)")
    p.add_argument("--behaviour", default="", help="task:NAME only: which of the task's datasets "
                   "(data.task_behaviour; default: the task's own)")
    args = p.parse_args(argv)
    try:
        texts = turn_texts(args.source, args.episodes, args.seed, args.behaviour)
        tokenizer = train_bpe_tokenizer(texts, args.vocab_size)
    except (ValueError, FileNotFoundError) as e:  # EpisodeError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(args.out)
    lengths = [len(ids) for ids in tokenizer.encode_batch(texts)]
    print(json.dumps({"out": str(args.out), "vocab_size": tokenizer.vocab_size, "turns": len(texts),
                      "tokens_per_turn": round(float(np.mean(lengths)), 2),
                      "bytes_per_turn": round(float(np.mean([len(t.encode()) for t in texts])), 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
