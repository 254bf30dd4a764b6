"""Text environment protocol, batched rollouts, the env registry and JSON Lines episode files.

An environment is any object with

    reset(seed: int) -> str                            # first observation text
    step(action: str) -> tuple[str, float, bool]        # observation text, reward, done

where ``done`` is True only when the episode really ended (goal reached, game over). Cutting an episode at a
step budget is the rollout's business, not the env's: such an episode is *truncated* and keeps ``done=False``,
so value learning bootstraps through the cut (docs/design.md section 2). A malformed or illegal action text is a
normal move that the env penalises; it never raises. An env behind a task (``jaxrl_lm.envs.tasks``) also has
``num_instances``, the number of distinct starts or secrets that ``reset`` picks from.

Optionally, an env whose moves form a known set of texts also has

    legal_actions() -> Sequence[str] | None              # the legal action texts in the current state

(Wordle's allowed guesses, twenty questions' questions and guesses, a chess position's moves). Each text is the
spelling the env's data writes, so a model trained on that data writes it the same way; the env may accept more
spellings (case, surrounding whitespace), but every listed text is accepted. The set may change from turn to turn.
A model policy can be held to it (``jaxrl_lm.model_policy``: ``actions=transcript_legal_actions``) and evaluation
can report how often a policy's actions are in it (``jaxrl_lm.eval``). None, or no such method: no set.

A policy is a callable ``act(transcripts: list[str]) -> list[str]``: given each running episode's text so far,
the next action text of each. Transcripts are laid out by :func:`render_transcript`.

Episode record (one JSON object per line; the data pipeline reads this)::

    {"id": "grid-000017",
     "turns": [{"role": "observation", "text": "at 14"},
               {"role": "action", "text": "go 15", "reward": -1.0},
               {"role": "observation", "text": "at 15"}, ...],
     "done": false,
     "meta": {"task": "grid", "return": -4.0, "seed": 123}}

Turns alternate observation / action, starting and ending with an observation: the final observation is kept
because a truncated episode bootstraps from the state it shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

from jaxrl_lm.data.episodes import EpisodeRecord

Policy = Callable[[list[str]], list[str]]


class Env(Protocol):
    """The text environment protocol (structural: any class with these methods is an Env)."""

    def reset(self, seed: int) -> str:
        """Start an episode determined by ``seed``; return the first observation text."""

    def step(self, action: str) -> tuple[str, float, bool]:
        """Apply one action text; return (observation text, reward, done)."""


def legal_actions(env: Any) -> Sequence[str] | None:
    """The env's legal action texts now (its optional ``legal_actions()``; module docstring), or None."""
    method = getattr(env, "legal_actions", None)
    return None if method is None else method()


def transcript_legal_actions(transcript: Any) -> Sequence[str] | None:
    """The legal action texts of a running episode, from the env a ``Transcript`` carries (None for a plain
    string, or an env without a set): the ``actions=`` source that holds a model policy to the env's moves."""
    env = getattr(transcript, "env", None)
    return None if env is None else legal_actions(env)


class Transcript(str):
    """An episode's text so far, as handed to a policy.

    It *is* the string a language-model policy reads. Scripted policies (behaviour and reference policies
    that write datasets) may also read ``env``, the live environment, for privileged state such as the
    agent's position in a partially observed maze; ``index`` is the episode's position in the rollout batch;
    ``turns`` are the turn texts in order (None when not given), so a model policy lays out its prompt turn by
    turn exactly as the data pipeline does, whatever characters the texts hold.
    """

    env: Env
    index: int
    turns: tuple[str, ...] | None

    def __new__(cls, text: str, env: Env, index: int, turns: tuple[str, ...] | None = None) -> "Transcript":
        obj = super().__new__(cls, text)
        obj.env = env
        obj.index = index
        obj.turns = turns
        return obj


def render_transcript(turns: Iterable[dict[str, Any]]) -> str:
    """Text of an episode so far: every turn's text followed by a newline, in order.

    The newline after an observation is where the policy starts writing its action; a policy should not put a
    newline inside an action (envs treat it as part of the text, so it usually makes the action malformed).
    """
    return "".join(turn["text"] + "\n" for turn in turns)


def episode_return(episode: EpisodeRecord) -> float:
    """Sum of the action rewards of an episode record."""
    return float(sum(turn["reward"] for turn in episode["turns"] if turn["role"] == "action"))


@dataclass
class _Running:
    """Book-keeping for one episode inside :func:`rollout`."""

    env: Env
    seed: int
    turns: list[dict[str, Any]]
    steps: int = 0
    done: bool = False


