"""Decoding: policy scores against NumPy, filtering and sampling, the KV-cache path against the full forward,
greedy decoding, stop tokens, allowed-token masks, best-of-N selection and compile counts."""

import functools
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.generate import (
    Decoded, DecodeSpec, Sampling, _best_of, advance, best_of_throughput, bucket, decode, prefill, prompt_layout,
)
from jaxrl_lm.models import build
from jaxrl_lm.rl.policy_extraction import policy_scores, sample_tokens, top_k_mask, top_p_mask
from jaxrl_lm.models import split_model

VOCAB, PADDED = 50, 64
EOT, PAD = 3, 0


def tiny(family: str) -> ModelConfig:
    extra = dict(n_kv_heads=2, tie_embeddings=False) if family == "llama" else {}
    return ModelConfig(family=family, vocab_size=VOCAB, vocab_pad_multiple=PADDED, d_model=32, n_layers=2,
                       n_heads=4, max_seq_len=32, **extra)


@functools.lru_cache(maxsize=None)
def model_fns(family: str) -> SimpleNamespace:
    """Params, graphdef and jitted full-forward / cache-path functions of a tiny model (compiled on first use)."""
    cfg = tiny(family)
    graphdef, params = split_model(build(cfg, seed=1))

    @jax.jit
    def full(params, tokens, segment_ids):
        """Right-padded rows ``[B, L]`` -> LM logits, Q logits and V at every position."""
        m = nnx.merge(graphdef, params)
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h = m.hidden(tokens, pos, segment_ids)
        return m.lm_logits(h), m.q_logits(h), m.value(h)

    @functools.partial(jax.jit, static_argnums=3)
    def cached_prefill(params, prompt, lengths, max_new):
        m = nnx.merge(graphdef, params)
        h, cache = prefill(m, prompt, lengths, max_new)
        return m.lm_logits(h), cache

    @functools.partial(jax.jit, static_argnums=4)
    def cached_step(params, token, lengths, cache, width, t):
        m = nnx.merge(graphdef, params)
        h, cache = advance(m, token, lengths, cache, width, t)
        return m.lm_logits(h), cache

    return SimpleNamespace(cfg=cfg, graphdef=graphdef, params=params, full=full, prefill=cached_prefill,
                           step=cached_step)


def left_padded(prompts: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((len(prompts), width), PAD, np.int32)
    for i, p in enumerate(prompts):
        out[i, width - len(p):] = p
    return out, np.array([len(p) for p in prompts], np.int32)


def random_prompts(lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, VOCAB, n).astype(np.int32) for n in lengths]


def full_forward_at_ends(fns: SimpleNamespace, rows: list[np.ndarray], width: int):
    """Heads at the last token of each row, from one full (no-cache) forward of right-padded rows."""
    tokens = np.zeros((len(rows), width), np.int32)
    seg = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], seg[i, : len(r)] = r, 1
    lm, q, v = fns.full(fns.params, tokens, seg)
    ends = np.array([len(r) - 1 for r in rows])
    b = np.arange(len(rows))
    return np.asarray(lm)[b, ends], np.asarray(q)[:, b, ends], np.asarray(v)[b, ends]


