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

Datasets (``data.task_behaviour``; every episode from a uniformly drawn start):

- ``mixture`` (the default): as hard as LMRL-Gym's maze data (its Table 1: success rate 0.11, mean length 19.7).
  Each episode is cut after ``DATA_STEPS`` = 22 actions and is one of four walkers, drawn when it starts:
  - *seeker* (only from a start at most ``SEEKER_RADIUS`` = 6 moves from the goal, with probability
    ``P_SEEKER``): the shortest-path move with probability 1 - ``SEEKER_NOISE`` = 0.8, else a uniformly random
    one. The few near-optimal episodes, all short: hardly any episode reaches the goal from the far arms (2 of
    the 214 successes of the default data, 2000 episodes with seed 0, start more than 6 moves away).
  Every other episode is, with the weights ``WALKER_WEIGHTS`` (0.65, 0.25, 0.10):
  - *decoy*: believes the goal is at the end of its own arm, walks (noisy, as a tourist) to the nearest cell
    farthest from the goal (one of the four top corners) and then wanders at random, bumping walls.
  - *tourist*: walks (each move random with probability ``WALK_NOISE``, else a shortest-path move) to a
    uniformly drawn waypoint, then to another.
  - *looper*: keeps its heading; at a wall it bumps on with probability ``LOOPER_BUMP``, else takes a random
    new heading (and so runs back and forth along corridors).
  Measured (tests/test_maze_data.py, docs/results/data_stats.md): success 0.107 and mean length 20.2 in the
  default data (2000 episodes, seed 0; 0.106 to 0.126 and 19.9 to 20.2 over seeds 0..5 at 3000 episodes). In
  22 of the 25 cells the data's most frequent move is not the optimal one (decoys head away from the goal,
  seekers only act near it), so the count-based greedy imitation of the data reaches the goal only from the
  stem; the optimal path exists only in pieces (tourists' and decoys' moves toward the middle, seekers' last
  moves into the stem) that value learning must join. The data's episodes are not whole evaluation
  episodes, so the 50 mark is the behaviour run under the evaluation protocol (anchor ``behaviour``: -87.8 for
  seed 0, -84.6 to -90.0 over seeds 0..5; LMRL-Gym's score normalisation puts it at -83).
- ``legacy``: each move optimal with probability 0.5 and uniformly random among the four otherwise, to the goal
  or cut at 100 actions (every episode reaches the goal; the optimal move is the most frequent in every cell,
  so greedy imitation is optimal). The data of the results before the mixture (docs/results/maze_legacy.md); 50 mark:
  the dataset's mean return.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import Mapping

import numpy as np

from jaxrl_lm.envs.base import Policy, Transcript
from jaxrl_lm.envs.tasks import ANCHOR_BEHAVIOUR, ANCHOR_DATASET, DataRecipe, TaskSpec, register_task

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

# The mixture behaviour (module docstring). DATA_STEPS and P_SEEKER set the success rate and mean length
# (0.11 and 19.7 in LMRL-Gym's Table 1); the walker weights make the data's most frequent move a wrong one in most
# cells.
DATA_STEPS = 22
SEEKER_RADIUS, P_SEEKER, SEEKER_NOISE = 6, 0.3, 0.2
WALKER_WEIGHTS = {"decoy": 0.65, "tourist": 0.25, "looper": 0.10}
WALK_NOISE, LOOPER_BUMP = 0.3, 0.5
LEGACY_P_OPTIMAL = 0.5


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
        self._distance_cache: dict[tuple[int, int], dict[tuple[int, int], int]] = {}  # target -> BFS distances
        self.distance = self.distances_to(self.goal)
        unreachable = [cell for cell in self.starts if cell not in self.distance]
        if unreachable:
            raise ValueError(f"MazeEnv: cells {unreachable} cannot reach the goal {self.goal}")
        self.position = self.goal
        self.steps = 0  # actions taken in the current episode
        self.done = True

    def reset(self, seed: int) -> str:
        self.position = self.starts[seed % self.num_instances]
        self.steps = 0
        self.done = False
        return self.observe()

    def step(self, action: str) -> tuple[str, float, bool]:
        if self.done:
            raise RuntimeError("MazeEnv.step called on a finished episode; call reset(seed) first")
        move = MOVES.get(action.strip())
        self.steps += 1
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
        return self.move_towards(self.goal)

    def move_towards(self, target: tuple[int, int]) -> str:
        """A shortest-path move from the current position to the free cell ``target`` (first in up, down, left,
        right order on ties)."""
        distance = self.distances_to(target)
        r, c = self.position
        options = [(distance.get((r + dr, c + dc), np.inf), name) for name, (dr, dc) in MOVES.items()]
        return min(options, key=lambda option: option[0])[1]

    def distances_to(self, target: tuple[int, int]) -> dict[tuple[int, int], int]:
        """BFS moves from every free cell that can reach ``target`` to it; computed once per target and env."""
        cache = self._distance_cache
        if target not in cache:
            distance = {target: 0}
            queue = deque([target])
            while queue:
                r, c = queue.popleft()
                for dr, dc in MOVES.values():
                    cell = (r + dr, c + dc)
                    if not self.walls[cell] and cell not in distance:
                        distance[cell] = distance[(r, c)] + 1
                        queue.append(cell)
            cache[target] = distance
        return cache[target]


def optimal_policy() -> Policy:
    """Shortest-path policy; reads the env's true position, so it is also the reference for ``maze_po``."""

    def act(transcripts: list[Transcript]) -> list[str]:
        return [t.env.best_action() for t in transcripts]

    return act


def legacy_behaviour_policy(seed: int, p_optimal: float = LEGACY_P_OPTIMAL) -> Policy:
    """Each move optimal with probability ``p_optimal``, else uniformly random among the four moves (``legacy``)."""
    rng = np.random.default_rng(seed)
    names = list(MOVES)

    def act(transcripts: list[Transcript]) -> list[str]:
        return [
            t.env.best_action() if rng.random() < p_optimal else names[rng.integers(len(names))]
            for t in transcripts
        ]

    return act


def mixture_behaviour_policy(seed: int, weights: Mapping[str, float] = WALKER_WEIGHTS,
                             p_seeker: float = P_SEEKER) -> Policy:
    """The ``mixture`` behaviour (module docstring): a walker drawn per episode, every random choice from ``seed``.

    ``weights``: relative weights of ``decoy``, ``tourist`` and ``looper`` among the episodes that are not
    seekers; ``p_seeker``: probability of a seeker from a start within ``SEEKER_RADIUS`` moves of the goal. The
    walker (and its target or heading) is drawn when an episode's first action is due (``env.steps == 0``) and kept,
    by rollout slot, until the episode ends; the rollout asks for actions in slot order, so the draws are
    reproducible.
    """
    unknown = sorted(set(weights) - set(WALKER_WEIGHTS))
    if unknown or not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"mixture_behaviour_policy: weights must be non-negative, not all 0, over "
                         f"{sorted(WALKER_WEIGHTS)}; got {dict(weights)}")
    if not 0.0 <= p_seeker <= 1.0:
        raise ValueError(f"mixture_behaviour_policy: p_seeker must be in [0, 1], got {p_seeker}")
    kinds = list(weights)
    probs = np.array([weights[k] for k in kinds], dtype=np.float64)
    probs /= probs.sum()
    names = list(MOVES)
    rng = np.random.default_rng(seed)
    walkers: dict[int, dict] = {}  # rollout slot -> {"kind", "target" (a cell or None), "heading" (a move)}

    def random_move() -> str:
        return names[rng.integers(len(names))]

    def start(env: MazeEnv) -> dict:
        if env.distance[env.position] <= SEEKER_RADIUS and rng.random() < p_seeker:
            return {"kind": "seeker", "target": env.goal, "heading": None}
        kind = kinds[rng.choice(len(kinds), p=probs)]
        walker = {"kind": kind, "target": None, "heading": random_move()}
        if kind == "decoy":  # the nearest of the cells farthest from the goal: the end of the walker's own arm
            far = max(env.distance.values())
            corners = [cell for cell, d in env.distance.items() if d == far]
            here = {cell: env.distances_to(cell)[env.position] for cell in corners}
            nearest = sorted(cell for cell in corners if here[cell] == min(here.values()))
            walker["target"] = nearest[rng.integers(len(nearest))]
        return walker

    def step(env: MazeEnv, walker: dict) -> str:
        kind = walker["kind"]
        if kind == "seeker":
            return env.best_action() if rng.random() >= SEEKER_NOISE else random_move()
        if kind == "looper":
            dr, dc = MOVES[walker["heading"]]
            if env.walls[env.position[0] + dr, env.position[1] + dc] and rng.random() >= LOOPER_BUMP:
                walker["heading"] = random_move()
            return walker["heading"]
        if kind == "decoy" and walker["target"] is None:  # arrived: wander
            return random_move()
        if walker["target"] == env.position:
            walker["target"] = None
            if kind == "decoy":
                return random_move()
        while walker["target"] is None or walker["target"] == env.position:  # tourist: a new waypoint
            cells = [cell for cell in env.distance if cell != env.goal]
            walker["target"] = cells[rng.integers(len(cells))]
        return env.move_towards(walker["target"]) if rng.random() >= WALK_NOISE else random_move()

    def act(transcripts: list[Transcript]) -> list[str]:
        actions = []
        for t in transcripts:
            if t.env.steps == 0:
                walkers[t.index] = start(t.env)
            actions.append(step(t.env, walkers[t.index]))
        return actions

    return act


def _register() -> None:
    """The two maze tasks share dynamics, policies and anchors' meaning; only the observation text differs.
    The default data is ``mixture``; ``legacy`` (``data.task_behaviour: legacy``) writes the earlier data.

    For ``maze_po`` the 100 mark is still the fully observed optimum (-6.84), an upper bound on what a policy
    that must infer its position can reach, as in LMRL-Gym's tables.
    """
    for name, partial in (("maze", False), ("maze_po", True)):
        register_task(
            TaskSpec(
                name=name,
                make_env=functools.partial(MazeEnv, partial=partial),
                behaviour=mixture_behaviour_policy,
                optimal=optimal_policy,
                data_steps=DATA_STEPS,
                eval_steps=MAX_STEPS,
                worst_return=INVALID_REWARD * MAX_STEPS,
                anchor=ANCHOR_BEHAVIOUR,
                behaviour_name="mixture",
                other_behaviours={
                    "legacy": DataRecipe(legacy_behaviour_policy, data_steps=MAX_STEPS, anchor=ANCHOR_DATASET),
                },
            )
        )


_register()
