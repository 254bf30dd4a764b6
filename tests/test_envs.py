"""Text environments: dynamics, rewards, malformed actions, reference returns, normalisation, datasets."""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jaxrl_lm import envs
from jaxrl_lm.envs import base, dialogue, grid, maze, negotiation, twenty_questions as tq, wordle
from script_loader import load_script

TASKS = ["grid", "maze", "maze_po", "wordle", "twenty_questions", "negotiation", "dialogue", "endgames"]
# The dataset test below scores each task's reference over every start; endgames' reference is Stockfish at depth 14
# (about 2 minutes over its 256 starts), so its dataset is tested in test_chess_endgames.py on a small start list.
DATASET_TASKS = [task for task in TASKS if task != "endgames"]
GARBAGE = ["", "\n", "   ", "go", "go -1", "go 999", "go 1.5", "move", "move diagonal", "MOVE UP!", "xyzzy",
           "is it a?", "is it a unicorn?", "é\u0000☃", "a" * 500, "crane crane", "12345"]


def check_episode(episode: dict, task: str) -> None:
    """The JSONL episode format every dataset and rollout must produce."""
    assert set(episode) == {"id", "turns", "done", "meta"}
    assert re.fullmatch(rf"{task}-\d{{6}}", episode["id"])
    assert isinstance(episode["done"], bool)
    assert episode["meta"]["task"] == task
    turns = episode["turns"]
    assert len(turns) >= 3 and len(turns) % 2 == 1, "observation, (action, observation)+"
    for k, turn in enumerate(turns):
        role = "observation" if k % 2 == 0 else "action"
        assert turn["role"] == role and isinstance(turn["text"], str)
        assert set(turn) == ({"role", "text", "reward"} if role == "action" else {"role", "text"})
        if role == "action":
            assert isinstance(turn["reward"], float)
    assert episode["meta"]["return"] == pytest.approx(sum(t["reward"] for t in turns[1::2]))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def play(env, seed, actions):
    """Reset ``env`` and apply ``actions``; returns the list of (observation, reward, done)."""
    env.reset(seed)
    return [env.step(a) for a in actions]


# ------------------------------------------------------------------------------------------ protocol, registry


def test_registry_lists_builtins_and_plugs_in_user_envs(monkeypatch):
    assert set(TASKS) <= set(envs.env_names()) and set(TASKS) == set(envs.task_names())
    monkeypatch.setattr(base, "_ENV_FACTORIES", dict(base._ENV_FACTORIES))  # keep the test's env out of others

    class CountingEnv:
        def reset(self, seed):
            self.n = seed
            return str(self.n)

        def step(self, action):
            self.n += 1
            return str(self.n), -1.0, self.n >= 3

    envs.register_env("counter_test", CountingEnv)
    assert isinstance(envs.make_env("counter_test"), CountingEnv)
    with pytest.raises(ValueError, match="already registered"):
        envs.register_env("counter_test", CountingEnv)
    with pytest.raises(KeyError, match="registered: "):
        envs.make_env("no_such_env")
    episodes = envs.rollout([envs.make_env("counter_test") for _ in range(2)], lambda ts: ["x"] * len(ts),
                            seeds=[0, 2], max_steps=5, task="counter_test")
    assert [e["meta"]["return"] for e in episodes] == [-3.0, -1.0]


class RecordingGrid(grid.GridEnv):
    """Grid env that keeps its own copy of the turns, to check the transcripts a policy is handed."""

    def reset(self, seed):
        observation = super().reset(seed)
        self.turns = [{"text": observation}]
        return observation

    def step(self, action):
        observation, reward, done = super().step(action)
        self.turns += [{"text": action}, {"text": observation}]
        return observation, reward, done


def test_batched_rollout_calls_policy_on_running_episodes_only():
    graph = grid.GridEnv().graph
    starts = grid.GridEnv().starts
    seeds = [starts.index(min(graph.neighbours[graph.goal])), 3, 7, 11]
    calls = []

    def act(transcripts):
        calls.append([t.index for t in transcripts])
        for t in transcripts:
            assert isinstance(t, str) and t == envs.render_transcript(t.env.turns) and t.endswith("\n")
        # The episode next to the goal finishes on its first move; the others keep trying an illegal move.
        return [f"go {graph.goal}"] * len(transcripts)

    episodes = envs.rollout([RecordingGrid() for _ in seeds], act, seeds, max_steps=5, task="grid", first_id=40)
    assert calls == [[0, 1, 2, 3]] + [[1, 2, 3]] * 4
    assert [e["id"] for e in episodes] == [f"grid-0000{40 + k}" for k in range(4)]
    assert [e["done"] for e in episodes] == [True, False, False, False]
    assert [e["meta"]["return"] for e in episodes] == [0.0, -5.0, -5.0, -5.0]
    for episode in episodes:
        check_episode(episode, "grid")


