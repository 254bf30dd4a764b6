"""Hugging Face interop: GPT-2, Llama and Qwen2 checkpoints in (``import_hf``) and out (``export_hf``).

Import reads a local directory: ``config.json`` plus ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) of a ``GPT2LMHeadModel``, ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``; nothing
is downloaded. Export writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load without remote code, with the Q/V heads beside it in ``q_heads.safetensors``
(described by ``q_heads.json``), so that ``import_hf`` of an export gives back the whole Q-model exactly.

Conversion is data. A ``Rule`` names one of our parameters (a dotted path into the pure parameter dict), the HF
tensor it comes from (``{i}`` marks one tensor per layer, stacked on our leading ``[n_layers]`` axis) and a
``Hook``, the per-tensor transform both ways. The layouts differ only in:
- torch ``nn.Linear`` weights are ``[out, in]``, our kernels ``[in, out]`` (``TRANSPOSE``); GPT-2's ``Conv1D``
  weights are ``[in, out]`` already;
- our vocabulary may be padded to ``Vp = cfg.padded_vocab_size`` rows (``vocab_axis``). Import zero-fills the
  padding rows (every softmax masks them); export drops them, so HF sees exactly ``cfg.vocab_size`` tokens.

Q and V heads at import (``q_init``):
- ``"random"``: initialised as ``build`` does (``cfg.init_std`` = HF's ``initializer_range``), from ``seed``.
- ``"lm_head"``: every Q-head starts as the LM head, ``Q_k(h, a) = LM(h, a)``. A linear head takes the LM's rows
  as ``out_kernel`` and a zero bias: exact. An mlp head ``gelu(h W1 + b1) W2 + b2`` (hidden ``M >= 2D``) gets
  ``W1 = [I, -I, 0]``, ``b1 = 0``, output row ``[w_a, -w_a, 0]`` and ``b2 = 0``: since ``gelu(z) = z s(z)`` with
  ``s(z) + s(-z) = 1`` (exact GELU and its tanh approximation alike), ``gelu(z) - gelu(-z) = z``, so
  ``Q_k(h, a) = w_a . h`` up to float rounding. The K heads start identical and every loss treats them
  symmetrically, so they stay identical (double Q acts as single Q); use it with ``model.n_q_heads=1`` or accept
  that. The V head is random either way.
- ``None`` (default): the heads saved in ``q_heads.safetensors`` when the directory is a jaxrl_lm export, else
  ``"random"``.

Merged policy export (``policy``). At a state with hidden ``h`` the engine's policies (DESIGN.md section 3) are
``softmax(s / T)`` with scores
    ``ilql``: ``s(a) = log_softmax(h W_lm)(a) + beta * (min_k Q_k(h, a) - V(h))``,
    ``q``:    ``s(a) = min_k Q_k(h, a)``.
``log_softmax(l)(a) = l(a) - logsumexp(l)`` and ``beta V(h)`` are the same for every action, and softmax ignores
a per-state constant. With ``K = 1`` and a linear head ``Q(h, a) = h . w_q[a] + b_q[a]`` the scores are therefore
``h . (w_lm[a] + beta w_q[a]) + beta b_q[a] + c(h)``, and when ``b_q`` is the same for every action (it folds
into ``c(h)``) the policy is exactly ``softmax(h W')`` of an ordinary HF LM head
    ``ilql``: ``W' = (W_lm + beta W_q) / T``,      ``q``: ``W' = W_q / T``.
This is what a merged export writes as ``lm_head.weight`` (untied: ``tie_word_embeddings`` false; the original
LM head stays in ``q_heads.safetensors``). It is refused, with the reason, when not exact: ``K > 1`` (a min over
heads is not linear in ``h``), an mlp head, or an output bias that differs between actions (HF's LM head has no
bias). ``policy="bc"`` exports the LM head itself (the behaviour-cloning policy); the heads travel beside it
for every policy.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.data.tokenizer import Tokenizer, load_tokenizer
from jaxrl_lm.models.heads import QHeads, VHead
from jaxrl_lm.models.model import build

Params = dict[str, Any]

HEADS_FILE = "q_heads.safetensors"
HEADS_JSON = "q_heads.json"
HEADS_FORMAT = "jaxrl_lm.q_heads/1"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Files of a HF tokenizer directory, copied as they are where a tokenizer travels with a model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


# ----------------------------------------------------------------------------------------------------------------
# Name tables.


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
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias|\.rotary_emb\.inv_freq)$")


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


# ----------------------------------------------------------------------------------------------------------------
# Config mapping.

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


def _with_overrides(fields: Mapping[str, Any], overrides: Mapping[str, Any], where: str,
                    fixed: tuple[str, ...]) -> ModelConfig:
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
    return _with_overrides(_FIELDS_OF[kind](hf, where), overrides, where, fixed)


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


# ----------------------------------------------------------------------------------------------------------------
# Tensors in and out.


class SafetensorsDir(Mapping[str, np.ndarray]):
    """The tensors of a HF directory by name, read lazily as float32 numpy whatever their stored float dtype."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / WEIGHTS_INDEX
        if index.is_file():
            self.file_of = {k: self.dir / v for k, v in _read_json(index)["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(self.dir / "model.safetensors", "np") as f:
                self.file_of = {k: self.dir / "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or {WEIGHTS_INDEX} (PyTorch .bin weights are "
                                    f"not read: re-save the model with save_pretrained, which writes safetensors)")
        self._handles: dict[Path, Any] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        path = self.file_of[name]
        if path not in self._handles:
            # "flax" reads every float dtype (numpy has no bfloat16); arrays stay on the host.
            self._handles[path] = safe_open(path, "flax")
        with jax.default_device(jax.devices("cpu")[0]):
            return np.asarray(self._handles[path].get_tensor(name), np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)


def _get(tree: Mapping[str, Any], path: str) -> Any:
    for key in path.split("."):
        tree = tree[key]
    return tree


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def _pad_vocab(x: np.ndarray, axis: int, rows: int) -> np.ndarray:
    width = [(0, 0)] * x.ndim
    width[axis] = (0, rows - x.shape[axis])
    return np.pad(x, width)


def trunk_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], where: str = "checkpoint") -> Params:
    """Our trunk (and untied LM head) parameters from HF-named tensors, as a nested dict of float32 numpy.

    Raises a ValueError naming ``where`` and the tensor that is missing or has the wrong vocabulary size, and one
    listing every HF tensor that no rule reads (an architecture variant the blocks do not implement).
    """
    prefix = HF_BASE_PREFIX[cfg.family]
    names = {n if n.startswith(prefix) or n.startswith("lm_head.") else prefix + n: n for n in tensors}
    used: set[str] = set()

    def read(hf_name: str) -> np.ndarray:
        if hf_name not in names:
            raise ValueError(f"{where}: tensor {hf_name} is missing ({cfg.family}, "
                             f"tie_embeddings={cfg.tie_embeddings}, attention_bias={cfg.attention_bias})")
        used.add(names[hf_name])
        return tensors[names[hf_name]]

    out: Params = {}
    for rule in rules(cfg):
        if "{i}" in rule.hf:
            value = np.stack([rule.hook.to_ours(read(rule.hf.format(i=i))) for i in range(cfg.n_layers)])
        else:
            value = rule.hook.to_ours(read(rule.hf))
        if rule.vocab_axis is not None:
            rows = value.shape[rule.vocab_axis]
            if rows != cfg.vocab_size:
                raise ValueError(f"{where}: tensor {rule.hf} has {rows} vocabulary rows, the config says "
                                 f"vocab_size={cfg.vocab_size}")
            value = _pad_vocab(value, rule.vocab_axis, cfg.padded_vocab_size)
        _set(out, rule.ours, value)
    tied_lm = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unused = sorted(n for n in tensors if n not in used and not _IGNORED.search(n) and n not in tied_lm)
    if unused:
        raise ValueError(f"{where}: tensors that jaxrl_lm's {cfg.family} blocks do not use (an unsupported "
                         f"architecture variant?): {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    return out


def trunk_to_hf(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """HF-named float32 tensors of our trunk (and untied LM head); vocabulary padding rows are dropped."""
    out: dict[str, np.ndarray] = {}
    for rule in rules(cfg):
        value = np.asarray(_get(params, rule.ours), np.float32)
        if rule.vocab_axis is not None:
            value = np.take(value, np.arange(cfg.vocab_size), axis=rule.vocab_axis)
        if "{i}" in rule.hf:
            out.update({rule.hf.format(i=i): rule.hook.to_hf(value[i]) for i in range(cfg.n_layers)})
        else:
            out[rule.hf] = rule.hook.to_hf(value)
    return out


def lm_rows(cfg: ModelConfig, params: Params) -> np.ndarray:
    """The LM head as one row per token, ``[Vp, D]`` float32 (the tied table, or the untied kernel transposed)."""
    if cfg.tie_embeddings:
        return np.asarray(_get(params, TOKEN_EMBEDDING[cfg.family]), np.float32)
    return np.asarray(params["lm_head"]["kernel"], np.float32).T


# ----------------------------------------------------------------------------------------------------------------
# Q and V heads.


def _module_params(module: nnx.Module) -> Params:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(module, nnx.Param)[1]))


