"""``QTransformer``: the trunk plus LM, Q and V heads; ``build`` makes one from a ``ModelConfig``.

Parameters live in exactly four attributes, so the training code can swap any of them for a target copy
between ``nnx.split`` and ``nnx.merge``: ``transformer`` (the trunk), ``lm_head`` (None when embeddings are
tied), ``q_heads`` (all K, stacked) and ``v_head``. No module holds RNG state: dropout takes an explicit key.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.models.blocks import compute_dtype
from jaxrl_lm.models.heads import QHeads, VHead
from jaxrl_lm.models.layers import dense
from jaxrl_lm.models.transformer import GPT2Model, KVCache, LlamaModel, init_cache

# A model's parameters as a pure nested dict (``nnx.to_pure_dict``): what training state, checkpoints, sharding
# rules and Hugging Face export all read. Top-level keys: ``transformer``, ``lm_head`` (untied only), ``q_heads``,
# ``v_head``.
Params = dict[str, Any]


class QTransformer(nnx.Module):
    """Decoder-only transformer with token-level Q, V and LM heads (docs/design.md section 2).

    Every head takes hidden states ``h [..., D]`` of any leading shape; ``h_i`` scores the token after ``i``.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.transformer = GPT2Model(cfg, rngs) if cfg.family == "gpt2" else LlamaModel(cfg, rngs)
        self.lm_head: Optional[nnx.Linear] = None if cfg.tie_embeddings else dense(
            rngs, cfg.d_model, cfg.padded_vocab_size, ("embed", "vocab"), std=cfg.init_std, dtype=compute_dtype(cfg),
            use_bias=False,
        )
        self.q_heads = QHeads(cfg, rngs)
        self.v_head = VHead(cfg, rngs)

    def hidden(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
               dropout_rng: Optional[jax.Array] = None, mask: Optional[jax.Array] = None,
               frozen_layers: int = 0) -> jax.Array:
        """Trunk forward over packed rows. ``[B, L] int32 x3 -> [B, L, D]`` float32 (after the final norm).

        Token ``i`` attends to ``j`` iff ``j <= i`` and ``segment_ids[i] == segment_ids[j]``; ``positions``
        restart in every segment (``jaxrl_lm.batch.segment_positions``). The training update passes what
        ``jaxrl_lm.batch.trunk_inputs`` derives for ``cfg.context``: the episode segments, or one id per
        observation window. Dropout runs iff ``dropout_rng`` is given (and ``cfg.dropout > 0``).

        ``mask [B, L, L] bool`` replaces that rule with an explicit one (token ``i`` sees ``j`` iff
        ``mask[i, j]``; every row must see some key): the utterance critic's block layout, where sampled turns
        attend to one copy of their history (``jaxrl_lm.rl.utterance``). ``segment_ids`` are then unused.

        ``frozen_layers`` (``train.frozen_layers``): the embeddings and the first ``n`` blocks (``-1``: the whole
        trunk) pass no gradient and take no dropout; the values are those of the plain forward.
        """
        h, _ = self.transformer(tokens, positions, segment_ids, dropout_rng=dropout_rng, mask=mask,
                                frozen_layers=frozen_layers)
        return h

    def trunk_features(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, frozen_layers: int, *,
                       mask: Optional[jax.Array] = None) -> jax.Array:
        """A frozen trunk bottom's output, what ``data.feature_cache`` stores: the residual stream after block
        ``frozen_layers - 1`` (``-1``: the final hidden states). ``[B, L] int32 x3 -> [B, L, D]`` float32."""
        return self.transformer.features(tokens, positions, segment_ids, frozen_layers, mask=mask)

    def hidden_from_features(self, features: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                             frozen_layers: int, *, dropout_rng: Optional[jax.Array] = None,
                             mask: Optional[jax.Array] = None) -> jax.Array:
        """``hidden(..., frozen_layers=n)`` from the frozen bottom's cached output ``features [B, L, D]``: the
        trained blocks and the final norm only. ``-> [B, L, D]`` float32."""
        return self.transformer.from_features(features, positions, segment_ids, frozen_layers,
                                              dropout_rng=dropout_rng, mask=mask)

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of at most ``max_len`` tokens, prompt included."""
        return init_cache(self.cfg, batch_size, max_len)

    def hidden_with_cache(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, cache_index: jax.Array,
                          segment_ids: Optional[jax.Array] = None, mask: Optional[jax.Array] = None
                          ) -> tuple[jax.Array, KVCache]:
        """Deterministic trunk forward of ``T`` new tokens through a KV cache (prefill ``T > 1``, a step ``T = 1``).

        Args:
          tokens, positions: ``[B, T]`` int32; the tokens are written to cache slots
            ``[cache_index, cache_index + T)``, which must fit in ``max_len``.
          cache: from ``init_cache`` or a previous call.
          cache_index: int32 scalar, the first slot to write (the same for every row).
          segment_ids: ``[B, T]`` int32, default all 1. Rows of different prompt lengths are left-padded: give
            padding tokens segment 0 (and real tokens positions counting from 0 at their first token); no real
            token then attends to padding.
          mask: ``[B, T, max_len]`` bool replacing the causal + segment rule (see ``hidden``).

        Returns:
          ``h [B, T, D]`` float32 and the updated cache.
        """
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        h, cache = self.transformer(tokens, positions, segment_ids, cache=cache, cache_index=cache_index, mask=mask)
        return h, cache

    def lm_logits(self, h: jax.Array) -> jax.Array:
        """Next-token logits. ``[..., D] -> [..., Vp]`` float32 (ids ``>= vocab_size`` must be masked)."""
        dt = compute_dtype(self.cfg)
        if self.lm_head is None:
            table = self.transformer.token_embedding.embedding[...]
            return jnp.einsum("...d,vd->...v", h.astype(dt), table.astype(dt), preferred_element_type=jnp.float32)
        kernel = self.lm_head.kernel[...]
        return jnp.einsum("...d,dv->...v", h.astype(dt), kernel.astype(dt), preferred_element_type=jnp.float32)

    def lm_output_layer(self, h: jax.Array) -> tuple[jax.Array, jax.Array, None]:
        """The LM head as one output layer for ``jaxrl_lm.rl.vocab``: ``h [..., D] -> (z [1, ..., D], w [1, Vp, D],
        None)`` in the compute dtype, ``logits[v] = z . w[v]``. An untied head's ``[D, Vp]`` kernel is read
        transposed."""
        dt = compute_dtype(self.cfg)
        table = (self.transformer.token_embedding.embedding[...] if self.lm_head is None
                 else self.lm_head.kernel[...].T)
        return h.astype(dt)[None], table.astype(dt)[None], None

    def lm_at(self, h: jax.Array, actions: jax.Array) -> jax.Array:
        """Next-token logits of the given ids only (their rows of the LM weights gathered first, never
        ``[..., Vp]``). ``[..., D], [...] int32 -> [...]`` float32."""
        dt = compute_dtype(self.cfg)
        if self.lm_head is None:
            rows = jnp.take(self.transformer.token_embedding.embedding[...], actions, axis=0)
        else:
            rows = jnp.take(self.lm_head.kernel[...], actions, axis=1)
            rows = jnp.moveaxis(rows, 0, -1)
        return jnp.einsum("...d,...d->...", h.astype(dt), rows.astype(dt), preferred_element_type=jnp.float32)

    def q_output_layer(self, h: jax.Array) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
        """The Q-heads' output layer (``QHeads.output_layer``): ``(z [K, ..., M], w [K, Vp, M], b [K, Vp] or None)``."""
        return self.q_heads.output_layer(h)

    def q_logits(self, h: jax.Array) -> jax.Array:
        """Every head's Q-values for every action. ``[..., D] -> [K, ..., Vp]`` float32."""
        return self.q_heads(h)

    def q_at(self, h: jax.Array, actions: jax.Array) -> jax.Array:
        """Q-values of the given actions, without forming ``[..., Vp]``. ``[..., D], [...] int32 -> [K, ...]``."""
        return self.q_heads.at(h, actions)

    def value(self, h: jax.Array) -> jax.Array:
        """State values. ``[..., D] -> [...]`` float32."""
        return self.v_head(h)


