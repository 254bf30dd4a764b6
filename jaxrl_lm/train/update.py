"""make_update: one jitted, pure ``update(state, batch) -> (state, metrics)`` doing a whole optimizer step.

Inside: micro-batches (``optim.grad_accum``) scanned with gradients summed, each micro-batch's loss normalised
by the decision count of the *whole* batch, so accumulation gives exactly the gradient of the full batch; the
optimizer step; the target EMA (once, after the optimizer step); and a non-finite guard that leaves the state
untouched (but counts the batch as consumed and the update as skipped) when the loss or any gradient is NaN/Inf,
or when the batch holds no decision (the objective's denominator is 0).
The state is donated: the caller must use the returned state, never the one it passed in.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrl_lm.batch import trunk_inputs
from jaxrl_lm.config import Config
from jaxrl_lm.models import Params, QTransformer, model_graphdef
from jaxrl_lm.models.layers import shard_rows
from jaxrl_lm.models.partition import Partition
from jaxrl_lm.rl import ModelView, Objective, TrunkFeed, get_objective, vocab
from jaxrl_lm.train.state import TrainState, make_optimizer, param_groups


def model_view(model: QTransformer, context: str, frozen_layers: int = 0) -> ModelView:
    """The callables an objective reads, for one merged model; ``hidden`` is deterministic (no dropout) and
    passes no gradient into a frozen trunk bottom (``frozen_layers``, as ``QTransformer.hidden``)."""
    def hidden(batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
        if "features" in batch:  # the frozen bottom's cached output (jaxrl_lm.train.features)
            return model.hidden_from_features(batch["features"], *trunk_inputs(batch, context), frozen_layers)
        return model.hidden(batch["tokens"], *trunk_inputs(batch, context), frozen_layers=frozen_layers)

    def trunk(tokens, positions, mask, cache=None, cache_index=None):
        if cache is None:
            return model.hidden(tokens, positions, None, mask=mask), None
        return model.hidden_with_cache(tokens, positions, cache, cache_index, mask=mask)

    n_valid, chunk = model.cfg.vocab_size, model.cfg.vocab_chunk

    def flat(output_layer, h):
        """``h [..., D]`` -> the output layer's ``(z [K, N, E], w, b)`` and ``h``'s leading shape; the ``N`` rows
        split over the batch axes like the batch (``shard_rows``), so that no device projects every row."""
        z, w, b = output_layer(shard_rows(h.reshape(-1, h.shape[-1])))
        return (shard_rows(z, axis=1), w, b), h.shape[:-1]

    def q_logsumexp(h, temperature=1.0):
        (z, w, b), lead = flat(model.q_output_layer, h)
        return vocab.logsumexp(z, w, b, n_valid=n_valid, chunk=chunk, scale=1.0 / temperature).reshape(
            (z.shape[0],) + lead)

    def q_max(h):
        (z, w, b), lead = flat(model.q_output_layer, h)
        return vocab.max_min(z, w, b, n_valid=n_valid, chunk=chunk).reshape(lead)

    def lm_logsumexp(h):
        (z, w, b), lead = flat(model.lm_output_layer, h)
        return vocab.logsumexp(z, w, b, n_valid=n_valid, chunk=chunk)[0].reshape(lead)

    return ModelView(hidden=lambda batch: shard_rows(hidden(batch)), q_logits=lambda h: model.q_logits(shard_rows(h)),
                     q_at=lambda h, a: model.q_at(shard_rows(h), a), value=lambda h: model.value(shard_rows(h)),
                     lm_logits=lambda h: model.lm_logits(shard_rows(h)), trunk=trunk, init_cache=model.init_cache,
                     q_logsumexp=q_logsumexp, q_max=q_max, lm_logsumexp=lm_logsumexp,
                     lm_at=lambda h, a: model.lm_at(shard_rows(h), a))


def loss_fn(
    cfg: Config,
    graphdef: nnx.GraphDef,
    params: Params,
    groups: Mapping[str, Params],
    batch: Mapping[str, jnp.ndarray],
    denominator: jnp.ndarray,
    rng: jnp.ndarray | None,
    objective: Objective | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The objective (default: ``rl.objective``) of one (micro-)batch for the online ``params``; gradients never
    reach the ``groups`` (``TrainState.groups``).

    Every group is read as the model with the group's keys swapped in (``ParamGroup``); the online trunk's
    hidden states are computed once here, over what the objective's ``feed`` returns (the batch itself by
    default), with dropout when ``model.dropout > 0``. ``rng`` (a PRNG key) draws the dropout and the feed's
    randomness; None evaluates the loss deterministically (no dropout, a fixed key for the feed).
    """
    objective = objective or get_objective(cfg.rl.objective)
    settings = cfg.section(objective.name)
    part = Partition.of(cfg)
    model = nnx.merge(graphdef, params)
    views = {"online": model_view(model, cfg.model.context, part.forward_arg)}
    for name, group in groups.items():
        views[name] = model_view(nnx.merge(graphdef, part.with_group(params, jax.lax.stop_gradient(group))),
                                 cfg.model.context, part.forward_arg)
    if rng is None:  # a deterministic evaluation of the loss: no dropout, a fixed key for the feed's sampling
        dropout_rng, feed_rng = None, jax.random.key(0)
    else:
        dropout_rng, feed_rng = jax.random.split(rng)
    dropout_rng = dropout_rng if cfg.model.dropout > 0 else None
    base = TrunkFeed(batch["tokens"], *trunk_inputs(batch, cfg.model.context))
    if "features" in batch:
        # The frozen bottom's output comes cached with the batch (data.feature_cache, the default feed only).
        extras = {}
        hidden = model.hidden_from_features(batch["features"], base.positions, base.attention_ids,
                                            part.forward_arg, dropout_rng=dropout_rng)
    else:
        feed, extras = objective.feed(settings, cfg.rl, batch, base, views, feed_rng,
                                      vocab_size=cfg.model.vocab_size)
        hidden = model.hidden(feed.tokens, feed.positions, feed.attention_ids, mask=feed.mask,
                              dropout_rng=dropout_rng, frozen_layers=part.forward_arg)
    hidden = shard_rows(hidden)
    return objective.loss(settings, cfg.rl, {**batch, **extras}, hidden, views, denominator,
                          vocab_size=cfg.model.vocab_size)


