"""TrainState: everything a step reads and writes, as one pytree of plain nested dicts and arrays.

Parameters are the model's ``nnx.Param`` state as a pure dict (``nnx.to_pure_dict``), so the same tree is what
Orbax saves, what the sharding rules annotate and what Hugging Face export reads. ``nnx.merge`` rebuilds the
module from it inside the jitted update.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxrl_lm import models
from jaxrl_lm.config import Config, ModelConfig, OptimConfig

Params = dict[str, Any]


@struct.dataclass
class TrainState:
    """params: online parameters (all of the model). target_params: the EMA copy of ``target_keys(cfg)`` of them.
    opt_state: optax state (float32 moments). step: int32 batches consumed. skipped: int32 updates rejected by
    the non-finite guard. rng: the PRNG key that dropout draws from."""

    params: Params
    target_params: Params
    opt_state: Any
    step: jnp.ndarray
    skipped: jnp.ndarray
    rng: jnp.ndarray


def target_keys(cfg: Config) -> tuple[str, ...]:
    """Top-level parameter groups that have an EMA target copy: the Q-heads, plus the trunk for ``full``."""
    return ("q_heads",) if cfg.rl.target_scope == "heads" else ("transformer", "q_heads")


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Params]:
    """Static graph and the float32 parameter dict of a built model."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


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


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay only on matrices (not biases, norms or the V bias)."""
    o = cfg.optim
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    parts.append(
        optax.adamw(learning_rate_schedule(o, cfg.train.steps), b1=o.b1, b2=o.b2, eps=o.eps,
                    weight_decay=o.weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts)


def init_state(cfg: Config, params: Params | None = None, seed: int | jax.Array | None = None) -> TrainState:
    """A fresh TrainState, from ``params`` or from the config alone.

    Args:
      cfg: the run's Config (its optimizer, target scope and, without ``params``, its model).
      params: a parameter dict (``split_model(model)[1]``, ``import_hf(...)[1]``); None builds the model of
        ``cfg.model`` from ``seed``.
      seed: draws the model's initial parameters (when built here) and the dropout key; default ``train.seed``.
        A traced int32 scalar works too (``jax.vmap`` over seeds: ``train.seeds.init_states``).

    The target copy starts equal to the online parameters (as separate buffers); ``step`` and ``skipped`` are
    int32 scalars at 0, ``rng`` is ``[2] uint32`` key data. Example::

        state = jaxrl_lm.init_state(cfg)                  # a new model, as scripts/train.py starts one
        state = jaxrl_lm.init_state(cfg, params, seed=3)  # given parameters, dropout key from seed 3
    """
    seed = cfg.train.seed if seed is None else seed
    if params is None:
        params = split_model(models.build(cfg.model, seed=seed))[1]
    target = {k: jax.tree.map(jnp.copy, params[k]) for k in target_keys(cfg)}
    return TrainState(
        params=params,
        target_params=target,
        opt_state=make_optimizer(cfg).init(params),
        step=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def abstract_train_state(cfg: Config) -> TrainState:
    """``init_state(cfg)`` as ``jax.ShapeDtypeStruct`` leaves; nothing is allocated."""
    return jax.eval_shape(lambda: init_state(cfg))


def model_graphdef(model_cfg: ModelConfig) -> nnx.GraphDef:
    """The static graph of the model of ``model_cfg`` (what ``nnx.merge`` needs); nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: models.build(model_cfg)), nnx.Param)[0]