def q_heads_from_lm(cfg: ModelConfig, rows: np.ndarray) -> Params:
    """Q-head parameters with ``Q_k(h, a) = rows[a] . h`` for every head (see the module docstring).

    ``rows``: ``[Vp, D]`` float32, the LM head's rows.
    """
    k, d, vp = cfg.n_q_heads, cfg.d_model, cfg.padded_vocab_size
    stack = lambda x: np.broadcast_to(x, (k,) + x.shape).copy()  # noqa: E731
    bias = {"out_bias": np.zeros((k, vp), np.float32)} if cfg.q_head_bias else {}
    if cfg.q_head == "linear":
        return {"out_kernel": stack(rows), **bias}
    m = cfg.q_head_hidden_mult * d
    if m < 2 * d:
        raise ValueError(f"q_init='lm_head' with an mlp Q head needs model.q_head_hidden_mult >= 2 (the head copies "
                         f"h through gelu(h) - gelu(-h)); got {cfg.q_head_hidden_mult}. Use 2 or q_head=linear")
    eye = np.eye(d, dtype=np.float32)
    fc = np.zeros((d, m), np.float32)
    fc[:, :d], fc[:, d:2 * d] = eye, -eye
    out = np.zeros((vp, m), np.float32)
    out[:, :d], out[:, d:2 * d] = rows, -rows
    return {"fc_kernel": stack(fc), "fc_bias": np.zeros((k, m), np.float32), "out_kernel": stack(out), **bias}


