"""Tokenizers: Hugging Face ``tokenizers`` models from local files, and a built-in byte-level one.

``load_tokenizer(path)`` is the one entry point (``DataConfig.tokenizer``):

- ``""``: the built-in tokenizer (``build_char_tokenizer``): ids 0..3 are ``<pad> <bos> <eos> <eot>``, ids 4..259
  are the 256 bytes of the UTF-8 text (id = 4 + byte), so any text round-trips and nothing is unknown.
- a ``tokenizer.json`` file (or a directory holding only that): special tokens are found by their conventional
  names (``_SPECIAL_NAMES``); the built-in tokenizer saved with ``Tokenizer.save`` loads back this way.
- a Hugging Face directory with ``tokenizer_config.json``: loaded with ``PreTrainedTokenizerFast``; its declared
  ``bos_token`` / ``eos_token`` / ``pad_token`` win over the conventional names.

A relative path that does not exist from the working directory is read from the repository root, as config
files are (the task configs name ``configs/tokenizers/*.json``). ``train_bpe_tokenizer`` makes a byte-level BPE
for a dataset (``scripts/make_tokenizer.py``): a model trained from scratch then reads a word such as
``" right"`` as one token instead of six bytes. ``save_tokenizer`` writes any of them as a Hugging Face tokenizer
directory (``transformers.AutoTokenizer.from_pretrained`` loads it), as a model export does.

The episode layout (``convert.py``) needs four ids: BOS starts an episode, EOT ends every turn, PAD fills unused
positions, EOS is kept for generation. A tokenizer without a dedicated end-of-turn or pad token uses its EOS.
Special tokens written inside episode text are encoded as plain text, so an episode can never inject a
control token (e.g. a fake end of turn).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from jaxrl_lm.config import REPO_ROOT

CHAR_SPECIALS = ("<pad>", "<bos>", "<eos>", "<eot>")
# Files of a HF tokenizer directory, copied as they are where a tokenizer travels with a model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")

# Conventional spellings per role (first match wins), and whether a missing one falls back to the EOS token.
_SPECIAL_NAMES: dict[str, tuple[tuple[str, ...], bool]] = {
    "bos": (("<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>"), False),
    "eos": (("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>"), False),
    "eot": (("<eot>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>"), True),
    "pad": (("<pad>", "<|pad|>", "[PAD]"), True),
}


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the special ids the episode layout uses.

    Attributes:
      backend: the wrapped ``tokenizers.Tokenizer`` (set to encode special-token text as plain text).
      bos_id, eos_id, eot_id, pad_id: special token ids.
      name: where it came from (for messages).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, specials: dict[str, str], name: str):
        backend.encode_special_tokens = True
        self.backend = backend
        self.name = name
        self.special_tokens = dict(specials)
        ids = {}
        for role, token in specials.items():
            tid = backend.token_to_id(token)
            if tid is None:
                raise ValueError(f"tokenizer {name}: {role} token {token!r} is not in its vocabulary")
            ids[role] = tid
        self.bos_id, self.eos_id, self.eot_id, self.pad_id = ids["bos"], ids["eos"], ids["eot"], ids["pad"]

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's ``vocab_size`` must be at least this)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """A short hash of the vocabulary, rules and special tokens; a built dataset records it."""
        h = hashlib.sha256(self.backend.to_str().encode())
        h.update(repr(sorted(self.special_tokens.items())).encode())
        return h.hexdigest()[:16]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text, no special tokens added. Returns a list of ``[n_i] int32``."""
        encs = self.backend.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> Path:
        """Writes ``tokenizer.json`` (``path`` is the file, or a directory to put it in); returns the file."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / "tokenizer.json"
        self.backend.save(str(path))
        return path

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"eot={self.eot_id}, pad={self.pad_id})")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, the alphabet of ``pre_tokenizers.ByteLevel``."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_char_tokenizer() -> Tokenizer:
    """The built-in byte-level tokenizer: 4 special tokens then 256 bytes (vocab_size 260), no merges."""
    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS)}
    for b, ch in _byte_to_unicode().items():
        vocab[ch] = len(CHAR_SPECIALS) + b
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting, every byte is its own token.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAR_SPECIALS])
    specials = dict(zip(("pad", "bos", "eos", "eot"), CHAR_SPECIALS))
    return Tokenizer(backend, specials=specials, name="built-in byte tokenizer")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE learned from ``texts``: ids 0..3 are ``<pad> <bos> <eos> <eot>`` (as in the built-in
    tokenizer), then the 256 bytes, then merges until ``vocab_size`` ids or until no pair repeats.

    GPT-2's pre-tokenizer splits words, numbers and punctuation first, so a merge never crosses a word boundary,
    and every byte is in the alphabet, so any text round-trips, also text the training data never held. The
    same texts always give the same tokenizer.
    """
    if vocab_size < len(CHAR_SPECIALS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(CHAR_SPECIALS) + 256} ids of the special "
                         f"tokens and the 256 bytes")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CHAR_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    specials = dict(zip(("pad", "bos", "eos", "eot"), CHAR_SPECIALS))
    return Tokenizer(backend, specials=specials, name=f"byte-level BPE of {backend.get_vocab_size()} ids")


