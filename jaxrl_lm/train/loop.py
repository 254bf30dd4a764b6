"""The training loop: config -> data -> model -> jitted update in a loop -> logs and metrics files.

    python scripts/train.py --config configs/demo.yaml train.steps=500 rl.backup=max

Writes into ``train.out_dir``: ``config.yaml`` (the resolved config), TensorBoard scalars, ``metrics.jsonl`` (one
line per log step), ``final_metrics.json`` and ``checkpoints/`` (asynchronous Orbax checkpoints every
``train.checkpoint_every`` steps, at the last step and on SIGTERM; ``--resume`` continues from the newest). The
host reads device metrics only every ``train.log_every`` steps (and at checkpoints), so the steps in between run
back to back without a host sync.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxrl_lm import data, distributed
from jaxrl_lm.config import Config, ConfigError, load_config, to_yaml
from jaxrl_lm.rl import decision_capacity
from jaxrl_lm.train import checkpoint
from jaxrl_lm.train.mesh import place_batch
from jaxrl_lm.train.sharding import init_sharded_state, setup_parallelism
from jaxrl_lm.train.state import TrainState, model_graphdef
from jaxrl_lm.train.update import make_update

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

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalars go to TensorBoard as ``train/<name>``, or under their own name when it has a ``/``
        (``eval/<policy>/<field>``)."""
        if not self.enabled:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(k if "/" in k else f"train/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def resume_step(cfg: Config, resume: bool) -> int | None:
    """The checkpoint step a run starts from (None = a fresh run), after checking that this is what was asked.

    A fresh run refuses a directory that already holds checkpoints (it would mix two runs' steps); a resumed
    one needs a complete checkpoint whose config agrees with ``cfg`` (``checkpoint.RESUME_KEYS``).
    """
    directory = checkpoint.checkpoint_dir(cfg)
    step = checkpoint.latest_step(directory)
    if not resume:
        if step is not None:
            raise FileExistsError(f"{directory} already holds checkpoints (newest: step {step}): pass --resume "
                                  f"(train(..., resume=True)) to continue that run, or set another train.out_dir")
        return None
    if step is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint in {directory}; check train.out_dir "
                                f"({cfg.train.out_dir}) or start a fresh run without --resume")
    checkpoint.check_resume_config(checkpoint.read_config(directory, step), cfg, directory / str(step))
    return step


def _restore(cfg: Config, step: int, target: TrainState, loader: data.Loader) -> TrainState:
    """The checkpointed state of ``step`` onto ``target`` (abstract, sharded); ``loader`` moves past it."""
    directory = checkpoint.checkpoint_dir(cfg)
    restored = checkpoint.restore(directory, target, step)
    loader.set_state(restored.loader_state)
    return restored.state


def _host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _evaluate(cfg: Config, state: TrainState, step: int, out_dir: Path, is_main: bool) -> dict[str, float]:
    """Plays the ``eval`` section's policies with the online parameters; appends each result to
    ``out_dir/eval.jsonl`` and returns the ``eval/<policy>/<field>`` metrics."""
    from jaxrl_lm.eval import evaluate_training_policies, training_metrics  # the envs load only when asked

    results = evaluate_training_policies(cfg, state.params, seed=cfg.train.seed)
    if is_main:
        with (out_dir / "eval.jsonl").open("a") as f:
            for r in results:
                f.write(json.dumps({"step": step, **r}, default=_json_default) + "\n")
        tqdm.write(f"step {step}: " + ", ".join(
            f"{r['policy']['kind']} {r.get('normalized_score', r['mean_return']):.1f}" for r in results))
    return training_metrics(results)


