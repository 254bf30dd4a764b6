"""The dialogue task: the reward hook and the sentiment order of the user's templates, the user's rules, the reference
agent against the data's agent styles, the offline dataset, and the task tokenizer and config that go with it."""

import numpy as np
import pytest

from jaxrl_lm import envs
from jaxrl_lm.config import REPO_ROOT, load_config
from jaxrl_lm.data import load_tokenizer, parse_episode
from jaxrl_lm.envs import dialogue as dg
from jaxrl_lm.envs.rewards import hook_names, reward_hook, vader_sentiment
from script_loader import load_script

CONFIG = REPO_ROOT / "configs" / "tasks" / "dialogue.yaml"
TOKENIZER = REPO_ROOT / "configs" / "tokenizers" / "dialogue.json"
STYLE_REPEATS = 4  # evaluation passes per style: the random choices differ from pass to pass
VADER = vader_sentiment()


def seed_of(instance: dg.Instance) -> int:
    return dg.INSTANCES.index(instance)


def play(instance: dg.Instance, actions: list[str], hook=None) -> list[tuple[str, float, bool]]:
    env = dg.DialogueEnv(hook)
    env.reset(seed_of(instance))
    return [env.step(a) for a in actions]


def score(kind: str, mood: int = 0, topic: str = "music") -> float:
    return VADER(dg.reply_text(kind, mood, topic))


@pytest.fixture(scope="module")
def dataset():
    return envs.make_dataset("dialogue", episodes=2000, seed=0)


# ------------------------------------------------------------------------------------------ reward hook, templates


def test_reward_hook_registry_and_vader():
    assert hook_names() == ["vader"] and reward_hook("vader")("i love music .") == pytest.approx(0.6369)
    with pytest.raises(KeyError, match="unknown reward hook 'sentiment'; known: vader"):
        reward_hook("sentiment")
    assert VADER("hmm .") == 0.0 and VADER("that is rude . i am hurt and angry .") < -0.8
    assert vader_sentiment()("no . i hate music .") == VADER("no . i hate music .")  # deterministic


def test_template_sentiment_orders_as_intended():
    for mood in dg.MOODS:
        liked = min(score("liked_ask", mood), score("liked_tell", mood))
        # Enthusiastic replies are clearly positive and beat a hint, which is neutral to mild, as the flat replies.
        assert liked > 0.35 and liked >= score("hint", mood) and 0.0 <= score("hint", mood) < 0.5
        assert -0.1 <= score("neutral", mood) < 0.35 and score("compliment", mood) < min(0.5, score("liked_ask", 2))
        assert score("liked_ask", mood) <= score("liked_ask", min(mood + 1, 2)), "a happier user is warmer"
        assert score("liked_tell", mood) <= score("liked_tell", min(mood + 1, 2))
        assert score("bye", mood) <= score("bye", min(mood + 1, 2)) and score("filler", mood) <= 0.0
    assert score("liked_ask", 2) > 0.85 and score("liked_tell", 2) > 0.85
    # Annoyed and negative replies are clearly negative, the abrupt change mildly so, the rude reply worst of all.
    assert score("rude") < score("disliked") < score("repeat") < score("revisit") < -0.5
    assert -0.5 < score("abrupt") < -0.1 and score("no_hint") == 0.0
    table = dg.every_reply()
    assert min(VADER(text) for text in table) == score("rude")
    assert dg.WORST_RETURN == pytest.approx(dg.MAX_TURNS * score("rude"))
    for topic in dg.TOPICS:  # topic names carry no sentiment of their own
        assert VADER(topic) == 0.0


# ------------------------------------------------------------------------------------------ the user's rules


def test_instances_are_every_combination_and_seeds_visit_each_once():
    env = dg.DialogueEnv()
    assert env.num_instances == len(dg.INSTANCES) == 5 * 4 * 3 * 3 == 180
    seen = []
    for seed in range(env.num_instances):
        assert env.reset(seed) == dg.OPENINGS[env.user.instance.mood]
        seen.append(env.user.instance)
    assert sorted(seen) == sorted(dg.INSTANCES) and len(set(seen)) == 180
    env.reset(7 + env.num_instances)
    assert env.user.instance == dg.INSTANCES[7], "seeds pick instances modulo num_instances"


