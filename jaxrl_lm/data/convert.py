"""Episode -> per-token arrays: the token layout of DESIGN.md section 2.

Layout. Let ``w_k`` be the ids of turn ``k``'s text (``Tokenizer.encode_batch``, no special tokens added) for the
turns ``k = 0..T-1``. The untruncated sequence is::

    x = [BOS] + w_0 + [EOT] + w_1 + [EOT] + ... + w_{T-1} + [EOT]

Every turn ends with one EOT that belongs to that turn (same role, same turn id): after an observation it hands
the agent the move, and after an action it is the agent's own "I am done" token, so the policy learns when to
stop. Per position:

- ``action_mask``: 1 on ``w_k`` and its EOT when turn ``k`` is an action turn; 0 on BOS and observation turns.
- ``turn_ids``: ``k`` on ``w_k`` and its EOT; BOS takes the turn id of the token after it (0 when uncut).
- ``reward``: turn ``k``'s reward on the EOT of action turn ``k`` (its last token); 0 elsewhere.
- ``done``: 1 on the EOT of the last action turn when the episode has ``done: true`` and nothing was cut;
  0 everywhere else.

BOS is an observation position: it is the state before the first token, so an episode that opens with an action
still has a decision position for that action's first token.

Truncation, when ``len(x) > seq_len``:

- ``"right"``: keep ``x[:seq_len]`` (the start of the episode).
- ``"left"``: keep ``[BOS] + x[len(x) - (seq_len - 1):]`` (the end), BOS re-labelled with the turn id of the
  first kept token, so the row still starts from a state token and turn ids never run backwards. Turn ids keep
  their original values (they are only compared, never used as indices).
- Either way the episode is marked truncated and ``done`` is 0 everywhere: a cut episode bootstraps, it never
  terminates. A reward survives only with its turn's EOT (a right cut drops the reward of a turn it cuts in two:
  inside the window that reward was never received).

An episode whose kept window has no action token has no decision position; it is counted (``DataStats``), not
silently dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Literal

import numpy as np

from jaxrl_lm.data.episodes import Episode
from jaxrl_lm.data.stats import DataStats
from jaxrl_lm.data.tokenizer import Tokenizer

# Per-token arrays stored for one episode; segment_ids are added when rows are built (packing.py).
TOKEN_FIELDS: dict[str, np.dtype] = {
    "tokens": np.dtype(np.int32),
    "action_mask": np.dtype(np.int32),
    "reward": np.dtype(np.float32),
    "done": np.dtype(np.int32),
    "turn_ids": np.dtype(np.int32),
}


@dataclasses.dataclass(frozen=True)
class TokenizedEpisode:
    """One episode as token arrays.

    Attributes:
      arrays: ``TOKEN_FIELDS`` -> ``[n]`` arrays with ``2 <= n <= seq_len``.
      truncated: True when the token window was cut to ``seq_len``.
      id, source, terminal, episode_return, meta: carried over from the ``Episode`` (return = sum of all its
        rewards, before any cut).
    """

    id: str
    source: str
    arrays: dict[str, np.ndarray]
    truncated: bool
    terminal: bool
    episode_return: float
    meta: dict

    @property
    def num_tokens(self) -> int:
        return int(self.arrays["tokens"].shape[0])

    @property
    def has_decision(self) -> bool:
        """True when some position predicts an action token (DESIGN.md section 2, set D is non-empty)."""
        return bool(self.arrays["action_mask"][1:].any())


def layout(episode: Episode, turn_tokens: list[np.ndarray], bos_id: int, eot_id: int) -> dict[str, np.ndarray]:
    """The untruncated arrays of one episode (module docstring). ``turn_tokens[k]``: ``[n_k] int32``.

    Returns ``TOKEN_FIELDS`` -> ``[1 + sum_k (n_k + 1)]``.
    """
    lens = np.array([len(w) + 1 for w in turn_tokens], dtype=np.int64)
    is_action = np.array([t.role == "action" for t in episode.turns])
    eot_pos = 1 + np.cumsum(lens) - 1  # index of each turn's EOT in x (after the leading BOS)
    n = 1 + int(lens.sum())
    tokens = np.empty(n, np.int32)
    tokens[0] = bos_id
    tokens[1:] = np.concatenate([np.append(w, eot_id) for w in turn_tokens])
    turn_ids = np.concatenate([[0], np.repeat(np.arange(len(lens)), lens)]).astype(np.int32)
    action_mask = np.concatenate([[0], np.repeat(is_action, lens)]).astype(np.int32)
    reward = np.zeros(n, np.float32)
    reward[eot_pos[is_action]] = [t.reward for t in episode.turns if t.role == "action"]
    done = np.zeros(n, np.int32)
    if episode.done:
        done[eot_pos[is_action][-1]] = 1
    return {"tokens": tokens, "action_mask": action_mask, "reward": reward, "done": done, "turn_ids": turn_ids}


def truncate(arrays: dict[str, np.ndarray], seq_len: int, side: Literal["left", "right"]) -> tuple[dict, bool]:
    """Cuts ``[n]`` arrays to at most ``seq_len`` (module docstring). Returns ``(arrays, truncated)``."""
    n = arrays["tokens"].shape[0]
    if n <= seq_len:
        return arrays, False
    if side == "right":
        out = {k: v[:seq_len].copy() for k, v in arrays.items()}
    elif side == "left":
        keep = np.concatenate([[0], np.arange(n - (seq_len - 1), n)])
        out = {k: v[keep] for k, v in arrays.items()}
        out["turn_ids"][0] = out["turn_ids"][1]
    else:
        raise ValueError(f"data.truncate_side must be 'left' or 'right', got {side!r}")
    out["done"][:] = 0
    return out, True


def tokenize_episode(episode: Episode, tokenizer: Tokenizer, *, seq_len: int,
                     truncate_side: Literal["left", "right"]) -> TokenizedEpisode:
    """Tokenizes, lays out and truncates one episode to at most ``seq_len`` tokens."""
    if seq_len < 2:
        raise ValueError(f"data.seq_len must be at least 2 (BOS and one token), got {seq_len}")
    turn_tokens = tokenizer.encode_batch([t.text for t in episode.turns])
    arrays, truncated = truncate(layout(episode, turn_tokens, tokenizer.bos_id, tokenizer.eot_id), seq_len,
                                 truncate_side)
    return TokenizedEpisode(id=episode.id, source=episode.source, arrays=arrays, truncated=truncated,
                            terminal=episode.done, episode_return=episode.episode_return, meta=episode.meta)


def tokenize_episodes(episodes: Iterable[Episode], tokenizer: Tokenizer, *, seq_len: int,
                      truncate_side: Literal["left", "right"], stats: DataStats) -> Iterator[TokenizedEpisode]:
    """The usable tokenized episodes; each one, and each one left out for having no decision, goes into ``stats``."""
    for ep in episodes:
        tok = tokenize_episode(ep, tokenizer, seq_len=seq_len, truncate_side=truncate_side)
        if not tok.has_decision:
            stats.no_decision.append(f"{tok.source}: id {tok.id!r}: no action token within the {seq_len}-token "
                                     f"window (truncate_side={truncate_side!r})")
            continue
        stats.add(tok.arrays["action_mask"], tok.truncated, tok.episode_return)
        yield tok
