"""Packing, determinism, exact resume, per-process sharding and global arrays of the grain loader."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_lm import envs
from jaxrl_lm.batch import BATCH_FIELDS, check_batch
from jaxrl_lm.config import DataConfig
from jaxrl_lm.data import (
    TOKEN_FIELDS,
    DataStats,
    build_char_tokenizer,
    episodes_to_batch,
    loader_throughput,
    iter_episodes,
    make_loader,
    memory_records,
    packing_efficiency,
    synthetic_episodes,
    to_global_batch,
    tokenize_episodes,
)

TOK = build_char_tokenizer()
EPISODES = synthetic_episodes(40, seed=0)
CFG = DataConfig(seq_len=96, batch_size=4, seed=3)


def _token_episodes(n_tokens: list[int]) -> list[dict]:
    """Episodes whose every field holds a recognisable value: tokens = 10 * (index + 1) + position."""
    out = []
    for i, n in enumerate(n_tokens):
        out.append({"tokens": np.arange(n, dtype=np.int32) + 10 * (i + 1), "action_mask": np.ones(n, np.int32),
                    "reward": np.full(n, i + 1, np.float32), "done": np.eye(1, n, n - 1, dtype=np.int32)[0],
                    "turn_ids": np.arange(n, dtype=np.int32)})
    return out


def _segments(batch) -> list[tuple[int, ...]]:
    """Every packed episode's tokens, row by row, in segment order."""
    out = []
    for row_tokens, row_seg in zip(batch["tokens"], batch["segment_ids"]):
        for s in range(1, int(row_seg.max()) + 1):
            out.append(tuple(row_tokens[row_seg == s].tolist()))
    return out


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in BATCH_FIELDS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_packing_first_fit_segments_and_zero_padding():
    eps = _token_episodes([5, 4, 3, 6])
    batch = episodes_to_batch(eps, 8, pad_id=7)
    check_batch(batch)
    # 5 -> row 0; 4 does not fit the 3 left there -> row 1; 3 fills row 0; 6 fits nowhere -> row 2.
    assert batch["segment_ids"].tolist() == [[1] * 5 + [2] * 3, [1] * 4 + [0] * 4, [1] * 6 + [0] * 2]
    assert batch["tokens"][1].tolist() == [20, 21, 22, 23, 7, 7, 7, 7]
    pad = batch["segment_ids"] == 0
    for k in ("action_mask", "reward", "done", "turn_ids"):
        assert not batch[k][pad].any(), k
    assert packing_efficiency(batch) == pytest.approx(18 / 24)


def test_packing_keeps_every_episode_whole_and_once():
    rng = np.random.default_rng(0)
    eps = _token_episodes(rng.integers(2, 17, size=30).tolist())
    batch = episodes_to_batch(eps, 16)
    assert sorted(_segments(batch)) == sorted(tuple(e["tokens"].tolist()) for e in eps)
    for row_seg, row_done, row_tok in zip(batch["segment_ids"], batch["done"], batch["tokens"]):
        for s in range(1, int(row_seg.max()) + 1):
            idx = np.flatnonzero(row_seg == s)
            assert idx.tolist() == list(range(idx[0], idx[-1] + 1))  # contiguous
            assert row_done[idx].tolist() == [0] * (len(idx) - 1) + [1]  # its fields travelled with it


def test_unpacked_rows_hold_one_episode_each():
    eps = _token_episodes([3, 5])
    batch = episodes_to_batch(eps, 6, pack=False)
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert batch["tokens"][0, :3].tolist() == [10, 11, 12]


def test_loader_batches_follow_the_contract():
    loader = make_loader(CFG, tokenizer=TOK, episodes=EPISODES)
    for batch in _take(loader, 3):
        assert check_batch(batch) == (4, 96)
        assert packing_efficiency(batch) > 0.5
    assert loader.summary["episodes"] == 40 and loader.num_episodes == loader.summary["windows"] >= 40


def test_same_seed_same_batches_other_seed_other_order():
    a = _take(make_loader(CFG, tokenizer=TOK, episodes=EPISODES), 6)
    b = _take(make_loader(CFG, tokenizer=TOK, episodes=EPISODES), 6)
    _assert_same(a, b)
    c = _take(make_loader(DataConfig(seq_len=96, batch_size=4, seed=4), tokenizer=TOK, episodes=EPISODES), 6)
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


