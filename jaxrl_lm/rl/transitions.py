"""The token-level MDP of docs/design.md section 2: which positions are decisions, where each backs up to, and how
much it is discounted. Arrays in, arrays out; every output is ``[B, L]`` and indexed by the position ``i`` whose
hidden state ``h_i`` scores the action ``a_i = x[i+1]``.
"""

from __future__ import annotations

from typing import Literal, Mapping, NamedTuple

import jax
import jax.numpy as jnp


class Transitions(NamedTuple):
    """Per-position transition data; entries where ``decision`` is False are zero (indices: the position itself).

    decision:         [B, L] bool     i is in D: x[i+1] is an agent token of the same (non-padding) segment
    action:           [B, L] int32    a_i = x[i+1]
    reward:           [B, L] float32  r_i = reward[i+1]
    done:             [B, L] float32  d_i = done[i+1]
    discount:         [B, L] float32  g_i: gamma, or 1 within an utterance when time steps are utterances
    next_index:       [B, L] int32    n(i): next decision of the same segment, else the segment's last position
    next_is_decision: [B, L] bool     n(i) is in D (so it has a data action x[n(i)+1], used by sarsa)
    next_action:      [B, L] int32    x[n(i)+1] where next_is_decision, else 0
    """

    decision: jnp.ndarray
    action: jnp.ndarray
    reward: jnp.ndarray
    done: jnp.ndarray
    discount: jnp.ndarray
    next_index: jnp.ndarray
    next_is_decision: jnp.ndarray
    next_action: jnp.ndarray


def first_positions(mask: jnp.ndarray, capacity: int, fill: int = 0) -> jnp.ndarray:
    """Per row, the first ``capacity`` positions where ``mask`` holds, padded with ``fill``. ``[B, L] -> [B, M]
    int32``: the static slots every head gathers its rows into."""
    return jax.vmap(lambda m: jnp.nonzero(m, size=capacity, fill_value=fill)[0].astype(jnp.int32))(mask)


def gather_rows(x: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
    """``x [B, L, ...]`` at per-row positions ``index [B, ...]`` -> ``[B, ..., ...]``."""
    return jax.vmap(lambda row, i: row[i])(x, index)


def shift_left(x: jnp.ndarray, fill) -> jnp.ndarray:
    """``out[..., i] = x[..., i+1]``, with ``fill`` at the last position."""
    return jnp.concatenate([x[..., 1:], jnp.full_like(x[..., :1], fill)], axis=-1)


def next_at_or_after(candidate: jnp.ndarray) -> jnp.ndarray:
    """Smallest ``j >= i`` with ``candidate[j]``, per row; ``L`` where there is none. ``[B, L] bool -> int32``."""
    length = candidate.shape[-1]
    idx = jnp.where(candidate, jnp.arange(length, dtype=jnp.int32), length)
    return jax.lax.cummin(idx, axis=idx.ndim - 1, reverse=True)


def decision_positions(action_mask: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
    """D = {i : action_mask[i+1] = 1 and seg[i+1] = seg[i] != 0}. ``[B, L] -> [B, L] bool``."""
    next_is_action = shift_left(action_mask, 0) == 1
    same_segment = (shift_left(segment_ids, 0) == segment_ids) & (segment_ids != 0)
    return next_is_action & same_segment


def segment_last_position(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Index of the last position of the segment (maximal run of one id) holding each position. ``[B, L] int32``."""
    ends = shift_left(segment_ids, -1) != segment_ids
    ends = ends.at[..., -1].set(True)
    return next_at_or_after(ends)


def next_state_index(decision: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
    """n(i): the smallest decision j > i in the same segment, else the segment's last position. ``[B, L] int32``.

    Observation tokens between two decisions are skipped: the environment's move is part of the transition.
    Segments are contiguous runs, so the first later decision is in i's segment iff it comes before its end.
    """
    length = decision.shape[-1]
    next_decision = next_at_or_after(shift_left(decision, False)) + 1  # smallest j > i with decision[j]
    last = segment_last_position(segment_ids)
    return jnp.where(next_decision <= last, next_decision, last).astype(jnp.int32).clip(0, length - 1)


def transitions(
    batch: Mapping[str, jnp.ndarray], *, gamma: float, time_step: Literal["token", "utterance"]
) -> Transitions:
    """Builds the Transitions of a batch (fields of ``jaxrl_lm.batch.BATCH_FIELDS``)."""
    tokens, seg, turns = batch["tokens"], batch["segment_ids"], batch["turn_ids"]
    decision = decision_positions(batch["action_mask"], seg)
    zero = jnp.zeros_like(tokens)
    action = jnp.where(decision, shift_left(tokens, 0), zero)
    reward = jnp.where(decision, shift_left(batch["reward"].astype(jnp.float32), 0.0), 0.0)
    done = jnp.where(decision, shift_left(batch["done"], 0).astype(jnp.float32), 0.0)

    own_index = jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)
    next_index = jnp.where(decision, next_state_index(decision, seg), own_index)
    next_is_decision = decision & jnp.take_along_axis(decision, next_index, axis=-1)
    tokens_after = shift_left(tokens, 0)
    next_action = jnp.where(next_is_decision, jnp.take_along_axis(tokens_after, next_index, axis=-1), zero)

    if time_step == "token":
        discount = jnp.where(decision, jnp.float32(gamma), 0.0)
    elif time_step == "utterance":
        # turn(j) = turn_ids[j+1] for a decision j, turn_ids[j] for a segment's last position (never a decision).
        turn_of_state = jnp.where(decision, shift_left(turns, 0), turns)
        next_turn = jnp.take_along_axis(turn_of_state, next_index, axis=-1)
        later_turn = next_turn > shift_left(turns, 0)
        discount = jnp.where(decision, jnp.where(later_turn, jnp.float32(gamma), 1.0), 0.0)
    else:
        raise ValueError(f"rl.time_step must be 'token' or 'utterance', got {time_step!r}")

    return Transitions(
        decision=decision,
        action=action.astype(jnp.int32),
        reward=reward.astype(jnp.float32),
        done=done,
        discount=discount.astype(jnp.float32),
        next_index=next_index,
        next_is_decision=next_is_decision,
        next_action=next_action.astype(jnp.int32),
    )


def monte_carlo_returns(tr: Transitions, segment_ids: jnp.ndarray) -> jnp.ndarray:
    """G_i = r_i + (1 - d_i) g_i G_{n(i)} at decisions, 0 elsewhere, with G = 0 at a segment's last position:
    the discounted return-to-go inside the segment, never bootstrapped (the ``mc`` backup). ``[B, L] float32``.

    One reverse scan over positions: the carry holds G of the nearest later decision of the same segment, which
    is G_{n(i)} because n(i) is exactly that decision (or the segment's end, where the carry was reset to 0).
    """
    segment_end = shift_left(segment_ids, -1) != segment_ids  # [B, L]: i is its segment's last position

    def step(carry, x):
        decision, reward, done, discount, end = x
        carry = jnp.where(end, 0.0, carry)
        g = jnp.where(decision, reward + (1.0 - done) * discount * carry, 0.0)
        return jnp.where(decision, g, carry), g

    xs = (tr.decision, tr.reward, tr.done, tr.discount, segment_end)
    _, returns = jax.lax.scan(step, jnp.zeros(segment_ids.shape[0], jnp.float32),
                              tuple(x.T for x in xs), reverse=True)
    return returns.T
