"""Reductions over the vocabulary in chunks (jaxrl_lm.rl.vocab, model.vocab_chunk): the same values and gradients
as whole logits, against NumPy loops, and the same loss and gradients through the training update."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxrl_lm
from jaxrl_lm.rl import vocab
from jaxrl_lm.train.update import loss_fn
from test_update import make_cfg, random_batch, setup


def operands(seed: int, k: int, n: int, e: int, v: int, bias: bool):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(k, n, e))
    w = rng.normal(size=(k, v, e))
    b = rng.normal(size=(k, v)) if bias else None
    return z, w, b


def np_logsumexp(z, w, b, n_valid, scale):
    """Loops over heads, rows and ids (float64)."""
    k, n, _ = z.shape
    out = np.zeros((k, n))
    for h in range(k):
        for i in range(n):
            terms = [scale * (z[h, i] @ w[h, a] + (0.0 if b is None else b[h, a])) for a in range(n_valid)]
            m = max(terms)
            out[h, i] = m + np.log(sum(np.exp(t - m) for t in terms))
    return out


def np_max_min(z, w, b, n_valid):
    k, n, _ = z.shape
    return np.array([max(min(z[h, i] @ w[h, a] + (0.0 if b is None else b[h, a]) for h in range(k))
                         for a in range(n_valid)) for i in range(n)])


def as_jnp(*xs):
    return tuple(None if x is None else jnp.asarray(x, jnp.float32) for x in xs)


@pytest.mark.parametrize("k, v, n_valid, chunk, bias, scale", [
    (2, 37, 37, 8, True, 1.0),     # the last chunk is clamped to [29, 37) and owns [32, 37)
    (2, 37, 30, 5, True, 0.5),     # padded ids 30..36, a temperature
    (1, 40, 40, 10, False, 1.0),   # chunks divide the vocabulary, no bias (the LM head)
    (2, 16, 13, 1, True, 2.0),     # one id per chunk
    (2, 16, 16, 16, True, 1.0),    # one chunk = whole logits
])
def test_logsumexp_and_max_match_numpy_loops(k, v, n_valid, chunk, bias, scale):
    z, w, b = operands(0, k, 6, 4, v, bias)
    ref = np_logsumexp(z, w, b, n_valid, scale)
    for c in (0, chunk):  # whole logits and chunks
        out = vocab.logsumexp(*as_jnp(z, w, b), n_valid=n_valid, chunk=c, scale=scale)
        chex.assert_shape(out, (k, 6))
        chex.assert_type(out, jnp.float32)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
        best = vocab.max_min(*as_jnp(z, w, b), n_valid=n_valid, chunk=c)
        chex.assert_shape(best, (6,))
        np.testing.assert_allclose(np.asarray(best), np_max_min(z, w, b, n_valid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_chunked_gradient_equals_whole_logits_gradient(bias):
    """The custom backward (logits recomputed per chunk) against autodiff through whole logits, for a weighted sum
    of the normalisers (what every loss takes), to 1e-5 in float32."""
    z, w, b = as_jnp(*operands(1, 2, 9, 5, 37, bias))
    g = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9)), jnp.float32)

    def total(chunk):
        return lambda z, w, b: jnp.sum(g * vocab.logsumexp(z, w, b, n_valid=33, chunk=chunk, scale=0.7))

    argnums = (0, 1, 2) if bias else (0, 1)
    whole = jax.grad(total(0), argnums=argnums)(z, w, b)
    chunked = jax.jit(jax.grad(total(8), argnums=argnums))(z, w, b)
    for a, c in zip(whole, chunked):
        chex.assert_equal_shape([a, c])
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=1e-5)
    # padded ids get no gradient
    assert not np.asarray(chunked[1])[:, 33:].any()


def test_max_min_passes_no_gradient():
    z, w, b = as_jnp(*operands(3, 2, 4, 3, 20, True))
    grads = jax.grad(lambda z, w: jnp.sum(vocab.max_min(z, w, b, n_valid=20, chunk=6)), argnums=(0, 1))(z, w)
    assert not any(np.asarray(x).any() for x in grads)


@settings(max_examples=15, deadline=None)
@given(v=st.integers(2, 30), chunk=st.integers(1, 32), data=st.data())
def test_any_chunk_size_counts_every_valid_id_once(v, chunk, data):
    """Property: for any vocabulary, chunk size and padding, every id below n_valid counts exactly once."""
    n_valid = data.draw(st.integers(1, v))
    z, w, b = operands(v * 31 + chunk, 1, 3, 2, v, True)
    out = vocab.logsumexp(*as_jnp(z, w, b), n_valid=n_valid, chunk=chunk)
    np.testing.assert_allclose(np.asarray(out), np_logsumexp(z, w, b, n_valid, 1.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(token_q__backup="max", token_q__cql_alpha=0.3, token_q__cql_temperature=0.5, token_q__awr_beta=1.0),
    dict(token_q__backup="expectile", token_q__cql_alpha=0.1),
    dict(model__q_head="linear", model__vocab_pad_multiple=64, token_q__backup="sarsa", token_q__cql_alpha=0.2),
    dict(model__tie_embeddings=False, token_q__cql_alpha=0.1, token_q__target_scope="full"),
])
def test_update_loss_and_gradients_do_not_depend_on_the_chunk(overrides):
    """Through the training loss (jaxrl_lm.train.update.loss_fn) with a 100-id vocabulary: chunks of 24 ids give
    the whole-logit loss, every metric and every parameter's gradient to 1e-5."""
    results = []
    for chunk in (0, 24):
        cfg = make_cfg(model__vocab_size=100, model__vocab_chunk=chunk, **overrides)
        graphdef, state = setup(cfg)
        batch = {k: jnp.asarray(v) for k, v in random_batch(cfg).items()}
        denominator = jaxrl_lm.rl.count_decisions(batch, cfg.rl)

        def f(p):
            return loss_fn(cfg, graphdef, p, state.groups, batch, denominator, None)

        results.append(jax.jit(jax.value_and_grad(f, has_aux=True))(state.params))
    ((l0, m0), g0), ((l1, m1), g1) = results
    assert float(l0) > 0 and float(m0["cql_loss"]) > 0 and float(m0["bc_loss"]) > 0
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    assert set(m1) == set(m0)
    for key in m0:
        np.testing.assert_allclose(float(m1[key]), float(m0[key]), rtol=1e-5, atol=1e-5, err_msg=key)
    chex.assert_trees_all_close(g1, g0, rtol=1e-5, atol=1e-5)
