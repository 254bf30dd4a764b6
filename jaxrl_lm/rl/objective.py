"""The objective seam: what an RL method gives the engine, and the registry that chooses one by name.

An ``Objective`` maps one (micro-)batch to ``(loss, metrics)``. It receives its own config section (the
settings dataclass it registered), the shared ``rl`` section, the ``[B, L]`` batch (``jaxrl_lm.batch``), the
online trunk's hidden states, a ``ModelView`` per parameter group (the model's callables with that group's
parameters swapped in) and the loss denominator of the whole optimizer step. It declares the parameter groups
it reads besides the trained model (EMA targets, frozen references), which of its metrics add up over
micro-batches, and its head FLOPs. ``train/`` only ever calls these fields, so a new method is a new file that
calls ``register`` (docs/design.md, section 1)::

    register(Objective(name="my_loss", settings=MySettings, loss=my_loss, denominator=count_rows))
    cfg = load_config("configs/demo.yaml", rl__objective="my_loss", my_loss__weight=0.5)

Everything here is arrays in, arrays out: a ``ModelView``'s callables are plain functions of arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Mapping, NamedTuple

import jax.numpy as jnp

from jaxrl_lm.config import ModelConfig, RLConfig, register_section

Batch = Mapping[str, jnp.ndarray]
Metrics = dict[str, jnp.ndarray]


class ModelView(NamedTuple):
    """The model under one set of parameters, as callables on arrays; every output is float32.

    hidden(batch) -> ``[B, L, D]``: a deterministic trunk forward (no dropout) of the batch's tokens, reading
      what ``model.context`` says (``jaxrl_lm.batch.trunk_inputs``).
    q_logits(h) -> ``[K, ..., Vp]``; q_at(h, a ``[...] int32``) -> ``[K, ...]``; value(h) -> ``[...]``;
    lm_logits(h) -> ``[..., Vp]`` (ids ``>= vocab_size`` are padding and must be masked).
    trunk(tokens, positions, mask, cache, cache_index) -> ``(h [B, T, D], cache)``: a deterministic forward of
      ``[B, T]`` tokens under an explicit attention mask ``[B, T, S] bool``; with ``cache`` (from
      ``init_cache(batch_size, max_len)``, ``S = max_len``) the tokens are written at slots ``[cache_index,
      cache_index + T)`` and read every slot the mask allows, else (``cache=None``, ``S = T``) only each other.

    Reductions over the vocabulary that never form ``[..., Vp]`` when ``model.vocab_chunk > 0``
    (``jaxrl_lm.rl.vocab``; ids ``>= vocab_size`` never count), for losses that need only a normaliser or a max:
    q_logsumexp(h, temperature) -> ``[K, ...]``: ``logsumexp_a Q_k(h, a) / temperature``, differentiable;
    q_max(h) -> ``[...]``: ``max_a min_k Q_k(h, a)``, no gradient;
    lm_logsumexp(h) -> ``[...]``: the LM logits' normaliser, differentiable;
    lm_at(h, a ``[...] int32``) -> ``[...]``: the LM logit of ``a`` (its weight row gathered first).
    A view built by hand (tests) may leave them None when its objective does not read them.
    """

    hidden: Callable[[Batch], jnp.ndarray]
    q_logits: Callable[[jnp.ndarray], jnp.ndarray]
    q_at: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
    value: Callable[[jnp.ndarray], jnp.ndarray]
    lm_logits: Callable[[jnp.ndarray], jnp.ndarray]
    trunk: Callable[..., tuple[jnp.ndarray, Any]]
    init_cache: Callable[[int, int], Any]
    q_logsumexp: Callable[[jnp.ndarray, float], jnp.ndarray] | None = None
    q_max: Callable[[jnp.ndarray], jnp.ndarray] | None = None
    lm_logsumexp: Callable[[jnp.ndarray], jnp.ndarray] | None = None
    lm_at: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray] | None = None


class TrunkFeed(NamedTuple):
    """What the online trunk reads for one (micro-)batch: ``T >= L`` tokens per row, the batch's own ``L``
    first.

    tokens, positions: ``[B, T]`` int32.
    attention_ids: ``[B, T]`` int32 (a token sees earlier tokens of its own id), or None when ``mask`` is given.
    mask: ``[B, T, T]`` bool explicit attention (``mask[i, j]``: token ``i`` sees token ``j``), or None.
    """

    tokens: jnp.ndarray
    positions: jnp.ndarray
    attention_ids: jnp.ndarray | None = None
    mask: jnp.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """A named set of parameters kept beside the trained model (``TrainState.groups[name]``).

    role: ``ema`` follows the trained parameters after every optimizer step (``theta_bar <- theta_bar + eta
      (theta - theta_bar)``, ``eta = rl.target_ema``); ``frozen`` is set once (a copy of the initial trained
      parameters, or parameters given to ``init_state``) and never updated, e.g. the reference policy of a KL
      constraint; ``snapshot`` starts like ``frozen`` and becomes a copy of the trained parameters after every
      ``refresh_every``-th optimizer step (a sampler that lags the trained model by a bounded number of steps).
    keys: the model's top-level parameter keys it holds (``transformer``, ``lm_head``, ``q_heads``, ``v_head``)
      among those the model has (a model with tied embeddings has no ``lm_head``); the group's ``ModelView``
      reads these from the group and every other key from the trained parameters.
    refresh_every: the period of a ``snapshot`` group, in optimizer steps (``>= 1``); unused by other roles.
    """

    name: str
    role: Literal["ema", "frozen", "snapshot"]
    keys: tuple[str, ...]
    refresh_every: int = 0

    def __post_init__(self) -> None:
        if self.role == "snapshot" and self.refresh_every < 1:
            raise ValueError(f"parameter group {self.name!r}: a snapshot needs refresh_every >= 1, "
                             f"got {self.refresh_every}")


@dataclasses.dataclass(frozen=True)
class HeadFlops:
    """Model FLOPs an objective adds to the trained trunk's (``jaxrl_lm.train.flops``): extra deterministic trunk
    forwards over the whole batch (a full-scope target trunk is 1) and every head's FLOPs, forward and backward."""

    trunk_forwards: int
    heads: float


