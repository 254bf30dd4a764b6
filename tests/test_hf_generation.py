"""Value-guided generation in transformers (``jaxrl_lm.interop.hf_generation``): the processor's scores are the
engine's policy scores (ilql, q) for mlp heads with bias and linear heads without, greedy ``generate`` with it
decodes the engine's greedy turn, merged exports give the same scores, and the export's model card runs.

The models are the project's tiny configs with random parameters (every parameter drawn, biases included); the
exports load in transformers from tmp directories; nothing is downloaded.
"""

import ast
import contextlib
import dataclasses
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxrl_lm.config import REPO_ROOT, ModelConfig, load_config
from jaxrl_lm.data.tokenizer import build_char_tokenizer
from jaxrl_lm.generate import DecodeSpec, Sampling, decode
from jaxrl_lm.interop import export_hf
from jaxrl_lm.interop.hf_export import CARD_FILE
from jaxrl_lm.interop.hf_generation import ExportedHeads, ValueGuidedLogitsProcessor
from jaxrl_lm.model_policy import prompt_tokens, sampling_mask, stop_ids
from jaxrl_lm.models import model_graphdef
from jaxrl_lm.rl.policy_extraction import policy_scores
from jaxrl_lm.train import checkpoint, init_state
from script_loader import load_script
from helpers import engine_forward, random_params

TOL = 1e-4
BETA = 4.0
# mlp: K=2 mlp heads with a per-action bias on a tied GPT-2 whose vocabulary is padded (260 -> 272 ids);
# linear: K=2 linear heads without bias on an untied Llama.
CASES = {
    "mlp": ("configs/demo.yaml", dict(model__n_q_heads=2, model__q_head="mlp", model__q_head_bias=True,
                                      model__vocab_pad_multiple=16)),
    "linear": ("configs/models/llama_tiny.yaml", dict(model__n_q_heads=2, model__q_head="linear",
                                                      model__q_head_bias=False)),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """case -> (Config, params, export directory, transformers model of it)."""
    out = {}
    for i, (case, (path, overrides)) in enumerate(CASES.items()):
        cfg = load_config(path, **overrides)
        params = random_params(cfg.model, seed=i)
        directory = export_hf(params, cfg.model, tmp_path_factory.mktemp(case), tokenizer="", run_config=cfg)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        out[case] = (cfg, params, directory, model)
    return out


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def run_card_code(out) -> tuple[str, str]:
    """The Python block of ``out``'s model card, and what running it printed."""
    code = re.search(r"```python\n(.*?)```", (out / CARD_FILE).read_text(), re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(out / CARD_FILE), "exec"), {})
    return code, printed.getvalue()


def token_batch(batch: int = 2, length: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, 260, (batch, length)).astype(np.int64)


def test_only_the_extra_imports_torch():
    """torch is an optional extra: no module of the package but hf_generation imports it or hf_generation."""
    offenders = []
    for path in sorted((REPO_ROOT / "jaxrl_lm").rglob("*.py")):
        if path.name == "hf_generation.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) and node.module \
                else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "torch" or "hf_generation" in n]
    assert not offenders


# ----------------------------------------------------------------------------------------------------------------
# Scores.


def test_exported_heads_match_numpy_loops():
    """``ExportedHeads`` against one loop per head and action: Q_k(h, a) = out[k, a] . f_k(h) + b[k, a],
    f_k = gelu_tanh(h W1_k + b1_k) (mlp) or h (linear); V = out . f(h) + b; padding rows dropped."""
    rng = np.random.default_rng(0)
    k, d, m, vp, v = 2, 3, 5, 8, 6

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    h = rng.standard_normal((4, d)).astype(np.float32)
    for mlp in (True, False):
        width = m if mlp else d
        q = {"out_kernel": rng.standard_normal((k, vp, width)), "out_bias": rng.standard_normal((k, vp))}
        value = {"out_kernel": rng.standard_normal(width), "out_bias": np.float32(rng.standard_normal())}
        if mlp:
            q.update(fc_kernel=rng.standard_normal((k, d, m)), fc_bias=rng.standard_normal((k, m)))
            value.update(fc_kernel=rng.standard_normal((d, m)), fc_bias=rng.standard_normal(m))
        heads = ExportedHeads({"q_heads": q, "v_head": value}, v)
        got_q = heads.q(torch.as_tensor(h)).numpy()
        got_v = heads.value(torch.as_tensor(h)).numpy()
        assert got_q.shape == (k, 4, v) and got_v.shape == (4,)
        for b in range(4):
            f_v = gelu_tanh(h[b] @ value["fc_kernel"] + value["fc_bias"]) if mlp else h[b]
            assert abs(got_v[b] - (f_v @ value["out_kernel"] + value["out_bias"])) < 1e-4
            for i in range(k):
                f = gelu_tanh(h[b] @ q["fc_kernel"][i] + q["fc_bias"][i]) if mlp else h[b]
                for a in range(v):
                    assert abs(got_q[i, b, a] - (q["out_kernel"][i, a] @ f + q["out_bias"][i, a])) < 1e-4


