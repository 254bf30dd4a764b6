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
for every policy, and ``jaxrl_lm.interop.hf_generation.ValueGuidedLogitsProcessor`` samples the ILQL or Q policy
of any head from them in ``model.generate`` (an optional extra that needs torch; nothing here imports it).

LoRA adapters (``model.lora.rank > 0``) are merged into the weights they adapt before anything is written:
each targeted kernel becomes ``W + (alpha / rank) A B`` and the factors are dropped
(``jaxrl_lm.models.partition.merge_adapters``), so the directory is a plain causal LM of the same architecture
and ``import_hf`` of it gives a model without adapters (``model.lora.rank`` 0) that computes the same logits.

Model card (``model_card``). Every export writes ``README.md``: what the model is, the task and method (the
run's objective and the policy kind to sample), the key config, the run's evaluation table when the run
directory has one (``eval.jsonl`` of the evaluation hook, else the ``eval/...`` entries of ``final_metrics.json``)
and a short code block that loads the directory and samples the learned policy.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import jax
import numpy as np
import yaml

from jaxrl_lm.config import Config, LoraConfig, ModelConfig, eval_task
from jaxrl_lm.data.tokenizer import Tokenizer, save_tokenizer
from jaxrl_lm.interop.heads_file import write_heads
from jaxrl_lm.interop.hf_config import config_to_hf
from jaxrl_lm.interop.names import get_path, lm_rows, rules
from jaxrl_lm.interop.safetensors_io import save_weights
from jaxrl_lm.models import Params
from jaxrl_lm.models.partition import merge_adapters
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
              target_params: Optional[Params] = None, params_source: Literal["online", "ema"] = "online",
              run_config: Optional[Config] = None, run_dir: str | Path | None = None,
              step: Optional[int] = None) -> Path:
    """Writes a HF directory of the model and its heads, with a model card; returns ``out_dir``.

    Args:
      params: the pure parameter dict (``TrainState.params``, or online params with the EMA groups swapped in).
      cfg: its ModelConfig. LoRA factors (``cfg.lora.rank > 0``) are merged into their kernels (module docstring).
      out_dir: created if needed; an earlier export's weight files there are replaced.
      tokenizer: see ``jaxrl_lm.data.save_tokenizer``; None writes no tokenizer.
      policy: what the HF LM head computes: ``"bc"`` or ``"actor"`` (the LM head itself: an actor-critic's LM
        head is its actor), ``"ilql"`` or ``"q"`` (merged, exact or
        refused: module docstring), with ``beta`` and ``temperature``.
      max_shard_size: ``model.safetensors`` is split into ``model-0000i-of-0000n.safetensors`` shards plus
        ``model.safetensors.index.json`` past this size (bytes, or a string such as ``"2GB"``).
      target_params: ``TrainState.groups["target"]``; its ``q_heads`` are saved as ``target.q_heads.*``.
      params_source: recorded in ``q_heads.json``: whether ``params`` are the online or the EMA parameters.
      run_config: the run's whole Config, for the model card's task, method and config (None: the card describes
        the model and heads alone, and samples ILQL with ``beta``).
      run_dir: the run's ``train.out_dir``, whose ``eval.jsonl`` / ``final_metrics.json`` give the card's
        evaluation table (None, or a directory without them: no table).
      step: the checkpoint step exported (the card names it, and shows the evaluation of that step if any).

    Writes ``config.json``, ``generation_config.json`` (sampling at temperature 1 with no top-k/top-p cut, so that
    ``generate(do_sample=True)`` samples the exported policy itself; stops at end-of-turn or EOS; BOS and PAD
    suppressed, as ``jaxrl_lm.model_policy`` never samples them), ``model*.safetensors``, the tokenizer files,
    ``q_heads.safetensors``, ``q_heads.json`` and the model card ``README.md`` (``model_card``). Example::

        out = jaxrl_lm.export_hf(state.params, cfg.model, "runs/demo-hf", tokenizer=cfg.data.tokenizer,
                                 target_params=state.groups["target"], run_config=cfg, run_dir=cfg.train.out_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(out)    # logits [B, L, vocab_size]
    """
    if policy not in ("bc", "actor", "ilql", "q"):
        raise ValueError(f"policy must be 'bc', 'actor', 'ilql' or 'q', got {policy!r}")
    from transformers import GenerationConfig  # slow to import; only export needs it

    evaluations, final_metrics = read_run_results(run_dir) if run_dir is not None else ([], None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    adapters = cfg.lora
    params, cfg = merge_adapters(params, cfg)  # from here on, a plain model without adapters
    tensors = trunk_to_hf(cfg, params)
    tie, original_lm = cfg.tie_embeddings, None
    if policy not in ("bc", "actor"):  # refused here, before anything is written, when the merge is not exact
        tensors["lm_head.weight"] = policy_lm_head(params, cfg, policy, beta=beta, temperature=temperature)
        original_lm = None if tie else params["lm_head"]["kernel"]
        tie = False

    ids: dict[str, Any] = {}
    sampling: dict[str, Any] = {}
    tok = None
    if tokenizer is not None:
        tok = save_tokenizer(tokenizer, out)
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} ids, more than the model's vocab_size "
                             f"{cfg.vocab_size}")
        ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        stop = list(dict.fromkeys([tok.eot_id, tok.eos_id]))
        # model_policy.sampling_mask: BOS and PAD are never sampled; the stop ids always may be (PAD may be EOS).
        suppress = sorted({tok.bos_id, tok.pad_id} - set(stop))
        sampling = {"eos_token_id": stop, **({"suppress_tokens": suppress} if suppress else {})}
    save_weights(tensors, out, max_shard_size)
    config_to_hf(cfg, tie_word_embeddings=tie, **ids).save_pretrained(out)
    GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, **{**ids, **sampling}).save_pretrained(out)

    write_heads(out, params, cfg, target_params=target_params, original_lm=original_lm, params_source=params_source,
                policy={"kind": policy, "beta": beta, "temperature": temperature,
                        "tie_word_embeddings_exported": tie})
    card = model_card(cfg, out, policy=policy, beta=beta, temperature=temperature, tokenizer=tok,
                      params_source=params_source, run_config=run_config, evaluations=evaluations,
                      final_metrics=final_metrics, step=step, adapters=adapters)
    (out / CARD_FILE).write_text(card)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The model card.

