"""Jitted, batched decoding of one agent turn per episode through a KV cache (docs/design.md section 3).

``decode`` is one ``jax.jit``: it prefills the left-padded prompts into a KV cache, then runs a
``lax.while_loop`` of single-token steps until every row has emitted a stop token (EOT, the end of an agent
turn, or any other id in ``stop_ids``) or ``max_new_tokens`` are out. Each step scores the next token with
``jaxrl_lm.rl.policy_extraction`` (bc / ilql / q), filters (allowed-token mask, legal-action trie, top-k, top-p)
and samples.

What recompiles: the static ``DecodeSpec`` (policy kind, top-k, token budget, best-of), the model graph, and
the shapes ``[B, P]`` of the prompt batch, and a legal-action trie's padded sizes and window; ``Sampling`` (beta,
temperature, top-p), the stop ids, the allowed-token mask and the trie's contents are traced. Callers bucket ``B``
and ``P`` to powers of two (``bucket``; ``jaxrl_lm.data.action_trie.pack_tries`` does the same for tries) so a
rollout whose batch shrinks and whose prompts grow compiles a handful of shapes, not one per call.

Legal actions (``trie``, a ``TrieArrays`` from ``jaxrl_lm.data.action_trie``): each row carries a node of its
action set's token trie; every step masks the scores to the node's children (intersected with ``allowed``) before
the choice, and the chosen token advances the node, so a constrained turn is one of the row's actions followed by
EOT. Without a trie (``trie=None``) no mask is built and no node is carried: the decoder's program is the one it
was before tries existed, and its outputs are bitwise the same (``tests/test_action_trie.py``).

Best-of-N (``DecodeSpec.best_of = N``): each episode's prompt is prefilled once, then its hidden state and KV
cache are repeated N times (the prompt's compute is paid once, not N times), the N candidate turns are sampled
independently, and the one with the highest *final-token Q-value* is kept: ``min_k Q_k(h, a_last)``
where ``a_last`` is the turn's last token (its EOT when it finished) and ``h`` the state just before it. Under
the token-level Bellman backup that is the value of the completed turn (its reward plus the discounted value of
what follows), conditioned on every token of the candidate, where the first token's Q would only see the first
token. Candidates that ran out of budget before a stop token rank below every finished one. With
``DecodeSpec.greedy_candidate`` the first of each episode's N candidates is decoded greedily (argmax of the same
scores, masks included) and the other N - 1 are sampled, so the choice can always fall back on the greedy turn:
a critic that ranks turns well then never does worse than the greedy decoding of the same head.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.models import KVCache, Params, QTransformer, model_graphdef
from jaxrl_lm.rl.policy_extraction import (
    TrieArrays, check_kind, needs_heads, policy_scores, sample_tokens, trie_mask, trie_next,
)


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The static part of decoding: each distinct spec compiles its own decoder.

    kind: one of ``POLICY_KINDS`` (``jaxrl_lm.rl.policy_extraction``).
    top_k: keep the k best tokens before sampling; 0 = off.
    max_new_tokens: token budget of one turn, its stop token included.
    best_of: candidate turns sampled per episode; the highest final-token Q-value wins (module docstring).
    greedy_candidate: best-of-N only: the first candidate of each episode is the greedy turn, the others sampled.
    shared_prefill: best-of-N only: prefill each prompt once and copy its cache to the N candidates (default);
      False prefills the N copies as separate rows, the same result at N times the prefill (the baseline of
      ``best_of_throughput``).
    """

    kind: str = "ilql"
    top_k: int = 0
    max_new_tokens: int = 32
    best_of: int = 1
    greedy_candidate: bool = False
    shared_prefill: bool = True

    def __post_init__(self) -> None:
        check_kind(self.kind)
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.best_of < 1:
            raise ValueError(f"best_of must be >= 1, got {self.best_of}")
        if self.greedy_candidate and self.best_of < 2:
            raise ValueError(f"greedy_candidate adds the greedy turn to best-of-N candidates: it needs best_of >= 2, "
                             f"got {self.best_of}")


