"""Hugging Face checkpoints out: ``export_hf`` writes a directory ``transformers`` loads without remote code.

``transformers.AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load the directory;
the Q/V heads travel beside it in ``q_heads.safetensors`` (described by ``q_heads.json``, ``heads_file``), so that
``import_hf`` of an export gives back the whole Q-model exactly.

Merged policy export (``policy``). At a state with hidden ``h`` the engine's policies (docs/design.md section 3,
``jaxrl_lm.rl.policy_extraction``) are ``softmax(s / T)`` with scores
    ``ilql``: ``s(a) = log_softmax(h W_lm)(a) + beta * (min_k Q_k(h, a) - V(h))``,
    ``q``:    ``s(a) = min_k Q_k(h, a)``.
With ``K = 1`` and a linear head ``Q(h, a) = h . w_q[a] + b_q[a]`` whose ``b_q`` is the same for every action,
the policy is exactly ``softmax(h W')`` of an ordinary HF LM head
(``rl.policy_extraction.merged_policy_weights`` derives it)
    ``ilql``: ``W' = (W_lm + beta W_q) / T``,      ``q``: ``W' = W_q / T``.
This is what a merged export writes as ``lm_head.weight`` (untied: ``tie_word_embeddings`` false; the original
LM head stays in ``q_heads.safetensors``). It is refused, with the reason, when not exact: ``K > 1`` (a min over
heads is not linear in ``h``), an mlp head, or an output bias that differs between actions (HF's LM head has no
bias). ``policy="bc"`` exports the LM head itself (the behaviour-cloning policy); the heads travel beside it
for every policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import jax
import numpy as np

from jaxrl_lm.config import ModelConfig
from jaxrl_lm.data.tokenizer import Tokenizer, save_tokenizer
from jaxrl_lm.interop.heads_file import write_heads
from jaxrl_lm.interop.hf_config import config_to_hf
from jaxrl_lm.interop.names import get_path, lm_rows, rules
from jaxrl_lm.interop.safetensors_io import save_weights
from jaxrl_lm.models import Params
from jaxrl_lm.rl.policy_extraction import merged_policy_weights


def trunk_to_hf(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """HF-named float32 tensors of our trunk (and untied LM head); vocabulary padding rows are dropped."""
    out: dict[str, np.ndarray] = {}
    for rule in rules(cfg):
        value = np.asarray(get_path(params, rule.ours), np.float32)
        if rule.vocab_axis is not None:
            value = np.take(value, np.arange(cfg.vocab_size), axis=rule.vocab_axis)
        if "{i}" in rule.hf:
            out.update({rule.hf.format(i=i): rule.hook.to_hf(value[i]) for i in range(cfg.n_layers)})
        else:
            out[rule.hf] = rule.hook.to_hf(value)
    return out


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
    lm = None if policy == "q" else lm_rows(cfg, params)[:v]
    return merged_policy_weights(policy, lm, w_q, beta, temperature)


def export_hf(params: Params, cfg: ModelConfig, out_dir: str | Path, *,
              tokenizer: Tokenizer | str | Path | None = None, policy: Literal["bc", "actor", "ilql", "q"] = "bc",
              beta: float = 1.0, temperature: float = 1.0, max_shard_size: int | str = "2GB",
              target_params: Optional[Params] = None, params_source: Literal["online", "ema"] = "online") -> Path:
    """Writes a HF directory of the model and its heads; returns ``out_dir``.

    Args:
      params: the pure parameter dict (``TrainState.params``, or online params with the EMA groups swapped in).
      cfg: its ModelConfig.
      out_dir: created if needed; an earlier export's weight files there are replaced.
      tokenizer: see ``jaxrl_lm.data.save_tokenizer``; None writes no tokenizer.
      policy: what the HF LM head computes: ``"bc"`` or ``"actor"`` (the LM head itself: an actor-critic's LM
        head is its actor), ``"ilql"`` or ``"q"`` (merged, exact or
        refused: module docstring), with ``beta`` and ``temperature``.
      max_shard_size: ``model.safetensors`` is split into ``model-0000i-of-0000n.safetensors`` shards plus
        ``model.safetensors.index.json`` past this size (bytes, or a string such as ``"2GB"``).
      target_params: ``TrainState.groups["target"]``; its ``q_heads`` are saved as ``target.q_heads.*``.
      params_source: recorded in ``q_heads.json``: whether ``params`` are the online or the EMA parameters.

    Writes ``config.json``, ``generation_config.json`` (sampling at temperature 1 with no top-k/top-p cut, so that
    ``generate(do_sample=True)`` samples the exported policy itself; stops at end-of-turn or EOS),
    ``model*.safetensors``, the tokenizer files, ``q_heads.safetensors`` and ``q_heads.json``. Example::

        out = jaxrl_lm.export_hf(state.params, cfg.model, "runs/demo-hf", tokenizer=cfg.data.tokenizer,
                                 target_params=state.groups["target"])
        model = transformers.AutoModelForCausalLM.from_pretrained(out)    # logits [B, L, vocab_size]
    """
    if policy not in ("bc", "actor", "ilql", "q"):
        raise ValueError(f"policy must be 'bc', 'actor', 'ilql' or 'q', got {policy!r}")
    from transformers import GenerationConfig  # slow to import; only export needs it

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    tensors = trunk_to_hf(cfg, params)
    tie, original_lm = cfg.tie_embeddings, None
    if policy not in ("bc", "actor"):  # refused here, before anything is written, when the merge is not exact
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
    save_weights(tensors, out, max_shard_size)
    config_to_hf(cfg, tie_word_embeddings=tie, **ids).save_pretrained(out)
    GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                     **{**ids, **({"eos_token_id": stop} if stop else {})}).save_pretrained(out)

    write_heads(out, params, cfg, target_params=target_params, original_lm=original_lm, params_source=params_source,
                policy={"kind": policy, "beta": beta, "temperature": temperature,
                        "tie_word_embeddings_exported": tie})
    return out
