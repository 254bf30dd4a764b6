"""Online RL: the run plays its task with its own policy, keeps the episodes in a replay buffer and learns from it.

    python scripts/train.py --config configs/online/maze_po.yaml              # online from scratch
    python scripts/train.py --config ... train.init_from=runs/maze_po_ilql online.offline_fraction=0.25

``OnlineData(cfg, tokenizer)`` is both the training loop's batch source (``train(..., source=...)``: batches drawn
from a ``data.ReplayBuffer`` and, at ``online.offline_fraction``, from the offline dataset) and the owner of the
loop hooks that fill the buffer (``hooks()``). Every objective of the engine trains online this way: the update
is the offline one, only the batches differ. ``jaxrl_lm.experiments.run`` wires it in when ``online.enabled``.

Rounds. A round plays ``online.envs`` episodes together (``envs.run_policy``: one batched decode per env step)
with a policy of the run's online parameters (``online.policy``, ``temperature``, ``best_of``, ``beta``; with
``epsilon``, each turn is instead sampled from the LM head at temperature 1 with that probability). Round 0 is
played before the first update. Then at every ``online.updates_per_round``-th step ``s``:
  - ``online.overlap: false``: a round is played with the parameters after step ``s`` and joins the buffer;
  - ``online.overlap: true``: the round in flight (started at the previous boundary) joins the buffer, and the
    next round starts in a background thread with a copy of the parameters after step ``s``, so the updates
    that follow run while Python steps the environments (a bounded queue of one round: the loop waits for a
    round only if the updates get a whole round ahead).
Round ``r`` depends only on its parameters, ``r`` and the seeds (``online.seed``, ``train.seed``, the process), not
on timing, so both modes are deterministic; a checkpoint waits for the round in flight and saves its episodes
as pending with the buffer, the sampler and the round counter: a resumed online run continues exactly.

Metrics (TensorBoard / metrics.jsonl at each round; the progress bar shows episodes and return):
``online/episodes`` (played and in the buffer), ``online/return`` and ``online/score`` (the round's mean return,
normalised), ``online/buffer`` (windows held), ``online/episodes_per_s`` (the collector's own speed),
``online/offline_share`` (of the episodes drawn so far).
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from jaxrl_lm import data, envs
from jaxrl_lm.config import Config, ConfigError, online_task
from jaxrl_lm.data.convert import tokenize_episodes
from jaxrl_lm.data.episodes import EpisodeRecord, iter_episodes, memory_records
from jaxrl_lm.data.replay import ReplayBuffer, ReplayLoader
from jaxrl_lm.data.stats import DataStats
from jaxrl_lm.envs.tasks import TaskSpec, get_task
from jaxrl_lm.eval import load_task_stats
from jaxrl_lm.model_policy import ModelPolicy, load_policy
from jaxrl_lm.models import Params
from jaxrl_lm.train.loop import Hook, StepContext

SEED_RANGE = 2**31 - 1


class EpsilonPolicy:
    """``act(transcripts)``: each transcript's turn from ``explore`` with probability ``epsilon`` (drawn from
    ``rng``), else from ``policy``; each policy decodes only its own transcripts, in one batch."""

    def __init__(self, policy: ModelPolicy, explore: ModelPolicy, epsilon: float, rng: np.random.Generator):
        self.policy, self.explore, self.epsilon, self.rng = policy, explore, epsilon, rng

    def __call__(self, transcripts: list[str]) -> list[str]:
        explored = self.rng.random(len(transcripts)) < self.epsilon
        actions: list[str] = [""] * len(transcripts)
        for act, rows in ((self.policy, np.flatnonzero(~explored)), (self.explore, np.flatnonzero(explored))):
            for i, action in zip(rows, act([transcripts[i] for i in rows])):
                actions[i] = action
        return actions


def round_rng(cfg: Config, round_index: int) -> np.random.Generator:
    """The generator of round ``round_index``'s env starts and decoding keys (this process's)."""
    return np.random.default_rng([cfg.online.seed, cfg.train.seed, jax.process_index(), 1, round_index])


def collection_policy(cfg: Config, params: Params, spec: TaskSpec, rng: np.random.Generator) -> Callable:
    """The policy a round plays (``online.policy`` and its knobs; ``online.epsilon`` mixes in LM-head turns)."""
    o = cfg.online
    common = dict(cfg=cfg, max_new_tokens=o.max_new_tokens, max_turns=spec.context_turns)
    policy = load_policy(params, o.policy, beta=o.beta, temperature=o.temperature, best_of=o.best_of,
                         seed=int(rng.integers(SEED_RANGE)), **common)
    if o.epsilon == 0:
        return policy
    explore = load_policy(params, "bc", temperature=1.0, seed=int(rng.integers(SEED_RANGE)), **common)
    return EpsilonPolicy(policy, explore, o.epsilon, rng)


def play_round(cfg: Config, params: Params, round_index: int) -> tuple[list[EpisodeRecord], float]:
    """``(episode records, seconds)`` of round ``round_index`` played with ``params`` (module docstring)."""
    o = cfg.online
    spec = get_task(online_task(cfg))
    rng = round_rng(cfg, round_index)
    starts = rng.integers(0, SEED_RANGE, size=o.envs).tolist()
    act = collection_policy(cfg, params, spec, rng)
    t0 = time.perf_counter()
    records = envs.run_policy(spec, act, starts, o.max_steps or spec.eval_steps, batch_size=o.envs)
    for record in records:
        record["meta"]["round"] = round_index
    return records, time.perf_counter() - t0


def _copy_params(params: Params) -> Params:
    # A device copy the next update cannot donate away (the loop donates the state it hands to the hooks).
    return jax.tree.map(lambda x: x.copy(), params)


class OnlineData:
    """The online run's batch source and collection hooks (module docstring).

    Args:
      cfg: ``online`` (what to play, how, the buffer), ``data`` (``seq_len``, ``batch_size``, ``pack``,
        ``truncate_side``, and ``path`` for the offline share).
      tokenizer: the run's (``data.tokenizer``).
      offline_episodes: the offline episodes to mix in (else ``data.path`` is read), used when
        ``online.offline_fraction > 0``.
    """

    def __init__(self, cfg: Config, tokenizer: data.Tokenizer, *,
                 offline_episodes: Optional[Sequence[Mapping[str, Any]]] = None):
        o = cfg.online
        if not o.enabled:
            raise ConfigError("OnlineData: online.enabled is false")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.task = online_task(cfg)
        self.spec = get_task(self.task)  # an unknown task fails here, before any compile
        self.task_stats = load_task_stats(self.task, cfg) if cfg.data.path == f"task:{self.task}" else None
        rows = cfg.data.batch_size // jax.process_count()
        offline, summary = None, {}
        if o.offline_fraction > 0:
            source, summary = data.load_source(cfg.data, tokenizer, offline_episodes)
            offline = [source[i] for i in range(jax.process_index(), len(source), jax.process_count())]
        buffer = ReplayBuffer(o.capacity, cfg.data.seq_len, tokenizer.pad_id)
        sampler_seed = int(np.random.default_rng([o.seed, cfg.train.seed, jax.process_index(), 0])
                           .integers(SEED_RANGE))
        self.loader = ReplayLoader(buffer, rows=rows, pack=cfg.data.pack, seed=sampler_seed, offline=offline,
                                   offline_fraction=o.offline_fraction, recency_half_life=o.recency_half_life,
                                   imitate=o.imitate)
        self.summary = {"online": True, "task": self.task, "offline": summary}
        self.rounds = 0  # rounds started
        self.episodes = 0  # episodes in the buffer (or evicted from it)
        self.pending: list[EpisodeRecord] = []  # played, not yet in the buffer (a restored round in flight)
        self.pending_seconds = 0.0  # the time it took to play them
        self.stats = DataStats()
        self._inflight: Optional[concurrent.futures.Future] = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "online-collector") if o.overlap else None

    # ------------------------------------------------------------------ the loop's batch source

    def __iter__(self) -> "OnlineData":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self.loader)

    def get_state(self) -> dict[str, Any]:
        """JSON-able; waits for the round in flight, whose episodes are saved as pending (module docstring)."""
        self._settle()
        return {"replay": self.loader.get_state(), "rounds": self.rounds, "episodes": self.episodes,
                "pending": self.pending, "pending_seconds": self.pending_seconds, "task": self.task}

    def get_arrays(self) -> dict[str, np.ndarray]:
        return self.loader.get_arrays()

    def set_state(self, state: Mapping[str, Any], arrays: Optional[Mapping[str, np.ndarray]] = None) -> None:
        if "replay" not in state:
            raise ConfigError("this checkpoint was written by an offline run (its data state has no replay "
                              "buffer): an online run cannot resume it; start one with train.init_from instead")
        if state["task"] != self.task:
            raise ConfigError(f"the checkpoint's online run played {state['task']!r}, this one plays {self.task!r}")
        self.loader.set_state(state["replay"], arrays)
        self.rounds, self.episodes = int(state["rounds"]), int(state["episodes"])
        self.pending, self.pending_seconds = list(state["pending"]), float(state["pending_seconds"])

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ collection

    def hooks(self) -> list[Hook]:
        """The round before the first update (fresh runs) and a round every ``online.updates_per_round`` steps."""
        shown = ("online/episodes", "online/return")
        return [Hook(self._start, at_start=True, at_end=False),
                Hook(self._round, every=self.cfg.online.updates_per_round, at_end=False, postfix=shown)]

    def _settle(self) -> None:
        """The round in flight, if any, becomes pending."""
        if self._inflight is not None:
            records, seconds = self._inflight.result()
            self._inflight = None
            self.pending += records
            self.pending_seconds += seconds

    def _insert(self, records: list[EpisodeRecord], seconds: float) -> dict[str, float]:
        """Tokenizes ``records`` with the offline pipeline's code and adds their windows to the buffer."""
        cfg = self.cfg
        parsed = iter_episodes(memory_records(records))
        windows = [w.arrays for w in tokenize_episodes(parsed, self.tokenizer, seq_len=cfg.data.seq_len,
                                                       truncate_side=cfg.data.truncate_side, stats=self.stats)]
        self.loader.buffer.add(windows)
        self.episodes += len(records)
        returns = [float(r["meta"]["return"]) for r in records]
        drawn = self.loader.drawn
        metrics = {"online/episodes": float(self.episodes), "online/return": float(np.mean(returns)), "online/buffer": float(self.loader.buffer.size),
                   "online/episodes_per_s": len(records) / max(seconds, 1e-9),
                   "online/offline_share": drawn["offline"] / max(1, drawn["offline"] + drawn["replay"]),
                   "online/windows_left_out": float(len(self.stats.no_decision))}
        if self.task_stats is not None:
            metrics["online/score"] = float(envs.normalize(metrics["online/return"], self.task_stats))
        return metrics

    def _start(self, ctx: StepContext) -> dict[str, float]:
        if ctx.seeds is not None:
            raise ConfigError("online runs train one seed per run (each plays its own episodes); run the seeds "
                              "one after the other")
        if self.rounds:  # resumed: the buffer and the pending round came from the checkpoint
            return {}
        records, seconds = play_round(self.cfg, ctx.state.params, 0)
        self.rounds = 1
        return self._insert(records, seconds)

    def _round(self, ctx: StepContext) -> dict[str, float]:
        if self._executor is None:
            records, seconds = play_round(self.cfg, ctx.state.params, self.rounds)
            self.rounds += 1
            return self._insert(records, seconds)
        self._settle()
        records, seconds = self.pending, self.pending_seconds
        self.pending, self.pending_seconds = [], 0.0
        self._inflight = self._executor.submit(play_round, self.cfg, _copy_params(ctx.state.params), self.rounds)
        self.rounds += 1
        return self._insert(records, seconds) if records else {}