class Sampling(NamedTuple):
    """The traced part of decoding (changing it never recompiles): float32 scalars.

    beta: ilql's advantage weight. temperature: 0 = greedy. top_p: nucleus mass, 1 = off.
    """

    beta: jax.Array
    temperature: jax.Array
    top_p: jax.Array

    @classmethod
    def make(cls, beta: float = 1.0, temperature: float = 1.0, top_p: float = 1.0) -> "Sampling":
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        return cls(*(jnp.float32(x) for x in (beta, temperature, top_p)))


class Decoded(NamedTuple):
    """One decoded turn per episode.

    tokens: ``[B, max_new_tokens]`` int32; the turn (stop token included), then ``pad_id``.
    lengths: ``[B]`` int32, tokens emitted (stop token included; 0 for batch-padding rows).
    stopped: ``[B]`` bool, True when the turn ended on a stop token (False: the budget ran out).
    score: ``[B]`` float32, ``min_k Q_k`` of the last emitted token (what best-of ranks; 0 when unused).
    """

    tokens: jax.Array
    lengths: jax.Array
    stopped: jax.Array
    score: jax.Array


class _Loop(NamedTuple):
    """The ``while_loop`` carry; ``t`` tokens have been emitted, the last one not yet fed to the trunk."""

    t: jax.Array
    cache: KVCache
    h: jax.Array  # [R, D] hidden state that scores token t
    out: Decoded
    done: jax.Array  # [R] bool
    rng: jax.Array
    node: Optional[jax.Array] = None  # [R] int32 legal-action trie node (-1: unconstrained); None without a trie


@functools.lru_cache(maxsize=None)
def bucket(n: int, floor: int = 8) -> int:
    """The power of two ``>= max(n, floor)``: the padded batch size or prompt length that shares one compile."""
    return 1 << (max(int(n), int(floor)) - 1).bit_length()


