"""``config.json`` <-> ``ModelConfig``: which HF configs (GPT-2, Llama, Qwen2) we represent, and how.

``config_from_hf`` maps a HF ``config.json`` dict to a ``ModelConfig`` and refuses, naming the key, every variant
our blocks do not implement; ``config_to_hf`` gives the ``transformers`` config an export writes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxrl_lm.config import ModelConfig

# ModelConfig fields that config.json decides; an import override must not contradict them.
ARCH_FIELDS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "norm_eps",
               "rope_theta", "tie_embeddings", "attention_bias")


def _require(hf: Mapping[str, Any], where: str, key: str, default: Any, allowed: tuple, why: str) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise ValueError(f"{where}: {key}={value!r} is not supported ({why}; supported: {list(allowed)})")


def _gpt2_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    _require(hf, where, "activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh"),
             "jaxrl_lm's GPT-2 MLP uses the tanh GELU")
    _require(hf, where, "scale_attn_weights", True, (True,), "attention scores are scaled by 1/sqrt(head_dim)")
    _require(hf, where, "scale_attn_by_inverse_layer_idx", False, (False,), "no per-layer attention scaling")
    _require(hf, where, "add_cross_attention", False, (False,), "decoder-only")
    return dict(family="gpt2", vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_layers=hf["n_layer"],
                n_heads=hf["n_head"], n_kv_heads=0, d_ff=hf.get("n_inner") or 0, max_seq_len=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
                attention_bias=False, init_std=hf.get("initializer_range", 0.02))


def _llama_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    qwen2 = hf["model_type"] == "qwen2"
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    _require(rope, where, "rope_type", "default", ("default",), "RoPE without scaling")
    _require(hf, where, "hidden_act", "silu", ("silu",), "SwiGLU MLP")
    _require(hf, where, "mlp_bias", False, (False,), "the MLP has no biases")
    if qwen2:
        _require(hf, where, "use_sliding_window", False, (False,), "full attention in every layer")
    else:
        _require(hf, where, "attention_bias", False, (False,), "Llama's attention_bias puts a bias on o_proj too; "
                 "Qwen2-style q/k/v-only biases import from model_type qwen2")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    _require(hf, where, "head_dim", d // n, (d // n, None), "head_dim must be hidden_size / num_attention_heads")
    kv = hf.get("num_key_value_heads") or n
    return dict(family="llama", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
                n_heads=n, n_kv_heads=0 if kv == n else kv, d_ff=hf["intermediate_size"],
                max_seq_len=hf["max_position_embeddings"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                tie_embeddings=hf.get("tie_word_embeddings", False), attention_bias=qwen2,
                init_std=hf.get("initializer_range", 0.02))


_FIELDS_OF = {"gpt2": _gpt2_fields, "llama": _llama_fields, "qwen2": _llama_fields}


def with_overrides(fields: Mapping[str, Any], overrides: Mapping[str, Any], where: str,
                   fixed: tuple[str, ...]) -> ModelConfig:
    """``ModelConfig(**fields, **overrides)``, refusing unknown fields and overrides that contradict ``fixed``
    fields of ``where`` (the file ``fields`` come from)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown model override {key!r}; ModelConfig fields: {sorted(known)}")
        if key in fixed and value != fields[key]:
            raise ValueError(f"model.{key}={value!r} contradicts {where} ({fields[key]!r}); the checkpoint's "
                             f"tensors are shaped by it")
    unknown = set(fields) - known
    if unknown:
        raise ValueError(f"{where}: unknown ModelConfig fields {sorted(unknown)}")
    return ModelConfig(**{**fields, **overrides})


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json", **overrides: Any) -> ModelConfig:
    """A ModelConfig from a HF ``config.json`` dict (gpt2, llama or qwen2) plus ModelConfig overrides.

    Architecture fields (``ARCH_FIELDS``; for GPT-2 also ``max_seq_len``, the position table's rows) come from
    the file and may not be overridden; the rest (Q heads, dtype, remat, dropout, vocab padding, ...) may.
    Every unsupported variant is an error naming the key.
    """
    kind = hf.get("model_type")
    if kind not in _FIELDS_OF:
        raise ValueError(f"{where}: model_type {kind!r} is not supported; jaxrl_lm imports {sorted(_FIELDS_OF)}")
    fixed = ARCH_FIELDS + (("max_seq_len",) if kind == "gpt2" else ())
    return with_overrides(_FIELDS_OF[kind](hf, where), overrides, where, fixed)


def config_to_hf(cfg: ModelConfig, *, tie_word_embeddings: bool, **special_ids: Any):
    """The ``transformers`` config of ``cfg``: GPT2Config, LlamaConfig, or Qwen2Config when ``attention_bias``.

    ``special_ids``: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``. Llama-family dropout has no HF
    counterpart (HF Llama drops attention probabilities only) and is not exported.
    """
    import transformers  # slow to import; only export needs it

    common = dict(vocab_size=cfg.vocab_size, initializer_range=cfg.init_std, tie_word_embeddings=tie_word_embeddings,
                  dtype="float32", **special_ids)
    if cfg.family == "gpt2":
        return transformers.GPT2Config(
            n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_inner=cfg.d_ff or None, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0, architectures=["GPT2LMHeadModel"],
            **common)
    llama = dict(hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim, num_hidden_layers=cfg.n_layers,
                 num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                 max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                 rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, **common)
    if cfg.attention_bias:
        return transformers.Qwen2Config(architectures=["Qwen2ForCausalLM"], use_sliding_window=False, **llama)
    return transformers.LlamaConfig(architectures=["LlamaForCausalLM"], head_dim=cfg.head_dim, attention_bias=False,
                                    mlp_bias=False, **llama)
