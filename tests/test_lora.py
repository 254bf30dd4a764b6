"""LoRA adapters on the trunk (model.lora): the forward against a NumPy loop, a fresh adapter that changes nothing,
rank 0 leaving the parameters as they were, the split that trains only the factors and the heads, a run from a
trunk without adapters (train.init_from) that leaves every base weight bitwise unchanged and resumes exactly, and
an export that merges the factors into a plain transformers causal LM with the same logits."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import jaxrl_lm
from jaxrl_lm import envs
from jaxrl_lm.config import ConfigError, LoraConfig, ModelConfig, load_config
from jaxrl_lm.interop import export_hf, import_hf
from jaxrl_lm.interop.safetensors_io import SafetensorsDir, flatten
from jaxrl_lm.models import build, split_model
from jaxrl_lm.models.layers import LORA_FACTORS, LoraLinear
from jaxrl_lm.models.partition import Partition, merge_adapters, with_fresh_adapters
from jaxrl_lm.train import checkpoint
from jaxrl_lm.train.state import init_state
from jaxrl_lm.train.update import loss_fn
from helpers import restore_state, straight_and_resumed

SMALL = dict(model__d_model=32, model__n_layers=3, model__n_heads=4, data__task_episodes=200, data__batch_size=8,
             data__seq_len=64, optim__schedule="constant", train__checkpoint_every=0)
TOL = 1e-4  # export logits against ours, as tests/test_hf.py


def small_cfg(**kw):
    return load_config("configs/demo.yaml", **{**SMALL, **kw})


def model_cfg(family: str, rank: int = 4, **kw) -> ModelConfig:
    """GPT-2 tied, 3 layers; Llama untied with GQA and q/k/v biases, 2 layers. ``rank`` 0: no adapters."""
    base = dict(family=family, vocab_size=60, d_model=32, n_layers=3, n_heads=4, max_seq_len=32,
                tie_embeddings=family == "gpt2", lora=LoraConfig(rank=rank, alpha=8.0))
    if family == "llama":
        base.update(n_layers=2, n_kv_heads=2, attention_bias=True)
    return ModelConfig(**{**base, **kw})


def leaves_equal(a, b) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def is_factor(path: str) -> bool:
    return path.rsplit(".", 1)[-1] in LORA_FACTORS


def forward(cfg: ModelConfig):
    """Jitted ``params, tokens [B, L] -> (hidden, lm logits, q logits)`` of ``cfg``'s model."""
    graphdef = split_model(nnx.eval_shape(lambda: build(cfg)))[0]

    @jax.jit
    def run(params, tokens):
        m = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h = m.hidden(tokens, positions, jnp.ones_like(tokens))
        return h, m.lm_logits(h), m.q_logits(h)

    return lambda params, tokens: jax.tree.map(np.asarray, run(params, jnp.asarray(tokens)))


def tokens(cfg: ModelConfig, batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)


