"""Tokenizers and the token layout, checked against hand-written arrays (jaxrl_lm/data/convert.py docstring)."""

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from jaxrl_lm.data import (
    DataStats,
    build_char_tokenizer,
    load_tokenizer,
    parse_episode,
    tokenize_episode,
    tokenize_episode_windows,
    tokenize_episodes,
)

TOK = build_char_tokenizer()
BOS, EOT = 1, 3


def ids(text: str) -> list[int]:
    return [4 + b for b in text.encode()]  # the built-in tokenizer: id = 4 + byte


EPISODE = parse_episode({"id": "hand", "done": True, "turns": [
    {"role": "observation", "text": "ab"},
    {"role": "action", "text": "c", "reward": 2.0},
    {"role": "observation", "text": "d"},
    {"role": "action", "text": "ef", "reward": -1.0},
]})
# pos:              0    1..2       3    4         5    6         7    8..9        10
FULL_TOKENS = [BOS, *ids("ab"), EOT, *ids("c"), EOT, *ids("d"), EOT, *ids("ef"), EOT]
FULL = {
    "tokens": FULL_TOKENS,
    "action_mask": [0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1],
    "reward": [0, 0, 0, 0, 0, 2.0, 0, 0, 0, 0, -1.0],
    "done": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    "turn_ids": [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 3],
}


def _assert_arrays(arrays, expected):
    assert set(arrays) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(arrays[k], np.asarray(v, dtype=arrays[k].dtype), err_msg=k)
    assert arrays["tokens"].dtype == np.int32 and arrays["reward"].dtype == np.float32


def test_char_tokenizer_round_trips_bytes_and_never_emits_specials_for_text():
    text = "héllo\n<eot><bos>"
    enc = TOK.encode_batch([text])[0]
    assert enc.tolist() == ids(text) and TOK.decode(enc) == text
    assert not set(enc.tolist()) & {TOK.bos_id, TOK.eos_id, TOK.eot_id, TOK.pad_id}
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id, TOK.eot_id, TOK.vocab_size) == (0, 1, 2, 3, 260)


@pytest.mark.parametrize("as_dir", [False, True])
def test_char_tokenizer_saves_and_loads_back(tmp_path, as_dir):
    saved = TOK.save(tmp_path if as_dir else tmp_path / "tokenizer.json")
    loaded = load_tokenizer(saved.parent if as_dir else saved)
    assert loaded.fingerprint == TOK.fingerprint
    assert (loaded.bos_id, loaded.eot_id, loaded.pad_id) == (TOK.bos_id, TOK.eot_id, TOK.pad_id)
    assert loaded.encode_batch(["a<eot>"])[0].tolist() == ids("a<eot>")
    assert load_tokenizer("").fingerprint == TOK.fingerprint


def _trained_bpe(special: list[str]) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["go north", "you are at the door", "open the door"] * 20, trainer)
    return tok


def test_gpt2_style_file_uses_endoftext_for_every_role(tmp_path):
    _trained_bpe(["<|endoftext|>"]).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    eot = tok.backend.token_to_id("<|endoftext|>")
    assert tok.bos_id == tok.eos_id == tok.eot_id == tok.pad_id == eot
    assert eot not in tok.encode_batch(["go<|endoftext|>"])[0].tolist()


def test_hf_directory_declared_specials_win(tmp_path):
    from transformers import PreTrainedTokenizerFast

    backend = _trained_bpe(["<s>", "</s>", "<pad>", "<|im_end|>"])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    vocab = tok.backend.get_vocab()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (
        vocab["<s>"], vocab["</s>"], vocab["<pad>"], vocab["<|im_end|>"])


def test_tokenizer_errors_name_what_is_missing(tmp_path):
    _trained_bpe([]).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no BOS token"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        load_tokenizer(tmp_path / "missing.json")


def test_layout_of_hand_written_episode():
    tok = tokenize_episode(EPISODE, TOK, seq_len=64, truncate_side="left")
    _assert_arrays(tok.arrays, FULL)
    assert not tok.truncated and tok.terminal and tok.episode_return == 1.0 and tok.has_decision


