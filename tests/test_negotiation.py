"""The negotiation task: the buyer's rules, rewards and malformed moves, the reference seller against the data's
seller styles, the offline dataset, and the task tokenizer and config that go with it."""

import numpy as np
import pytest

from jaxrl_lm import envs
from jaxrl_lm.config import REPO_ROOT, load_config
from jaxrl_lm.data import load_tokenizer, parse_episode
from jaxrl_lm.envs import negotiation as ng
from script_loader import load_script

CONFIG = REPO_ROOT / "configs" / "tasks" / "negotiation.yaml"
TOKENIZER = REPO_ROOT / "configs" / "tokenizers" / "negotiation.json"
MALFORMED = ["", "\n", "   ", "deal!", "no", "nodeal", "i can do", "i can do 0", "i can do 101", "i can do 085",
             "i can do -5", "i can do 7.5", "i can do 80 deal", "can do 80", "80", "é\u0000☃", "a" * 500]
STYLE_REPEATS = 4  # evaluation passes per style: the random choices differ from pass to pass


def seed_of(buyer: ng.Buyer) -> int:
    return ng.INSTANCES.index(buyer)


def play(buyer: ng.Buyer, actions: list[str]) -> list[tuple[str, float, bool]]:
    env = ng.NegotiationEnv()
    env.reset(seed_of(buyer))
    return [env.step(a) for a in actions]


@pytest.fixture(scope="module")
def dataset():
    return envs.make_dataset("negotiation", episodes=2000, seed=0)


# ------------------------------------------------------------------------------------------ the buyer's rules


def test_instances_are_every_budget_opening_and_patience_and_seeds_visit_each_once():
    env = ng.NegotiationEnv()
    assert env.num_instances == len(ng.INSTANCES) == len(ng.BUDGETS) * len(ng.OPENING_OFFERS) * len(ng.PATIENCE)
    seen = []
    for seed in range(env.num_instances):
        assert env.reset(seed) == f"list price 100. buyer offers {env.buyer.offer}."
        seen.append(env.buyer)
    assert sorted(seen) == sorted(ng.INSTANCES), "evaluation seeds visit every instance exactly once"
    assert min(b - o for b in ng.BUDGETS for o in ng.OPENING_OFFERS) >= 2 * ng.PRICE_STEP
    env.reset(7 + env.num_instances)
    assert env.buyer == ng.INSTANCES[7], "seeds pick instances modulo num_instances"


def test_buyer_accepts_at_or_below_budget_and_counters_by_a_quarter_of_the_gap():
    buyer = ng.Buyer(budget=80, offer=40, patience=4)
    assert play(buyer, ["i can do 80"]) == [("buyer accepts 80.", 0.8, True)]
    assert play(buyer, ["i can do 35"]) == [("buyer accepts 35.", 0.35, True)]  # below its own offer: still taken
    assert play(buyer, [" I Can Do 100 ", "i can do 81", "i can do 77"]) == [
        ("buyer offers 50.", 0.0, False),  # 40 + (80 - 40) // 4
        ("buyer offers 57.", 0.0, False),  # 50 + 30 // 4
        ("buyer accepts 77.", 0.77, True),
    ]
    assert play(buyer, ["i can do 100", "deal"]) == [("buyer offers 50.", 0.0, False), ("deal at 50.", 0.5, True)]
    assert play(buyer, ["no deal"]) == [("no deal.", 0.0, True)]
    assert play(ng.Buyer(100, 30, 2), ["i can do 100"]) == [("buyer accepts 100.", 1.0, True)]


def test_patience_runs_out_with_a_last_offer_warning_then_a_walk_away():
    for buyer in [b for b in ng.INSTANCES if b.budget < ng.LIST_PRICE and b.offer == 35]:
        results = play(buyer, ["i can do 100"] * buyer.patience)
        observations = [r[0] for r in results]
        assert all(not r[2] for r in results[:-1]) and results[-1] == ("buyer walks away.", 0.0, True)
        assert [o.endswith(" my last offer.") for o in observations[:-1]] == [False] * (buyer.patience - 2) + [True]
        offers = [int(o.split()[2].rstrip(".")) for o in observations[:-1]]
        assert offers == sorted(offers) and all(o < buyer.budget for o in offers), "offers rise, never past it"
    # Patience is hidden: the opening is the same whatever the patience.
    assert len({ng.opening_text(b) for b in ng.INSTANCES if (b.budget, b.offer) == (70, 35)}) == 1


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_actions_are_penalised_not_fatal(text):
    buyer = ng.Buyer(budget=70, offer=35, patience=3)
    assert ng.parse_move(text).kind == "malformed"
    assert play(buyer, [text]) == [("i do not understand. buyer offers 35.", -ng.MALFORMED_PENALTY, False)]
    # It costs a unit of patience like a rejected ask, and the buyer does not raise its offer for it.
    assert play(buyer, [text, "i can do 100", text]) == [
        ("i do not understand. buyer offers 35.", -ng.MALFORMED_PENALTY, False),
        ("buyer offers 43. my last offer.", 0.0, False),
        ("i do not understand. buyer walks away.", -ng.MALFORMED_PENALTY, True),
    ]


