"""Twenty questions in the spirit of Visual Dialogue: a rule-based answerer holds one of 32 catalogue objects.

Text:
  first observation: ``"guess the object"``
  action: one of the attribute questions in ``QUESTIONS`` (e.g. ``"is it an animal?"``) or a guess
          ``"is it a cat?"`` / ``"is it an apple?"`` naming a catalogue object (either article is accepted;
          surrounding whitespace and case are ignored)
  observation: ``"yes"`` or ``"no"``; ``"invalid"`` for any other text.
Rewards: -1 per turn (question, wrong guess or invalid text); 0 for the right guess, which ends the episode.
The game allows 20 turns: an episode still running after them is truncated (``done=False``, return -20),
which is the worst return.

Every object has a distinct answer to the nine questions, so questions alone can always pin it down. The
reference policy is a binary-search questioner planned by an exact dynamic programme over candidate sets: each
turn it asks the question that minimises the expected number of turns still to pay, or, when no question beats
it, guesses the remaining candidates one by one. Probing with a guess while questions still help is not
considered, so it is a strong reference rather than a proven optimum.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from jaxrl_lm.envs.base import Policy, Transcript
from jaxrl_lm.envs.tasks import TaskSpec, register_task

MAX_TURNS = 20
QUESTIONS = (
    "is it alive?",
    "is it an animal?",
    "is it bigger than a person?",
    "can it fly?",
    "is it found in water?",
    "can you eat it?",
    "do you plug it in?",
    "is it made of metal?",
    "is it found in a home?",
)
# Answers to QUESTIONS in order, 1 = yes.
CATALOGUE = {
    "cat": "110000001",
    "elephant": "111000000",
    "eagle": "110100000",
    "duck": "110111000",
    "salmon": "110011000",
    "whale": "111010000",
    "cow": "111001000",
    "chicken": "110001000",
    "goldfish": "110010001",
    "parrot": "110100001",
    "frog": "110010000",
    "snake": "110000000",
    "tree": "101000000",
    "apple": "100001001",
    "carrot": "100001000",
    "cactus": "100000000",
    "rose": "100000001",
    "seaweed": "100011000",
    "lily": "100010000",
    "airplane": "001100010",
    "ship": "001010010",
    "car": "001000010",
    "house": "001000000",
    "bicycle": "000000010",
    "kite": "000100000",
    "lamp": "000000111",
    "television": "000000101",
    "fridge": "001000111",
    "spoon": "000000011",
    "book": "000000001",
    "bread": "000001001",
    "rock": "000000000",
}
OBJECTS = tuple(CATALOGUE)
ANSWERS = np.array([[ch == "1" for ch in CATALOGUE[name]] for name in OBJECTS], dtype=bool)  # [objects, questions]
_GUESS = re.compile(r"is it an? ([a-z]+)\?")


def guess_text(name: str) -> str:
    """The canonical guess for an object, with the article English uses."""
    return f"is it {'an' if name[0] in 'aeiou' else 'a'} {name}?"


# Every question and every canonical guess: the legal actions of every turn (TwentyQuestionsEnv.legal_actions).
LEGAL_ACTIONS = QUESTIONS + tuple(guess_text(name) for name in OBJECTS)


class TwentyQuestionsEnv:
    """One game; seed ``i`` hides object ``i % num_instances`` (catalogue order)."""

    def __init__(self) -> None:
        self.num_instances = len(OBJECTS)
        self.secret = -1
        self.history: list[tuple[int, bool]] = []  # (question index, answer) as the transcript shows them
        self.guessed: set[int] = set()  # objects already guessed wrongly
        self.done = True

    def reset(self, seed: int) -> str:
        self.secret = seed % self.num_instances
        self.history = []
        self.guessed = set()
        self.done = False
        return "guess the object"

    def step(self, action: str) -> tuple[str, float, bool]:
        if self.done:
            raise RuntimeError("TwentyQuestionsEnv.step called on a finished episode; call reset(seed) first")
        text = action.strip().lower()
        if text in QUESTIONS:
            q = QUESTIONS.index(text)
            answer = bool(ANSWERS[self.secret, q])
            self.history.append((q, answer))
            return ("yes" if answer else "no"), -1.0, False
        match = _GUESS.fullmatch(text)
        if match is None or match.group(1) not in CATALOGUE:
            return "invalid", -1.0, False
        guess = OBJECTS.index(match.group(1))
        if guess == self.secret:
            self.done = True
            return "yes", 0.0, True
        self.guessed.add(guess)
        return "no", -1.0, False

    def legal_actions(self) -> tuple[str, ...]:
        """The nine questions and the 32 canonical guesses (``guess_text``), whatever was asked before."""
        return LEGAL_ACTIONS


def candidates(history: list[tuple[int, bool]], guessed: set[int]) -> list[int]:
    """Objects consistent with every answer so far and not yet guessed wrongly."""
    keep = np.ones(len(OBJECTS), dtype=bool)
    for q, answer in history:
        keep &= ANSWERS[:, q] == answer
    return [i for i in np.flatnonzero(keep).tolist() if i not in guessed]


@functools.lru_cache(maxsize=None)
def plan(members: frozenset[int]) -> tuple[float, int | None]:
    """Expected turns before the winning guess, and the question to ask (None: guess them in turn).

    Guessing ``n`` candidates one by one wastes ``(n - 1) / 2`` turns on average; a question costs one turn and
    leaves the candidates that share the answer.
    """
    best = ((len(members) - 1) / 2, None)
    for q in range(len(QUESTIONS)):
        yes = frozenset(i for i in members if ANSWERS[i, q])
        if 0 < len(yes) < len(members):
            no = members - yes
            cost = 1 + (len(yes) * plan(yes)[0] + len(no) * plan(no)[0]) / len(members)
            # A question must beat guessing by more than rounding error, so exact ties guess (shorter games).
            if cost < best[0] - 1e-12:
                best = (cost, q)
    return best


def reference_action(history: list[tuple[int, bool]], guessed: set[int]) -> str:
    """The reference questioner's next action for a game in this state."""
    remaining = candidates(history, guessed)
    if not remaining:
        raise ValueError(f"no catalogue object fits answers {history} after wrong guesses {sorted(guessed)}")
    question = plan(frozenset(remaining))[1]
    return QUESTIONS[question] if question is not None else guess_text(OBJECTS[remaining[0]])


