"""The host loop: data -> jitted update in a loop -> logs, checkpoints and the hooks the caller passes in.

One loop for one run or a stack of seeds (``seeds=[...]``: every TrainState leaf gets a leading ``[N]`` axis and
the update is ``jax.vmap`` of the single-seed one, every seed reading the same batches), with the same checks for
both: sharding, resume, SIGTERM saves, the non-finite guard's counts, the dropped-decision stop and logging.

Writes into ``train.out_dir``: ``config.yaml`` (the resolved config), TensorBoard scalars, ``metrics.jsonl`` (one
line per log step; with seeds, the mean over seeds and ``per_seed`` lists), ``final_metrics.json`` and
``checkpoints/`` (asynchronous Orbax checkpoints every ``train.checkpoint_every`` steps, at the last step and on
SIGTERM; ``resume=True`` continues from the newest). The host reads device metrics only every
``train.log_every`` steps (and at checkpoints), so the steps in between run back to back without a host sync; it
dispatches at most ``STEPS_IN_FLIGHT`` steps ahead of the device, so the progress bar's rate and ETA are the
device's step rate (not the dispatch rate, which runs ahead until the next metrics read).

Evaluation, learning curves and data collection are ``Hook``s that the entry point passes in (``train/`` never
imports the environments, policies or evaluation): ``jaxrl_lm.experiments.run`` builds them from the config.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxrl_lm import data, distributed
from jaxrl_lm.checkpoints import RUN_TOKENIZER, load_params, run_seeds
from jaxrl_lm.config import Config, ConfigError, to_yaml
from jaxrl_lm.models import Params, model_graphdef
from jaxrl_lm.models.partition import with_fresh_adapters
from jaxrl_lm.train import checkpoint, features
from jaxrl_lm.train.mesh import place_batch
from jaxrl_lm.train.sharding import Parallelism, init_sharded_state, setup_parallelism
from jaxrl_lm.train.state import TrainState, init_state
from jaxrl_lm.train.update import make_update

# Steps dispatched but not yet finished, at most: before step n is dispatched the host waits for step n - 2 (on
# one of its metrics, which the next update does not donate; nothing is copied to the host). One step runs while
# the next one's batch is placed and queued, so the device never waits for the host, and the host never runs
# more than this many steps ahead of what the progress bar shows.
STEPS_IN_FLIGHT = 2


def check_vocab(cfg: Config, tokenizer: data.Tokenizer) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}): set model.vocab_size={tokenizer.vocab_size}"
        )


class MetricsLog:
    """Log-step metrics to TensorBoard and ``metrics.jsonl`` (process 0 only)."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(out_dir))
            self.jsonl = (out_dir / "metrics.jsonl").open("a")

    def write(self, step: int, metrics: Mapping[str, float], per_seed: Optional[Mapping[str, list]] = None) -> None:
        """Scalars go to TensorBoard as ``train/<name>``, or under their own name when it has a ``/``
        (``eval/<policy>/<field>``); ``per_seed`` (a stacked run's values per seed) goes to the JSONL line."""
        if not self.enabled:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
        line = {"step": step, **metrics, **({"per_seed": dict(per_seed)} if per_seed else {})}
        self.jsonl.write(json.dumps(line) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def resume_step(cfg: Config, resume: bool, refused: Optional[list[str]] = None) -> int | None:
    """The checkpoint step a run starts from (None = a fresh run), after checking that this is what was asked.

    A fresh run refuses a directory that already holds checkpoints (it would mix two runs' steps); a resumed
    one needs a complete checkpoint whose config agrees with ``cfg`` (``checkpoint.RESUME_KEYS``). A step whose
    saved config cannot be read is refused (``refuse_step``) and the one before it tried; ``refused`` collects
    what was refused and why.
    """
    directory = checkpoint.checkpoint_dir(cfg)
    step = checkpoint.latest_step(directory)
    if not resume:
        if step is not None:
            raise FileExistsError(f"{directory} already holds checkpoints (newest: step {step}): pass --resume "
                                  f"(train(..., resume=True)) to continue that run, or set another train.out_dir")
        return None
    refused = [] if refused is None else refused
    while True:
        if step is None:
            why = f"; refused: {'; '.join(refused)}" if refused else ""
            raise FileNotFoundError(f"--resume: no complete checkpoint in {directory}{why}; check train.out_dir "
                                    f"({cfg.train.out_dir}) or start a fresh run without --resume")
        try:
            saved = checkpoint.read_config(directory, step)
        except Exception as e:  # noqa: BLE001 - JSON or Orbax errors of a damaged step
            step = refuse_step(cfg, step, checkpoint.CheckpointError(
                f"{directory / str(step)}: cannot read its config: {checkpoint.cause(e)}"), refused)
            continue
        checkpoint.check_resume_config(saved, cfg, directory / str(step))
        return step


def refuse_step(cfg: Config, step: int, error: Exception, refused: list[str]) -> int | None:
    """Moves the unreadable checkpoint ``step`` aside (``checkpoint.refuse``), says so, and returns the newest
    complete step left (None: none). With several processes nothing is moved: ``error`` is raised with what to
    do, since every process would have to agree on the step."""
    directory = checkpoint.checkpoint_dir(cfg)
    if jax.process_count() > 1:
        raise checkpoint.CheckpointError(f"--resume: {error}. Move {directory / str(step)} out of {directory} "
                                         f"to resume from the step before it") from error
    moved = checkpoint.refuse(directory, step)
    refused.append(f"step {step} ({error}), moved to {moved}")
    newest = checkpoint.latest_step(directory)
    print(f"--resume: refusing checkpoint step {step}: {error}. Moved it to {moved}; "
          f"{f'trying step {newest}' if newest is not None else 'no other checkpoint is left'}",
          file=sys.stderr, flush=True)
    return newest


def restore_for_resume(cfg: Config, abstract: TrainState, step: int, refused: list[str]) -> checkpoint.Restored:
    """The newest readable checkpoint from ``step`` down: each step that fails to restore is refused
    (``refuse_step``) and the one before it checked (``resume_step``) and tried."""
    while True:
        try:
            return checkpoint.restore(checkpoint.checkpoint_dir(cfg), abstract, step)
        except checkpoint.CheckpointError as e:
            if refuse_step(cfg, step, e, refused) is None:
                raise FileNotFoundError(f"--resume: no readable checkpoint left in {checkpoint.checkpoint_dir(cfg)};"
                                        f" refused: {'; '.join(refused)}") from e
            step = resume_step(cfg, True, refused)


def _skip_error(cfg: Config, step: int, longest: int, metrics: Mapping[str, float]) -> RuntimeError:
    """The stop after ``train.max_consecutive_skips`` rejected updates in a row."""
    seen = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "grad_norm", "decisions") if k in metrics)
    return RuntimeError(
        f"step {step}: {longest} updates in a row were skipped (train.max_consecutive_skips = "
        f"{cfg.train.max_consecutive_skips}): each had a non-finite loss or gradient, or a batch without decisions "
        f"(step {step}: {seen}). Nothing was applied during them: the parameters are those from before the run of "
        f"skips. Check the data (NaN/Inf or huge rewards, empty rows), lower optim.learning_rate, or set "
        f"train.max_consecutive_skips=0 to keep going")


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a hook sees after an update.

    step: the optimizer steps done (1-based). last: whether it is the run's last step. saving: whether this
    step writes a checkpoint (known only to hooks run at checkpoints). state: the TrainState after the step
    (stacked ``[N, ...]`` when ``seeds`` is set); it is donated to the next update, so a hook must not keep it
    (``jax.device_get`` what it needs). batch: the ``[B, L]`` numpy batch the step consumed (this process's
    rows). metrics: the step's device metrics (``[N]`` each with seeds). seeds: the stacked seeds, or None.
    """

    cfg: Config
    step: int
    last: bool
    saving: bool
    state: TrainState
    batch: Mapping[str, np.ndarray]
    metrics: Mapping[str, jax.Array]
    seeds: Optional[tuple[int, ...]]
    out_dir: Path
    is_main: bool


HookFn = Callable[[StepContext], Optional[Mapping[str, float]]]


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(ctx)`` run on the host after the updates it is due at: every ``every`` steps (0 = none), after the
    last step (``at_end``) and at every step that writes a checkpoint (``at_checkpoints``: e.g. an evaluation
    that ranks checkpoints); with ``at_start``, also once before the first update of this process's run (a fresh
    or a resumed one: ``ctx.step`` is the step the run starts after, ``ctx.batch`` and ``ctx.metrics`` empty; e.g.
    the online collector's first round). ``fn`` may return host-float metrics: they are logged (TensorBoard,
    metrics.jsonl) and handed to the checkpoint of that step (``train.keep_best_metric`` may name one); the ones
    named in ``postfix`` are shown on the progress bar too."""

    fn: HookFn
    every: int = 0
    at_end: bool = True
    at_checkpoints: bool = False
    at_start: bool = False
    postfix: tuple[str, ...] = ()

    def due(self, step: int, last: bool) -> bool:
        return bool(self.every and step % self.every == 0) or (self.at_end and last)