def init_heads(cfg: ModelConfig, trunk: Params, *, q_init: Literal["random", "lm_head"], seed: int) -> Params:
    """``{"q_heads": ..., "v_head": ...}`` initialised as ``q_init`` says (module docstring), from ``seed``."""
    if q_init not in ("random", "lm_head"):
        raise ValueError(f"q_init must be 'random' or 'lm_head' (or None for a jaxrl_lm export), got {q_init!r}")
    with nnx.use_eager_sharding(False):
        rngs = nnx.Rngs(params=seed)
        if q_init == "lm_head":
            q_heads = q_heads_from_lm(cfg, lm_rows(cfg, trunk))
        else:
            q_heads = _module_params(QHeads(cfg, rngs))
        return {"q_heads": q_heads, "v_head": _module_params(VHead(cfg, rngs))}


def read_heads(hf_dir: str | Path) -> tuple[dict[str, Any], Params]:
    """The description (``q_heads.json``) and tensors (``q_heads.safetensors``) of an export's heads.

    Tensors come back nested: ``q_heads``, ``v_head``, ``target.q_heads`` (when the export has the EMA target
    heads) and ``lm_head`` (the original untied LM head of a merged-policy export).
    """
    hf_dir = Path(hf_dir)
    meta = _read_json(hf_dir / HEADS_JSON)
    if meta.get("format") != HEADS_FORMAT:
        raise ValueError(f"{hf_dir / HEADS_JSON}: format {meta.get('format')!r} is not {HEADS_FORMAT!r}")
    tree: Params = {}
    for name, value in load_file(hf_dir / meta["file"]).items():
        _set(tree, name, value)
    return meta, tree


