"""The batch contract shared by the data pipeline, the update and the tests (docs/design.md section 2).

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

Optional fields, present only when their producer adds them:

- ``imitate`` (int32 ``[B, L]``, ``IMITATE``): 1 on the tokens of episodes the BC term may clone, 0 elsewhere;
  absent = every episode. The online loader adds it with ``online.imitate: offline`` (1 on its offline share).
- ``features`` (float32 ``[B, L, D]``): the frozen trunk bottom's cached output (``jaxrl_lm.train.features``).

Positions restart at 0 at the start of every segment (see ``segment_positions``). With ``model.context:
observation`` the trunk reads narrower windows (see ``trunk_inputs``); the Bellman backup still follows the
episode's segment.
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

IMITATE = "imitate"  # the optional per-token field above
OPTIONAL_FIELDS: dict[str, np.dtype] = {IMITATE: np.dtype(np.int32)}


def check_batch(batch: Mapping[str, object]) -> tuple[int, int]:
    """Checks field names, dtypes and shapes (the optional ``[B, L]`` fields too, when present); returns
    ``(B, L)``. Raises ValueError naming the field."""
    missing = sorted(set(BATCH_FIELDS) - set(batch))
    extra = sorted(set(batch) - set(BATCH_FIELDS) - set(OPTIONAL_FIELDS))
    if missing or extra:
        raise ValueError(f"batch fields: missing {missing}, unexpected {extra}")
    shape = None
    fields = {**BATCH_FIELDS, **{k: dt for k, dt in OPTIONAL_FIELDS.items() if k in batch}}
    for name, dtype in fields.items():
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


def _changes(x: jnp.ndarray) -> jnp.ndarray:
    """``[..., L] -> [..., L]`` bool: True where ``x`` differs from the previous token, and at index 0."""
    return jnp.concatenate([jnp.ones_like(x[..., :1], dtype=bool), x[..., 1:] != x[..., :-1]], axis=-1)


def _positions_from_starts(starts: jnp.ndarray) -> jnp.ndarray:
    """``[..., L]`` bool run starts -> ``[..., L]`` int32 offset of each token from the start of its run."""
    idx = jnp.arange(starts.shape[-1], dtype=jnp.int32)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=starts.ndim - 1)


def segment_positions(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Position of each token within its segment. ``[B, L] int32 -> [B, L] int32``.

    A segment is a maximal run of one id, so a position resets wherever the id changes.
    """
    return _positions_from_starts(_changes(segment_ids))


def observation_windows(batch: Mapping[str, jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The trunk's inputs when the state is the latest observation (``model.context: observation``).

    Every observation turn opens a window holding that turn and the action turns after it, up to the next
    observation turn; a segment's first token (BOS) is a window of its own. Tokens attend only within their
    window and positions restart at its first token, so the hidden state at an observation's last token depends
    on that observation's tokens alone: wherever the observation stands in an episode, and exactly as a policy
    prompted with that turn alone (no BOS) computes it. The backup still runs along the whole segment.

    Returns:
      ``(positions, attention_ids)``, both ``[B, L] int32``: positions within each window, and an id per
      window, unique within its row (``attention_mask`` compares ids for equality only).
    """
    segment_start = _changes(batch["segment_ids"])
    after_segment_start = jnp.concatenate(
        [jnp.zeros_like(segment_start[..., :1]), segment_start[..., :-1]], axis=-1)
    # BOS carries the turn id of the token after it, so the first observation starts where its segment's BOS ends.
    turn_start = _changes(batch["turn_ids"]) | after_segment_start
    starts = segment_start | (turn_start & (batch["action_mask"] == 0))
    return _positions_from_starts(starts), jnp.cumsum(starts, axis=-1, dtype=jnp.int32)


def trunk_inputs(batch: Mapping[str, jnp.ndarray], context: str) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(positions, attention_ids)``, ``[B, L] int32`` each, for ``model.hidden`` under ``model.context``.

    ``history``: positions within each segment and the segment ids (a token reads its whole episode so far);
    ``observation``: ``observation_windows``.
    """
    if context == "observation":
        return observation_windows(batch)
    return segment_positions(batch["segment_ids"]), batch["segment_ids"]