def _host_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, list]]:
    """``(values, per_seed)``: scalars as floats; a stacked run's ``[N]`` metrics as their mean, with the
    per-seed lists beside."""
    host = jax.device_get(metrics)
    values = {k: float(np.mean(v)) for k, v in host.items()}
    per_seed = {k: np.asarray(v).tolist() for k, v in host.items() if np.ndim(v) == 1}
    return values, per_seed


def stacked_sharding(sharding: TrainState) -> TrainState:
    """Shardings of a stack of states: each leaf's sharding with a leading unsplit seed axis."""
    return jax.tree.map(lambda sh: NamedSharding(sh.mesh, PartitionSpec(None, *sh.spec)), sharding)


def state_layout(cfg: Config, par: Parallelism, seeds: Optional[tuple[int, ...]]) -> tuple[TrainState, TrainState]:
    """``(state shardings, abstract state)`` of a single run or of a stack of ``len(seeds)`` runs."""
    if seeds is None:
        return par.state_sharding, par.abstract_state
    sharding = stacked_sharding(par.state_sharding)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct((len(seeds), *s.shape), s.dtype, sharding=sh),
                            par.abstract_state, sharding)
    return sharding, abstract


def initial_params(cfg: Config, abstract_params: Params, seeds: Optional[tuple[int, ...]]) -> Params:
    """The parameters of ``train.init_from`` laid out for this run: one model, or a ``[N, ...]`` stack for
    ``seeds`` (a multi-seed source gives seed ``i`` its ``i``-th model and must hold the same seeds; a single
    one is shared by every seed). A source without this model's LoRA factors (``model.lora``: a pretrained trunk
    imported without adapters) gets the fresh factors of ``train.seed``, which leave its outputs unchanged."""
    source = cfg.train.init_from
    _, params, step = load_params(source)
    params = jax.device_get(params)  # host arrays: the jitted init places them on this run's shardings
    params = with_fresh_adapters(cfg.model, params, cfg.train.seed)
    where = f"train.init_from {source!r} (step {step})"
    if jax.tree.structure(params) != jax.tree.structure(abstract_params):
        raise ConfigError(f"{where}: its parameters have the keys {sorted(params)} and another structure than "
                          f"model: {sorted(abstract_params)}; the model sections must match")
    stacked = jax.tree.leaves(params)[0].ndim == jax.tree.leaves(abstract_params)[0].ndim + 1
    source_seeds = run_seeds(source)
    if stacked:
        count = jax.tree.leaves(params)[0].shape[0]
        if seeds is None:
            if source_seeds is None or cfg.train.seed not in source_seeds:
                raise ConfigError(f"{where} is a stack of {count} seeds {source_seeds or '(unrecorded)'}; this "
                                  f"one-seed run (train.seed {cfg.train.seed}) cannot tell which to start from")
            params = jax.tree.map(lambda x: x[source_seeds.index(cfg.train.seed)], params)
        elif count != len(seeds) or (source_seeds is not None and list(source_seeds) != list(seeds)):
            raise ConfigError(f"{where} holds the seeds {source_seeds or count}; this run trains {list(seeds)}")
    elif seeds is not None:
        params = jax.tree.map(lambda x: np.broadcast_to(x, (len(seeds), *x.shape)), params)
    lead = () if seeds is None else (len(seeds),)
    for (path, got), want in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(abstract_params)):
        if got.shape != lead + tuple(want.shape):
            raise ConfigError(f"{where}: parameter {jax.tree_util.keystr(path)} has the shape {got.shape}, this "
                              f"model's is {lead + tuple(want.shape)}; the model sections must match")
    return params