def test_liked_topics_are_enthusiastic_and_open_questions_hint_them():
    user = dg.Instance("music", "sports", "cooking", 1)
    assert play(user, ["do you like music ?", "I LOVE MUSIC .  "]) == [
        ("yes , i really like music .", score("liked_ask", 1), False),  # mood 1 -> 2
        ("me too ! i love music , it is great !", score("liked_tell", 2), False),
    ]
    results = play(user, ["what do you like ?", "what else do you like ?", "what do you like ?"])
    assert [r[0] for r in results] == ["oh , i like music .", "oh , i like sports .",
                                       "ugh , you said that already . so boring ."]
    assert results[0][1] > 0 and results[2][1] < -0.5
    assert play(user, ["do you like sports ?", "what do you like ?"])[1][0] == "oh , i like music a lot !"  # mood 2
    assert play(user, ["do you like cooking ?"]) == [("no . i hate cooking .", score("disliked"), False)]
    assert play(user, ["do you like travel ?"]) == [("not really .", 0.0, False)]
    # The hook is the env's parameter: the same transitions, other rewards.
    assert play(user, ["do you like music ?", "xyz"], hook=len) == [
        ("yes , i really like music .", float(len("yes , i really like music .")), False),
        ("sorry , i do not understand .", -dg.MALFORMED_PENALTY, False),
    ]


def test_rude_drops_the_mood_and_repeats_revisits_and_abrupt_changes_annoy():
    user = dg.Instance("music", "sports", "cooking", 2)
    results = play(user, ["you are boring .", "you are boring .", "do you like music ?"])
    assert results[0] == results[1] == ("that is rude . i am hurt and angry .", score("rude"), False)
    assert results[2][0] == dg.reply_text("liked_ask", 0, "music"), "two rude remarks: mood 2 -> 0"
    results = play(user, ["do you like travel ?", "ok .", "i love travel ."])
    assert results[2] == ("ugh , we already talked about travel . boring .", score("revisit"), False)
    results = play(user, ["i love music .", "do you like sports ?", "do you like music ?"])
    assert results[1] == ("oh no , i was not done with music .", score("abrupt"), False)
    assert results[2][0].startswith("ugh , we already talked about music"), "the abrupt change moved the topic on"
    # After two turns on a liked topic, moving on is natural.
    results = play(user, ["i love music .", "do you like music ?", "do you like sports ?"])
    assert results[2][0] == dg.reply_text("liked_ask", 2, "sports")
    env = dg.DialogueEnv()
    env.reset(seed_of(user))
    env.step("you are very nice .")
    assert env.step("you are very nice .") == ("ugh , you said that already . so boring .", score("repeat"), False)
    assert env.user.mood == 1


@pytest.mark.parametrize("text", ["", "   ", "hello", "do you like pizza ?", "i love music", "what do you like?",
                                  "you are  very nice .", "goodbye", "é\u0000☃", "a" * 500])
def test_malformed_actions_are_penalised_and_change_nothing(text):
    user = dg.Instance("music", "sports", "cooking", 1)
    assert dg.parse_move(text).kind == "malformed"
    assert play(user, [text]) == [("sorry , i do not understand .", -dg.MALFORMED_PENALTY, False)]
    assert play(user, ["do you like music ?", text, "i love music ."])[2][0] == dg.reply_text("liked_tell", 2, "music")


