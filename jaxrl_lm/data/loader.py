"""The training loader: episodes -> shuffled, sharded, repeated, packed ``[B_local, L]`` numpy batches (grain).

Pipeline (one per process)::

    source (in-memory token arrays from JSONL, or a built TFDS dir; same records in the same order)
      -> [process_index::process_count]   each process reads its own disjoint share of the episodes
      -> shuffle(seed)                    global, by index; a different permutation every epoch
      -> repeat(num_epochs or forever)
      -> rows (packed first-fit, or one episode per row)  -> batch of B_local rows -> pad a short last batch

Everything is a deterministic function of the data, the config and the iterator state, so the in-memory and
TFDS paths give identical batches, and a loader restored with ``set_state(get_state())`` continues exactly as
the uninterrupted one would.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping

import grain
import jax
import numpy as np

from jaxrl_lm.batch import BATCH_FIELDS
from jaxrl_lm.config import DataConfig
from jaxrl_lm.data.convert import tokenize_episodes
from jaxrl_lm.data.episodes import Episode, iter_episodes, jsonl_records, memory_records
from jaxrl_lm.data.packing import fill_batch, rows_dataset, select_fields
from jaxrl_lm.data.stats import DataStats
from jaxrl_lm.data.tfds_builder import open_dataset
from jaxrl_lm.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Records are read in the pipeline's own thread: per-record reader threads only add GIL traffic here (decoding
# is Python). Whole batches are prepared ahead in one background thread instead, which overlaps the train step
# (XLA releases the GIL) and keeps get_state exact (each prefetched batch carries its own state).
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_PREFETCH_BATCHES = 2


class Loader:
    """Iterates ``BATCH_FIELDS`` dicts of numpy arrays ``[B_local, L]``; resumable through get/set_state.

    Attributes:
      summary: dataset figures (``DataStats.summary()``: episodes, tokens, rejected, no_decision, ...).
      num_episodes: records in the whole source (all processes): episodes, or their windows when
        ``truncate_side`` is ``"split"``.
      source: the whole source's records, in order (an ``IndexedSource`` with ``make_loader(token_index=True)``).
    """

    def __init__(self, dataset: grain.IterDataset, *, identity: dict[str, Any], summary: dict[str, Any],
                 source: Any = None):
        # The prefetch thread must be stopped before interpreter exit: killed inside native reader code, it
        # aborts the process. finalize runs at garbage collection or at exit, whichever comes first, and it
        # empties the box so the iterator is freed while grain's modules are still alive.
        self._box = [iter(dataset)]
        self._finalizer = weakref.finalize(self, _close_box, self._box)
        self._identity = identity
        self.summary = summary
        self.source = source
        self.num_episodes = int(identity["num_episodes"])

    def __iter__(self) -> "Loader":
        return self

    @property
    def _iter(self) -> grain.DatasetIterator:
        if not self._box:
            raise ValueError("this loader is closed")
        return self._box[0]

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def close(self) -> None:
        """Stops the background prefetch thread; the loader cannot be used afterwards."""
        self._finalizer()

    def get_state(self) -> dict[str, Any]:
        """A JSON-able dict: the grain iterator position plus the settings it is only valid for."""
        return {"identity": dict(self._identity), "iterator": self._iter.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a ``get_state()`` dict; refuses one saved under different data settings."""
        saved = state.get("identity", {})
        for key, value in self._identity.items():
            if saved.get(key) != value:
                raise ValueError(f"loader state was saved with {key}={saved.get(key)!r}, this loader has "
                                 f"{key}={value!r}; resume with the same data config and process layout")
        self._iter.set_state(state["iterator"])


def _close_box(box: list) -> None:
    while box:
        box.pop().close()


def top_return_episodes(episodes: Iterable[Episode], fraction: float) -> list[Episode]:
    """The episodes whose return is at least the ``ceil(fraction * n)``-th highest (filtered BC's data); ties at
    the threshold are all kept, so slightly more than ``fraction`` may pass. Order is preserved."""
    episodes = list(episodes)
    if fraction >= 1.0 or not episodes:
        return episodes
    returns = np.sort([ep.episode_return for ep in episodes])[::-1]
    threshold = returns[max(1, math.ceil(fraction * len(episodes))) - 1]
    return [ep for ep in episodes if ep.episode_return >= threshold]


