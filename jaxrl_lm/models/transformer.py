"""The trunk: embeddings, a stack of blocks applied with ``jax.lax.scan``, the final norm; and the KV cache.

Blocks are created once with ``nnx.vmap`` so every block parameter has a leading ``[n_layers]`` axis (logical
name ``layers``), and applied by scanning over that axis: compile time does not grow with depth. The scan body
merges one layer's parameter slice into the block's graph and runs it under ``jax.checkpoint`` with the
policy ``cfg.remat`` names.

Attribute names follow Hugging Face: ``GPT2Model`` holds ``wte, wpe, h, ln_f``; ``LlamaModel`` holds
``embed_tokens, layers, norm`` (HF's ``model.*``).
"""

from __future__ import annotations

import abc
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.models.blocks import GPT2Block, LlamaBlock, compute_dtype
from jaxrl_lm.models.layers import (
    KV, AttentionInputs, LayerNorm, RMSNorm, attention_mask, dropout, embed, rope_tables, shard_rows,
)

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class KVCache(NamedTuple):
    """Decoding state: fixed shapes, plain arrays, so it can live in a jitted ``lax.while_loop`` carry.

    k, v: ``[n_layers, B, max_len, n_kv_heads, head_dim]`` in the compute dtype.
    segment_ids: ``[B, max_len]`` int32, the segment id written with each slot (0 = padding or unwritten);
      a query attends only to earlier-or-same slots of its own segment id.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    """An empty cache for ``batch_size`` rows of up to ``max_len`` tokens (prompt + generated)."""
    shape = (cfg.n_layers, batch_size, max_len, cfg.kv_heads, cfg.head_dim)
    # Separate buffers for k and v, so a jitted decode loop may donate the whole cache.
    return KVCache(jnp.zeros(shape, compute_dtype(cfg)), jnp.zeros(shape, compute_dtype(cfg)),
                   jnp.zeros((batch_size, max_len), jnp.int32))


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """``cfg.n_layers`` independently initialised blocks as one module with a leading ``[n_layers]`` axis."""
    block_cls = {"gpt2": GPT2Block, "llama": LlamaBlock}[cfg.family]

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(layer_rngs: nnx.Rngs) -> nnx.Module:
        return block_cls(cfg, layer_rngs)

    return make(rngs)


def scan_blocks(blocks: nnx.Module, x: jax.Array, inputs: AttentionInputs, layer_rngs: Optional[jax.Array],
                kv: Optional[KV], remat: str, frozen_layers: int = 0) -> tuple[jax.Array, Optional[KV]]:
    """Applies the stacked blocks in order.

    Args:
      blocks: the stacked block module (every parameter ``[n_layers, ...]``).
      x: ``[B, T, D]`` float32 residual stream.
      inputs: attention mask / RoPE / cache offset shared by all layers.
      layer_rngs: ``[n_layers]`` dropout keys, or None for a deterministic forward.
      kv: the whole cache's ``(k, v)``, each ``[n_layers, B, S, Nkv, H]``, or None.
      remat: a ``ModelConfig.remat`` name.
      frozen_layers: without a cache, blocks ``[0, frozen_layers)`` run as their own scan under stop-gradient,
        without dropout or remat, and their output is cut from the gradient: their backward is never built, so
        a frozen bottom costs one forward (``train.frozen_layers``).

    Returns:
      ``[B, T, D]`` float32 and the updated ``(k, v)`` (None without a cache).
    """
    graphdef, params = nnx.split(blocks)

    def body(x, layer):
        # The residual stream's rows stay split like the batch's (shard_rows: XLA gathers the FSDP weights).
        layer_params, rng = layer
        return shard_rows(nnx.merge(graphdef, layer_params)(shard_rows(x), inputs, rng, None)[0]), None

    if kv is None:
        if frozen_layers:
            below = jax.tree.map(lambda p: jax.lax.stop_gradient(p[:frozen_layers]), params)
            x = jax.lax.stop_gradient(jax.lax.scan(body, jax.lax.stop_gradient(x), (below, None))[0])
            params = jax.tree.map(lambda p: p[frozen_layers:], params)
            layer_rngs = None if layer_rngs is None else layer_rngs[frozen_layers:]
            if not jax.tree.leaves(params)[0].shape[0]:
                return x, None
        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        return jax.lax.scan(body, x, (params, layer_rngs))[0], None

    # Decoding: the whole cache rides in the carry and each layer writes its slice back in place. As scan
    # inputs/outputs instead, every step would copy the whole cache (3x slower per token at GPT-2-small shape).
    def cached_body(carry, layer):
        x, k_all, v_all = carry
        layer_params, rng, index = layer
        x, (k, v) = nnx.merge(graphdef, layer_params)(x, inputs, rng, (k_all[index], v_all[index]))
        at = (index, 0, 0, 0, 0)
        return (x, jax.lax.dynamic_update_slice(k_all, k[None], at),
                jax.lax.dynamic_update_slice(v_all, v[None], at)), None

    layers = jnp.arange(kv[0].shape[0], dtype=jnp.int32)
    (x, k_all, v_all), _ = jax.lax.scan(cached_body, (x, *kv), (params, layer_rngs, layers))
    return x, (k_all, v_all)


class Trunk(nnx.Module):
    """Shared forward of both families; subclasses provide the embeddings, positions, blocks and final norm.

    (``nnx.Module``'s metaclass derives from ``ABCMeta``, so the hooks below are checked at construction.)
    """

    cfg: ModelConfig

    @abc.abstractmethod
    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Token (and learned position) embeddings. ``[B, T] int32 x2 -> [B, T, D] float32``."""

    @abc.abstractmethod
    def rope(self, positions: jax.Array) -> tuple[Optional[jax.Array], Optional[jax.Array]]:
        """RoPE tables ``[B, T, head_dim]`` float32, or ``(None, None)`` for learned positions."""

    @property
    @abc.abstractmethod
    def blocks(self) -> nnx.Module:
        """The stacked blocks."""

    @property
    @abc.abstractmethod
    def final_norm(self) -> nnx.Module:
        """The norm applied after the last block."""

    @property
    @abc.abstractmethod
    def token_embedding(self) -> nnx.Embed:
        """The ``[Vp, D]`` token table, also the LM head when embeddings are tied."""

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
                 dropout_rng: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
                 cache_index: Optional[jax.Array] = None, mask: Optional[jax.Array] = None,
                 frozen_layers: int = 0) -> tuple[jax.Array, Optional[KVCache]]:
        """Hidden states after the final norm.

        Args:
          tokens, positions, segment_ids: ``[B, T]`` int32.
          dropout_rng: a PRNG key enabling dropout, or None (deterministic).
          cache: a ``KVCache`` to read and write at ``cache_index`` (int32 scalar), or None to attend only
            among these ``T`` tokens.
          mask: ``[B, T, S]`` bool, an explicit attention mask replacing the causal + segment one (``S = T``
            without a cache, the cache length with one); every row must see at least one key. With a cache, the
            ``segment_ids`` are still written beside the new slots.
          frozen_layers: a training forward's frozen bottom (``train.frozen_layers``, without a cache): ``n > 0``
            = the embeddings and blocks ``[0, n)`` pass no gradient and take no dropout; ``-1`` = the whole trunk,
            final norm included. The values are those of the plain forward (without dropout).

        Returns:
          ``[B, T, D]`` float32 and the updated cache (None without one).
        """
        cfg = self.cfg
        if frozen_layers < 0:
            h, _ = self(tokens, positions, segment_ids, mask=mask)
            return jax.lax.stop_gradient(h), None
        rng_embed = layer_rngs = None
        if dropout_rng is not None and cfg.dropout > 0:
            rng_embed, rng_layers = jax.random.split(dropout_rng)
            layer_rngs = jax.random.split(rng_layers, cfg.n_layers)
        x = self.embed(tokens, positions)
        x = jax.lax.stop_gradient(x) if frozen_layers else dropout(x, cfg.dropout, rng_embed)
        cos, sin = self.rope(positions)
        if cache is None:
            inputs = AttentionInputs(attention_mask(segment_ids, segment_ids, 0) if mask is None else mask[:, None],
                                     cos, sin)
            x, _ = scan_blocks(self.blocks, x, inputs, layer_rngs, None, cfg.remat, frozen_layers)
            return self.final_norm(x), None
        cache_index = jnp.asarray(cache_index, jnp.int32)
        kv_segment_ids = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, (0, cache_index))
        if mask is None:
            mask = attention_mask(segment_ids, kv_segment_ids, cache_index)[:, 0]
        inputs = AttentionInputs(mask[:, None], cos, sin, cache_index)
        x, (k, v) = scan_blocks(self.blocks, x, inputs, layer_rngs, (cache.k, cache.v), cfg.remat)
        return self.final_norm(x), KVCache(k, v, kv_segment_ids)


    def features(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, frozen_layers: int, *,
                 mask: Optional[jax.Array] = None) -> jax.Array:
        """What a frozen bottom hands to the blocks above it (the cached trunk features, ``train.frozen_layers``):
        the residual stream after block ``frozen_layers - 1``, or with ``-1`` the hidden states after the final
        norm. Deterministic. ``[B, T] int32 x3 -> [B, T, D]`` float32."""
        if frozen_layers < 0:
            return self(tokens, positions, segment_ids, mask=mask)[0]
        x = self.embed(tokens, positions)
        inputs = AttentionInputs(attention_mask(segment_ids, segment_ids, 0) if mask is None else mask[:, None],
                                 *self.rope(positions))
        graphdef, params = nnx.split(self.blocks)
        below = nnx.merge(graphdef, jax.tree.map(lambda p: p[:frozen_layers], params))
        return scan_blocks(below, x, inputs, None, None, "none")[0]

    def from_features(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, frozen_layers: int, *,
                      dropout_rng: Optional[jax.Array] = None, mask: Optional[jax.Array] = None) -> jax.Array:
        """The rest of the forward from ``features(...)`` ``x [B, T, D]``: blocks ``frozen_layers..`` and the
        final norm (nothing with ``-1``), with dropout iff ``dropout_rng`` is given. Equals ``self(...)`` with
        ``frozen_layers``. ``-> [B, T, D]`` float32."""
        x = jax.lax.stop_gradient(x)
        if frozen_layers < 0:
            return x
        cfg = self.cfg
        layer_rngs = None
        if dropout_rng is not None and cfg.dropout > 0:
            layer_rngs = jax.random.split(jax.random.split(dropout_rng)[1], cfg.n_layers)[frozen_layers:]
        inputs = AttentionInputs(attention_mask(segment_ids, segment_ids, 0) if mask is None else mask[:, None],
                                 *self.rope(positions))
        if frozen_layers < cfg.n_layers:
            graphdef, params = nnx.split(self.blocks)
            above = nnx.merge(graphdef, jax.tree.map(lambda p: p[frozen_layers:], params))
            x, _ = scan_blocks(above, x, inputs, layer_rngs, None, cfg.remat)
        return self.final_norm(x)