def numpy_scores(kind: str, lm: np.ndarray, q: np.ndarray, v: np.ndarray, beta: float) -> np.ndarray:
    """The formulas of docs/design.md section 3 in NumPy, padded ids at -inf."""
    lm = np.where(np.arange(lm.shape[-1]) < VOCAB, lm.astype(np.float64), -np.inf)
    log_pi = lm - np.log(np.exp(lm - lm.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lm.max(-1, keepdims=True)
    qmin = np.where(np.arange(lm.shape[-1]) < VOCAB, q.min(0), -np.inf)
    return {"bc": log_pi, "ilql": log_pi + beta * (qmin - v[..., None]), "q": qmin}[kind]


# ------------------------------------------------------------------------------------------- rl/policy_extraction.py


@pytest.mark.parametrize("kind", ["bc", "ilql", "q"])
def test_policy_scores_match_numpy(kind):
    rng = np.random.default_rng(0)
    lm, q, v = rng.normal(size=(3, PADDED)), rng.normal(size=(2, 3, PADDED)), rng.normal(size=3)
    lm, q, v = (x.astype(np.float32) for x in (lm, q, v))
    got = policy_scores(kind, lm, q, v, 4.0, VOCAB)
    np.testing.assert_allclose(np.asarray(got), numpy_scores(kind, lm, q, v, 4.0), rtol=1e-5, atol=1e-5)


def test_padded_ids_are_never_sampled():
    # Padded ids get by far the largest raw logits and Q-values: a missing mask would sample nothing else.
    lm = np.zeros((256, PADDED), np.float32)
    lm[:, VOCAB:] = 100.0
    q = np.broadcast_to(lm, (2, 256, PADDED))
    for kind in ("bc", "ilql", "q"):
        scores = policy_scores(kind, lm, q, np.zeros(256, np.float32), 1.0, VOCAB)
        for temperature in (0.0, 5.0):
            tokens = np.asarray(sample_tokens(jax.random.key(0), scores, temperature, 0, 1.0))
            assert tokens.max() < VOCAB, (kind, temperature)


def test_top_k_and_top_p_keep_the_right_sets():
    scores = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]], np.float32))
    np.testing.assert_array_equal(np.asarray(top_k_mask(scores[:1], 2))[0], [0, 1, 0, 1, 0])
    # Nucleus: sorted 0.4, 0.3, 0.15 (mass before each: 0, 0.4, 0.7) ...; p = 0.7 keeps the first two,
    # p = 0.71 needs the third; p tiny keeps the argmax alone; p = 1 keeps all.
    for p, keep in [(0.7, [0, 1, 0, 1, 0]), (0.71, [0, 1, 0, 1, 1]), (1e-6, [0, 1, 0, 0, 0]), (1.0, [1] * 5)]:
        np.testing.assert_array_equal(np.asarray(top_p_mask(scores[:1], p))[0], keep, err_msg=f"p={p}")
    np.testing.assert_array_equal(np.asarray(top_p_mask(scores[1:], 0.5))[0], [1] * 5)  # ties are kept
    # Sampling with both filters only ever draws from their intersection.
    draws = np.asarray(sample_tokens(jax.random.key(1), np.repeat(scores[:1], 2000, 0), 1.0, 3, 0.5))
    assert set(draws.tolist()) == {1, 3}
    # With no filter the empirical frequencies follow softmax(scores / T).
    draws = np.asarray(sample_tokens(jax.random.key(2), np.repeat(scores[:1], 20000, 0), 1.0, 0, 1.0))
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / 20000, np.exp(scores[0]), atol=0.015)


def test_allowed_mask_and_greedy_argmax():
    scores = np.array([[0.0, 3.0, 1.0, 2.0]], np.float32)
    assert int(sample_tokens(jax.random.key(0), scores, 0.0, 0, 1.0)[0]) == 1
    allowed = np.array([True, False, True, True])
    assert int(sample_tokens(jax.random.key(0), scores, 0.0, 0, 1.0, allowed)[0]) == 3
    draws = sample_tokens(jax.random.key(0), np.repeat(scores, 500, 0), 2.0, 0, 1.0, allowed)
    assert 1 not in set(np.asarray(draws).tolist())


# ----------------------------------------------------------------------------------------------- generate.py


def test_prompt_layout_and_buckets():
    seg, pos = prompt_layout(jnp.array([3, 5, 0]), 5)
    np.testing.assert_array_equal(seg, [[0, 0, 1, 1, 1], [1] * 5, [0] * 5])
    np.testing.assert_array_equal(pos, [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0] * 5])
    assert [bucket(n) for n in (1, 8, 9, 33)] == [8, 8, 16, 64]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_decode_matches_full_forward(family):
    """Left-padded prompts of different lengths, then generated tokens fed one by one through the cache: the
    LM logits at every step equal the full forward's at the same token prefix."""
    fns = model_fns(family)
    prompts, width, new = random_prompts([2, 7, 4]), 8, 5
    prompt, lengths = left_padded(prompts, width)
    logits, cache = fns.prefill(fns.params, prompt, lengths, new)
    rows = [p.copy() for p in prompts]
    for t in range(new):
        expected = full_forward_at_ends(fns, rows, width + new)[0]
        np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5, err_msg=f"step {t}")
        token = np.asarray(jnp.argmax(logits[:, :VOCAB], -1), np.int32)
        rows = [np.append(r, tok) for r, tok in zip(rows, token)]
        if t < new - 1:
            logits, cache = fns.step(fns.params, token, lengths, cache, width, jnp.int32(t))


GREEDY = DecodeSpec(kind="ilql", max_new_tokens=6)


def greedy_args(fns, prompt, lengths, beta=2.0, seed=0):
    # Sampling knobs other than temperature 0 must be irrelevant to greedy decoding.
    return (fns.graphdef, fns.params, prompt, lengths, jax.random.key(seed),
            Sampling.make(beta=beta, temperature=0.0, top_p=0.3), jnp.array([-1], jnp.int32), jnp.int32(PAD))


