"""Reductions over the vocabulary of a linear output layer, in chunks: ``logsumexp`` and ``max`` without ``[..., V]``.

Every vocabulary-sized head ends in a linear map ``logits[k, n, v] = z[k, n] . w[k, v] + b[k, v]`` (the Q-heads'
output layer, the LM head). The losses need only reductions of those logits over ``v`` (the CQL and BC
normalisers, the ``max`` backup), yet forming the logits whole costs ``[K, N, V]`` float32 in the forward and again
for their gradient (GPT-2 small, K = 2, N = 512 decision rows: 206 MB each). Here the vocabulary is walked in
chunks of ``C`` ids inside a ``lax.scan``, keeping only ``[K, N, C]`` at a time:

- ``logsumexp``: an online log-sum-exp (running max ``m`` and sum ``s``, rescaled as the max grows). Its gradient
  is a ``custom_vjp`` that recomputes each chunk's logits in the backward pass, forms
  ``p = exp(scale * logits - lse)`` and accumulates ``dz``, ``dw``, ``db`` chunk by chunk, so the backward never
  holds more than one chunk either. The price is one more output-layer matmul (the recomputation).
- ``max_min``: ``max_v min_k logits[k, n, v]``, the ``max`` backup's target, forward only (a target value
  carries no gradient).

With ``chunk <= 0`` or ``chunk >= V`` both are the plain computation on whole logits (what the issue's users get
by default on small vocabularies). Chunks never pad ``w``: the last chunk's start is clamped to ``V - C`` and ids
an earlier chunk already covered are masked out of it. Ids ``>= n_valid`` (vocabulary padding) never count.

Shapes: ``z [K, N, E]`` (any float dtype; products accumulate in float32), ``w [K, V, E]``, ``b [K, V]`` or None;
results ``[K, N]`` (``logsumexp``) and ``[N]`` (``max_min``), float32. Pure functions, arrays in, arrays out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _plain_logits(z: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None, n_valid: int, scale: float) -> jnp.ndarray:
    """Whole ``[K, N, V]`` float32 logits times ``scale``, padding ids at -inf."""
    logits = jnp.einsum("kne,kve->knv", z, w, preferred_element_type=jnp.float32)
    if b is not None:
        logits = logits + b[:, None, :].astype(jnp.float32)
    logits = logits * scale
    if n_valid < w.shape[1]:
        logits = jnp.where(jnp.arange(w.shape[1]) < n_valid, logits, -jnp.inf)
    return logits


def _chunk_plan(vocab: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, owned_from)`` int32 ``[n_chunks]``: chunk ``i`` reads ids ``[starts[i], starts[i] + chunk)`` and
    counts only ids ``>= owned_from[i] = i * chunk`` (the last start is clamped so that no slice runs past ``V``)."""
    owned_from = np.arange(0, vocab, chunk, dtype=np.int32)
    return np.minimum(owned_from, vocab - chunk).astype(np.int32), owned_from


def _chunk_logits(z, w, b, start, owned_from, n_valid: int, chunk: int, scale: float):
    """One chunk's scaled logits ``[K, N, C]`` float32 (ids outside the chunk's share at -inf), the slice of ``w``
    it read and the valid mask ``[C]``."""
    w_c = jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1)
    logits = jnp.einsum("kne,kce->knc", z, w_c, preferred_element_type=jnp.float32)
    if b is not None:
        logits = logits + jax.lax.dynamic_slice_in_dim(b, start, chunk, axis=1)[:, None, :].astype(jnp.float32)
    ids = start + jnp.arange(chunk, dtype=jnp.int32)
    valid = (ids >= owned_from) & (ids < n_valid)
    return jnp.where(valid, logits * scale, -jnp.inf), w_c, valid