def with_random_factors(params, seed: int = 0, std: float = 0.2):
    """``params`` with every LoRA factor redrawn (B no longer zero), in NumPy."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: std * rng.standard_normal(x.shape).astype(np.float32) if path[-1].key in LORA_FACTORS
        else np.asarray(x), params)


# ----------------------------------------------------------------------------------------------------------------
# The layer and the model.


def test_lora_linear_matches_a_numpy_loop():
    """One projection: ``y = x W + b + (alpha / r) (x A) B``, every output summed out by hand."""
    d_in, d_out, r, alpha = 6, 5, 3, 12.0
    with nnx.use_eager_sharding(False):  # logical names only, no mesh (as models.build)
        layer = LoraLinear(nnx.Rngs(params=0), nnx.Rngs(params=1), d_in, d_out, ("embed", "mlp"), std=0.5,
                           dtype=jnp.float32, rank=r, alpha=alpha)
        fresh = LoraLinear(nnx.Rngs(params=0), nnx.Rngs(params=1), 64, 5, ("embed", "mlp"), std=0.5,
                           dtype=jnp.float32, rank=r, alpha=alpha)
    rng = np.random.default_rng(0)
    w, b = np.asarray(layer.kernel[...]), rng.standard_normal(d_out).astype(np.float32)
    a, bb = rng.standard_normal((d_in, r)).astype(np.float32), rng.standard_normal((r, d_out)).astype(np.float32)
    layer.bias[...], layer.lora_a[...], layer.lora_b[...] = b, a, bb
    x = rng.standard_normal((2, 4, d_in)).astype(np.float32)
    got = np.asarray(layer(jnp.asarray(x)))
    want = np.zeros((2, 4, d_out))
    for i in np.ndindex(2, 4):
        for o in range(d_out):
            low = sum(sum(x[i][k] * a[k, j] for k in range(d_in)) * bb[j, o] for j in range(r))
            want[i][o] = sum(x[i][k] * w[k, o] for k in range(d_in)) + b[o] + alpha / r * low
    chex.assert_shape(got, (2, 4, d_out))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # A fresh layer: B = 0, A ~ N(0, 1 / d_in) with the logical names of its kernel's in / out axes.
    assert not np.any(np.asarray(fresh.lora_b[...])) and abs(np.std(fresh.lora_a[...]) * 8 - 1) < 0.2
    assert fresh.lora_a.get_metadata()["out_sharding"] == ("embed", "lora_rank")
    assert fresh.lora_b.get_metadata()["out_sharding"] == ("lora_rank", "mlp")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_fresh_lora_model_is_the_base_model_of_its_seed(family):
    """Same seed: the base weights are bitwise those without adapters, the factors sit beside the targeted
    kernels with the stacked layer axis, and the outputs are the base model's (B = 0)."""
    lora, base = model_cfg(family), model_cfg(family, rank=0)
    p_lora, p_base = split_model(build(lora, seed=3))[1], split_model(build(base, seed=3))[1]
    f_lora, f_base = flatten(p_lora), flatten(p_base)
    assert not [k for k in f_base if "lora" in k]  # rank 0: no new keys
    assert {k: f_lora[k].tobytes() for k in f_base} == {k: f_base[k].tobytes() for k in f_base}
    blocks = "transformer.h." if family == "gpt2" else "transformer.layers."
    targets = lora.lora.projections(family)
    assert sorted(set(f_lora) - set(f_base)) == sorted(f"{blocks}{t}.{n}" for t in targets for n in LORA_FACTORS)
    for t in targets:
        a, b, kernel = (f_lora[f"{blocks}{t}.{n}"] for n in ("lora_a", "lora_b", "kernel"))
        chex.assert_shape([a, b], [(lora.n_layers, kernel.shape[1], 4), (lora.n_layers, 4, kernel.shape[2])])
        assert not np.any(b) and not np.array_equal(a[0], a[-1])  # B = 0; every layer draws its own A
    x = tokens(lora)
    ours, theirs = forward(lora)(p_lora, x), forward(base)(p_base, x)
    for got, want in zip(ours, theirs):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    print(f"{family}: fresh LoRA vs base max |diff| = {max(np.max(np.abs(g - w)) for g, w in zip(ours, theirs))}")


def test_rank_zero_parameters_are_those_of_the_model_without_lora():
    """The default config builds exactly the parameter tree it built before LoRA existed: the same paths (no
    factors), and every projection a plain nnx.Linear."""
    cfg = load_config("configs/demo.yaml")
    assert cfg.model.lora == LoraConfig() and cfg.model.lora.rank == 0
    model = build(cfg.model)
    paths = flatten(split_model(model)[1])
    assert not [k for k in paths if "lora" in k]
    expected_block = {"ln_1.scale", "ln_1.bias", "attn.c_attn.kernel", "attn.c_attn.bias", "attn.c_proj.kernel",
                      "attn.c_proj.bias", "ln_2.scale", "ln_2.bias", "mlp.c_fc.kernel", "mlp.c_fc.bias",
                      "mlp.c_proj.kernel", "mlp.c_proj.bias"}
    assert {k.removeprefix("transformer.h.") for k in paths if k.startswith("transformer.h.")} == expected_block
    assert not [m for _, m in nnx.iter_graph(model) if isinstance(m, LoraLinear)]


