"""Model package: shapes, masking, KV-cache decoding, heads, GQA, remat, bf16, depth, dropout."""

import functools
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_lm.batch import segment_positions
from jaxrl_lm.config import ModelConfig
from jaxrl_lm.models import build, valid_vocab_mask
from jaxrl_lm.models.layers import apply_rope, rope_tables

FAMILIES = ["gpt2", "llama"]


def tiny(family: str, **kw) -> ModelConfig:
    """GPT-2: 3 layers, tied embeddings. Llama: 1 layer, GQA (4 query / 2 kv heads), q/k/v biases, untied head.

    Between them every test runs the layer scan at depth 3 and at depth 1, at no extra compile cost.
    """
    base = dict(family=family, vocab_size=50, vocab_pad_multiple=16, d_model=32, n_layers=3, n_heads=4,
                max_seq_len=32, tie_embeddings=family == "gpt2")
    if family == "llama":
        base.update(n_layers=1, n_kv_heads=2, attention_bias=True)
    base.update(kw)
    return ModelConfig(**base)


@functools.lru_cache(maxsize=None)
def compiled(cfg: ModelConfig) -> SimpleNamespace:
    """A model's params and graphdef, plus its jitted forwards (each compiled on first use)."""
    graphdef, params = nnx.split(build(cfg))

    @jax.jit
    def hidden(params, tokens, positions, segment_ids, rng=None):
        return nnx.merge(graphdef, params).hidden(tokens, positions, segment_ids, dropout_rng=rng)

    @jax.jit
    def heads(params, h, actions):
        m = nnx.merge(graphdef, params)
        return m.lm_logits(h), m.q_logits(h), m.q_at(h, actions), m.value(h)

    @jax.jit
    def decode(params, tokens, positions, segment_ids, cache, index):
        return nnx.merge(graphdef, params).hidden_with_cache(tokens, positions, cache, index, segment_ids)

    return SimpleNamespace(graphdef=graphdef, params=params, hidden=hidden, heads=heads, decode=decode)


def positions(segment_ids: np.ndarray) -> np.ndarray:
    return np.asarray(segment_positions(jnp.asarray(segment_ids)))