def _chunked_lse_forward(z, w, b, n_valid: int, chunk: int, scale: float) -> jnp.ndarray:
    starts, owned = _chunk_plan(w.shape[1], chunk)
    k, n = z.shape[0], z.shape[1]

    def step(carry, plan):
        m, s = carry
        logits, _, _ = _chunk_logits(z, w, b, plan[0], plan[1], n_valid, chunk, scale)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        # A chunk with no counted id leaves m at its running value; m is finite after the first chunk (id 0 counts).
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
        return (m_new, s), None

    init = (jnp.full((k, n), -jnp.inf, jnp.float32), jnp.zeros((k, n), jnp.float32))
    (m, s), _ = jax.lax.scan(step, init, (jnp.asarray(starts), jnp.asarray(owned)))
    return m + jnp.log(s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_lse(z, w, b, n_valid: int, chunk: int, scale: float) -> jnp.ndarray:
    return _chunked_lse_forward(z, w, b, n_valid, chunk, scale)


def _chunked_lse_fwd(z, w, b, n_valid, chunk, scale):
    lse = _chunked_lse_forward(z, w, b, n_valid, chunk, scale)
    return lse, (z, w, b, lse)


def _chunked_lse_bwd(n_valid, chunk, scale, residuals, g):
    z, w, b, lse = residuals
    starts, owned = _chunk_plan(w.shape[1], chunk)

    def step(carry, plan):
        dz, dw, db = carry
        logits, w_c, _ = _chunk_logits(z, w, b, plan[0], plan[1], n_valid, chunk, scale)
        # d lse / d raw logit = scale * softmax; masked ids have exp(-inf) = 0.
        gp = g[..., None] * jnp.exp(logits - lse[..., None]) * scale  # [K, N, C]
        dz = dz + jnp.einsum("knc,kce->kne", gp, w_c, preferred_element_type=jnp.float32)
        dw_c = jnp.einsum("knc,kne->kce", gp, z, preferred_element_type=jnp.float32)
        # Ids of the clamped last chunk that an earlier chunk owns get gp = 0, so adding the whole slice is exact.
        dw = jax.lax.dynamic_update_slice_in_dim(
            dw, jax.lax.dynamic_slice_in_dim(dw, plan[0], chunk, axis=1) + dw_c, plan[0], axis=1)
        if db is not None:
            db = jax.lax.dynamic_update_slice_in_dim(
                db, jax.lax.dynamic_slice_in_dim(db, plan[0], chunk, axis=1) + jnp.sum(gp, axis=1), plan[0], axis=1)
        return (dz, dw, db), None

    # dw starts as w * 0, not jnp.zeros: XLA copies a broadcast of zeros into the loop state, one more [K, V, E]
    # buffer (575 MB for GPT-2's two mlp Q-heads), while a computed buffer becomes the loop state itself. (A NaN
    # in w makes dw NaN, and the update's non-finite guard skips the step, as it would anyway.)
    init = (jnp.zeros(z.shape, jnp.float32), (w * 0).astype(jnp.float32),
            None if b is None else jnp.zeros(b.shape, jnp.float32))
    (dz, dw, db), _ = jax.lax.scan(step, init, (jnp.asarray(starts), jnp.asarray(owned)))
    return dz.astype(z.dtype), dw.astype(w.dtype), None if b is None else db.astype(b.dtype)


_chunked_lse.defvjp(_chunked_lse_fwd, _chunked_lse_bwd)


def _chunked(chunk: int, vocab: int) -> bool:
    return 0 < chunk < vocab


def logsumexp(z: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None, *, n_valid: int, chunk: int,
              scale: float = 1.0) -> jnp.ndarray:
    """``logsumexp_{v < n_valid} scale * (z[k, n] . w[k, v] + b[k, v])``. ``[K, N, E], [K, V, E], [K, V] -> [K, N]``
    float32, differentiable in ``z``, ``w`` and ``b``; ``chunk`` ids at a time when ``0 < chunk < V``."""
    if not _chunked(chunk, w.shape[1]):
        return jax.nn.logsumexp(_plain_logits(z, w, b, n_valid, scale), axis=-1)
    return _chunked_lse(z, w, b, n_valid, chunk, scale)


def max_min(z: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray | None, *, n_valid: int, chunk: int) -> jnp.ndarray:
    """``max_{v < n_valid} min_k (z[k, n] . w[k, v] + b[k, v])``. ``[K, N, E], [K, V, E], [K, V] -> [N]`` float32,
    with no gradient (the ``max`` backup's target)."""
    z, w, b = jax.lax.stop_gradient((z, w, b))
    if not _chunked(chunk, w.shape[1]):
        return jnp.max(jnp.min(_plain_logits(z, w, b, n_valid, 1.0), axis=0), axis=-1)
    starts, owned = _chunk_plan(w.shape[1], chunk)

    def step(best, plan):
        logits, _, _ = _chunk_logits(z, w, b, plan[0], plan[1], n_valid, chunk, 1.0)
        return jnp.maximum(best, jnp.max(jnp.min(logits, axis=0), axis=-1)), None

    best, _ = jax.lax.scan(step, jnp.full((z.shape[1],), -jnp.inf, jnp.float32), (jnp.asarray(starts), jnp.asarray(owned)))
    return best