@pytest.mark.parametrize("case", CASES)
def test_processor_scores_equal_engine_policy_scores(exports, case):
    """At every position of a batch, through ``__call__`` after a forward of the HF model (the hook's hidden
    state), the processor's scores are ``policy_scores`` of the engine on the same tokens, for ilql and q."""
    cfg, params, out, model = exports[case]
    v = cfg.model.vocab_size
    x = token_batch()
    lm, q, value = engine_forward(cfg.model)(params, x)
    for kind in ("ilql", "q"):
        ilql = kind == "ilql"
        engine = np.asarray(policy_scores(kind, lm if ilql else None, q, value if ilql else None, BETA, v))
        assert np.all(np.isneginf(engine[..., v:]))  # padded ids: what the processor never has
        ours = np.zeros_like(engine[..., :v])
        with ValueGuidedLogitsProcessor.from_export(out, model, kind=kind, beta=BETA) as guide, torch.no_grad():
            for t in range(1, x.shape[1] + 1):
                prefix = torch.as_tensor(x[:, :t])
                ours[:, t - 1] = guide(prefix, model(prefix).logits[:, -1].float()).numpy()
        diff = max_diff(ours, engine[..., :v])
        print(f"{case} {kind}: max |score diff| = {diff:.2e} over {x.shape[0] * x.shape[1]} states")
        assert diff < TOL
    # The heads matter: somewhere the ilql policy's best token is not the LM's.
    ilql = np.asarray(policy_scores("ilql", lm, q, value, BETA, v))
    assert np.any(np.argmax(ilql, -1) != np.argmax(np.asarray(lm)[..., :v], -1))