def test_targets_choose_the_projections():
    cfg = model_cfg("llama", lora=LoraConfig(rank=2, targets=("q_proj", "self_attn.v_proj", "mlp")))
    assert cfg.lora.projections("llama") == ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                                             "mlp.down_proj")
    paths = flatten(jax.eval_shape(lambda: split_model(build(cfg))[1]))
    adapted = sorted({k.split(".")[2] + "." + k.split(".")[3] for k in paths if is_factor(k)})
    assert adapted == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert LoraConfig(targets=("attn.c_proj",)).projections("gpt2") == ("attn.c_proj",)


# ----------------------------------------------------------------------------------------------------------------
# What trains.


@pytest.mark.parametrize("frozen", [0, 1])
def test_the_trained_part_is_the_factors_and_the_heads(frozen):
    cfg = small_cfg(model__family="llama", model__tie_embeddings=False, model__lora__rank=4,
                    train__frozen_layers=frozen)
    params = split_model(build(cfg.model, seed=0))[1]
    part = Partition.of(cfg)
    trained, bottom = part.split(params)
    assert leaves_equal(part.join(trained, bottom), params)
    flat_trained, flat_frozen = flatten(trained), flatten(bottom)
    trunk = [k for k in flat_trained if k.startswith("transformer.")]
    assert trunk and all(is_factor(k) for k in trunk)  # the trunk trains its factors alone
    assert {k.split(".")[0] for k in flat_trained} == {"transformer", "lm_head", "q_heads", "v_head"}
    assert all(not is_factor(k) or frozen for k in flat_frozen)  # base weights, and the bottom's factors
    for k in trunk:
        assert flat_trained[k].shape[0] == 3 - frozen
        if frozen:
            assert flat_frozen[k].shape[0] == frozen
    n_base = sum(v.size for k, v in flatten(params).items() if k.startswith("transformer.") and not is_factor(k))
    assert sum(v.size for k, v in flat_frozen.items() if not is_factor(k)) == n_base


def test_the_factors_get_the_gradient_the_whole_model_would_give_them():
    """Freezing the base weights changes which parameters move, not the loss or the factors' gradient."""
    cfg = small_cfg(model__lora__rank=4)
    params = jax.tree.map(jnp.asarray, with_random_factors(split_model(build(cfg.model, seed=1))[1], std=0.05))
    graphdef = split_model(nnx.eval_shape(lambda: build(cfg.model)))[0]
    batch = {k: jnp.asarray(v) for k, v in next(iter(jaxrl_lm.batches(cfg, steps=1))).items()}
    groups, denominator = init_state(cfg, params).groups, jnp.float32(100.0)
    part = Partition.of(cfg)
    trained, bottom = part.split(params)
    (loss_part, _), grads_part = jax.jit(jax.value_and_grad(
        lambda t: loss_fn(cfg, graphdef, part.join(t, bottom), groups, batch, denominator, None),
        has_aux=True))(trained)
    # The same loss with every parameter differentiated (the config without LoRA's split reads the same graph).
    whole_cfg = small_cfg()
    whole_groups = {name: part.with_group(params, g) for name, g in groups.items()}
    (loss_whole, _), grads_whole = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(whole_cfg, graphdef, p, whole_groups, batch, denominator, None), has_aux=True))(params)
    np.testing.assert_allclose(loss_part, loss_whole, rtol=1e-6)
    chex.assert_trees_all_equal_shapes(grads_part, part.trained(grads_whole))
    chex.assert_trees_all_close(grads_part, part.trained(grads_whole), rtol=1e-5, atol=1e-7)
    assert all(np.any(g) for k, g in flatten(grads_part).items() if is_factor(k))


def test_fresh_adapters_complete_a_model_without_them():
    """A trunk without adapters (an import, a rank-0 run) gets exactly the factors a fresh LoRA model of the seed
    has, so the result is that model; a stack of seeds gets them on every seed."""
    lora, base = model_cfg("gpt2"), model_cfg("gpt2", rank=0)
    p_base = jax.tree.map(np.asarray, split_model(build(base, seed=5))[1])
    filled = with_fresh_adapters(lora, p_base, seed=5)
    assert leaves_equal(filled, jax.tree.map(np.asarray, split_model(build(lora, seed=5))[1]))
    stacked = with_fresh_adapters(lora, jax.tree.map(lambda x: np.stack([x, x]), p_base), seed=5)
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x[1], stacked), filled)
    assert leaves_equal(with_fresh_adapters(lora, filled, seed=9), filled)  # factors present are kept
    assert leaves_equal(with_fresh_adapters(base, p_base, seed=5), p_base)


