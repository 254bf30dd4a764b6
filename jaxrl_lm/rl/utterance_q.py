"""Utterance-level Q-learning (CHAI), the objective ``rl.objective: utterance_q`` (docs/design.md, section 9).

A whole agent turn ``u`` is one action. The critic reads ``Q(s, u)`` where the trunk has read the history and
then the turn: with ``u``'s last token ``a_last`` (its EOT) and ``h`` the state just before it,
``Q_k(s, u) = Q_k-head(h, a_last)``: the token-level Q-head's value of ending the turn. ``V(s)`` is the V-head at
``o(u)``, the last token of the observation before the turn. So the heads mean what they mean at the token level,
and the policy extraction (best-of-N by final-token Q, ``jaxrl_lm.generate``) and HF export need nothing new.

Per turn ``u`` with reward ``r``, done ``d``, next state ``s+`` (``rl/utterance.py: turn_transitions``):

    y = r + (1 - d) gamma B(s+)
    max:        B(s+) = max over {u'_1..u'_N} ∪ {u+_data} of min_k Qbar_k(s+, u'), u'_j sampled from the
                behaviour LM at s+ (the data's next turn u+ joins when there is one; a cut episode has only samples)
    expectile:  B(s+) = V(s+), with V regressed as the tau-expectile of min_k Qbar_k(s, u_data) (IQL; no samples)
    L_Q  = mean_u sum_k (Q_k(s, u) - y)^2
    L_V  = mean_u |tau - 1[x < 0]| x^2,  x = min_k Qbar_k(s, u) - V(s)         (expectile only)
    L_CQL = mean_u sum_k [logsumexp_j Q_k(s, u_j) / T - Q_k(s, u) / T],  j over the N samples at s and u itself
    L_BC = mean_u sum_{t in u} -log pi_LM(a_t | s, a_<t)                       (trains the sampler's LM head)
    L = lambda_q L_Q + lambda_v L_V + cql_alpha L_CQL + lambda_bc L_BC

Means are over the turns of the whole optimizer step (the denominator). ``Qbar`` are EMA target Q-heads (K
heads, min for double Q) on the online trunk's states, like ``token_q``'s ``target_scope: heads``.

Candidate turns are sampled inside the step (``feed``) from a *sampler*: the trained model itself after the
previous step (``candidate_refresh: 1``), a snapshot refreshed every ``k`` optimizer steps (``k > 1``), or the
initial parameters forever (``0``; pass a BC checkpoint to ``init_state(groups={"sampler": ...})`` to sample
from a fixed supervised LM as CHAI does). Sampling shares the history: one prefill of the row into a KV cache,
then ``C`` cached steps of ``S N`` tokens (``candidate_mask``); the training forward reads the row and every
candidate in one pass of ``L + C S N`` tokens under the same block mask, so the history is computed once per
row, not once per candidate.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping, Optional

import jax
import jax.numpy as jnp

from jaxrl_lm.config import ConfigError, ModelConfig, RLConfig
from jaxrl_lm.rl import losses
from jaxrl_lm.rl.objective import HeadFlops, ModelView, Objective, ParamGroup, TrunkFeed, register
from jaxrl_lm.rl.token_q import decision_capacity
from jaxrl_lm.rl.transitions import first_positions, gather_rows
from jaxrl_lm.rl.utterance import (
    TurnSlots, candidate_index, candidate_mask, candidate_positions, turn_slots, turn_transitions,
)


@dataclasses.dataclass(frozen=True)
class UtteranceQConfig:
    """The ``utterance_q`` config section (every field documented in configs/base.yaml)."""

    backup: Literal["max", "expectile"] = "max"
    expectile_tau: float = 0.7
    lambda_q: float = 1.0
    lambda_v: float = 1.0
    lambda_bc: float = 1.0
    cql_alpha: float = 0.1
    cql_temperature: float = 1.0
    candidates: int = 4
    candidate_tokens: int = 8
    candidate_temperature: float = 1.0
    candidate_refresh: int = 1
    max_turns: int = 16
    value_min: Optional[float] = None
    value_max: Optional[float] = None

    def validate(self, where: str = "utterance_q") -> None:
        """Cross-field checks; each error names ``where.<field>``."""
        if not 0.0 < self.expectile_tau < 1.0:
            raise ConfigError(f"{where}.expectile_tau must be in (0, 1), got {self.expectile_tau}")
        for name in ("cql_temperature", "candidate_temperature"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}.{name} must be positive, got {getattr(self, name)}")
        for name in ("candidates", "candidate_tokens", "max_turns"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lambda_q", "lambda_v", "lambda_bc", "cql_alpha", "candidate_refresh"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name} must be non-negative, got {getattr(self, name)}")
        if self.value_min is not None and self.value_max is not None and self.value_min >= self.value_max:
            raise ConfigError(f"{where}.value_min ({self.value_min}) must be below {where}.value_max "
                              f"({self.value_max})")

    @property
    def samples(self) -> bool:
        """Whether the step samples candidate turns (the max backup, or the penalty over samples)."""
        return self.backup == "max" or self.cql_alpha > 0


# ----------------------------------------------------------------------------------------------------------------
# Sampling candidates through one prefill of the history.


def _sample(rng: jax.Array, logits: jnp.ndarray, temperature: float, vocab_size: int) -> jnp.ndarray:
    """Draws ids from ``softmax(logits / temperature)`` over the real vocabulary. ``[..., Vp] -> [...] int32``."""
    return jax.random.categorical(rng, losses.mask_padded_vocab(logits, vocab_size) / temperature).astype(jnp.int32)


def sample_candidates(view: ModelView, base: TrunkFeed, slots: TurnSlots, stop_id: jnp.ndarray, rng: jax.Array, *,
                      n: int, tokens: int, temperature: float, vocab_size: int
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``n`` turns of at most ``tokens`` tokens sampled from ``view``'s LM head at every candidate state.

    Args:
      view: the sampler (its trunk and LM head).
      base: the data as the trunk reads it (``[B, L]`` tokens, positions, attention ids).
      slots: the row's candidate states (``turn_slots``).
      stop_id: ``[B]`` int32, the token that ends a turn (EOT); it is kept as the turn's last token.
      rng: PRNG key.

    Returns:
      ``(candidates [B, S, n, tokens] int32, lengths [B, S, n] int32)``: each candidate's tokens up to and
      including its first ``stop_id`` (or all ``tokens`` of them), padded with ``stop_id`` after it.
    """
    batch, length = base.tokens.shape
    states = slots.state.shape[-1]
    width = states * n
    total = length + tokens * width
    mask = lambda queries: candidate_mask(base.attention_ids, slots.state, slots.state_used, n, tokens,  # noqa: E731
                                          queries)
    cache = view.init_cache(batch, total)
    h, cache = view.trunk(base.tokens, base.positions, mask(jnp.arange(length, dtype=jnp.int32)), cache,
                          jnp.int32(0))
    state_logits = view.lm_logits(gather_rows(h, slots.state))  # [B, S, Vp]
    rngs = jax.random.split(rng, tokens)
    first = _sample(rngs[0], jnp.broadcast_to(state_logits[:, :, None], (batch, states, n, state_logits.shape[-1])),
                    temperature, vocab_size).reshape(batch, width)
    start = gather_rows(base.positions, slots.state)  # [B, S]
    stop = stop_id[:, None]

    def step(carry, inputs):
        cache, token, ended = carry
        offset, key = inputs
        queries = length + offset * width + jnp.arange(width, dtype=jnp.int32)
        positions = jnp.repeat(start + 1 + offset, n, axis=-1)  # [B, S n], slot-major like the layout
        h, cache = view.trunk(token, positions, mask(queries), cache, length + offset * width)
        ended = ended | (token == stop)
        nxt = _sample(key, view.lm_logits(h), temperature, vocab_size)
        nxt = jnp.where(ended, stop, nxt)
        return (cache, nxt, ended), nxt

    ended0 = jnp.zeros((batch, width), bool)
    if tokens > 1:
        _, rest = jax.lax.scan(step, (cache, first, ended0),
                               (jnp.arange(tokens - 1, dtype=jnp.int32), rngs[1:]))  # [C - 1, B, S n]
        seq = jnp.concatenate([first[None], rest], axis=0)
    else:
        seq = first[None]
    seq = jnp.moveaxis(seq, 0, -1).reshape(batch, states, n, tokens)
    is_stop = seq == stop_id[:, None, None, None]
    first_stop = jnp.argmax(is_stop, axis=-1)
    lengths = jnp.where(jnp.any(is_stop, axis=-1), first_stop + 1, tokens).astype(jnp.int32)
    return jax.lax.stop_gradient(seq), lengths