def test_episode_ends_at_the_turn_limit_or_on_goodbye_and_step_after_the_end_is_an_error():
    env = dg.DialogueEnv()
    with pytest.raises(RuntimeError, match="reset"):
        env.step("ok .")
    results = play(dg.INSTANCES[0], ["ok ."] * dg.MAX_TURNS)
    assert [r[2] for r in results] == [False] * (dg.MAX_TURNS - 1) + [True]
    env.reset(0)
    assert env.step("goodbye for now .")[2] and env.done
    with pytest.raises(RuntimeError, match="reset"):
        env.step("ok .")
    spec = envs.get_task("dialogue")
    assert isinstance(envs.make_env("dialogue"), dg.DialogueEnv)
    assert spec.data_steps == spec.eval_steps == dg.MAX_TURNS == 5
    worst = envs.run_policy(spec, lambda ts: [dg.RUDE] * len(ts), [0], spec.eval_steps)[0]
    assert worst["done"] and worst["meta"]["return"] == pytest.approx(spec.worst_return)


# ------------------------------------------------------------------------------------------ agents


def test_reference_reads_hints_and_is_never_rude_nor_repetitive():
    spec = envs.get_task("dialogue")
    episodes = envs.evaluate(spec, spec.optimal())
    assert len(episodes) == 180 and envs.evaluate(spec, spec.optimal()) == episodes
    for episode in episodes:
        instance = dg.INSTANCES[episode["meta"]["seed"]]
        actions = [t["text"] for t in episode["turns"][1::2]]
        assert episode["done"] and len(set(actions)) == len(actions) and dg.RUDE not in actions
        assert dg.ask_text(instance.favourite) in actions, "the hinted favourite is always raised"
        assert all(r["reward"] > 0 for r in episode["turns"][1::2] if r["text"] not in dg.OPEN_QUESTIONS)
    by_mood = [np.mean([e["meta"]["return"] for e in episodes if dg.INSTANCES[e["meta"]["seed"]].mood == m])
               for m in dg.MOODS]
    # The optimum per starting mood, found by an exhaustive search over transcript-reading policies.
    np.testing.assert_allclose(by_mood, [3.0104, 3.2920, 3.5141], atol=1e-9)
    assert envs.optimal_return(spec) == pytest.approx(np.mean(by_mood))


@pytest.mark.parametrize("style", list(dg.STYLE_WEIGHTS))
def test_reference_beats_every_behaviour_style_clearly(style):
    spec = envs.get_task("dialogue")
    episodes = envs.evaluate(spec, dg.behaviour_policy(0, {style: 1.0}), repeats=STYLE_REPEATS)
    assert envs.mean_return(episodes) < envs.optimal_return(spec) - 1.0
    assert all(e["done"] for e in episodes)


def test_behaviour_policy_is_seeded_and_rejects_unknown_styles():
    spec = envs.get_task("dialogue")
    seeds = list(range(0, 2 * spec.num_instances, 7))
    first = envs.run_policy(spec, dg.behaviour_policy(11), seeds, spec.eval_steps, batch_size=16)
    assert first == envs.run_policy(spec, dg.behaviour_policy(11), seeds, spec.eval_steps, batch_size=16)
    assert first != envs.run_policy(spec, dg.behaviour_policy(12), seeds, spec.eval_steps, batch_size=16)
    with pytest.raises(ValueError, match="styles"):
        dg.behaviour_policy(0, {"charming": 1.0})


# ------------------------------------------------------------------------------------------ data, tokenizer, config


