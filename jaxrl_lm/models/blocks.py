"""One decoder block per family, with Hugging Face attribute names so weight conversion is a name table.

GPT-2: ``ln_1, attn.c_attn (fused q|k|v, as HF's Conv1D), attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj``.
Llama: ``input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj``.
Kernels are ``[in, out]`` (flax layout): GPT-2's Conv1D weights import as they are, Llama's ``nn.Linear``
weights transposed. Both blocks are pre-norm: ``x + drop(attn(norm(x)))``, then ``x + drop(mlp(norm(x)))``.
The residual stream stays float32; matmuls run in ``cfg.dtype``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.models.layers import (
    KV, AttentionInputs, LayerNorm, RMSNorm, apply_rope, attend, dense, dropout,
)


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


def residual_std(cfg: ModelConfig) -> float:
    """GPT-2's init for projections that write into the residual stream: keeps its variance flat in depth."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


def _pre_norm_residual(
    x: jax.Array, rng: Optional[jax.Array], rate: float,
    attn: Callable[[jax.Array], tuple[jax.Array, Optional[KV]]], mlp: Callable[[jax.Array], jax.Array],
) -> tuple[jax.Array, Optional[KV]]:
    """``x [B, T, D] float32`` through both residual branches; ``attn`` and ``mlp`` include their norms."""
    rng_attn, rng_mlp = jax.random.split(rng) if rng is not None else (None, None)
    a, kv = attn(x)
    x = x + dropout(a, rate, rng_attn)
    x = x + dropout(mlp(x), rate, rng_mlp)
    return x, kv


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, dt = cfg.d_model, compute_dtype(cfg)
        self.c_attn = dense(rngs, d, 3 * d, ("embed", "qkv"), std=cfg.init_std, dtype=dt)
        self.c_proj = dense(rngs, d, d, ("heads", "embed"), std=residual_std(cfg), dtype=dt)
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim

    def __call__(self, x: jax.Array, inputs: AttentionInputs, kv: Optional[KV]) -> tuple[jax.Array, Optional[KV]]:
        """``[B, T, D] -> [B, T, D]`` compute dtype, and the updated layer cache."""
        b, t, _ = x.shape
        heads = (b, t, self.n_heads, self.head_dim)
        q, k, v = (y.reshape(heads) for y in jnp.split(self.c_attn(x), 3, axis=-1))
        out, kv = attend(q, k, v, inputs, kv)
        return self.c_proj(out.reshape(b, t, -1)), kv


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, dt = cfg.d_model, cfg.ff_dim, compute_dtype(cfg)
        self.c_fc = dense(rngs, d, f, ("embed", "mlp"), std=cfg.init_std, dtype=dt)
        self.c_proj = dense(rngs, f, d, ("mlp", "embed"), std=residual_std(cfg), dtype=dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        # HF "gelu_new" is the tanh approximation.
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class GPT2Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.attn = GPT2Attention(cfg, rngs)
        self.ln_2 = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = GPT2MLP(cfg, rngs)
        self.dropout_rate = cfg.dropout

    def __call__(self, x: jax.Array, inputs: AttentionInputs, rng: Optional[jax.Array],
                 kv: Optional[KV]) -> tuple[jax.Array, Optional[KV]]:
        """``x [B, T, D] float32 -> [B, T, D] float32`` and the updated layer cache."""
        return _pre_norm_residual(
            x, rng, self.dropout_rate, lambda y: self.attn(self.ln_1(y), inputs, kv), lambda y: self.mlp(self.ln_2(y))
        )


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, dt = cfg.d_model, cfg.head_dim, compute_dtype(cfg)
        std, bias = cfg.init_std, cfg.attention_bias
        self.q_proj = dense(rngs, d, cfg.n_heads * h, ("embed", "heads"), std=std, dtype=dt, use_bias=bias)
        self.k_proj = dense(rngs, d, cfg.kv_heads * h, ("embed", "kv_heads"), std=std, dtype=dt, use_bias=bias)
        self.v_proj = dense(rngs, d, cfg.kv_heads * h, ("embed", "kv_heads"), std=std, dtype=dt, use_bias=bias)
        self.o_proj = dense(rngs, cfg.n_heads * h, d, ("heads", "embed"), std=residual_std(cfg), dtype=dt,
                            use_bias=False)
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = h

    def __call__(self, x: jax.Array, inputs: AttentionInputs, kv: Optional[KV]) -> tuple[jax.Array, Optional[KV]]:
        """``[B, T, D] -> [B, T, D]`` compute dtype, and the updated layer cache. RoPE from ``inputs``."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        q = apply_rope(q, inputs.cos, inputs.sin)
        k = apply_rope(k, inputs.cos, inputs.sin)
        out, kv = attend(q, k, v, inputs, kv)
        return self.o_proj(out.reshape(b, t, -1)), kv


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, dt = cfg.d_model, cfg.ff_dim, compute_dtype(cfg)
        self.gate_proj = dense(rngs, d, f, ("embed", "mlp"), std=cfg.init_std, dtype=dt, use_bias=False)
        self.up_proj = dense(rngs, d, f, ("embed", "mlp"), std=cfg.init_std, dtype=dt, use_bias=False)
        self.down_proj = dense(rngs, f, d, ("mlp", "embed"), std=residual_std(cfg), dtype=dt, use_bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg, rngs)
        self.dropout_rate = cfg.dropout

    def __call__(self, x: jax.Array, inputs: AttentionInputs, rng: Optional[jax.Array],
                 kv: Optional[KV]) -> tuple[jax.Array, Optional[KV]]:
        """``x [B, T, D] float32 -> [B, T, D] float32`` and the updated layer cache."""
        return _pre_norm_residual(
            x, rng, self.dropout_rate,
            lambda y: self.self_attn(self.input_layernorm(y), inputs, kv),
            lambda y: self.mlp(self.post_attention_layernorm(y)),
        )
