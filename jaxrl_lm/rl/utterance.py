"""The utterance-level MDP (docs/design.md section 9): a whole agent turn is one action.

Arrays in, arrays out, on the batch layout of ``jaxrl_lm.batch``; every output is ``[B, L]`` and indexed by the
position ``e`` that *ends* an agent turn ``u`` (its last token, the EOT in the data layout), where the critic
reads ``Q(s, u)`` after the trunk has read the history and then the whole turn. The utterance-level critic
(``utterance_q.py``) reads it; token-level Q-learning (``transitions.py``) does not. Below the transitions: the
static slots the critic gathers turns and candidate states into, and the layout that appends sampled turns to a
row so that they share one copy of their history.

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

import jax
import jax.numpy as jnp

from jaxrl_lm.rl.transitions import (
    first_positions, gather_rows, next_at_or_after, segment_last_position, shift_left,
)


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


# ----------------------------------------------------------------------------------------------------------------
# Static slots: the utterance-level loss reads a row's turns and candidate states from fixed-size buffers.


class TurnSlots(NamedTuple):
    """A row's turns and the states where turns are sampled, in position order, in ``S`` static slots each.

    A *candidate state* is a state some turn is taken from (``o(u)`` of every turn) or bootstraps at without a
    next turn of its own (``s+`` of a cut episode's last turn); the critic scores sampled turns there.

    turn_end:    [B, S] int32  e of the row's m-th turn (0 where unused)
    turn_used:   [B, S] bool   slot m holds a turn
    state:       [B, S] int32  position of the row's m-th candidate state (0 where unused)
    state_used:  [B, S] bool   slot m holds a candidate state
    turn_state:  [B, S] int32  the state slot of turn m's own state s
    turn_next:   [B, S] int32  the state slot of its next state s+ (meaningful where the turn bootstraps)
    dropped:     []     float32  turns and candidate states that did not fit in ``S`` slots (must be 0)
    """

    turn_end: jnp.ndarray
    turn_used: jnp.ndarray
    state: jnp.ndarray
    state_used: jnp.ndarray
    turn_state: jnp.ndarray
    turn_next: jnp.ndarray
    dropped: jnp.ndarray


def turn_slots(tt: TurnTransitions, capacity: int) -> TurnSlots:
    """Packs the turns of ``tt`` and their candidate states into ``capacity`` slots per row."""
    length = tt.turn_end.shape[-1]
    bootstraps = tt.turn_end & ~tt.next_is_turn & (tt.done == 0)  # a cut episode's last turn
    mark = lambda index, where: jax.vmap(  # noqa: E731
        lambda i, w: jnp.zeros(length, jnp.int32).at[i].max(w.astype(jnp.int32)))(index, where)
    is_state = (mark(tt.state_index, tt.turn_end) + mark(tt.next_index, bootstraps)) > 0
    slot_of = jnp.cumsum(is_state, axis=-1, dtype=jnp.int32) - 1  # a state position's slot
    n_turns = jnp.sum(tt.turn_end, axis=-1, dtype=jnp.int32)
    n_states = jnp.sum(is_state, axis=-1, dtype=jnp.int32)
    used = lambda n: jnp.arange(capacity)[None, :] < n[:, None]  # noqa: E731
    turn_end = first_positions(tt.turn_end, capacity)
    clip = lambda s: jnp.clip(s, 0, capacity - 1)  # noqa: E731  a dropped state's slot (counted in `dropped`)
    return TurnSlots(
        turn_end=turn_end,
        turn_used=used(n_turns),
        state=first_positions(is_state, capacity),
        state_used=used(n_states),
        turn_state=clip(gather_rows(slot_of, gather_rows(tt.state_index, turn_end))),
        turn_next=clip(gather_rows(slot_of, gather_rows(tt.next_index, turn_end))),
        dropped=jnp.sum(jnp.maximum(n_turns - capacity, 0) + jnp.maximum(n_states - capacity, 0),
                        dtype=jnp.float32),
    )


# ----------------------------------------------------------------------------------------------------------------
# Candidate turns beside the history: one copy of the history, N continuations of every candidate state.
#
# A row of ``L`` data tokens is extended with ``C`` tokens for each of ``N`` candidates at each of ``S`` state
# slots, offset-major: candidate ``(m, j)``'s ``c``-th token sits at ``L + c S N + m N + j``. Offset-major puts
# every candidate's ``c``-th token side by side, so that sampling writes ``S N`` contiguous cache slots per step.
# A candidate token sees the data tokens its state sees (those up to the state position, under the same
# attention id) and the earlier tokens of its own candidate; data tokens never see candidates. The hidden state
# of a candidate token is therefore exactly that of the history followed by the candidate alone.


def candidate_index(length: int, states: int, n: int, offset, slot, j):
    """The extended position of candidate ``(slot, j)``'s token at ``offset`` (any broadcastable int arrays)."""
    return length + offset * states * n + slot * n + j


def candidate_positions(positions: jnp.ndarray, state: jnp.ndarray, n: int, tokens: int) -> jnp.ndarray:
    """Positions of the extended row. ``positions [B, L], state [B, S] -> [B, L + tokens S n] int32``: a
    candidate's ``c``-th token continues its state's position, ``pos(state) + 1 + c``."""
    batch, states = state.shape
    start = gather_rows(positions, state)  # [B, S]
    offsets = jnp.arange(tokens, dtype=jnp.int32)[:, None, None]
    cand = start[:, None, :, None] + 1 + offsets[None]  # [B, C, S, 1]
    cand = jnp.broadcast_to(cand, (batch, tokens, states, n)).reshape(batch, tokens * states * n)
    return jnp.concatenate([positions, cand], axis=-1).astype(jnp.int32)


def candidate_mask(attention_ids: jnp.ndarray, state: jnp.ndarray, state_used: jnp.ndarray, n: int, tokens: int,
                   queries: jnp.ndarray) -> jnp.ndarray:
    """Rows ``queries`` of the extended row's attention mask.

    Args:
      attention_ids: ``[B, L]`` int32, the data's attention ids (``jaxrl_lm.batch.trunk_inputs``).
      state, state_used: ``[B, S]`` the candidate states (``TurnSlots``).
      n, tokens: candidates per state and tokens per candidate.
      queries: ``[T]`` int32 extended positions of the query tokens.

    Returns:
      ``[B, T, X]`` bool, ``X = L + tokens S n``: ``mask[b, t, k]`` iff query ``queries[t]`` sees key ``k``.
      Every row sees at least its own key (a candidate at an unused slot sees only its own tokens).
    """
    batch, length = attention_ids.shape
    states = state.shape[-1]
    width = states * n
    total = length + tokens * width
    keys = jnp.arange(total, dtype=jnp.int32)

    def parts(x):  # candidate id (m n + j), offset and slot of extended positions (data: -1, -1, 0)
        is_cand = x >= length
        rel = jnp.maximum(x - length, 0)
        return is_cand, jnp.where(is_cand, rel % width, -1), jnp.where(is_cand, rel // width, -1), (rel % width) // n

    q_cand, q_cid, q_off, q_slot = parts(queries)
    k_cand, k_cid, k_off, _ = parts(keys)
    # The data position a query reads up to, and whether it reads any data at all.
    anchor = jnp.where(q_cand[None], jnp.take_along_axis(state, jnp.broadcast_to(q_slot, (batch,) + q_slot.shape),
                                                         axis=-1), queries[None])  # [B, T]
    reads_data = jnp.where(q_cand[None], jnp.take_along_axis(
        state_used, jnp.broadcast_to(q_slot, (batch,) + q_slot.shape), axis=-1), True)
    anchor_id = gather_rows(attention_ids, anchor)  # [B, T]
    key_ids = jnp.concatenate([attention_ids, jnp.full((batch, total - length), -1, jnp.int32)], axis=-1)
    sees_data = (~k_cand[None, None]) & (keys[None, None] <= anchor[..., None]) & (
        key_ids[:, None, :] == anchor_id[..., None]) & reads_data[..., None]
    sees_own = (q_cand[:, None] & k_cand[None] & (q_cid[:, None] == k_cid[None]) & (k_off[None] <= q_off[:, None]))
    return sees_data | sees_own[None]
