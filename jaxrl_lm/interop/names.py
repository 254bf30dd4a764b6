"""Name tables: which Hugging Face tensor each of our parameters is, and the per-tensor transform both ways.

Conversion is data. A ``Rule`` names one of our parameters (a dotted path into the pure parameter dict), the HF
tensor it comes from (``{i}`` marks one tensor per layer, stacked on our leading ``[n_layers]`` axis) and a
``Hook``, the per-tensor transform both ways. The layouts differ only in:
- torch ``nn.Linear`` weights are ``[out, in]``, our kernels ``[in, out]`` (``TRANSPOSE``); GPT-2's ``Conv1D``
  weights are ``[in, out]`` already;
- our vocabulary may be padded to ``Vp = cfg.padded_vocab_size`` rows (``vocab_axis``). Import zero-fills the
  padding rows (every softmax masks them); export drops them, so HF sees exactly ``cfg.vocab_size`` tokens.

``hf_import.trunk_from_hf`` and ``hf_export.trunk_to_hf`` apply the table of a config (``rules``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional

import numpy as np

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.models import Params


@dataclasses.dataclass(frozen=True)
class Hook:
    """A per-tensor transform from HF's layout to ours and back (numpy, one layer at a time)."""

    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


COPY = Hook(lambda w: w, lambda w: w)
TRANSPOSE = Hook(np.transpose, np.transpose)  # nn.Linear weight [out, in] <-> kernel [in, out]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One parameter: our dotted path, the HF name (``{i}`` = per layer, stacked on axis 0), the hook, and the
    axis of ours that runs over the (padded) vocabulary, if any."""

    ours: str
    hf: str
    hook: Hook = COPY
    vocab_axis: Optional[int] = None


# Per-layer tensors: ours (under transformer.h / transformer.layers) -> HF (under <prefix>.{i}) and the hook.
_GPT2_LAYER = {  # Conv1D weights are [in, out] already
    "ln_1.scale": ("ln_1.weight", COPY), "ln_1.bias": ("ln_1.bias", COPY),
    "attn.c_attn.kernel": ("attn.c_attn.weight", COPY), "attn.c_attn.bias": ("attn.c_attn.bias", COPY),
    "attn.c_proj.kernel": ("attn.c_proj.weight", COPY), "attn.c_proj.bias": ("attn.c_proj.bias", COPY),
    "ln_2.scale": ("ln_2.weight", COPY), "ln_2.bias": ("ln_2.bias", COPY),
    "mlp.c_fc.kernel": ("mlp.c_fc.weight", COPY), "mlp.c_fc.bias": ("mlp.c_fc.bias", COPY),
    "mlp.c_proj.kernel": ("mlp.c_proj.weight", COPY), "mlp.c_proj.bias": ("mlp.c_proj.bias", COPY),
}
_LLAMA_LAYER = {
    "input_layernorm.scale": ("input_layernorm.weight", COPY),
    "self_attn.q_proj.kernel": ("self_attn.q_proj.weight", TRANSPOSE),
    "self_attn.k_proj.kernel": ("self_attn.k_proj.weight", TRANSPOSE),
    "self_attn.v_proj.kernel": ("self_attn.v_proj.weight", TRANSPOSE),
    "self_attn.o_proj.kernel": ("self_attn.o_proj.weight", TRANSPOSE),
    "post_attention_layernorm.scale": ("post_attention_layernorm.weight", COPY),
    "mlp.gate_proj.kernel": ("mlp.gate_proj.weight", TRANSPOSE),
    "mlp.up_proj.kernel": ("mlp.up_proj.weight", TRANSPOSE),
    "mlp.down_proj.kernel": ("mlp.down_proj.weight", TRANSPOSE),
}
_QKV_BIASES = {f"self_attn.{p}_proj.bias": (f"self_attn.{p}_proj.bias", COPY) for p in "qkv"}  # Qwen2
# Our token table per family (also the LM head when tied).
TOKEN_EMBEDDING = {"gpt2": "transformer.wte.embedding", "llama": "transformer.embed_tokens.embedding"}
# The prefix HF puts before the trunk's tensors; hub GPT-2 files saved from GPT2Model lack it.
HF_BASE_PREFIX = {"gpt2": "transformer.", "llama": "model."}
# HF tensors that carry no parameters (GPT-2's causal-mask buffers, old Llama RoPE buffers).
IGNORED = re.compile(r"(\.attn\.(masked_)?bias|\.rotary_emb\.inv_freq)$")


def rules(cfg: ModelConfig) -> list[Rule]:
    """The name table of ``cfg``'s family: every trunk and LM-head parameter (not the Q/V heads)."""
    if cfg.family == "gpt2":
        table = [Rule(TOKEN_EMBEDDING["gpt2"], "transformer.wte.weight", vocab_axis=0),
                 Rule("transformer.wpe.embedding", "transformer.wpe.weight"),
                 Rule("transformer.ln_f.scale", "transformer.ln_f.weight"),
                 Rule("transformer.ln_f.bias", "transformer.ln_f.bias")]
        table += [Rule(f"transformer.h.{o}", f"transformer.h.{{i}}.{h}", k) for o, (h, k) in _GPT2_LAYER.items()]
    else:
        table = [Rule(TOKEN_EMBEDDING["llama"], "model.embed_tokens.weight", vocab_axis=0),
                 Rule("transformer.norm.scale", "model.norm.weight")]
        layer = {**_LLAMA_LAYER, **(_QKV_BIASES if cfg.attention_bias else {})}
        table += [Rule(f"transformer.layers.{o}", f"model.layers.{{i}}.{h}", k) for o, (h, k) in layer.items()]
    if not cfg.tie_embeddings:
        table.append(Rule("lm_head.kernel", "lm_head.weight", TRANSPOSE, vocab_axis=1))
    return table


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    """The leaf at dotted ``path`` (a ``Rule.ours``) of a nested parameter dict."""
    for key in path.split("."):
        tree = tree[key]
    return tree


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    """Puts ``value`` at dotted ``path`` of a nested dict, creating the parent dicts as needed."""
    *parents, last = path.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def lm_rows(cfg: ModelConfig, params: Params) -> np.ndarray:
    """The LM head as one row per token, ``[Vp, D]`` float32 (the tied table, or the untied kernel transposed)."""
    if cfg.tie_embeddings:
        return np.asarray(get_path(params, TOKEN_EMBEDDING[cfg.family]), np.float32)
    return np.asarray(params["lm_head"]["kernel"], np.float32).T
