"""Online RL: the replay buffer (eviction, sampling, mixing, packing, state), the collector (its episodes are what the
env produced for the decoded actions; the offline pipeline's tokenization), and the exact resume of an online run."""

import json

import chex
import jax
import numpy as np
import pytest

from jaxrl_lm import envs
from jaxrl_lm.batch import check_batch
from jaxrl_lm.config import ConfigError, load_config
from jaxrl_lm.data import load_source, load_tokenizer
from jaxrl_lm.data.convert import TOKEN_FIELDS
from jaxrl_lm.data.packing import empty_rows
from jaxrl_lm.data.replay import ReplayBuffer, ReplayLoader
from jaxrl_lm.experiments import online as online_lib
from jaxrl_lm.experiments import run as run_lib
from jaxrl_lm.train import checkpoint
from jaxrl_lm.train.state import init_state

SEQ = 16
PAD = 0


def window(marker: int, n: int) -> dict[str, np.ndarray]:
    """A window of ``n`` tokens all equal to ``marker`` (so a batch position tells which window it came from)."""
    out = {k: np.zeros(n, dt) for k, dt in TOKEN_FIELDS.items()}
    out["tokens"][:] = marker
    out["action_mask"][-1] = 1
    out["reward"][-1] = marker / 10
    out["turn_ids"][:] = np.arange(n) // 2
    return out


def filled(capacity: int, lengths) -> ReplayBuffer:
    buffer = ReplayBuffer(capacity, SEQ, PAD)
    buffer.add([window(i + 1, n) for i, n in enumerate(lengths)])
    return buffer


def markers(batch) -> list[int]:
    """The window markers of a batch, in row order then segment order."""
    out = []
    for row_tokens, row_segments in zip(batch["tokens"], batch["segment_ids"]):
        for seg in range(1, row_segments.max() + 1):
            out.append(int(row_tokens[row_segments == seg][0]))
    return out


# ------------------------------------------------------------------------------------------------ buffer


def test_buffer_evicts_the_oldest_window_first():
    buffer = filled(3, [2, 3, 4, 5, 6])  # windows 1..5 into 3 slots
    assert buffer.size == 3 and buffer.inserted == 5
    by_age = [buffer.window(int(s)) for s in buffer.slot_of_age(np.arange(3))]
    assert [int(w["tokens"][0]) for w in by_age] == [5, 4, 3]
    assert [len(w["tokens"]) for w in by_age] == [6, 5, 4]
    np.testing.assert_array_equal(by_age[0]["reward"], window(5, 6)["reward"])
    slot = int(buffer.slot_of_age(np.asarray([0]))[0])  # an evicted slot keeps nothing of the older window
    assert np.all(buffer.fields["tokens"][slot, 6:] == PAD) and np.all(buffer.fields["action_mask"][slot, 6:] == 0)
    with pytest.raises(ValueError, match="1..16"):
        buffer.add([window(9, SEQ + 1)])


def test_recency_weights_match_a_loop():
    buffer = filled(8, [2] * 6)
    for half_life in (0.0, 1.0, 2.5):
        expected = np.array([1.0 if half_life == 0 else 2.0 ** (-age / half_life) for age in range(6)])
        np.testing.assert_allclose(buffer.recency_weights(half_life), expected / expected.sum(), rtol=1e-12)


@pytest.mark.parametrize("half_life", [0.0, 1.5])
def test_draw_frequencies_follow_the_weights(half_life):
    buffer = filled(5, [3] * 5)  # markers 1..5, marker 5 the newest
    loader = ReplayLoader(buffer, rows=4, pack=False, seed=0, recency_half_life=half_life)
    counts = np.zeros(6)
    for _ in range(2000):
        for m in markers(next(loader)):
            counts[m] += 1
    freq = counts[1:][::-1] / counts.sum()  # by age: newest first
    np.testing.assert_allclose(freq, buffer.recency_weights(half_life), atol=0.02)