def test_not_done_episode_has_no_done_flag():
    ep = parse_episode({"id": "cut", "done": False, "turns": [{"role": "action", "text": "c", "reward": 1.0}]})
    arrays = tokenize_episode(ep, TOK, seq_len=64, truncate_side="left").arrays
    _assert_arrays(arrays, {"tokens": [BOS, *ids("c"), EOT], "action_mask": [0, 1, 1], "reward": [0, 0, 1.0],
                            "done": [0, 0, 0], "turn_ids": [0, 0, 0]})


def test_right_truncation_keeps_the_start_and_is_never_terminal():
    tok = tokenize_episode(EPISODE, TOK, seq_len=7, truncate_side="right")
    _assert_arrays(tok.arrays, {k: v[:7] for k, v in FULL.items()} | {"done": [0] * 7})
    assert tok.truncated


def test_right_truncation_drops_the_reward_of_a_turn_it_cuts():
    tok = tokenize_episode(EPISODE, TOK, seq_len=10, truncate_side="right")  # cuts turn 3 before its EOT
    assert tok.arrays["reward"].tolist() == [0, 0, 0, 0, 0, 2.0, 0, 0, 0, 0]


def test_left_truncation_keeps_bos_and_the_end_and_is_never_terminal():
    tok = tokenize_episode(EPISODE, TOK, seq_len=7, truncate_side="left")
    _assert_arrays(tok.arrays, {
        "tokens": [BOS, EOT, *ids("d"), EOT, *ids("ef"), EOT],
        "action_mask": [0, 1, 0, 0, 1, 1, 1],
        "reward": [0, 2.0, 0, 0, 0, 0, -1.0],
        "done": [0] * 7,
        "turn_ids": [1, 1, 2, 2, 3, 3, 3],  # BOS takes the turn of the first kept token
    })
    assert tok.truncated


def test_episode_without_decision_is_counted_not_dropped_silently():
    ep = parse_episode({"id": "long-obs", "done": True, "turns": [
        {"role": "observation", "text": "x" * 20}, {"role": "action", "text": "y", "reward": 1.0}]}, path="f", line=4)
    stats = DataStats()
    kept = list(tokenize_episodes([EPISODE, ep], TOK, seq_len=8, truncate_side="right", stats=stats))
    assert [t.id for t in kept] == ["hand"]
    assert len(stats.no_decision) == 1 and stats.no_decision[0].startswith("f:4: id 'long-obs'")
    summary = stats.summary()
    assert summary["episodes"] == 1 and summary["no_decision"] == 1 and summary["truncated"] == 1
    assert summary["tokens"] == 8 and summary["action_token_fraction"] == pytest.approx(2 / 8)


LONG = parse_episode({"id": "long", "done": True, "turns": [
    {"role": "observation", "text": "o0"}, {"role": "action", "text": "a0", "reward": -1.0},
    {"role": "observation", "text": "o1"}, {"role": "action", "text": "a1", "reward": -2.0},
    {"role": "observation", "text": "o2"}, {"role": "action", "text": "a2", "reward": 0.0},
]})  # 3 tokens a turn with its EOT: 19 tokens in all