def test_processor_refuses_misuse(exports, tmp_path):
    cfg, _, out, model = exports["mlp"]
    with pytest.raises(ValueError, match="kind must be one of"):
        ValueGuidedLogitsProcessor.from_export(out, model, kind="bc")
    x = torch.as_tensor(token_batch(length=4))
    with ValueGuidedLogitsProcessor.from_export(out, model) as guide, torch.no_grad():
        logits = model(x).logits[:, -1]
        with pytest.raises(RuntimeError, match="does not match|do not match"):
            guide(x[:1], logits[:1])  # a batch other than the forward's
        with pytest.raises(RuntimeError, match="no forward pass"):
            guide(x, logits)  # the hidden state was used (here: refused) once already
    with torch.no_grad():
        logits = model(x).logits[:, -1]  # after the with block the hook is gone: this forward is not seen
    with pytest.raises(RuntimeError, match="no forward pass"):
        guide(x, logits)
    other = transformers.AutoModelForCausalLM.from_config(
        transformers.GPT2Config(vocab_size=cfg.model.vocab_size, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="load the model of the same export"):
        ValueGuidedLogitsProcessor.from_export(out, other)
    # A heads file whose tensors disagree with each other is refused, naming the tensor.
    bad = {"q_heads": {"out_kernel": np.zeros((2, 272, 128)), "fc_kernel": np.zeros((2, 64, 128)),
                       "fc_bias": np.zeros((2, 127))},
           "v_head": {"out_kernel": np.zeros(128), "out_bias": np.float32(0)}}
    with pytest.raises(ValueError, match=r"q_heads.fc_bias has shape \[2, 127\], expected \[2, 128\]"):
        ExportedHeads(bad, cfg.model.vocab_size, "q_heads.safetensors")


def test_merged_export_gives_the_same_scores(tmp_path):
    """On a merged ilql export (lm_head = the policy), the processor recomputes the LM from the original head:
    its scores equal those on the plain export of the same parameters."""
    cfg = dataclasses.replace(load_config("configs/models/llama_tiny.yaml").model, n_q_heads=1, q_head="linear",
                              q_head_bias=False)
    params = random_params(cfg, seed=3)
    x = torch.as_tensor(token_batch(length=6))
    scores = []
    for policy in ("bc", "ilql"):
        out = export_hf(params, cfg, tmp_path / policy, policy=policy, beta=2.0)
        model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        with ValueGuidedLogitsProcessor.from_export(out, model, kind="ilql", beta=BETA) as guide, torch.no_grad():
            scores.append(guide(x, model(x).logits[:, -1]).numpy())
    assert max_diff(*scores) < TOL
    # Its card (no run, no tokenizer) samples with plain generate: the lm_head already is the policy.
    code, printed = run_card_code(tmp_path / "ilql")
    assert "ValueGuidedLogitsProcessor" not in code and printed.startswith("[")


# ----------------------------------------------------------------------------------------------------------------
# Greedy generation.


@pytest.mark.parametrize("case,kind", [("mlp", "ilql"), ("mlp", "q"), ("linear", "ilql"), ("linear", "q")])
def test_greedy_generate_equals_engine_decode(exports, case, kind):
    """``model.generate(..., logits_processor=[guide], do_sample=False)`` emits the engine decoder's greedy turn,
    with the decoder's stop ids and allowed-token mask (``model_policy``: BOS and PAD never sampled; the export's
    generation_config suppresses them), for two left-padded prompts of different lengths."""
    cfg, params, out, model = exports[case]
    tok, n_new = build_char_tokenizer(), 12
    prompts = [prompt_tokens(["You are at node 14."], tok), prompt_tokens(["at 15", "go 21", "at 21"], tok)]
    width = max(len(p) for p in prompts)
    padded = np.full((2, width), tok.pad_id, np.int32)
    for i, p in enumerate(prompts):
        padded[i, width - len(p):] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    m = cfg.model
    engine = decode(model_graphdef(m), params, jnp.asarray(padded), jnp.asarray(lengths), jax.random.key(0),
                    Sampling.make(beta=BETA, temperature=0.0), jnp.asarray(stop_ids(tok)), jnp.int32(tok.pad_id),
                    jnp.asarray(sampling_mask(tok, m.vocab_size, m.padded_vocab_size, None)),
                    spec=DecodeSpec(kind=kind, max_new_tokens=n_new))
    expected = [np.asarray(engine.tokens[i, :engine.lengths[i]]).tolist() for i in range(2)]

    attention = torch.as_tensor((np.arange(width)[None] >= width - lengths[:, None]).astype(np.int64))
    with ValueGuidedLogitsProcessor.from_export(out, model, kind=kind, beta=BETA) as guide, torch.no_grad():
        generated = model.generate(torch.as_tensor(padded, dtype=torch.long), attention_mask=attention,
                                   logits_processor=[guide], do_sample=False, max_new_tokens=n_new)[:, width:]
        plain = model.generate(torch.as_tensor(padded[:1], dtype=torch.long), do_sample=False,
                               max_new_tokens=n_new)[0, width:]
    got = []
    for row in generated.tolist():  # a finished row is padded after its stop token
        stop = next((j for j, t in enumerate(row) if t in stop_ids(tok)), len(row) - 1)
        got.append(row[:stop + 1])
    print(f"{case} {kind}: engine {expected}, transformers {got}, plain LM {plain.tolist()}")
    assert got == expected
    assert all(t not in (tok.bos_id, tok.pad_id) for row in got for t in row)


# ----------------------------------------------------------------------------------------------------------------
# The model card.


def test_export_script_writes_a_model_card_whose_code_runs(tmp_path):
    """A run directory (checkpoint, eval.jsonl as the evaluation hook writes it, final_metrics.json) exported by
    scripts/export_hf.py: README.md names the task, method and config, holds the evaluation table, and its code
    block loads the export and samples the ilql policy."""
    run = tmp_path / "run"
    cfg = load_config("configs/demo.yaml", train__out_dir=str(run), eval__beta=BETA, eval__max_new_tokens=8,
                      **CASES["mlp"][1])
    manager = checkpoint.make_manager(run / checkpoint.CHECKPOINT_SUBDIR, cfg.train)
    checkpoint.save(manager, 40, init_state(cfg, random_params(cfg.model)), loader_state={}, cfg=cfg)
    manager.close()
    # Two evaluations in the format of jaxrl_lm.experiments.hooks (step, the summary, the policy's knobs).
    policy = {"kind": "ilql", "beta": BETA, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "best_of": 1}
    lines = [{"step": s, "task": "grid", "episodes": 16, "mean_return": r, "return_ci95": [r - 1, r + 1],
              "success_rate": sr, "mean_steps": 5.0, "normalized_score": ns, "normalized_ci95": [ns - 5, ns + 5],
              "policy": policy} for s, r, sr, ns in ((20, -6.5, 0.25, 31.0), (40, -4.25, 0.5, 62.5))]
    (run / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "final_metrics.json").write_text(json.dumps({"step": 40, "loss": 1.2345, "eval/ilql/mean_return": -4.25}))

    out = tmp_path / "hf"
    assert load_script("export_hf").main([str(run), str(out)]) == 0
    card = (out / CARD_FILE).read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for text in ("- Task: `grid`", "- Objective: `token_q`", "token_q:\n  backup: expectile", "q_head: mlp",
                 "exported at step 40",
                 "| 40 | grid | ilql beta=4 greedy | 16 | -4.250 | [-5.250, -3.250] | 62.5 | 50.0% |",
                 "2 evaluations, steps 20..40", "final loss 1.234"):
        assert text in card, text
    code, printed = run_card_code(out)
    assert "ValueGuidedLogitsProcessor.from_export(path, model, kind=\"ilql\", beta=4)" in code
    assert len(code.strip().splitlines()) <= 8
    assert printed.strip()  # it sampled and printed a turn

    # Without an evaluation file the table comes from final_metrics.json.
    (run / "eval.jsonl").unlink()
    assert load_script("export_hf").main([str(run), str(out)]) == 0
    assert "| ilql | -4.250 | - | - | - |" in (out / CARD_FILE).read_text()
    (run / "eval.jsonl").write_text("{not json\n")
    assert load_script("export_hf").main([str(run), str(out)]) == 1  # names the file and line (stderr)