def test_merge_adds_the_scaled_product_to_each_kernel():
    cfg = model_cfg("llama")
    params = with_random_factors(split_model(build(cfg, seed=0))[1])
    merged, plain = merge_adapters(params, cfg)
    assert plain == dataclasses.replace(cfg, lora=LoraConfig()) and plain.lora.rank == 0
    f, m = flatten(params), flatten(merged)
    assert set(m) == {k for k in f if not is_factor(k)}
    q = "transformer.layers.self_attn.q_proj."
    for layer in range(cfg.n_layers):  # one layer at a time, in NumPy: W + (alpha / r) A B
        want = f[q + "kernel"][layer] + 8.0 / 4 * f[q + "lora_a"][layer] @ f[q + "lora_b"][layer]
        np.testing.assert_allclose(m[q + "kernel"][layer], want, rtol=1e-6, atol=1e-6)
    x = tokens(cfg)
    for got, want in zip(forward(plain)(merged, x), forward(cfg)(params, x)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# A run, and its export.


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, compile_once):
    """A rank-0 model saved as a run (the pretrained trunk); a 4-step LoRA run from it (rank 4, one frozen block,
    a full-scope EMA target, a raised learning rate so the factors move visibly); the same run as 2 steps + resume.
    """
    root = tmp_path_factory.mktemp("lora")
    source_cfg = small_cfg(train__out_dir=str(root / "source"))
    manager = checkpoint.make_manager(root / "source" / checkpoint.CHECKPOINT_SUBDIR, source_cfg.train)
    checkpoint.save(manager, 0, init_state(source_cfg, seed=11), loader_state={}, cfg=source_cfg)
    manager.close()
    kw = dict(model__lora__rank=4, model__lora__alpha=8.0, train__frozen_layers=1, token_q__target_scope="full",
              train__log_every=2, train__init_from=str(root / "source"), optim__learning_rate=3e-3)
    return root, straight_and_resumed(small_cfg, root, envs.task_dataset(small_cfg().data), **kw)


def test_a_lora_run_trains_only_the_factors_and_resumes_exactly(lora_runs):
    root, cfg = lora_runs
    state = restore_state(cfg)
    _, source, _ = jaxrl_lm.load_params(root / "source")
    part = Partition.of(cfg)
    trained, frozen = part.split(state.params)
    # Every base weight of the trunk is the source's, bitwise (after 4 steps), as are the frozen block's factors
    # (the source's fresh ones); the top blocks' factors and the heads moved.
    start = with_fresh_adapters(cfg.model, jax.device_get(source), cfg.train.seed)
    assert leaves_equal(frozen, part.split(start)[1])
    base = {k: v for k, v in flatten(frozen).items() if not is_factor(k)}
    assert base and base.keys() == {k for k in flatten(source) if k.startswith("transformer.")}
    moved = flatten(trained)
    first = flatten(part.trained(restore_state(cfg, step=1).params))
    for k, v in moved.items():
        assert not np.array_equal(v, first[k]), k  # A too: its gradient is 0 only while B is 0 (step 1)
    assert all(np.any(v) for k, v in moved.items() if k.endswith("lora_b"))
    # Optimizer moments and the EMA target hold exactly the trained part: no copy of a base weight.
    chex.assert_trees_all_equal_shapes(state.opt_state[1][0].mu, trained)
    chex.assert_trees_all_equal_shapes(state.opt_state[1][0].nu, trained)
    chex.assert_trees_all_equal_shapes(state.groups["target"], {k: trained[k] for k in state.groups["target"]})
    assert leaves_equal(state, restore_state(small_cfg(train__out_dir=str(root / "b"))))