def test_greedy_decoding_is_deterministic_and_matches_full_forward_argmax():
    fns = model_fns("gpt2")
    prompts, width = random_prompts([3, 8, 5, 1], seed=3), 8
    prompt, lengths = left_padded(prompts, width)
    out = decode(*greedy_args(fns, prompt, lengths), spec=GREEDY)
    again = decode(*greedy_args(fns, prompt, lengths, seed=9), spec=GREEDY)
    np.testing.assert_array_equal(out.tokens, again.tokens)
    rows, expected, last_q = [p.copy() for p in prompts], [], None
    for _ in range(GREEDY.max_new_tokens):
        lm, q, v = full_forward_at_ends(fns, rows, width + GREEDY.max_new_tokens)
        token = numpy_scores("ilql", lm, q, v, 2.0).argmax(-1)
        last_q = q.min(0)[np.arange(len(rows)), token]
        rows = [np.append(r, tok) for r, tok in zip(rows, token)]
        expected.append(token)
    np.testing.assert_array_equal(out.tokens, np.stack(expected, 1))
    np.testing.assert_array_equal(out.lengths, [GREEDY.max_new_tokens] * 4)
    assert not np.asarray(out.stopped).any()
    np.testing.assert_allclose(out.score, last_q, rtol=1e-5, atol=1e-5)


def test_compiles_once_for_repeated_same_shape_calls():
    fns = model_fns("gpt2")
    prompt, lengths = left_padded(random_prompts([4, 6]), 8)
    decode(*greedy_args(fns, prompt, lengths), spec=GREEDY)
    size = decode._cache_size()
    other, other_lengths = left_padded(random_prompts([8, 2], seed=5), 8)
    decode(*greedy_args(fns, other, other_lengths, beta=7.0, seed=3), spec=GREEDY)
    args = list(greedy_args(fns, prompt, lengths))
    args[5] = Sampling.make(beta=0.5, temperature=0.7, top_p=0.9)
    decode(*args, spec=GREEDY)
    assert decode._cache_size() == size


def test_stop_tokens_allowed_mask_padding_after_stop_and_best_of():
    fns = model_fns("gpt2")
    stop = np.array([EOT, 7], np.int32)
    allowed = np.zeros(PADDED, bool)
    allowed[[5, 6, 7, EOT]] = True
    prompt, lengths = left_padded(random_prompts([3, 5, 2, 6, 4, 1], seed=1) + [np.zeros(0, np.int32)], 8)
    for spec in (DecodeSpec(kind="bc", max_new_tokens=12), DecodeSpec(kind="bc", max_new_tokens=12, best_of=2)):
        out = jax.device_get(decode(fns.graphdef, fns.params, prompt, lengths, jax.random.key(4),
                                    Sampling.make(temperature=1.0), stop, jnp.int32(PAD), allowed, spec=spec))
        assert out.tokens.shape == (7, 12)
        assert out.lengths[-1] == 0 and not out.stopped[-1]  # a length-0 row only pads the batch
        assert (out.tokens[-1] == PAD).all()
        for row, n, stopped in zip(out.tokens[:-1], out.lengths[:-1], out.stopped[:-1]):
            assert set(row[:n].tolist()) <= {5, 6, 7, EOT}
            assert (row[n:] == PAD).all()
            is_stop = np.isin(row[:n], stop)
            assert is_stop[:-1].sum() == 0  # nothing is emitted after a stop token
            assert stopped == is_stop[-1] and (stopped or n == 12)
        assert out.stopped[:-1].any()


def test_best_of_keeps_the_highest_final_q_among_finished_candidates():
    d = Decoded(tokens=jnp.arange(6)[:, None] * jnp.ones((1, 2), jnp.int32), lengths=jnp.arange(6),
                stopped=jnp.array([True, True, False, True, False, False]),
                score=jnp.array([1.0, 2.0, 9.0, 0.5, 3.0, 4.0]))
    best = _best_of(d, 3)  # episode 0: rows 0-2 (row 2 unfinished), episode 1: rows 3-5 (only row 3 finished)
    np.testing.assert_array_equal(best.lengths, [1, 3])
    np.testing.assert_array_equal(best.score, [2.0, 0.5])
    none_finished = _best_of(d._replace(stopped=jnp.zeros(6, bool)), 3)
    np.testing.assert_array_equal(none_finished.lengths, [2, 5])


