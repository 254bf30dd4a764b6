"""Token-level Q-learning (ILQL and its relatives), the objective ``rl.objective: token_q``.

The whole objective: transitions -> gathered decision rows -> heads -> losses (docs/design.md, section 2).
Its settings are the ``token_q`` config section (``TokenQConfig``); the discount, time step, EMA rate and
decision slots are shared (``rl``).

The heads only ever see decision rows. Each row's hidden states ``[L, D]`` are gathered at its decision
positions into a static buffer of ``M = ceil(decision_fraction * L)`` slots before any head runs, so no
``[B, L, V]`` tensor exists (and the gathered ``[B, M, D]`` stays sharded along the batch like the batch); the
target Q-values at the data action are computed by gathering the output weights first (``q_at``), so the
target heads never project onto the whole vocabulary unless a ``max`` (or ``sarsa`` at a truncation) backup
needs it. Decisions past a row's ``M`` slots are counted in ``metrics['decisions_dropped']``, never silently
lost: the training loop sums it over every step and stops on it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxrl_lm.batch import IMITATE
from jaxrl_lm.config import ConfigError, ModelConfig, RLConfig
from jaxrl_lm.rl import losses
from jaxrl_lm.rl.objective import HeadFlops, ModelView, Objective, ParamGroup, register
from jaxrl_lm.rl.transitions import first_positions, gather_rows, monte_carlo_returns, transitions


@dataclasses.dataclass(frozen=True)
class TokenQConfig:
    """The ``token_q`` config section (every field documented in configs/base.yaml)."""

    backup: Literal["expectile", "max", "sarsa", "mc"] = "expectile"
    expectile_tau: float = 0.7
    lambda_q: float = 1.0
    lambda_v: float = 1.0
    cql_alpha: float = 0.1
    cql_temperature: float = 1.0
    lambda_bc: float = 1.0
    awr_beta: float = 0.0
    awr_max_weight: float = 20.0
    value_min: Optional[float] = None
    value_max: Optional[float] = None
    target_scope: Literal["heads", "full"] = "heads"

    def validate(self, where: str = "token_q") -> None:
        """Cross-field checks; each error names ``where.<field>``."""
        if not 0.0 < self.expectile_tau < 1.0:
            raise ConfigError(f"{where}.expectile_tau must be in (0, 1), got {self.expectile_tau}")
        if self.cql_temperature <= 0:
            raise ConfigError(f"{where}.cql_temperature must be positive, got {self.cql_temperature}")
        if self.awr_max_weight <= 0:
            raise ConfigError(f"{where}.awr_max_weight must be positive, got {self.awr_max_weight}")
        if self.value_min is not None and self.value_max is not None and self.value_min >= self.value_max:
            raise ConfigError(f"{where}.value_min ({self.value_min}) must be below {where}.value_max "
                              f"({self.value_max})")
        for name in ("lambda_q", "lambda_v", "cql_alpha", "lambda_bc", "awr_beta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name} must be non-negative, got {getattr(self, name)}")


class Heads(NamedTuple):
    """The model's heads as callables on hidden states ``h [..., D] float32``; outputs float32.

    q_at(h, a [...] int32) -> [K, ...]; value(h) -> [...]; lm_at(h, a) -> [...] (the LM logit of a);
    target_q_at: q_at with the target parameters. The vocabulary enters only through reductions that need never
    form ``[..., V]`` (``jaxrl_lm.rl.vocab`` with ``model.vocab_chunk``; padded ids ``>= vocab_size`` never count):
    q_logsumexp(h, T) -> [K, ...] = logsumexp_a Q_k(h, a) / T; lm_logsumexp(h) -> [...] (the BC normaliser);
    target_q_max(h) -> [...] = max_a min_k Qbar_k(h, a) (the ``max`` backup).
    """

    q_at: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
    value: Callable[[jnp.ndarray], jnp.ndarray]
    lm_at: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
    target_q_at: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
    q_logsumexp: Callable[[jnp.ndarray, float], jnp.ndarray]
    lm_logsumexp: Callable[[jnp.ndarray], jnp.ndarray]
    target_q_max: Callable[[jnp.ndarray], jnp.ndarray]


def heads_from_logits(*, q_logits: Callable, q_at: Callable, value: Callable, lm_logits: Callable,
                      target_q_logits: Callable, target_q_at: Callable, vocab_size: int) -> Heads:
    """``Heads`` whose reductions read whole logits: ``q_logits(h) -> [K, ..., V]``, ``lm_logits(h) -> [..., V]``
    (hand-written heads such as lookup tables, whose logits are not a linear output layer)."""
    def lse(logits):
        return jax.nn.logsumexp(losses.mask_padded_vocab(logits, vocab_size), axis=-1)

    return Heads(
        q_at=q_at, value=value, target_q_at=target_q_at,
        lm_at=lambda h, a: jnp.take_along_axis(lm_logits(h), a[..., None], axis=-1)[..., 0],
        q_logsumexp=lambda h, temperature: lse(q_logits(h) / temperature),
        lm_logsumexp=lambda h: lse(lm_logits(h)),
        target_q_max=lambda h: losses.max_backup(target_q_logits(h), vocab_size),
    )


def decision_capacity(rl: RLConfig, seq_len: int) -> int:
    """Static number of decision slots gathered per batch row of length ``seq_len``."""
    # round() first: 0.07 * 100 is 7.000000000000001 in floating point, which must give 7 slots, not 8.
    return max(1, math.ceil(round(rl.decision_fraction * seq_len, 6)))


def count_decisions(batch: Mapping[str, jnp.ndarray], rl: RLConfig) -> jnp.ndarray:
    """|D| of a batch as a float32 scalar (the loss denominator when the batch is the whole optimizer step)."""
    tr = transitions(batch, gamma=rl.gamma, time_step=rl.time_step)
    return jnp.sum(tr.decision, dtype=jnp.float32)


def bellman_objective(
    q_cfg: TokenQConfig,
    rl: RLConfig,
    batch: Mapping[str, jnp.ndarray],
    hidden: jnp.ndarray,
    target_hidden: jnp.ndarray,
    heads: Heads,
    *,
    vocab_size: int,
    denominator: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Total loss L = lambda_Q L_Q + lambda_V L_V + alpha_CQL L_CQL + lambda_BC L_BC, and its metrics.

    Args:
      q_cfg: the loss's settings (the ``token_q`` section).
      rl: the shared settings (discount, time step, decision slots).
      batch: the ``[B, L]`` fields of ``jaxrl_lm.batch``; with the optional ``imitate`` field, the BC term counts
        only the decisions it marks (its sum is still divided by ``denominator``).
      hidden: ``[B, L, D] float32`` online trunk states h_i.
      target_hidden: ``[B, L, D] float32`` states the target heads read (the online ones for
        ``target_scope: heads``, the target trunk's for ``full``); gradients never flow into them.
      heads: the head callables.
      vocab_size: the real vocabulary size; padded ids above it are excluded from every softmax and max.
      denominator: decision count of the whole optimizer step (global batch, all micro-batches); default: this
        batch's count.

    Returns:
      ``(loss [] float32, metrics)``; metrics are device scalars.
    """
    batch_size, seq_len = batch["tokens"].shape
    tr = transitions(batch, gamma=rl.gamma, time_step=rl.time_step)
    n_decisions = jnp.sum(tr.decision, dtype=jnp.float32)
    if denominator is None:
        denominator = n_decisions
    capacity = decision_capacity(rl, seq_len)

    slots = first_positions(tr.decision, capacity)  # [B, M]
    row_decisions = jnp.sum(tr.decision, axis=-1, dtype=jnp.int32)
    weight = (jnp.arange(capacity)[None, :] < row_decisions[:, None]).astype(jnp.float32)
    n_used = jnp.sum(weight)  # metrics average over the rows that were scored
    next_slots = gather_rows(tr.next_index, slots)
    action, reward, done, discount, next_is_decision, next_action = (
        gather_rows(x, slots) for x in (tr.action, tr.reward, tr.done, tr.discount, tr.next_is_decision, tr.next_action)
    )

    h = gather_rows(hidden, slots)  # [B, M, D]
    target_hidden = jax.lax.stop_gradient(target_hidden)
    target_h = gather_rows(target_hidden, slots)
    target_q_taken = jax.lax.stop_gradient(heads.target_q_at(target_h, action))  # [K, B, M]
    value = heads.value(h)  # [B, M]

    if q_cfg.backup == "expectile":
        backup = jax.lax.stop_gradient(heads.value(gather_rows(jax.lax.stop_gradient(hidden), next_slots)))
    elif q_cfg.backup == "mc":  # the return-to-go at n(i), so that y_i below is the return-to-go at i
        backup = gather_rows(monte_carlo_returns(tr, batch["segment_ids"]), next_slots)
    else:
        target_next = gather_rows(target_hidden, next_slots)
        backup = jax.lax.stop_gradient(heads.target_q_max(target_next))
        if q_cfg.backup == "sarsa":
            on_policy = jnp.min(heads.target_q_at(target_next, next_action), axis=0)
            backup = jnp.where(next_is_decision, on_policy, backup)  # a truncation state backs up as `max`
    backup = jnp.where(weight > 0, backup, 0.0)  # unused buffer rows stay finite
    target = losses.td_target(reward, done, discount, backup, q_cfg.value_min, q_cfg.value_max)

    metrics: dict[str, jnp.ndarray] = {}
    q_taken = heads.q_at(h, action)  # [K, B, M]
    if q_cfg.cql_alpha > 0:
        normaliser = heads.q_logsumexp(h, q_cfg.cql_temperature)  # [K, B, M]
        cql = losses.cql_loss(normaliser, q_taken, q_cfg.cql_temperature, weight, denominator)
        # The monitored gap is at temperature 1: the same normaliser when T = 1, a forward-only one otherwise.
        at_one = normaliser if q_cfg.cql_temperature == 1.0 else heads.q_logsumexp(jax.lax.stop_gradient(h), 1.0)
        gap = losses.cql_gap(at_one, q_taken)
        metrics["cql_gap"] = losses.weighted_mean(jnp.mean(gap, axis=0), weight, n_used)
    else:
        cql = jnp.float32(0.0)

    q = losses.q_loss(q_taken, target, weight, denominator)
    v = (losses.expectile_loss(target_q_taken, value, q_cfg.expectile_tau, weight, denominator)
         if q_cfg.backup == "expectile" else jnp.float32(0.0))
    if q_cfg.lambda_bc > 0:
        awr = losses.awr_weights(target_q_taken, value, q_cfg.awr_beta, q_cfg.awr_max_weight)
        # The optional ``imitate`` field keeps BC to the episodes it marks (online: the offline share); the
        # denominator stays every decision's, as for the other terms.
        bc_weight = weight * gather_rows(batch[IMITATE], slots) if IMITATE in batch else weight
        bc = losses.bc_loss(heads.lm_logsumexp(h), heads.lm_at(h, action), awr, bc_weight, denominator)
        metrics["awr_weight_mean"] = losses.weighted_mean(awr, weight, n_used)
    else:
        bc = jnp.float32(0.0)

    loss = q_cfg.lambda_q * q + q_cfg.lambda_v * v + q_cfg.cql_alpha * cql + q_cfg.lambda_bc * bc
    q_mean = jnp.mean(jax.lax.stop_gradient(q_taken), axis=0)
    metrics.update(
        loss=loss,
        q_loss=q,
        v_loss=v,
        cql_loss=cql,
        bc_loss=bc,
        q_mean=losses.weighted_mean(q_mean, weight, n_used),
        v_mean=losses.weighted_mean(jax.lax.stop_gradient(value), weight, n_used),
        target_mean=losses.weighted_mean(target, weight, n_used),
        td_error=losses.weighted_mean(jnp.abs(q_mean - target), weight, n_used),
        decisions=n_decisions,
        decisions_dropped=jnp.sum(jnp.maximum(row_decisions - capacity, 0), dtype=jnp.float32),
    )
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# The objective as the engine sees it.