def test_a_lora_run_loads_whole_for_policies_and_target_views(lora_runs):
    root, cfg = lora_runs
    _, params, _ = jaxrl_lm.load_params(root / "a")
    _, target, _ = jaxrl_lm.load_params(root / "a", group="target")
    chex.assert_trees_all_equal_shapes(params, target)  # the EMA factors completed by the frozen base weights
    part = Partition.of(cfg)
    assert leaves_equal(part.split(target)[1], part.split(params)[1])
    policy = jaxrl_lm.load_policy(root / "a", kind="ilql")  # the cached decoder through the adapted projections
    observation = envs.make_env("grid").reset(0)
    (action,) = policy([envs.render_transcript([{"role": "observation", "text": observation}])])
    assert isinstance(action, str)


def test_the_export_of_a_lora_run_is_a_plain_causal_lm_with_our_logits(lora_runs, tmp_path):
    root, cfg = lora_runs
    run_cfg, params, step = jaxrl_lm.load_params(root / "a")
    assert run_cfg.model.lora.rank == 4
    x = np.random.default_rng(0).integers(4, cfg.model.vocab_size, (2, 12)).astype(np.int32)
    # The trained factors, and larger random ones (so that a merge that dropped or mis-scaled A B would fail).
    bold = jax.tree.map(jnp.asarray, with_random_factors(params, std=0.3))
    for name, p in (("trained", params), ("random factors", bold)):
        out = export_hf(p, run_cfg.model, tmp_path / name.replace(" ", "_"), tokenizer=run_cfg.data.tokenizer,
                        run_config=run_cfg, step=step)
        assert "lora" not in json.loads((out / "config.json").read_text()).__repr__()
        assert not [k for k in SafetensorsDir(out) if "lora" in k]
        model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            hf = model(torch.as_tensor(x)).logits.numpy()
        ours = forward(run_cfg.model)(p, x)[1][..., :cfg.model.vocab_size]
        diff = float(np.max(np.abs(hf - ours)))
        base_model = forward(dataclasses.replace(run_cfg.model, lora=LoraConfig()))
        unmerged = float(np.max(np.abs(hf - base_model(_without_factors(p), x)[1][..., :cfg.model.vocab_size])))
        print(f"{name}: export max |logit diff| = {diff:.2e}; without the factors {unmerged:.2e}")
        assert diff < TOL
        if name == "random factors":
            assert unmerged > 100 * TOL
        # Imported back: a model without adapters whose parameters are the merged ones.
        cfg2, params2 = import_hf(out)
        assert cfg2.lora == LoraConfig() and cfg2 == merge_adapters(p, run_cfg.model)[1]
        assert not [k for k in flatten(params2) if "lora" in k]
        np.testing.assert_allclose(forward(cfg2)(params2, x)[1][..., :cfg.model.vocab_size], ours, atol=TOL)
    card = (tmp_path / "random_factors" / "README.md").read_text()
    assert "LoRA: adapters of rank 4 (alpha 8)" in card and "rank: 4" in card


def _without_factors(params):
    """The base model alone (the factors dropped, nothing merged)."""
    return {k: (_without_factors(v) if isinstance(v, dict) else v) for k, v in params.items() if k not in LORA_FACTORS}


# ----------------------------------------------------------------------------------------------------------------
# Config.


def test_bad_lora_settings_are_errors_naming_the_key():
    with pytest.raises(ConfigError, match="model.lora.rank"):
        small_cfg(model__lora__rank=-1)
    with pytest.raises(ConfigError, match="model.lora.alpha"):
        small_cfg(model__lora__rank=2, model__lora__alpha=0.0)
    with pytest.raises(ConfigError, match="model.lora.targets: 'q_proj' is not a gpt2 projection"):
        small_cfg(model__lora__targets=["q_proj"])
    with pytest.raises(ConfigError, match=r"model.lora.targets: 'c_proj' names \['attn.c_proj', 'mlp.c_proj'\]"):
        small_cfg(model__lora__rank=2, model__lora__targets=["c_proj"])
    with pytest.raises(ConfigError, match="model.lora.targets is empty"):
        small_cfg(model__lora__rank=2, model__lora__targets=[])
    for frozen in (-1, 3):
        with pytest.raises(ConfigError, match=r"train.frozen_layers .* model.lora.rank"):
            small_cfg(model__lora__rank=2, train__frozen_layers=frozen)
    assert small_cfg(model__lora__rank=2, train__frozen_layers=2).model.lora.rank == 2