def _check_shapes(cfg: ModelConfig, params: Params, where: str) -> None:
    """Refuses a parameter tree that differs from ``build(cfg)``'s in any path or shape."""
    expected = _flatten(jax.eval_shape(lambda: nnx.to_pure_dict(nnx.split(build(cfg), nnx.Param)[1])))
    got = _flatten(params)
    wrong = [f"{k}: {tuple(got[k].shape) if k in got else 'missing'} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k not in got or tuple(got[k].shape) != tuple(v.shape)]
    wrong += [f"{k}: not a parameter of this config" for k in got if k not in expected]
    if wrong:
        raise ValueError(f"{where}: parameters do not fit the config ({cfg.family}, n_q_heads={cfg.n_q_heads}, "
                         f"q_head={cfg.q_head}, padded vocab {cfg.padded_vocab_size}):\n  " + "\n  ".join(wrong))


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], *, q_init: Optional[str] = "random",
                   seed: int = 0, saved_heads: Optional[Params] = None, where: str = "checkpoint") -> Params:
    """Our full parameter dict (jax float32) from HF-named tensors: trunk + LM head imported, heads by ``q_init``.

    ``saved_heads`` (from ``read_heads``) supplies the heads for ``q_init=None`` and, always, the original LM
    head of a merged-policy export.
    """
    trunk = trunk_from_hf(cfg, tensors, where)
    if saved_heads is not None and "lm_head" in saved_heads:
        trunk["lm_head"] = saved_heads["lm_head"]
    if q_init is None:
        heads = {k: saved_heads[k] for k in ("q_heads", "v_head")}
    else:
        heads = init_heads(cfg, trunk, q_init=q_init, seed=seed)
    params = {**trunk, **heads}
    _check_shapes(cfg, params, where)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def import_hf(hf_dir: str | Path, *, q_init: Optional[Literal["random", "lm_head"]] = None, seed: int = 0,
              **model_overrides: Any) -> tuple[ModelConfig, Params]:
    """Imports a local HF directory (GPT-2, Llama, Qwen2, or a jaxrl_lm export) as ``(ModelConfig, params)``.

    Args:
      hf_dir: ``config.json`` + ``model.safetensors`` (or shards with ``model.safetensors.index.json``).
      q_init: how the Q/V heads start: ``"random"``, ``"lm_head"`` (module docstring) or None: the saved heads of
        a jaxrl_lm export (its ``q_heads.json``), else random.
      seed: PRNG seed of randomly initialised heads.
      **model_overrides: ModelConfig fields, e.g. ``n_q_heads=1, q_head="linear", dtype="bfloat16"``. A jaxrl_lm
        export's own ModelConfig (saved in ``q_heads.json``) is the base; otherwise ``config_from_hf``.

    Returns:
      The config and the pure parameter dict (float32 jax arrays), shaped exactly as ``build(cfg)``'s, so
      ``nnx.merge(graphdef, params)`` runs it.
    """
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    hf_config = _read_json(config_path)
    saved_heads = None
    if (hf_dir / HEADS_JSON).is_file():
        meta, saved_heads = read_heads(hf_dir)
        fields = dict(meta["model_config"])
        cfg = _with_overrides(fields, model_overrides, str(hf_dir / HEADS_JSON), ARCH_FIELDS)
    else:
        cfg = config_from_hf(hf_config, str(config_path), **model_overrides)
        q_init = q_init or "random"
    return cfg, params_from_hf(cfg, SafetensorsDir(hf_dir), q_init=q_init, seed=seed, saved_heads=saved_heads,
                               where=str(hf_dir))


# ----------------------------------------------------------------------------------------------------------------
# Export.