def optimal_policy() -> Policy:
    """The reference questioner (reads the answers the env has given, not the secret)."""

    def act(transcripts: list[Transcript]) -> list[str]:
        return [reference_action(t.env.history, t.env.guessed) for t in transcripts]

    return act


def behaviour_policy(seed: int, p_question: float = 0.5, p_consistent_guess: float = 0.3) -> Policy:
    """A random questioner: with probability ``p_question`` a uniformly random question (possibly a repeat),
    with ``p_consistent_guess`` a guess among the objects still consistent, otherwise any object."""
    rng = np.random.default_rng(seed)

    def act(transcripts: list[Transcript]) -> list[str]:
        actions = []
        for t in transcripts:
            u = rng.random()
            if u < p_question:
                actions.append(QUESTIONS[rng.integers(len(QUESTIONS))])
                continue
            pool = candidates(t.env.history, t.env.guessed) if u < p_question + p_consistent_guess else []
            pool = pool or list(range(len(OBJECTS)))
            actions.append(guess_text(OBJECTS[pool[rng.integers(len(pool))]]))
        return actions

    return act


register_task(
    TaskSpec(
        name="twenty_questions",
        make_env=TwentyQuestionsEnv,
        behaviour=behaviour_policy,
        optimal=optimal_policy,
        data_steps=MAX_TURNS,
        eval_steps=MAX_TURNS,
        worst_return=-float(MAX_TURNS),
    )
)