def rollout(
    envs: list[Env],
    act: Policy,
    seeds: list[int],
    max_steps: int | Sequence[int],
    task: str,
    first_id: int = 0,
) -> list[EpisodeRecord]:
    """Run one episode in each env, batching the policy over all episodes still running.

    Args:
      envs: one environment per episode (an env holds one episode at a time).
      act: policy; called once per step with the transcripts of the running episodes only.
      seeds: ``reset`` seed of each env.
      max_steps: step budget, one for all episodes or one per episode; an episode still running after its
        budget is truncated (``done=False``).
      task: task name written into ids and ``meta``.
      first_id: number of the first episode in its id (``f"{task}-{first_id:06d}"``), for chunked datasets.

    Returns:
      Episode records in env order, in the format of this module's docstring.
    """
    if len(envs) != len(seeds):
        raise ValueError(f"rollout: got {len(envs)} envs but {len(seeds)} seeds; pass one seed per env")
    budgets = [max_steps] * len(seeds) if isinstance(max_steps, int) else [int(n) for n in max_steps]
    if len(budgets) != len(seeds) or min(budgets, default=1) < 1:
        raise ValueError(f"rollout: max_steps must be >= 1, one for all or one per seed; got {max_steps}")
    runs = [
        _Running(env, int(seed), [{"role": "observation", "text": env.reset(int(seed))}])
        for env, seed in zip(envs, seeds)
    ]
    while True:
        active = [i for i, run in enumerate(runs) if not run.done and run.steps < budgets[i]]
        if not active:
            break
        transcripts = [Transcript(render_transcript(runs[i].turns), runs[i].env, i,
                                  tuple(t["text"] for t in runs[i].turns)) for i in active]
        actions = act(transcripts)
        _check_actions(actions, len(active))
        for i, action in zip(active, actions):
            _advance(runs[i], action)
    return [_record(run, task, first_id + k) for k, run in enumerate(runs)]


def _check_actions(actions: Any, expected: int) -> None:
    """A policy returning the wrong number or type of actions is a bug in the policy, not a bad move."""
    if not isinstance(actions, (list, tuple)) or len(actions) != expected:
        got = len(actions) if isinstance(actions, (list, tuple)) else type(actions).__name__
        raise ValueError(f"policy returned {got} actions for {expected} transcripts; return one str per transcript")
    for action in actions:
        if not isinstance(action, str):
            raise TypeError(f"policy returned an action of type {type(action).__name__}; actions must be str")


def _advance(run: _Running, action: str) -> None:
    """Step one running episode and append the action and the resulting observation."""
    observation, reward, done = run.env.step(action)
    run.turns.append({"role": "action", "text": action, "reward": float(reward)})
    run.turns.append({"role": "observation", "text": observation})
    run.steps += 1
    run.done = bool(done)


def _record(run: _Running, task: str, number: int) -> EpisodeRecord:
    """Episode record of a finished or truncated run."""
    episode = {"id": f"{task}-{number:06d}", "turns": run.turns, "done": run.done, "meta": {"task": task}}
    episode["meta"]["return"] = episode_return(episode)
    episode["meta"]["seed"] = run.seed
    return episode


# ----------------------------------------------------------------------------------------------- registry

_ENV_FACTORIES: dict[str, Callable[..., Env]] = {}


def register_env(name: str, factory: Callable[..., Env], overwrite: bool = False) -> None:
    """Make ``make_env(name, **kw)`` call ``factory(**kw)``.

    Registering a taken name is an error unless ``overwrite`` is True, so two plug-ins cannot silently shadow
    each other.
    """
    if not callable(factory):
        raise TypeError(f"register_env({name!r}): factory must be callable, got {type(factory).__name__}")
    if name in _ENV_FACTORIES and not overwrite:
        raise ValueError(f"register_env: {name!r} is already registered; pass overwrite=True to replace it")
    _ENV_FACTORIES[name] = factory


def make_env(name: str, **kwargs: Any) -> Env:
    """A new environment of the registered kind ``name``, built with ``kwargs``."""
    if name not in _ENV_FACTORIES:
        raise KeyError(f"make_env: unknown env {name!r}; registered: {', '.join(sorted(_ENV_FACTORIES))}")
    return _ENV_FACTORIES[name](**kwargs)


def env_names() -> list[str]:
    """Names of all registered envs, sorted."""
    return sorted(_ENV_FACTORIES)