def test_rollout_rejects_bad_policy_output():
    env = grid.GridEnv()
    with pytest.raises(ValueError, match="1 transcripts"):
        envs.rollout([env], lambda ts: [], [0], 3, "grid")
    with pytest.raises(TypeError, match="must be str"):
        envs.rollout([env], lambda ts: [None], [0], 3, "grid")
    with pytest.raises(ValueError, match="one seed per env"):
        envs.rollout([env], lambda ts: ["go 1"], [0, 1], 3, "grid")


@pytest.mark.parametrize("task", TASKS)
def test_malformed_actions_never_crash_and_are_penalised(task):
    env = envs.get_task(task).make_env()
    expected = {"maze": maze.INVALID_REWARD, "maze_po": maze.INVALID_REWARD,
                "negotiation": -negotiation.MALFORMED_PENALTY, "dialogue": -dialogue.MALFORMED_PENALTY}.get(task, -1.0)
    ends = task == "endgames"  # LMRL-Gym's chess rule: an illegal move loses the game at once
    for text in GARBAGE:
        env.reset(1)
        observation, reward, done = env.step(text)
        assert isinstance(observation, str) and reward == expected and done == ends, text


@pytest.mark.parametrize("task", TASKS)
def test_step_after_done_is_an_error(task):
    env = envs.get_task(task).make_env()
    with pytest.raises(RuntimeError, match="reset"):
        env.step("anything")


# ------------------------------------------------------------------------------------------ grid stitching


def test_grid_graph_is_seeded_connected_with_goal_in_a_corner():
    g = grid.GridGraph(size=6, graph_seed=0, extra_edges=8)
    assert len(g.edges) == 35 + 8 and min(g.distance) >= 0
    assert g.goal in (0, 5, 30, 35)
    for node in range(g.num_nodes):  # BFS distances obey the shortest-path Bellman equation
        expected = 0 if node == g.goal else 1 + min(g.distance[n] for n in g.neighbours[node])
        assert g.distance[node] == expected
    assert grid.GridGraph(graph_seed=0).edges == g.edges and grid.GridGraph(graph_seed=1).edges != g.edges
    with pytest.raises(ValueError, match="extra_edges"):
        grid.GridGraph(size=2, extra_edges=5)


def test_grid_dynamics_and_rewards():
    env = grid.GridEnv()
    g = env.graph
    # A start with a lattice neighbour whose edge the graph dropped: moving there is illegal.
    node, blocked = next((n, m) for n in env.starts for m in g.lattice_neighbours(n) if m not in g.neighbours[n])
    seed = env.starts.index(node)
    assert env.reset(seed) == f"at {node}"
    assert env.step(f"go {blocked}") == (f"at {node}", -1.0, False)
    step = g.best_move(node)
    assert env.step(f" go {step} ") == (f"at {step}", 0.0 if step == g.goal else -1.0, step == g.goal)
    env.reset(env.starts.index(min(g.neighbours[g.goal])))
    assert env.step(f"go {g.goal}") == (f"at {g.goal}", 0.0, True)
    assert env.reset(seed + env.num_instances) == f"at {node}", "seeds pick starts modulo num_instances"


def test_grid_optimal_return_is_shortest_path():
    spec = envs.get_task("grid")
    env = spec.make_env()
    episodes = envs.evaluate(spec, spec.optimal())
    for episode in episodes:
        start = env.starts[episode["meta"]["seed"]]
        assert episode["done"] and episode["meta"]["return"] == -(env.graph.distance[start] - 1)
    expected = np.mean([-(env.graph.distance[s] - 1) for s in env.starts])
    assert envs.optimal_return("grid") == pytest.approx(expected)


