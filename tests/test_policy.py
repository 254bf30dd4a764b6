"""The policy adapter (transcripts -> prompts -> action texts), load_policy, and evaluation reports."""

import functools
import json

import numpy as np
import pytest

from jaxrl_lm import envs
from jaxrl_lm.config import ModelConfig
from jaxrl_lm.data import build_char_tokenizer, parse_episode, tokenize_episode
from jaxrl_lm.envs.base import Transcript
from jaxrl_lm.eval import eval_seeds, evaluate_params, evaluate_policy, is_success, markdown_table, write_report
from jaxrl_lm.models import build
from jaxrl_lm.model_policy import load_policy, transcript_turns, truncate_left
from jaxrl_lm.models import split_model

CFG = ModelConfig(vocab_size=260, vocab_pad_multiple=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)


@functools.lru_cache(maxsize=None)
def params():
    return split_model(build(CFG, seed=0))[1]


def policy(**kw):
    return load_policy(params(), kw.pop("kind", "ilql"), cfg=CFG, max_new_tokens=kw.pop("max_new_tokens", 8), **kw)


class Recorder:
    """Wraps a policy and keeps every transcript it was asked about."""

    def __init__(self, act):
        self.act, self.seen = act, []

    def __call__(self, transcripts):
        self.seen += list(transcripts)
        return self.act(transcripts)


def test_act_drives_a_grid_rollout_and_prompts_match_the_data_pipeline():
    pol = policy(temperature=1.0, seed=1)
    recorder = Recorder(pol)
    episodes = envs.rollout([envs.make_env("grid") for _ in range(3)], recorder, [0, 5, 9], max_steps=3, task="grid")
    assert len(recorder.seen) == 9 and all(len(e["turns"]) == 7 for e in episodes)
    assert all(isinstance(t["text"], str) for e in episodes for t in e["turns"])
    tok = build_char_tokenizer()
    for ep_index, episode in enumerate(episodes):
        arrays = tokenize_episode(parse_episode(episode), tok, seq_len=10_000, truncate_side="left").arrays
        for step in range(3):
            transcript = recorder.seen[3 * step + ep_index]
            # The prompt is the episode's tokens up to and including the EOT of observation number `step`.
            end = int(np.nonzero(arrays["turn_ids"] == 2 * step)[0][-1]) + 1
            np.testing.assert_array_equal(pol.prompts([transcript])[0], arrays["tokens"][:end])