def policy_lm_head(params: Params, cfg: ModelConfig, policy: Literal["ilql", "q"], *, beta: float,
                   temperature: float) -> np.ndarray:
    """The HF ``lm_head.weight`` ``[V, D]`` float32 whose softmax is exactly the ``policy`` (module docstring).

    Raises a ValueError listing every reason the merge would not be exact.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive for a merged policy, got {temperature}")
    v = cfg.vocab_size
    bias = np.asarray(params["q_heads"].get("out_bias", np.zeros((cfg.n_q_heads, v), np.float32)), np.float32)[:, :v]
    reasons = []
    if cfg.n_q_heads != 1:
        reasons.append(f"model.n_q_heads={cfg.n_q_heads}: min_k over several heads is not linear in h")
    if cfg.q_head != "linear":
        reasons.append("model.q_head=mlp: an mlp head is not linear in h")
    spread = float(np.max(bias[0]) - np.min(bias[0]))
    if spread != 0.0:
        reasons.append(f"q_heads.out_bias differs between actions (spread {spread:.3g}); HF's lm_head has no bias "
                       f"to fold it into (train with model.q_head_bias=false)")
    if reasons:
        raise ValueError(f"policy={policy!r}: the merged LM head would not be exact: " + "; ".join(reasons) +
                         ". It is exact only for one linear Q head with an action-independent bias. Export "
                         "policy='bc' instead: the Q/V heads travel in q_heads.safetensors")
    w_q = np.asarray(params["q_heads"]["out_kernel"], np.float32)[0, :v]
    if policy == "q":
        return w_q / temperature
    return (lm_rows(cfg, params)[:v] + beta * w_q) / temperature


def _save_weights(tensors: dict[str, np.ndarray], out: Path, max_shard_size: int | str) -> None:
    for stale in (*out.glob("model*.safetensors"), out / WEIGHTS_INDEX):
        stale.unlink(missing_ok=True)
    split = split_state_dict_into_shards_factory(tensors, get_storage_size=lambda a: a.nbytes,
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: np.array(tensors[n], np.float32, order="C") for n in names}, out / filename,
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))


def save_tokenizer(tokenizer: Tokenizer | str | Path, out: str | Path) -> Tokenizer:
    """Writes a tokenizer that ``AutoTokenizer.from_pretrained(out)`` loads; returns it as our ``Tokenizer``.

    ``tokenizer``: a HF tokenizer directory (its files are copied as they are, chat template included), a
    ``tokenizer.json`` path, ``""`` (the built-in byte tokenizer) or a ``Tokenizer``. The last three are written
    as a ``PreTrainedTokenizerFast`` (``tokenizer.json`` + ``tokenizer_config.json``) with our BOS/EOS/PAD and the
    end-of-turn token as an extra special token. (HF encodes special-token text in a string as that token;
    ``Tokenizer.encode_batch`` encodes it as plain text.)
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, (str, Path)) and (Path(tokenizer) / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copy2(Path(tokenizer) / name, out / name)
        return load_tokenizer(tokenizer)
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    ours = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    # A fresh copy: ours encodes special-token text as plain text, which HF users would not expect.
    backend = tokenizers.Tokenizer.from_str(ours.backend.to_str())
    s = ours.special_tokens
    extra = [s["eot"]] if s["eot"] not in (s["bos"], s["eos"], s["pad"]) else []
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=s["bos"], eos_token=s["eos"], pad_token=s["pad"],
                            additional_special_tokens=extra).save_pretrained(out)
    return ours


def _heads_tensors(params: Params, target_params: Optional[Params], original_lm: Optional[np.ndarray]) -> dict:
    tensors = _flatten({k: params[k] for k in ("q_heads", "v_head")})
    if target_params is not None:
        tensors.update(_flatten({"q_heads": target_params["q_heads"]}, "target."))
    if original_lm is not None:
        tensors["lm_head.kernel"] = original_lm
    return {k: np.array(v, np.float32, order="C") for k, v in tensors.items()}