def ema(target: Params, online: Params, eta: float) -> Params:
    """theta_bar <- theta_bar + eta * (theta - theta_bar), leaf by leaf."""
    return jax.tree.map(lambda t, p: t + eta * (p - t), target, online)


def _split_micro(batch: Mapping[str, jnp.ndarray], n: int) -> dict[str, jnp.ndarray]:
    """``[B, L]`` fields -> ``[n, B / n, L]``, micro-batch major."""
    return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}


def _all_finite(tree: Any) -> jnp.ndarray:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def build_update_fn(cfg: Config, graphdef: nnx.GraphDef, micro_sharding: jax.sharding.Sharding | None = None
                    ) -> Callable[[TrainState, Mapping[str, jnp.ndarray]], tuple[TrainState, dict[str, jnp.ndarray]]]:
    """The un-jitted update (for ``jax.vmap`` over seeds, AOT lowering, or custom jit options).

    The loss is the objective ``rl.objective`` (``jaxrl_lm.rl.get_objective``). ``micro_sharding``: where the
    ``[n, B / n, L]`` micro-batches go (``micro_sharding``); None = XLA's choice.
    """
    objective = get_objective(cfg.rl.objective)
    roles = {g.name: g for g in param_groups(cfg)}
    tx = make_optimizer(cfg)
    n_micro = cfg.optim.grad_accum
    eta = cfg.rl.target_ema
    part = Partition.of(cfg)
    # Differentiated with respect to the trained part only: a frozen trunk bottom gets no gradient buffers.
    grad_fn = jax.value_and_grad(
        lambda t, f, g, b, d, r: loss_fn(cfg, graphdef, part.join(t, f), g, b, d, r, objective), has_aux=True
    )

    def update(state: TrainState, batch: Mapping[str, jnp.ndarray]) -> tuple[TrainState, dict[str, jnp.ndarray]]:
        denominator = objective.denominator(cfg.objective, cfg.rl, batch)
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        micro_rngs = jax.random.split(step_rng, n_micro)
        trained, frozen = part.split(state.params)

        def micro_step(grads, inputs):
            micro, micro_rng = inputs
            (_, metrics), g = grad_fn(trained, frozen, state.groups, micro, denominator, micro_rng)
            return jax.tree.map(jnp.add, grads, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, trained)
        micro = _split_micro(batch, n_micro)
        if micro_sharding is not None:
            micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
        grads, micro_metrics = jax.lax.scan(micro_step, zeros, (micro, micro_rngs))
        metrics = {k: (jnp.sum(v) if k in objective.summed_metrics else jnp.mean(v))
                   for k, v in micro_metrics.items()}

        # A batch without decisions (all padding, or no action token) has a zero gradient: applying it would still
        # move the parameters by Adam's momentum and the target by its EMA, a step taken on no data. It is skipped
        # like a non-finite one.
        ok = jnp.isfinite(metrics["loss"]) & _all_finite(grads) & (denominator > 0)

        def apply(operands):
            trained, opt_state, groups = operands
            updates, new_opt_state = tx.update(grads, opt_state, trained)
            new_trained = optax.apply_updates(trained, updates)
            # EMA groups follow the new parameters once per optimizer step, snapshots copy them every
            # refresh_every-th step; frozen groups never change. Groups hold the trained part only.
            new_groups = {}
            for name, group in groups.items():
                role = roles[name]
                if role.role == "ema":
                    group = {k: ema(group[k], new_trained[k], eta) for k in group}
                elif role.role == "snapshot":
                    fresh = (state.step + 1) % role.refresh_every == 0
                    group = {k: jax.tree.map(lambda new, old: jnp.where(fresh, new, old), new_trained[k], group[k])
                             for k in group}
                new_groups[name] = group
            return new_trained, new_opt_state, new_groups

        # The skip is a branch, not a select between old and new trees: a select needs the old parameters and
        # optimizer moments alive beside the new ones, so XLA copies every one of them (3.4 GB on GPT-2 small);
        # inside the branch the optimizer writes them in place. Under jax.vmap (seeds) the branch becomes a select.
        new_trained, new_opt_state, new_groups = jax.lax.cond(ok, apply, lambda operands: operands,
                                                              (trained, state.opt_state, state.groups))
        new_state = TrainState(
            params=part.join(new_trained, frozen),
            groups=new_groups,
            opt_state=new_opt_state,
            step=state.step + 1,
            skipped=state.skipped + (~ok).astype(jnp.int32),
            rng=jax.random.key_data(rng),
        )
        metrics.update(
            grad_norm=optax.tree.norm(grads),
            tokens=jnp.sum(batch["segment_ids"] != 0, dtype=jnp.float32),
            skipped=new_state.skipped.astype(jnp.float32),
            update_applied=ok.astype(jnp.float32),
        )
        return new_state, metrics

    return update