def test_offline_fraction_mixes_offline_episodes_in():
    buffer = filled(4, [3] * 4)  # markers 1..4
    offline = [window(100 + i, 4) for i in range(10)]
    loader = ReplayLoader(buffer, rows=4, pack=False, seed=1, offline=offline, offline_fraction=0.3)
    drawn = [m for _ in range(1500) for m in markers(next(loader))]
    share = np.mean([m >= 100 for m in drawn])
    assert abs(share - 0.3) < 0.02
    assert loader.drawn["offline"] / sum(loader.drawn.values()) == pytest.approx(share, abs=0.002)
    with pytest.raises(ValueError, match="offline episodes"):
        ReplayLoader(buffer, rows=4, pack=False, seed=1, offline_fraction=0.5)


@pytest.mark.parametrize("pack", [True, False])
def test_imitate_offline_marks_the_offline_episodes_tokens(pack):
    """``imitate="offline"``: every batch carries ``imitate``, 1 on exactly the offline episodes' tokens (markers
    >= 100) and 0 on collected ones and padding; the batches are otherwise those of the unmarked loader."""
    buffer = filled(8, [3, 5, 2, 4, 6, 3, 2, 5])
    offline = [window(100 + i, 3 + i % 4) for i in range(10)]
    marked = ReplayLoader(buffer, rows=3, pack=pack, seed=4, offline=offline, offline_fraction=0.4,
                          imitate="offline")
    plain = ReplayLoader(buffer, rows=3, pack=pack, seed=4, offline=offline, offline_fraction=0.4)
    seen = set()
    for _ in range(30):
        batch, reference = next(marked), next(plain)
        assert set(batch) == set(reference) | {"imitate"}
        for k in reference:
            np.testing.assert_array_equal(batch[k], reference[k])
        check_batch(batch)  # an optional field of the batch contract
        expected = ((batch["tokens"] >= 100) & (batch["segment_ids"] > 0)).astype(np.int32)
        np.testing.assert_array_equal(batch["imitate"], expected)
        seen |= set(np.unique(batch["imitate"][batch["segment_ids"] > 0]).tolist())
    assert seen == {0, 1}  # both sources drawn
    with pytest.raises(ValueError, match="imitate"):
        ReplayLoader(buffer, rows=3, pack=pack, seed=4, imitate="collected")
    with pytest.raises(ValueError, match="imitate.*dtype"):
        check_batch({**batch, "imitate": batch["imitate"].astype(np.float32)})
    with pytest.raises(ValueError, match="unexpected"):
        check_batch({**batch, "source": batch["imitate"]})


def test_empty_buffer_without_offline_data_is_an_error():
    loader = ReplayLoader(ReplayBuffer(4, SEQ, PAD), rows=2, pack=True, seed=0)
    with pytest.raises(ValueError, match="replay buffer is empty"):
        next(loader)


def reference_first_fit(stream, rows):
    """Batches of a stream of windows packed first-fit into ``rows`` bins; a window that fits no bin when all are
    open closes the batch and opens the next (the offline packer's rule). Loop reference."""
    batches, bins = [], []
    for w in stream:
        n = len(w["tokens"])
        for b in bins:
            if SEQ - sum(len(x["tokens"]) for x in b) >= n:
                b.append(w)
                break
        else:
            if len(bins) == rows:
                batches.append(bins)
                bins = []
            bins.append([w])
    out = []
    for bins in batches:
        batch = empty_rows(rows, SEQ, PAD)
        for r, b in enumerate(bins):
            at = 0
            for seg, w in enumerate(b, start=1):
                n = len(w["tokens"])
                for k in TOKEN_FIELDS:
                    batch[k][r, at:at + n] = w[k]
                batch["segment_ids"][r, at:at + n] = seg
                at += n
        out.append(batch)
    return out


def test_packed_batches_are_first_fit_over_the_drawn_stream():
    lengths = [3, 7, 11, 5, 2, 9, 16, 4]
    buffer = filled(8, lengths)
    # The same seed draws the same stream of windows whatever the packing; one row unpacked shows the stream.
    stream_loader = ReplayLoader(buffer, rows=1, pack=False, seed=3)
    stream = [buffer.window(int(buffer.slot_of_age(np.asarray([buffer.inserted - m]))[0]))
              for _ in range(60) for m in markers(next(stream_loader))]
    expected = reference_first_fit(stream, rows=3)
    packed = ReplayLoader(buffer, rows=3, pack=True, seed=3)
    for want in expected[:10]:
        got = next(packed)
        chex.assert_trees_all_equal(dict(got), dict(want))
        chex.assert_shape(list(got.values()), (3, SEQ))