def _tokenized_source(records: Iterable, cfg: DataConfig, tokenizer: Tokenizer) -> tuple[list, DataStats]:
    stats = DataStats()
    episodes = iter_episodes(records, skip_invalid=cfg.skip_invalid, rejected=stats.rejected)
    if cfg.top_return_fraction < 1.0:
        episodes = top_return_episodes(episodes, cfg.top_return_fraction)
        log.info("data: kept %d episodes with the top %.0f%% of returns (data.top_return_fraction)",
                 len(episodes), 100 * cfg.top_return_fraction)
    tokenized = tokenize_episodes(episodes, tokenizer, seq_len=cfg.seq_len, truncate_side=cfg.truncate_side,
                                  stats=stats)
    source = [ep.arrays for ep in tokenized]
    for line in stats.left_out():
        log.warning("data: %s", line)
    return source, stats


def _check_built(meta: Mapping[str, Any], cfg: DataConfig, tokenizer: Tokenizer, path: str) -> None:
    """A built dataset must match the config and tokenizer the run uses; each mismatch names the key."""
    built_tok = meta.get("tokenizer", {})
    checks = [("data.seq_len", meta.get("seq_len"), cfg.seq_len),
              ("data.truncate_side", meta.get("truncate_side"), cfg.truncate_side),
              ("data.tokenizer", built_tok.get("fingerprint"), tokenizer.fingerprint)]
    for key, built, ours in checks:
        if built != ours:
            hint = f" (built with {built_tok.get('name')!r})" if key == "data.tokenizer" else ""
            raise ValueError(f"{key}: dataset {path} was built with {built!r}{hint}, the run uses {ours!r}; "
                             f"rebuild it with scripts/build_tfds_dataset.py or change {key}")


TASK_PREFIX = "task:"


def load_source(cfg: DataConfig, tokenizer: Tokenizer,
                episodes: Iterable[Mapping | Episode] | None = None) -> tuple[Any, dict[str, Any]]:
    """``(records, summary)``: a random-access sequence of token-array episodes and the dataset figures.

    ``episodes`` (dicts or ``Episode``) take the place of ``cfg.path``; a file path is read as JSONL; a
    directory is a built TFDS dataset, checked against ``cfg`` and ``tokenizer``. A built-in ``task:NAME`` is
    generated by the environments, above this package: its caller passes the episodes
    (``jaxrl_lm.envs.task_dataset``; ``jaxrl_lm.experiments.run`` and ``jaxrl_lm.batches`` do).
    """
    if episodes is not None:
        source, stats = _tokenized_source(memory_records(episodes), cfg, tokenizer)
        where = "the given episodes"
    elif not cfg.path:
        raise ValueError("data.path is empty: give a JSONL file, a built dataset directory or task:NAME")
    elif cfg.path.startswith(TASK_PREFIX):
        raise ValueError(f"data.path {cfg.path!r} names a built-in task, whose episodes the environments generate: "
                         f"pass episodes=jaxrl_lm.envs.task_dataset(cfg.data), or train through "
                         f"jaxrl_lm.experiments.run (scripts/train.py), which does")
    elif Path(cfg.path).is_dir():
        if cfg.top_return_fraction < 1.0:
            raise ValueError(f"data.top_return_fraction ({cfg.top_return_fraction}) filters whole episodes before "
                             f"tokenization; train from the JSONL {cfg.path} was built from, not the built dataset")
        source, meta = open_dataset(cfg.path)
        _check_built(meta, cfg, tokenizer, cfg.path)
        return source, dict(meta.get("stats", {}))
    elif Path(cfg.path).is_file():
        source, stats = _tokenized_source(jsonl_records(cfg.path), cfg, tokenizer)
        where = cfg.path
    else:
        raise FileNotFoundError(f"data.path: {cfg.path} is neither a JSONL file nor a built dataset directory")
    if not source:
        raise ValueError(f"data.path: no usable episode in {where} ({len(stats.rejected)} rejected, "
                         f"{len(stats.no_decision)} without a decision position)")
    return source, stats.summary()


