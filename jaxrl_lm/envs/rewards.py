"""Reward hooks: the reward of an agent's turn read from the text the user replies with.

Human-centric dialogue tasks (Jaques et al. 2020) reward the agent by the user's reaction rather than by a goal: a
hook maps the user's reply (the observation after an agent turn) to a float. Offline data building and online
collection both call the same hook on the observation after each agent turn (the env takes the hook as a
parameter, ``jaxrl_lm.envs.dialogue.DialogueEnv(reward_hook=...)``), so the rewards in a dataset and those a
policy earns when it is evaluated or collects new episodes come from one function.

    from jaxrl_lm.envs.rewards import reward_hook
    hook = reward_hook("vader")
    hook("yes ! i love music , it is so much fun !")   # 0.9014

Built-in hooks (:func:`reward_hook` names): ``"vader"``, VADER's compound sentiment score (Hutto and Gilbert
2014) in [-1, 1]. VADER is rule-based and deterministic and its lexicon ships in the ``vaderSentiment`` package,
so nothing is downloaded and the same text always earns the same reward.
"""

from __future__ import annotations

import functools
from typing import Callable

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

RewardHook = Callable[[str], float]  # reward of an agent turn, from the text the user replies with


@functools.lru_cache(maxsize=1)
def _vader_analyzer():
    """VADER's analyser, built once per process (it reads its lexicon from the package when built)."""
    return SentimentIntensityAnalyzer()


def vader_sentiment() -> RewardHook:
    """A hook returning VADER's compound score of the reply, in [-1, 1] (0 for text without sentiment)."""
    analyzer = _vader_analyzer()

    def hook(reply: str) -> float:
        return float(analyzer.polarity_scores(reply)["compound"])

    return hook


_HOOKS: dict[str, Callable[[], RewardHook]] = {"vader": vader_sentiment}


def reward_hook(name: str) -> RewardHook:
    """The registered reward hook called ``name`` (``"vader"``)."""
    if name not in _HOOKS:
        raise KeyError(f"unknown reward hook {name!r}; known: {', '.join(sorted(_HOOKS))}")
    return _HOOKS[name]()


def hook_names() -> list[str]:
    """Names of the registered reward hooks, sorted."""
    return sorted(_HOOKS)
