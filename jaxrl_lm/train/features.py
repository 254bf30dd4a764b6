"""Cached trunk features: a frozen trunk bottom's output, computed once per dataset and read back in training.

With ``train.frozen_layers`` the bottom of the trunk never changes, so its output for a token depends only on the
token's episode window (attention and positions stay inside a packed row's segment): it can be computed once, the
windows packed into rows as training packs them, and packed beside the tokens again in any later order. ``data.feature_cache: DIR`` does that: the training loop
builds the cache on its first run (a pass over the data with a progress bar) and every run after reads it, so a
step runs the trained blocks and the heads only (``QTransformer.hidden_from_features``). With ``frozen_layers:
-1`` a step is the heads alone.

Layout of ``DIR``:

    features.bin   [tokens, D] raw little-endian float32 or bfloat16 (``data.feature_dtype``), row ``t`` = the
                   feature of token ordinal ``t`` of the loader's source (records in order, tokens in order)
    meta.json      what the features were computed from (``identity``), their shape and dtype; written last, so
                   a cache whose pass was cut short has none and is rebuilt

Size: ``D * 4`` bytes per token in float32 (``D * 2`` in bfloat16): 2.3 KB per token for SmolLM2-135M
(``D = 576``), so a million tokens take 2.3 GB. It pays when a run takes more steps than the data has rows:
the pass costs one frozen forward per token, a step saves one frozen forward per token of its batch.

Reading is a host gather per batch (``FeatureBatches``) from a memory map, so the cache need not fit in RAM.
Limits: the default objective feed only (an objective that appends tokens to the trunk's input, such as the
utterance critic's sampled turns, needs the frozen blocks for them), offline data only (online episodes are new),
one process, and every seed of a multi-seed run sharing one frozen bottom (as when all start from one pretrained
model); each is an error that says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxrl_lm.batch import BATCH_FIELDS, trunk_inputs
from jaxrl_lm.config import Config, ConfigError
from jaxrl_lm.data.loader import TOKEN_INDEX, IndexedSource
from jaxrl_lm.data.packing import fill_batch, rows_dataset
from jaxrl_lm.models import Params, model_graphdef
from jaxrl_lm.models.partition import Partition
from jaxrl_lm.rl.objective import data_feed, get_objective

log = logging.getLogger(__name__)

FEATURES = "features"  # the batch field: [B, L, D] float32
_STORAGE = {"float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2")}  # bfloat16 is stored as its raw 16 bits
_ROWS = 16  # packed rows per jitted pass of the builder


def check_supported(cfg: Config, *, online: bool, process_count: int) -> None:
    """The settings a cache cannot serve, as ConfigErrors naming the key (module docstring)."""
    where = f"data.feature_cache ({cfg.data.feature_cache})"
    if get_objective(cfg.rl.objective).feed is not data_feed:
        raise ConfigError(f"{where}: rl.objective {cfg.rl.objective!r} adds tokens to the trunk's input inside the "
                          f"step, which the frozen blocks must read; train it without the cache")
    if online:
        raise ConfigError(f"{where}: the batches come from elsewhere than data.path (online.enabled plays new "
                          f"episodes), and they have no cached features; train without the cache")
    if process_count > 1:
        raise ConfigError(f"{where}: the cache is built and read by one process; this run has {process_count}")


def frozen_bottom(cfg: Config, params: Params, seeds: Optional[tuple[int, ...]]) -> Params:
    """The frozen part of one model's parameters (host arrays); a stack of seeds must share it."""
    part = Partition.of(cfg)
    bottom = jax.tree.map(np.asarray, part.split(params if seeds is None else jax.tree.map(lambda x: x[0], params))[1])
    if seeds is not None:
        for i in range(1, len(seeds)):
            other = part.split(jax.tree.map(lambda x: np.asarray(x[i]), params))[1]
            if not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(bottom), jax.tree.leaves(other))):
                raise ConfigError(f"data.feature_cache: seeds {seeds[0]} and {seeds[i]} have different frozen trunk "
                                  f"bottoms (a fresh model per seed); one cache serves one bottom: start every seed "
                                  f"from one model (train.init_from) or train without the cache")
    return bottom


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def identity(cfg: Config, bottom: Params, source: IndexedSource) -> dict[str, Any]:
    """What the features are a function of: the model, the frozen parameters, the trunk's reading of the data
    (``model.context``) and every token of the source. A cache is reused only when all of it matches."""
    model = cfg.model
    return {
        "model": {k: getattr(model, k) for k in ("family", "vocab_size", "d_model", "n_layers", "n_heads",
                                                 "n_kv_heads", "max_seq_len", "dtype", "context")},
        "frozen_layers": cfg.train.frozen_layers,
        "frozen_params": _digest(jax.tree.leaves(bottom)),
        "data": {"records": len(source), "tokens": int(source.offsets[-1]), "seq_len": cfg.data.seq_len,
                 "tokens_sha256": _digest(source.source[i]["tokens"] for i in range(len(source)))},
        "dtype": cfg.data.feature_dtype,
    }