def _check_layout(cfg: DataConfig, process_index: int, process_count: int) -> int:
    """Validates the process layout; returns the rows per process ``B_local``."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size ({cfg.batch_size}) must be divisible by the process count ({process_count})")
    if cfg.num_epochs < 0:
        raise ValueError(f"data.num_epochs must be >= 0 (0 = repeat forever), got {cfg.num_epochs}")
    return cfg.batch_size // process_count


TOKEN_INDEX = "token_index"  # the optional per-token field of make_loader(token_index=True)


class IndexedSource:
    """A loader source whose records also carry ``token_index [n] int32``: 1 + each token's ordinal in the whole
    source (records in order, tokens in order), 0 on padding once packed. A per-token store aligned with the
    source (the frozen trunk's cached features, ``jaxrl_lm.train.features``) is then one gather per batch.

    offsets: ``[len(source) + 1] int64``, record ``i``'s tokens are ordinals ``offsets[i]..offsets[i+1]-1``.
    """

    def __init__(self, source: Any):
        self.source = source
        lengths = np.fromiter((len(source[i]["tokens"]) for i in range(len(source))), np.int64, len(source))
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        record = select_fields(self.source[i])
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        record[TOKEN_INDEX] = np.arange(start + 1, end + 1, dtype=np.int32)
        return record


def make_loader(data_cfg: DataConfig, *, tokenizer: Tokenizer, process_index: int = 0, process_count: int = 1,
                episodes: Iterable[Mapping | Episode] | None = None, token_index: bool = False) -> Loader:
    """The loader of this process: batches ``[data_cfg.batch_size // process_count, data_cfg.seq_len]``.

    Args:
      data_cfg: ``path`` (JSONL or built TFDS dir), ``seq_len``, ``batch_size`` (global), ``pack``, ``shuffle``,
        ``seed``, ``num_epochs`` (0 = forever; a short last batch is padded with empty rows),
        ``truncate_side`` and ``skip_invalid`` (JSONL / in-memory episodes only).
      tokenizer: must be the one a built dataset was made with (checked by fingerprint).
      process_index, process_count: this host's share (``jax.process_index()``, ``jax.process_count()``).
      episodes: in-memory episodes (dicts or ``Episode``) used instead of ``data_cfg.path``.
      token_index: every batch also holds ``token_index [B_local, L] int32`` (``IndexedSource``), and the loader
        its ``source`` (the ``IndexedSource``).
    """
    rows = _check_layout(data_cfg, process_index, process_count)
    source, summary = load_source(data_cfg, tokenizer, episodes)
    if token_index:
        source = IndexedSource(source)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no episode: the dataset has "
                         f"{len(source)}; use fewer processes or more data")
    if data_cfg.shuffle:
        ds = ds.shuffle(seed=data_cfg.seed)
    ds = ds.repeat(data_cfg.num_epochs or None)
    if not token_index:
        ds = ds.map(select_fields)
    rows_ds = rows_dataset(ds.to_iter_dataset(_READ_OPTIONS), seq_len=data_cfg.seq_len, rows=rows,
                           pad_id=tokenizer.pad_id, pack=data_cfg.pack,
                           extra={TOKEN_INDEX: np.dtype(np.int32)} if token_index else None)
    batches = rows_ds.batch(rows).map(functools.partial(fill_batch, rows=rows, pad_id=tokenizer.pad_id))
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=_PREFETCH_BATCHES)
    identity = {"seq_len": data_cfg.seq_len, "rows": rows, "pack": data_cfg.pack, "shuffle": data_cfg.shuffle,
                "seed": data_cfg.seed, "num_epochs": data_cfg.num_epochs, "process_index": process_index,
                "process_count": process_count, "num_episodes": len(source), "pad_id": tokenizer.pad_id}
    return Loader(batches, identity=identity, summary=summary, source=source)


def to_global_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """This process's ``[B_local, L]`` numpy batch -> global ``jax.Array`` s ``[B_local * process_count, L]``
    (every field; an extra one such as ``features [B_local, L, D]`` keeps its trailing axes).

    ``sharding`` is the batch sharding (e.g. ``NamedSharding(mesh, P(("data", "fsdp"), None))``); each process
    passes the rows its loader produced, and together they form the global batch.
    """
    out = {}
    for k in (*BATCH_FIELDS, *(k for k in batch if k not in BATCH_FIELDS)):  # the contract's, then any extra
        local = np.asarray(batch[k])
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def loader_throughput(loader: Loader, num_batches: int = 50) -> dict[str, float]:
    """Times ``num_batches`` batches after one warm-up batch; returns JSON-able figures.

    ``tokens_per_s`` counts every position delivered (``B * L``); ``real_tokens_per_s`` only non-padding ones.
    """
    next(loader)  # thread start-up and the first packing round are not steady state
    positions = real = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(loader)
        positions += batch["tokens"].size
        real += int(np.count_nonzero(batch["segment_ids"]))
    seconds = time.perf_counter() - start
    return {"batches": num_batches, "seconds": seconds, "tokens_per_s": positions / seconds,
            "real_tokens_per_s": real / seconds, "packing_efficiency": real / positions,
            "batches_per_s": num_batches / seconds}
