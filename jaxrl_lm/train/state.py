"""TrainState: everything a step reads and writes, as one pytree of plain nested dicts and arrays.

Parameters are the model's ``nnx.Param`` state as a pure dict (``jaxrl_lm.models.Params``), so the same tree is
what Orbax saves, what the sharding rules annotate and what Hugging Face export reads. ``nnx.merge`` rebuilds the
module from it inside the jitted update.

Parameter groups. ``params`` is the trained group (the whole model, updated by the optimizer). ``groups`` holds
the others by name, each declared by the objective (``jaxrl_lm.rl.ParamGroup``): an ``ema`` group follows the
trained parameters after every optimizer step (the target heads of Q-learning: ``groups["target"]``), a
``frozen`` group is set once and never updated (a reference policy). A group holds some of the model's top-level
keys; the objective reads it as the model with those keys swapped in.

A frozen trunk bottom (``train.frozen_layers``, ``jaxrl_lm.models.partition``): ``params`` is still the whole
model, but the optimizer state and every group hold only the trained part (the frozen bottom has no moments and
no second copy); a group's view reads the frozen bottom from ``params``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrl_lm import models
from jaxrl_lm.config import Config, OptimConfig
from jaxrl_lm.models import Params
from jaxrl_lm.models.partition import Partition
from jaxrl_lm.rl import ParamGroup, get_objective


@struct.dataclass
class TrainState:
    """params: the trained parameters (all of the model). groups: the objective's other parameter groups by
    name (module docstring), each a dict of some of the model's top-level keys. opt_state: optax state (float32
    moments) of ``params``. step: int32 batches consumed. skipped: int32 updates rejected by the non-finite
    guard. rng: the PRNG key that dropout draws from."""

    params: Params
    groups: dict[str, Params]
    opt_state: Any
    step: jnp.ndarray
    skipped: jnp.ndarray
    rng: jnp.ndarray


def param_groups(cfg: Config) -> tuple[ParamGroup, ...]:
    """The parameter groups the objective of ``cfg`` declares (besides the trained ``params``)."""
    objective = get_objective(cfg.rl.objective)
    groups = objective.groups(cfg.objective, cfg.rl)
    names = [g.name for g in groups]
    if len(set(names)) != len(names) or "online" in names:
        raise ValueError(f"objective {objective.name!r} declares the parameter groups {names}: names must be unique "
                         f"and not 'online' (the trained parameters)")
    return groups


def learning_rate_schedule(o: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up, then constant, cosine or linear decay to 0 at ``total_steps``."""
    decay_steps = max(total_steps - o.warmup_steps, 1)
    if o.schedule == "constant":
        main = optax.constant_schedule(o.learning_rate)
    elif o.schedule == "cosine":
        main = optax.cosine_decay_schedule(o.learning_rate, decay_steps)
    else:
        main = optax.linear_schedule(o.learning_rate, 0.0, decay_steps)
    if not o.warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    return optax.join_schedules([warmup, main], [o.warmup_steps])


def decays(path: tuple) -> bool:
    """Whether weight decay applies to the parameter at ``path`` (a key path of the parameter dict): by the leaf's
    name, not its rank, because the layer scan stacks every block's biases and norm scales into matrices
    ``[n_layers, d]`` and the K Q-heads stack theirs into ``[K, ...]``."""
    name = str(getattr(path[-1], "key", path[-1]))
    return not (name.endswith("bias") or name == "scale")


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay only on weights (kernels, embeddings, LoRA factors), never on
    biases or norm scales (``decays``). ``optim.mu_dtype: bfloat16`` stores the first moment in bfloat16 (computed
    in float32, rounded when stored); the second moment stays float32, since its per-step change (1 - b2, 5% at
    b2 = 0.95, 0.1% at 0.999) can fall below bfloat16's resolution and stall it."""
    o = cfg.optim
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)  # noqa: E731
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    parts.append(
        optax.adamw(learning_rate_schedule(o, cfg.train.steps), b1=o.b1, b2=o.b2, eps=o.eps,
                    weight_decay=o.weight_decay, mask=decay_mask,
                    mu_dtype=None if o.mu_dtype == "float32" else jnp.dtype(o.mu_dtype))
    )
    return optax.chain(*parts)


def init_state(cfg: Config, params: Params | None = None, seed: int | jax.Array | None = None, *,
               groups: Optional[Mapping[str, Params]] = None) -> TrainState:
    """A fresh TrainState, from ``params`` or from the config alone.

    Args:
      cfg: the run's Config (its optimizer, objective and, without ``params``, its model).
      params: a parameter dict (``split_model(model)[1]``, ``import_hf(...)[1]``); None builds the model of
        ``cfg.model`` from ``seed``.
      seed: draws the model's initial parameters (when built here) and the dropout key; default ``train.seed``.
        A traced int32 scalar works too (``jax.vmap`` over seeds).
      groups: parameters of ``frozen`` or ``snapshot`` groups by name (e.g. a reference policy loaded from a
        checkpoint), each holding the group's keys; a group not given starts as a copy of ``params``.

    ``ema`` groups start equal to the online parameters (as separate buffers); ``step`` and ``skipped`` are
    int32 scalars at 0, ``rng`` is ``[2] uint32`` key data. With ``train.frozen_layers`` the optimizer state and
    the groups cover only the trained part (``Partition``; a given group's frozen bottom is not kept: every view
    reads it from ``params``). Example::

        state = jaxrl_lm.init_state(cfg)                  # a new model, as scripts/train.py starts one
        state = jaxrl_lm.init_state(cfg, params, seed=3)  # given parameters, dropout key from seed 3
    """
    seed = cfg.train.seed if seed is None else seed
    if params is None:
        params = models.split_model(models.build(cfg.model, seed=seed))[1]
    given = dict(groups or {})
    declared = param_groups(cfg)
    unknown = set(given) - {g.name for g in declared if g.role in ("frozen", "snapshot")}
    if unknown:
        raise ValueError(f"init_state: groups {sorted(unknown)} are not frozen groups of objective "
                         f"{cfg.rl.objective!r} (it declares {[(g.name, g.role) for g in declared]})")
    part = Partition.of(cfg)
    state_groups = {}
    for g in declared:
        source = given.get(g.name, params)
        keys = part.group_keys(params, g.keys)
        missing = [k for k in keys if k not in source]
        if missing:
            raise ValueError(f"init_state: parameter group {g.name!r} needs the keys {keys}; the "
                             f"parameters given for it lack {missing}")
        trained = part.trained({**params, **{k: source[k] for k in keys}})
        state_groups[g.name] = {k: jax.tree.map(jnp.copy, trained[k]) for k in keys}
    return TrainState(
        params=params,
        groups=state_groups,
        opt_state=make_optimizer(cfg).init(part.trained(params)),
        step=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def abstract_train_state(cfg: Config) -> TrainState:
    """``init_state(cfg)`` as ``jax.ShapeDtypeStruct`` leaves; nothing is allocated."""
    return jax.eval_shape(lambda: init_state(cfg))