def _conventional_specials(backend: tokenizers.Tokenizer, declared: dict[str, str | None], name: str) -> dict[str, str]:
    """Special token strings: ``declared`` (from a HF config) first, then ``_SPECIAL_NAMES``, then EOS."""
    vocab = backend.get_vocab(with_added_tokens=True)
    out: dict[str, str] = {}
    for role in ("bos", "eos", "eot", "pad"):
        names, eos_fallback = _SPECIAL_NAMES[role]
        found = declared.get(role) or next((n for n in names if n in vocab), None)
        if found is None and eos_fallback:
            found = out["eos"]
        if found is None:
            raise ValueError(
                f"tokenizer {name}: no {role.upper()} token; expected one of {list(names)} in its vocabulary, or "
                f"a directory whose tokenizer_config.json declares {role}_token")
        out[role] = found
    return out


def _load_hf_directory(path: Path) -> Tokenizer:
    # transformers is slow to import; only directories with a HF config need it.
    from transformers import PreTrainedTokenizerFast

    try:
        hf = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises JSON, type, value and OS errors that do not name the directory
        raise ValueError(f"data.tokenizer: {path}: not a loadable Hugging Face tokenizer directory: "
                         f"{type(e).__name__}: {e}") from e
    declared = {"bos": hf.bos_token, "eos": hf.eos_token, "pad": hf.pad_token}
    backend = hf.backend_tokenizer
    return Tokenizer(backend, specials=_conventional_specials(backend, declared, str(path)), name=str(path))


def load_tokenizer(path: str | Path = "") -> Tokenizer:
    """The tokenizer named by ``DataConfig.tokenizer``: ``""`` (built-in), a tokenizer.json, or a HF directory."""
    if str(path) == "":
        return build_char_tokenizer()
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    if p.is_dir():
        if (p / "tokenizer_config.json").is_file():
            return _load_hf_directory(p)
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"data.tokenizer: no tokenizer.json or Hugging Face tokenizer directory at {path}")
    try:
        backend = tokenizers.Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust library raises a bare Exception ("expected value at line 1 column 1")
        raise ValueError(f"data.tokenizer: {p}: not a valid tokenizer.json: {e}") from e
    return Tokenizer(backend, specials=_conventional_specials(backend, {}, str(p)), name=str(p))


def save_tokenizer(tokenizer: Tokenizer | str | Path, out: str | Path) -> Tokenizer:
    """Writes a tokenizer that ``AutoTokenizer.from_pretrained(out)`` loads; returns it as our ``Tokenizer``.

    ``tokenizer``: a HF tokenizer directory (its files are copied as they are, chat template included), a
    ``tokenizer.json`` path, ``""`` (the built-in byte tokenizer) or a ``Tokenizer``. The last three are written
    as a ``PreTrainedTokenizerFast`` (``tokenizer.json`` + ``tokenizer_config.json``) with our BOS/EOS/PAD and the
    end-of-turn token as an extra special token. (HF encodes special-token text in a string as that token;
    ``Tokenizer.encode_batch`` encodes it as plain text.)
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, (str, Path)) and (Path(tokenizer) / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copy2(Path(tokenizer) / name, out / name)
        return load_tokenizer(tokenizer)
    # transformers is slow to import; only writing a HF tokenizer directory needs it.
    from transformers import PreTrainedTokenizerFast

    ours = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    # A fresh copy: ours encodes special-token text as plain text, which HF users would not expect.
    backend = tokenizers.Tokenizer.from_str(ours.backend.to_str())
    s = ours.special_tokens
    extra = [s["eot"]] if s["eot"] not in (s["bos"], s["eos"], s["pad"]) else []
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=s["bos"], eos_token=s["eos"], pad_token=s["pad"],
                            additional_special_tokens=extra).save_pretrained(out)
    return ours