def test_split_windows_overlap_by_one_observation_and_lose_no_action():
    windows = tokenize_episode_windows(LONG, TOK, seq_len=11, truncate_side="split")
    # [BOS] o0 a0 o1 (10 tokens; o0 a0 o1 a1 would be 13) | [BOS] o1 a1 o2 | [BOS] o2 a2 (7 tokens, the end)
    assert [w.id for w in windows] == ["long", "long/1", "long/2"]
    assert [w.truncated for w in windows] == [True, True, False]
    first, middle, last = (w.arrays for w in windows)
    _assert_arrays(first, {
        "tokens": [BOS, *ids("o0"), EOT, *ids("a0"), EOT, *ids("o1"), EOT],
        "action_mask": [0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        "reward": [0, 0, 0, 0, 0, 0, -1.0, 0, 0, 0],
        "done": [0] * 10,
        "turn_ids": [0, 0, 0, 0, 1, 1, 1, 2, 2, 2],
    })
    assert middle["tokens"].tolist() == [BOS, *ids("o1"), EOT, *ids("a1"), EOT, *ids("o2"), EOT]
    assert middle["turn_ids"].tolist() == [2] * 4 + [3] * 3 + [4] * 3 and not middle["done"].any()
    assert last["tokens"].tolist() == [BOS, *ids("o2"), EOT, *ids("a2"), EOT]
    assert last["done"].tolist() == [0, 0, 0, 0, 0, 0, 1]  # the episode really ended in the last window
    rewards = np.concatenate([w.arrays["reward"] for w in windows])
    assert sorted(rewards[rewards != 0].tolist()) == [-2.0, -1.0]  # each action's reward exactly once
    assert all(len(w.arrays["tokens"]) <= 11 and w.has_decision for w in windows)


def test_split_keeps_a_short_episode_whole_and_is_the_default():
    (whole,) = tokenize_episode_windows(EPISODE, TOK, seq_len=64, truncate_side="split")
    _assert_arrays(whole.arrays, FULL)
    assert not whole.truncated
    from jaxrl_lm.config import DataConfig
    assert DataConfig().truncate_side == "split"


def test_split_window_that_cannot_close_on_an_observation_is_cut_and_counted():
    # seq_len 5: [BOS] o0 a0 is 7 tokens, so turn 0 alone is cut right; the next window starts at o1.
    stats = DataStats()
    kept = list(tokenize_episodes([LONG], TOK, seq_len=5, truncate_side="split", stats=stats))
    assert all(len(w.arrays["tokens"]) <= 5 for w in kept)
    assert len(stats.no_decision) == 3  # o0, o1, o2 windows hold no action token: reported, not lost silently


def test_trained_bpe_keeps_the_special_ids_round_trips_any_text_and_is_deterministic():
    from jaxrl_lm.data import train_bpe_tokenizer

    texts = ["move right", "move left", "goal 8,6 at 1,1 walls up,down"] * 50
    tok = train_bpe_tokenizer(texts, 512)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.eot_id) == (0, 1, 2, 3)
    assert 260 < tok.vocab_size < 512  # stops when no pair repeats
    assert len(tok.encode_batch(["move right"])[0]) == 2  # "move", " right"
    for text in ["move right", "never seen: ü 日本 \t!", "a<eot>b"]:
        ids = tok.encode_batch([text])[0]
        assert tok.decode(ids) == text and not np.isin(ids, [0, 1, 2, 3]).any()
    assert train_bpe_tokenizer(texts, 512).fingerprint == tok.fingerprint
    with pytest.raises(ValueError, match="256 bytes"):
        train_bpe_tokenizer(texts, 100)


def test_shipped_task_tokenizers_are_what_make_tokenizer_writes(tmp_path, monkeypatch):
    from script_loader import load_script

    from jaxrl_lm import envs
    from jaxrl_lm.config import REPO_ROOT

    make_tokenizer = load_script("make_tokenizer")
    for task in ("grid", "maze", "maze_po", "wordle", "twenty_questions"):
        out = tmp_path / f"{task}.json"
        # The shipped tokenizers were trained on the data before issue 21, kept as "legacy" where a task's default
        # data changed (the same texts, other frequencies): the token ids, and so old results, stay as they were.
        legacy = ["--behaviour", "legacy"] if "legacy" in envs.get_task(task).behaviour_names else []
        assert make_tokenizer.main([f"task:{task}", "--out", str(out), *legacy]) == 0
        shipped = REPO_ROOT / "configs" / "tokenizers" / f"{task}.json"
        assert out.read_text() == shipped.read_text(), f"rerun scripts/make_tokenizer.py task:{task} {legacy}"
    monkeypatch.chdir(tmp_path)  # a config's relative tokenizer path is also found from another directory
    assert load_tokenizer("configs/tokenizers/grid.json").vocab_size == 298
    assert make_tokenizer.main(["task:nope", "--out", str(out)]) == 1