def _mismatch(saved: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _mismatch(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: cached {a!r}, this run {b!r}")
    return out


class FeatureStore:
    """A built cache, memory-mapped. ``gather(token_index [B, L] int32) -> [B, L, D] float32`` (0 on padding)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        tokens, width = self.meta["shape"]
        self._table = np.memmap(self.directory / "features.bin", dtype=_STORAGE[self.meta["identity"]["dtype"]],
                                mode="r", shape=(tokens, width))
        self.width = width

    def gather(self, token_index: np.ndarray) -> np.ndarray:
        index = np.asarray(token_index).reshape(-1)
        out = np.zeros((index.size, self.width), np.float32)
        real = index > 0
        rows = self._table[index[real] - 1]
        if self.meta["identity"]["dtype"] == "bfloat16":
            rows = rows.view(ml_dtypes.bfloat16)
        out[real] = rows.astype(np.float32)
        return out.reshape(*np.shape(token_index), self.width)


def build(cfg: Config, params: Params, source: IndexedSource, directory: str | Path, ident: Mapping[str, Any], *,
          progress: bool = True) -> FeatureStore:
    """Computes every token's feature (``QTransformer.trunk_features`` over the windows packed into rows) into
    ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").unlink(missing_ok=True)  # incomplete until the pass ends
    graphdef, frozen = model_graphdef(cfg.model), Partition.of(cfg).forward_arg
    tokens, width = int(source.offsets[-1]), cfg.model.d_model
    storage = _STORAGE[cfg.data.feature_dtype]
    table = np.memmap(directory / "features.bin", dtype=storage, mode="w+", shape=(tokens, width))

    @jax.jit
    def forward(params, batch):
        model = nnx.merge(graphdef, params)
        return model.trunk_features(batch["tokens"], *trunk_inputs(batch, cfg.model.context), frozen)

    # Windows packed first-fit into rows, as training packs them (a token's feature does not depend on its row);
    # each row's token_index says where its tokens' features go.
    windows = grain.MapDataset.source(source).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    rows = rows_dataset(windows, seq_len=cfg.data.seq_len, rows=_ROWS, pad_id=0, pack=True,
                        extra={TOKEN_INDEX: np.dtype(np.int32)}).batch(_ROWS)
    bar = tqdm(total=tokens, disable=not progress, unit="token", unit_scale=True, desc=f"feature cache {directory}")
    for batch in rows:
        batch = fill_batch(batch, _ROWS, 0)  # one compiled shape
        h = np.asarray(forward(params, {k: jnp.asarray(batch[k]) for k in BATCH_FIELDS}))
        index = batch[TOKEN_INDEX]
        real = index > 0
        values = h[real]
        table[index[real] - 1] = values.astype(ml_dtypes.bfloat16).view(storage) if storage.kind == "u" else values
        bar.update(int(real.sum()))
    bar.close()
    table.flush()
    del table
    meta = {"identity": dict(ident), "shape": [tokens, width]}
    tmp = directory / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, directory / "meta.json")
    return FeatureStore(directory)


def open_or_build(cfg: Config, params: Params, source: IndexedSource, seeds: Optional[tuple[int, ...]], *,
                  progress: bool = True) -> FeatureStore:
    """The cache of ``data.feature_cache`` for this run's frozen bottom and data: read when it matches, built when
    the directory has none (or an unfinished one), refused with the differences when it was built from others."""
    directory = Path(cfg.data.feature_cache)
    bottom = frozen_bottom(cfg, params, seeds)
    ident = identity(cfg, bottom, source)
    if (directory / "meta.json").is_file():
        store = FeatureStore(directory)
        diff = _mismatch(store.meta["identity"], ident)
        if diff:
            raise ConfigError(f"data.feature_cache: {directory} holds the features of other data or parameters ("
                              + "; ".join(diff) + "): point data.feature_cache at a new directory, or delete it")
        log.info("feature cache: %s (%d tokens x %d)", directory, *store.meta["shape"])
        return store
    host_params = jax.tree.map(np.asarray, params if seeds is None else jax.tree.map(lambda x: x[0], params))
    return build(cfg, host_params, source, directory, ident, progress=progress)


class FeatureBatches:
    """A ``BatchSource`` over a loader built with ``token_index=True``: each batch's ``token_index`` becomes
    ``features [B_local, L, D] float32`` from the store. State, summary and closing are the loader's."""

    def __init__(self, loader: Any, store: FeatureStore):
        self.loader, self.store = loader, store
        self.summary = loader.summary

    def __iter__(self) -> "FeatureBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.loader))
        batch[FEATURES] = self.store.gather(batch.pop(TOKEN_INDEX))
        return batch

    def get_state(self) -> dict[str, Any]:
        return self.loader.get_state()

    def set_state(self, state: Mapping[str, Any], *args: Any) -> None:
        self.loader.set_state(state, *args)

    def close(self) -> None:
        self.loader.close()
