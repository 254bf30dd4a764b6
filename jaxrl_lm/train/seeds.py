"""Many seeds of one experiment in one compiled program: ``jax.vmap`` of the update over a leading seed axis.

A seed is ``train.seed``: it draws the initial parameters and the dropout key (``init_state(cfg, seed=s)``).
A *stacked* TrainState holds ``N`` of them, every leaf with a leading ``[N]`` axis, seed ``i`` at index ``i``.
The update is ``build_update_fn``, the very function ``make_update`` jits, under ``jax.vmap``: one compile,
one dispatch per step for all seeds, and each seed gets exactly (to float rounding) the state a separate
``make_update`` run would give it.

Batches. A ``[B, L]`` batch is shared by every seed: it is vmapped with ``in_axes=None``, so it is neither
copied nor re-processed (decision counts and other batch-only work happen once). A ``[N, B, L]`` batch gives
seed ``i`` its own batch ``i``. ``train_seeds`` shares: every seed reads the batches that ``data.seed`` orders,
just as ``scripts/train.py ... train.seed=s`` would, so the spread over seeds is the spread due to
initialisation and dropout. To let data order vary too, stack ``N`` different batches.

    states = init_states(cfg, seeds=[0, 1, 2])           # stacked TrainState, leaves [3, ...]
    update = make_multi_seed_update(cfg)
    states, metrics = update(states, batch)              # batch [B, L] or [3, B, L]; metrics [3] per key
    params = unstack(states.params)                      # 3 parameter dicts, seed order

Evaluation stays per seed: ``jaxrl_lm.eval.evaluate_params`` on each of ``unstack(states.params)``; the decoder
takes parameters as an argument, so it compiles once for all seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_lm import config as config_lib
from jaxrl_lm.config import Config
from jaxrl_lm.train.batches import batches
from jaxrl_lm.train.state import Params, TrainState, init_state, model_graphdef
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


@dataclasses.dataclass(frozen=True)
class SeedRuns:
    """What ``train_seeds`` returns.

    Attributes:
      seeds: the ``N`` seeds, in the order of every leading axis below.
      state: the final stacked TrainState (leaves ``[N, ...]``; ``unstack`` it for per-seed states).
      history: ``"step"``: ``[T]`` int64, the steps at which metrics were read; every metric of
        ``make_update``: ``[T, N]`` float32.
    """

    seeds: tuple[int, ...]
    state: TrainState
    history: dict[str, np.ndarray]

    @property
    def params(self) -> list[Params]:
        """The ``N`` final online parameter dicts, seed order."""
        return unstack(self.state.params)


def train_seeds(cfg: Config, seeds: Sequence[int], steps: Optional[int] = None, *,
                episodes: Optional[Iterable[Mapping[str, Any]]] = None, log_every: Optional[int] = None,
                hook: Optional[Callable[[int, TrainState], None]] = None, hook_every: int = 0) -> SeedRuns:
    """Trains ``len(seeds)`` seeds of ``cfg`` side by side in one compiled update, every seed on the same batches.

    Args:
      cfg: the experiment; its data (``data.path`` or ``episodes``) is read by one loader (``batches``).
      seeds: the ``train.seed`` of each run.
      steps: optimizer steps; default ``train.steps``. Given, it replaces ``train.steps`` (which is also the
        learning-rate schedule's horizon), so seed ``s`` is the run ``scripts/train.py`` would make with
        ``train.seed=s train.steps=steps``, up to float rounding.
      episodes: episode dicts used instead of ``data.path`` (``batches``).
      log_every: metrics are read back to the host every this many steps and at the last; default
        ``train.log_every``. Reading them waits for the device, so a large value keeps steps back to back.
      hook, hook_every: ``hook(step, states)`` runs on the host every ``hook_every`` steps and after the last
        (e.g. evaluating each seed's ``unstack(states.params)``: ``jaxrl_lm.train.experiment``); it must not keep
        ``states``, which the next step donates.

    ``history["decisions_dropped"]`` should stay 0 (``rl.decision_fraction``); unlike the training loop this
    function does not stop on it. Example::

        runs = train_seeds(cfg, seeds=range(4), steps=200)
        runs.history["loss"][-1]                          # [4]: each seed's last loss
        scores = [jaxrl_lm.evaluate_params(cfg, p, "grid", kind="ilql")["normalized_score"] for p in runs.params]
    """
    seeds = tuple(int(s) for s in seeds)
    if steps is not None:
        cfg = config_lib.replace(cfg, train__steps=steps)
    steps = cfg.train.steps
    log_every = log_every or cfg.train.log_every
    states = init_states(cfg, seeds)
    update = make_multi_seed_update(cfg)
    logged_steps, rows = [], []
    step = 0
    for step, batch in enumerate(batches(cfg, episodes, steps=steps), start=1):
        states, metrics = update(states, batch)
        if step % log_every == 0 or step == steps:
            logged_steps.append(step)
            rows.append(jax.device_get(metrics))
        if hook is not None and ((hook_every and step % hook_every == 0) or step == steps):
            hook(step, states)
    if step < steps:
        raise ValueError(f"the data ran out after {step} of {steps} batches: raise data.num_epochs (now "
                         f"{cfg.data.num_epochs}; 0 = repeat forever) or lower the steps")
    history = {"step": np.asarray(logged_steps, np.int64)}
    history.update({k: np.stack([row[k] for row in rows]) for k in rows[0]})
    return SeedRuns(seeds, states, history)