def test_loader_state_round_trip_continues_exactly():
    buffer = filled(6, [3, 7, 11, 5, 2, 9, 8])
    loader = ReplayLoader(buffer, rows=2, pack=True, seed=5, recency_half_life=2.0)
    for _ in range(3):
        next(loader)
    state, arrays = json.loads(json.dumps(loader.get_state())), loader.get_arrays()
    expected = [next(loader) for _ in range(5)]
    restored = ReplayLoader(ReplayBuffer(6, SEQ, PAD), rows=2, pack=True, seed=99, recency_half_life=2.0)
    restored.set_state(state, arrays)
    for want in expected:
        chex.assert_trees_all_equal(dict(next(restored)), dict(want))
    other = ReplayLoader(ReplayBuffer(7, SEQ, PAD), rows=2, pack=True, seed=5)
    with pytest.raises(ValueError, match="capacity=6"):
        other.set_state(state, arrays)
    with pytest.raises(ValueError, match="no replay arrays"):
        ReplayLoader(ReplayBuffer(6, SEQ, PAD), rows=2, pack=True, seed=5).set_state(state)


# ------------------------------------------------------------------------------------------------ collector

TINY = dict(model__d_model=32, model__n_layers=1, data__task_episodes=200, data__batch_size=8, data__seq_len=64,
            optim__schedule="constant", train__checkpoint_every=0, online__enabled=True, online__envs=3,
            online__updates_per_round=2, online__max_new_tokens=6, online__max_steps=5, online__capacity=64)


def tiny_cfg(out_dir="unused", **kw):
    return load_config("configs/demo.yaml", **{**TINY, "train__out_dir": str(out_dir), **kw})


@pytest.fixture(scope="module")
def params():
    return init_state(tiny_cfg()).params


def test_collected_episodes_are_what_the_env_produced(params):
    cfg = tiny_cfg(online__epsilon=0.5)
    records, _ = online_lib.play_round(cfg, params, round_index=4)
    again, _ = online_lib.play_round(cfg, params, round_index=4)
    assert records == again  # a round is a function of its parameters, index and seeds
    assert records != online_lib.play_round(cfg, params, round_index=5)[0]
    assert len(records) == 3
    spec = envs.get_task("grid")
    for record in records:
        env = spec.make_env()
        turns = record["turns"]
        assert env.reset(record["meta"]["seed"]) == turns[0]["text"]
        steps = [(turns[i]["text"], turns[i]["reward"], turns[i + 1]["text"]) for i in range(1, len(turns), 2)]
        assert 1 <= len(steps) <= 5 and record["meta"]["round"] == 4
        for k, (action, reward, observation) in enumerate(steps):
            got_obs, got_reward, done = env.step(action)
            assert (got_obs, got_reward) == (observation, reward)
            assert done == (record["done"] and k == len(steps) - 1)
        assert record["meta"]["return"] == pytest.approx(sum(r for _, r, _ in steps))


def test_the_buffer_holds_the_offline_pipelines_windows(params):
    cfg = tiny_cfg(online__overlap=False)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    collector = online_lib.OnlineData(cfg, tokenizer)
    records, seconds = online_lib.play_round(cfg, params, 0)
    metrics = collector._insert(records, seconds)
    source, _ = load_source(cfg.data, tokenizer, records)
    buffer = collector.loader.buffer
    assert buffer.size == len(source) == metrics["online/buffer"]
    for i, want in enumerate(source):
        got = buffer.window(i)
        for k in TOKEN_FIELDS:
            np.testing.assert_array_equal(got[k], want[k])
    assert metrics["online/episodes"] == 3
    assert metrics["online/return"] == pytest.approx(np.mean([r["meta"]["return"] for r in records]))


