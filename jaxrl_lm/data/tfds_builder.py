"""A TFDS dataset of tokenized episodes in ArrayRecord shards, built from a JSONL file without TensorFlow.

Each record is one episode (``TokenizedEpisode``): the ``TOKEN_FIELDS`` arrays at their own length (packing
happens in the loader), plus ``id``, ``source`` (``file:line``), ``meta`` (JSON text), ``truncated``,
``terminal`` and ``episode_return``. Records keep the JSONL order (shuffling is the loader's job), so record
``i`` is the ``i``-th usable episode, the same element the in-memory path produces.

The dataset's metadata records how it was built (``seq_len``, ``truncate_side``, the tokenizer's fingerprint,
vocabulary size and special ids) and the build statistics, so a loader can refuse a mismatched configuration.

Read it with ``open_dataset(path)``, or directly::

    tfds.builder_from_directory(".../jaxrl_episodes/1.0.0").as_data_source("train")
    tfds.data_source("jaxrl_episodes", data_dir=out_dir, split="train")   # once this module is imported
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from jaxrl_lm.data.convert import TOKEN_FIELDS, tokenize_episodes
from jaxrl_lm.data.episodes import iter_episodes, jsonl_records
from jaxrl_lm.data.stats import DataStats
from jaxrl_lm.data.tokenizer import Tokenizer

SPLIT = "train"


class JaxrlEpisodes(tfds.core.GeneratorBasedBuilder):
    """Tokenized episodes from one JSONL file. Constructor arguments are only needed to generate; reading a
    built directory needs none."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Token layout of jaxrl_lm.data.convert."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # TFDS looks for download checksums beside the builder's source file, and for a class inside a package
        # that lookup imports the optional `importlib_resources`. Nothing is downloaded here: no checksums.
        return None

    def __init__(self, *, jsonl: str | None = None, tokenizer: Tokenizer | None = None, seq_len: int = 0,
                 truncate_side: Literal["split", "left", "right"] = "split", skip_invalid: bool = False,
                 progress: bool = False, **kwargs: Any):
        self._jsonl, self._tokenizer, self._seq_len = jsonl, tokenizer, seq_len
        self._truncate_side, self._skip_invalid, self._progress = truncate_side, skip_invalid, progress
        self.stats = DataStats()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        seq = {k: tfds.features.Tensor(shape=(None,), dtype=dt.type) for k, dt in TOKEN_FIELDS.items()}
        features = tfds.features.FeaturesDict({
            **seq, "id": tfds.features.Text(), "source": tfds.features.Text(), "meta": tfds.features.Text(),
            "truncated": np.bool_, "terminal": np.bool_, "episode_return": np.float32,
        })
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=features,
                                     disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager: Any) -> dict:
        if self._jsonl is None or self._tokenizer is None or self._seq_len < 2:
            raise ValueError("JaxrlEpisodes: generating needs jsonl=, tokenizer= and seq_len>=2 (use build_dataset)")
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        tok = self._tokenizer
        assert tok is not None and self._jsonl is not None
        records = jsonl_records(self._jsonl)
        if self._progress:
            total = sum(1 for _ in jsonl_records(self._jsonl))  # undecoded: a bad byte is reported by its line
            records = tqdm.tqdm(records, total=total, desc=f"episodes from {Path(self._jsonl).name}", unit="ep")
        episodes = iter_episodes(records, skip_invalid=self._skip_invalid, rejected=self.stats.rejected)
        tokenized = tokenize_episodes(episodes, tok, seq_len=self._seq_len, truncate_side=self._truncate_side,
                                      stats=self.stats)
        for i, ep in enumerate(tokenized):
            yield i, {**ep.arrays, "id": ep.id, "source": ep.source, "meta": json.dumps(ep.meta),
                      "truncated": ep.truncated, "terminal": ep.terminal, "episode_return": ep.episode_return}
        if self.stats.episodes == 0:  # said here: TFDS would only report "No examples were yielded"
            first = "; first: " + self.stats.left_out()[0] if self.stats.left_out() else ""
            raise ValueError(f"{self._jsonl}: no usable episode ({len(self.stats.rejected)} rejected lines, "
                             f"{len(self.stats.no_decision)} without a decision position){first}")
        # The info (metadata included) is written after generation, so the final figures land on disk.
        self.info.metadata.update(
            seq_len=self._seq_len, truncate_side=self._truncate_side, source=str(self._jsonl),
            tokenizer={"name": tok.name, "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                       "bos_id": tok.bos_id, "eos_id": tok.eos_id, "eot_id": tok.eot_id, "pad_id": tok.pad_id},
            stats=self.stats.summary())


def build_dataset(jsonl: str | Path, out_dir: str | Path, *, tokenizer: Tokenizer, seq_len: int,
                  truncate_side: Literal["split", "left", "right"] = "split", skip_invalid: bool = False,
                  overwrite: bool = False, progress: bool = False) -> tuple[Path, DataStats]:
    """Builds the dataset under ``out_dir``; returns its directory (``out_dir/jaxrl_episodes/1.0.0``) and stats.

    Strict mode raises ``EpisodeError`` on the first invalid line; no usable episode at all is a ValueError;
    neither leaves a dataset behind. An existing dataset is an error unless ``overwrite``. TFDS's own progress
    bars are turned off (``progress`` shows ours).
    """
    builder = JaxrlEpisodes(jsonl=str(jsonl), tokenizer=tokenizer, seq_len=seq_len, truncate_side=truncate_side,
                            skip_invalid=skip_invalid, progress=progress, data_dir=str(out_dir),
                            file_format="array_record")
    target = Path(builder.data_dir)
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already holds a dataset; pass overwrite=True (--overwrite) to rebuild")
        shutil.rmtree(target)
    tfds.display_progress_bar(False)
    with tempfile.TemporaryDirectory() as downloads:  # TFDS insists on a download dir; nothing is downloaded
        builder.download_and_prepare(download_dir=downloads)
    return target, builder.stats


def find_dataset_dir(path: str | Path) -> Path:
    """The directory holding ``dataset_info.json``: ``path`` itself or its single such descendant."""
    path = Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    found = sorted(p.parent for p in path.glob("**/dataset_info.json"))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({[str(f) for f in found]})"
        raise FileNotFoundError(f"data.path: {path} holds {what} built datasets; name one dataset directory")
    return found[0]


def open_dataset(path: str | Path) -> tuple[Any, dict]:
    """``(data_source, metadata)`` of a built dataset; the source is a random-access sequence of records."""
    builder = tfds.builder_from_directory(str(find_dataset_dir(path)))
    return builder.as_data_source(SPLIT), dict(builder.info.metadata)
