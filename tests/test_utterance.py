"""The utterance-level MDP (jaxrl_lm/rl/utterance.py) against a plain Python loop written from its docstring."""

import chex
import jax
import numpy as np
import pytest

from jaxrl_lm.rl.utterance import turn_transitions


def random_batch(rng: np.random.Generator, rows: int = 6, length: int = 48) -> dict[str, np.ndarray]:
    """Packed rows of segments made of alternating observation / agent runs; some segments start with an agent
    run (no state before it), some end inside one (a cut window), the rest of a row is padding."""
    seg = np.zeros((rows, length), np.int32)
    act = np.zeros((rows, length), np.int32)
    reward = np.zeros((rows, length), np.float32)
    done = np.zeros((rows, length), np.int32)
    for b in range(rows):
        pos, sid = 0, 1
        while pos < length - 2 and rng.random() < 0.85:
            seg_len = int(rng.integers(2, 20))
            end = min(pos + seg_len, length)
            agent = rng.random() < 0.15  # a segment that opens with an agent run
            i = pos
            while i < end:
                run = int(rng.integers(1, 5))
                if agent:
                    act[b, i:min(i + run, end)] = 1
                    reward[b, i:min(i + run, end)] = rng.normal(size=min(i + run, end) - i) * (rng.random() < 0.5)
                i += run
                agent = not agent
            seg[b, pos:end] = sid
            if act[b, end - 1] and rng.random() < 0.6:
                done[b, end - 1] = 1
            pos, sid = end, sid + 1
    tokens = rng.integers(4, 200, size=(rows, length)).astype(np.int32)
    return {"tokens": tokens, "action_mask": act, "reward": reward, "done": done, "segment_ids": seg,
            "turn_ids": np.zeros_like(seg)}


def reference(batch: dict[str, np.ndarray], gamma: float) -> dict[str, np.ndarray]:
    """One position at a time, straight from the module docstring."""
    seg, act, rew, dn = batch["segment_ids"], batch["action_mask"], batch["reward"], batch["done"]
    rows, length = seg.shape
    out = {k: np.zeros((rows, length), dt) for k, dt in [
        ("turn_end", bool), ("reward", np.float64), ("done", np.float64), ("discount", np.float64),
        ("next_is_turn", bool)]}
    for k in ("state_index", "next_index", "next_turn_end"):
        out[k] = np.tile(np.arange(length), (rows, 1))
    for b in range(rows):
        turns = []  # (first, last) of each agent turn with a state in its segment
        i = 0
        while i < length:
            if seg[b, i] != 0 and act[b, i] == 1:
                j = i
                while j + 1 < length and act[b, j + 1] == 1 and seg[b, j + 1] == seg[b, i]:
                    j += 1
                if i > 0 and seg[b, i - 1] == seg[b, i]:
                    turns.append((i, j))
                i = j + 1
            else:
                i += 1
        for n, (first, last) in enumerate(turns):
            out["turn_end"][b, last] = True
            out["state_index"][b, last] = first - 1
            out["reward"][b, last] = float(np.sum(rew[b, first:last + 1], dtype=np.float64))
            out["done"][b, last] = float(dn[b, last])
            out["discount"][b, last] = gamma
            later = [t for t in turns[n + 1:] if seg[b, t[0]] == seg[b, last]]
            if later:
                out["next_is_turn"][b, last] = True
                out["next_index"][b, last] = later[0][0] - 1
                out["next_turn_end"][b, last] = later[0][1]
            else:
                segment_end = last
                while segment_end + 1 < length and seg[b, segment_end + 1] == seg[b, last]:
                    segment_end += 1
                out["next_index"][b, last] = segment_end
    return out


@pytest.mark.parametrize("seed", range(6))
def test_turn_transitions_match_the_loop_reference(seed):
    batch = random_batch(np.random.default_rng(seed))
    tr = jax.jit(lambda b: turn_transitions(b, gamma=0.9))(batch)
    chex.assert_shape(list(tr), batch["tokens"].shape)
    chex.assert_type([tr.turn_end, tr.next_is_turn], bool)
    chex.assert_type([tr.state_index, tr.next_index, tr.next_turn_end], np.int32)
    chex.assert_type([tr.reward, tr.done, tr.discount], np.float32)
    ref = reference(batch, 0.9)
    assert ref["turn_end"].any() and ref["next_is_turn"].any() and (ref["turn_end"] & ~ref["next_is_turn"]).any()
    for name, expected in ref.items():
        np.testing.assert_allclose(np.asarray(getattr(tr, name)), expected, rtol=1e-6, atol=1e-6, err_msg=name)


def test_a_hand_made_row():
    #        pos:  0    1    2    3    4    5    6    7    8    9   10   11
    #        seg:  1    1    1    1    1    1    1    2    2    2    2    0
    #        act:  0    1    1    0    0    1    1    1    0    1    1    0
    # turns: (1-2) state 0; (5-6) state 4, the segment's last turn; seg 2 opens with an agent token at 7 (no
    # state: not a turn); (9-10) state 8, cut at the segment's end.
    seg = np.array([[1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
    act = np.array([[0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0]], np.int32)
    reward = np.zeros((1, 12), np.float32)
    reward[0, [1, 2, 6, 10]] = [1.0, 2.0, -1.0, 5.0]
    done = np.zeros((1, 12), np.int32)
    done[0, 6] = 1
    batch = {"tokens": np.arange(12, dtype=np.int32)[None], "action_mask": act, "reward": reward, "done": done,
             "segment_ids": seg, "turn_ids": np.zeros_like(seg)}
    tr = turn_transitions(batch, gamma=0.5)
    assert np.flatnonzero(tr.turn_end[0]).tolist() == [2, 6, 10]
    assert [int(tr.state_index[0, e]) for e in (2, 6, 10)] == [0, 4, 8]
    assert [float(tr.reward[0, e]) for e in (2, 6, 10)] == [3.0, -1.0, 5.0]
    assert [float(tr.done[0, e]) for e in (2, 6, 10)] == [0.0, 1.0, 0.0]
    assert [bool(tr.next_is_turn[0, e]) for e in (2, 6, 10)] == [True, False, False]
    assert [int(tr.next_index[0, e]) for e in (2, 6, 10)] == [4, 6, 10]  # o(u+), then segment ends
    assert int(tr.next_turn_end[0, 2]) == 6