@pytest.mark.parametrize("pack", [True, False])
def test_restored_state_continues_exactly(pack):
    cfg = DataConfig(seq_len=96, batch_size=4, seed=3, pack=pack)
    uninterrupted = make_loader(cfg, tokenizer=TOK, episodes=EPISODES)
    _take(uninterrupted, 7)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # the state survives a JSON round trip
    expected = _take(uninterrupted, 15)  # runs past the end of an epoch (40 episodes)
    resumed = make_loader(cfg, tokenizer=TOK, episodes=EPISODES)
    resumed.set_state(state)
    _assert_same(_take(resumed, 15), expected)
    uninterrupted.set_state(state)  # rewinding a running loader (its prefetch thread is active) works too
    _assert_same(_take(uninterrupted, 15), expected)


def test_state_from_other_settings_is_refused():
    state = make_loader(CFG, tokenizer=TOK, episodes=EPISODES).get_state()
    other = make_loader(DataConfig(seq_len=96, batch_size=4, seed=9), tokenizer=TOK, episodes=EPISODES)
    with pytest.raises(ValueError, match="seed=3"):
        other.set_state(state)


def _epoch_segments(cfg, process_index=0, process_count=1):
    loader = make_loader(cfg, tokenizer=TOK, episodes=EPISODES, process_index=process_index,
                         process_count=process_count)
    batches = list(loader)
    for b in batches:
        assert b["tokens"].shape == (cfg.batch_size // process_count, cfg.seq_len)
    return [s for b in batches for s in _segments(b)]


def _all_episode_tokens():
    kept = tokenize_episodes(iter_episodes(memory_records(EPISODES)), TOK, seq_len=96, truncate_side=CFG.truncate_side,
                             stats=DataStats())
    return sorted(tuple(t.arrays["tokens"].tolist()) for t in kept)


def test_one_epoch_sees_every_episode_once_and_pads_the_last_batch():
    cfg = DataConfig(seq_len=96, batch_size=4, seed=3, num_epochs=1)
    assert sorted(_epoch_segments(cfg)) == _all_episode_tokens()


def test_processes_read_disjoint_shares_that_cover_the_data():
    cfg = DataConfig(seq_len=96, batch_size=4, seed=3, num_epochs=1)
    shares = [_epoch_segments(cfg, i, 2) for i in range(2)]
    # As multisets (two windows of different episodes can hold the same tokens): together they are the data
    # exactly once, so they are disjoint and cover it.
    assert sorted(shares[0] + shares[1]) == _all_episode_tokens()


def test_to_global_batch_on_a_mesh_of_the_host_devices():
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data", None))
    local = next(make_loader(DataConfig(seq_len=32, batch_size=8), tokenizer=TOK, episodes=EPISODES))
    glob = to_global_batch(local, sharding)
    for k, v in glob.items():
        assert v.shape == (8, 32) and v.dtype == BATCH_FIELDS[k] and v.sharding == sharding
        assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape == (1, 32)
        np.testing.assert_array_equal(np.asarray(v), local[k])


def test_throughput_figures():
    r = loader_throughput(make_loader(CFG, tokenizer=TOK, episodes=EPISODES), num_batches=5)
    assert r["tokens_per_s"] > 0 and 0 < r["packing_efficiency"] <= 1 and r["batches"] == 5


def test_layout_and_path_errors(tmp_path):
    with pytest.raises(ValueError, match="divisible by the process count"):
        make_loader(DataConfig(batch_size=4), tokenizer=TOK, episodes=EPISODES, process_count=3)
    with pytest.raises(ValueError, match="data.path is empty"):
        make_loader(DataConfig(path=""), tokenizer=TOK)
    with pytest.raises(ValueError, match="unknown built-in task 'nope'"):
        envs.task_dataset(DataConfig(path="task:nope"))  # a task path is resolved above the loader
    with pytest.raises(ValueError, match="names a built-in task"):
        make_loader(DataConfig(path="task:grid"), tokenizer=TOK)
    with pytest.raises(FileNotFoundError, match="data.path"):
        make_loader(DataConfig(path=str(tmp_path / "nope.jsonl")), tokenizer=TOK)
    assert set(TOKEN_FIELDS) | {"segment_ids"} == set(BATCH_FIELDS)


def test_top_return_fraction_keeps_the_best_episodes_for_filtered_bc():
    from jaxrl_lm.data.loader import top_return_episodes
    episodes = list(iter_episodes(memory_records(EPISODES)))
    returns = sorted((ep.episode_return for ep in episodes), reverse=True)
    best = top_return_episodes(episodes, 0.25)
    assert len(best) >= 10 and min(ep.episode_return for ep in best) == returns[9]
    assert [ep.id for ep in best] == [ep.id for ep in episodes if ep.episode_return >= returns[9]]  # order kept
    loader = make_loader(DataConfig(seq_len=96, batch_size=4, top_return_fraction=0.25), tokenizer=TOK,
                         episodes=EPISODES)
    assert loader.summary["episodes"] == len(best)
    assert loader.summary["return"]["min"] == returns[9]
