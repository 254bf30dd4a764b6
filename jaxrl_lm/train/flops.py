"""Model FLOPs of one update, from the architecture (XLA's cost analysis counts a scanned layer body once).

Counting rule: a matmul of ``[m, k] x [k, n]`` is ``2 m k n`` FLOPs; a trained forward costs 1x and its
backward 2x (so 3x), a forward under stop-gradient 1x (a frozen trunk bottom, ``train.frozen_layers``: its
blocks are never differentiated). Elementwise work, norms and softmaxes are not counted.

Per token of the batch (``T = B * L`` tokens), with ``D`` the width, ``F`` the MLP width, ``V`` the padded
vocabulary, ``H``/``Hkv`` query/key-value heads of size ``d``, ``n`` layers and ``L`` the row length:

- trunk:      ``n * (2 D (H + 2 Hkv) d + 2 H d D + 2 D F m + 4 L H d)``, ``m`` = 2 (gpt2) or 3 (llama gated),
  the last term the attention scores and weighted sum over all ``L`` keys (what the dense kernel computes).

The heads' FLOPs (and any extra trunk forward, e.g. a full-scope target trunk: 1x) come from the objective
(``Objective.head_flops``; ``jaxrl_lm.rl.token_q.token_q_head_flops`` documents token-level Q-learning's).
"""

from __future__ import annotations

import dataclasses

from jaxrl_lm.config import Config
from jaxrl_lm.rl import get_objective


@dataclasses.dataclass(frozen=True)
class UpdateFlops:
    trunk: float  # trained trunk (+ target trunk forward) for the whole batch
    heads: float  # every head, online and target, for the whole batch
    per_token: float  # (trunk + heads) / tokens

    @property
    def total(self) -> float:
        return self.trunk + self.heads


def trunk_flops_per_token(cfg: Config, seq_len: int) -> float:
    """Forward FLOPs of the trunk per token (see module docstring)."""
    m = cfg.model
    d = m.head_dim
    mlp_mats = 3 if m.family == "llama" else 2
    per_layer = (2 * m.d_model * (m.n_heads + 2 * m.kv_heads) * d + 2 * m.n_heads * d * m.d_model
                 + 2 * m.d_model * m.ff_dim * mlp_mats + 4 * seq_len * m.n_heads * d)
    return float(m.n_layers * per_layer)


def update_flops(cfg: Config, batch_size: int, seq_len: int, *, cached_features: bool = False) -> UpdateFlops:
    """Model FLOPs of one optimizer step on a ``[batch_size, seq_len]`` batch; ``cached_features``: the frozen
    bottom's output comes with the batch (``data.feature_cache``), so its blocks cost nothing in the step."""
    tokens = batch_size * seq_len
    objective = get_objective(cfg.rl.objective)
    extra = objective.head_flops(cfg.objective, cfg.rl, cfg.model, batch_size, seq_len)
    # A frozen bottom (train.frozen_layers) runs forward only: 1x instead of 3x per frozen block.
    n = cfg.model.n_layers
    frozen = n if cfg.train.frozen_layers < 0 else cfg.train.frozen_layers
    per_layer = trunk_flops_per_token(cfg, seq_len) / n
    trunk = (3 * (n - frozen) + (0 if cached_features else frozen) + extra.trunk_forwards * n) * per_layer * tokens
    return UpdateFlops(trunk=trunk, heads=extra.heads, per_token=(trunk + extra.heads) / tokens)