def in_mesh(fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """``fn`` traced under ``mesh``'s abstract mesh, so that the model's ``shard_rows`` constraints pin every
    activation's rows to the batch axes (``jaxrl_lm.models.layers.shard_rows``)."""
    @functools.wraps(fn)  # the compiled module keeps the name ``jit_update`` (profiles, XLA dumps)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)
    return traced


def micro_sharding(batch_sharding: Any) -> jax.sharding.NamedSharding | None:
    """Every micro-batch split over the batch devices like the whole batch. Left to itself, XLA shards the
    ``[n, B / n, L]`` reshape along the micro-batch axis ``n`` and then repeats each scan step on all devices."""
    if not isinstance(batch_sharding, jax.sharding.NamedSharding):
        return None
    return jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec))


def make_update(cfg: Config, graphdef: nnx.GraphDef | None = None, *, state_sharding: Any = None,
                batch_sharding: Any = None, seed_axis: bool = False):
    """The jitted optimizer step ``update(state, batch) -> (state, metrics)`` for ``cfg``.

    Args:
      cfg: the run's Config (objective, optimizer, ``optim.grad_accum`` micro-batches, target EMA).
      graphdef: the model's static graph (``split_model(model)[0]``); default ``model_graphdef(cfg.model)``.
      state_sharding, batch_sharding: explicit in/out shardings (``train.sharding.setup_parallelism``); without
        them XLA places everything (one device, or wherever the inputs already live).
      seed_axis: the state is a stack of seeds (every leaf ``[N, ...]``) and the update is ``jax.vmap`` of the
        single-seed one, the ``[B, L]`` batch shared by every seed (``in_axes=None``); metrics get a leading
        ``[N]`` (the training loop's ``seeds``; ``train.seeds.make_multi_seed_update`` also takes per-seed
        batches).

    The returned function takes a ``TrainState`` and a batch, a dict of ``[B, L]`` arrays (``jaxrl_lm.batch``:
    ``tokens``, ``action_mask``, ``done``, ``segment_ids``, ``turn_ids`` int32, ``reward`` float32; numpy is
    fine), and returns the next state and a dict of float32 scalar device arrays: the objective's metrics
    (``token_q``: ``loss`` and its terms ``q_loss``, ``v_loss``, ``cql_loss``, ``bc_loss``; ``q_mean``,
    ``v_mean``, ``target_mean``, ``td_error``, ``cql_gap``; counts ``decisions``, ``decisions_dropped``), and
    ``grad_norm``, ``tokens``, ``skipped`` and ``update_applied`` (0 when the guard rejected the step: a
    non-finite loss or gradient, or no decision in the batch). It is ``jax.jit`` of
    ``build_update_fn``: it compiles once per batch shape (``update._cache_size()``), and the state is
    donated, so keep only the returned one.

    Example::

        cfg = jaxrl_lm.load_config("configs/demo.yaml")
        state = jaxrl_lm.init_state(cfg)
        update = jaxrl_lm.make_update(cfg)
        for batch in jaxrl_lm.batches(cfg, steps=100):
            state, metrics = update(state, batch)     # float(metrics["loss"]) waits for the step
    """
    graphdef = model_graphdef(cfg.model) if graphdef is None else graphdef
    fn = build_update_fn(cfg, graphdef, micro_sharding(batch_sharding) if cfg.optim.grad_accum > 1 else None)
    if seed_axis:
        fn = jax.vmap(fn, in_axes=(0, None))
    if isinstance(batch_sharding, jax.sharding.NamedSharding):
        fn = in_mesh(fn, batch_sharding.mesh)
    if state_sharding is None and batch_sharding is None:
        return jax.jit(fn, donate_argnums=0)
    return jax.jit(fn, donate_argnums=0, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, None))
