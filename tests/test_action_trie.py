"""Legal-action tries (jaxrl_lm.data.action_trie, rl.policy_extraction.trie_mask / trie_next, generate.decode's
trie): the compiled trie accepts exactly the actions, the per-step mask equals a NumPy loop over the action token
sequences, constrained decoding with random models only ever yields legal actions (hypothesis, over random
action sets and random BPE / byte tokenizers), decoding without a trie is bitwise what it was, ModelPolicy and
evaluation with legal actions, and a 13 000-action trie under SmolLM2's 49 152-token vocabulary."""

import functools
import json
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.data.action_trie import ActionTrie, compile_action_trie, pack_tries
from jaxrl_lm.data.tokenizer import Tokenizer, build_char_tokenizer, train_bpe_tokenizer
from jaxrl_lm.eval import evaluate_params, markdown_table
from jaxrl_lm.generate import Decoded, DecodeSpec, Sampling, _best_of, _Loop, advance, decode, prefill
from jaxrl_lm.model_policy import load_policy
from jaxrl_lm.models import build, split_model
from jaxrl_lm.rl.policy_extraction import (
    TrieArrays, needs_heads, policy_scores, sample_tokens, trie_mask, trie_next,
)

# Tokenizers and decoders here are tiny; their cost is compiles, so shapes are fixed where the property allows.
VOCAB = 320  # model vocabulary: >= every test tokenizer's (byte: 260, BPE: <= 320); a multiple of 64, so Vp = V
CFG = ModelConfig(vocab_size=VOCAB, vocab_pad_multiple=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
BUDGET = 32  # max_new_tokens of the decoding tests: every generated action fits (<= 6 pieces of <= 5 bytes + EOT)
PIECES = ["a", "b", "ab", "ba", "c", " ", "  x", "<eot>", "é", "☃", "1", "23", "?", "\t"]
PROPERTY = settings(deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

action_text = st.lists(st.sampled_from(PIECES), max_size=6).map("".join)
action_sets = st.lists(action_text, min_size=1, max_size=12, unique=True)


@functools.lru_cache(maxsize=None)
def bpe(texts: tuple[str, ...], vocab_size: int) -> Tokenizer:
    return train_bpe_tokenizer(texts, vocab_size)


# The byte tokenizer, or a byte-level BPE learned from random text made of the same pieces (so merges matter).
random_tokenizers = st.one_of(
    st.just(build_char_tokenizer()),
    st.builds(bpe, st.lists(st.lists(st.sampled_from(PIECES), min_size=1, max_size=12).map("".join), min_size=1,
                            max_size=30).map(tuple), st.integers(262, VOCAB)),
)


@functools.lru_cache(maxsize=None)
def params(seed: int):
    return split_model(build(CFG, seed=seed))[1]


GRAPHDEF = split_model(build(CFG, seed=0))[0]


def sequences(actions, tok: Tokenizer) -> list[tuple[int, ...]]:
    """Each action's tokens as the policy emits them: the text encoded alone, then EOT."""
    return [tuple(x.tolist()) + (tok.eot_id,) for x in tok.encode_batch(list(actions))]


def accepted(trie: ActionTrie) -> set[tuple[int, ...]]:
    """Every root-to-leaf token path of the trie (what a walk that only follows edges can emit)."""
    out, stack = set(), [(0, ())]
    while stack:
        node, path = stack.pop()
        lo, hi = int(trie.offsets[node]), int(trie.offsets[node + 1])
        if lo == hi:
            out.add(path)
        stack += [(int(trie.children[e]), path + (int(trie.tokens[e]),)) for e in range(lo, hi)]
    return out


def reference_mask(seqs: list[tuple[int, ...]], prefix: tuple[int, ...], remaining: int, vocab: int) -> np.ndarray:
    """The per-step mask as a loop over the action token sequences: token ``a`` may follow ``prefix`` iff some
    sequence continues ``prefix`` with ``a`` and ends within ``remaining`` tokens."""
    mask = np.zeros(vocab, bool)
    for seq in seqs:
        if len(seq) > len(prefix) and seq[:len(prefix)] == prefix and len(seq) - len(prefix) <= remaining:
            mask[seq[len(prefix)]] = True
    return mask


mask_fn = jax.jit(trie_mask, static_argnums=3)
next_fn = jax.jit(trie_next)


def walk(arrays: TrieArrays, roots: np.ndarray, prefixes: list[tuple[int, ...]]) -> jax.Array:
    """The node each row reaches by following its prefix from its root with ``trie_next``. ``[R] int32``."""
    width = max(len(p) for p in prefixes)
    tokens = np.full((len(prefixes), max(width, 1)), -1, np.int32)
    for i, p in enumerate(prefixes):
        tokens[i, :len(p)] = p
    node = jnp.asarray(roots)
    for t in range(width):
        node = jnp.where(t < jnp.asarray([len(p) for p in prefixes]), next_fn(arrays, node, tokens[:, t]), node)
    return node


# ------------------------------------------------------------------------------------------------ the trie


@PROPERTY
@given(tok=random_tokenizers, actions=action_sets)
def test_trie_accepts_exactly_the_actions(tok, actions):
    trie = compile_action_trie(actions + actions[:1], tok)  # a duplicate is dropped
    seqs = sequences(actions, tok)
    assert trie.actions == tuple(actions)
    assert accepted(trie) == set(seqs)  # no path but the legal ones, and every legal one
    assert {tok.decode(path[:-1]) for path in accepted(trie)} == set(actions)
    chex.assert_type([trie.offsets, trie.tokens, trie.children, trie.min_left], np.int32)
    assert trie.num_edges == trie.num_nodes - 1 and trie.offsets[0] == 0 and trie.offsets[-1] == trie.num_edges
    assert (np.diff(trie.offsets) >= 0).all() and sorted(trie.children.tolist()) == list(range(1, trie.num_nodes))
    for node in range(trie.num_nodes):  # siblings sorted by token, children after their parent
        edges = slice(trie.offsets[node], trie.offsets[node + 1])
        assert (np.diff(trie.tokens[edges]) > 0).all() and (trie.children[edges] > node).all()
    assert trie.depth == max(len(s) for s in seqs)
    assert trie.min_left[0] == min(len(s) for s in seqs)


def test_compile_refuses_empty_sets_non_text_and_texts_that_do_not_round_trip():
    tok = build_char_tokenizer()
    with pytest.raises(ValueError, match="empty"):
        compile_action_trie([], tok)
    with pytest.raises(ValueError, match="must be str"):
        compile_action_trie(["go", 3], tok)
    lower = build_char_tokenizer()
    lower.backend.normalizer = tokenizers.normalizers.Lowercase()  # "Qe7" encodes as "qe7"
    with pytest.raises(ValueError, match="'Qe7'.*decodes to 'qe7'"):
        compile_action_trie(["kd2", "Qe7"], lower)


# --------------------------------------------------------------------------------------- the per-step mask


@PROPERTY
@given(tok=random_tokenizers, first=action_sets, second=action_sets, data=st.data())
def test_mask_at_every_prefix_matches_the_numpy_loop(tok, first, second, data):
    """Two sets packed in one forest, rows at every prefix of every action (the empty one, each token, the
    finished action) with random budgets, and an unconstrained row: trie_mask equals reference_mask."""
    tries = [compile_action_trie(first, tok), compile_action_trie(second, tok)]
    seqs = [sequences(first, tok), sequences(second, tok)]
    rows = [(k, seq[:n]) for k in (0, 1) for seq in seqs[k] for n in range(len(seq) + 1)]
    rows = list(dict.fromkeys(rows))
    remaining = np.array(data.draw(st.lists(st.integers(0, 34), min_size=len(rows) + 1, max_size=len(rows) + 1)))
    arrays = pack_tries(tries, [k for k, _ in rows] + [-1], min_nodes=512, min_edges=512, min_window=16)
    node = walk(arrays, arrays.roots, [p for _, p in rows] + [()])
    got = np.asarray(mask_fn(arrays, node, jnp.asarray(remaining, jnp.int32), VOCAB))
    chex.assert_shape(got, (len(rows) + 1, VOCAB))
    for i, (k, prefix) in enumerate(rows):
        np.testing.assert_array_equal(got[i], reference_mask(seqs[k], prefix, remaining[i], VOCAB),
                                      err_msg=f"set {k}, prefix {prefix}, remaining {remaining[i]}")
    assert got[-1].all()  # the unconstrained row


def test_pack_tries_pads_to_powers_of_two_and_shares_a_set_between_rows():
    tok = build_char_tokenizer()
    a, b = compile_action_trie(["go 1", "go 2"], tok), compile_action_trie(["stay"], tok)
    arrays = pack_tries([a, b], [0, 1, -1, 0])
    assert arrays.roots.tolist() == [0, a.num_nodes, -1, 0] and arrays.window == 8
    assert len(arrays.min_left) == 64 and len(arrays.offsets) == 65 and len(arrays.tokens) == 64
    assert (np.diff(arrays.offsets[a.num_nodes + b.num_nodes:]) == 0).all()  # padded nodes have no edges
    with pytest.raises(ValueError, match="row_trie"):
        pack_tries([a], [0, 1])


# --------------------------------------------------------------------------------------- constrained decoding


SPECS = [DecodeSpec(kind="bc", max_new_tokens=BUDGET), DecodeSpec(kind="ilql", max_new_tokens=BUDGET),
         DecodeSpec(kind="q", max_new_tokens=BUDGET), DecodeSpec(kind="ilql", max_new_tokens=BUDGET, best_of=2)]


@settings(PROPERTY, max_examples=25)
@given(tok=random_tokenizers, first=action_sets, second=action_sets, spec=st.sampled_from(SPECS),
       seed=st.integers(0, 1), greedy=st.booleans(), data=st.data())
def test_decoding_with_random_models_only_yields_legal_actions(tok, first, second, spec, seed, greedy, data):
    """Rows held to one of two random sets (or unconstrained, or batch padding); whatever the random model and
    the policy kind, greedy or sampled, best-of-2 included, every constrained row emits one of its actions."""
    row_set = data.draw(st.lists(st.sampled_from([0, 1, -1]), min_size=7, max_size=7)) + [-1]
    prompts = data.draw(st.lists(st.lists(st.integers(4, tok.vocab_size - 1), min_size=1, max_size=16),
                                 min_size=7, max_size=7)) + [[]]
    tokens = np.zeros((8, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, 16 - len(p):] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    arrays = pack_tries([compile_action_trie(first, tok), compile_action_trie(second, tok)], row_set,
                        min_nodes=512, min_edges=512, min_window=16)
    sampling = Sampling.make(beta=4.0, temperature=0.0 if greedy else 1.0)
    out = jax.device_get(decode(GRAPHDEF, params(seed), tokens, lengths, jax.random.key(seed), sampling,
                                jnp.array([tok.eot_id], jnp.int32), jnp.int32(tok.pad_id), None, arrays, spec=spec))
    legal = [set(sequences(first, tok)), set(sequences(second, tok))]
    for i in range(7):
        emitted = tuple(out.tokens[i, :out.lengths[i]].tolist())
        if row_set[i] >= 0:
            assert emitted in legal[row_set[i]], (i, emitted, tok.decode(emitted))
            assert out.stopped[i] and tok.decode(emitted[:-1]) in (first, second)[row_set[i]]
    assert out.lengths[7] == 0


def test_a_complete_action_allows_eot_and_its_longer_siblings_and_budget_excludes_long_actions():
    tok = build_char_tokenizer()
    trie = compile_action_trie(["ab", "abc", "b"], tok)
    arrays = pack_tries([trie], [0, 0, 0])
    node = walk(arrays, arrays.roots, [tuple(tok.encode_batch(["ab"])[0])] * 2 + [()])
    mask = np.asarray(mask_fn(arrays, node, jnp.array([4, 1, 2], jnp.int32), VOCAB))
    c, a, b = (4 + ord(x) for x in "cab")
    assert np.flatnonzero(mask[0]).tolist() == [tok.eot_id, c]  # "ab" is complete; "abc" goes on
    assert np.flatnonzero(mask[1]).tolist() == [tok.eot_id]  # one token left: only finishing fits
    assert np.flatnonzero(mask[2]).tolist() == [b]  # two tokens left: "b" + EOT fits, "ab" + EOT does not


# -------------------------------------------------------------------------------- no trie: bitwise unchanged


def _choose_before_tries(model, spec, sampling, stop_ids, pad_id, allowed, s):
    """generate._choose as it was before legal-action tries (the reference for the unconstrained path)."""
    use_lm, use_q, use_v = needs_heads(spec.kind)
    lm = model.lm_logits(s.h) if use_lm else None
    q = model.q_logits(s.h) if use_q else None
    value = model.value(s.h) if use_v else None
    scores = policy_scores(spec.kind, lm, q, value, sampling.beta, model.cfg.vocab_size)
    rng, key = jax.random.split(s.rng)
    token = sample_tokens(key, scores, sampling.temperature, spec.top_k, sampling.top_p, allowed)
    if q is not None:
        q_token = jnp.take_along_axis(jnp.min(q, axis=0), token[:, None], axis=-1)[:, 0]
    elif spec.best_of > 1:
        q_token = jnp.min(model.q_at(s.h, token), axis=0)
    else:
        q_token = jnp.zeros(token.shape, jnp.float32)
    live = ~s.done
    token = jnp.where(live, token, pad_id)
    out = Decoded(tokens=s.out.tokens.at[:, s.t].set(token), lengths=s.out.lengths + live.astype(jnp.int32),
                  stopped=s.out.stopped | (live & jnp.isin(token, stop_ids)),
                  score=jnp.where(live, q_token, s.out.score))
    return s._replace(t=s.t + 1, out=out, done=s.done | out.stopped, rng=rng)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def decode_before_tries(graphdef, params, prompt, prompt_lengths, rng, sampling, stop_ids, pad_id, allowed=None, *,
                        spec):
    """generate.decode as it was before legal-action tries."""
    model = nnx.merge(graphdef, params)
    n, new = spec.best_of, spec.max_new_tokens
    if n > 1:
        prompt, prompt_lengths = jnp.repeat(prompt, n, axis=0), jnp.repeat(prompt_lengths, n, axis=0)
        if allowed is not None and allowed.ndim == 2:
            allowed = jnp.repeat(allowed, n, axis=0)
    rows = prompt.shape[0]
    h, cache = prefill(model, prompt, prompt_lengths, new)
    empty = Decoded(jnp.full((rows, new), pad_id, jnp.int32), jnp.zeros(rows, jnp.int32), jnp.zeros(rows, bool),
                    jnp.zeros(rows, jnp.float32))
    choose = functools.partial(_choose_before_tries, model, spec, sampling, stop_ids, pad_id, allowed)
    state = choose(_Loop(jnp.int32(0), cache, h, empty, prompt_lengths == 0, rng))

    def step(s):
        h, cache = advance(model, s.out.tokens[:, s.t - 1], prompt_lengths, s.cache, prompt.shape[1], s.t - 1)
        return choose(s._replace(h=h, cache=cache))

    state = jax.lax.while_loop(lambda s: (s.t < new) & ~jnp.all(s.done), step, state)
    return _best_of(state.out, n) if n > 1 else state.out


@pytest.mark.parametrize("spec,temperature,mask", [
    (DecodeSpec(kind="ilql", max_new_tokens=10), 0.0, None),
    (DecodeSpec(kind="bc", max_new_tokens=10, top_k=20), 1.0, "row"),
    (DecodeSpec(kind="q", max_new_tokens=10, best_of=2), 1.5, "shared"),
])
def test_decoding_without_a_trie_is_bitwise_what_it_was(spec, temperature, mask):
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 260, (8, 16)).astype(np.int32)
    lengths = np.array([16, 3, 9, 1, 12, 0, 5, 7], np.int32)
    allowed = {None: None, "shared": rng.random(VOCAB) < 0.5, "row": rng.random((8, VOCAB)) < 0.5}[mask]
    if allowed is not None:
        allowed[..., [3, 7]] = True  # the stop ids
    args = (GRAPHDEF, params(1), tokens, lengths, jax.random.key(3), Sampling.make(2.0, temperature, 0.9),
            jnp.array([3, 7], jnp.int32), jnp.int32(0), allowed)
    before = jax.device_get(decode_before_tries(*args, spec=spec))
    now = jax.device_get(decode(*args, spec=spec))
    free = pack_tries([compile_action_trie(["x"], build_char_tokenizer())], [-1] * 8)  # every row unconstrained
    unconstrained = jax.device_get(decode(*args, free, spec=spec))
    for field in Decoded._fields:
        np.testing.assert_array_equal(getattr(now, field), getattr(before, field), err_msg=field)
        np.testing.assert_array_equal(getattr(unconstrained, field), getattr(before, field), err_msg=field)
    assert before.lengths.max() > 1  # the comparison covers several steps


# ------------------------------------------------------------------------------------ policies and evaluation


def test_model_policy_with_fixed_per_call_and_per_transcript_action_sets():
    moves = ["go 1", "go 12", "stay", "wait here"]
    pol = load_policy(params(0), "ilql", cfg=CFG, max_new_tokens=12, temperature=1.0, seed=2, actions=moves)
    transcripts = ["at 3\n", "at 14\ngo 15\nat 15\n"] * 6
    assert set(pol(transcripts)) <= set(moves)
    assert set(pol(transcripts, actions=[["a"], None] * 6)[::2]) == {"a"}  # a per-call set replaces the fixed one
    per_episode = pol.with_actions(lambda t: ["left", "right"] if t.startswith("at 3") else None)
    out = per_episode(transcripts)
    assert set(out[::2]) <= {"left", "right"}
    assert per_episode.actions is not None and pol.with_actions(None).actions is None
    free = load_policy(params(0), "ilql", cfg=CFG, max_new_tokens=12, temperature=1.0, seed=2)
    assert not set(free(transcripts)) <= set(moves)  # a random model left alone writes something else
    with pytest.raises(ValueError, match=r"'wait here' is 10 tokens.*max_new_tokens 8"):
        load_policy(params(0), cfg=CFG, max_new_tokens=8, actions=moves)
    with pytest.raises(ValueError, match="allowed_tokens excludes"):
        load_policy(params(0), cfg=CFG, max_new_tokens=12, actions=moves, allowed_tokens=range(4, 100))
    with pytest.raises(ValueError, match="string"):
        load_policy(params(0), cfg=CFG, actions="stay")
    with pytest.raises(ValueError, match="one set"):
        pol(transcripts, actions=[["a"]])


def test_evaluation_reports_legal_rates_with_and_without_the_constraint():
    result = evaluate_params(CFG, params(0), "twenty_questions", episodes=2, kind="bc", temperature=1.0,
                             max_new_tokens=28, legality=True)
    assert result["legal_turns"] == 40 and 0 <= result["legal_rate"] < 1  # a random model rarely asks one
    constrained = result["constrained"]
    assert constrained["legal_rate"] == 1.0 and constrained["episodes"] == 2 and "records" not in constrained
    assert constrained["legal_turns"] == constrained["mean_steps"] * 2  # every agent turn counted
    header, _, row = markdown_table([result]).splitlines()
    assert header.endswith("| legal | legal-only return | legal-only normalised | legal-only success |")
    assert row.count("|") == header.count("|")
    grid = evaluate_params(CFG, params(0), "grid", episodes=1, kind="bc", temperature=0.0, max_new_tokens=6,
                           legality=True)
    assert "legal_rate" not in grid and "constrained" not in grid  # no set exposed: no second run


# ---------------------------------------------------------------------------------------------------- scale


def test_thirteen_thousand_actions_under_the_smollm2_tokenizer():
    """~13k random action strings under SmolLM2's 49 152-id tokenizer: the compiled trie's size and compile
    time (printed, not asserted on), then a constrained greedy decode with a tiny model of that vocabulary."""
    from jaxrl_lm.interop.gguf import read_gguf, smollm2_gguf

    gguf = read_gguf(smollm2_gguf())
    tok = Tokenizer(tokenizers.Tokenizer.from_str(gguf.tokenizer.to_str()), specials=gguf.specials, name="SmolLM2")
    assert tok.vocab_size == 49152
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz      '-?"))
    actions = sorted({"".join(rng.choice(letters, rng.integers(3, 12))).strip() or "x" for _ in range(13_500)})
    t0 = time.perf_counter()
    trie = compile_action_trie(actions, tok)
    compile_s = time.perf_counter() - t0
    dense = trie.num_nodes * tok.vocab_size  # bytes of a [nodes, vocab] bool table
    print(f"SmolLM2 trie: {len(trie.actions)} actions, {trie.num_nodes} nodes, root degree {trie.max_degree}, "
          f"depth {trie.depth}, {trie.nbytes} bytes (dense table {dense} bytes), compiled in {compile_s:.2f} s")
    assert len(trie.actions) > 12_000 and trie.nbytes <= 16 * trie.num_nodes + 4 and trie.nbytes * 1000 < dense
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                      max_seq_len=32)
    graphdef, model_params = split_model(build(cfg, seed=0))
    arrays = pack_tries([trie], [0, 0, 0, -1])
    print(f"packed: {arrays.offsets.shape[0] - 1} nodes, {arrays.tokens.shape[0]} edges, window {arrays.window}")
    prompt = rng.integers(0, tok.vocab_size, (4, 8)).astype(np.int32)
    spec = DecodeSpec(kind="ilql", max_new_tokens=trie.depth)
    out = jax.device_get(decode(graphdef, model_params, prompt, np.array([8, 5, 2, 0], np.int32), jax.random.key(0),
                                Sampling.make(temperature=0.0), jnp.array([tok.eot_id], jnp.int32),
                                jnp.int32(tok.pad_id), None, arrays, spec=spec))
    legal = set(actions)
    for i in range(3):
        assert out.stopped[i] and out.tokens[i, out.lengths[i] - 1] == tok.eot_id
        assert tok.decode(out.tokens[i, :out.lengths[i] - 1]) in legal
    # One masked step alone on random scores: the choice is a child of the root.
    scores = jnp.asarray(rng.normal(size=(4, tok.vocab_size)), jnp.float32)
    mask = mask_fn(arrays, jnp.asarray(arrays.roots), jnp.int32(trie.depth), tok.vocab_size)
    token = np.asarray(sample_tokens(jax.random.key(1), scores, 0.0, 0, 1.0, mask))
    root_tokens = set(trie.tokens[trie.offsets[0]:trie.offsets[1]].tolist())
    assert set(token[:3].tolist()) <= root_tokens and np.asarray(mask)[:3].sum(1).tolist() == [len(root_tokens)] * 3


@pytest.mark.slow
def test_training_evaluation_and_the_evaluate_script_decode_only_legal_actions(tmp_path):
    """eval.legal_actions through the loop's entry point (a 2-step run evaluated at its end) and
    scripts/evaluate.py --legal-actions on the run it wrote: every turn is one of twenty questions' actions."""
    from jaxrl_lm.config import load_config
    from jaxrl_lm.experiments import run as run_lib
    from script_loader import load_script

    cfg = load_config("configs/tasks/twenty_questions.yaml", model__d_model=32, model__n_layers=1,
                      data__task_episodes=64, train__steps=2, train__log_every=1, train__out_dir=str(tmp_path / "run"),
                      eval__every=2, eval__episodes=4, eval__policies=["ilql"], eval__legal_actions=True)
    run_lib.run(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [line["decoding"] for line in lines] == ["greedy", "sampled"]
    assert all(line["policy"]["actions"] for line in lines)  # the policy was built with the env's legal actions
    evaluate = load_script("evaluate")
    assert evaluate.main([str(tmp_path / "run"), "--task", "twenty_questions", "--episodes", "4", "--beta", "4",
                          "--legal-actions", "--out", str(tmp_path / "ev")]) == 0
    reports = json.loads(next((tmp_path / "ev").glob("*.json")).read_text())
    assert [r["decoding"] for r in reports] == ["greedy", "sampled"]
    for report in reports:
        assert 0.0 <= report["legal_rate"] <= 1.0 and report["constrained"]["legal_rate"] == 1.0