def train(cfg: Config, *, progress: bool = True, episodes: Iterable[Mapping[str, Any]] | None = None,
          resume: bool = False,
          step_hook: Callable[[int, Mapping[str, np.ndarray]], None] | None = None) -> dict:
    """Trains up to ``train.steps`` optimizer steps; returns the last logged metrics (host floats).

    ``episodes`` (dicts in the JSONL episode format) replace ``data.path`` when given (a notebook's data).
    ``resume`` continues from the newest complete checkpoint in ``<train.out_dir>/checkpoints`` (params,
    optimizer state, rng and data position; ``train.steps`` may be raised). With ``eval.every`` set, the
    online policies play ``eval.task`` every that many steps and at the last step (``eval.jsonl``, and
    ``eval/<policy>/<field>`` in metrics.jsonl and TensorBoard; ``train.keep_best_metric`` may name one, and
    then every checkpoint step is evaluated too). ``step_hook(step, batch)`` runs on
    the host after each update with the ``[B, L]`` numpy batch it consumed. A SIGTERM saves a checkpoint at
    the next step boundary and returns early with ``preempted: true``.
    """
    out_dir = Path(cfg.train.out_dir)
    is_main = distributed.initialize(cfg).is_main
    if cfg.eval.every and jax.process_count() > 1:
        raise ConfigError("eval.every: evaluation during training runs in a single process; set eval.every=0 and "
                          "evaluate the checkpoints with scripts/evaluate.py")
    rank_by_eval = cfg.train.keep_best_metric.startswith("eval/")
    if rank_by_eval and not cfg.eval.every:
        raise ConfigError(f"train.keep_best_metric {cfg.train.keep_best_metric!r} is an evaluation metric: set "
                          f"eval.every")
    start = resume_step(cfg, resume)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))

    tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    check_vocab(cfg, tokenizer)
    loader = data.make_loader(cfg.data, tokenizer=tokenizer, episodes=episodes,
                              process_index=jax.process_index(), process_count=jax.process_count())
    par = setup_parallelism(cfg)
    if is_main:
        tqdm.write(par.summary())
    # Fresh and restored states both land on par.state_sharding, so that a resumed run compiles (and runs) the
    # very program an uninterrupted one does.
    if start is None:
        state = init_sharded_state(cfg, par)
    else:
        state = _restore(cfg, start, par.abstract_state, loader)
    update = make_update(cfg, model_graphdef(cfg.model), state_sharding=par.state_sharding,
                         batch_sharding=par.batch_sharding)
    log = MetricsLog(out_dir, is_main)
    capacity = decision_capacity(cfg.rl, cfg.data.seq_len)
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(cfg), cfg.train)
    every = cfg.train.checkpoint_every

    first = 1 if start is None else start + 1
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    bar = tqdm(total=cfg.train.steps, initial=first - 1, disable=not (progress and is_main), unit="step",
               dynamic_ncols=True)
    last: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    preempted = False
    window_start, window_steps = time.perf_counter(), 0
    notice = checkpoint.PreemptionNotice().install()
    try:
        for step in range(first, cfg.train.steps + 1):
            batch = next(loader)
            state, metrics = update(state, place_batch(batch, par.mesh))
            window_steps += 1
            bar.update(1)
            if step_hook is not None:
                step_hook(step, batch)
            preempted = notice.reached(step)
            saving = preempted or step == cfg.train.steps or bool(every and step % every == 0)
            evaluated: dict[str, float] = {}
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps or (saving and rank_by_eval)):
                evaluated = last_eval = _evaluate(cfg, state, step, out_dir, is_main)
                log.write(step, evaluated)
            if saving:
                checkpoint.save(manager, step, state, loader_state=loader.get_state(), cfg=cfg,
                                metrics={**_host_metrics(metrics), **evaluated})
            if preempted:
                if is_main:
                    tqdm.write(f"SIGTERM: saved the checkpoint of step {step} in {manager.directory}; "
                               f"stopping (continue with --resume)")
                break
            if step % cfg.train.log_every and step != cfg.train.steps:
                continue
            last = _host_metrics(metrics)
            elapsed = time.perf_counter() - window_start
            last["tokens_per_s"] = window_steps * tokens_per_step / elapsed
            window_start, window_steps = time.perf_counter(), 0
            if last["decisions_dropped"] > 0:
                raise RuntimeError(
                    f"step {step}: {int(last['decisions_dropped'])} decision positions did not fit the "
                    f"{capacity} head slots per row; raise rl.decision_fraction (now {cfg.rl.decision_fraction})"
                )
            log.write(step, last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", q=f"{last['q_mean']:.3f}",
                            tok_s=f"{last['tokens_per_s']:.0f}", refresh=False)
    finally:
        bar.close()
        log.close()
        loader.close()
        manager.close()  # waits for the last asynchronous save
        notice.uninstall()
    final = {**last, **last_eval, "step": int(state.step), "skipped": int(state.skipped), "preempted": preempted,
             "resumed_from": start, "data": loader.summary}
    if is_main:
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2, default=_json_default))
    return final


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train a token-level Q-learning agent.")
    ap.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: the built-in demo)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest complete checkpoint in <train.out_dir>/checkpoints")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=4 rl.backup=max")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    final = train(cfg, progress=not args.no_progress, resume=args.resume)
    summary = {k: final[k] for k in ("step", "skipped", "preempted", "loss", "q_mean", "v_mean", "tokens_per_s")
               if k in final}
    if jax.process_index() == 0:
        print(json.dumps(summary))
        print(f"wrote {cfg.train.out_dir}/final_metrics.json")
