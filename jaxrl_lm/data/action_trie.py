"""Legal action sets as token tries, compiled on the host for the decoder's per-step mask (docs/design.md section 3).

    trie = compile_action_trie(["crane", "slate", ...], tokenizer)      # one set, NumPy, cached by the caller
    arrays = pack_tries([trie], row_trie=[0, 0, -1])                  # rows 0, 1 constrained, row 2 free
    decode(..., trie=arrays, spec=spec)                                # jaxrl_lm.generate

Each action text is tokenized exactly as the data pipeline lays out an action turn and as the policy emits it:
the text encoded alone, then EOT (``jaxrl_lm.data.convert``). The token sequences form a trie: node 0 is the root
(nothing emitted yet), an edge emits one token, and every action ends with an EOT edge into a leaf. Inside the
jitted decode loop every row carries its node; each step allows exactly the node's children (an action that is
complete allows EOT, and longer actions sharing its tokens their next token), the chosen token moves the row
along the edge, and after the EOT edge the row is finished. So a constrained turn is always one of the actions,
byte for byte: ``compile_action_trie`` refuses a text that does not decode back from its own tokens.

Layout (``jaxrl_lm.rl.policy_extraction.TrieArrays``): compressed sparse rows, no ``[nodes, vocab]`` table.
Per node an edge offset and ``min_left`` (the fewest tokens to a complete action, so that a row never starts an
action it cannot finish within ``max_new_tokens``); per edge its token and its child; all int32. A trie of ``N``
nodes has ``N - 1`` edges, so it costs 16 bytes a node. The 12 972 Wordle guesses under SmolLM2's 49 152-id
tokenizer make 29 031 nodes (root degree 2 443): 0.46 MB, compiled in 0.2 s on one CPU core, where a dense
``[nodes, vocab]`` bool table would take 1.4 GB (under the byte tokenizer: 37 743 nodes, 0.6 MB; twenty
questions' 41 actions: 144 nodes under SmolLM2). ``pack_tries`` concatenates the distinct tries of a batch into
one forest (a set shared by every row is stored once; ``TrieArrays.roots`` says where each row starts) and pads
nodes, edges and the per-step window to powers of two, so a run of changing sets compiles a few decoders.

Per decoding step and row, the decoder reads the node's edges through a fixed window of ``W`` slots (``W`` = the
largest out-degree, rounded up to a power of two; the root's degree dominates it): three gathers of ``[R, W]``
int32 and one scatter of ``[R, W]`` ids into an ``[R, Vp]`` bool mask (``R * Vp`` bytes, a quarter of the float32
scores the heads already produce), then one more ``[R, W]`` gather to follow the chosen token. That is far below
the LM head's ``R * d_model * Vp`` multiply-adds for any trie. ``tests/test_action_trie.py`` measures a trie of
13 000 random strings under SmolLM2's tokenizer.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxrl_lm.data.tokenizer import Tokenizer
from jaxrl_lm.rl.policy_extraction import TrieArrays

UNREACHABLE = np.iinfo(np.int32).max // 2  # min_left of padded nodes: no budget ever reaches an action from them


@dataclasses.dataclass(frozen=True, eq=False)
class ActionTrie:
    """The token trie of one action set (module docstring), NumPy arrays in CSR form.

    Attributes:
      actions: the distinct action texts, in the order given.
      offsets: ``[N + 1]`` int32; node ``n``'s edges are ``offsets[n] .. offsets[n + 1] - 1``, sorted by token.
      tokens: ``[E]`` int32, the token each edge emits (EOT on an action's last edge).
      children: ``[E]`` int32, the node each edge leads to (ids in ``[1, N)``; the root is node 0).
      min_left: ``[N]`` int32, the fewest tokens from a node to a complete action, EOT included (0 at a leaf).
      eot_id: the end-of-turn id the actions end with.
      depth: the longest action in tokens, its EOT included: the token budget that lets every action finish.
    """

    actions: tuple[str, ...]
    offsets: np.ndarray
    tokens: np.ndarray
    children: np.ndarray
    min_left: np.ndarray
    eot_id: int
    depth: int

    @property
    def num_nodes(self) -> int:
        return len(self.min_left)

    @property
    def num_edges(self) -> int:
        return len(self.tokens)

    @property
    def max_degree(self) -> int:
        """The largest number of edges out of one node (the root's, in practice)."""
        return int(np.diff(self.offsets).max())

    @property
    def nbytes(self) -> int:
        """Bytes of the four arrays (what a decoder holds on the device for this set)."""
        return sum(a.nbytes for a in (self.offsets, self.tokens, self.children, self.min_left))


def compile_action_trie(actions: Sequence[str], tokenizer: Tokenizer) -> ActionTrie:
    """The trie of ``actions`` under ``tokenizer`` (module docstring). Duplicates are dropped.

    Raises ValueError for an empty set, a text that is not a ``str``, or a text whose tokens do not decode back
    to it (the policy reads a turn as the decoding of its tokens, so such an action could never be matched).
    """
    texts = list(dict.fromkeys(actions))
    if not texts:
        raise ValueError("compile_action_trie: the action set is empty; a constrained turn needs at least one action")
    bad = [a for a in texts if not isinstance(a, str)]
    if bad:
        raise ValueError(f"compile_action_trie: actions must be str, got {type(bad[0]).__name__} {bad[0]!r}")
    ids = tokenizer.encode_batch(texts)
    decoded = tokenizer.backend.decode_batch([x.tolist() for x in ids], skip_special_tokens=False)
    for text, back, x in zip(texts, decoded, ids):
        if back != text:
            raise ValueError(f"compile_action_trie: action {text!r} encodes to {x.tolist()}, which decodes to "
                             f"{back!r} under tokenizer {tokenizer.name}: write the action as the tokenizer "
                             f"round-trips it")
    specials = np.array([tokenizer.bos_id, tokenizer.eos_id, tokenizer.eot_id, tokenizer.pad_id])
    for text, x in zip(texts, ids):
        if np.isin(x, specials).any():
            raise ValueError(f"compile_action_trie: action {text!r} encodes to a special token ({x.tolist()}); "
                             f"an action's text may not hold its end of turn")
    eot = int(tokenizer.eot_id)
    # Sorted sequences visit the trie depth first with siblings in token order: each one shares its longest
    # common prefix with the one before and adds a node per token after it (at least its EOT leaf, since EOT
    # ends every sequence and occurs nowhere else, so no sequence is a prefix of another).
    sequences = sorted(tuple(x.tolist()) + (eot,) for x in ids)
    parent, token, depth = [-1], [-1], [0]
    path: list[int] = []  # node ids along the previous sequence: path[d] is at depth d + 1
    previous: tuple[int, ...] = ()
    for seq in sequences:
        shared = 0
        while shared < len(previous) and previous[shared] == seq[shared]:
            shared += 1
        del path[shared:]
        for d in range(shared, len(seq)):
            parent.append(path[-1] if path else 0)
            token.append(seq[d])
            depth.append(d + 1)
            path.append(len(parent) - 1)
        previous = seq
    parent_a, token_a, depth_a = (np.asarray(x, np.int64) for x in (parent, token, depth))
    n = len(parent_a)
    # Edges grouped by parent; a stable sort keeps siblings in creation order, which is token order.
    children = np.argsort(parent_a[1:], kind="stable") + 1
    degree = np.bincount(parent_a[1:], minlength=n)
    offsets = np.concatenate([[0], np.cumsum(degree)])
    min_left = np.where(degree == 0, 0, UNREACHABLE).astype(np.int64)
    for d in range(int(depth_a.max()), 0, -1):
        nodes = np.flatnonzero(depth_a == d)
        np.minimum.at(min_left, parent_a[nodes], min_left[nodes] + 1)
    return ActionTrie(actions=tuple(texts), offsets=offsets.astype(np.int32), tokens=token_a[children].astype(np.int32),
                      children=children.astype(np.int32), min_left=min_left.astype(np.int32), eot_id=eot,
                      depth=int(depth_a.max()))


def _power_of_two(n: int, floor: int) -> int:
    return 1 << (max(int(n), int(floor)) - 1).bit_length()


def pack_tries(tries: Sequence[ActionTrie], row_trie: Sequence[int], *, min_nodes: int = 64, min_edges: int = 64,
               min_window: int = 8) -> TrieArrays:
    """One forest of ``tries`` for a decoding batch: row ``b`` starts at the root of ``tries[row_trie[b]]``, or is
    unconstrained when ``row_trie[b] == -1`` (batch padding, or an episode without a set).

    Nodes and edges are padded to powers of two of at least ``min_nodes`` / ``min_edges``, and the window to the
    power of two at least the largest out-degree and ``min_window``, so that batches of different sets reuse a
    compiled decoder. Returns ``TrieArrays`` with NumPy leaves (``[B]`` roots, ``B = len(row_trie)``).
    """
    row_trie = np.asarray(row_trie, np.int64)
    if row_trie.ndim != 1 or ((row_trie < -1) | (row_trie >= len(tries))).any():
        raise ValueError(f"pack_tries: row_trie must be one index in [-1, {len(tries)}) per row, got {row_trie}")
    node_start = np.cumsum([0] + [t.num_nodes for t in tries])
    edge_start = np.cumsum([0] + [t.num_edges for t in tries])
    nodes, edges = _power_of_two(node_start[-1], min_nodes), _power_of_two(max(edge_start[-1], 1), min_edges)
    offsets = np.full(nodes + 1, edge_start[-1], np.int32)
    tokens, children = np.full(edges, -1, np.int32), np.zeros(edges, np.int32)
    min_left = np.full(nodes, UNREACHABLE, np.int32)
    for t, n0, e0 in zip(tries, node_start, edge_start):
        offsets[n0:n0 + t.num_nodes] = t.offsets[:-1] + e0
        tokens[e0:e0 + t.num_edges] = t.tokens
        children[e0:e0 + t.num_edges] = t.children + n0
        min_left[n0:n0 + t.num_nodes] = t.min_left
    roots = np.where(row_trie >= 0, node_start[np.maximum(row_trie, 0)], -1).astype(np.int32)
    window = _power_of_two(max([t.max_degree for t in tries], default=1), min_window)
    return TrieArrays(offsets=offsets, tokens=tokens, children=children, min_left=min_left, roots=roots, window=window)