def test_step_after_the_end_is_an_error_and_the_task_budgets():
    env = ng.NegotiationEnv()
    with pytest.raises(RuntimeError, match="reset"):
        env.step("deal")
    env.reset(0)
    env.step("deal")
    with pytest.raises(RuntimeError, match="reset"):
        env.step("deal")
    spec = envs.get_task("negotiation")
    assert "negotiation" in envs.env_names() and isinstance(envs.make_env("negotiation"), ng.NegotiationEnv)
    assert spec.data_steps == spec.eval_steps == ng.MAX_TURNS == 6
    # The worst return is every action malformed until the most patient buyer walks away.
    worst = envs.run_policy(spec, lambda ts: ["??"] * len(ts), [seed_of(ng.Buyer(50, 30, 6))], spec.eval_steps)[0]
    assert worst["done"] and worst["meta"]["return"] == pytest.approx(spec.worst_return) == pytest.approx(-0.6)


def test_same_seed_same_episode():
    spec = envs.get_task("negotiation")
    seeds = list(range(0, 3 * spec.num_instances, 5))
    first = envs.run_policy(spec, ng.behaviour_policy(11), seeds, spec.eval_steps, batch_size=16)
    again = envs.run_policy(spec, ng.behaviour_policy(11), seeds, spec.eval_steps, batch_size=16)
    other = envs.run_policy(spec, ng.behaviour_policy(12), seeds, spec.eval_steps, batch_size=16)
    assert first == again and first != other
    assert envs.evaluate(spec, spec.optimal()) == envs.evaluate(spec, spec.optimal())


# ------------------------------------------------------------------------------------------ sellers


def test_one_counteroffer_pins_the_budget_down():
    for buyer in ng.INSTANCES:
        env = ng.NegotiationEnv()
        env.reset(seed_of(buyer))
        assert ng.candidate_budgets(env.opening, env.history) == [b for b in ng.BUDGETS if b > buyer.offer]
        if buyer.budget < ng.LIST_PRICE:
            env.step("i can do 100")
            assert ng.candidate_budgets(env.opening, env.history) == [buyer.budget]


def test_reference_seller_earns_every_budget_so_it_is_optimal():
    spec = envs.get_task("negotiation")
    episodes = envs.evaluate(spec, spec.optimal())
    assert len(episodes) == spec.num_instances == 165
    for episode in episodes:
        buyer = ng.INSTANCES[episode["meta"]["seed"]]
        assert episode["done"] and episode["meta"]["return"] == pytest.approx(buyer.budget / ng.LIST_PRICE)
        assert len(episode["turns"]) // 2 == (1 if buyer.budget == ng.LIST_PRICE else 2)
    # No buyer pays more than its budget, so the mean budget bounds every seller's mean return.
    assert envs.optimal_return(spec) == pytest.approx(np.mean(ng.BUDGETS) / ng.LIST_PRICE) == pytest.approx(0.75)


@pytest.mark.parametrize("style", list(ng.STYLE_WEIGHTS))
def test_reference_seller_beats_every_behaviour_style_clearly(style):
    spec = envs.get_task("negotiation")
    episodes = envs.evaluate(spec, ng.behaviour_policy(0, {style: 1.0}), repeats=STYLE_REPEATS)
    assert envs.mean_return(episodes) < envs.optimal_return(spec) - 0.1
    for episode in episodes:
        buyer = ng.INSTANCES[episode["meta"]["seed"] % spec.num_instances]
        assert episode["done"] and episode["meta"]["return"] <= buyer.budget / ng.LIST_PRICE + 1e-12
        if style == "stubborn" and buyer.budget < ng.LIST_PRICE - ng.PRICE_STEP:
            assert episode["turns"][-1]["text"] == "buyer walks away."