CARD_FILE = "README.md"
EVAL_FILE = "eval.jsonl"                    # jaxrl_lm.experiments.hooks: one line per policy and evaluation
FINAL_METRICS_FILE = "final_metrics.json"  # jaxrl_lm.train.loop
_OBJECTIVES = {
    "token_q": "token-level Q-learning (ILQL): every agent token is an action; K Q-heads (min over heads) and a V "
               "head learn from a Bellman backup on the offline episodes, with CQL and behaviour cloning on the LM "
               "head",
    "utterance_q": "utterance-level Q-learning (CHAI): a whole agent turn is one action, valued by the Q-heads at "
                   "its last token",
    "kl_actor": "actor-critic: the LM head is a KL-constrained actor trained against an utterance-level critic",
    "archer": "ArCHer: the LM head is a token-level actor trained against an utterance-level critic",
}
_MODEL_KEYS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
               "tie_embeddings", "n_q_heads", "q_head", "q_head_hidden_mult", "q_head_bias", "context")
_RUN_KEYS = {"data": ("path", "tokenizer", "seq_len", "batch_size"),
             "optim": ("learning_rate", "schedule", "warmup_steps", "weight_decay", "grad_clip"),
             "train": ("steps", "seed"),
             "eval": ("task", "policies", "beta", "temperature", "episodes", "max_new_tokens")}