def test_grid_dataset_holds_short_walks_truncated_unless_at_goal():
    episodes, stats = envs.make_dataset("grid", 400, seed=3)
    goal = grid.GridEnv().graph.goal
    distance = grid.GridEnv().graph.distance
    starts, lengths = Counter(), Counter()
    for episode in episodes:
        check_episode(episode, "grid")
        actions = len(episode["turns"]) // 2
        at_goal = episode["turns"][-1]["text"] == f"at {goal}"
        assert episode["done"] == at_goal
        assert 1 <= actions <= grid.MAX_WALK_STEPS
        lengths[actions] += not at_goal  # a truncated walk ran its whole drawn budget
        start = int(episode["turns"][0]["text"].split()[1])
        starts[start] += 1
        if distance[start] > grid.MAX_WALK_STEPS:
            assert not episode["done"], "a far start must never reach the goal within one walk"
    assert len(starts) == 35, "walk starts cover every non-goal node"
    assert sorted(lengths) == list(range(grid.MIN_WALK_STEPS, grid.MAX_WALK_STEPS + 1)), "every walk length occurs"
    assert 0 < stats["dataset"]["done_fraction"] < 0.5


def test_grid_lure_is_each_nodes_most_frequent_data_move_and_never_reaches_the_goal():
    g = grid.GridGraph()
    for node in range(g.num_nodes):
        if node == g.goal:
            continue
        lure = g.lure_move(node)
        stays = lure not in g.neighbours[node]
        assert lure in g.lattice_neighbours(node)
        if all(n in g.neighbours[node] and g.distance[n] < g.distance[node] for n in g.lattice_neighbours(node)):
            assert lure == g.best_move(node)  # every move is a shortest-path move: nothing to lure with
        else:
            assert (g.distance[node] if stays else g.distance[lure]) >= g.distance[node]  # never a step closer
        walked, here = 0, node
        while walked < 40 and here != g.goal:
            here = g.lure_move(here) if g.lure_move(here) in g.neighbours[here] else here
            walked += 1
        assert here != g.goal
    # In the default (lure) data the lure is each state's most frequent move; in the legacy data the best move is.
    for behaviour, most in (("", "lure"), ("legacy", "best")):
        episodes, _ = envs.make_dataset(envs.get_task("grid").with_behaviour(behaviour), 2000, seed=0)
        counts: dict[int, Counter] = {}
        for e in episodes:
            turns = e["turns"]
            for obs, act in zip(turns[0::2], turns[1::2]):
                counts.setdefault(int(obs["text"].split()[1]), Counter())[int(act["text"].split()[1])] += 1
        argmax = {n: c.most_common(1)[0][0] for n, c in counts.items()}
        expected = {n: g.lure_move(n) if most == "lure" else g.best_move(n) for n in argmax}
        agree = np.mean([argmax[n] == expected[n] for n in argmax])
        assert agree >= 0.9, (behaviour, agree)  # sampling noise may swap a close pair at a rarely visited node


# ------------------------------------------------------------------------------------------ maze


@pytest.mark.parametrize("task", ["maze", "maze_po"])
def test_maze_optimal_mean_over_all_starts_is_lmrl_gym_number(task):
    spec = envs.get_task(task)
    assert spec.num_instances == 25
    episodes = envs.evaluate(spec, spec.optimal())
    assert all(e["done"] for e in episodes)
    assert envs.mean_return(episodes) == pytest.approx(-6.84)


def test_maze_texts_and_rewards():
    full, part = maze.MazeEnv(), maze.MazeEnv(partial=True)
    seed = full.starts.index((1, 1))
    assert full.reset(seed) == "goal 8,6 at 1,1 walls up,down,left"
    assert part.reset(seed) == "walls up,down,left"
    assert full.step("move up") == ("goal 8,6 at 1,1 walls up,down,left", -1.0, False)  # wall: stay, -1
    assert full.step("go up") == ("goal 8,6 at 1,1 walls up,down,left", -4.0, False)  # unparseable: stay, -4
    assert full.step("move right") == ("goal 8,6 at 1,2 walls up,down", -1.0, False)
    full.reset(full.starts.index((7, 6)))
    assert full.step("move down") == ("goal", 0.0, True)


def test_maze_truncates_at_100_steps_with_worst_return():
    spec = envs.get_task("maze")
    episode = envs.run_policy(spec, lambda ts: ["stay"] * len(ts), [0], spec.eval_steps)[0]
    assert not episode["done"] and len(episode["turns"]) == 201
    assert episode["meta"]["return"] == spec.worst_return == -400.0


# ------------------------------------------------------------------------------------------ wordle


