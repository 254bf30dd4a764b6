"""A Hugging Face checkpoint cut down to the vocabulary of a task (``jaxrl_lm.data.vocab_trim``), before import.

The trimmed tokenizer keeps ``n`` of the old ids (``kept``, old id per new id); here the model follows it: every
vocabulary-sized tensor (the token embedding, and the LM head when it is not tied) keeps rows ``kept`` in that
order, ``vocab_size`` becomes ``n`` and the special-token ids of ``config.json`` are renumbered. Nothing else
changes, so on any text the trimmed tokenizer encodes as the old one did, the trimmed model's logits are the old
logits at the kept ids (``tests/test_vocab_trim.py``), and the import that follows builds vocabulary-sized Q-heads
of ``n`` outputs. An export of the result is an ordinary causal LM with an ``n``-token vocabulary and its
tokenizer (``tokenizer.json`` of the trimmed BPE).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import tokenizers

from jaxrl_lm.data.vocab_trim import trim_bpe

# HF tensors with one row per token id: Llama / Qwen2 embedding, an untied LM head, GPT-2 embedding.
VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight")
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def trim_hf_vocab(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], backend: tokenizers.Tokenizer,
                  texts: Iterable[str]) -> tuple[dict[str, Any], dict[str, np.ndarray], tokenizers.Tokenizer,
                                                 np.ndarray]:
    """``(config, tensors, tokenizer, kept)`` of the model cut down to the tokens of ``texts``.

    ``config``: a ``config.json`` dict; ``tensors``: HF name -> array in HF layout (``[vocab, hidden]`` rows for
    ``VOCAB_ROWS``). The inputs are not modified. Raises ``ValueError`` when a vocabulary tensor's rows do not
    match ``config["vocab_size"]`` or a special id of the config is not kept (it would point at another token).
    """
    trimmed, kept = trim_bpe(backend, texts)
    vocab_size = int(config["vocab_size"])
    if kept.size and kept[-1] >= vocab_size:
        raise ValueError(f"the tokenizer has id {int(kept[-1])}, beyond config.json's vocab_size {vocab_size}")
    out_tensors = dict(tensors)
    for name in VOCAB_ROWS:
        if name in tensors:
            rows = tensors[name]
            if rows.shape[0] != vocab_size:
                raise ValueError(f"{name} has {rows.shape[0]} rows, config.json's vocab_size is {vocab_size}")
            out_tensors[name] = np.ascontiguousarray(rows[kept])
    new_id = {int(old): new for new, old in enumerate(kept)}
    out_config = dict(config, vocab_size=int(kept.size))
    for key in SPECIAL_ID_KEYS:
        old = config.get(key)
        if isinstance(old, int):
            if old not in new_id:
                raise ValueError(f"config.json's {key} {old} is not among the kept ids")
            out_config[key] = new_id[old]
    return out_config, out_tensors, trimmed, kept
