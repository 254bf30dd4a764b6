"""The batch contract shared by the data pipeline, the update and the tests (DESIGN.md section 2).

A batch is a dict of arrays, all of shape ``[B, L]``:

===============  =======  ==================================================================================
field            dtype    meaning
===============  =======  ==================================================================================
``tokens``       int32    token ids ``x[0..L-1]``
``action_mask``  int32    1 where the token was emitted by the agent
``reward``       float32  reward received right after this token (non-zero only on action tokens)
``done``         int32    1 on the last action token of an episode that really ended (not on a truncation)
``segment_ids``  int32    episode id within a packed row, 1, 2, ...; 0 = padding
``turn_ids``     int32    index of the turn the token belongs to, within its episode
===============  =======  ==================================================================================

Positions restart at 0 at the start of every segment (see ``segment_positions``).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

BATCH_FIELDS: dict[str, np.dtype] = {
    "tokens": np.dtype(np.int32),
    "action_mask": np.dtype(np.int32),
    "reward": np.dtype(np.float32),
    "done": np.dtype(np.int32),
    "segment_ids": np.dtype(np.int32),
    "turn_ids": np.dtype(np.int32),
}


def check_batch(batch: Mapping[str, object]) -> tuple[int, int]:
    """Checks field names, dtypes and shapes; returns ``(B, L)``. Raises ValueError naming the field."""
    missing = sorted(set(BATCH_FIELDS) - set(batch))
    extra = sorted(set(batch) - set(BATCH_FIELDS))
    if missing or extra:
        raise ValueError(f"batch fields: missing {missing}, unexpected {extra}")
    shape = None
    for name, dtype in BATCH_FIELDS.items():
        arr = batch[name]
        if arr.dtype != dtype:  # type: ignore[attr-defined]
            raise ValueError(f"batch[{name!r}] has dtype {arr.dtype}, expected {dtype}")  # type: ignore[attr-defined]
        if arr.ndim != 2:  # type: ignore[attr-defined]
            raise ValueError(f"batch[{name!r}] must be [B, L], got shape {arr.shape}")  # type: ignore[attr-defined]
        if shape is None:
            shape = arr.shape  # type: ignore[attr-defined]
        elif arr.shape != shape:  # type: ignore[attr-defined]
            raise ValueError(f"batch[{name!r}] has shape {arr.shape}, other fields {shape}")  # type: ignore[attr-defined]
    assert shape is not None
    return int(shape[0]), int(shape[1])


def segment_positions(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Position of each token within its segment. ``[B, L] int32 -> [B, L] int32``.

    A segment is a maximal run of one id, so a position resets wherever the id changes.
    """
    idx = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], dtype=bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    start_idx = jnp.where(starts, idx, 0)
    return idx - jax.lax.cummax(start_idx, axis=start_idx.ndim - 1)
