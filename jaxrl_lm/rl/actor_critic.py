"""Actor-critics on the utterance-level critic: the KL-constrained actor of Jaques et al. (2020), ``rl.objective:
kl_actor``, and ArCHer (Zhou et al. 2024), ``rl.objective: archer`` (docs/design.md, section 9.3).

The critic is ``utterance_q``'s, computed by ``utterance_q_loss`` with the same settings (both settings classes
extend ``UtteranceQConfig``; the critic's own BC term is off by default, the actor loss trains the LM head). The
*actor* is the model's LM head on the shared trunk: the policy kind ``actor`` samples it, and the Hugging Face
export of that kind is an ordinary causal LM. The *reference* ``pi_ref`` is the parameter group ``reference``
(trunk and LM head): a copy of the run's initial parameters, never updated; start the run from a behaviour-cloning
run (``train.init_from``) and the actor starts at, and is held near, that policy.

Per agent turn ``u = (a_1 .. a_n)`` at state ``s``, with ``pi`` the actor and every KL exact over the vocabulary:

    KL(s, u) = sum_t sum_a pi(a | s, a_<t) [log pi(a | s, a_<t) - log pi_ref(a | s, a_<t)]
    pg  (on-policy: N turns u_j ~ pi sampled inside the step at every state of the batch):
        L_actor = mean_s (1/N) sum_j [ -sg(A_j) sum_t log pi(u_j,t | s, u_j,<t) + kl_coef KL(s, u_j) ]
        kl_actor: A_j = min_k Qbar_k(s, u_j) - mean_{i != j} min_k Qbar_k(s, u_i)   (leave-one-out baseline)
        archer:   A_j = min_k Qbar_k(s, u_j) - V(s)
    awr (archer's offline variant: the data's own turns, no sampling needed for the actor):
        w = min(exp(awr_beta (min_k Qbar_k(s, u) - V(s))), awr_max_weight)
        L_actor = mean_u [ -w sum_t log pi(u_t | s, u_<t) + kl_coef KL(s, u) ]
    L = L_critic (utterance_q) + lambda_actor L_actor

Sampling inside the step, rather than from a bank refreshed now and then, keeps the policy gradient on-policy:
the turns are the actor's own after the previous optimizer step, and the same samples serve the critic's max
backup and penalty (CHAI's candidates are here the actor's). With ``kl_coef: 0`` there is no reference group
and no reference forward (e.g. ArCHer offline from scratch, whose initial parameters are no prior). The KL term's gradient is the exact gradient of the
per-token KL at the sampled prefixes (the prefixes' own dependence on pi is not differentiated, as in KL-
regularised fine-tuning generally). ``kl_coef`` is fixed; the per-turn KL is logged every step
(``kl_to_reference``) beside the critic's value of the actor's turns (``actor_q``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping

import jax
import jax.numpy as jnp

from jaxrl_lm.config import ConfigError, ModelConfig, RLConfig
from jaxrl_lm.rl import losses
from jaxrl_lm.rl.objective import HeadFlops, ModelView, Objective, ParamGroup, TrunkFeed, register
from jaxrl_lm.rl.transitions import gather_rows, next_at_or_after
from jaxrl_lm.rl.utterance import TurnSlots, candidate_index, turn_slots, turn_transitions
from jaxrl_lm.rl.utterance_q import (
    UtteranceQConfig, agent_token_slots, candidate_q, count_turns, extended_feed, sample_candidates, stop_ids,
    utterance_q_groups, utterance_q_head_flops, utterance_q_loss,
)


@dataclasses.dataclass(frozen=True)
class KLActorConfig(UtteranceQConfig):
    """The ``kl_actor`` section: every ``utterance_q`` field (the critic) and the actor's (configs/base.yaml)."""

    backup: Literal["max", "expectile"] = "expectile"
    lambda_bc: float = 0.0
    lambda_actor: float = 1.0
    kl_coef: float = 0.1
    actor_update: Literal["pg", "awr"] = "pg"
    baseline: Literal["samples", "value"] = "samples"
    awr_beta: float = 3.0
    awr_max_weight: float = 20.0

    def validate(self, where: str = "kl_actor") -> None:
        super().validate(where)
        for name in ("lambda_actor", "kl_coef", "awr_beta"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name} must be non-negative, got {getattr(self, name)}")
        if self.awr_max_weight <= 0:
            raise ConfigError(f"{where}.awr_max_weight must be positive, got {self.awr_max_weight}")
        if self.actor_update == "pg" and self.candidate_refresh != 1:
            raise ConfigError(f"{where}.candidate_refresh must be 1 with actor_update: pg (the policy gradient "
                              f"needs the actor's own turns), got {self.candidate_refresh}")
        if self.baseline == "samples" and self.actor_update == "pg" and self.candidates < 2:
            raise ConfigError(f"{where}.candidates must be at least 2 for baseline: samples (each sample's "
                              f"baseline is the mean of the others), got {self.candidates}")
        if self.baseline == "value" and self.backup != "expectile":
            raise ConfigError(f"{where}.baseline: value reads V(s), which only backup: expectile trains; got "
                              f"backup: {self.backup}")
        if self.actor_update == "awr" and self.backup != "expectile":
            raise ConfigError(f"{where}.actor_update: awr weighs turns by Q(s, u) - V(s), which needs backup: "
                              f"expectile (V trained); got backup: {self.backup}")

    @property
    def actor_samples(self) -> bool:
        """Whether the step samples turns: for the policy gradient, the critic's max backup or its penalty."""
        return self.actor_update == "pg" or self.samples


