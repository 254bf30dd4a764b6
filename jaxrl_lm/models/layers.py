"""Building blocks shared by both block families: parameters with logical axis names, norms, dropout, RoPE and
masked attention over either the current tokens or a KV cache.

Every parameter is float32 and carries logical axis names in its ``out_sharding`` metadata (read them with
``nnx.get_partition_spec``); the training code maps them to mesh axes with its rule table. Names used:
``vocab``, ``embed``, ``qkv``, ``heads``, ``kv_heads``, ``mlp``, ``layers`` (the stacked-block axis),
``q_heads`` (the stacked Q-head axis) and ``None`` (never sharded).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

Names = tuple[Optional[str], ...]


def normal_init(std: float):
    return nnx.initializers.normal(stddev=std)


def dense(rngs: nnx.Rngs, d_in: int, d_out: int, names: Names, *, std: float, dtype: jnp.dtype,
          use_bias: bool = True) -> nnx.Linear:
    """An ``nnx.Linear`` with kernel ``[d_in, d_out]`` float32 ~ N(0, std), zero bias, computing in ``dtype``.

    Inputs and weights are cast to ``dtype`` at use, so bf16 compute needs no bf16 copy of the parameters.
    """
    return nnx.Linear(
        d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=normal_init(std), bias_init=nnx.initializers.zeros_init(),
        kernel_metadata={"out_sharding": names}, bias_metadata={"out_sharding": names[-1:]}, rngs=rngs,
    )


def embed(rngs: nnx.Rngs, num: int, dim: int, names: Names, *, std: float) -> nnx.Embed:
    """An ``nnx.Embed`` table ``[num, dim]`` float32 whose lookups stay float32 (the residual stream's dtype)."""
    return nnx.Embed(num, dim, dtype=jnp.float32, param_dtype=jnp.float32, embedding_init=normal_init(std),
                     embedding_metadata={"out_sharding": names}, rngs=rngs)


class LayerNorm(nnx.Module):
    """LayerNorm with float32 statistics. ``[..., D] any float -> [..., D] float32``."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("embed",))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), out_sharding=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class RMSNorm(nnx.Module):
    """RMSNorm (Llama) with float32 statistics. ``[..., D] any float -> [..., D] float32``."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps) * self.scale[...]


def dropout(x: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
    """Inverted dropout; the identity when ``rng`` is None (deterministic forward) or ``rate`` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """HF Llama rotary tables. ``positions [B, T] int32 -> (cos, sin) [B, T, head_dim] float32``.

    Frequencies are laid out as two copies of ``[head_dim / 2]`` (HF ``torch.cat((freqs, freqs))``), which pairs
    element ``i`` with ``i + head_dim / 2`` (``rotate_half``) so HF q/k projection weights import unpermuted.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [B, T, N, H]`` by tables ``[B, T, H]`` in float32; returns ``x``'s dtype."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_offset: jax.Array | int) -> jax.Array:
    """Causal + segment mask. ``[B, T] int32, [B, S] int32 -> [B, 1, T, S] bool``.

    Query ``t`` sits at slot ``q_offset + t`` of the key sequence; it sees slot ``s`` iff ``s <= q_offset + t``
    and both carry the same segment id. Padding (segment 0) therefore sees only padding, and every query sees
    at least its own slot, so no softmax row is empty (no NaN for padding rows). In a KV cache the unwritten
    slots lie after every query, so the causal part alone hides them.
    """
    t = q_segment_ids.shape[-1]
    s = kv_segment_ids.shape[-1]
    q_slot = q_offset + jnp.arange(t, dtype=jnp.int32)
    causal = jnp.arange(s, dtype=jnp.int32)[None, :] <= q_slot[:, None]
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


class AttentionInputs(NamedTuple):
    """What every layer's attention shares, computed once per forward outside the layer scan.

    mask: ``[B, 1, T, S]`` bool from ``attention_mask``.
    cos, sin: RoPE tables ``[B, T, head_dim]`` float32 (None for learned positions).
    cache_index: int32 scalar write offset into the KV cache (None without a cache).
    """

    mask: jax.Array
    cos: Optional[jax.Array] = None
    sin: Optional[jax.Array] = None
    cache_index: Optional[jax.Array] = None


KV = tuple[jax.Array, jax.Array]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, inputs: AttentionInputs,
           kv_cache: Optional[KV]) -> tuple[jax.Array, Optional[KV]]:
    """Masked multi-head (or grouped-query) attention, optionally through one layer's KV cache.

    Args:
      q: ``[B, T, N, H]`` compute dtype.
      k, v: ``[B, T, Nkv, H]`` compute dtype; ``N`` is a multiple of ``Nkv`` (GQA is native to
        ``jax.nn.dot_product_attention``, so keys are never repeated in memory).
      inputs: mask (``S = T`` without a cache, ``S = max_len`` with one) and cache offset.
      kv_cache: ``([B, S, Nkv, H], [B, S, Nkv, H])`` in the cache dtype, or None.

    Returns:
      ``[B, T, N, H]`` in q's dtype (softmax runs in float32 inside), and the updated cache (None without one).
    """
    if kv_cache is not None:
        k_cache, v_cache = kv_cache
        start = (0, inputs.cache_index, 0, 0)
        k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
        v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
        kv_cache = (k, v)
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=inputs.mask)
    return out, kv_cache
