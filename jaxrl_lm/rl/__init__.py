"""Pure math of value-based RL for language models: arrays in, arrays out (no Flax, no I/O).

``objective`` is the seam every method plugs into (``Objective``, ``register``, ``get_objective``);
``token_q`` is token-level Q-learning (ILQL), registered as ``rl.objective: token_q``; ``policy_extraction``
turns head outputs into next-token scores and samples; ``utterance`` is the turn-level index contract and
``utterance_q`` the utterance-level critic (CHAI), ``rl.objective: utterance_q``; ``actor_critic`` the
actor-critics on that critic, ``rl.objective: kl_actor`` (Jaques et al.) and ``archer`` (ArCHer).
"""

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
    token_kl,
)
from jaxrl_lm.rl.objective import (
    HeadFlops, ModelView, Objective, ParamGroup, TrunkFeed, get_objective, register, registered,
)
from jaxrl_lm.rl.token_q import Heads, TokenQConfig, bellman_objective, count_decisions, decision_capacity
from jaxrl_lm.rl.transitions import Transitions, decision_positions, next_state_index, transitions
from jaxrl_lm.rl.utterance import TurnSlots, TurnTransitions, turn_slots, turn_transitions
from jaxrl_lm.rl.utterance_q import UtteranceQConfig
from jaxrl_lm.rl.actor_critic import ArcherConfig, KLActorConfig  # noqa: E402  registers after utterance_q

__all__ = [
    "ArcherConfig", "HeadFlops", "Heads", "KLActorConfig", "ModelView", "Objective", "ParamGroup", "TokenQConfig", "Transitions", "TrunkFeed",
    "TurnSlots", "TurnTransitions", "UtteranceQConfig",
    "awr_weights", "bc_loss", "bellman_objective", "count_decisions", "cql_gap", "cql_loss", "cross_entropy",
    "decision_capacity", "decision_positions", "expectile_loss", "get_objective", "mask_padded_vocab", "max_backup",
    "next_state_index", "q_loss", "register", "registered", "td_target", "token_kl", "transitions", "turn_slots",
    "turn_transitions",
]