@dataclasses.dataclass(frozen=True)
class ArcherConfig(KLActorConfig):
    """The ``archer`` section: ``kl_actor``'s fields with ArCHer's defaults (V(s) baseline, offline AWR)."""

    actor_update: Literal["pg", "awr"] = "awr"
    baseline: Literal["samples", "value"] = "value"

    def validate(self, where: str = "archer") -> None:
        super().validate(where)


def actor_critic_groups(cfg: KLActorConfig, rl: RLConfig) -> tuple[ParamGroup, ...]:
    """The critic's groups (EMA target Q-heads; a sampler group only for an AWR actor with a lagging sampler)
    and, when the KL term is on, the frozen reference policy."""
    reference = (ParamGroup("reference", "frozen", ("transformer", "lm_head")),) if cfg.kl_coef > 0 else ()
    return utterance_q_groups(cfg, rl) + reference


def actor_critic_feed(cfg: KLActorConfig, rl: RLConfig, batch: Mapping[str, jnp.ndarray], base: TrunkFeed,
                      views: Mapping[str, ModelView], rng: jax.Array, *, vocab_size: int
                      ) -> tuple[TrunkFeed, dict[str, jnp.ndarray]]:
    """The row, extended with turns sampled from the actor when the step needs samples, and (with the KL term)
    the reference's trunk states over the same tokens (``reference_hidden [B, T, D]``, no gradient)."""
    extras: dict[str, jnp.ndarray] = {}
    feed = base
    if cfg.actor_samples:
        slots = turn_slots(turn_transitions(batch, gamma=rl.gamma), cfg.max_turns)
        sampler = views["online"] if cfg.candidate_refresh == 1 else views["sampler"]
        candidates, lengths = sample_candidates(
            sampler, base, slots, stop_ids(batch, slots), rng, n=cfg.candidates, tokens=cfg.candidate_tokens,
            temperature=cfg.candidate_temperature, vocab_size=vocab_size)
        feed = extended_feed(base, slots, candidates)
        extras = {"candidate_tokens": candidates, "candidate_lengths": lengths}
    if cfg.kl_coef == 0:
        return feed, extras
    reference = views["reference"]
    if feed.mask is None:
        reference_hidden = reference.hidden(batch)
    else:
        reference_hidden, _ = reference.trunk(feed.tokens, feed.positions, feed.mask)
    extras["reference_hidden"] = jax.lax.stop_gradient(reference_hidden)
    return feed, extras


def candidate_prefix_index(length: int, slots: TurnSlots, n: int, tokens: int) -> jnp.ndarray:
    """``[B, S, n, C]`` int32: the extended position whose state predicts candidate ``(m, j)``'s token ``c``:
    the state ``slots.state[m]`` itself for ``c = 0``, the candidate's token ``c - 1`` after it."""
    states = slots.state.shape[-1]
    slot = jnp.arange(states, dtype=jnp.int32)[None, :, None, None]
    j = jnp.arange(n, dtype=jnp.int32)[None, None, :, None]
    c = jnp.arange(tokens, dtype=jnp.int32)[None, None, None, :]
    previous = candidate_index(length, states, n, jnp.maximum(c - 1, 0), slot, j)
    return jnp.where(c == 0, slots.state[:, :, None, None], previous).astype(jnp.int32)


def leave_one_out_mean(x: jnp.ndarray) -> jnp.ndarray:
    """``out[..., j] = mean_{i != j} x[..., i]``. ``[..., n] -> [..., n]``, ``n >= 2``."""
    n = x.shape[-1]
    return (jnp.sum(x, axis=-1, keepdims=True) - x) / (n - 1)


