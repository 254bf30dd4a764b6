"""The maze's offline data: the mixture (default) is as hard as LMRL-Gym's, the legacy data is still the old one.

LMRL-Gym's maze data (its Table 1): success rate 0.11, mean length 19.7. The bounds below are that target with
room for the spread between data seeds (measured over seeds 0..5 at 3000 episodes: success 0.106 to 0.126, mean
length 19.9 to 20.2; the binomial standard error of a success rate near 0.11 at 3000 episodes is 0.006): success
in [0.08, 0.15], mean length in [18, 22] of at most ``maze.DATA_STEPS`` moves.

"Greedy BC" here is count-based behaviour cloning (scripts/data_stats.py): at each observation the data's most
frequent move, played from every evaluation start. On the legacy data it is the optimal policy (the reason for the
mixture, issue 21); on the mixture it must reach the goal from hardly any start.
"""

import json

import numpy as np
import pytest
from script_loader import load_script

from jaxrl_lm import envs
from jaxrl_lm.config import load_config
from jaxrl_lm.envs import maze
from jaxrl_lm.eval import load_task_stats

SUCCESS_BOUNDS = (0.08, 0.15)
LENGTH_BOUNDS = (18.0, 22.0)

data_stats = load_script("data_stats")


def summary(episodes):
    success = np.mean([e["done"] for e in episodes])
    length = np.mean([sum(t["role"] == "action" for t in e["turns"]) for e in episodes])
    return success, length


@pytest.mark.parametrize("seed", [0, 1])
def test_mixture_data_matches_lmrl_gym_statistics(seed):
    episodes, stats = envs.make_dataset("maze", episodes=3000, seed=seed)
    success, length = summary(episodes)
    assert stats["behaviour"] == "mixture"
    assert SUCCESS_BOUNDS[0] <= success <= SUCCESS_BOUNDS[1], success
    assert LENGTH_BOUNDS[0] <= length <= LENGTH_BOUNDS[1], length
    assert max(len(e["turns"]) // 2 for e in episodes) == maze.DATA_STEPS
    assert all(e["done"] or len(e["turns"]) // 2 == maze.DATA_STEPS for e in episodes)
    assert stats["dataset"]["done_fraction"] == pytest.approx(success)
    # The 50 mark is the behaviour under the evaluation protocol (100 moves), not the truncated episodes' mean.
    anchors = envs.TaskStats.from_dict(stats)
    assert anchors.worst == -400.0 and anchors.optimal == pytest.approx(-6.84)
    assert -100.0 < anchors.dataset < stats["dataset"]["mean_return"]


def test_partially_observed_mixture_takes_the_same_moves():
    full, _ = envs.make_dataset("maze", episodes=300, seed=3)
    part, _ = envs.make_dataset("maze_po", episodes=300, seed=3)
    moves = [[t["text"] for t in e["turns"] if t["role"] == "action"] for e in full]
    assert moves == [[t["text"] for t in e["turns"] if t["role"] == "action"] for e in part]
    assert part[0]["turns"][0]["text"].startswith("walls ")
    assert envs.make_dataset("maze", episodes=300, seed=3)[0] == full  # same seed, same data


@pytest.mark.parametrize("task", ["maze", "maze_po"])
def test_greedy_imitation_of_the_mixture_is_far_from_optimal(task):
    row = data_stats.task_stats(task, episodes=2000, seed=0)
    greedy = row["greedy"]
    assert greedy["fallback"] == 0.0  # every observation of the maze occurs in the data
    assert greedy["argmax_optimal"] <= 0.25  # the most frequent move is a wrong one in most cells
    assert greedy["success"] <= 0.12  # at most the two stem cells: 2 of 25 starts
    assert greedy["score"] < 60.0
    assert row["sampled"]["score"] < 60.0


def test_greedy_imitation_of_the_legacy_data_is_optimal():
    row = data_stats.task_stats("maze", "legacy", episodes=2000, seed=0)
    assert row["greedy"]["argmax_optimal"] == 1.0
    assert row["greedy"]["success"] == 1.0 and row["greedy"]["score"] == pytest.approx(100.0)


def test_legacy_data_is_the_old_data():
    """The numbers of the data before the mixture (measured with the code of that commit, seed 0, 2000 episodes):
    every episode reaches the goal, mean return -15.551, the 50 mark that mean."""
    episodes, stats = envs.make_dataset("maze", episodes=2000, seed=0, behaviour="legacy")
    assert stats["behaviour"] == "legacy"
    assert stats["dataset"] == {"mean_return": pytest.approx(-15.551), "min_return": -68.0, "max_return": 0.0,
                                "done_fraction": 1.0, "data_steps": 100}
    assert stats["normalisation"]["dataset"] == pytest.approx(-15.551)
    assert summary(episodes)[1] == pytest.approx(16.551)  # every move -1 but the last


def test_behaviour_is_chosen_by_the_data_config(tmp_path):
    cfg = load_config("configs/tasks/maze.yaml", data__task_episodes=200)
    assert cfg.data.task_behaviour == "mixture"
    assert load_config("configs/tasks/maze_po.yaml").data.task_behaviour == "mixture"
    legacy = load_config("configs/tasks/maze.yaml", data__task_episodes=200, data__task_behaviour="legacy")
    assert envs.task_dataset(legacy.data) == envs.make_dataset("maze", 200, 0, behaviour="legacy")[0]
    assert envs.task_dataset(cfg.data) == envs.make_dataset("maze", 200, 0)[0]
    assert load_task_stats("maze", legacy) == envs.TaskStats.from_dict(
        envs.make_dataset("maze", 200, 0, behaviour="legacy")[1])
    assert load_task_stats("maze", legacy).dataset != load_task_stats("maze", cfg).dataset
    with pytest.raises(ValueError, match=r"no behaviour 'nope'.*known: \['mixture', 'legacy'\]"):
        envs.task_dataset(load_config("configs/tasks/maze.yaml", data__task_behaviour="nope").data)
    with pytest.raises(ValueError, match=r"task 'twenty_questions' has no behaviour 'nope'"):
        envs.make_dataset("twenty_questions", 10, 0, behaviour="nope")


def test_generate_task_data_and_data_stats_scripts(tmp_path, capsys):
    out = tmp_path / "maze_legacy.jsonl"
    generate = load_script("generate_task_data")
    assert generate.main(["maze", "--behaviour", "legacy", "--episodes", "20", "--out", str(out)]) == 0
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["behaviour"] == "legacy" and stats["dataset"]["done_fraction"] == 1.0
    with pytest.raises(SystemExit):
        generate.main(["maze", "--behaviour", "nope", "--episodes", "20", "--out", str(out)])
    capsys.readouterr()
    table = tmp_path / "stats.md"
    assert data_stats.main(["maze", "maze:legacy", "--episodes", "200", "--markdown", str(table)]) == 0
    printed = capsys.readouterr().out
    assert printed == table.read_text()
    rows = [line for line in printed.splitlines() if line.startswith("| maze |")]
    assert [row.split(" | ")[1] for row in rows] == ["mixture", "legacy"]