def reference_feedback(guess: str, answer: str) -> str:
    """Plain-Python Wordle rule: exact matches first, then left-to-right 'elsewhere' marks while copies last."""
    marks = ["_"] * 5
    spare = Counter(a for g, a in zip(guess, answer) if g != a)
    for j, (g, a) in enumerate(zip(guess, answer)):
        if g == a:
            marks[j] = "+"
        elif spare[g] > 0:
            marks[j] = "?"
            spare[g] -= 1
    return " ".join(g + m for g, m in zip(guess, marks))


def test_wordle_feedback_matches_reference_rule():
    words = wordle.load_words()
    assert len(words.solutions) == 2315 and set(words.solutions) <= words.allowed
    rng = np.random.default_rng(0)
    pairs = [("speed", "abide"), ("allee", "eagle"), ("crane", "crane"), ("lolly", "hello")]
    pairs += [(words.guesses[rng.integers(len(words.guesses))], words.solutions[rng.integers(2315)])
              for _ in range(300)]
    for guess, answer in pairs:
        code = int(wordle.feedback_codes(guess, wordle.encode([answer]))[0])
        assert code == wordle.feedback_code(guess, answer), (guess, answer)
        assert wordle.render_feedback(guess, code) == reference_feedback(guess, answer), (guess, answer)
    assert reference_feedback("speed", "abide") == "s_ p_ e? e_ d?"


def test_wordle_rewards_invalid_guesses_count_and_game_ends_after_six():
    env = wordle.WordleEnv()
    answer_seed = env.words.solutions.index("crane")
    results = play(env, answer_seed, ["zzzzz", "cran", "TRACE", "crane"])
    assert results[0] == ("invalid", -1.0, False) and results[1] == ("invalid", -1.0, False)
    assert results[2] == ("t_ r+ a+ c? e+", -1.0, False)  # case and whitespace are ignored
    assert results[3] == ("c+ r+ a+ n+ e+", 0.0, True)
    results = play(env, answer_seed, ["xxxxx"] * 6)
    assert [r[2] for r in results] == [False] * 5 + [True] and sum(r[1] for r in results) == -6.0


def test_wordle_solver_is_strong_and_never_repeats_a_guess():
    spec = envs.get_task("wordle")
    seeds = list(range(0, 2315, 7))
    episodes = envs.run_policy(spec, spec.optimal(), seeds, spec.eval_steps)
    assert all(e["done"] for e in episodes)
    assert envs.mean_return(episodes) > -2.8  # about 3.5 guesses per word
    for episode in episodes:
        guesses = [t["text"] for t in episode["turns"][1::2]]
        assert guesses[0] == wordle.opening_guess() and len(set(guesses)) == len(guesses)


# ------------------------------------------------------------------------------------------ twenty questions


def test_twenty_questions_catalogue_and_answerer():
    assert len(tq.OBJECTS) == 32 and len(set(tq.CATALOGUE.values())) == 32, "questions must tell objects apart"
    env = tq.TwentyQuestionsEnv()
    results = play(env, tq.OBJECTS.index("duck"),
                   ["can it fly?", "Is it made of metal? ", "is it an eagle?", "is it a duck?"])
    assert results == [("yes", -1.0, False), ("no", -1.0, False), ("no", -1.0, False), ("yes", 0.0, True)]
    assert tq.guess_text("apple") == "is it an apple?" and tq.guess_text("cat") == "is it a cat?"


def test_twenty_questions_reference_solves_every_object_and_truncation():
    spec = envs.get_task("twenty_questions")
    episodes = envs.evaluate(spec, spec.optimal())
    assert all(e["done"] for e in episodes) and len(episodes) == 32
    assert envs.mean_return(episodes) == pytest.approx(-tq.plan(frozenset(range(32)))[0])
    assert envs.mean_return(episodes) > -5.0  # log2(32) = 5 questions would cost -5
    stuck = envs.run_policy(spec, lambda ts: ["can it fly?"] * len(ts), [0], spec.eval_steps)[0]
    assert not stuck["done"] and stuck["meta"]["return"] == spec.worst_return == -20.0


# ------------------------------------------------------------------------------------------ legal actions