def initial_state(cfg: Config, par: Parallelism, sharding: TrainState, seeds: Optional[tuple[int, ...]]
                  ) -> TrainState:
    """A fresh state on its shardings (no device or host ever holds a whole copy); with ``seeds``, one per seed
    stacked, seed ``i`` equal to ``init_state(cfg, seed=seeds[i])``. With ``train.init_from`` the parameters
    (and every frozen group) start from that run's (``initial_params``)."""
    if cfg.train.init_from:
        params = initial_params(cfg, par.abstract_state.params, seeds)
        if seeds is None:
            return jax.jit(lambda p: init_state(cfg, p), out_shardings=sharding)(params)
        stacked = jax.vmap(lambda p, seed: init_state(cfg, p, seed=seed))
        return jax.jit(stacked, out_shardings=sharding)(params, jnp.asarray(seeds, jnp.int32))
    if seeds is None:
        return init_sharded_state(cfg, par)
    stacked = jax.vmap(lambda seed: init_state(cfg, seed=seed))
    return jax.jit(stacked, out_shardings=sharding)(jnp.asarray(seeds, jnp.int32))


class BatchSource(Protocol):
    """Where the loop's batches come from: ``data.Loader`` (offline), or another object with its methods, such
    as the online collector's replay loader. ``__next__`` gives this process's ``BATCH_FIELDS`` numpy arrays
    ``[B_local, L]``; ``get_state`` a JSON-able dict, saved in every checkpoint and handed back to ``set_state``
    on resume. A source that also has ``get_arrays() -> dict[str, np.ndarray]`` (a replay buffer's contents)
    gets them saved beside it and passed to ``set_state(state, arrays)``."""

    summary: Mapping[str, Any]

    def __next__(self) -> Mapping[str, np.ndarray]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: Mapping[str, Any], *args: Any) -> None: ...

    def close(self) -> None: ...


