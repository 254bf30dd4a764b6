"""The batches a run of a config trains on, as one iterator: tokenizer, vocabulary check and loader in one call.

``scripts/train.py`` builds the same three things itself (it also needs the loader's state for checkpoints);
a notebook or ``train_seeds`` only needs the batches.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np

from jaxrl_lm import data
from jaxrl_lm.config import Config
from jaxrl_lm.train.loop import check_vocab


def batches(cfg: Config, episodes: Optional[Iterable[Mapping[str, Any]]] = None, *, steps: Optional[int] = None,
            tokenizer: Optional[data.Tokenizer] = None) -> Iterator[dict[str, np.ndarray]]:
    """Training batches of ``cfg.data``: dicts of numpy ``[data.batch_size, data.seq_len]`` arrays (``jaxrl_lm.batch``).

    Args:
      cfg: ``data`` says where the episodes come from (``data.path``: JSONL, a built dataset directory or
        ``task:NAME``), how they are shuffled (``data.seed``), packed and cut; ``model.vocab_size`` must hold
        the tokenizer's ids.
      episodes: episode dicts in the JSONL format (e.g. ``jaxrl_lm.envs.make_dataset(...)[0]``) used instead
        of ``data.path``.
      steps: stop after this many batches; None = as many as ``data.num_epochs`` gives (0 = forever).
      tokenizer: default ``load_tokenizer(cfg.data.tokenizer)``.

    The loader is built here, so a bad path, episode or vocabulary size fails at this call, not at the first
    batch; it is closed when the iterator is exhausted or discarded. Batches come in the order the training
    loop reads them (the same ``data.seed`` gives the same batches). Single process. Example::

        episodes, _ = jaxrl_lm.envs.make_dataset("grid", episodes=500, seed=0)
        for batch in jaxrl_lm.batches(cfg, episodes, steps=100):
            state, metrics = update(state, batch)
    """
    tokenizer = tokenizer or data.load_tokenizer(cfg.data.tokenizer)
    check_vocab(cfg, tokenizer)
    loader = data.make_loader(cfg.data, tokenizer=tokenizer, episodes=episodes)
    return _take(loader, steps)


def _take(loader: data.Loader, steps: Optional[int]) -> Iterator[dict[str, np.ndarray]]:
    # A generator's finally runs on exhaustion, on close() and when it is garbage collected, so an abandoned
    # notebook loop still stops the loader's prefetch thread.
    try:
        yield from itertools.islice(loader, steps)
    finally:
        loader.close()