def build(cfg: ModelConfig, seed: int | jax.Array = 0) -> QTransformer:
    """A freshly initialised ``QTransformer`` (float32 parameters) for ``cfg``.

    The constructor runs under one jit: eager initialisation would compile every parameter shape separately
    (about 20 s for GPT-2 small on 2 CPU cores, against 8 s jitted). Parameters carry logical axis names as
    metadata only (no mesh is needed here); the training code places them on its mesh. ``seed`` may be a traced
    int32 scalar, so that ``jax.vmap`` builds many seeds' models in one compile (``train.seeds.init_states``).

    Example::

        model = jaxrl_lm.build_model(cfg.model, seed=0)
        hidden = model.hidden(tokens, positions, segment_ids)   # [B, L] int32 each -> [B, L, D] float32
        graphdef, params = jaxrl_lm.split_model(model)          # what init_state and make_update take
    """
    with nnx.use_eager_sharding(False):
        return nnx.jit(lambda: QTransformer(cfg, nnx.Rngs(params=jax.random.key(seed))))()


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Params]:
    """Static graph and the float32 parameter dict of a built model."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def model_graphdef(model_cfg: ModelConfig) -> nnx.GraphDef:
    """The static graph of the model of ``model_cfg`` (what ``nnx.merge`` needs); nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: build(model_cfg)), nnx.Param)[0]