def read_run_results(run_dir: str | Path) -> tuple[list[dict[str, Any]], Optional[dict[str, Any]]]:
    """A run directory's evaluations: the lines of ``eval.jsonl`` in order (``[]`` when absent) and
    ``final_metrics.json`` (None when absent). A malformed line is an error naming the file and line."""
    run_dir = Path(run_dir)
    path = run_dir / EVAL_FILE
    rows = []
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if not isinstance(row, dict) or not {"step", "policy"} <= set(row):
                raise ValueError(f"{path}:{n}: an evaluation line needs the fields 'step' and 'policy'")
            rows.append(row)
    final = run_dir / FINAL_METRICS_FILE
    return rows, json.loads(final.read_text()) if final.is_file() else None


def _number(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return fmt.format(value)


def _policy_label(p: Mapping[str, Any]) -> str:
    label = p["kind"] + (f" beta={p['beta']:g}" if p["kind"] == "ilql" else "")
    label += " greedy" if p.get("temperature", 0) == 0 else f" T={p['temperature']:g}"
    return label + (f" best-of-{p['best_of']}" if p.get("best_of", 1) > 1 else "")


def evaluation_table(evaluations: Sequence[Mapping[str, Any]], final_metrics: Optional[Mapping[str, Any]],
                     step: Optional[int] = None) -> str:
    """Markdown: the evaluation of ``step`` (else the newest) from ``eval.jsonl`` lines, one row per policy (and
    seed); without lines, the ``eval/<policy>/<field>`` entries of ``final_metrics``; "" when there is neither."""
    if evaluations:
        steps = sorted({row["step"] for row in evaluations})
        shown = step if step in steps else steps[-1]
        rows = [r for r in evaluations if r["step"] == shown]
        seeds = any("seed" in r for r in rows)
        head = ["step"] + (["seed"] if seeds else []) + ["task", "policy", "episodes", "mean return", "95% CI",
                                                         "normalised", "success"]
        lines = [f"From `{EVAL_FILE}` ({len(steps)} evaluations, steps {steps[0]}..{steps[-1]}): the one at step "
                 f"{shown}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            ci = r.get("return_ci95") or [None, None]
            cells = [str(shown)] + ([str(r.get("seed", "-"))] if seeds else []) + [
                str(r.get("task", "-")), _policy_label(r["policy"]), str(r.get("episodes", "-")),
                _number(r.get("mean_return"), "{:.3f}"),
                f"[{_number(ci[0], '{:.3f}')}, {_number(ci[1], '{:.3f}')}]",
                _number(r.get("normalized_score"), "{:.1f}"), _number(r.get("success_rate"), "{:.1%}")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    metrics = {k.split("/")[1]: {} for k in (final_metrics or {}) if k.startswith("eval/") and k.count("/") == 2}
    if not metrics:
        return ""
    for key, value in final_metrics.items():
        if key.startswith("eval/") and key.count("/") == 2:
            metrics[key.split("/")[1]][key.split("/")[2]] = value
    lines = [f"From `{FINAL_METRICS_FILE}` (step {final_metrics.get('step', '-')}).", "",
             "| policy | mean return | normalised | success | mean steps |", "|---|---|---|---|---|"]
    lines += [f"| {kind} | {_number(m.get('mean_return'), '{:.3f}')} | {_number(m.get('normalized_score'), '{:.1f}')}"
              f" | {_number(m.get('success_rate'), '{:.1%}')} | {_number(m.get('mean_steps'), '{:.2f}')} |"
              for kind, m in metrics.items()]
    return "\n".join(lines) + "\n"


def _card_policy(policy: str, beta: float, run_config: Optional[Config]) -> tuple[Optional[str], float, str]:
    """``(processor kind or None, beta, sentence)``: what the card's code samples, and why."""
    objective = run_config.rl.objective if run_config is not None else None
    if policy in ("ilql", "q"):
        return None, beta, (f"The exported `lm_head` is the merged `{policy}` policy (exact for this head), so plain "
                            f"`generate` samples it.")
    if policy == "actor" or objective in ("kl_actor", "archer"):
        return None, beta, "The LM head is the trained actor, so plain `generate` samples the learned policy."
    if objective == "utterance_q":
        return None, beta, ("The learned policy samples N whole turns from the LM head and says the one with the "
                            "highest final-token `min_k Q_k` (jaxrl_lm's `utterance` policy: `jaxrl_lm.load_policy("
                            "..., kind=\"utterance\")`); the code below samples one turn from the LM head.")
    kinds = run_config.eval.policies if run_config is not None else ("ilql",)
    kind = "q" if "q" in kinds and "ilql" not in kinds else "ilql"
    beta = run_config.eval.beta if run_config is not None else beta
    formula = "log_softmax(LM) + beta (min_k Q_k - V)" if kind == "ilql" else "min_k Q_k"
    return kind, beta, (f"`ValueGuidedLogitsProcessor` (`jaxrl_lm.interop.hf_generation`, the `hf` extra) replaces "
                        f"the LM's next-token scores with the `{kind}` policy's, `{formula}`"
                        + (f" with beta = {beta:g}" if kind == "ilql" else "") +
                        ", from the heads in `q_heads.safetensors`: exactly what jaxrl_lm's decoder samples; "
                        "`generate`'s temperature / top-k / top-p act on those scores as the decoder's do.")


def _sampling_code(out: Path, kind: Optional[str], beta: float, tokenizer: Optional[Tokenizer], cfg: ModelConfig,
                   run_config: Optional[Config]) -> str:
    """The card's Python: load the export, build the processor (for ``kind``), sample one agent turn."""
    lines = ["from transformers import AutoModelForCausalLM, AutoTokenizer"] if tokenizer is not None else \
        ["import torch", "from transformers import AutoModelForCausalLM"]
    if kind is not None:
        lines.append("from jaxrl_lm.interop.hf_generation import ValueGuidedLogitsProcessor  "
                     '# pip install "jaxrl_lm[hf]"')
    lines.append(f"path = {json.dumps(str(out))}  # this export's directory")
    if tokenizer is not None:
        lines.append("model, tokenizer = AutoModelForCausalLM.from_pretrained(path), "
                     "AutoTokenizer.from_pretrained(path)")
        bos = "" if cfg.context == "observation" else tokenizer.special_tokens["bos"]
        prompt = json.dumps(f"{bos}An observation.{tokenizer.special_tokens['eot']}", ensure_ascii=False)
        lines.append(f"inputs = tokenizer({prompt}, return_tensors=\"pt\")  # one turn, in the training layout")
    else:
        lines.append("model = AutoModelForCausalLM.from_pretrained(path)")
        lines.append("inputs = {\"input_ids\": torch.tensor([[0]])}  # the prompt's ids: [BOS] observation [EOT]")
    kw = [f"max_new_tokens={run_config.eval.max_new_tokens if run_config is not None else 32}"]
    if run_config is not None:
        e = run_config.eval  # the run's first decoding, as load_policy defaults to
        temperature = 0.0 if e.decodings[0] == "greedy" else e.temperature
        kw.append("do_sample=False" if temperature == 0 else f"temperature={temperature:g}")
    if kind is not None:
        lines.append(f"guide = ValueGuidedLogitsProcessor.from_export(path, model, kind=\"{kind}\", beta={beta:g})")
        kw.insert(0, "logits_processor=[guide]")
    lines.append(f"turn = model.generate(**inputs, {', '.join(kw)})[0, inputs[\"input_ids\"].shape[1]:]")
    lines.append("print(tokenizer.decode(turn))" if tokenizer is not None else "print(turn.tolist())")
    return "\n".join(lines)


def _plain(tree: Mapping[str, Any]) -> dict[str, Any]:
    """YAML-safe (tuples as lists)."""
    return json.loads(json.dumps(tree, default=str))


def model_card(cfg: ModelConfig, out: Path, *, policy: str, beta: float, temperature: float,
               tokenizer: Optional[Tokenizer], params_source: str, run_config: Optional[Config] = None,
               evaluations: Sequence[Mapping[str, Any]] = (), final_metrics: Optional[Mapping[str, Any]] = None,
               step: Optional[int] = None, adapters: Optional[LoraConfig] = None) -> str:
    """The ``README.md`` of an export (module docstring): Markdown with Hugging Face's YAML front matter.
    ``adapters``: the run's ``model.lora`` when it trained LoRA adapters (merged into the exported weights)."""
    objective = run_config.rl.objective if run_config is not None else None
    kind, beta, how = _card_policy(policy, beta, run_config)
    name = Path(run_config.train.out_dir).name if run_config is not None else out.name
    task = (eval_task(run_config) or "-") if run_config is not None else "-"
    tags = ["jaxrl_lm", "reinforcement-learning"] + ([objective] if objective else [])
    width = cfg.q_head_hidden_mult * cfg.d_model
    heads = (f"{cfg.n_q_heads} {cfg.q_head} Q-head{'s' if cfg.n_q_heads > 1 else ''} "
             f"({f'D -> {width} -> vocab, tanh GELU' if cfg.q_head == 'mlp' else 'D -> vocab'}, "
             f"{'with' if cfg.q_head_bias else 'without'} a per-action bias) and a V head")
    at = f" at step {step}" if step is not None else ""
    text = ["---", "library_name: transformers", "tags:"] + [f"- {t}" for t in tags] + ["---", "", f"# {name}", "",
            f"A {cfg.family} causal LM ({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.vocab_size} tokens) trained "
            f"with jaxrl_lm as a multi-turn agent, exported{at} ({params_source} parameters) so "
            f"that `transformers` loads it without remote code. Beside the LM: {heads}, in `q_heads.safetensors` "
            f"(described by `q_heads.json`).", ""]
    text += ["## Task", ""]
    if run_config is not None:
        text += [f"- Task: `{task}`", f"- Data: `{run_config.data.path}`"
                 + (f" (tokenizer `{run_config.data.tokenizer}`)" if run_config.data.tokenizer else ""),
                 f"- Context: `{cfg.context}` (a prompt is " + ("the latest observation turn alone, `w [EOT]`)"
                 if cfg.context == "observation" else "the episode so far, `[BOS] turn [EOT] turn [EOT] ...`)"), ""]
    else:
        text += ["Not recorded: exported from parameters without a run config.", ""]
    text += ["## Method", ""]
    if objective is not None:
        text.append(f"- Objective: `{objective}`: {_OBJECTIVES.get(objective, 'a registered jaxrl_lm objective')}.")
    if adapters is not None and adapters.rank:
        targets = ", ".join(f"`{p}`" for p in adapters.projections(cfg.family))
        text.append(f"- LoRA: adapters of rank {adapters.rank} (alpha {adapters.alpha:g}) on {targets} of every "
                    f"block, trained on a frozen trunk, merged into the exported weights (`W + alpha / rank * A B`): "
                    f"the directory is a plain causal LM.")
    text.append(f"- Exported `lm_head`: `{policy}`" + (f" (beta {beta:g}, temperature {temperature:g})"
                                                        if policy in ("ilql", "q") else "") + ".")
    text += [f"- Policy: {how}", "", "## Load and sample", "", "```python", _sampling_code(
        out, kind, beta, tokenizer, cfg, run_config), "```", ""]
    config = {"model": {k: getattr(cfg, k) for k in _MODEL_KEYS}}
    if adapters is not None and adapters.rank:
        config["model"]["lora"] = _plain(dataclasses.asdict(adapters))
    if run_config is not None:
        config["rl"] = _plain(dataclasses.asdict(run_config.rl))
        config[objective] = _plain(dataclasses.asdict(run_config.objective))
        for section, keys in _RUN_KEYS.items():
            config[section] = _plain({k: getattr(getattr(run_config, section), k) for k in keys})
    text += ["## Configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    table = evaluation_table(evaluations, final_metrics, step)
    if table:
        text += ["## Evaluation", "", table]
    if final_metrics is not None and "loss" in final_metrics:
        text += [f"Training: {final_metrics.get('step', '-')} steps, final loss "
                 f"{_number(final_metrics['loss'], '{:.4g}')} (`{FINAL_METRICS_FILE}`).", ""]
    return "\n".join(text)