def stop_ids(batch: Mapping[str, jnp.ndarray], slots: TurnSlots) -> jnp.ndarray:
    """``[B]`` int32: the token ending the row's first turn, which ends every turn in the data layout (EOT)."""
    return batch["tokens"][jnp.arange(slots.turn_end.shape[0]), slots.turn_end[:, 0]]


def extended_feed(base: TrunkFeed, slots: TurnSlots, candidates: jnp.ndarray) -> TrunkFeed:
    """The row and its candidates as one extended sequence (``candidate_index`` layout). ``candidates [B, S, n,
    C]`` -> a ``TrunkFeed`` of ``L + C S n`` tokens with an explicit mask."""
    batch, states, n, tokens = candidates.shape
    length = base.tokens.shape[-1]
    laid = jnp.moveaxis(candidates, -1, 1).reshape(batch, tokens * states * n)  # offset-major
    mask = candidate_mask(base.attention_ids, slots.state, slots.state_used, n, tokens,
                          jnp.arange(length + tokens * states * n, dtype=jnp.int32))
    return TrunkFeed(tokens=jnp.concatenate([base.tokens, laid], axis=-1),
                     positions=candidate_positions(base.positions, slots.state, n, tokens), mask=mask)


def utterance_q_feed(cfg: UtteranceQConfig, rl: RLConfig, batch: Mapping[str, jnp.ndarray], base: TrunkFeed,
                     views: Mapping[str, ModelView], rng: jax.Array, *, vocab_size: int
                     ) -> tuple[TrunkFeed, dict[str, jnp.ndarray]]:
    """Samples the candidates and extends the row with them; the data alone when nothing needs samples."""
    if not cfg.samples:
        return base, {}
    slots = turn_slots(turn_transitions(batch, gamma=rl.gamma), cfg.max_turns)
    candidates, lengths = sample_candidates(
        views.get("sampler", views["online"]), base, slots, stop_ids(batch, slots), rng, n=cfg.candidates,
        tokens=cfg.candidate_tokens, temperature=cfg.candidate_temperature, vocab_size=vocab_size)
    return extended_feed(base, slots, candidates), {"candidate_tokens": candidates, "candidate_lengths": lengths}