def normal(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    # Test inputs come from NumPy: every distinct eager jax.random call would cost a compile.
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def packed_batch(cfg: ModelConfig, seed: int = 0):
    """Two rows of 12: row 0 = segments 1 (5 tokens), 2 (5 tokens), padding (2); row 1 = one segment.

    Returns NumPy ``(tokens, positions, segment_ids)``, each ``[2, 12]`` int32.
    """
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12], np.int32)
    return tokens, positions(seg), seg


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_dtypes_and_parameter_layout(family):
    cfg = tiny(family)
    fns = compiled(cfg)
    tokens, pos, seg = packed_batch(cfg)
    h = fns.hidden(fns.params, tokens, pos, seg)
    b, l, d, k, vp = 2, 12, cfg.d_model, cfg.n_q_heads, cfg.padded_vocab_size
    lm, q, q_at, v = fns.heads(fns.params, h, tokens)
    chex.assert_shape([h, lm, q, q_at, v], [(b, l, d), (b, l, vp), (k, b, l, vp), (k, b, l), (b, l)])
    chex.assert_type([h, lm, q, q_at, v], jnp.float32)
    chex.assert_tree_all_finite([h, lm, q, v])
    flat = fns.heads(fns.params, h[0], tokens[0])  # any leading shape
    chex.assert_shape(list(flat), [(l, vp), (k, l, vp), (k, l), (l,)])

    state = fns.params
    assert set(state.keys()) == {"transformer", "q_heads", "v_head"} | (set() if cfg.tie_embeddings else {"lm_head"})
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))
    stack = state["transformer"]["h" if family == "gpt2" else "layers"]
    for var in jax.tree.leaves(stack, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        assert var.shape[0] == cfg.n_layers and var.get_metadata()["out_sharding"][0] == "layers"
    assert all(x.shape[0] == k for x in jax.tree.leaves(state["q_heads"]))


def test_lm_head_tied_and_untied():
    h = normal((3, 32))
    tied = nnx.merge(compiled(tiny("gpt2")).graphdef, compiled(tiny("gpt2")).params)
    assert tied.lm_head is None
    np.testing.assert_allclose(tied.lm_logits(h), h @ tied.transformer.wte.embedding[...].T, rtol=1e-5, atol=1e-6)
    untied = nnx.merge(compiled(tiny("llama")).graphdef, compiled(tiny("llama")).params)
    np.testing.assert_allclose(untied.lm_logits(h), h @ untied.lm_head.kernel[...], rtol=1e-5, atol=1e-6)


def test_target_copies_swap_in_by_attribute():
    """The update replaces ``q_heads`` (or ``transformer``) in the split state with target copies."""
    cfg = tiny("gpt2")
    fns = compiled(cfg)
    target = nnx.split(build(cfg, seed=1))[1]
    h, actions = normal((2, 12, cfg.d_model)), packed_batch(cfg)[0]
    mixed = nnx.State({**fns.params, "q_heads": target["q_heads"]})
    lm, q, _, v = fns.heads(mixed, h, actions)
    lm_online, _, _, v_online = fns.heads(fns.params, h, actions)
    np.testing.assert_array_equal(q, fns.heads(target, h, actions)[1])
    np.testing.assert_array_equal(lm, lm_online)
    np.testing.assert_array_equal(v, v_online)


def test_learned_positions_past_the_table_read_its_last_row():
    """A turn sampled inside the update at a full window's last states runs past ``max_seq_len``: its tokens read
    the table's last row (finite), never jnp.take's NaN fill."""
    cfg = tiny("gpt2")
    trunk = build(cfg).transformer
    tokens = jnp.array([[3, 4, 5]], dtype=jnp.int32)
    past = trunk.embed(tokens, jnp.array([[cfg.max_seq_len - 1, cfg.max_seq_len, cfg.max_seq_len + 5]]))
    last = trunk.embed(tokens, jnp.full((1, 3), cfg.max_seq_len - 1))
    assert np.all(np.isfinite(np.asarray(past)))
    np.testing.assert_array_equal(np.asarray(past), np.asarray(last))


def test_valid_vocab_mask():
    mask = valid_vocab_mask(tiny("gpt2"))
    assert mask.shape == (64,) and int(mask.sum()) == 50 and bool(mask[49]) and not bool(mask[50])


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_and_segment_masking(family):
    cfg = tiny(family)
    fns = compiled(cfg)
    tokens, pos, seg = packed_batch(cfg)
    h = fns.hidden(fns.params, tokens, pos, seg)

    other_seg2 = tokens.copy()
    other_seg2[0, 5:10] = (tokens[0, 5:10] + 1) % cfg.vocab_size
    h2 = fns.hidden(fns.params, other_seg2, pos, seg)
    np.testing.assert_array_equal(h2[0, :5], h[0, :5])
    assert not np.allclose(h2[0, 5:10], h[0, 5:10])

    other_future = tokens.copy()
    other_future[1, 7:] = (tokens[1, 7:] + 1) % cfg.vocab_size
    h3 = fns.hidden(fns.params, other_future, pos, seg)
    np.testing.assert_array_equal(h3[1, :7], h[1, :7])

    all_padding = np.zeros_like(seg)
    chex.assert_tree_all_finite(fns.hidden(fns.params, tokens, positions(all_padding), all_padding))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_segment_equals_episode_alone(family):
    cfg = tiny(family)
    fns = compiled(cfg)
    tokens, pos, seg = packed_batch(cfg)
    h = fns.hidden(fns.params, tokens, pos, seg)
    alone, alone_seg = tokens.copy(), seg.copy()
    alone[0] = np.concatenate([tokens[0, 5:10], tokens[0, :7]])  # segment 2 first, then another episode
    alone_seg[0] = [1] * 5 + [2] * 7
    h_alone = fns.hidden(fns.params, alone, positions(alone_seg), alone_seg)
    np.testing.assert_allclose(h_alone[0, :5], h[0, 5:10], atol=1e-5)


def _decode(fns, tokens, positions, segment_ids, n_prompt: int, max_len: int) -> jax.Array:
    """Prefill ``n_prompt`` tokens, then feed the rest one at a time. Returns ``[B, L, D]`` hidden states."""
    cache = nnx.merge(fns.graphdef, fns.params).init_cache(tokens.shape[0], max_len)
    h, cache = fns.decode(fns.params, tokens[:, :n_prompt], positions[:, :n_prompt], segment_ids[:, :n_prompt],
                          cache, jnp.int32(0))
    outs = [h]
    for t in range(n_prompt, tokens.shape[1]):
        h, cache = fns.decode(fns.params, tokens[:, t:t + 1], positions[:, t:t + 1], segment_ids[:, t:t + 1],
                              cache, jnp.int32(t))
        outs.append(h)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decode_matches_full_forward(family):
    cfg = tiny(family)
    fns = compiled(cfg)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    pos = np.broadcast_to(np.arange(9, dtype=np.int32), (2, 9))
    ones = np.ones_like(tokens)
    full = fns.hidden(fns.params, tokens, pos, ones)

    cache = nnx.merge(fns.graphdef, fns.params).init_cache(2, 12)
    chex.assert_shape(cache.k, (cfg.n_layers, 2, 12, cfg.kv_heads, cfg.head_dim))
    np.testing.assert_allclose(_decode(fns, tokens, pos, ones, n_prompt=5, max_len=12), full, atol=1e-5)

    # Left padding: 3 padding slots (segment 0) before the same tokens, positions counted from the first real
    # token; the real tokens' states must equal the unpadded forward.
    pad = np.zeros((2, 3), np.int32)
    padded, seg = np.concatenate([pad, tokens], 1), np.concatenate([pad, ones], 1)
    ppos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    h = _decode(fns, padded, ppos, seg, n_prompt=5, max_len=12)
    np.testing.assert_allclose(h[:, 3:], full, atol=1e-5)


@pytest.mark.parametrize("q_head", ["mlp", "linear"])
def test_q_at_equals_gathered_q_logits(q_head):
    cfg = tiny("llama", q_head=q_head)
    fns = compiled(cfg)
    h = normal((2, 12, cfg.d_model), seed=1)
    actions = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    _, q, q_at, _ = fns.heads(fns.params, h, actions)
    gathered = np.take_along_axis(np.asarray(q), actions[None, ..., None], -1)[..., 0]
    np.testing.assert_allclose(q_at, gathered, rtol=1e-5, atol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa_cfg, mha_cfg = tiny("llama", n_kv_heads=2), tiny("llama", n_kv_heads=0)
    group = gqa_cfg.n_heads // gqa_cfg.kv_heads
    gqa, mha = compiled(gqa_cfg), compiled(mha_cfg)

    def repeat_heads(path, x, like):
        if not {"k_proj", "v_proj"} & {getattr(p, "key", None) for p in path}:
            return x
        grouped = x.reshape(x.shape[:-1] + (gqa_cfg.kv_heads, gqa_cfg.head_dim))
        return np.repeat(np.asarray(grouped), group, axis=-2).reshape(like.shape)

    params = jax.tree_util.tree_map_with_path(repeat_heads, gqa.params, mha.params)
    tokens, pos, seg = packed_batch(gqa_cfg)
    np.testing.assert_allclose(mha.hidden(params, tokens, pos, seg), gqa.hidden(gqa.params, tokens, pos, seg),
                               atol=1e-5)


def test_rope_is_hf_rotate_half():
    x = np.random.default_rng(0).normal(size=(1, 3, 2, 8)).astype(np.float32)
    positions = np.array([[0, 1, 5]], np.int32)
    rotated = jax.jit(lambda x, p: apply_rope(x, *rope_tables(p, 8, 10000.0)))(x, positions)
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    angle = np.concatenate([np.outer(positions[0], inv_freq)] * 2, axis=-1)[None, :, None, :]
    rotate_half = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    np.testing.assert_allclose(rotated, x * np.cos(angle) + rotate_half * np.sin(angle), atol=1e-5)


@functools.lru_cache(maxsize=None)
def loss_and_grads(cfg: ModelConfig):
    """A trunk-only loss (remat touches only the layer scan) and its gradients."""
    fns = compiled(cfg)
    tokens, pos, seg = packed_batch(cfg)
    weights = normal((2, 12, cfg.d_model), seed=3)

    def loss(params):
        return (nnx.merge(fns.graphdef, params).hidden(tokens, pos, seg) * weights).sum()

    return jax.jit(jax.value_and_grad(loss))(fns.params)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_match_no_remat(remat):
    loss_ref, grads_ref = loss_and_grads(tiny("gpt2"))
    loss, grads = loss_and_grads(tiny("gpt2", remat=remat))
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-5, atol=1e-5)  # O(1) grads; remat changes fusion


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_compute_stays_close(family):
    f32, bf16 = compiled(tiny(family)), compiled(tiny(family, dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.params))
    tokens, pos, seg = packed_batch(tiny(family))
    h32 = f32.hidden(f32.params, tokens, pos, seg)
    h16 = bf16.hidden(bf16.params, tokens, pos, seg)
    assert h16.dtype == jnp.float32
    np.testing.assert_allclose(h16, h32, atol=0.1)
    outs = bf16.heads(bf16.params, h16, tokens)
    chex.assert_type(list(outs), jnp.float32)
    chex.assert_tree_all_finite(outs)


def test_dropout_only_with_an_explicit_key():
    cfg = tiny("gpt2", dropout=0.5)
    fns = compiled(cfg)
    tokens, pos, seg = packed_batch(cfg)
    h = fns.hidden(fns.params, tokens, pos, seg)
    np.testing.assert_array_equal(h, fns.hidden(fns.params, tokens, pos, seg))
    np.testing.assert_array_equal(h, compiled(tiny("gpt2")).hidden(fns.params, tokens, pos, seg))
    ha = fns.hidden(fns.params, tokens, pos, seg, jax.random.key(0))
    np.testing.assert_array_equal(ha, fns.hidden(fns.params, tokens, pos, seg, jax.random.key(0)))
    assert not np.allclose(ha, h)
    assert not jax.tree.leaves(nnx.state(nnx.merge(fns.graphdef, fns.params), nnx.RngState))