def test_structured_turns_win_over_the_rendered_string_and_long_prompts_keep_whole_turns():
    turns = [{"role": "observation", "text": "two\nlines"}, {"role": "action", "text": "go 1"},
             {"role": "observation", "text": "at 1"}]
    transcript = Transcript(envs.render_transcript(turns), env=None, index=0)
    assert transcript_turns(transcript) == ["two", "lines", "go 1", "at 1"]  # what a plain string allows
    transcript.turns = turns
    assert transcript_turns(transcript) == ["two\nlines", "go 1", "at 1"]
    with pytest.raises(ValueError, match="render_transcript"):
        transcript_turns("no newline")
    np.testing.assert_array_equal(truncate_left(np.arange(10), 4), [0, 7, 8, 9])
    pol = policy(max_new_tokens=8)
    long = pol.prompts(["at 1\n" * 41])[0]  # 41 turns of 5 tokens; a window starts at an even turn
    assert pol.max_prompt_len == CFG.max_seq_len - 8 and long[0] == pol.tokenizer.bos_id
    assert len(long) == 1 + 5 * ((pol.max_prompt_len - 1) // 5) and long[1:5].tolist() == [4 + b for b in b"at 1"]


def test_plain_strings_greedy_actions_are_deterministic_and_batch_independent():
    pol = policy(kind="bc", temperature=0.0)
    transcripts = ["at 3\n", "at 14\ngo 15\nat 15\n", "wordle\n"]
    actions = pol(transcripts)
    assert len(actions) == 3 and all(isinstance(a, str) for a in actions)
    assert pol(transcripts) == actions
    assert pol(transcripts[1:2]) == actions[1:2]  # batch padding rows change nothing
    assert pol([]) == []


def test_actions_never_hold_special_tokens():
    pol = policy(kind="q", temperature=3.0, max_new_tokens=16)
    tok = pol.tokenizer
    allowed = np.asarray(pol.allowed)
    assert not allowed[[tok.bos_id, tok.pad_id]].any() and allowed[tok.eot_id] and not allowed[CFG.vocab_size:].any()
    for turn in pol.decode_prompts(pol.prompts(["at 3\n"] * 5)):
        body = turn[:-1] if turn[-1] in pol.stop_set else turn
        assert not np.isin(body, [tok.bos_id, tok.pad_id, tok.eot_id, tok.eos_id]).any()


def test_evaluation_summary_report_and_evaluate_params(tmp_path):
    spec = envs.get_task("grid")
    assert eval_seeds(spec, None) == list(range(spec.num_instances))
    assert eval_seeds(spec, 5) == [i * spec.num_instances // 5 for i in range(5)]
    stats = {"worst": -30.0, "dataset": -20.0, "optimal": spec.optimal_return}
    optimal = evaluate_policy(spec.optimal(), "grid", task_stats=stats)
    assert optimal["success_rate"] == 1.0 and optimal["normalized_score"] == pytest.approx(100.0)
    low, high = optimal["return_ci95"]
    assert low < optimal["mean_return"] < high
    result = evaluate_params(CFG, params(), "grid", episodes=2, task_stats=stats, kind="ilql", beta=2.0,
                             temperature=0.0, max_new_tokens=6)
    assert result["episodes"] == 2 and result["policy"]["kind"] == "ilql"
    assert result["mean_return"] <= 0 and 0 <= result["success_rate"] <= 1
    assert all(is_success(e) == (e["done"] and e["turns"][-2]["reward"] == 0) for e in result["records"])
    md, js = write_report([optimal, result], tmp_path, "grid")
    table = md.read_text()
    assert table.count("\n") == 4 and "ilql beta=2 greedy" in table and table == markdown_table([optimal, result])
    saved = json.loads(js.read_text())
    assert saved[1]["normalized_score"] == result["normalized_score"] and "records" not in saved[1]
    assert len((tmp_path / "grid.episodes.jsonl").read_text().splitlines()) == optimal["episodes"] + 2


def test_window_prompt_keeps_whole_recent_turns_from_an_observation():
    from jaxrl_lm.model_policy import window_prompt, prompt_tokens
    tok = build_char_tokenizer()
    turns = ["at 1", "go 2", "at 2", "go 3", "at 3"]  # 5 tokens a turn with its EOT
    assert window_prompt(turns, tok, 64).tolist() == prompt_tokens(turns, tok).tolist()
    assert window_prompt(turns, tok, 16).tolist() == prompt_tokens(turns[2:], tok).tolist()  # all 5 need 26
    assert window_prompt(turns, tok, 64, max_turns=2).tolist() == prompt_tokens(turns[4:], tok).tolist()
    assert window_prompt(turns, tok, 64, max_turns=3).tolist() == prompt_tokens(turns[2:], tok).tolist()
    last = window_prompt(turns, tok, 4)  # not even "at 3" fits: BOS and its last tokens
    assert last.tolist() == truncate_left(prompt_tokens(turns[4:], tok), 4).tolist()


def test_observation_windows_split_at_every_observation_turn():
    from jaxrl_lm.batch import observation_windows, trunk_inputs
    # Row: episode 1 = [BOS] obs obs EOT | act act EOT | obs EOT | act EOT, episode 2 = [BOS] obs EOT, padding.
    batch = {
        "segment_ids": np.array([[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0]], np.int32),
        "turn_ids":    np.array([[0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 0, 0, 0, 0, 0]], np.int32),
        "action_mask": np.array([[0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0]], np.int32),
    }
    positions, ids = (np.asarray(a) for a in observation_windows(batch))
    np.testing.assert_array_equal(positions, [[0, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(ids, [[1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 4, 5, 5, 6, 7]])
    history_positions, history_ids = (np.asarray(a) for a in trunk_inputs(batch, "history"))
    np.testing.assert_array_equal(history_ids, batch["segment_ids"])
    np.testing.assert_array_equal(history_positions[0, :11], np.arange(11))


def test_observation_context_reads_the_latest_observation_exactly_as_the_policy_prompts_it():
    """Every observation of a packed training row yields the hidden state (and so Q, V and the LM's scores) of
    the policy prompted with that observation alone: a split window's last observation is a decision state."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxrl_lm.batch import trunk_inputs
    from jaxrl_lm.data import episodes_to_batch

    cfg = dataclasses.replace(CFG, context="observation")
    pol = load_policy(params(), "bc", cfg=cfg, max_new_tokens=8, temperature=0.0)
    with pytest.raises(ValueError, match="latest observation alone"):
        load_policy(params(), "bc", cfg=cfg, max_turns=3)
    episodes = envs.rollout([envs.make_env("grid") for _ in range(2)], envs.get_task("grid").optimal(), [3, 20],
                            max_steps=[3, 1], task="grid")
    tok = pol.tokenizer
    arrays = [tokenize_episode(parse_episode(e), tok, seq_len=64, truncate_side="right").arrays for e in episodes]
    batch = episodes_to_batch(arrays, seq_len=64)
    assert batch["tokens"].shape[0] == 1 and batch["segment_ids"].max() == 2  # both episodes packed in one row
    model = nnx.merge(pol.graphdef, params())
    positions, ids = trunk_inputs({k: jnp.asarray(v) for k, v in batch.items()}, "observation")
    hidden = np.asarray(model.hidden(jnp.asarray(batch["tokens"]), positions, ids))[0]
    checked = 0
    for seg in (1, 2):
        in_seg = batch["segment_ids"][0] == seg
        turns = batch["turn_ids"][0]
        observations = np.unique(turns[in_seg & (batch["action_mask"][0] == 0)])
        for turn in observations:
            end = int(np.nonzero(in_seg & (turns == turn))[0][-1])  # the observation's EOT
            text = episodes[seg - 1]["turns"][turn]["text"]
            prompt = pol.prompts([envs.render_transcript(episodes[seg - 1]["turns"][: turn + 1])])[0]
            np.testing.assert_array_equal(prompt, np.append(tok.encode_batch([text])[0], tok.eot_id))
            alone = model.hidden(jnp.asarray(prompt[None]), jnp.arange(len(prompt))[None],
                                 jnp.ones((1, len(prompt)), jnp.int32))
            np.testing.assert_allclose(hidden[end], np.asarray(alone)[0, -1], rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == sum(len(e["turns"]) // 2 + 1 for e in episodes)