def export_hf(params: Params, cfg: ModelConfig, out_dir: str | Path, *,
              tokenizer: Tokenizer | str | Path | None = None, policy: Literal["bc", "ilql", "q"] = "bc",
              beta: float = 1.0, temperature: float = 1.0, max_shard_size: int | str = "2GB",
              target_params: Optional[Params] = None, params_source: Literal["online", "ema"] = "online") -> Path:
    """Writes a HF directory of the model and its heads; returns ``out_dir``.

    Args:
      params: the pure parameter dict (``TrainState.params``, or online params with the EMA groups swapped in).
      cfg: its ModelConfig.
      out_dir: created if needed; an earlier export's weight files there are replaced.
      tokenizer: see ``save_tokenizer``; None writes no tokenizer.
      policy: what the HF LM head computes: ``"bc"`` (the LM head itself), ``"ilql"`` or ``"q"`` (merged, exact or
        refused: module docstring), with ``beta`` and ``temperature``.
      max_shard_size: ``model.safetensors`` is split into ``model-0000i-of-0000n.safetensors`` shards plus
        ``model.safetensors.index.json`` past this size (bytes, or a string such as ``"2GB"``).
      target_params: ``TrainState.target_params``; its ``q_heads`` are saved as ``target.q_heads.*``.
      params_source: recorded in ``q_heads.json``: whether ``params`` are the online or the EMA parameters.

    Writes ``config.json``, ``generation_config.json`` (sampling at temperature 1 with no top-k/top-p cut, so that
    ``generate(do_sample=True)`` samples the exported policy itself; stops at end-of-turn or EOS),
    ``model*.safetensors``, the tokenizer files, ``q_heads.safetensors`` and ``q_heads.json``. Example::

        out = jaxrl_lm.export_hf(state.params, cfg.model, "runs/demo-hf", tokenizer=cfg.data.tokenizer,
                                 target_params=state.target_params)
        model = transformers.AutoModelForCausalLM.from_pretrained(out)    # logits [B, L, vocab_size]
    """
    if policy not in ("bc", "ilql", "q"):
        raise ValueError(f"policy must be 'bc', 'ilql' or 'q', got {policy!r}")
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    tensors = trunk_to_hf(cfg, params)
    tie, original_lm = cfg.tie_embeddings, None
    if policy != "bc":  # refused here, before anything is written, when the merge is not exact
        tensors["lm_head.weight"] = policy_lm_head(params, cfg, policy, beta=beta, temperature=temperature)
        original_lm = None if tie else params["lm_head"]["kernel"]
        tie = False

    ids: dict[str, Any] = {}
    stop: list[int] = []
    if tokenizer is not None:
        tok = save_tokenizer(tokenizer, out)
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} ids, more than the model's vocab_size "
                             f"{cfg.vocab_size}")
        ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        stop = list(dict.fromkeys([tok.eot_id, tok.eos_id]))
    _save_weights(tensors, out, max_shard_size)
    config_to_hf(cfg, tie_word_embeddings=tie, **ids).save_pretrained(out)
    GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                     **{**ids, **({"eos_token_id": stop} if stop else {})}).save_pretrained(out)

    heads = _heads_tensors(params, target_params, original_lm)
    save_file(heads, out / HEADS_FILE, metadata={"format": "np"})
    meta = {
        "format": HEADS_FORMAT,
        "file": HEADS_FILE,
        "params": params_source,
        "has_target": target_params is not None,
        "head_type": cfg.q_head,
        "n_q_heads": cfg.n_q_heads,
        "hidden": cfg.q_head_hidden_mult * cfg.d_model if cfg.q_head == "mlp" else cfg.d_model,
        "vocab_size": cfg.vocab_size,
        "padded_vocab_size": cfg.padded_vocab_size,
        "policy": {"kind": policy, "beta": beta, "temperature": temperature, "tie_word_embeddings_exported": tie},
        "heads": ("Q_k(h) = out_kernel[k] @ f_k(h) + out_bias[k] for all actions, f_k(h) = gelu_tanh(h @ fc_kernel[k]"
                  " + fc_bias[k]) (mlp) or h (linear); V(h) = out_kernel . f(h) + out_bias; h = the trunk's final "
                  "normed hidden state. Rows >= vocab_size are vocabulary padding (mask them)"),
        "tensors": {k: list(v.shape) for k, v in heads.items()},
        "model_config": dataclasses.asdict(cfg),
    }
    (out / HEADS_JSON).write_text(json.dumps(meta, indent=2))
    return out
