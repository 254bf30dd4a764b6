"""One decoder block per family, with Hugging Face attribute names so weight conversion is a name table.

GPT-2: ``ln_1, attn.c_attn (fused q|k|v, as HF's Conv1D), attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj``.
Llama: ``input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj``.
Kernels are ``[in, out]`` (flax layout): GPT-2's Conv1D weights import as they are, Llama's ``nn.Linear``
weights transposed. Both blocks are pre-norm: ``x + drop(attn(norm(x)))``, then ``x + drop(mlp(norm(x)))``.
The residual stream stays float32; matmuls run in ``cfg.dtype``.

With ``model.lora.rank > 0`` the projections ``model.lora.targets`` names are ``LoraLinear``s: the same kernel and
bias plus ``lora_a``/``lora_b`` beside them (``attn.c_attn.{kernel, bias, lora_a, lora_b}``), drawn from a stream
of their own (``adapter_rngs``), so the base weights are those of the same seed without adapters.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.models.layers import (
    KV, AttentionInputs, LayerNorm, LoraLinear, RMSNorm, adapter_rngs, apply_rope, attend, dense, dropout,
)


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


def residual_std(cfg: ModelConfig) -> float:
    """GPT-2's init for projections that write into the residual stream: keeps its variance flat in depth."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


def projection(cfg: ModelConfig, rngs: nnx.Rngs, adapters: Optional[nnx.Rngs], path: str, d_in: int, d_out: int,
               names: tuple[Optional[str], ...], *, std: float, use_bias: bool = True) -> nnx.Linear:
    """The linear layer at ``path`` inside a block (``"attn.c_attn"``): a ``LoraLinear`` when ``model.lora``
    targets it (``adapters``: the block's LoRA stream, None without adapters), else ``dense``."""
    dt, lora = compute_dtype(cfg), cfg.lora
    if adapters is not None and path in lora.projections(cfg.family):
        return LoraLinear(rngs, adapters, d_in, d_out, names, std=std, dtype=dt, use_bias=use_bias, rank=lora.rank,
                          alpha=lora.alpha)
    return dense(rngs, d_in, d_out, names, std=std, dtype=dt, use_bias=use_bias)


def _adapters(cfg: ModelConfig, rngs: nnx.Rngs) -> Optional[nnx.Rngs]:
    return adapter_rngs(rngs) if cfg.lora.rank else None


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
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, adapters: Optional[nnx.Rngs] = None):
        d = cfg.d_model
        self.c_attn = projection(cfg, rngs, adapters, "attn.c_attn", d, 3 * d, ("embed", "qkv"), std=cfg.init_std)
        self.c_proj = projection(cfg, rngs, adapters, "attn.c_proj", d, d, ("heads", "embed"), std=residual_std(cfg))
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
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, adapters: Optional[nnx.Rngs] = None):
        d, f = cfg.d_model, cfg.ff_dim
        self.c_fc = projection(cfg, rngs, adapters, "mlp.c_fc", d, f, ("embed", "mlp"), std=cfg.init_std)
        self.c_proj = projection(cfg, rngs, adapters, "mlp.c_proj", f, d, ("mlp", "embed"), std=residual_std(cfg))

    def __call__(self, x: jax.Array) -> jax.Array:
        # HF "gelu_new" is the tanh approximation.
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True))


class GPT2Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        adapters = _adapters(cfg, rngs)
        self.ln_1 = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.attn = GPT2Attention(cfg, rngs, adapters)
        self.ln_2 = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = GPT2MLP(cfg, rngs, adapters)
        self.dropout_rate = cfg.dropout

    def __call__(self, x: jax.Array, inputs: AttentionInputs, rng: Optional[jax.Array],
                 kv: Optional[KV]) -> tuple[jax.Array, Optional[KV]]:
        """``x [B, T, D] float32 -> [B, T, D] float32`` and the updated layer cache."""
        return _pre_norm_residual(
            x, rng, self.dropout_rate, lambda y: self.attn(self.ln_1(y), inputs, kv), lambda y: self.mlp(self.ln_2(y))
        )


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, adapters: Optional[nnx.Rngs] = None):
        d, h = cfg.d_model, cfg.head_dim
        std, bias = cfg.init_std, cfg.attention_bias
        proj = lambda path, *args, **kw: projection(cfg, rngs, adapters, f"self_attn.{path}", *args, **kw)  # noqa: E731
        self.q_proj = proj("q_proj", d, cfg.n_heads * h, ("embed", "heads"), std=std, use_bias=bias)
        self.k_proj = proj("k_proj", d, cfg.kv_heads * h, ("embed", "kv_heads"), std=std, use_bias=bias)
        self.v_proj = proj("v_proj", d, cfg.kv_heads * h, ("embed", "kv_heads"), std=std, use_bias=bias)
        self.o_proj = proj("o_proj", cfg.n_heads * h, d, ("heads", "embed"), std=residual_std(cfg), use_bias=False)
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
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, adapters: Optional[nnx.Rngs] = None):
        d, f = cfg.d_model, cfg.ff_dim
        proj = lambda path, *args, **kw: projection(cfg, rngs, adapters, f"mlp.{path}", *args, **kw)  # noqa: E731
        self.gate_proj = proj("gate_proj", d, f, ("embed", "mlp"), std=cfg.init_std, use_bias=False)
        self.up_proj = proj("up_proj", d, f, ("embed", "mlp"), std=cfg.init_std, use_bias=False)
        self.down_proj = proj("down_proj", f, d, ("mlp", "embed"), std=residual_std(cfg), use_bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        adapters = _adapters(cfg, rngs)
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg, rngs, adapters)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg, rngs, adapters)
        self.dropout_rate = cfg.dropout

    def __call__(self, x: jax.Array, inputs: AttentionInputs, rng: Optional[jax.Array],
                 kv: Optional[KV]) -> tuple[jax.Array, Optional[KV]]:
        """``x [B, T, D] float32 -> [B, T, D] float32`` and the updated layer cache."""
        return _pre_norm_residual(
            x, rng, self.dropout_rate,
            lambda y: self.self_attn(self.input_layernorm(y), inputs, kv),
            lambda y: self.mlp(self.post_attention_layernorm(y)),
        )
