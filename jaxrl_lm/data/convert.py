"""Episode -> per-token arrays: the token layout of docs/design.md section 2.

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
- ``"split"`` (the default): nothing is dropped. The episode becomes consecutive windows of whole turns, each
  ``[BOS] + w_a + [EOT] + ... + w_b + [EOT]`` with at most ``seq_len`` tokens. A window that is not the last ends
  on an observation turn, and the next window starts at that same observation (one turn of overlap), so every
  action's next state is inside its window: the window is marked truncated and its last action bootstraps from
  the value at the window's last position, which is the very state the next window's first decision starts from
  (minus the history before it). The last window keeps ``done``: the episode really ended inside it. Each action
  turn lies in exactly one window. When not even ``[BOS]``, the first observation, an action and the next
  observation fit, the window is the longest prefix of whole turns that does (cut right as above if not one turn
  fits) and the next window starts at the first observation after it.

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
      truncated: True when the token window was cut to ``seq_len`` (or is a ``"split"`` window before the last).
      window: index of this window among its episode's (0 unless ``truncate_side`` is ``"split"``).
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
    window: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.arrays["tokens"].shape[0])

    @property
    def has_decision(self) -> bool:
        """True when some position predicts an action token (docs/design.md section 2, set D is non-empty)."""
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


def split_windows(turn_lens: np.ndarray, is_action: np.ndarray, seq_len: int) -> list[tuple[int, int]]:
    """The ``"split"`` windows (module docstring) as inclusive turn ranges ``(a, b)``.

    ``turn_lens``: ``[T]`` tokens of each turn, its EOT included; ``is_action``: ``[T]`` bool.
    """
    windows, a, n_turns = [], 0, len(turn_lens)
    while a < n_turns:
        fits = np.cumsum(turn_lens[a:]) <= seq_len - 1  # turns a..a+j fit after a BOS
        last_fit = a + int(fits.sum()) - 1  # a - 1 when not even turn a fits
        if last_fit >= n_turns - 1:
            windows.append((a, n_turns - 1))
            break
        # End on an observation after at least one action, so the window's last action has its next state.
        ends = [b for b in range(a + 1, last_fit + 1) if not is_action[b] and is_action[a:b].any()]
        if ends:
            windows.append((a, ends[-1]))
            a = ends[-1]
            continue
        b = max(last_fit, a)  # the longest whole-turn prefix, or turn a alone (cut right later)
        windows.append((a, b))
        later_obs = [k for k in range(b + 1, n_turns) if not is_action[k]]
        if not later_obs:
            break
        a = later_obs[0]
    return windows


def _window(arrays: dict[str, np.ndarray], starts: np.ndarray, turn_lens: np.ndarray, a: int, b: int,
            keep_done: bool) -> dict[str, np.ndarray]:
    """``[BOS] + turns a..b`` of the untruncated ``arrays``; ``starts[k]``: position of turn k's first token."""
    keep = np.concatenate([[0], np.arange(starts[a], starts[b] + turn_lens[b])])
    out = {k: v[keep] for k, v in arrays.items()}
    out["turn_ids"][0] = out["turn_ids"][1]
    if not keep_done:
        out["done"][:] = 0
    return out


def tokenize_episode_windows(episode: Episode, tokenizer: Tokenizer, *, seq_len: int,
                             truncate_side: Literal["left", "right", "split"]) -> list[TokenizedEpisode]:
    """Tokenizes and lays out one episode as windows of at most ``seq_len`` tokens: one window unless
    ``truncate_side`` is ``"split"`` and the episode is longer. Window ``j > 0`` has id ``"<id>/<j>"``."""
    if seq_len < 2:
        raise ValueError(f"data.seq_len must be at least 2 (BOS and one token), got {seq_len}")
    turn_tokens = tokenizer.encode_batch([t.text for t in episode.turns])
    arrays = layout(episode, turn_tokens, tokenizer.bos_id, tokenizer.eot_id)

    def make(arr: dict, truncated: bool, j: int = 0) -> TokenizedEpisode:
        return TokenizedEpisode(id=episode.id if j == 0 else f"{episode.id}/{j}", source=episode.source,
                                arrays=arr, truncated=truncated, terminal=episode.done,
                                episode_return=episode.episode_return, meta=episode.meta, window=j)

    if truncate_side != "split":
        return [make(*truncate(arrays, seq_len, truncate_side))]
    if arrays["tokens"].shape[0] <= seq_len:
        return [make(arrays, False)]
    turn_lens = np.array([len(w) + 1 for w in turn_tokens], np.int64)
    starts = 1 + np.concatenate([[0], np.cumsum(turn_lens)[:-1]])
    is_action = np.array([t.role == "action" for t in episode.turns])
    windows = split_windows(turn_lens, is_action, seq_len)
    out = []
    for j, (a, b) in enumerate(windows):
        whole = b == len(turn_lens) - 1
        arr = _window(arrays, starts, turn_lens, a, b, keep_done=whole)
        arr, cut = truncate(arr, seq_len, "right")  # only when turn a alone does not fit
        out.append(make(arr, truncated=cut or not whole, j=j))
    return out


def tokenize_episode(episode: Episode, tokenizer: Tokenizer, *, seq_len: int,
                     truncate_side: Literal["left", "right"]) -> TokenizedEpisode:
    """Tokenizes, lays out and truncates one episode to at most ``seq_len`` tokens (one window)."""
    if truncate_side == "split":
        raise ValueError("tokenize_episode gives one window; use tokenize_episode_windows for truncate_side='split'")
    return tokenize_episode_windows(episode, tokenizer, seq_len=seq_len, truncate_side=truncate_side)[0]


def tokenize_episodes(episodes: Iterable[Episode], tokenizer: Tokenizer, *, seq_len: int,
                      truncate_side: Literal["left", "right", "split"], stats: DataStats) -> Iterator[TokenizedEpisode]:
    """The usable tokenized windows; each one, and each one left out for having no decision, goes into ``stats``."""
    for ep in episodes:
        for tok in tokenize_episode_windows(ep, tokenizer, seq_len=seq_len, truncate_side=truncate_side):
            if not tok.has_decision:
                stats.no_decision.append(f"{tok.source}: id {tok.id!r}: no action token within the {seq_len}-token "
                                         f"window (truncate_side={truncate_side!r})")
                continue
            stats.add(tok.arrays["action_mask"], tok.truncated, tok.episode_return, first_window=tok.window == 0)
            yield tok
