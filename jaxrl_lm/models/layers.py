"""Building blocks shared by both block families: parameters with logical axis names, norms, dropout, RoPE and
masked attention over either the current tokens or a KV cache.

Every parameter is float32 and carries logical axis names in its ``out_sharding`` metadata (read them with
``nnx.get_partition_spec``); the training code maps them to mesh axes with its rule table. Names used:
``vocab``, ``embed``, ``qkv``, ``heads``, ``kv_heads``, ``mlp``, ``layers`` (the stacked-block axis),
``q_heads`` (the stacked Q-head axis), ``lora_rank`` (a LoRA factor's rank axis: no rule by default, so
unsharded; ``mesh.rules`` may map it) and ``None`` (never sharded).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxrl_lm.config import BATCH_AXES

Names = tuple[Optional[str], ...]


def normal_init(std: float):
    return nnx.initializers.normal(stddev=std)


def _linear_args(d_in: int, d_out: int, names: Names, std: float, dtype: jnp.dtype, use_bias: bool) -> dict:
    return dict(in_features=d_in, out_features=d_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                kernel_init=normal_init(std), bias_init=nnx.initializers.zeros_init(),
                kernel_metadata={"out_sharding": names}, bias_metadata={"out_sharding": names[-1:]})


def dense(rngs: nnx.Rngs, d_in: int, d_out: int, names: Names, *, std: float, dtype: jnp.dtype,
          use_bias: bool = True) -> nnx.Linear:
    """An ``nnx.Linear`` with kernel ``[d_in, d_out]`` float32 ~ N(0, std), zero bias, computing in ``dtype``.

    Inputs and weights are cast to ``dtype`` at use, so bf16 compute needs no bf16 copy of the parameters.
    """
    return nnx.Linear(**_linear_args(d_in, d_out, names, std, dtype, use_bias), rngs=rngs)


# The LoRA factors' key: the block's own parameter key folded with this tag, far above any count of draws from
# it, so drawing the factors takes nothing from the block's stream (``adapter_rngs``).
ADAPTER_TAG = 0x4C6F5241
LORA_FACTORS = ("lora_a", "lora_b")  # the parameter names of a LoraLinear's factors


def adapter_rngs(rngs: nnx.Rngs) -> nnx.Rngs:
    """A stream for LoRA factors derived from ``rngs.params``'s key without drawing from it: a LoRA model's base
    weights are exactly those of the same seed's model without adapters."""
    return nnx.Rngs(params=jax.random.fold_in(rngs.params.key[...], ADAPTER_TAG))


class LoraLinear(nnx.Linear):
    """``dense`` plus a low-rank update (LoRA): ``y = x W + b + (alpha / rank) (x A) B``.

    ``lora_a [d_in, rank]`` ~ N(0, 1 / d_in) and ``lora_b [rank, d_out]`` = 0, both float32 with the logical
    names ``(names[0], "lora_rank")`` and ``("lora_rank", names[-1])``: a fresh layer computes exactly
    ``x W + b``. The update runs in the compute ``dtype`` like the base product, ``x A`` first (a ``[..., rank]``
    intermediate: ``W + s A B`` is never formed). ``[..., d_in] -> [..., d_out]`` in ``dtype``.
    """

    def __init__(self, rngs: nnx.Rngs, adapters: nnx.Rngs, d_in: int, d_out: int, names: Names, *, std: float,
                 dtype: jnp.dtype, use_bias: bool = True, rank: int, alpha: float):
        super().__init__(**_linear_args(d_in, d_out, names, std, dtype, use_bias), rngs=rngs)
        a = normal_init(1.0 / d_in ** 0.5)(adapters.params(), (d_in, rank), jnp.float32)
        self.lora_a = nnx.Param(a, out_sharding=(names[0], "lora_rank"))
        self.lora_b = nnx.Param(jnp.zeros((rank, d_out), jnp.float32), out_sharding=("lora_rank", names[-1]))
        self.lora_scale = alpha / rank

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        y = super().__call__(inputs, out_sharding)
        x, a, b = self.promote_dtype((inputs, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        return y + self.lora_scale * ((x @ a) @ b)


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


def shard_rows(x: jax.Array, axis: int = 0) -> jax.Array:
    """Constrains ``x``'s ``axis`` (its rows: batch rows, or decision rows ``B * M``) to be split over the mesh's
    batch axes ``data x fsdp``, as the batch is; every other axis is left to XLA.

    Why: parameters are FSDP-sharded on their ``embed`` / ``mlp`` axes, and left to itself XLA's sharding
    propagation may keep them so and replicate the activations instead, so that every device computes the whole
    global batch (on a v5p-128 at fsdp 64 the GPT-2-small step held the trunk's activations and the Q-heads'
    logits of all 256 rows on every chip: 26 GiB per device against 5.3 at fsdp 8). With the rows pinned,
    XLA gathers the weights (FSDP) instead. A no-op outside a mesh context (one device, tests) and when the
    batch axes do not divide the rows. The update sets the context (``jax.sharding.use_abstract_mesh``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    ways = 1
    for name in BATCH_AXES:
        ways *= mesh.shape[name]
    if ways == 1 or x.shape[axis] % ways:
        return x
    spec = [None] * x.ndim
    spec[axis] = BATCH_AXES
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
