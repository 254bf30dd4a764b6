"""The loss terms of docs/design.md section 2 on gathered decision rows. Pure functions, float32 throughout.

Every loss is a weighted sum over rows divided by ``denominator``: the number of decision positions of the
*global* batch (all devices, all micro-batches of one optimizer step), so a sharded or accumulated step
optimises exactly the loss of the whole batch. Rows with ``weight = 0`` (unused buffer slots) contribute nothing.
Shapes: ``[...]`` is any leading shape of rows (the update uses ``[B, M]``), ``K`` Q-heads, ``V`` the (padded)
vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mask_padded_vocab(logits: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """Sets ids ``>= vocab_size`` (vocabulary padding) to -inf, so they never enter a softmax, max or sample."""
    if logits.shape[-1] == vocab_size:
        return logits
    valid = jnp.arange(logits.shape[-1]) < vocab_size
    return jnp.where(valid, logits, -jnp.inf)


def td_target(
    reward: jnp.ndarray,
    done: jnp.ndarray,
    discount: jnp.ndarray,
    backup: jnp.ndarray,
    value_min: float | None = None,
    value_max: float | None = None,
) -> jnp.ndarray:
    """y = r + (1 - d) * g * B, optionally clipped to [value_min, value_max]. All ``[...] float32``."""
    y = reward + (1.0 - done) * discount * backup
    if value_min is not None or value_max is not None:
        y = jnp.clip(y, value_min, value_max)
    return jax.lax.stop_gradient(y)


def max_backup(target_q_logits: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """max_a min_k Qbar_k(h, a). ``[K, ..., V] -> [...]``."""
    return mask_padded_vocab(jnp.min(target_q_logits, axis=0), vocab_size).max(axis=-1)


def weighted_mean(values: jnp.ndarray, weight: jnp.ndarray, denominator: jnp.ndarray) -> jnp.ndarray:
    """sum(weight * values) / max(denominator, 1). ``[...], [...], [] -> []``."""
    return jnp.sum(weight * values) / jnp.maximum(denominator, 1.0)


def q_loss(q_taken: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray, denominator: jnp.ndarray) -> jnp.ndarray:
    """L_Q = mean_i sum_k (Q_k(h_i, a_i) - y_i)^2. ``q_taken [K, ...], target [...]``."""
    return weighted_mean(jnp.sum(jnp.square(q_taken - target[None]), axis=0), weight, denominator)


def expectile_loss(
    target_q_taken: jnp.ndarray, value: jnp.ndarray, tau: float, weight: jnp.ndarray, denominator: jnp.ndarray
) -> jnp.ndarray:
    """L_V = mean_i |tau - 1[u_i < 0]| u_i^2, u_i = sg(min_k Qbar_k(h_i, a_i)) - V(h_i). ``[K, ...], [...]``."""
    u = jax.lax.stop_gradient(jnp.min(target_q_taken, axis=0)) - value
    return weighted_mean(jnp.abs(tau - (u < 0).astype(jnp.float32)) * jnp.square(u), weight, denominator)


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """-log softmax(logits)[label] over the unpadded vocabulary. ``[..., V], [...] -> [...]``."""
    logits = mask_padded_vocab(logits, vocab_size)
    taken = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - taken


def token_kl(logits: jnp.ndarray, reference_logits: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """KL(pi || pi_ref) of one token's distributions, exact over the unpadded vocabulary:
    ``sum_a pi(a) (log pi(a) - log pi_ref(a))`` with ``pi = softmax(logits)``. ``[..., V], [..., V] -> [...]``;
    the gradient reaches ``logits`` only where the caller lets it (``reference_logits`` is usually stopped)."""
    logp = jax.nn.log_softmax(mask_padded_vocab(logits, vocab_size), axis=-1)
    logq = jax.nn.log_softmax(mask_padded_vocab(reference_logits, vocab_size), axis=-1)
    # Padding ids have pi = 0 and -inf logs: where() keeps their 0 * (-inf + inf) out of the sum.
    terms = jnp.where(jnp.isfinite(logp), jnp.exp(logp) * (logp - logq), 0.0)
    return jnp.sum(terms, axis=-1)


def cql_loss(
    normaliser: jnp.ndarray,
    q_taken: jnp.ndarray,
    temperature: float,
    weight: jnp.ndarray,
    denominator: jnp.ndarray,
) -> jnp.ndarray:
    """L_CQL = mean_i sum_k CE(softmax(Q_k(h_i, .) / T), a_i). ``normaliser [K, ...] = logsumexp_a Q_k(h_i, a) / T``
    (over the unpadded vocabulary), ``q_taken [K, ...] = Q_k(h_i, a_i)``.

    CE(softmax(Q/T), a) = logsumexp_a' Q(s,a')/T - Q(s,a)/T: the CQL penalty for discrete actions. The normaliser
    comes from ``ModelView.q_logsumexp`` so that the logits need never exist whole (``jaxrl_lm.rl.vocab``).
    """
    return weighted_mean(jnp.sum(normaliser - q_taken / temperature, axis=0), weight, denominator)


def cql_gap(normaliser: jnp.ndarray, q_taken: jnp.ndarray) -> jnp.ndarray:
    """logsumexp_a Q_k(h, a) - Q_k(h, a_data), per head and row (a monitoring metric), from the normaliser at
    temperature 1. ``[K, ...], [K, ...] -> [K, ...]``, no gradient."""
    return jax.lax.stop_gradient(normaliser - q_taken)


def awr_weights(target_q_taken: jnp.ndarray, value: jnp.ndarray, beta: float, max_weight: float) -> jnp.ndarray:
    """w_i = min(exp(beta * sg(min_k Qbar_k(h_i, a_i) - V(h_i))), w_max); all ones when beta = 0. ``[...]``."""
    if beta == 0.0:
        return jnp.ones_like(value)
    advantage = jax.lax.stop_gradient(jnp.min(target_q_taken, axis=0) - value)
    return jnp.minimum(jnp.exp(beta * advantage), max_weight)


def bc_loss(
    normaliser: jnp.ndarray,
    logit_taken: jnp.ndarray,
    awr_weight: jnp.ndarray,
    weight: jnp.ndarray,
    denominator: jnp.ndarray,
) -> jnp.ndarray:
    """L_BC = mean_i w_i * CE(softmax(LM(h_i, .)), a_i) with CE = ``normaliser - logit_taken``:
    ``normaliser [...] = logsumexp_a LM(h_i, a)`` (unpadded vocabulary), ``logit_taken [...] = LM(h_i, a_i)``,
    ``awr_weight [...]``."""
    return weighted_mean(awr_weight * (normaliser - logit_taken), weight, denominator)