def test_online_settings_are_checked():
    with pytest.raises(ConfigError, match="online.policy"):
        tiny_cfg(online__policy="greedy")
    with pytest.raises(ConfigError, match="online.offline_fraction"):
        tiny_cfg(online__offline_fraction=1.5)
    with pytest.raises(ConfigError, match="best_of >= 2"):
        tiny_cfg(online__policy="utterance")
    with pytest.raises(ConfigError, match="online.offline_fraction > 0"):
        tiny_cfg(online__imitate="offline")
    with pytest.raises(ConfigError, match="would ignore the mark"):
        tiny_cfg(online__imitate="offline", online__offline_fraction=0.5, rl__objective="utterance_q")
    with pytest.raises(ConfigError, match="online.imitate"):
        tiny_cfg(online__imitate="replay")
    with pytest.raises(ConfigError, match="stacked seeds"):
        run_lib.run(tiny_cfg(), seeds=[0, 1], progress=False)


# ------------------------------------------------------------------------------------------------ exact resume


def assert_bitwise_equal(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def online_lines(out_dir):
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k != "online/episodes_per_s"} for x in lines
            if "online/episodes" in x]


@pytest.mark.parametrize("overlap", [True, False])
def test_an_online_run_resumes_exactly(tmp_path, compile_once, overlap):
    """A: 6 steps straight. B: 3 steps (its last checkpoint falls inside a round, whose episodes are in flight with
    overlap), then --resume to 6. Same parameters, buffer, sampler and collection, bit for bit."""
    kw = dict(online__overlap=overlap, online__offline_fraction=0.25, online__recency_half_life=8.0)
    final_a = run_lib.run(tiny_cfg(tmp_path / "a", train__steps=6, **kw), progress=False)
    run_lib.run(tiny_cfg(tmp_path / "b", train__steps=3, **kw), progress=False)
    final_b = run_lib.run(tiny_cfg(tmp_path / "b", train__steps=6, **kw), progress=False, resume=True)
    assert final_b["resumed_from"] == 3 and final_a["step"] == final_b["step"] == 6
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    a = checkpoint.restore(tmp_path / "a" / "checkpoints", sharding, 6)
    b = checkpoint.restore(tmp_path / "b" / "checkpoints", sharding, 6)
    assert_bitwise_equal(a.state, b.state)
    assert_bitwise_equal(a.loader_arrays, b.loader_arrays)
    assert {k: v for k, v in a.loader_state.items() if k != "pending_seconds"} == \
        {k: v for k, v in b.loader_state.items() if k != "pending_seconds"}
    # Rounds start before step 1 and at steps 2, 4, 6; with overlap a round joins the buffer one round later, so
    # the last one is pending in the checkpoint.
    assert a.loader_state["episodes"] == 3 * (3 if overlap else 4)
    assert len(a.loader_state["pending"]) == (3 if overlap else 0)
    assert online_lines(tmp_path / "a") == online_lines(tmp_path / "b")
    assert len(online_lines(tmp_path / "a")) == (3 if overlap else 4)


def test_imitate_offline_trains_bc_on_the_offline_share_only(tmp_path, compile_once):
    """Through the run's entry point: with ``online.imitate: offline`` the BC loss of each step is that of the
    offline share (a fraction of the unmarked run's, same first batch), and Q / V still learn from every episode."""
    kw = dict(online__overlap=False, online__offline_fraction=0.5, train__steps=2, train__log_every=1)
    run_lib.run(tiny_cfg(tmp_path / "all", **kw), progress=False)
    run_lib.run(tiny_cfg(tmp_path / "offline", online__imitate="offline", **kw), progress=False)
    first = {}
    for name in ("all", "offline"):
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        first[name] = next(x for x in lines if x.get("step") == 1)
    assert 0 < first["offline"]["bc_loss"] < first["all"]["bc_loss"]
    assert first["offline"]["q_loss"] == pytest.approx(first["all"]["q_loss"], rel=1e-6)
    assert first["offline"]["decisions"] == first["all"]["decisions"]


def test_an_online_run_refuses_an_offline_checkpoint(tmp_path, compile_once):
    run_lib.run(tiny_cfg(tmp_path, train__steps=1, online__enabled=False), progress=False)
    with pytest.raises(ConfigError, match="offline run"):
        run_lib.run(tiny_cfg(tmp_path, train__steps=2), progress=False, resume=True)
