"""The LMRL-Gym double-T maze, fully observed (``maze``) and partially observed (``maze_po``).

Semantics follow LMRL-Gym's ``MazeEnv`` with ``standard_reward``: the position is updated first, then the reward
is 0 if the agent now stands on the goal (the episode ends), -4 if the action text is not one of the four moves
(the agent stays), else -1 (a move into a wall also costs -1 and leaves the agent in place). So the move that
enters the goal earns 0, and the optimal return from a cell ``d`` moves away is ``-(d - 1)``: the mean over the
25 free non-goal cells is -171 / 25 = -6.84, LMRL-Gym's number. Evaluation episodes are cut (truncated) after
100 actions, so the worst return is -400.

Text (rows and columns count from 0, row 0 at the top; walls listed in the fixed order up, down, left, right):
  fully observed:     ``"goal 8,6 at 1,1 walls up,down,left"``  (``walls none`` when no wall is adjacent)
  partially observed: ``"walls up,down,left"``  (position and goal must be inferred from the history)
  actions:            ``"move up"``, ``"move down"``, ``"move left"``, ``"move right"`` (surrounding
                      whitespace is ignored; any other text is unparseable)
The agent's position is not shown after it reaches the goal: the final observation is ``"goal"``.

Dataset: LMRL-Gym style suboptimal behaviour, each move optimal with probability ``p_optimal`` and uniformly
random among the four otherwise, from uniformly drawn starts, to the goal or cut at 100 actions.
"""

from __future__ import annotations

import functools
from collections import deque

import numpy as np

from jaxrl_lm.envs.base import Policy, Transcript
from jaxrl_lm.envs.tasks import TaskSpec, register_task

DOUBLE_T_MAZE = (
    "1111111111111",
    "1000001000001",
    "1110111110111",
    "1110111110111",
    "1110111110111",
    "1110000000111",
    "1111110111111",
    "1111110111111",
    "1111110111111",
    "1111111111111",
)
GOAL = (8, 6)
MAX_STEPS = 100
MOVES = {"move up": (-1, 0), "move down": (1, 0), "move left": (0, -1), "move right": (0, 1)}
STEP_REWARD, INVALID_REWARD, GOAL_REWARD = -1.0, -4.0, 0.0


class MazeEnv:
    """Grid maze; seed ``i`` starts at the ``i % num_instances``-th free non-goal cell in row-major order."""

    def __init__(self, partial: bool = False, layout: tuple[str, ...] = DOUBLE_T_MAZE, goal: tuple = GOAL):
        self.walls = np.array([[ch == "1" for ch in row] for row in layout], dtype=bool)
        if self.walls.ndim != 2 or not self.walls[:, [0, -1]].all() or not self.walls[[0, -1], :].all():
            raise ValueError("MazeEnv: layout must be a rectangle of '0'/'1' rows with a wall border")
        self.goal = (int(goal[0]), int(goal[1]))
        if self.walls[self.goal]:
            raise ValueError(f"MazeEnv: goal {self.goal} is a wall cell")
        self.partial = partial
        self.starts = [(int(r), int(c)) for r, c in np.argwhere(~self.walls) if (r, c) != self.goal]
        self.num_instances = len(self.starts)
        self.distance = self._distances()
        self.position = self.goal
        self.done = True

    def reset(self, seed: int) -> str:
        self.position = self.starts[seed % self.num_instances]
        self.done = False
        return self.observe()

    def step(self, action: str) -> tuple[str, float, bool]:
        if self.done:
            raise RuntimeError("MazeEnv.step called on a finished episode; call reset(seed) first")
        move = MOVES.get(action.strip())
        if move is not None:
            target = (self.position[0] + move[0], self.position[1] + move[1])
            if not self.walls[target]:
                self.position = target
        if self.position == self.goal:
            self.done = True
            return "goal", GOAL_REWARD, True
        return self.observe(), STEP_REWARD if move is not None else INVALID_REWARD, False

    def observe(self) -> str:
        """Observation text of the current position."""
        walls = "walls " + (",".join(self.adjacent_walls()) or "none")
        if self.partial:
            return walls
        return f"goal {self.goal[0]},{self.goal[1]} at {self.position[0]},{self.position[1]} {walls}"

    def adjacent_walls(self) -> list[str]:
        """Directions (up, down, left, right order) in which the neighbouring cell is a wall."""
        r, c = self.position
        return [name.split()[1] for name, (dr, dc) in MOVES.items() if self.walls[r + dr, c + dc]]

    def best_action(self) -> str:
        """A shortest-path move from the current position (first in up, down, left, right order on ties)."""
        r, c = self.position
        options = [(self.distance.get((r + dr, c + dc), np.inf), name) for name, (dr, dc) in MOVES.items()]
        return min(options, key=lambda option: option[0])[1]

    def _distances(self) -> dict[tuple[int, int], int]:
        """BFS moves-to-goal of every free cell reachable from the goal."""
        distance = {self.goal: 0}
        queue = deque([self.goal])
        while queue:
            r, c = queue.popleft()
            for dr, dc in MOVES.values():
                cell = (r + dr, c + dc)
                if not self.walls[cell] and cell not in distance:
                    distance[cell] = distance[(r, c)] + 1
                    queue.append(cell)
        unreachable = [cell for cell in self.starts if cell not in distance]
        if unreachable:
            raise ValueError(f"MazeEnv: cells {unreachable} cannot reach the goal {self.goal}")
        return distance


def optimal_policy() -> Policy:
    """Shortest-path policy; reads the env's true position, so it is also the reference for ``maze_po``."""

    def act(transcripts: list[Transcript]) -> list[str]:
        return [t.env.best_action() for t in transcripts]

    return act


def behaviour_policy(seed: int, p_optimal: float = 0.5) -> Policy:
    """Each move optimal with probability ``p_optimal``, else uniformly random among the four moves."""
    rng = np.random.default_rng(seed)
    names = list(MOVES)

    def act(transcripts: list[Transcript]) -> list[str]:
        return [
            t.env.best_action() if rng.random() < p_optimal else names[rng.integers(len(names))]
            for t in transcripts
        ]

    return act


def _register() -> None:
    """The two maze tasks share dynamics, policies and anchors' meaning; only the observation text differs.

    For ``maze_po`` the 100 mark is still the fully observed optimum (-6.84), an upper bound on what a policy
    that must infer its position can reach, as in LMRL-Gym's tables.
    """
    for name, partial in (("maze", False), ("maze_po", True)):
        register_task(
            TaskSpec(
                name=name,
                make_env=functools.partial(MazeEnv, partial=partial),
                behaviour=behaviour_policy,
                optimal=optimal_policy,
                data_steps=MAX_STEPS,
                eval_steps=MAX_STEPS,
                worst_return=INVALID_REWARD * MAX_STEPS,
            )
        )


_register()
