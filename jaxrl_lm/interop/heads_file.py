"""The Q/V heads beside a HF export: ``q_heads.safetensors`` (tensors) described by ``q_heads.json``.

A HF ``*ForCausalLM`` has no place for our Q and V heads, so an export writes them here (with the EMA target Q
heads and, for a merged-policy export, the original LM head), together with the exporting ``ModelConfig``; an
import of the directory (``read_heads``) gives back the whole Q-model exactly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
from safetensors.numpy import load_file, save_file

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.interop.safetensors_io import flatten, read_json, unflatten
from jaxrl_lm.models import Params

HEADS_FILE = "q_heads.safetensors"
HEADS_JSON = "q_heads.json"
HEADS_FORMAT = "jaxrl_lm.q_heads/1"


def read_heads(hf_dir: str | Path) -> tuple[dict[str, Any], Params]:
    """The description (``q_heads.json``) and tensors (``q_heads.safetensors``) of an export's heads.

    Tensors come back nested: ``q_heads``, ``v_head``, ``target.q_heads`` (when the export has the EMA target
    heads) and ``lm_head`` (the original untied LM head of a merged-policy export).
    """
    hf_dir = Path(hf_dir)
    meta = read_json(hf_dir / HEADS_JSON)
    if meta.get("format") != HEADS_FORMAT:
        raise ValueError(f"{hf_dir / HEADS_JSON}: format {meta.get('format')!r} is not {HEADS_FORMAT!r}")
    return meta, unflatten(load_file(hf_dir / meta["file"]))


def _heads_tensors(params: Params, target_params: Optional[Params], original_lm: Optional[np.ndarray]) -> dict:
    tensors = flatten({k: params[k] for k in ("q_heads", "v_head")})
    if target_params is not None:
        tensors.update(flatten({"q_heads": target_params["q_heads"]}, "target."))
    if original_lm is not None:
        tensors["lm_head.kernel"] = original_lm
    return {k: np.array(v, np.float32, order="C") for k, v in tensors.items()}


def write_heads(out: Path, params: Params, cfg: ModelConfig, *, target_params: Optional[Params],
                original_lm: Optional[np.ndarray], params_source: str, policy: dict[str, Any]) -> None:
    """Writes ``q_heads.safetensors`` and ``q_heads.json`` into ``out``.

    ``params``: numpy parameters (their ``q_heads`` and ``v_head`` are saved); ``target_params``: saved as
    ``target.q_heads.*`` when given; ``original_lm``: the untied LM kernel a merged-policy export replaced, or
    None; ``params_source`` (``"online"`` / ``"ema"``) and ``policy`` (what the HF LM head computes) are recorded.
    """
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
        "policy": policy,
        "heads": ("Q_k(h) = out_kernel[k] @ f_k(h) + out_bias[k] for all actions, f_k(h) = gelu_tanh(h @ fc_kernel[k]"
                  " + fc_bias[k]) (mlp) or h (linear); V(h) = out_kernel . f(h) + out_bias; h = the trunk's final "
                  "normed hidden state. Rows >= vocab_size are vocabulary padding (mask them)"),
        "tensors": {k: list(v.shape) for k, v in heads.items()},
        "model_config": dataclasses.asdict(cfg),
    }
    (out / HEADS_JSON).write_text(json.dumps(meta, indent=2))
