"""Model FLOPs of one update, from the architecture (XLA's cost analysis counts a scanned layer body once).

Counting rule: a matmul of ``[m, k] x [k, n]`` is ``2 m k n`` FLOPs; a trained forward costs 1x and its
backward 2x (so 3x), a forward under stop-gradient 1x. Elementwise work, norms and softmaxes are not counted.

Per token of the batch (``T = B * L`` tokens), with ``D`` the width, ``F`` the MLP width, ``V`` the padded
vocabulary, ``H``/``Hkv`` query/key-value heads of size ``d``, ``n`` layers and ``L`` the row length:

- trunk:      ``n * (2 D (H + 2 Hkv) d + 2 H d D + 2 D F m + 4 L H d)``, ``m`` = 2 (gpt2) or 3 (llama gated),
  the last term the attention scores and weighted sum over all ``L`` keys (what the dense kernel computes);
- a full-scope target trunk adds the trunk forward again (1x).

Per gathered decision slot (``S = B * M`` slots, ``M = ceil(decision_fraction * L)``), with ``E`` the Q-head
hidden width (``q_head_hidden_mult * D``, or none for a linear head):

- LM head (BC):             ``2 D V``, trained (only when ``lambda_bc > 0``);
- K online Q-heads:         ``K (2 D E + 2 E V)`` trained with CQL, else ``K (2 D E + 2 E)`` (``q_at``);
- V head:                   ``2 D E + 2 E`` trained;
- K target Q-heads at a_i:  ``K (2 D E + 2 E)`` forward (``q_at``: the output column is gathered first);
- the backup at n(i):       expectile ``2 D E + 2 E`` forward; max / sarsa ``K (2 D E + 2 E V)`` forward.
"""

from __future__ import annotations

import dataclasses

from jaxrl_lm.config import Config
from jaxrl_lm.rl import decision_capacity


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


def update_flops(cfg: Config, batch_size: int, seq_len: int) -> UpdateFlops:
    """Model FLOPs of one optimizer step on a ``[batch_size, seq_len]`` batch."""
    m, rl = cfg.model, cfg.rl
    tokens = batch_size * seq_len
    slots = batch_size * decision_capacity(rl, seq_len)
    D, V, K = m.d_model, m.padded_vocab_size, m.n_q_heads
    E = m.q_head_hidden_mult * D if m.q_head == "mlp" else 0
    q_in = 2 * D * E if E else 0  # first layer of an MLP head
    width = E or D  # what the output layer reads

    trunk = 3 * trunk_flops_per_token(cfg, seq_len) * tokens
    if rl.target_scope == "full":
        trunk += trunk_flops_per_token(cfg, seq_len) * tokens

    q_full = q_in + 2 * width * V
    q_one = q_in + 2 * width
    heads_trained = (K * q_full if rl.cql_alpha > 0 else K * q_one) + q_one  # Q-heads and the V head
    if rl.lambda_bc > 0:
        heads_trained += 2 * D * V
    backup_forward = {"expectile": q_one, "mc": 0}.get(rl.backup, K * q_full)  # max / sarsa read every action
    heads_forward = K * q_one + backup_forward
    heads = slots * (3 * heads_trained + heads_forward)
    return UpdateFlops(trunk=trunk, heads=float(heads), per_token=(trunk + heads) / tokens)