def test_dataset_anchors_and_the_pieces_of_good_play(dataset):
    episodes, stats = dataset
    spec = envs.get_task("dialogue")
    for episode in episodes:
        parsed = parse_episode(episode)
        assert parsed.done and len(parsed.turns) // 2 <= spec.data_steps
        assert spec.worst_return - 1e-9 <= episode["meta"]["return"] <= dg.MAX_TURNS
    assert {e["meta"]["seed"] % spec.num_instances for e in episodes} == set(range(spec.num_instances))
    anchors = envs.TaskStats.from_dict(stats)
    assert anchors.worst == spec.worst_return and anchors.optimal == envs.optimal_return(spec)
    assert anchors.dataset == pytest.approx(np.mean([e["meta"]["return"] for e in episodes]))
    assert envs.normalize(anchors.dataset, stats) == pytest.approx(50.0)
    assert envs.normalize(envs.optimal_return(spec), stats) == pytest.approx(100.0)
    assert anchors.dataset < anchors.optimal - 3.0, "the data's mean must sit well below the reference"
    # Pieces to stitch: an open question, its hint, then the hinted topic with an enthusiastic reply.
    kinds = dg.every_reply()
    stitched = 0
    for episode in episodes:
        texts = [t["text"] for t in episode["turns"]]
        for k in range(1, len(texts) - 3, 2):
            kind, topic = kinds[texts[k + 1]]
            if texts[k] in dg.OPEN_QUESTIONS and kind == "hint" and kinds[texts[k + 3]] in (
                    ("liked_ask", topic), ("liked_tell", topic)):
                stitched += 1
                break
    assert stitched >= 150
    # Copying the data's most common move is not the reference: after every greeting it is the rude remark.
    for opening in dg.OPENINGS:
        firsts = [e["turns"][1]["text"] for e in episodes if e["turns"][0]["text"] == opening]
        values, counts = np.unique(firsts, return_counts=True)
        assert values[np.argmax(counts)] == dg.RUDE


def every_text() -> set[str]:
    """Every text the env can show and every action text the scripted agents can write."""
    return set(dg.OPENINGS) | set(dg.every_reply()) | set(dg.UTTERANCES) | set(dg.MALFORMED_EXAMPLES)


def test_tokenizer_encodes_every_text_in_whole_words_and_is_what_make_tokenizer_writes(dataset, tmp_path):
    tok = load_tokenizer(TOKENIZER)
    texts = every_text()
    spec = envs.get_task("dialogue")
    played = dataset[0] + envs.evaluate(spec, spec.optimal())
    assert {t["text"] for e in played for t in e["turns"]} <= texts, "every_text must list what the env says"
    specials = [tok.pad_id, tok.bos_id, tok.eos_id, tok.eot_id]
    for text in sorted(texts):
        ids = tok.encode_batch([text])[0]
        assert tok.decode(ids) == text and not np.isin(ids, specials).any() and ids.max() < tok.vocab_size, text
    # Every word the user and the grammar use is one token, not byte pieces (no word is unknown to the tokenizer).
    for text in sorted(texts - set(dg.MALFORMED_EXAMPLES)):
        assert len(tok.encode_batch([text])[0]) <= len(text.split()), text
    out = tmp_path / "dialogue.json"
    assert load_script("make_tokenizer").main(["task:dialogue", "--out", str(out)]) == 0
    assert out.read_text() == TOKENIZER.read_text(), "rerun scripts/make_tokenizer.py task:dialogue"


def test_config_fits_whole_episodes_and_the_tokenizer(dataset):
    cfg = load_config(CONFIG)
    tok = load_tokenizer(cfg.data.tokenizer)
    assert tok.fingerprint == load_tokenizer(TOKENIZER).fingerprint
    assert cfg.data.path == "task:dialogue" and cfg.model.vocab_size >= tok.vocab_size
    assert cfg.rl.time_step == "utterance" and cfg.data.task_episodes == 2000 and cfg.eval.temperature == 1.0
    spec = envs.get_task("dialogue")
    for episode in dataset[0] + envs.evaluate(spec, spec.optimal()):
        ids = tok.encode_batch([t["text"] for t in episode["turns"]])
        assert 1 + sum(len(i) + 1 for i in ids) <= cfg.data.seq_len <= cfg.model.max_seq_len  # BOS, turns + EOTs
    # The longest possible conversation fits too: the longest greeting, then the longest utterance and reply.
    longest = max(len(tok.encode_batch([t])[0]) for t in dg.OPENINGS)
    longest += dg.MAX_TURNS * (max(len(i) for i in tok.encode_batch(list(dg.UTTERANCES) + list(dg.MALFORMED_EXAMPLES)))
                               + max(len(i) for i in tok.encode_batch(list(dg.every_reply()))))
    assert 1 + longest + 1 + 2 * dg.MAX_TURNS <= cfg.data.seq_len
