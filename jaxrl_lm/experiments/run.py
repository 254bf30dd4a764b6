"""A training run from a config, as ``scripts/train.py`` starts it, and its notebook forms.

    python scripts/train.py --config configs/demo.yaml train.steps=500 token_q.backup=max

``run(cfg)`` resolves the data (``data.path: task:NAME`` generates a built-in task's offline episodes here, so
the data pipeline never imports the environments), builds the hooks the config asks for (the evaluation of the
``eval`` section; with ``online.enabled``, the collector's hooks and its replay batches:
``jaxrl_lm.experiments.online``) and calls the one training loop, ``jaxrl_lm.train.loop.train``. ``train_seeds`` is the same for
a stack of seeds without files (a notebook's seed study); ``batches`` is the data alone.

``main`` (the command line) also shows what was learned: on a built-in task it evaluates the ``eval`` section's
policies after the last step (the config's own evaluation when ``eval.every`` is set, else once at the end; not
with ``--no-eval``) and prints them as a table, with where the run's files are.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np

from jaxrl_lm import config as config_lib
from jaxrl_lm import data, distributed, envs
from jaxrl_lm.config import DECODINGS, Config, load_config
from jaxrl_lm.experiments.hooks import Curves, evaluation_hook
from jaxrl_lm.experiments.online import OnlineData
from jaxrl_lm.models import Params
from jaxrl_lm.train.loop import Hook, StepContext, check_vocab, train
from jaxrl_lm.train.seeds import unstack
from jaxrl_lm.train.state import TrainState

Episodes = Iterable[Mapping[str, Any]]


def resolve_episodes(cfg: Config, episodes: Optional[Episodes] = None) -> Optional[Episodes]:
    """``episodes`` as given; else, for ``data.path: task:NAME``, the built-in task's offline dataset
    (``data.task_episodes`` episodes drawn with ``data.seed``); else None (the loader reads ``data.path``)."""
    if episodes is not None or not cfg.data.path.startswith(envs.TASK_PREFIX):
        return episodes
    return envs.task_dataset(cfg.data)


def config_hooks(cfg: Config, *, progress: bool = True, curves: Optional[Curves] = None) -> list[Hook]:
    """The hooks the config asks for: evaluation when ``eval.every`` is set (filling ``curves`` when given)."""
    return [evaluation_hook(cfg, curves, progress=progress)] if cfg.eval.every else []


def run(cfg: Config, *, seeds: Optional[Sequence[int]] = None, hooks: Sequence[Hook] = (),
        episodes: Optional[Episodes] = None, resume: bool = False, progress: bool = True,
        curves: Optional[Curves] = None) -> dict:
    """``train`` with the config's data and evaluation hooks (module docstring), then ``hooks``; returns the
    final metrics (``final_metrics.json``). ``curves`` collects the evaluation's learning curves
    (``jaxrl_lm.experiments.hooks.evaluation_hook``)."""
    # Before anything asks JAX about devices or processes (the checks below, the online collector's seeds):
    # jax.distributed must start before the backend does. train() calls it again, a no-op by then.
    distributed.initialize(cfg)
    if cfg.eval.every and jax.process_count() > 1:
        raise config_lib.ConfigError("eval.every: evaluation during training runs in a single process; set "
                                     "eval.every=0 and evaluate the checkpoints with scripts/evaluate.py")
    if not cfg.online.enabled:
        return train(cfg, seeds=seeds, hooks=[*config_hooks(cfg, progress=progress, curves=curves), *hooks],
                     episodes=resolve_episodes(cfg, episodes), resume=resume, progress=progress)
    if seeds is not None and len(seeds) > 1:
        raise config_lib.ConfigError(f"online.enabled: an online run plays its own episodes, so stacked seeds "
                                     f"{list(seeds)} cannot share batches; train them one after the other")
    if seeds is not None:  # one seed: the run of that train.seed
        cfg, seeds = config_lib.replace(cfg, train__seed=int(seeds[0])), None
    tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    offline = resolve_episodes(cfg, episodes) if cfg.online.offline_fraction > 0 else None
    online = OnlineData(cfg, tokenizer, offline_episodes=offline)
    return train(cfg, seeds=seeds, hooks=[*online.hooks(), *config_hooks(cfg, progress=progress, curves=curves),
                                          *hooks], source=online, resume=resume, progress=progress)


def batches(cfg: Config, episodes: Optional[Episodes] = None, *, steps: Optional[int] = None,
            tokenizer: Optional[data.Tokenizer] = None) -> Iterator[dict[str, np.ndarray]]:
    """Training batches of ``cfg.data``: dicts of numpy ``[data.batch_size, data.seq_len]`` arrays (``jaxrl_lm.batch``).

    Args:
      cfg: ``data`` says where the episodes come from (``data.path``: JSONL, a built dataset directory or
        ``task:NAME``), how they are shuffled (``data.seed``), packed and cut; ``model.vocab_size`` must hold
        the tokenizer's ids.
      episodes: episode dicts in the JSONL format (e.g. ``jaxrl_lm.envs.make_dataset(...)[0]``) used instead
        of ``data.path``.
      steps: stop after this many batches; None = as many as ``data.num_epochs`` gives (0 = forever).
      tokenizer: default ``load_tokenizer(cfg.data.tokenizer)``.

    The loader is built here, so a bad path, episode or vocabulary size fails at this call, not at the first
    batch; it is closed when the iterator is exhausted or discarded. Batches come in the order the training
    loop reads them (the same ``data.seed`` gives the same batches). Single process. Example::

        for batch in jaxrl_lm.batches(cfg, steps=100):
            state, metrics = update(state, batch)
    """
    tokenizer = tokenizer or data.load_tokenizer(cfg.data.tokenizer)
    check_vocab(cfg, tokenizer)
    loader = data.make_loader(cfg.data, tokenizer=tokenizer, episodes=resolve_episodes(cfg, episodes))
    return _take(loader, steps)


def _take(loader: data.Loader, steps: Optional[int]) -> Iterator[dict[str, np.ndarray]]:
    # A generator's finally runs on exhaustion, on close() and when it is garbage collected, so an abandoned
    # notebook loop still stops the loader's prefetch thread.
    try:
        yield from itertools.islice(loader, steps)
    finally:
        loader.close()


@dataclasses.dataclass(frozen=True)
class SeedRuns:
    """What ``train_seeds`` returns.

    Attributes:
      seeds: the ``N`` seeds, in the order of every leading axis below.
      state: the final stacked TrainState (leaves ``[N, ...]``; ``unstack`` it for per-seed states).
      history: ``"step"``: ``[T]`` int64, the steps at which metrics were read; every metric of the update:
        ``[T, N]`` float32.
    """

    seeds: tuple[int, ...]
    state: TrainState
    history: dict[str, np.ndarray]

    @property
    def params(self) -> list[Params]:
        """The ``N`` final online parameter dicts, seed order."""
        return unstack(self.state.params)


class History:
    """A hook's memory of the update's metrics every ``every`` steps and at the last: ``arrays()`` gives
    ``{"step": [T] int64, name: [T] or [T, N]}``. Reading them waits for the device at those steps only."""

    def __init__(self, every: int):
        self.every = every
        self.steps: list[int] = []
        self.rows: list[dict[str, np.ndarray]] = []

    def record(self, ctx: StepContext) -> None:
        self.steps.append(ctx.step)
        self.rows.append(jax.device_get(dict(ctx.metrics)))

    def hook(self) -> Hook:
        return Hook(self.record, every=self.every, at_end=True)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"step": np.asarray(self.steps, np.int64)}
        names = self.rows[0] if self.rows else {}
        out.update({k: np.stack([np.asarray(row[k]) for row in self.rows]) for k in names})
        return out


def train_seeds(cfg: Config, seeds: Sequence[int], steps: Optional[int] = None, *,
                episodes: Optional[Episodes] = None, log_every: Optional[int] = None,
                hooks: Sequence[Hook] = (), progress: bool = False) -> SeedRuns:
    """Trains ``len(seeds)`` seeds of ``cfg`` side by side in one compiled update, every seed on the same batches,
    through the training loop (``train(cfg, seeds=...)``) without writing files.

    Args:
      cfg: the experiment; its data (``data.path`` or ``episodes``) is read by one loader.
      seeds: the ``train.seed`` of each run.
      steps: optimizer steps; default ``train.steps``. Given, it replaces ``train.steps`` (which is also the
        learning-rate schedule's horizon), so seed ``s`` is the run ``scripts/train.py`` would make with
        ``train.seed=s train.steps=steps``, up to float rounding.
      episodes: episode dicts used instead of ``data.path``.
      log_every: metrics are kept every this many steps and at the last; default ``train.log_every``.
      hooks: more loop hooks (e.g. ``jaxrl_lm.experiments.hooks.evaluation_hook``).

    Like every run of the loop it stops on dropped decisions (``rl.decision_fraction``). Example::

        runs = train_seeds(cfg, seeds=range(4), steps=200)
        runs.history["loss"][-1]                          # [4]: each seed's last loss
        scores = [jaxrl_lm.evaluate_params(cfg, p, "grid", kind="ilql")["normalized_score"] for p in runs.params]
    """
    if steps is not None:
        cfg = config_lib.replace(cfg, train__steps=steps)
    history = History(log_every or cfg.train.log_every)
    final: dict[str, TrainState] = {}
    keep_state = Hook(lambda ctx: final.update(state=ctx.state), every=0, at_end=True)  # nothing follows it
    seeds = tuple(int(s) for s in seeds)
    train(cfg, seeds=seeds, hooks=[*hooks, history.hook(), keep_state], episodes=resolve_episodes(cfg, episodes),
          progress=progress, outputs=False)
    return SeedRuns(seeds, final["state"], history.arrays())


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds: expected integers separated by commas, got {text!r}") from None


def final_evaluation(cfg: Config, *, progress: bool = True) -> Hook:
    """The evaluation hook of ``cfg.eval``, run once after the last step (``eval.every`` 0), in a run of one
    process only (evaluation is single-process; ``run`` refuses ``eval.every`` with more, and this hook, which
    learns the process count only once the run has started it, evaluates nothing there)."""
    hook = evaluation_hook(config_lib.replace(cfg, eval__every=0), progress=progress)

    def evaluate(ctx: StepContext) -> Optional[Mapping[str, float]]:
        return hook.fn(ctx) if jax.process_count() == 1 else None

    return dataclasses.replace(hook, fn=evaluate, at_checkpoints=False)  # keep-best needs eval.every


_POLICY_NAMES = {"bc": "bc (imitation: the LM head)", "ilql": "ilql (offline Q-learning)", "q": "q (argmax Q)",
                 "utterance": "utterance (best turn by Q)", "actor": "actor"}


def evaluation_table(cfg: Config, final: Mapping[str, Any]) -> str:
    """The run's last evaluation (``final``'s ``eval/<policy>/<decoding>/<field>`` metrics, the mean over seeds for
    a stack) as a Markdown table, a row per policy and decoding: normalised score, success rate, mean return; then
    each policy's margin over BC's better decoding (a method beats imitation only if it beats both); "" when
    nothing was evaluated."""
    rows = [(k, d) for k in cfg.eval.policies for d in DECODINGS if f"eval/{k}/{d}/mean_return" in final]
    if not rows:
        return ""
    e = cfg.eval
    episodes = f"{e.episodes} episodes" if e.episodes else "every start once"
    seeds = f", mean of seeds {final['seeds']}" if final.get("seeds") else ""
    lines = [f"{config_lib.eval_task(cfg)} after {final['step']} steps ({episodes}{seeds}; ILQL beta {e.beta:g}; "
             f"sampled at T={e.temperature:g}; normalised: 0 = worst, 50 = the data's behaviour, 100 = optimal):",
             "| policy | decoding | normalised score | success rate | mean return |", "|---|---|---|---|---|"]
    for k, d in rows:
        score = final.get(f"eval/{k}/{d}/normalized_score")
        lines.append(f"| {_POLICY_NAMES.get(k, k)} | {d} | {'-' if score is None else f'{score:.1f}'} | "
                     f"{final[f'eval/{k}/{d}/success_rate']:.0%} | {final[f'eval/{k}/{d}/mean_return']:.2f} |")
    if "bc" in cfg.eval.policies and "eval/bc/mean_return" in final:
        field = "normalized_score" if "eval/bc/normalized_score" in final else "mean_return"
        bc = final[f"eval/bc/{field}"]
        bc_decoding = "greedy" if final.get("eval/bc/best_is_greedy") else "sampled"
        margins = [f"{k} {d} {final[f'eval/{k}/{d}/{field}'] - bc:+.1f}" for k, d in rows if k != "bc"]
        if margins:
            lines.append(f"Against BC's better decoding ({bc_decoding}, {bc:.1f}): {', '.join(margins)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train an agent with value-based RL (the config's objective).")
    ap.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: the built-in demo)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--no-eval", action="store_true",
                    help="no evaluation after the last step (by default a run on a built-in task evaluates the "
                         "eval section's policies there and prints the table)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the newest complete checkpoint in <train.out_dir>/checkpoints")
    ap.add_argument("--seeds", type=_seed_list, default=None, metavar="S,S,...",
                    help="train these train.seed values side by side in one compiled update, e.g. 0,1,2")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layers=4 token_q.backup=max")
    args = ap.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    evaluate_at_end = not (args.no_eval or cfg.eval.every or not config_lib.eval_task(cfg))
    hooks = [final_evaluation(cfg, progress=not args.no_progress)] if evaluate_at_end else []
    final = run(cfg, seeds=args.seeds, hooks=hooks, progress=not args.no_progress, resume=args.resume)
    summary = {k: final[k] for k in ("step", "skipped", "preempted", "loss", "q_mean", "v_mean", "tokens_per_s")
               if k in final}
    if jax.process_index() == 0:
        print(json.dumps(summary))
        table = "" if final["preempted"] else evaluation_table(cfg, final)
        if table:
            print(table)
        out = cfg.train.out_dir
        print(f"wrote {out}/: final_metrics.json, metrics.jsonl (the training curves: a line per "
              f"{cfg.train.log_every} steps){', eval.jsonl (every evaluated policy)' if table else ''}, "
              f"TensorBoard scalars (tensorboard --logdir {out}), checkpoints/, config.yaml")
