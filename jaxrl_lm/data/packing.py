"""Rows of ``seq_len`` tokens from variable-length episodes: packed (several episodes per row) or one per row.

Packing is grain's first-fit packer with ``rows`` bins: each episode goes into the first row with room for all
of it, and when it fits in none the ``rows`` rows are emitted and a fresh set starts with it. An episode is
never split across rows. In a row, episodes get ``segment_ids`` 1, 2, 3, ... in order; padding has
``segment_ids`` 0, ``tokens`` = the tokenizer's pad id and 0 in every other field.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import grain
import numpy as np

from jaxrl_lm.batch import BATCH_FIELDS
from jaxrl_lm.data.convert import TOKEN_FIELDS


def select_fields(element: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``TOKEN_FIELDS`` arrays of a stored episode (a dict or a TFDS record), with their contract dtypes."""
    return {k: np.asarray(element[k], dtype=dt) for k, dt in TOKEN_FIELDS.items()}


def pad_row(episode: Mapping[str, np.ndarray], seq_len: int, pad_id: int,
            extra: Mapping[str, np.dtype] | None = None) -> dict[str, np.ndarray]:
    """One episode alone in a row: ``TOKEN_FIELDS`` ``[n]`` -> ``BATCH_FIELDS`` ``[seq_len]``, segment id 1
    (and the ``extra`` per-token fields the episode carries, 0 on padding)."""
    n = episode["tokens"].shape[0]
    if n > seq_len:
        raise ValueError(f"an episode of {n} tokens does not fit data.seq_len={seq_len}")
    row = empty_rows(1, seq_len, pad_id, extra)
    for k in {**TOKEN_FIELDS, **(extra or {})}:
        row[k][0, :n] = episode[k]
    row["segment_ids"][0, :n] = 1
    return {k: v[0] for k, v in row.items()}


def empty_rows(rows: int, seq_len: int, pad_id: int, extra: Mapping[str, np.dtype] | None = None
               ) -> dict[str, np.ndarray]:
    """All-padding ``BATCH_FIELDS`` (and ``extra``) arrays ``[rows, seq_len]``."""
    out = {k: np.zeros((rows, seq_len), dt) for k, dt in {**BATCH_FIELDS, **(extra or {})}.items()}
    out["tokens"][:] = pad_id
    return out


def _from_grain_row(row: Mapping[str, np.ndarray], fields: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    # grain adds <field>_segment_ids / <field>_positions per packed field; all fields share one layout.
    out = {k: np.asarray(row[k], dtype=dt) for k, dt in fields.items()}
    out["segment_ids"] = np.asarray(row["tokens_segment_ids"], dtype=np.int32)
    return out


def rows_dataset(episodes: grain.IterDataset, *, seq_len: int, rows: int, pad_id: int, pack: bool,
                 extra: Mapping[str, np.dtype] | None = None) -> grain.IterDataset:
    """An ``IterDataset`` of ``BATCH_FIELDS`` rows ``[seq_len]`` from one of ``TOKEN_FIELDS`` episodes ``[n]``.

    ``rows`` is the number of packing bins (a batch's rows, so each emitted set fills one batch). ``extra``:
    further per-token fields the episodes carry (e.g. the loader's ``token_index``), laid out like the tokens and
    0 on padding.
    """
    if not pack:
        return episodes.map(lambda ep: pad_row(ep, seq_len, pad_id, extra))
    fields = {**TOKEN_FIELDS, **(extra or {})}
    padding = {k: (pad_id if k == "tokens" else 0) for k in fields}
    packed = grain.experimental.FirstFitPackIterDataset(
        episodes, length_struct={k: seq_len for k in fields}, num_packing_bins=rows,
        shuffle_bins=False,  # episodes arrive shuffled already; keeping bin order keeps batches readable
        padding_struct=padding)
    return packed.map(lambda row: _from_grain_row(row, fields))


def fill_batch(batch: Mapping[str, np.ndarray], rows: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pads a short final batch ``[b < rows, L]`` with all-padding rows so every batch is ``[rows, L]``."""
    b, seq_len = batch["tokens"].shape
    if b == rows:
        return dict(batch)
    extra = {k: v.dtype for k, v in batch.items() if k not in BATCH_FIELDS}
    pad = empty_rows(rows - b, seq_len, pad_id, extra)
    return {k: np.concatenate([batch[k], pad[k]]) for k in batch}


def episodes_to_batch(episodes: Sequence[Mapping[str, np.ndarray]], seq_len: int, *, pack: bool = True,
                      pad_id: int = 0, extra: Mapping[str, np.dtype] | None = None) -> dict[str, np.ndarray]:
    """All ``episodes`` (``TOKEN_FIELDS`` dicts, in order) in one batch: ``BATCH_FIELDS`` ``[R, seq_len]``, and the
    ``extra`` per-token fields every episode carries (laid out like its tokens, 0 on padding).

    Packed, ``R`` is the number of first-fit rows needed; unpacked, ``R = len(episodes)``.
    """
    if not episodes:
        raise ValueError("episodes_to_batch needs at least one episode")
    for i, ep in enumerate(episodes):
        if ep["tokens"].shape[0] > seq_len:
            raise ValueError(f"episodes[{i}] has {ep['tokens'].shape[0]} tokens, more than seq_len={seq_len}")
    extra = dict(extra or {})
    records = [{**select_fields(e), **{k: np.asarray(e[k], dtype=dt) for k, dt in extra.items()}} for e in episodes]
    ds = grain.MapDataset.source(records).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))  # in memory: reader threads would only wait
    rows = list(rows_dataset(ds, seq_len=seq_len, rows=len(episodes), pad_id=pad_id, pack=pack, extra=extra))
    return {k: np.stack([r[k] for r in rows]) for k in {**BATCH_FIELDS, **extra}}


def packing_efficiency(batch: Mapping[str, np.ndarray]) -> float:
    """Fraction of positions holding a real token (``segment_ids != 0``) in a ``[B, L]`` batch."""
    return float(np.mean(np.asarray(batch["segment_ids"]) != 0))