class GPT2Model(Trunk):
    """GPT-2 trunk: ``wte [Vp, D]``, ``wpe [max_seq_len, D]``, ``h`` (stacked ``GPT2Block``), ``ln_f``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = embed(rngs, cfg.padded_vocab_size, cfg.d_model, ("vocab", "embed"), std=cfg.init_std)
        self.wpe = embed(rngs, cfg.max_seq_len, cfg.d_model, (None, "embed"), std=cfg.init_std)
        self.h = stacked_blocks(cfg, rngs)
        self.ln_f = LayerNorm(cfg.d_model, cfg.norm_eps)

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        # The table has max_seq_len rows and nnx.Embed's jnp.take fills an out-of-range row with NaN. Data and
        # prompts never pass it (the config and the decoder check), but a turn sampled inside the update at one of
        # a full window's last states continues past it (utterance-level candidates, pos(state) + 1 + c): such a
        # token reads the last row, the one position the table can give it.
        return self.wte(tokens) + self.wpe(jnp.minimum(positions, self.cfg.max_seq_len - 1))

    def rope(self, positions: jax.Array) -> tuple[None, None]:
        return None, None

    @property
    def blocks(self) -> nnx.Module:
        return self.h

    @property
    def final_norm(self) -> nnx.Module:
        return self.ln_f

    @property
    def token_embedding(self) -> nnx.Embed:
        return self.wte


class LlamaModel(Trunk):
    """Llama trunk: ``embed_tokens [Vp, D]``, ``layers`` (stacked ``LlamaBlock``), ``norm``; RoPE positions."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = embed(rngs, cfg.padded_vocab_size, cfg.d_model, ("vocab", "embed"), std=cfg.init_std)
        self.layers = stacked_blocks(cfg, rngs)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens)

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)

    @property
    def blocks(self) -> nnx.Module:
        return self.layers

    @property
    def final_norm(self) -> nnx.Module:
        return self.norm

    @property
    def token_embedding(self) -> nnx.Embed:
        return self.embed_tokens
