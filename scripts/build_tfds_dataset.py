"""Builds the TFDS (ArrayRecord) dataset of tokenized episodes from a JSONL file, and prints its statistics.

    python scripts/build_tfds_dataset.py episodes.jsonl --out data/maze --seq-len 128 [--tokenizer path] \
        [--skip-invalid]

The printed directory is what ``data.path`` takes (the out dir works too when it holds one dataset).
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxrl_lm.data import build_dataset, load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jsonl", help="episodes, one JSON object per line (schema: jaxrl_lm/data/episodes.py)")
    p.add_argument("--out", required=True, help="output directory (the dataset goes to OUT/jaxrl_episodes/1.0.0)")
    p.add_argument("--tokenizer", default="", help="tokenizer.json or HF tokenizer directory; '' = built-in bytes")
    p.add_argument("--seq-len", type=int, default=128, help="longest episode in tokens; longer ones are cut")
    p.add_argument("--truncate-side", choices=("split", "left", "right"), default="split",
                   help="split: cut an over-long episode into windows of whole turns; left: keep its end; right: its start")
    p.add_argument("--skip-invalid", action="store_true", help="skip and report invalid lines instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    try:
        path, stats = build_dataset(args.jsonl, args.out, tokenizer=tokenizer, seq_len=args.seq_len,
                                    truncate_side=args.truncate_side, skip_invalid=args.skip_invalid,
                                    overwrite=args.overwrite, progress=True)
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # EpisodeError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in stats.left_out():
        print(line, file=sys.stderr)
    print(f"dataset: {path}")
    print(f"tokenizer: {tokenizer}")
    print(json.dumps(stats.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