def test_legal_actions_are_accepted_and_envs_without_a_set_expose_none():
    """Wordle's allowed guesses, twenty questions' questions and guesses, and a chess position's SAN moves: every
    listed text is a legal move for the env; the other envs (and plain strings) expose no set."""
    from jaxrl_lm.envs import chess_endgames as chess_env

    env = wordle.WordleEnv()
    env.reset(0)
    legal = base.legal_actions(env)
    assert len(legal) == 12_972 and set(legal) == env.words.allowed and legal is base.legal_actions(env)
    assert all(env.step(a)[0] != "invalid" for a in legal[::2600])
    env = tq.TwentyQuestionsEnv()
    env.reset(3)
    legal = base.legal_actions(env)
    assert len(legal) == 41 and set(tq.QUESTIONS) <= set(legal)
    assert all(play(env, 3, [a])[0][0] != "invalid" for a in legal)
    env = chess_env.EndgamesEnv()
    start = env.reset(0)
    legal = base.legal_actions(env)
    assert len(legal) == len(list(env.board.legal_moves)) and {a.rstrip("+#") for a in legal} == set(
        chess_env.san_moves(env.board))
    observation, _, _ = env.step(legal[0])
    assert observation != chess_env.ILLEGAL and base.legal_actions(env) != legal and env.reset(0) == start
    for name in ("grid", "maze", "negotiation", "dialogue"):
        assert base.legal_actions(envs.make_env(name)) is None, name
    assert base.transcript_legal_actions("plain text\n") is None
    assert base.transcript_legal_actions(base.Transcript("x\n", env, 0)) == base.legal_actions(env)


# ------------------------------------------------------------------------------------------ datasets, scores


def test_normalize_endpoints_and_validation():
    stats = envs.TaskStats(worst=-30.0, dataset=-20.0, optimal=-5.0)
    assert envs.normalize(-30.0, stats) == pytest.approx(0.0)
    assert envs.normalize(-20.0, stats) == pytest.approx(50.0)
    assert envs.normalize(-5.0, stats) == pytest.approx(100.0)
    assert envs.normalize(-25.0, stats) == pytest.approx(25.0)
    assert envs.normalize(-12.5, {"normalisation": stats.to_dict()}) == pytest.approx(75.0)
    np.testing.assert_allclose(envs.normalize(np.array([-30.0, -5.0]), stats), [0.0, 100.0])
    with pytest.raises(ValueError, match="worst < dataset < optimal"):
        envs.TaskStats(worst=-1.0, dataset=-2.0, optimal=0.0)
    with pytest.raises(KeyError, match="optimal"):
        envs.normalize(0.0, {"worst": -1.0, "dataset": 0.0})


@pytest.mark.parametrize("task", DATASET_TASKS)
def test_dataset_determinism_format_and_normalisation_anchors(task, tmp_path):
    episodes, stats = envs.make_dataset(task, 60, seed=5, batch_size=16)
    again, _ = envs.make_dataset(task, 60, seed=5, batch_size=16)
    other, _ = envs.make_dataset(task, 60, seed=6, batch_size=16)
    assert episodes == again and episodes != other
    path = tmp_path / f"{task}.jsonl"
    envs.write_jsonl(path, episodes)
    assert read_jsonl(path) == episodes
    for episode in episodes:
        check_episode(episode, task)
    spec = envs.get_task(task)
    for episode in episodes:
        assert len(episode["turns"]) // 2 <= spec.data_steps
        assert episode["done"] or spec.data_min_steps is not None or len(episode["turns"]) // 2 == spec.data_steps
    anchors = envs.TaskStats.from_dict(stats)
    assert anchors.worst == spec.worst_return and anchors.optimal == envs.optimal_return(task)
    if spec.anchor == "dataset":
        assert anchors.dataset == pytest.approx(np.mean([e["meta"]["return"] for e in episodes]))
    for ret, score in ((anchors.worst, 0.0), (anchors.dataset, 50.0), (anchors.optimal, 100.0)):
        assert envs.normalize(ret, stats) == pytest.approx(score)


def test_generate_task_data_script_writes_data_and_stats(tmp_path):
    module = load_script("generate_task_data")
    out = tmp_path / "sub" / "maze.jsonl"
    assert module.main(["maze", "--episodes", "30", "--seed", "1", "--out", str(out)]) == 0
    episodes = read_jsonl(out)
    stats = json.loads((tmp_path / "sub" / "maze.stats.json").read_text())
    assert len(episodes) == 30 and stats["episodes"] == 30
    assert stats["normalisation"]["optimal"] == pytest.approx(-6.84)
    assert stats["dataset"]["mean_return"] == pytest.approx(np.mean([e["meta"]["return"] for e in episodes]))


def test_every_registered_task_is_an_env_of_the_same_name():
    for name in envs.task_names():
        assert name in envs.env_names()
        assert isinstance(envs.make_env(name).reset(0), str)