def prompt_layout(prompt_lengths: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """Segment ids and positions of left-padded prompts. ``[B] int32 -> ([B, P], [B, P])`` int32.

    A row's real tokens are its last ``prompt_lengths[b]`` slots: segment 1, positions 0.. from the first real
    token; the padding before them has segment 0 (attends to no real token) and position 0.
    """
    start = width - prompt_lengths[:, None]
    slot = jnp.arange(width, dtype=jnp.int32)[None, :]
    return (slot >= start).astype(jnp.int32), jnp.maximum(slot - start, 0)


def _choose(model: QTransformer, spec: DecodeSpec, sampling: Sampling, stop_ids: jax.Array, pad_id: jax.Array,
            allowed: Optional[jax.Array], trie: Optional[TrieArrays], s: _Loop) -> _Loop:
    """Scores, samples and records token ``s.t`` of every row from ``s.h``; finished rows emit ``pad_id``."""
    use_lm, use_q, use_v = needs_heads(spec.kind)
    lm = model.lm_logits(s.h) if use_lm else None
    q = model.q_logits(s.h) if use_q else None
    value = model.value(s.h) if use_v else None
    scores = policy_scores(spec.kind, lm, q, value, sampling.beta, model.cfg.vocab_size)
    rng, key = jax.random.split(s.rng)
    if trie is not None:
        # Finished rows allow everything: their draw is discarded, and an all -inf row would only make NaNs.
        legal = trie_mask(trie, s.node, spec.max_new_tokens - s.t, scores.shape[-1]) | s.done[:, None]
        allowed = legal if allowed is None else legal & allowed
    token = sample_tokens(key, scores, sampling.temperature, spec.top_k, sampling.top_p, allowed)
    if spec.greedy_candidate:  # row b * n is episode b's greedy candidate: the same choice at temperature 0
        greedy = sample_tokens(key, scores, 0.0, spec.top_k, 1.0, allowed)
        token = jnp.where(jnp.arange(token.shape[0]) % spec.best_of == 0, greedy, token)
    if q is not None:
        q_token = jnp.take_along_axis(jnp.min(q, axis=0), token[:, None], axis=-1)[:, 0]
    elif spec.best_of > 1:
        q_token = jnp.min(model.q_at(s.h, token), axis=0)  # bc: one row per head, never the [K, R, V] logits
    else:
        q_token = jnp.zeros(token.shape, jnp.float32)
    live = ~s.done
    token = jnp.where(live, token, pad_id)
    out = Decoded(
        tokens=s.out.tokens.at[:, s.t].set(token),
        lengths=s.out.lengths + live.astype(jnp.int32),
        stopped=s.out.stopped | (live & jnp.isin(token, stop_ids)),
        score=jnp.where(live, q_token, s.out.score),
    )
    node = None if trie is None else jnp.where(live, trie_next(trie, s.node, token), s.node)
    return s._replace(t=s.t + 1, out=out, done=s.done | out.stopped, rng=rng, node=node)


def _best_of(d: Decoded, n: int) -> Decoded:
    """Keeps, per episode, the best of its ``n`` adjacent candidate rows. ``[B * n, ...] -> [B, ...]``."""
    grouped = jax.tree.map(lambda x: x.reshape((-1, n) + x.shape[1:]), d)
    finished = jnp.where(grouped.stopped, grouped.score, -jnp.inf)
    key = jnp.where(grouped.stopped.any(axis=1, keepdims=True), finished, grouped.score)
    best = jnp.argmax(key, axis=1)
    return jax.tree.map(lambda x: jnp.take_along_axis(x, best.reshape((-1, 1) + (1,) * (x.ndim - 2)), 1)[:, 0],
                        grouped)


def prefill(model: QTransformer, prompt: jax.Array, prompt_lengths: jax.Array, max_new_tokens: int
            ) -> tuple[jax.Array, KVCache]:
    """Runs left-padded prompts into a fresh cache. ``[B, P], [B] int32 -> (h [B, D] float32, cache)``.

    ``h`` is every row's state after its last prompt token (the last slot, as the padding is on the left); the
    cache has one slot per prompt token and per generated token but the last (which is never fed back).
    """
    width = prompt.shape[1]
    segment_ids, positions = prompt_layout(prompt_lengths, width)
    cache = model.init_cache(prompt.shape[0], width + max_new_tokens - 1)
    h, cache = model.hidden_with_cache(prompt, positions, cache, jnp.int32(0), segment_ids)
    return h[:, -1], cache


def advance(model: QTransformer, token: jax.Array, prompt_lengths: jax.Array, cache: KVCache, width: int,
            t: jax.Array) -> tuple[jax.Array, KVCache]:
    """Feeds generated token number ``t`` (0-based) of every row. ``[B], [B] int32 -> (h [B, D], cache)``.

    It goes to cache slot ``width + t`` at position ``prompt_lengths + t``, with segment 1 like the prompt.
    """
    h, cache = model.hidden_with_cache(token[:, None], (prompt_lengths + t)[:, None], cache, width + t)
    return h[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def decode(graphdef: nnx.GraphDef, params: Params, prompt: jax.Array, prompt_lengths: jax.Array, rng: jax.Array,
           sampling: Sampling, stop_ids: jax.Array, pad_id: jax.Array, allowed: Optional[jax.Array] = None,
           trie: Optional[TrieArrays] = None, *, spec: DecodeSpec) -> Decoded:
    """Decodes one turn per row.

    Args:
      graphdef, params: the ``QTransformer`` (``jaxrl_lm.train.split_model``), static graph and parameter dict.
      prompt: ``[B, P]`` int32, left-padded: row ``b``'s prompt fills its last ``prompt_lengths[b]`` slots.
      prompt_lengths: ``[B]`` int32, ``>= 1`` for real rows; 0 marks a row that only pads the batch (it emits
        nothing). Real positions must stay below ``max_seq_len``: ``prompt_lengths + max_new_tokens <=
        cfg.max_seq_len`` (GPT-2's position table clamps silently otherwise).
      rng: a PRNG key (unused when ``sampling.temperature == 0``).
      sampling: beta / temperature / top-p.
      stop_ids: ``[S]`` int32, tokens that end a turn (EOT at least); they are emitted.
      pad_id: int32 scalar written after a row's stop token.
      allowed: ``[Vp]`` or ``[B, Vp]`` bool, the tokens that may be sampled, or None (all real ids). It must
        allow the stop ids.
      trie: the legal-action tries of the rows (``TrieArrays``, ``roots`` of shape ``[B]``; module docstring), or
        None. A constrained row emits one of its actions and EOT, provided one fits ``max_new_tokens`` (longer
        actions are never started) and ``allowed`` allows its tokens.
      spec: the static ``DecodeSpec``.

    Returns:
      ``Decoded`` with ``[B, max_new_tokens]`` tokens; best-of-N returns each episode's best candidate.
    """
    model = nnx.merge(graphdef, params)
    n, new = spec.best_of, spec.max_new_tokens
    if trie is not None and trie.roots.shape != prompt_lengths.shape:
        raise ValueError(f"decode: trie.roots has shape {trie.roots.shape}, expected one root per prompt row "
                         f"{prompt_lengths.shape} (-1 for an unconstrained row)")
    # Candidates of one episode are adjacent rows b * n + i. Shared: one prefill per episode, its state and cache
    # copied to the N candidates; otherwise (the benchmark's baseline) N prefills of the same prompt.
    if n > 1 and not spec.shared_prefill:
        prompt, prompt_lengths = jnp.repeat(prompt, n, axis=0), jnp.repeat(prompt_lengths, n, axis=0)
    h, cache = prefill(model, prompt, prompt_lengths, new)
    if n > 1 and spec.shared_prefill:
        h, prompt_lengths = jnp.repeat(h, n, axis=0), jnp.repeat(prompt_lengths, n, axis=0)
        cache = KVCache(jnp.repeat(cache.k, n, axis=1), jnp.repeat(cache.v, n, axis=1),
                        jnp.repeat(cache.segment_ids, n, axis=0))
    if n > 1:
        if allowed is not None and allowed.ndim == 2:
            allowed = jnp.repeat(allowed, n, axis=0)
        if trie is not None:
            trie = dataclasses.replace(trie, roots=jnp.repeat(trie.roots, n, axis=0))
    rows = prompt_lengths.shape[0]
    empty = Decoded(jnp.full((rows, new), pad_id, jnp.int32), jnp.zeros(rows, jnp.int32), jnp.zeros(rows, bool),
                    jnp.zeros(rows, jnp.float32))
    choose = functools.partial(_choose, model, spec, sampling, stop_ids, pad_id, allowed, trie)
    node = None if trie is None else jnp.asarray(trie.roots, jnp.int32)
    state = choose(_Loop(jnp.int32(0), cache, h, empty, prompt_lengths == 0, rng, node))

    def step(s: _Loop) -> _Loop:
        h, cache = advance(model, s.out.tokens[:, s.t - 1], prompt_lengths, s.cache, prompt.shape[1], s.t - 1)
        return choose(s._replace(h=h, cache=cache))

    state = jax.lax.while_loop(lambda s: (s.t < new) & ~jnp.all(s.done), step, state)
    return _best_of(state.out, n) if n > 1 else state.out


def _random_prompts(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, seed: int
                    ) -> tuple[jax.Array, jax.Array]:
    """The benchmarks' prompts: ``[batch, prompt_len]`` random ids, all of full length, checked to fit the model."""
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds model.max_seq_len "
                         f"{cfg.max_seq_len}")
    rng = np.random.default_rng(seed)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    return prompt, jnp.full((batch,), prompt_len, jnp.int32)


def _timed(fn, repeats: int) -> tuple[float, float]:
    """``(first, best)``: seconds of a first call of ``fn`` (compile included) and the best of ``repeats`` more."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return first, best


def decode_throughput(cfg: ModelConfig, params: Params, *, batch: int = 8,
                      prompt_len: int = 64, new_tokens: int = 128, kind: str = "bc", repeats: int = 3,
                      seed: int = 0, temperature: float = 1.0) -> dict[str, float]:
    """Decoding speed at one shape: random prompts, no stop token (every row emits ``new_tokens``), sampling at
    ``temperature`` (0: greedy).

    Returns a dict: ``compile_s`` (first call, compile included), ``decode_s`` (best of ``repeats`` timed calls:
    prefill plus every step), ``new_tokens_per_s`` (``batch * new_tokens / decode_s``), ``step_ms``
    (``decode_s / new_tokens``), ``prefill_ms`` (best of ``repeats`` calls of the prompt prefill alone, a jitted
    ``prefill``) and ``token_ms`` (``(decode_s - prefill) / new_tokens``: one decoding step, its head and sampling
    included), with the shape, policy kind and temperature.
    """
    prompt, lengths = _random_prompts(cfg, batch, prompt_len, new_tokens, seed)
    graphdef = model_graphdef(cfg)
    args = (graphdef, params, prompt, lengths, jax.random.key(seed),
            Sampling.make(temperature=temperature), jnp.array([-1], jnp.int32), jnp.int32(0))
    spec = DecodeSpec(kind=kind, max_new_tokens=new_tokens)

    compile_s, decode_s = _timed(lambda: decode(*args, spec=spec), repeats)
    prefill_only = jax.jit(lambda p: prefill(nnx.merge(graphdef, p), prompt, lengths, new_tokens))
    _, prefill_s = _timed(lambda: prefill_only(params), repeats)
    return {"kind": kind, "temperature": temperature, "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "compile_s": compile_s, "decode_s": decode_s,
            "new_tokens_per_s": batch * new_tokens / decode_s, "step_ms": 1e3 * decode_s / new_tokens,
            "prefill_ms": 1e3 * prefill_s, "token_ms": 1e3 * max(decode_s - prefill_s, 0.0) / new_tokens}


def best_of_throughput(cfg: ModelConfig, params: Params, *, batch: int = 4, prompt_len: int = 384,
                       new_tokens: int = 16, best_of: int = 8, kind: str = "utterance", repeats: int = 3,
                       seed: int = 0) -> dict[str, float]:
    """Best-of-N decoding with one prefill per episode against its baseline, the N candidates of every episode
    decoded as ``batch * N`` separate rows (N prefills of the same prompt), in one process on the same prompts,
    keys and samples (sampling at T = 1, no stop token).

    The default shape is the utterance policy's: a long history, a short turn. Returns ``shared_s`` and
    ``separate_s`` (best of ``repeats`` timed calls each, after a compiling one), ``speedup`` (their ratio) and
    ``shared_prefill_ms`` / ``separate_prefill_ms`` (the prefill of ``batch`` and of ``batch * N`` rows alone).
    """
    prompt, lengths = _random_prompts(cfg, batch, prompt_len, new_tokens, seed)
    rows, row_lengths = jnp.repeat(prompt, best_of, axis=0), jnp.repeat(lengths, best_of, axis=0)
    graphdef = model_graphdef(cfg)
    tail = (jax.random.key(seed), Sampling.make(temperature=1.0), jnp.array([-1], jnp.int32), jnp.int32(0))
    shared_spec = DecodeSpec(kind=kind, max_new_tokens=new_tokens, best_of=best_of)
    separate_spec = DecodeSpec(kind=kind, max_new_tokens=new_tokens, best_of=best_of, shared_prefill=False)

    _, shared_s = _timed(lambda: decode(graphdef, params, prompt, lengths, *tail, spec=shared_spec), repeats)
    _, separate_s = _timed(lambda: decode(graphdef, params, prompt, lengths, *tail, spec=separate_spec), repeats)
    prefill_only = jax.jit(lambda p, x, n: prefill(nnx.merge(graphdef, p), x, n, new_tokens))
    _, shared_prefill_s = _timed(lambda: prefill_only(params, prompt, lengths), repeats)
    _, separate_prefill_s = _timed(lambda: prefill_only(params, rows, row_lengths), repeats)
    return {"kind": kind, "batch": batch, "best_of": best_of, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "shared_s": shared_s, "separate_s": separate_s, "speedup": separate_s / shared_s,
            "shared_prefill_ms": 1e3 * shared_prefill_s, "separate_prefill_ms": 1e3 * separate_prefill_s}