def policy_gradient_terms(logits: jnp.ndarray, reference_logits: jnp.ndarray | None, tokens: jnp.ndarray,
                          token_used: jnp.ndarray, advantage: jnp.ndarray, vocab_size: int
                          ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Per sampled turn: ``(-sg(A) sum_t log pi(u_t), sum_t KL_t(pi || pi_ref), sum_t log pi(u_t))``.

    ``logits, reference_logits [..., C, V]`` at the prefixes of the turn's ``C`` token slots, ``tokens [..., C]``,
    ``token_used [..., C]`` (slots inside the turn), ``advantage [...]`` -> three ``[...]`` float32. Without
    ``reference_logits`` (no KL term) the KL is 0.
    """
    used = token_used.astype(jnp.float32)
    logp = jnp.sum(-losses.cross_entropy(logits, tokens, vocab_size) * used, axis=-1)
    if reference_logits is None:
        return -jax.lax.stop_gradient(advantage) * logp, jnp.zeros_like(logp), logp
    kl = jnp.sum(losses.token_kl(logits, jax.lax.stop_gradient(reference_logits), vocab_size) * used, axis=-1)
    return -jax.lax.stop_gradient(advantage) * logp, kl, logp


def _pg_actor(cfg: KLActorConfig, batch, hidden, views, slots: TurnSlots, length: int, denominator, vocab_size):
    """The policy-gradient actor loss over the turns sampled in the step, and its metrics."""
    online, target = views["online"], views["target"]
    candidates, lengths = batch["candidate_tokens"], batch["candidate_lengths"]
    n, tokens = candidates.shape[-2:]
    prefix = candidate_prefix_index(length, slots, n, tokens)  # [B, S, n, C]
    token_used = jnp.arange(tokens)[None, None, None, :] < lengths[..., None]
    logits = online.lm_logits(gather_rows(hidden, prefix))  # [B, S, n, C, Vp]
    reference_logits = (views["reference"].lm_logits(gather_rows(batch["reference_hidden"], prefix))
                        if cfg.kl_coef > 0 else None)
    frozen = jax.lax.stop_gradient(hidden)
    q = jnp.min(jax.lax.stop_gradient(candidate_q(target.q_at, frozen, slots, candidates, lengths)), axis=0)
    if cfg.baseline == "samples":
        baseline = leave_one_out_mean(q)
    else:
        baseline = jax.lax.stop_gradient(online.value(gather_rows(frozen, slots.state)))[..., None]
    advantage = q - baseline  # [B, S, n]
    pg, kl, logp = policy_gradient_terms(logits, reference_logits, candidates, token_used, advantage, vocab_size)
    weight = jnp.broadcast_to(slots.state_used[..., None], q.shape).astype(jnp.float32) / n
    count = jnp.maximum(jnp.sum(slots.state_used), 1.0)
    loss = losses.weighted_mean(pg + cfg.kl_coef * kl, weight, denominator)
    metrics = {"actor_q": losses.weighted_mean(q, weight, count),
               "advantage_std": jnp.sqrt(losses.weighted_mean(jnp.square(advantage), weight, count)),
               "actor_logp": losses.weighted_mean(jax.lax.stop_gradient(logp), weight, count)}
    if cfg.kl_coef > 0:
        metrics["kl_to_reference"] = losses.weighted_mean(jax.lax.stop_gradient(kl), weight, count)
    return loss, metrics


def turn_of_token(batch: Mapping[str, jnp.ndarray], turn_end: jnp.ndarray, state_index: jnp.ndarray
                  ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """For every position, the end ``e`` of the agent turn it belongs to, and whether it belongs to one (a turn
    with a state: ``state_index[e] < position <= e``). ``[B, L] -> ([B, L] int32, [B, L] bool)``."""
    length = turn_end.shape[-1]
    end = jnp.minimum(next_at_or_after(turn_end), length - 1)
    positions = jnp.arange(length, dtype=jnp.int32)[None, :]
    inside = jnp.take_along_axis(turn_end, end, axis=-1) & (jnp.take_along_axis(state_index, end, axis=-1) < positions)
    return end, inside & (batch["action_mask"] == 1)


def _awr_actor(cfg: KLActorConfig, rl: RLConfig, batch, hidden, views, denominator, vocab_size):
    """The advantage-weighted regression actor loss over the data's turns, and its metrics."""
    online, target = views["online"], views["target"]
    tokens = batch["tokens"]
    length = tokens.shape[-1]
    frozen = jax.lax.stop_gradient(hidden[:, :length])
    tt = turn_transitions(batch, gamma=rl.gamma)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    # Q(s, u) and V(s) at every position, read where a turn ends: the head before the last token, for it.
    target_q = target.q_at(gather_rows(frozen, jnp.maximum(positions - 1, 0)), tokens)  # [K, B, L]
    value = online.value(gather_rows(frozen, tt.state_index))  # [B, L]
    turn_weight = losses.awr_weights(target_q, value, cfg.awr_beta, cfg.awr_max_weight)  # [B, L]
    end, inside = turn_of_token(batch, tt.turn_end, tt.state_index)
    token_weight = jnp.where(inside, jnp.take_along_axis(turn_weight, end, axis=-1), 0.0)

    slots, used, _ = agent_token_slots(rl, batch)  # dropped tokens are counted by the critic's BC bookkeeping
    used = used * gather_rows(inside.astype(jnp.float32), slots)
    logits = online.lm_logits(gather_rows(hidden, slots - 1))  # [B, M, Vp]
    ce = losses.cross_entropy(logits, gather_rows(tokens, slots), vocab_size)
    if cfg.kl_coef > 0:
        reference_logits = views["reference"].lm_logits(gather_rows(batch["reference_hidden"], slots - 1))
        kl = losses.token_kl(logits, jax.lax.stop_gradient(reference_logits), vocab_size)
    else:
        kl = jnp.zeros_like(ce)
    weight = gather_rows(token_weight, slots)
    loss = losses.weighted_mean(weight * ce + cfg.kl_coef * kl, used, denominator)
    n_turns = jnp.maximum(jnp.sum(tt.turn_end, dtype=jnp.float32), 1.0)
    turns = tt.turn_end.astype(jnp.float32)
    metrics = {"actor_q": losses.weighted_mean(jnp.min(target_q, axis=0), turns, n_turns),
               "awr_weight_mean": losses.weighted_mean(turn_weight, turns, n_turns),
               "actor_logp": -losses.weighted_mean(jax.lax.stop_gradient(ce), used, n_turns)}
    if cfg.kl_coef > 0:
        metrics["kl_to_reference"] = losses.weighted_mean(jax.lax.stop_gradient(kl), used, n_turns)
    return loss, metrics


def actor_critic_loss(cfg: KLActorConfig, rl: RLConfig, batch: Mapping[str, jnp.ndarray], hidden: jnp.ndarray,
                      views: Mapping[str, ModelView], denominator: jnp.ndarray, *, vocab_size: int
                      ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The critic's loss (``utterance_q_loss``) plus ``lambda_actor`` times the actor's (module docstring).

    ``hidden [B, T, D]``: the online trunk's states of the row and, when the step samples, of the sampled turns
    after it; ``batch["reference_hidden"]``: the reference trunk's over the same ``T`` tokens.
    """
    critic, metrics = utterance_q_loss(cfg, rl, batch, hidden, views, denominator, vocab_size=vocab_size)
    length = batch["tokens"].shape[-1]
    if cfg.actor_update == "pg":
        slots = turn_slots(turn_transitions(batch, gamma=rl.gamma), cfg.max_turns)
        actor, actor_metrics = _pg_actor(cfg, batch, hidden, views, slots, length, denominator, vocab_size)
    else:
        actor, actor_metrics = _awr_actor(cfg, rl, batch, hidden, views, denominator, vocab_size)
    loss = critic + cfg.lambda_actor * actor
    metrics.update(actor_metrics, loss=loss, critic_loss=critic, actor_loss=actor)
    return loss, metrics


def actor_critic_head_flops(cfg: KLActorConfig, rl: RLConfig, m: ModelConfig, batch_size: int, seq_len: int
                            ) -> HeadFlops:
    """The critic's (``utterance_q_head_flops``), plus the reference trunk's forward over the fed tokens and the
    actor's LM heads: online (trained) and reference (forward) at every scored token."""
    critic = utterance_q_head_flops(cfg, rl, m, batch_size, seq_len)
    D, V = m.d_model, m.padded_vocab_size
    if cfg.actor_update == "pg":
        scored = batch_size * cfg.max_turns * cfg.candidates * cfg.candidate_tokens
    else:
        scored = batch_size * seq_len
    fed = seq_len + (cfg.candidate_tokens * cfg.max_turns * cfg.candidates if cfg.actor_samples else 0)
    reference_forwards = -(-fed // seq_len) if cfg.kl_coef > 0 else 0
    return HeadFlops(trunk_forwards=critic.trunk_forwards + reference_forwards,
                     heads=critic.heads + scored * 2 * D * V * (3 + 1))


_SUMMED = frozenset({"loss", "q_loss", "v_loss", "cql_loss", "bc_loss", "critic_loss", "actor_loss", "decisions",
                     "decisions_dropped"})

KL_ACTOR = register(Objective(
    name="kl_actor", settings=KLActorConfig, loss=actor_critic_loss, denominator=count_turns,
    groups=actor_critic_groups, summed_metrics=_SUMMED, head_flops=actor_critic_head_flops,
    feed=actor_critic_feed,
))

ARCHER = register(Objective(
    name="archer", settings=ArcherConfig, loss=actor_critic_loss, denominator=count_turns,
    groups=actor_critic_groups, summed_metrics=_SUMMED, head_flops=actor_critic_head_flops,
    feed=actor_critic_feed,
))
