"""Q and V heads on the trunk's hidden states (the LM head lives on ``QTransformer``, beside the tied table).

The K Q-heads are one module whose parameters all carry a leading ``[K]`` axis (logical name ``q_heads``), so a
target copy of all of them is one pytree and they run as one batched matmul. Their output weights are stored
one row per action (``out_kernel [K, Vp, M]``, like an embedding table), which makes ``q_at``'s gather of the
taken action's weights a contiguous row read; ``q_at`` never forms ``[..., Vp]``.

Every head returns float32. Ids ``>= cfg.vocab_size`` are padding of the vocabulary: their logits exist (shape
``Vp``) but must be masked before any softmax or max, with ``valid_vocab_mask``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.models.blocks import compute_dtype
from jaxrl_lm.models.layers import normal_init


def valid_vocab_mask(cfg: ModelConfig) -> jax.Array:
    """``[Vp]`` bool: True for real token ids, False for the ids padding the vocabulary to ``Vp``."""
    return jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple, std: float) -> nnx.Param:
    return nnx.Param(normal_init(std)(rngs.params(), shape, jnp.float32), out_sharding=names)


def _zeros(shape: tuple[int, ...], names: tuple) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, jnp.float32), out_sharding=names)


def _expand(bias: jax.Array, n_lead: int) -> jax.Array:
    """``[K, X] -> [K, 1 x n_lead, X]``, to add a per-head bias to ``[K, ..., X]``."""
    return bias.reshape(bias.shape[:1] + (1,) * n_lead + bias.shape[1:])


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


class QHeads(nnx.Module):
    """K Q-heads. ``mlp``: ``h -> gelu(h W1 + b1) -> W2 + b2`` with hidden ``M = q_head_hidden_mult * D``;
    ``linear``: ``h -> W2 + b2`` (``M = D``).

    Parameters: ``fc_kernel [K, D, M]``, ``fc_bias [K, M]`` (mlp only), ``out_kernel [K, Vp, M]`` (one row per
    action), ``out_bias [K, Vp]`` (absent when ``cfg.q_head_bias`` is false).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        k, d, vp = cfg.n_q_heads, cfg.d_model, cfg.padded_vocab_size
        self.dtype = compute_dtype(cfg)
        self.is_mlp = cfg.q_head == "mlp"
        width = cfg.q_head_hidden_mult * d if self.is_mlp else d
        if self.is_mlp:
            self.fc_kernel = _param(rngs, (k, d, width), ("q_heads", "embed", "mlp"), cfg.init_std)
            self.fc_bias = _zeros((k, width), ("q_heads", "mlp"))
        self.out_kernel = _param(rngs, (k, vp, width), ("q_heads", "vocab", "mlp" if self.is_mlp else "embed"),
                                 cfg.init_std)
        self.out_bias = _zeros((k, vp), ("q_heads", "vocab")) if cfg.q_head_bias else None

    def _features(self, h: jax.Array) -> tuple[jax.Array, str]:
        """Inputs of the output layer and their einsum label for the head axis.

        ``[..., D] -> ([K, ..., M], "k")`` for mlp heads; linear heads share ``h`` itself (``[..., D]``, ``""``)
        rather than copying it K times.
        """
        h = h.astype(self.dtype)
        if not self.is_mlp:
            return h, ""
        z = jnp.einsum("...d,kdm->k...m", h, self.fc_kernel[...].astype(self.dtype))
        return _gelu(z + _expand(self.fc_bias[...], h.ndim - 1).astype(self.dtype)), "k"

    def __call__(self, h: jax.Array) -> jax.Array:
        """All actions' Q-values. ``[..., D] -> [K, ..., Vp]`` float32."""
        z, k = self._features(h)
        w = self.out_kernel[...].astype(self.dtype)
        q = jnp.einsum(f"{k}...m,kvm->k...v", z, w, preferred_element_type=jnp.float32)
        return q if self.out_bias is None else q + _expand(self.out_bias[...], h.ndim - 1)

    def output_layer(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """The output layer's inputs and weights, for reductions over the vocabulary that never form
        ``[K, ..., Vp]`` (``jaxrl_lm.rl.vocab``): ``h [..., D] -> (z [K, ..., M], w [K, Vp, M], b [K, Vp] or
        None)`` in the compute dtype (the bias float32), so that ``Q_k(h, v) = z_k . w_k[v] + b_k[v]``."""
        z, k = self._features(h)
        if not k:  # linear heads share h; the reductions take one [K, ..., M] operand
            z = jnp.broadcast_to(z, (self.out_kernel.shape[0],) + z.shape)
        bias = None if self.out_bias is None else self.out_bias[...]
        return z, self.out_kernel[...].astype(self.dtype), bias

    def at(self, h: jax.Array, actions: jax.Array) -> jax.Array:
        """Q-values of the given actions only. ``[..., D], [...] int -> [K, ...]`` float32.

        Gathers each action's output row (``[K, ..., M]``) and takes one dot product per position: O(M) per
        head and position instead of O(M Vp).
        """
        z, k = self._features(h)
        w = jnp.take(self.out_kernel[...], actions, axis=1).astype(self.dtype)
        q = jnp.einsum(f"{k}...m,k...m->k...", z, w, preferred_element_type=jnp.float32)
        return q if self.out_bias is None else q + jnp.take(self.out_bias[...], actions, axis=1)


class VHead(nnx.Module):
    """State value. With ``cfg.q_head == "mlp"``: ``gelu(h W1 + b1) . w2 + b2`` (same hidden width as the
    Q-heads, so V is as expressive as Q); with ``"linear"``: ``h . w2 + b2``.

    Parameters: ``fc_kernel [D, M]``, ``fc_bias [M]`` (mlp only), ``out_kernel [M]``, ``out_bias []``.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.dtype = compute_dtype(cfg)
        self.is_mlp = cfg.q_head == "mlp"
        width = cfg.q_head_hidden_mult * d if self.is_mlp else d
        if self.is_mlp:
            self.fc_kernel = _param(rngs, (d, width), ("embed", "mlp"), cfg.init_std)
            self.fc_bias = _zeros((width,), ("mlp",))
        self.out_kernel = _param(rngs, (width,), ("mlp" if self.is_mlp else "embed",), cfg.init_std)
        self.out_bias = _zeros((), ())

    def __call__(self, h: jax.Array) -> jax.Array:
        """``[..., D] -> [...]`` float32."""
        z = h.astype(self.dtype)
        if self.is_mlp:
            z = _gelu(z @ self.fc_kernel[...].astype(self.dtype) + self.fc_bias[...].astype(self.dtype))
        v = jnp.einsum("...m,m->...", z, self.out_kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
        return v + self.out_bias[...]
