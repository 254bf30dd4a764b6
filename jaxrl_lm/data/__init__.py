"""Episodes (JSONL, validated) -> token arrays -> TFDS/ArrayRecord -> grain -> packed, global batches.

    from jaxrl_lm import data
    tok = data.load_tokenizer(cfg.data.tokenizer)
    loader = data.make_loader(cfg.data, tokenizer=tok, process_index=jax.process_index(),
                              process_count=jax.process_count())
    batch = data.to_global_batch(next(loader), batch_sharding)       # dict of [B, L] jax.Arrays
    saved = loader.get_state(); ...; loader.set_state(saved)          # exact resume

The token layout is documented in ``jaxrl_lm.data.convert``; the schema in ``jaxrl_lm.data.episodes``.
"""

from jaxrl_lm.data.convert import TOKEN_FIELDS, TokenizedEpisode, layout, tokenize_episode, tokenize_episode_windows, tokenize_episodes, truncate
from jaxrl_lm.data.episodes import (
    Episode,
    EpisodeRecord,
    EpisodeError,
    Rejection,
    Turn,
    iter_episodes,
    jsonl_records,
    memory_records,
    parse_episode,
    read_jsonl,
    synthetic_episodes,
    write_jsonl,
)
from jaxrl_lm.data.loader import Loader, load_source, loader_throughput, make_loader, to_global_batch
from jaxrl_lm.data.packing import episodes_to_batch, packing_efficiency
from jaxrl_lm.data.stats import DataStats
from jaxrl_lm.data.tfds_builder import JaxrlEpisodes, build_dataset, find_dataset_dir, open_dataset
from jaxrl_lm.data.tokenizer import Tokenizer, build_char_tokenizer, load_tokenizer, save_tokenizer, train_bpe_tokenizer

__all__ = [
    "DataStats", "Episode", "EpisodeError", "EpisodeRecord", "JaxrlEpisodes", "Loader", "Rejection", "TOKEN_FIELDS",
    "Tokenizer", "TokenizedEpisode", "Turn", "build_char_tokenizer", "build_dataset", "episodes_to_batch",
    "find_dataset_dir", "iter_episodes", "jsonl_records", "layout", "load_source", "load_tokenizer", "loader_throughput",
    "make_loader", "memory_records", "open_dataset", "packing_efficiency", "parse_episode", "read_jsonl",
    "save_tokenizer", "synthetic_episodes", "to_global_batch", "tokenize_episode", "tokenize_episode_windows",
    "tokenize_episodes", "train_bpe_tokenizer", "truncate", "write_jsonl",
]