def test_greedy_candidate_is_among_the_best_of_n_turns():
    """With ``greedy_candidate`` each episode's first candidate is the greedy turn, so the chosen turn scores at
    least as high as the greedy one; without it the sampled candidates do fall below the greedy turn here (the
    check can fail)."""
    fns = model_fns("gpt2")
    stop = np.array([EOT], np.int32)
    allowed = np.zeros(PADDED, bool)
    allowed[[EOT, *range(10, 30)]] = True
    prompt, lengths = left_padded(random_prompts([3, 5, 2, 6, 4, 1, 7, 3], seed=2), 8)

    def run(temperature, greedy_candidate, seed=0):
        spec = DecodeSpec(kind="utterance", max_new_tokens=6, best_of=4, greedy_candidate=greedy_candidate)
        return jax.device_get(decode(fns.graphdef, fns.params, prompt, lengths, jax.random.key(seed),
                                     Sampling.make(temperature=temperature), stop, jnp.int32(PAD), allowed,
                                     spec=spec))

    greedy = run(0.0, False)  # four greedy candidates: the greedy turn and its final-token score
    one = jax.device_get(decode(fns.graphdef, fns.params, prompt, lengths, jax.random.key(0), Sampling.make(temperature=0.0),
                                stop, jnp.int32(PAD), allowed, spec=DecodeSpec(kind="bc", max_new_tokens=6)))
    np.testing.assert_array_equal(greedy.tokens, one.tokens)  # the bc greedy decoding's turns
    worse = 0
    for seed in range(3):
        mixed, sampled = run(3.0, True, seed), run(3.0, False, seed)
        for b in range(len(lengths)):
            if greedy.stopped[b]:
                assert mixed.stopped[b] and mixed.score[b] >= greedy.score[b], (seed, b, mixed, greedy)
                if mixed.score[b] == greedy.score[b]:
                    np.testing.assert_array_equal(mixed.tokens[b], greedy.tokens[b])
                worse += bool(sampled.stopped[b]) and sampled.score[b] < greedy.score[b]
    assert worse > 0
    with pytest.raises(ValueError, match="best_of >= 2"):
        DecodeSpec(kind="utterance", best_of=1, greedy_candidate=True)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_best_of_shares_one_prefill_and_equals_n_separate_rows(family):
    """Best-of-N prefills each prompt once and copies its cache to the N candidates; the result must be that of
    decoding the N copies of every prompt as separate rows (same keys, same draws) and keeping the best."""
    fns, n = model_fns(family), 3
    stop = np.array([EOT], np.int32)
    allowed = np.zeros((5, PADDED), bool)  # a per-row mask, repeated with the rows
    allowed[:, [EOT, *range(10, 40)]] = True
    allowed[1, 10:30] = False
    prompt, lengths = left_padded(random_prompts([3, 7, 1, 5], seed=4) + [np.zeros(0, np.int32)], 8)
    sampling = Sampling.make(beta=2.0, temperature=1.0)

    def run(prompt, lengths, allowed, best_of, shared_prefill=True):
        spec = DecodeSpec(kind="ilql", max_new_tokens=6, best_of=best_of, shared_prefill=shared_prefill)
        return jax.device_get(decode(fns.graphdef, fns.params, prompt, lengths, jax.random.key(7), sampling, stop,
                                     jnp.int32(PAD), allowed, spec=spec))

    shared = run(prompt, lengths, allowed, n)
    rows = run(np.repeat(prompt, n, 0), np.repeat(lengths, n, 0), np.repeat(allowed, n, 0), 1)
    chex.assert_shape(shared.tokens, (5, 6))
    for separate in (jax.device_get(_best_of(jax.tree.map(jnp.asarray, rows), n)),
                     run(prompt, lengths, allowed, n, shared_prefill=False)):
        np.testing.assert_array_equal(shared.tokens, separate.tokens)
        np.testing.assert_array_equal(shared.lengths, separate.lengths)
        np.testing.assert_array_equal(shared.stopped, separate.stopped)
        np.testing.assert_allclose(shared.score, separate.score, rtol=1e-5, atol=1e-5)
    assert len({tuple(r) for r in rows.tokens[:n * 4]}) > 4  # the candidates differ: the choice is exercised


def test_best_of_throughput_times_both_prefills():
    fns = model_fns("gpt2")
    line = best_of_throughput(fns.cfg, fns.params, batch=2, prompt_len=16, new_tokens=4, best_of=3, kind="ilql",
                              repeats=1)
    assert line["shared_s"] > 0 and line["separate_s"] > 0
    assert line["speedup"] == pytest.approx(line["separate_s"] / line["shared_s"])
    assert line["shared_prefill_ms"] > 0 and line["separate_prefill_ms"] > 0
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        best_of_throughput(fns.cfg, fns.params, prompt_len=30, new_tokens=4)
