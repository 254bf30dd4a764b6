"""Policy extraction (docs/design.md section 3): next-token scores at a decision state, filtering and sampling.

Pure functions of head outputs: arrays in, arrays out. Shapes: ``[...]`` is any leading shape of decision states
(the decoder uses ``[B]``), ``K`` Q-heads, ``V`` the padded vocabulary; ids ``>= vocab_size`` are vocabulary
padding and always score -inf, so they are never sampled.

Scores, one per candidate next token ``a`` at hidden state ``h``:

- ``bc``:   ``log_softmax(LM(h, .))[a]``
- ``ilql``: ``log_softmax(LM(h, .))[a] + beta * (min_k Q_k(h, a) - V(h))``
- ``q``:    ``min_k Q_k(h, a)``
- ``actor``: ``bc``'s scores, read from a model whose LM head an actor-critic trained (``rl.objective: kl_actor``
  or ``archer``): the actor itself, sampled plainly.
- ``utterance``: ``bc``'s scores; the decoder samples N whole turns with them and says the one whose last token
  has the highest ``min_k Q_k`` (best-of-N, ``jaxrl_lm.generate``): the utterance-level critic's policy.

Sampling divides the scores by the temperature (so ``q`` samples ``softmax(min_k Q / T)``), keeps the top-k,
then the top-p nucleus, and draws; temperature 0 takes the argmax of the unfiltered scores.

Legal actions (``TrieArrays``, ``trie_mask``, ``trie_next``): when a task has a known set of legal action texts,
their token sequences (each ending with its EOT) form a trie (``jaxrl_lm.data.action_trie`` compiles it on the
host). A decoding row carries its trie node; ``trie_mask`` is the ``allowed`` mask of the node's children and
``trie_next`` follows the chosen token. The mask is applied to the scores before sampling (``sample_tokens``), so
every kind's choice, top-k, top-p and best-of all see the distribution restricted to the legal continuations.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxrl_lm.config import POLICY_KINDS  # the one list of policy kinds (the config validates against it)
from jaxrl_lm.rl.losses import mask_padded_vocab

LM_ONLY = ("bc", "utterance", "actor")  # the kinds whose next-token scores are the LM head's alone


def check_kind(kind: str) -> None:
    if kind not in POLICY_KINDS:
        raise ValueError(f"policy kind must be one of {POLICY_KINDS}, got {kind!r}")


def needs_heads(kind: str) -> tuple[bool, bool, bool]:
    """Which heads ``policy_scores(kind, ...)`` reads: ``(lm, q, value)``."""
    check_kind(kind)
    return kind != "q", kind not in LM_ONLY, kind == "ilql"


def policy_scores(
    kind: str,
    lm_logits: Optional[jnp.ndarray],
    q_logits: Optional[jnp.ndarray],
    value: Optional[jnp.ndarray],
    beta: jnp.ndarray | float,
    vocab_size: int,
) -> jnp.ndarray:
    """Unnormalised log-probabilities of the next token under policy ``kind`` (module docstring).

    Args:
      kind: one of ``POLICY_KINDS``.
      lm_logits: ``[..., V]`` float32 (every kind but q; None for q).
      q_logits: ``[K, ..., V]`` float32 (ilql, q; None for the others).
      value: ``[...]`` float32 (ilql only).
      beta: float32 scalar, the advantage weight of ilql.
      vocab_size: real vocabulary size; ids at or above it score -inf.

    Returns:
      ``[..., V]`` float32.
    """
    check_kind(kind)
    if kind == "q":
        return mask_padded_vocab(jnp.min(q_logits, axis=0), vocab_size)
    log_pi = jax.nn.log_softmax(mask_padded_vocab(lm_logits, vocab_size), axis=-1)
    if kind in LM_ONLY:
        return log_pi
    advantage = jnp.min(q_logits, axis=0) - value[..., None]
    # log_pi is already -inf on padded ids and a finite advantage cannot lift them.
    return log_pi + beta * advantage


def merged_policy_weights(kind: str, lm_weight, q_weight, beta, temperature):
    """The weights ``W'`` of one linear layer whose softmax is policy ``kind`` at temperature ``temperature``.

    The exactly-mergeable case: a single Q head (``K = 1``) that is linear in the hidden state ``h`` with a bias
    that is the same for every action, ``Q(h, a) = h . q_weight[a] + b``. Then ``softmax(h @ W'.T)`` equals
    ``softmax(policy_scores(kind, h @ lm_weight.T, Q, V, beta, vocab_size) / temperature)``, because the scores
    differ from ``h . W'[a] * temperature`` only by a per-state constant, which softmax ignores:

    - ``bc``:   ``log_softmax(l)(a) = l(a) - logsumexp(l)``; the normaliser is the same for every ``a``.
    - ``ilql``: ``log_softmax(LM)(a) + beta * (Q(h, a) - V(h)) = h . (lm_weight[a] + beta * q_weight[a]) + c(h)``
      with ``c(h) = -logsumexp(LM(h)) + beta * (b - V(h))``: the normaliser, ``V(h)`` and the bias ``b`` fold in.
    - ``q``:    ``min_k Q_k(h, a) = Q(h, a) = h . q_weight[a] + b``; ``b`` folds in.

    It is not exact (and callers must refuse to merge) for ``K > 1`` (a min over heads is not linear in ``h``), an
    mlp head, or a bias that differs between actions. Ids ``>= vocab_size`` score -inf in ``policy_scores``
    (probability 0); pass only the real vocabulary's rows, and the softmax over those ids is the same.

    Plain arithmetic on its arguments: NumPy arrays give NumPy, jax arrays give jax.

    Args:
      kind: ``"bc"`` (or ``"actor"``: the same LM head), ``"ilql"`` or ``"q"``.
      lm_weight: ``[V, D]`` LM-head rows (``LM(h) = h @ lm_weight.T``); bc, ilql (None for q).
      q_weight: ``[V, D]`` rows of the one linear Q head; ilql, q (None for bc).
      beta: scalar, the advantage weight of ilql.
      temperature: positive scalar.

    Returns:
      ``[V, D]``: ``lm_weight / T`` (bc), ``(lm_weight + beta * q_weight) / T`` (ilql), ``q_weight / T`` (q).
    """
    check_kind(kind)
    if kind in ("bc", "actor"):
        return lm_weight / temperature
    if kind == "q":
        return q_weight / temperature
    return (lm_weight + beta * q_weight) / temperature


def top_k_mask(scores: jnp.ndarray, k: int) -> jnp.ndarray:
    """``[..., V] -> [..., V]`` bool: the ``k`` highest scores (ties with the k-th are kept); all when ``k <= 0``."""
    if k <= 0 or k >= scores.shape[-1]:
        return jnp.ones(scores.shape, bool)
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return scores >= kth


def top_p_mask(scores: jnp.ndarray, p: jnp.ndarray | float) -> jnp.ndarray:
    """``[..., V] -> [..., V]`` bool: the smallest highest-probability set whose mass under ``softmax(scores)``
    reaches ``p`` (the nucleus; ties with its last member are kept). Always holds the argmax; all when ``p >= 1``.
    """
    order = jnp.sort(scores, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(order, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(order, n_keep - 1, axis=-1)
    # p >= 1 keeps everything exactly, which the float cumsum (summing to 1 - eps) would not guarantee.
    return (scores >= threshold) | (jnp.asarray(p) >= 1.0)


def sampling_logits(scores: jnp.ndarray, temperature: jnp.ndarray | float, top_k: int,
                    top_p: jnp.ndarray | float) -> jnp.ndarray:
    """Scores divided by ``temperature`` (> 0), -inf outside the top-k and then the top-p set. ``[..., V]``.

    The nucleus is taken over the tempered, top-k-filtered distribution (the order Hugging Face uses); its sort
    is skipped at run time when ``top_p >= 1``.
    """
    logits = scores / temperature
    logits = jnp.where(top_k_mask(logits, top_k), logits, -jnp.inf)
    return jax.lax.cond(jnp.asarray(top_p) < 1.0,
                        lambda x: jnp.where(top_p_mask(x, top_p), x, -jnp.inf), lambda x: x, logits)


def sample_tokens(rng: jax.Array, scores: jnp.ndarray, temperature: jnp.ndarray | float, top_k: int,
                  top_p: jnp.ndarray | float, allowed: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """One next token per state. ``[..., V] -> [...]`` int32.

    Args:
      rng: a PRNG key.
      scores: from ``policy_scores`` (-inf on padded ids).
      temperature: float32 scalar; ``<= 0`` is greedy (argmax, no randomness).
      top_k: static int, 0 = off.
      top_p: float32 scalar, ``>= 1`` = off.
      allowed: bool mask broadcastable to ``scores`` (e.g. ``[V]`` or ``[..., V]``), or None. It must allow at
        least one real id per state (the decoder always allows its stop tokens).
    """
    if allowed is not None:
        scores = jnp.where(allowed, scores, -jnp.inf)

    def draw(s):
        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        return jax.random.categorical(rng, sampling_logits(s, safe_t, top_k, top_p), axis=-1).astype(jnp.int32)

    def greedy(s):
        return jnp.argmax(s, axis=-1).astype(jnp.int32)

    # cond, not where: greedy decoding then pays for neither the noise nor the top-k / top-p sorts.
    return jax.lax.cond(jnp.asarray(temperature) > 0, draw, greedy, scores)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("offsets", "tokens", "children", "min_left", "roots"), meta_fields=("window",))
@dataclasses.dataclass(frozen=True)
class TrieArrays:
    """Token tries of legal action sets, flattened into one forest in CSR form, and each decoding row's root.

    The node ids of every trie of a batch share one numbering (a batch whose rows share one action set stores its
    trie once). Node ``n``'s outgoing edges are ``offsets[n] .. offsets[n + 1] - 1``, sorted by token; edge ``e``
    emits token ``tokens[e]`` and leads to node ``children[e]``. An action's last edge emits EOT and leads to a
    leaf (no edges), where the action is complete. Arrays may be padded past the real nodes and edges (padded
    nodes have no edges) so that batches of different sets share a compiled decoder.

    Attributes:
      offsets: ``[N + 1]`` int32, non-decreasing, ``offsets[0] = 0``.
      tokens: ``[E]`` int32 edge tokens.
      children: ``[E]`` int32 edge targets, in ``[0, N)``.
      min_left: ``[N]`` int32, the fewest tokens from node ``n`` to a complete action, its EOT included (0 at a
        leaf; a large number at padded nodes).
      roots: ``[B]`` int32, each row's start node; ``-1`` marks an unconstrained row.
      window: static int, at least the largest out-degree: edges read per row and step.
    """

    offsets: jax.Array
    tokens: jax.Array
    children: jax.Array
    min_left: jax.Array
    roots: jax.Array
    window: int


def trie_edges(trie: TrieArrays, node: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The outgoing edges of each row's node, ``window`` slots a row. ``[R] int32 -> ([R, W], [R, W]) int32``:
    the edge tokens (-1 in slots past the node's degree and for unconstrained rows, ``node < 0``) and children."""
    start = trie.offsets[jnp.maximum(node, 0)]
    degree = trie.offsets[jnp.maximum(node, 0) + 1] - start
    slot = jnp.arange(trie.window, dtype=jnp.int32)
    edge = jnp.minimum(start[:, None] + slot, trie.tokens.shape[0] - 1)
    real = (slot < degree[:, None]) & (node[:, None] >= 0)
    return jnp.where(real, trie.tokens[edge], -1), trie.children[edge]


def trie_mask(trie: TrieArrays, node: jnp.ndarray, remaining: jnp.ndarray | int, padded_vocab: int) -> jnp.ndarray:
    """``[R, Vp]`` bool: the tokens row ``r`` may emit at trie node ``node[r]`` with ``remaining`` (int32, scalar
    or ``[R]``) tokens of budget left, this one included.

    Token ``a`` is allowed iff an edge ``node -> c`` emits ``a`` and an action can still be completed in the budget
    from ``c``: ``1 + min_left[c] <= remaining``. Nothing else is allowed (a leaf allows nothing); an unconstrained
    row (``node < 0``) allows every id.
    """
    tokens, children = trie_edges(trie, node)
    fits = trie.min_left[children] < jnp.broadcast_to(remaining, node.shape)[:, None]
    target = jnp.where((tokens >= 0) & fits, tokens, padded_vocab)  # out of range: dropped by the scatter
    rows = jnp.arange(node.shape[0])[:, None]
    mask = jnp.zeros((node.shape[0], padded_vocab), bool).at[rows, target].set(True, mode="drop")
    return mask | (node < 0)[:, None]


def trie_next(trie: TrieArrays, node: jnp.ndarray, token: jnp.ndarray) -> jnp.ndarray:
    """The node each row reaches by emitting ``token``. ``[R], [R] -> [R]`` int32.

    An unconstrained row stays ``-1``; a token that is not an edge of the node (never chosen under ``trie_mask``)
    leaves the row where it is, so a row never leaves its trie.
    """
    tokens, children = trie_edges(trie, node)
    hit = tokens == token[:, None]
    return jnp.where(hit.any(axis=-1), jnp.max(jnp.where(hit, children, -1), axis=-1), node)
