"""Grid stitching: walk a fixed random graph to its goal corner; the data holds only short truncated walks.

The graph is a ``size x size`` lattice of nodes ``0 .. size*size - 1`` (row-major), reduced to a random
spanning tree plus ``extra_edges`` random lattice edges, all drawn from ``graph_seed``; the goal is a corner
drawn from the same seed. The graph is the task (fixed across episodes); episodes differ by start node.

Text: observation ``"at 14"``; action ``"go 15"`` names the next node.
Rewards: -1 per action; the action that enters the goal earns 0 and ends the episode (the maze's convention,
so a start ``d`` moves from the goal has optimal return ``-(d - 1)``). An action that is unparseable or names a
node that is not a neighbour costs -1 and leaves the agent where it is.

Dataset: walks of ``MIN_WALK_STEPS .. MAX_WALK_STEPS`` actions (uniform, about 4 on average) from starts spread
uniformly over the graph. The default behaviour (``lure``) makes a wrong move each node's most frequent one
(``lure_behaviour_policy``), so that greedy imitation fails; the ``legacy`` data (``data.task_behaviour:
legacy``: mostly random lattice moves, some of them illegal because the edge is missing) had the best move as
each node's most frequent one, so greedy imitation of it was optimal. A walk
is truncated (``done=False``) unless it really reaches the goal. No walk from a start more than
``MAX_WALK_STEPS`` moves away reaches the goal, so an optimal path from far away never appears whole: only
bootstrapping can join the pieces. The lengths vary because a truncated walk bootstraps from the value at its
last observation: with walks all of one length, that position (after the last move) never held a decision in
any walk, the value there was never trained, and values stopped propagating beyond one walk's length (measured:
learned V flat at about -2.4 from 5 moves out, against -5 to -12 for the backup's fixed point).

Evaluation: from every non-goal node, cut (truncated) after ``EVAL_STEPS`` actions, so the worst return is -30.
A model policy reads only the current observation (``TaskSpec.context_turns = 1``): the position is all of the
state, and the data's walks start at every node, so that one-turn prompt is exactly what the data shows at each
walk's start (a longer history would be the policy's own moves, which look nothing like the data's random
walks: with it, even behaviour cloning scored below the behaviour it copies). Because
the dataset's walks are not whole evaluation episodes, their mean return (about -3.8) says nothing about
how good the behaviour is; the 50 mark is instead the behaviour policy itself run under the evaluation protocol.
"""

from __future__ import annotations

import re
from collections import deque

import numpy as np

from jaxrl_lm.envs.base import Policy, Transcript
from jaxrl_lm.envs.tasks import ANCHOR_BEHAVIOUR, DataRecipe, TaskSpec, register_task

MIN_WALK_STEPS, MAX_WALK_STEPS = 1, 7
LURE_P, LURE_P_BEST = 0.45, 0.30  # the default data's lure and best-move probabilities (lure_behaviour_policy)
EVAL_STEPS = 30
_ACTION = re.compile(r"go (\d{1,4})")


