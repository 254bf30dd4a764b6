"""The utterance-level MDP (docs/design.md section 9): a whole agent turn is one action.

Arrays in, arrays out, on the batch layout of ``jaxrl_lm.batch``; every output is ``[B, L]`` and indexed by the
position ``e`` that *ends* an agent turn ``u`` (its last token, the EOT in the data layout), where the critic
reads ``Q(s, u)`` after the trunk has read the history and then the whole turn. This is the groundwork of the
utterance-level critic; token-level Q-learning (``transitions.py``) does not use it.

- An agent turn is a maximal run of action tokens within one segment; ``turn_end[e]`` marks its last token.
- Its state ``s`` is read at ``o(u)``, the token just before the turn's first token (the end of the observation
  before it). A turn whose ``o(u)`` is not in its own segment (a turn at a segment's very start) has no state
  and is not a turn here; the data layout's BOS never lets that happen.
- Reward of a turn: the sum of ``reward`` over its tokens; ``done``: the ``done`` of its last token.
- Next state ``s+``: ``o(u+)`` of the next turn ``u+`` of the same segment; with no next turn, the segment's last
  position (an ended episode does not back up, ``done = 1``; a cut one bootstraps there).
- One ``gamma`` per turn.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax.numpy as jnp

from jaxrl_lm.rl.transitions import next_at_or_after, shift_left, segment_last_position


class TurnTransitions(NamedTuple):
    """Per-position turn data; entries where ``turn_end`` is False are zero (indices: the position itself).

    turn_end:        [B, L] bool     e is the last token of an agent turn u (with a state in its segment)
    state_index:     [B, L] int32    o(u): the token before u's first token (V(s) is read there)
    reward:          [B, L] float32  r(u) = sum of reward over u's tokens
    done:            [B, L] float32  done of u's last token
    discount:        [B, L] float32  gamma at every turn end
    next_index:      [B, L] int32    s+: o(u+) of the next turn of the segment, else the segment's last position
    next_is_turn:    [B, L] bool     u has a next turn u+ in its segment
    next_turn_end:   [B, L] int32    e(u+) where next_is_turn (Q(s+, u+_data) is read there), else e itself
    """

    turn_end: jnp.ndarray
    state_index: jnp.ndarray
    reward: jnp.ndarray
    done: jnp.ndarray
    discount: jnp.ndarray
    next_index: jnp.ndarray
    next_is_turn: jnp.ndarray
    next_turn_end: jnp.ndarray


def _shift_right(x: jnp.ndarray, fill) -> jnp.ndarray:
    """``out[..., i] = x[..., i-1]``, with ``fill`` at the first position."""
    return jnp.concatenate([jnp.full_like(x[..., :1], fill), x[..., :-1]], axis=-1)


def turn_transitions(batch: Mapping[str, jnp.ndarray], *, gamma: float) -> TurnTransitions:
    """Builds the TurnTransitions of a batch (fields of ``jaxrl_lm.batch.BATCH_FIELDS``)."""
    seg, action = batch["segment_ids"], batch["action_mask"] == 1
    length = seg.shape[-1]
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), seg.shape)
    acting = action & (seg != 0)
    continues = shift_left(acting, False) & (shift_left(seg, 0) == seg)  # the next token is of the same turn
    started = _shift_right(acting, False) & (_shift_right(seg, 0) == seg)  # the previous token is of the same turn
    run_first = acting & ~started  # the first token of every maximal run of agent tokens
    has_state = (_shift_right(seg, 0) == seg) & (positions > 0)  # the token before it is in the same segment
    # Each position's nearest run start at or before it (for an agent token: its own run's first token).
    first_of = length - 1 - jnp.flip(next_at_or_after(jnp.flip(run_first, -1)), -1)
    safe_first = jnp.clip(first_of, 0, length - 1)
    turn_end = acting & ~continues & jnp.take_along_axis(has_state, safe_first, axis=-1)
    state_index = jnp.where(turn_end, safe_first - 1, positions).astype(jnp.int32)

    rewards = jnp.cumsum(batch["reward"].astype(jnp.float32), axis=-1)
    reward = jnp.where(turn_end, rewards - jnp.take_along_axis(rewards, state_index, axis=-1), 0.0)
    done = jnp.where(turn_end, batch["done"].astype(jnp.float32), 0.0)

    last = segment_last_position(seg)
    # The first run after e: the next turn's start when it lies in e's segment (a run that opens a segment, the
    # one kind without a state, is never the next turn of an earlier one).
    next_start = next_at_or_after(shift_left(run_first, False)) + 1
    next_is_turn = turn_end & (next_start <= last)
    safe_start = jnp.clip(next_start, 0, length - 1)
    next_index = jnp.where(turn_end, jnp.where(next_is_turn, safe_start - 1, last), positions).astype(jnp.int32)
    next_end = next_at_or_after(turn_end)  # the first turn end at or after j: u+'s own end when j starts u+
    next_turn_end = jnp.where(next_is_turn, jnp.take_along_axis(next_end, safe_start, axis=-1), positions)
    return TurnTransitions(
        turn_end=turn_end,
        state_index=state_index,
        reward=reward.astype(jnp.float32),
        done=done,
        discount=jnp.where(turn_end, jnp.float32(gamma), 0.0),
        next_index=next_index,
        next_is_turn=next_is_turn,
        next_turn_end=next_turn_end.astype(jnp.int32),
    )