def _no_groups(settings: Any, rl: RLConfig) -> tuple[ParamGroup, ...]:
    return ()


def data_feed(settings: Any, rl: RLConfig, batch: Batch, base: TrunkFeed, views: Mapping[str, ModelView],
              rng: jnp.ndarray, *, vocab_size: int) -> tuple[TrunkFeed, Batch]:
    """The default feed: the batch's own tokens as ``model.context`` lays them out, nothing added."""
    return base, {}


def _no_head_flops(settings: Any, rl: RLConfig, model: ModelConfig, batch_size: int, seq_len: int) -> HeadFlops:
    return HeadFlops(trunk_forwards=0, heads=0.0)


@dataclasses.dataclass(frozen=True)
class Objective:
    """One RL method, as the engine sees it.

    name: the registry key (``rl.objective``) and the name of its config section.
    settings: the frozen dataclass of its config section (defaults documented beside its fields).
    loss: ``loss(settings, rl, batch, hidden, views, denominator, *, vocab_size) -> (loss [] float32, metrics)``;
      ``hidden [B, L, D] float32`` are the online trunk's states (with dropout when training uses it), ``views``
      maps ``"online"`` and every declared group's name to a ``ModelView``, ``denominator`` is what every summed
      term is divided by. Gradients flow only into the online parameters.
    denominator: ``denominator(settings, rl, batch) -> [] float32``, computed once on the whole optimizer step's
      batch, so that micro-batches and devices add up to the loss of the whole batch.
    groups: ``groups(settings, rl) -> tuple[ParamGroup, ...]``, the parameter groups it reads.
    summed_metrics: metrics that add up over micro-batches (loss terms already divided by the whole step's
      denominator, and counts); every other metric is averaged over them.
    head_flops: ``head_flops(settings, rl, model, batch_size, seq_len) -> HeadFlops`` for MFU reports.
    feed: ``feed(settings, rl, batch, base, views, rng, *, vocab_size) -> (TrunkFeed, extras)``: what the online
      trunk reads, given ``base`` (the batch's tokens as ``model.context`` lays them out) and a PRNG key;
      ``extras`` (a dict of arrays, possibly empty) are added to the batch the loss receives, and ``hidden`` is
      then ``[B, T, D]``.
      The default reads the batch alone. The utterance critic appends sampled turns here.
    """

    name: str
    settings: type
    loss: Callable[..., tuple[jnp.ndarray, Metrics]]
    denominator: Callable[[Any, RLConfig, Batch], jnp.ndarray]
    groups: Callable[[Any, RLConfig], tuple[ParamGroup, ...]] = _no_groups
    summed_metrics: frozenset[str] = frozenset({"loss"})
    head_flops: Callable[[Any, RLConfig, ModelConfig, int, int], HeadFlops] = _no_head_flops
    feed: Callable[..., tuple[TrunkFeed, Batch]] = data_feed


_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Adds ``objective`` to the registry (replacing one of the same name) and its section to the config."""
    register_section(objective.name, objective.settings)
    _REGISTRY[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    """The registered objective ``name`` (``rl.objective``)."""
    if name not in _REGISTRY:
        raise KeyError(f"rl.objective: no objective {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def registered() -> tuple[str, ...]:
    """The names of the registered objectives."""
    return tuple(sorted(_REGISTRY))
