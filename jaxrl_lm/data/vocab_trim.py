"""A byte-level BPE tokenizer cut down to the tokens a task uses, with the same tokenization of the task's text.

A pretrained trunk carries its whole vocabulary into every vocabulary-sized head: SmolLM2's 49 152 ids make each
linear Q-head ``576 x 49152`` (28M parameters) and each decision slot's head multiply 28M multiply-adds, while
twenty questions' episodes use about a hundred distinct tokens. ``trim_bpe`` keeps

- every token the given texts encode to (each text encoded alone, as the episode layout encodes turns),
- every token an earlier merge must build on the way to those (the merge closure, below),
- the byte-level alphabet symbols of the vocabulary, so that any text the old tokenizer encodes still encodes
  (an unseen word falls back to shorter pieces instead of failing), and every added (special) token,

and returns a tokenizer over only those, renumbered ``0..n-1`` in their old order, plus ``kept`` (``[n] int64``,
old id of each new id), with which the model's vocabulary rows are gathered (``jaxrl_lm.interop.vocab_trim``).

Why the texts tokenize exactly as before: BPE merges the adjacent pair of lowest rank until none applies. Every
merge the old tokenizer applies to a kept text produces a token that is either in the final tokens (kept) or
merged again later into one (kept by the closure: for each kept token, both halves of every merge that yields
it are kept). The trimmed merges are the old ones whose two halves and result are all kept, in the old order;
so at each step the old choice is still present and still of lowest rank among the present pairs, and every
step makes the same choice. Text outside the given ones may split differently (into kept pieces), never fails.
Pure functions over a ``tokenizers.Tokenizer``'s JSON; only BPE models are supported.
"""

from __future__ import annotations

import json
from typing import Iterable

import numpy as np
import tokenizers
from tokenizers import pre_tokenizers


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    """Merges as pairs; ``tokenizers`` writes ``["a", "b"]`` (>= 0.20) or ``"a b"`` (older files)."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def trim_bpe(backend: tokenizers.Tokenizer, texts: Iterable[str]) -> tuple[tokenizers.Tokenizer, np.ndarray]:
    """``(trimmed tokenizer, kept)``: see the module docstring. ``kept[i]`` is the old id of new id ``i``.

    Raises ``ValueError`` for a tokenizer that is not BPE.
    """
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"vocabulary trimming supports BPE tokenizers, not {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    token_of = {i: t for t, i in vocab.items()}
    added = {a["id"]: a["content"] for a in spec.get("added_tokens", [])}

    used: set[int] = set()
    for enc in backend.encode_batch(list(texts), add_special_tokens=False):
        used.update(enc.ids)
    # The byte-level symbols the vocabulary has (SmolLM2's lacks 21 bytes that valid UTF-8 never holds, such as
    # 0xC0 and 0xF5..0xFF): whatever text the old tokenizer encodes, the trimmed one encodes.
    used.update(vocab[ch] for ch in pre_tokenizers.ByteLevel.alphabet() if ch in vocab)

    pairs = _merge_pairs(model.get("merges", []))
    makers: dict[str, list[tuple[str, str]]] = {}
    for a, b in pairs:
        makers.setdefault(a + b, []).append((a, b))
    keep_tokens = {token_of[i] for i in used if i in token_of}
    stack = list(keep_tokens)
    while stack:  # the merge closure: both halves of every merge that yields a kept token
        for a, b in makers.get(stack.pop(), ()):
            for half in (a, b):
                if half not in keep_tokens and half in vocab:
                    keep_tokens.add(half)
                    stack.append(half)
    kept_ids = sorted({vocab[t] for t in keep_tokens} | set(added))
    new_id = {old: new for new, old in enumerate(kept_ids)}

    model["vocab"] = {token_of[old]: new_id[old] for old in kept_ids if old in token_of}
    model["merges"] = [[a, b] for a, b in pairs if a in keep_tokens and b in keep_tokens and a + b in keep_tokens]
    for entry in spec.get("added_tokens", []):
        entry["id"] = new_id[entry["id"]]
    _renumber_post_processor(spec.get("post_processor"), new_id)
    trimmed = tokenizers.Tokenizer.from_str(json.dumps(spec))
    trimmed.encode_special_tokens = backend.encode_special_tokens
    return trimmed, np.asarray(kept_ids, dtype=np.int64)


def _renumber_post_processor(proc: dict | None, new_id: dict[int, int]) -> None:
    """Template post-processors name special tokens by id; renumber them (a ByteLevel one names none)."""
    if not proc:
        return
    for sub in proc.get("processors", []):
        _renumber_post_processor(sub, new_id)
    for special in proc.get("special_tokens", {}).values():
        special["ids"] = [new_id[i] for i in special.get("ids", [])]