def candidate_q(q_at, hidden: jnp.ndarray, slots: TurnSlots, candidates: jnp.ndarray, lengths: jnp.ndarray
                ) -> jnp.ndarray:
    """``Q_k(s, u_j)`` of every candidate: the head ``q_at`` at the state before its last token, for its last token.

    ``hidden [B, L + C S n, D]`` of the extended row, ``candidates [B, S, n, C]``, ``lengths [B, S, n]`` ->
    ``[K, B, S, n]`` float32. A one-token candidate is read at its state itself.
    """
    batch, states, n, tokens = candidates.shape
    length = hidden.shape[1] - tokens * states * n
    slot = jnp.arange(states, dtype=jnp.int32)[None, :, None]
    j = jnp.arange(n, dtype=jnp.int32)[None, None, :]
    state = jnp.broadcast_to(slots.state[:, :, None], lengths.shape)
    before_last = jnp.where(lengths == 1, state, candidate_index(length, states, n, jnp.maximum(lengths - 2, 0), slot, j))
    last = jnp.take_along_axis(candidates, (lengths - 1)[..., None], axis=-1)[..., 0]
    return q_at(gather_rows(hidden, before_last), last)


def utterance_q_loss(cfg: UtteranceQConfig, rl: RLConfig, batch: Mapping[str, jnp.ndarray], hidden: jnp.ndarray,
                     views: Mapping[str, ModelView], denominator: jnp.ndarray, *, vocab_size: int
                     ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The loss of the module docstring on one (micro-)batch.

    ``hidden [B, T, D]``: the online trunk's states of the row (its first ``L``) and, when the step samples, of
    the candidates after it (``batch["candidate_tokens"] [B, S, n, C]``, ``batch["candidate_lengths"]``).
    """
    online, target = views["online"], views["target"]
    tokens = batch["tokens"]
    length = tokens.shape[-1]
    tt = turn_transitions(batch, gamma=rl.gamma)
    slots = turn_slots(tt, cfg.max_turns)
    weight = slots.turn_used.astype(jnp.float32)  # [B, S]
    n_used = jnp.sum(weight)
    n_turns = jnp.sum(tt.turn_end, dtype=jnp.float32)
    end = slots.turn_end
    reward, done, discount, next_is_turn, state_index, next_index = (
        gather_rows(x, end) for x in (tt.reward, tt.done, tt.discount, tt.next_is_turn, tt.state_index, tt.next_index))
    frozen_hidden = jax.lax.stop_gradient(hidden)

    # Q(s, u) of the data's turns: the head at the token before u's last token, for that last token.
    before_last, last = jnp.maximum(end - 1, 0), gather_rows(tokens, end)
    q_taken = online.q_at(gather_rows(hidden, before_last), last)  # [K, B, S]
    target_q_taken = jax.lax.stop_gradient(target.q_at(gather_rows(frozen_hidden, before_last), last))
    value = online.value(gather_rows(hidden, state_index))  # [B, S]

    metrics: dict[str, jnp.ndarray] = {}
    if cfg.samples:
        candidates, lengths = batch["candidate_tokens"], batch["candidate_lengths"]
        metrics["candidate_length"] = losses.weighted_mean(
            jnp.mean(lengths.astype(jnp.float32), axis=-1), slots.state_used, jnp.sum(slots.state_used))
    if cfg.backup == "expectile":
        backup = jax.lax.stop_gradient(online.value(gather_rows(frozen_hidden, next_index)))
    else:
        target_candidates = jax.lax.stop_gradient(
            candidate_q(target.q_at, frozen_hidden, slots, candidates, lengths))  # [K, B, S, n]
        best_sampled = jnp.max(jnp.min(target_candidates, axis=0), axis=-1)  # [B, S] per state slot
        sampled_next = gather_rows(best_sampled, slots.turn_next)
        # The data's next turn u+ is the row's next turn slot whenever u has one in its segment.
        data_next = jnp.concatenate([jnp.min(target_q_taken, axis=0)[:, 1:], jnp.zeros_like(weight[:, :1])], axis=-1)
        backup = jnp.where(next_is_turn, jnp.maximum(sampled_next, data_next), sampled_next)
    backup = jnp.where(weight > 0, backup, 0.0)
    target_value = losses.td_target(reward, done, discount, backup, cfg.value_min, cfg.value_max)

    if cfg.cql_alpha > 0:
        online_candidates = candidate_q(online.q_at, hidden, slots, candidates, lengths)  # [K, B, S, n]
        at_turn = jax.vmap(gather_rows, in_axes=(0, None))(online_candidates, slots.turn_state)  # [K, B, S, n]
        scores = jnp.concatenate([at_turn, q_taken[..., None]], axis=-1) / cfg.cql_temperature
        gap = jax.nn.logsumexp(scores, axis=-1) - q_taken / cfg.cql_temperature  # [K, B, S]
        cql = losses.weighted_mean(jnp.sum(gap, axis=0), weight, denominator)
        metrics["cql_gap"] = losses.weighted_mean(jnp.mean(jax.lax.stop_gradient(gap), axis=0), weight, n_used)
    else:
        cql = jnp.float32(0.0)

    q = losses.q_loss(q_taken, target_value, weight, denominator)
    v = (losses.expectile_loss(target_q_taken, value, cfg.expectile_tau, weight, denominator)
         if cfg.backup == "expectile" else jnp.float32(0.0))
    bc, bc_dropped = (_bc_loss(rl, batch, hidden[:, :length], online, vocab_size, denominator)
                      if cfg.lambda_bc > 0 else (jnp.float32(0.0), jnp.float32(0.0)))

    loss = cfg.lambda_q * q + cfg.lambda_v * v + cfg.cql_alpha * cql + cfg.lambda_bc * bc
    q_mean = jnp.mean(jax.lax.stop_gradient(q_taken), axis=0)
    metrics.update(
        loss=loss, q_loss=q, v_loss=v, cql_loss=cql, bc_loss=bc,
        q_mean=losses.weighted_mean(q_mean, weight, n_used),
        v_mean=losses.weighted_mean(jax.lax.stop_gradient(value), weight, n_used),
        target_mean=losses.weighted_mean(target_value, weight, n_used),
        td_error=losses.weighted_mean(jnp.abs(q_mean - target_value), weight, n_used),
        decisions=n_turns,
        decisions_dropped=slots.dropped + bc_dropped,
    )
    return loss, metrics


def agent_token_slots(rl: RLConfig, batch: Mapping[str, jnp.ndarray]
                      ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The data's agent tokens in ``M = decision_capacity`` static slots per row: ``(positions [B, M] int32,
    used [B, M] float32, dropped [] float32)``, ``dropped`` counting the agent tokens that did not fit (never
    silently lost). An unused slot reads position 1, whose state (position 0) exists in every row."""
    seg = batch["segment_ids"]
    acting = (batch["action_mask"] == 1) & (seg != 0)
    # The token before an agent token is always of its segment (a segment opens with BOS, never an action).
    acting = acting & (jnp.concatenate([jnp.zeros_like(seg[:, :1]), seg[:, :-1]], axis=-1) == seg)
    capacity = decision_capacity(rl, seg.shape[-1])
    count = jnp.sum(acting, axis=-1, dtype=jnp.int32)
    positions = first_positions(acting, capacity, fill=1)
    used = (jnp.arange(capacity)[None, :] < count[:, None]).astype(jnp.float32)
    return positions, used, jnp.sum(jnp.maximum(count - capacity, 0), dtype=jnp.float32)


def _bc_loss(rl: RLConfig, batch: Mapping[str, jnp.ndarray], hidden: jnp.ndarray, online: ModelView,
             vocab_size: int, denominator: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sum over the data's agent tokens of -log pi_LM(a | state before it), over the turn count; and the agent
    tokens that did not fit in ``rl.decision_fraction`` slots."""
    positions, used, dropped = agent_token_slots(rl, batch)
    h = gather_rows(hidden, positions - 1)  # [B, M, D]; the normaliser never forms [B, M, Vp] (model.vocab_chunk)
    ce = online.lm_logsumexp(h) - online.lm_at(h, gather_rows(batch["tokens"], positions))
    return losses.weighted_mean(ce, used, denominator), dropped


def count_turns(cfg: UtteranceQConfig, rl: RLConfig, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    """The number of agent turns of the whole optimizer step: every mean's denominator."""
    return jnp.sum(turn_transitions(batch, gamma=rl.gamma).turn_end, dtype=jnp.float32)


def utterance_q_groups(cfg: UtteranceQConfig, rl: RLConfig) -> tuple[ParamGroup, ...]:
    """The EMA target Q-heads, and the sampler when it is not the trained model itself."""
    groups = [ParamGroup("target", "ema", ("q_heads",))]
    if cfg.samples and cfg.candidate_refresh != 1:
        keys = ("transformer", "lm_head")
        groups.append(ParamGroup("sampler", "frozen", keys) if cfg.candidate_refresh == 0
                      else ParamGroup("sampler", "snapshot", keys, refresh_every=cfg.candidate_refresh))
    return tuple(groups)


def utterance_q_head_flops(cfg: UtteranceQConfig, rl: RLConfig, m: ModelConfig, batch_size: int, seq_len: int
                           ) -> HeadFlops:
    """Head FLOPs of one update, per turn slot (``B S``) and candidate, with ``E`` the Q-head hidden width:
    ``q_at`` is ``2 D E + 2 E`` (``2 D`` for a linear head). Trained: K online Q at the data turn and at every
    candidate (with CQL), the V head; forward: K target Q at the data turn and at every candidate (max backup);
    the LM head over ``decision_fraction`` agent-token slots (BC, trained) and over the sampled tokens (sampling,
    forward). The candidates' extra trunk tokens (``C S n`` per row, forward and backward, plus ``C`` cached
    sampling steps) are counted as extra trunk forwards: ``4 C S n / L`` rounded up."""
    D, V, K = m.d_model, m.padded_vocab_size, m.n_q_heads
    E = m.q_head_hidden_mult * D if m.q_head == "mlp" else 0
    q_one = (2 * D * E + 2 * E) if E else 2 * D
    slots = batch_size * cfg.max_turns
    n = cfg.candidates if cfg.samples else 0
    trained = slots * (K * q_one * (1 + (n if cfg.cql_alpha > 0 else 0)) + q_one)
    forward = slots * K * q_one * (1 + (n if cfg.backup == "max" else 0))
    if cfg.lambda_bc > 0:
        trained += batch_size * decision_capacity(rl, seq_len) * 2 * D * V
    forward += slots * n * cfg.candidate_tokens * 2 * D * V
    extra = -(-4 * cfg.candidate_tokens * cfg.max_turns * n // seq_len) if n else 0
    return HeadFlops(trunk_forwards=int(extra), heads=float(3 * trained + forward))


UTTERANCE_Q = register(Objective(
    name="utterance_q",
    settings=UtteranceQConfig,
    loss=utterance_q_loss,
    denominator=count_turns,
    groups=utterance_q_groups,
    summed_metrics=frozenset({"loss", "q_loss", "v_loss", "cql_loss", "bc_loss", "decisions", "decisions_dropped"}),
    head_flops=utterance_q_head_flops,
    feed=utterance_q_feed,
))
