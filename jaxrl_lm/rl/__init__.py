"""Pure math of token-level Q-learning: arrays in, arrays out (no Flax, no I/O)."""

from jaxrl_lm.rl.losses import (
    awr_weights,
    bc_loss,
    cql_gap,
    cql_loss,
    cross_entropy,
    expectile_loss,
    mask_padded_vocab,
    max_backup,
    q_loss,
    td_target,
)
from jaxrl_lm.rl.objective import Heads, bellman_objective, count_decisions, decision_capacity
from jaxrl_lm.rl.transitions import Transitions, decision_positions, next_state_index, transitions

__all__ = [
    "Heads", "Transitions", "awr_weights", "bc_loss", "bellman_objective", "count_decisions", "cql_gap",
    "cql_loss", "cross_entropy", "decision_capacity", "decision_positions", "expectile_loss",
    "mask_padded_vocab", "max_backup", "next_state_index", "q_loss", "td_target", "transitions",
]
