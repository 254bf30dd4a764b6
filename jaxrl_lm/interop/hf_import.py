"""Hugging Face checkpoints in: ``import_hf`` reads a local GPT-2, Llama or Qwen2 directory (or a jaxrl_lm export).

Import reads ``config.json`` plus ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``) of a
``GPT2LMHeadModel``, ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``; nothing is downloaded. The trunk and LM head
come from the name tables (``names``); the Q and V heads, which HF has no place for, start as ``q_init`` says:
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

LoRA: HF directories hold plain weights (an export merges its adapters). An import whose config asks for
adapters (``import_hf(dir, lora=LoraConfig(rank=8))``) gets fresh factors beside the imported weights
(``with_fresh_adapters``: ``A`` from ``seed``, ``B = 0``), so it computes exactly the imported model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_lm.config import LoraConfig, ModelConfig
from jaxrl_lm.interop.heads_file import HEADS_JSON, read_heads
from jaxrl_lm.interop.hf_config import ARCH_FIELDS, config_from_hf, with_overrides
from jaxrl_lm.interop.names import HF_BASE_PREFIX, IGNORED, lm_rows, rules, set_path
from jaxrl_lm.interop.safetensors_io import SafetensorsDir, flatten, read_json
from jaxrl_lm.models import Params, build
from jaxrl_lm.models.heads import QHeads, VHead
from jaxrl_lm.models.partition import with_fresh_adapters


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
        set_path(out, rule.ours, value)
    tied_lm = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unused = sorted(n for n in tensors if n not in used and not IGNORED.search(n) and n not in tied_lm)
    if unused:
        raise ValueError(f"{where}: tensors that jaxrl_lm's {cfg.family} blocks do not use (an unsupported "
                         f"architecture variant?): {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    return out


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


def _check_shapes(cfg: ModelConfig, params: Params, where: str) -> None:
    """Refuses a parameter tree that differs from ``build(cfg)``'s in any path or shape."""
    expected = flatten(jax.eval_shape(lambda: nnx.to_pure_dict(nnx.split(build(cfg), nnx.Param)[1])))
    got = flatten(params)
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
    head of a merged-policy export. With ``cfg.lora.rank > 0`` fresh LoRA factors (from ``seed``) are added.
    """
    trunk = trunk_from_hf(cfg, tensors, where)
    if saved_heads is not None and "lm_head" in saved_heads:
        trunk["lm_head"] = saved_heads["lm_head"]
    if q_init is None:
        heads = {k: saved_heads[k] for k in ("q_heads", "v_head")}
    else:
        heads = init_heads(cfg, trunk, q_init=q_init, seed=seed)
    params = with_fresh_adapters(cfg, {**trunk, **heads}, seed)
    _check_shapes(cfg, params, where)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


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
    hf_config = read_json(config_path)
    saved_heads = None
    if (hf_dir / HEADS_JSON).is_file():
        meta, saved_heads = read_heads(hf_dir)
        fields = dict(meta["model_config"])
        if isinstance(fields.get("lora"), dict):  # JSON of a LoraConfig (rank 0: an export merges its adapters)
            lora = fields["lora"]
            fields["lora"] = LoraConfig(**{**lora, "targets": tuple(lora.get("targets", LoraConfig.targets))})
        cfg = with_overrides(fields, model_overrides, str(hf_dir / HEADS_JSON), ARCH_FIELDS)
    else:
        cfg = config_from_hf(hf_config, str(config_path), **model_overrides)
        q_init = q_init or "random"
    return cfg, params_from_hf(cfg, SafetensorsDir(hf_dir), q_init=q_init, seed=seed, saved_heads=saved_heads,
                               where=str(hf_dir))
