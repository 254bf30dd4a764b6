"""Many seeds of one experiment in one compiled program: ``jax.vmap`` of the update over a leading seed axis.

A seed is ``train.seed``: it draws the initial parameters and the dropout key (``init_state(cfg, seed=s)``).
A *stacked* TrainState holds ``N`` of them, every leaf with a leading ``[N]`` axis, seed ``i`` at index ``i``.
The update is ``build_update_fn``, the very function ``make_update`` jits, under ``jax.vmap``: one compile,
one dispatch per step for all seeds, and each seed gets exactly (to float rounding) the state a separate
``make_update`` run would give it.

Batches. A ``[B, L]`` batch is shared by every seed: it is vmapped with ``in_axes=None``, so it is neither
copied nor re-processed (decision counts and other batch-only work happen once). A ``[N, B, L]`` batch gives
seed ``i`` its own batch ``i``. The training loop (``train(cfg, seeds=[...])``) shares: every seed reads the
batches that ``data.seed`` orders, just as ``scripts/train.py ... train.seed=s`` would, so the spread over seeds
is the spread due to initialisation and dropout. To let data order vary too, stack ``N`` different batches.

    states = init_states(cfg, seeds=[0, 1, 2])           # stacked TrainState, leaves [3, ...]
    update = make_multi_seed_update(cfg)
    states, metrics = update(states, batch)              # batch [B, L] or [3, B, L]; metrics [3] per key
    params = unstack(states.params)                      # 3 parameter dicts, seed order

Evaluation stays per seed: ``jaxrl_lm.eval.evaluate_params`` on each of ``unstack(states.params)``; the decoder
takes parameters as an argument, so it compiles once for all seeds.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_lm.config import Config
from jaxrl_lm.models import model_graphdef
from jaxrl_lm.train.state import TrainState, init_state
from jaxrl_lm.train.update import build_update_fn

Tree = TypeVar("Tree")


def stack(trees: Sequence[Tree]) -> Tree:
    """Trees of the same structure -> one tree whose leaves are stacked on a new leading ``[N]`` axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree: Tree) -> list[Tree]:
    """The inverse of ``stack``: a tree with leading ``[N]`` leaves -> ``N`` trees (seed order)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda leaf: leaf[i], tree) for i in range(n)]


def init_states(cfg: Config, seeds: Sequence[int]) -> TrainState:
    """``init_state(cfg, seed=s)`` for each of ``seeds`` (ints below 2**31), stacked: every leaf ``[N, ...]``.

    One vmapped compile builds all ``N`` models; the random streams are those of the separate calls, so seed
    ``i`` of the result equals ``init_state(cfg, seed=seeds[i])``.
    """
    if not len(seeds):
        raise ValueError("init_states: give at least one seed")
    return jax.jit(jax.vmap(lambda seed: init_state(cfg, seed=seed)))(jnp.asarray(seeds, jnp.int32))


def num_seeds(states: TrainState) -> int:
    """``N``, the leading axis of a stacked TrainState."""
    return int(states.step.shape[0])


def make_multi_seed_update(cfg: Config, graphdef: nnx.GraphDef | None = None
                           ) -> Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
    """``jax.jit(jax.vmap(build_update_fn(cfg, graphdef)))`` over the seed axis, the stacked state donated.

    Returns ``update(states, batch) -> (states, metrics)``:
      states: a stacked TrainState (``init_states``), leaves ``[N, ...]``.
      batch: ``jaxrl_lm.batch`` fields, all ``[B, L]`` (shared by every seed) or all ``[N, B, L]`` (seed ``i``
        reads ``batch[k][i]``).
      metrics: ``make_update``'s metrics with a leading ``[N]`` axis (float32).

    It compiles once per batch shape (``update._cache_size()``); ``graphdef`` defaults to
    ``model_graphdef(cfg.model)``. Example::

        update = make_multi_seed_update(cfg)
        states, metrics = update(init_states(cfg, [0, 1, 2, 3]), batch)
        metrics["loss"]                                   # [4] float32, one loss per seed
    """
    one_seed = build_update_fn(cfg, model_graphdef(cfg.model) if graphdef is None else graphdef)

    def update(states: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
        shape = batch["tokens"].shape  # static under jit: each rank traces its own vmap
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] != num_seeds(states)):
            raise ValueError(f"batch['tokens'] has shape {shape}: give [B, L] (shared by every seed) or "
                             f"[{num_seeds(states)}, B, L] (one batch per seed)")
        rank = len(shape)
        return jax.vmap(one_seed, in_axes=(0, 0 if rank == 3 else None))(states, batch)

    return jax.jit(update, donate_argnums=0)
