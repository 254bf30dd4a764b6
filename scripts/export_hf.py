"""Exports a jaxrl_lm checkpoint as a Hugging Face directory (transformers loads it without remote code).

    python scripts/export_hf.py CKPT OUT [--step N] [--params online|ema] [--policy bc|actor|ilql|q] [--beta B]
                                [--temperature T] [--max-shard-size 2GB] [--push-to-hub USER/REPO]

CKPT is a run's train.out_dir (holding checkpoints/) or a checkpoints directory; the newest complete step unless
--step. --params ema exports the EMA target parameters (the Q heads, and the trunk with token_q.target_scope=full)
in place of the online ones. --policy picks what the HF LM head computes (jaxrl_lm/interop: ilql and q are
merged into it exactly, or refused with the reason). The tokenizer is the checkpoint config's data.tokenizer.
The Q/V heads (and the target Q heads) go to OUT/q_heads.safetensors, described by OUT/q_heads.json. OUT/README.md
is a model card: task, method, key config, the run's evaluation table (its eval.jsonl or final_metrics.json) and
the code that loads OUT and samples the learned policy (jaxrl_lm.interop.hf_generation for the ILQL / Q policy of
any head).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxrl_lm.checkpoints import load_state_params, run_dir
from jaxrl_lm.interop import export_hf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="run directory (with checkpoints/) or checkpoints directory")
    p.add_argument("out", help="output directory for the HF model")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--params", choices=("online", "ema"), default="online", help="online or EMA target parameters")
    p.add_argument("--policy", choices=("bc", "actor", "ilql", "q"), default="bc", help="what the HF LM head computes")
    p.add_argument("--beta", type=float, default=1.0, help="ILQL advantage weight of --policy ilql")
    p.add_argument("--temperature", type=float, default=1.0, help="policy temperature of --policy ilql / q")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size limit (e.g. 500MB, 2GB)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload OUT to this Hub model repo")
    return p.parse_args(argv)


def push_to_hub(out: Path, repo: str) -> None:
    """Uploads ``out`` to the Hub model repo ``repo`` (created if missing); exits with what to check on failure."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=out)
    except Exception as e:  # noqa: BLE001 -- the hub client raises network, auth and HTTP errors of many types
        raise SystemExit(
            f"error: the export in {out} is complete, but pushing it to the Hub repo {repo!r} failed "
            f"({type(e).__name__}: {e}).\nCheck: network access to huggingface.co (or HF_ENDPOINT), that "
            f"HF_HUB_OFFLINE is unset, that you are logged in with write access (`hf auth login` or HF_TOKEN), and "
            f"the repo name (USER/NAME). Retry later with `hf upload {repo} {out}`.") from None
    print(f"pushed {out} to https://huggingface.co/{repo}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg, online, groups, step = load_state_params(Path(args.ckpt), args.step)
        target = groups.get("target")
        if args.params == "ema" and target is None:
            raise ValueError(f"--params ema: the checkpoint has no EMA target group (groups: {sorted(groups)})")
        params = online if args.params == "online" else {**online, **target}
        out = export_hf(params, cfg.model, args.out, tokenizer=cfg.data.tokenizer, policy=args.policy,
                        beta=args.beta, temperature=args.temperature, max_shard_size=args.max_shard_size,
                        target_params=target, params_source=args.params, run_config=cfg,
                        run_dir=run_dir(args.ckpt), step=step)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported step {step} ({args.params} params, policy {args.policy}) -> {out}")
    if args.push_to_hub:
        push_to_hub(out, args.push_to_hub)
    return 0


if __name__ == "__main__":
    sys.exit(main())