# Loss terms (each already divided by the whole step's decision count) and counts add up over micro-batches.
SUMMED_METRICS = frozenset({"loss", "q_loss", "v_loss", "cql_loss", "bc_loss", "decisions", "decisions_dropped"})


def target_group(q_cfg: TokenQConfig, rl: RLConfig) -> tuple[ParamGroup, ...]:
    """The EMA target: the Q-heads, plus the trunk for ``target_scope: full``."""
    keys = ("q_heads",) if q_cfg.target_scope == "heads" else ("transformer", "q_heads")
    return (ParamGroup("target", "ema", keys),)


def token_q_loss(q_cfg: TokenQConfig, rl: RLConfig, batch: Mapping[str, jnp.ndarray], hidden: jnp.ndarray,
                 views: Mapping[str, ModelView], denominator: jnp.ndarray, *, vocab_size: int
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """``bellman_objective`` on the online and target views; target forwards are deterministic (no dropout)."""
    online, target = views["online"], views["target"]
    target_hidden = target.hidden(batch) if q_cfg.target_scope == "full" else hidden
    heads = Heads(q_at=online.q_at, value=online.value, lm_at=online.lm_at, target_q_at=target.q_at,
                  q_logsumexp=online.q_logsumexp, lm_logsumexp=online.lm_logsumexp, target_q_max=target.q_max)
    return bellman_objective(q_cfg, rl, batch, hidden, target_hidden, heads, vocab_size=vocab_size,
                             denominator=denominator)


def token_q_denominator(q_cfg: TokenQConfig, rl: RLConfig, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
    return count_decisions(batch, rl)


def token_q_head_flops(q_cfg: TokenQConfig, rl: RLConfig, m: ModelConfig, batch_size: int, seq_len: int
                       ) -> HeadFlops:
    """Head FLOPs of one update (2 m k n per matmul; trained 3x, forward 1x), per gathered decision slot
    (``S = B * M``), with ``E`` the Q-head hidden width (none for a linear head):

    - LM head (BC):             ``2 D V``, trained (only when ``lambda_bc > 0``);
    - K online Q-heads:         ``K (2 D E + 2 E V)`` trained with CQL, else ``K (2 D E + 2 E)`` (``q_at``);
    - V head:                   ``2 D E + 2 E`` trained;
    - K target Q-heads at a_i:  ``K (2 D E + 2 E)`` forward (``q_at``: the output column is gathered first);
    - the backup at n(i):       expectile ``2 D E + 2 E`` forward; max / sarsa ``K (2 D E + 2 E V)`` forward.

    A full-scope target runs one more trunk forward.
    """
    slots = batch_size * decision_capacity(rl, seq_len)
    D, V, K = m.d_model, m.padded_vocab_size, m.n_q_heads
    E = m.q_head_hidden_mult * D if m.q_head == "mlp" else 0
    q_in = 2 * D * E if E else 0  # first layer of an MLP head
    width = E or D  # what the output layer reads
    q_full = q_in + 2 * width * V
    q_one = q_in + 2 * width
    heads_trained = (K * q_full if q_cfg.cql_alpha > 0 else K * q_one) + q_one  # Q-heads and the V head
    if q_cfg.lambda_bc > 0:
        heads_trained += 2 * D * V
    backup_forward = {"expectile": q_one, "mc": 0}.get(q_cfg.backup, K * q_full)  # max / sarsa read every action
    heads_forward = K * q_one + backup_forward
    return HeadFlops(trunk_forwards=1 if q_cfg.target_scope == "full" else 0,
                     heads=float(slots * (3 * heads_trained + heads_forward)))


TOKEN_Q = register(Objective(
    name="token_q",
    settings=TokenQConfig,
    loss=token_q_loss,
    denominator=token_q_denominator,
    groups=target_group,
    summed_metrics=SUMMED_METRICS,
    head_flops=token_q_head_flops,
))