def test_behaviour_policy_rejects_unknown_styles():
    with pytest.raises(ValueError, match="styles"):
        ng.behaviour_policy(0, {"greedy": 1.0})


# ------------------------------------------------------------------------------------------ data, tokenizer, config


def test_dataset_episodes_are_valid_whole_and_cover_every_instance(dataset):
    episodes, stats = dataset
    spec = envs.get_task("negotiation")
    for episode in episodes:
        parsed = parse_episode(episode)  # the data pipeline's validation
        assert parsed.done and len(parsed.turns) % 2 == 1 and len(parsed.turns) // 2 <= spec.data_steps
        assert parsed.episode_return == pytest.approx(episode["meta"]["return"])
        assert spec.worst_return - 1e-9 <= episode["meta"]["return"] <= 1.0
    assert {e["meta"]["seed"] % spec.num_instances for e in episodes} == set(range(spec.num_instances))
    anchors = envs.TaskStats.from_dict(stats)
    assert anchors.worst == spec.worst_return and anchors.optimal == envs.optimal_return(spec)
    assert anchors.dataset == pytest.approx(stats["dataset"]["mean_return"]) and stats["dataset"]["done_fraction"] == 1
    assert anchors.dataset < anchors.optimal - 0.2, "the data's mean must sit well below the reference"
    texts = {t["text"] for e in episodes for t in e["turns"][1::2]}
    assert {"deal", "no deal", "i can do 100"} | set(ng.MALFORMED_EXAMPLES) <= texts


def every_text() -> set[str]:
    """Every text the env can show and every action text the scripted sellers can write."""
    offers = range(min(ng.OPENING_OFFERS), max(ng.BUDGETS))  # a buyer's offer stays below its budget
    texts = {"no deal.", "buyer walks away.", "i do not understand. buyer walks away.", "deal", "no deal"}
    texts |= {ng.opening_text(b) for b in ng.INSTANCES}
    texts |= {f"buyer accepts {p}." for p in range(1, ng.LIST_PRICE + 1)} | {ng.ask_text(p) for p in range(1, 101)}
    texts |= {f"deal at {o}." for o in offers}
    texts |= {pre + ng.offer_text(o, p) for o in offers for p in (1, 2) for pre in ("", "i do not understand. ")}
    return texts | set(ng.MALFORMED_EXAMPLES)


def test_tokenizer_encodes_every_text_and_is_what_make_tokenizer_writes(dataset, tmp_path):
    tok = load_tokenizer(TOKENIZER)
    texts = every_text()
    spec = envs.get_task("negotiation")
    played = dataset[0] + envs.evaluate(spec, spec.optimal())
    assert {t["text"] for e in played for t in e["turns"]} <= texts, "every_text must list what the env says"
    specials = [tok.pad_id, tok.bos_id, tok.eos_id, tok.eot_id]
    for text in sorted(texts):
        ids = tok.encode_batch([text])[0]
        assert tok.decode(ids) == text and not np.isin(ids, specials).any() and ids.max() < tok.vocab_size, text
    # The reference seller's asks are whole words ("i", " can", " do", " 85"), not byte pieces.
    for price in ng.BUDGETS:
        assert len(tok.encode_batch([ng.ask_text(price)])[0]) == 4
    out = tmp_path / "negotiation.json"
    assert load_script("make_tokenizer").main(["task:negotiation", "--out", str(out)]) == 0
    assert out.read_text() == TOKENIZER.read_text(), "rerun scripts/make_tokenizer.py task:negotiation"


def test_config_fits_whole_episodes_and_the_tokenizer(dataset):
    cfg = load_config(CONFIG)
    tok = load_tokenizer(cfg.data.tokenizer)
    assert tok.fingerprint == load_tokenizer(TOKENIZER).fingerprint
    assert cfg.data.path == "task:negotiation" and cfg.model.vocab_size >= tok.vocab_size
    assert cfg.rl.time_step == "utterance" and list(cfg.eval.policies) == ["bc", "ilql"]
    spec = envs.get_task("negotiation")
    for episode in dataset[0] + envs.evaluate(spec, spec.optimal()):
        ids = tok.encode_batch([t["text"] for t in episode["turns"]])
        assert 1 + sum(len(i) + 1 for i in ids) <= cfg.data.seq_len <= cfg.model.max_seq_len  # BOS, turns + EOTs