def _source_state(source: BatchSource) -> tuple[dict[str, Any], Optional[dict[str, np.ndarray]]]:
    state = source.get_state()
    return state, (source.get_arrays() if hasattr(source, "get_arrays") else None)


def _dropped_hint(cfg: Config) -> str:
    """Which setting makes room for dropped decisions: the token heads' slots, and for an objective with turn
    slots (the utterance-level ones), its ``max_turns`` too."""
    hint = f"raise rl.decision_fraction (now {cfg.rl.decision_fraction})"
    if hasattr(cfg.objective, "max_turns"):
        hint += (f" or {cfg.rl.objective}.max_turns (now {cfg.objective.max_turns}; a row's agent turns past it "
                 f"have no slot)")
    return hint


def train(cfg: Config, *, seeds: Optional[Sequence[int]] = None, hooks: Sequence[Hook] = (),
          episodes: Iterable[Mapping[str, Any]] | None = None, resume: bool = False, progress: bool = True,
          outputs: bool = True, source: Optional[BatchSource] = None) -> dict:
    """Trains up to ``train.steps`` optimizer steps; returns the last logged metrics (host floats).

    Args:
      cfg: the run. ``data.path`` must be a JSONL file or a built dataset unless ``episodes`` is given (a
        built-in ``task:NAME`` is resolved by the entry point: ``jaxrl_lm.experiments.run``).
      seeds: train ``len(seeds)`` runs side by side in one compiled update (``train.seed`` of each; all read the
        batches ``data.seed`` orders); None = one run of ``train.seed``.
      hooks: ``Hook``s run after the steps they are due at, in order (evaluation, curves, data collection).
      episodes: episode dicts (the JSONL format) used instead of ``data.path``.
      resume: continue from the newest complete checkpoint in ``<train.out_dir>/checkpoints`` (params, groups,
        optimizer state, rng and data position; ``train.steps`` may be raised).
      outputs: False writes nothing (no config, logs or checkpoints; ``resume`` is then unavailable).
      source: the batches (``BatchSource``), instead of a loader of ``cfg.data`` (``episodes`` must then be
        None): the online collector's replay loader (``jaxrl_lm.experiments.online``). The loop closes it.

    A SIGTERM saves a checkpoint at the next step boundary and returns early with ``preempted: true``. A step
    whose objective reports ``decisions_dropped`` stops the run (raise ``rl.decision_fraction``), and so does a run
    of ``train.max_consecutive_skips`` updates rejected in a row (both checked at log steps). With ``resume``, a
    checkpoint that cannot be read is moved aside to ``checkpoints_refused/`` and the one before it used
    (``final["refused_checkpoints"]`` says which and why); a failed checkpoint write raises
    ``checkpoint.CheckpointError`` naming the directory, the cause and the newest intact step.
    """
    out_dir = Path(cfg.train.out_dir)
    is_main = distributed.initialize(cfg).is_main
    seeds = None if seeds is None else tuple(int(s) for s in seeds)
    if seeds is not None and not seeds:
        raise ValueError("train: seeds is empty; give at least one seed, or None for one run of train.seed")
    if not outputs and resume:
        raise ValueError("train: resume needs the run's checkpoints; outputs=False writes none")
    if cfg.train.keep_best_metric.startswith("eval/") and not any(h.at_checkpoints for h in hooks):
        raise ConfigError(f"train.keep_best_metric {cfg.train.keep_best_metric!r} is an evaluation metric: set "
                          f"eval.every (and train through jaxrl_lm.experiments.run, which evaluates)")
    refused: list[str] = []  # checkpoints --resume found unreadable and moved aside
    start = resume_step(cfg, resume, refused) if outputs else None
    if is_main and outputs:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))

    if source is not None and episodes is not None:
        raise ValueError("train: give episodes (for a loader of cfg.data) or a batch source, not both")
    tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    check_vocab(cfg, tokenizer)
    if is_main and outputs:  # the run's own copy: policies and evaluation read it from the run directory
        data.save_tokenizer(tokenizer, out_dir / RUN_TOKENIZER)
    cached = bool(cfg.data.feature_cache)
    if cached:
        features.check_supported(cfg, online=cfg.online.enabled or source is not None,
                                 process_count=jax.process_count())
    loader = source if source is not None else data.make_loader(
        cfg.data, tokenizer=tokenizer, episodes=episodes, process_index=jax.process_index(),
        process_count=jax.process_count(), token_index=cached)
    par = setup_parallelism(cfg)
    if is_main and progress:
        tqdm.write(par.summary())
    sharding, abstract = state_layout(cfg, par, seeds)
    # Fresh and restored states both land on these shardings, so that a resumed run compiles (and runs) the
    # very program an uninterrupted one does.
    if start is None:
        state = initial_state(cfg, par, sharding, seeds)
    else:
        restored = restore_for_resume(cfg, abstract, start, refused)
        start = restored.step
        if restored.loader_arrays is not None:
            if not hasattr(loader, "get_arrays"):
                raise ConfigError(f"checkpoint step {start} holds a replay buffer (an online run's): resume it "
                                  f"with the same online settings (online.enabled)")
            loader.set_state(restored.loader_state, restored.loader_arrays)
        else:
            loader.set_state(restored.loader_state)
        state = restored.state
    if cached:  # the frozen bottom's outputs, read or computed once (a frozen bottom is the same after resuming)
        loader = features.FeatureBatches(loader, features.open_or_build(cfg, state.params, loader.source, seeds,
                                                                        progress=progress and is_main))
    update = make_update(cfg, model_graphdef(cfg.model), state_sharding=sharding, batch_sharding=par.batch_sharding,
                         seed_axis=seeds is not None)
    log = MetricsLog(out_dir, is_main and outputs)
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(cfg), cfg.train) if outputs else None
    every = cfg.train.checkpoint_every

    first = 1 if start is None else start + 1
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    bar = tqdm(total=cfg.train.steps, initial=first - 1, disable=not (progress and is_main), unit="step",
               dynamic_ncols=True)
    last: dict[str, float] = {}
    hooked: dict[str, float] = {}
    preempted = False
    window_start, window_steps, window_paused = time.perf_counter(), 0, 0.0
    in_flight: collections.deque = collections.deque()  # a metric of each unfinished step (STEPS_IN_FLIGHT)
    # Decisions that did not fit the head slots, summed on the device over the steps since the last log step:
    # every step is checked, and the host reads the sum only where it reads the metrics anyway.
    dropped_since_log: Optional[jax.Array] = None
    # Updates rejected in a row (update_applied == 0), per seed, and the longest such run since the last log step,
    # kept on the device like dropped_since_log (train.max_consecutive_skips).
    skip_run: Optional[jax.Array] = None
    longest_skip_run: Optional[jax.Array] = None
    postfix_names = [name for hook in hooks for name in hook.postfix]

    def run_hooks(due: Sequence[Hook], ctx: StepContext) -> dict[str, float]:
        """The ``due`` hooks' metrics. They run once the device has finished the steps so far, and their time
        (an evaluation's minutes) is left out of the window's tokens/s, which is the training's own rate."""
        nonlocal window_paused
        if not due:
            return {}
        while in_flight:
            in_flight.popleft().block_until_ready()
        start, out = time.perf_counter(), {}
        for hook in due:
            out.update(hook.fn(ctx) or {})
        window_paused += time.perf_counter() - start
        return out

    notice = checkpoint.PreemptionNotice().install()
    failed = True  # set False once the loop ends normally: a failed run's last save is not waited for as a fault
    try:
        starting = [h for h in hooks if h.at_start]
        if starting:
            ctx = StepContext(cfg=cfg, step=first - 1, last=False, saving=False, state=state, batch={}, metrics={},
                              seeds=seeds, out_dir=out_dir, is_main=is_main)
            start_metrics = run_hooks(starting, ctx)
            if start_metrics:
                hooked.update(start_metrics)
                log.write(first - 1, start_metrics)
        for step in range(first, cfg.train.steps + 1):
            try:
                batch = next(loader)
            except StopIteration:
                raise ValueError(f"the data ran out after {step - 1} of {cfg.train.steps} batches: raise "
                                 f"data.num_epochs (now {cfg.data.num_epochs}; 0 = repeat forever) or lower "
                                 f"train.steps") from None
            if len(in_flight) >= STEPS_IN_FLIGHT:
                in_flight.popleft().block_until_ready()
            state, metrics = update(state, place_batch(batch, par.mesh))
            in_flight.extend(jax.tree.leaves(metrics)[:1])
            if "decisions_dropped" in metrics:
                dropped = jnp.sum(metrics["decisions_dropped"])
                dropped_since_log = dropped if dropped_since_log is None else dropped_since_log + dropped
            rejected = metrics["update_applied"] == 0
            skip_run = jnp.where(rejected, 1 if skip_run is None else skip_run + 1, 0)
            longest_skip_run = skip_run if longest_skip_run is None else jnp.maximum(longest_skip_run, skip_run)
            window_steps += 1
            bar.update(1)
            is_last = step == cfg.train.steps
            ctx = StepContext(cfg=cfg, step=step, last=is_last, saving=False, state=state, batch=batch,
                              metrics=metrics, seeds=seeds, out_dir=out_dir, is_main=is_main)
            ran = [h for h in hooks if h.due(step, is_last)]
            step_hooked = run_hooks(ran, ctx)
            preempted = notice.reached(step)  # after the hooks: a notice that arrived during them saves now
            saving = outputs and (preempted or is_last or bool(every and step % every == 0))
            if saving:
                ctx = dataclasses.replace(ctx, saving=True)
                step_hooked.update(run_hooks([hook for hook in hooks if hook.at_checkpoints
                                              and not any(hook is h for h in ran)], ctx))
            if step_hooked:
                hooked.update(step_hooked)
                log.write(step, step_hooked)
            if saving:
                loader_state, loader_arrays = _source_state(loader)
                checkpoint.save(manager, step, state, loader_state=loader_state, loader_arrays=loader_arrays,
                                cfg=cfg, metrics={**_host_metrics(metrics)[0], **step_hooked})
            if preempted:
                if is_main:
                    where = manager.directory if manager is not None else "(outputs=False: nothing saved)"
                    tqdm.write(f"SIGTERM: saved the checkpoint of step {step} in {where}; "
                               f"stopping (continue with --resume)")
                break
            if step % cfg.train.log_every and not is_last:
                continue
            last, per_seed = _host_metrics(metrics)
            in_flight.clear()  # reading the metrics waited for every step so far
            elapsed = time.perf_counter() - window_start - window_paused
            last["tokens_per_s"] = window_steps * tokens_per_step / elapsed
            dropped = float(dropped_since_log) if dropped_since_log is not None else 0.0
            if dropped > 0:
                raise RuntimeError(
                    f"steps {step - window_steps + 1}-{step}: {int(dropped)} decisions did not fit the head slots of "
                    f"a row; {_dropped_hint(cfg)}")
            longest = int(np.max(jax.device_get(longest_skip_run)))
            if cfg.train.max_consecutive_skips and longest >= cfg.train.max_consecutive_skips:
                raise _skip_error(cfg, step, longest, last)
            window_start, window_steps, window_paused, dropped_since_log = time.perf_counter(), 0, 0.0, None
            longest_skip_run = None
            log.write(step, last, per_seed)
            postfix = {k: f"{last[k]:.4f}" for k in ("loss", "q_mean") if k in last}
            postfix.update({k.rsplit("/", 1)[-1]: f"{hooked[k]:.4g}" for k in postfix_names if k in hooked})
            bar.set_postfix(**postfix, tok_s=f"{last['tokens_per_s']:.0f}", refresh=False)
        failed = False
    finally:
        bar.close()
        log.close()
        loader.close()
        try:
            if manager is not None and failed:
                try:  # the error in flight is the one to report; a failed pending write would only hide it
                    manager.close()
                except Exception:  # noqa: BLE001
                    pass
            elif manager is not None:
                checkpoint.close(manager)  # waits for the last asynchronous save; a failed write raises here
        finally:
            notice.uninstall()  # after the last write: a SIGTERM during it must not kill the process mid-write
    steps, skipped = jax.device_get((state.step, state.skipped))
    final = {**last, **hooked, "step": int(np.max(steps)), "preempted": preempted, "resumed_from": start,
             "data": loader.summary}
    if refused:
        final["refused_checkpoints"] = refused
    final["skipped"] = int(skipped) if seeds is None else np.asarray(skipped).tolist()
    if seeds is not None:
        final["seeds"] = list(seeds)
    if is_main and outputs:
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2, default=json_default))
    return final


def json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
