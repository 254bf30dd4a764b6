"""Text environments, their behaviour / reference policies, offline datasets and normalised scores.

Built-in tasks (each registered as an env and as a task): ``grid`` (graph stitching), ``maze`` and ``maze_po``
(LMRL-Gym double-T maze, fully / partially observed), ``wordle``, ``twenty_questions``, ``negotiation`` (selling to
a scripted buyer, CHAI style), ``dialogue`` (chit-chat rewarded by the sentiment of the user's reply, Jaques et al.
2020 style; reward hooks in ``jaxrl_lm.envs.rewards``), ``endgames`` (LMRL-Gym chess endgames: mate with K+Q or K+R
against a Stockfish-defended king). Plug in an env of your own with :func:`register_env`, and a whole task (env +
policies + budgets) with :func:`register_task`.

    from jaxrl_lm import envs
    episodes, stats = envs.make_dataset("maze", episodes=1000, seed=0)
    score = envs.normalize(envs.mean_return(envs.evaluate("maze", my_policy)), stats)
"""

from jaxrl_lm.envs.base import (
    Env,
    EpisodeRecord,
    Policy,
    Transcript,
    env_names,
    episode_return,
    make_env,
    register_env,
    render_transcript,
    rollout,
)
from jaxrl_lm.data.episodes import write_jsonl
from jaxrl_lm.envs.normalize import TaskStats, normalize
from jaxrl_lm.envs.tasks import (
    TASK_PREFIX,
    TaskSpec,
    behaviour_return,
    dataset_stats,
    evaluate,
    get_task,
    make_dataset,
    mean_return,
    optimal_return,
    register_task,
    run_policy,
    task_dataset,
    task_names,
    vocabulary_texts,
)

# Imported for their registrations.
from jaxrl_lm.envs import (  # noqa: E402,F401  isort: skip
    chess_endgames, dialogue, grid, maze, negotiation, twenty_questions, wordle,
)

__all__ = [
    "TASK_PREFIX",
    "Env",
    "EpisodeRecord",
    "Policy",
    "TaskSpec",
    "TaskStats",
    "Transcript",
    "behaviour_return",
    "dataset_stats",
    "env_names",
    "episode_return",
    "evaluate",
    "get_task",
    "make_dataset",
    "make_env",
    "mean_return",
    "normalize",
    "optimal_return",
    "register_env",
    "register_task",
    "render_transcript",
    "rollout",
    "run_policy",
    "task_dataset",
    "task_names",
    "vocabulary_texts",
    "write_jsonl",
]