class GridGraph:
    """A seeded random connected subgraph of the square lattice with a goal corner and BFS distances."""

    def __init__(self, size: int = 6, graph_seed: int = 0, extra_edges: int = 8):
        if size < 2:
            raise ValueError(f"GridGraph: size must be >= 2, got {size}")
        rng = np.random.default_rng(graph_seed)
        self.size = size
        self.num_nodes = size * size
        lattice = self._lattice_edges()
        rng.shuffle(lattice)
        tree, rest = self._spanning_tree(lattice)
        if not 0 <= extra_edges <= len(rest):
            raise ValueError(f"GridGraph: extra_edges must be in [0, {len(rest)}] for size {size}, got {extra_edges}")
        self.edges = sorted(tree + rest[:extra_edges])
        self.neighbours: list[set[int]] = [set() for _ in range(self.num_nodes)]
        for a, b in self.edges:
            self.neighbours[a].add(b)
            self.neighbours[b].add(a)
        corners = [0, size - 1, self.num_nodes - size, self.num_nodes - 1]
        self.goal = int(corners[rng.integers(len(corners))])
        self.distance = self._bfs(self.goal)

    def lattice_neighbours(self, node: int) -> list[int]:
        """Nodes one lattice step away (up, down, left, right), whether or not the graph keeps that edge."""
        r, c = divmod(node, self.size)
        cells = [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
        return [rr * self.size + cc for rr, cc in cells if 0 <= rr < self.size and 0 <= cc < self.size]

    def best_move(self, node: int) -> int:
        """The neighbour closest to the goal (lowest id on ties, so the reference policy is deterministic)."""
        return min(self.neighbours[node], key=lambda n: (self.distance[n], n))

    def lure_move(self, node: int) -> int:
        """The lattice move that leaves the agent farthest from the goal among those that are not shortest-path
        moves (a missing edge counts as staying put; lowest id on ties). From any node of the seed-0 graph,
        following it never reaches the goal (tests/test_envs.py)."""
        after = {n: self.distance[n] if n in self.neighbours[node] else self.distance[node]
                 for n in self.lattice_neighbours(node)}
        wrong = {n: d for n, d in after.items() if d >= self.distance[node]}
        if not wrong:  # every lattice move is a shortest-path move: there is no wrong move to lure with
            return self.best_move(node)
        return max(wrong, key=lambda n: (wrong[n], -n))

    def _lattice_edges(self) -> list[tuple[int, int]]:
        return [(a, b) for a in range(self.num_nodes) for b in self.lattice_neighbours(a) if a < b]

    def _spanning_tree(self, edges: list[tuple[int, int]]) -> tuple[list, list]:
        """Kruskal over shuffled edges: the tree edges, and the unused edges in shuffled order."""
        parent = list(range(self.num_nodes))

        def root(n: int) -> int:
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n

        tree, rest = [], []
        for a, b in edges:
            ra, rb = root(a), root(b)
            if ra == rb:
                rest.append((a, b))
            else:
                parent[ra] = rb
                tree.append((a, b))
        return tree, rest

    def _bfs(self, source: int) -> list[int]:
        distance = [-1] * self.num_nodes
        distance[source] = 0
        queue = deque([source])
        while queue:
            node = queue.popleft()
            for n in self.neighbours[node]:
                if distance[n] < 0:
                    distance[n] = distance[node] + 1
                    queue.append(n)
        return distance


class GridEnv:
    """The grid stitching environment; seed ``i`` starts at the ``i % num_instances``-th non-goal node."""

    def __init__(self, size: int = 6, graph_seed: int = 0, extra_edges: int = 8):
        self.graph = GridGraph(size, graph_seed, extra_edges)
        self.starts = [n for n in range(self.graph.num_nodes) if n != self.graph.goal]
        self.num_instances = len(self.starts)
        self.node = -1
        self.done = True

    def reset(self, seed: int) -> str:
        self.node = self.starts[seed % self.num_instances]
        self.done = False
        return f"at {self.node}"

    def step(self, action: str) -> tuple[str, float, bool]:
        if self.done:
            raise RuntimeError("GridEnv.step called on a finished episode; call reset(seed) first")
        target = parse_move(action)
        if target in self.graph.neighbours[self.node]:
            self.node = target
        self.done = self.node == self.graph.goal
        return f"at {self.node}", 0.0 if self.done else -1.0, self.done


def parse_move(action: str) -> int | None:
    """Node named by ``"go N"`` (surrounding whitespace ignored), or None when the text is not a move."""
    match = _ACTION.fullmatch(action.strip())
    return int(match.group(1)) if match else None


def optimal_policy() -> Policy:
    """Shortest-path policy (reads the env's graph and node)."""

    def act(transcripts: list[Transcript]) -> list[str]:
        return [f"go {t.env.graph.best_move(t.env.node)}" for t in transcripts]

    return act


def lure_behaviour_policy(seed: int, p_lure: float = LURE_P, p_best: float = LURE_P_BEST) -> Policy:
    """The default data: with probability ``p_lure`` the node's lure move (``GridGraph.lure_move``: away from the
    goal, or into a missing edge), with ``p_best`` the shortest-path move, else a uniformly random lattice move.
    The lure is each node's most frequent move (0.45 + 0.25/k against 0.30 + 0.25/k for the best move, k = 2..4
    lattice moves), so imitation decoded greedily walks away from the goal in every state, and sampled it drifts
    away; the best move is still in the data at every node, for a value-based method to pick out and stitch."""
    rng = np.random.default_rng(seed)

    def act(transcripts: list[Transcript]) -> list[str]:
        actions = []
        for t in transcripts:
            graph, node = t.env.graph, t.env.node
            u = rng.random()
            if u < p_lure:
                actions.append(f"go {graph.lure_move(node)}")
            elif u < p_lure + p_best:
                actions.append(f"go {graph.best_move(node)}")
            else:
                options = graph.lattice_neighbours(node)
                actions.append(f"go {options[rng.integers(len(options))]}")
        return actions

    return act


def behaviour_policy(seed: int, p_random: float = 0.8) -> Policy:
    """The ``legacy`` data: with probability ``p_random`` a uniformly random lattice move (illegal if the edge is
    missing), else the shortest-path move. Its most frequent move is the best one in every state (0.2 + 0.8/k
    against 0.8/k), so greedy imitation of it is optimal."""
    rng = np.random.default_rng(seed)

    def act(transcripts: list[Transcript]) -> list[str]:
        actions = []
        for t in transcripts:
            graph, node = t.env.graph, t.env.node
            if rng.random() < p_random:
                options = graph.lattice_neighbours(node)
                actions.append(f"go {options[rng.integers(len(options))]}")
            else:
                actions.append(f"go {graph.best_move(node)}")
        return actions

    return act


register_task(
    TaskSpec(
        name="grid",
        make_env=GridEnv,
        behaviour=lure_behaviour_policy,
        optimal=optimal_policy,
        data_steps=MAX_WALK_STEPS,
        data_min_steps=MIN_WALK_STEPS,
        eval_steps=EVAL_STEPS,
        worst_return=-float(EVAL_STEPS),
        anchor=ANCHOR_BEHAVIOUR,
        context_turns=1,  # the current observation alone: what every data walk shows at its start
        behaviour_name="lure",
        # The data before greedy decoding was evaluated: greedy imitation of it is optimal (data.task_behaviour)
        other_behaviours={"legacy": DataRecipe(behaviour_policy, data_steps=MAX_WALK_STEPS,
                                               data_min_steps=MIN_WALK_STEPS, anchor=ANCHOR_BEHAVIOUR)},
    )
)
