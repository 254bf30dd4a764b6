"""Value-guided generation in plain ``transformers``: the engine's ILQL and Q policies as a ``LogitsProcessor``.

An export (``hf_export.export_hf``) is a plain causal LM plus the Q/V heads in ``q_heads.safetensors``. A merged
``lm_head`` is exact only for one linear Q head without a per-action bias; this module samples the learned policy
of *any* head the engine trains (mlp or linear, K heads, with or without bias)::

    model = transformers.AutoModelForCausalLM.from_pretrained("runs/demo-hf")
    guide = ValueGuidedLogitsProcessor.from_export("runs/demo-hf", model, kind="ilql", beta=4.0)
    out = model.generate(input_ids, logits_processor=[guide], max_new_tokens=32)

It needs torch, an optional extra: ``pip install -e ".[hf]"`` (torch 2.13.0, CPU or CUDA build). Nothing else in
``jaxrl_lm`` imports this module, so the engine itself never needs torch.

Scores (``jaxrl_lm.rl.policy_extraction.policy_scores``; ``h`` is the trunk's final normed hidden state, the input
of the LM head, and every id is a real one: the HF model has exactly ``vocab_size`` logits, and the heads' rows of
vocabulary padding are dropped on loading, which is the engine's masking of padded ids):

    ``ilql``: ``s(a) = log_softmax(LM(h))(a) + beta * (min_k Q_k(h, a) - V(h))``
    ``q``:    ``s(a) = min_k Q_k(h, a)``

with ``Q_k(h) = out_kernel[k] f_k(h) + out_bias[k]``, ``f_k(h) = gelu_tanh(h fc_kernel[k] + fc_bias[k])`` (mlp)
or ``h`` (linear), and ``V(h)`` the same with the V head (``jaxrl_lm.models.heads``), all in float32.

Temperature, top-k and top-p are ``generate``'s own (``temperature=``, ``top_k=``, ``top_p=``, ``do_sample=``):
transformers applies them after every user processor, in the order our decoder does (``scores / T``, then the
top-k, then the top-p nucleus), so ``softmax(s / T)`` is sampled as ``jaxrl_lm.generate.decode`` samples it, and
``do_sample=False`` is its greedy (temperature 0) argmax. Processors that run before this one (transformers' own,
e.g. ``suppress_tokens``, which an export's ``generation_config.json`` sets to BOS and PAD as
``jaxrl_lm.model_policy`` bans them; and any listed before it) act on the LM logits: the ids they set to ``-inf``
stay ``-inf`` under every kind, which is the engine's allowed-token mask. Stop ids (EOT, EOS) come from the
export's ``generation_config.json``.

Where ``h`` comes from. ``generate`` hands a processor the input ids and the last position's logits, not hidden
states. The processor registers a forward *pre*-hook on the model's LM head (``model.get_output_embeddings()``)
whose input is exactly ``h`` (for every family: the LM head reads the final normed hidden state), keeps the last
position's row, and reads it in ``__call__``, which ``generate`` runs right after that forward. So no token is
computed twice and the prefix is never re-run: ``generate``'s own KV cache carries the prefix, and the extra cost
per step is the heads alone on ``[B, D]``: ``K (D M + M V)`` multiply-adds for mlp heads (``M = mult * D``; with
the default ``K = 2``, ``mult = 2`` about four times the LM head's ``D V``), ``K D V`` for linear ones, plus the V
head. (The alternatives cost more: ``output_hidden_states`` is not passed to processors, and a processor that runs
the model itself would recompute the prefix or keep a second cache.) Each hidden row is used once; a call without
a forward since the last one (assisted or speculative decoding, which score several positions per forward, or a
processor used with another model) is an error, as is a batch that does not match. The hook is removed by
``remove()``, by leaving a ``with`` block, or when the processor is garbage-collected.

Merged exports (``--policy ilql`` / ``q``) work too: their ``lm_head`` is the policy itself, so the LM logits are
recomputed from ``h`` with the original LM head (``q_heads.safetensors``' ``lm_head.kernel``, or the token
embedding when it was tied), at the cost of one more ``[B, D] x [D, V]`` product a step.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import numpy as np
import torch
import transformers

from jaxrl_lm.interop.heads_file import HEADS_FILE, read_heads

GUIDED_KINDS = ("ilql", "q")


def _shape_error(where: str, name: str, shape: tuple, expected: tuple) -> ValueError:
    return ValueError(f"{where}: tensor {name} has shape {list(shape)}, expected {list(expected)}")


class ExportedHeads(torch.nn.Module):
    """The Q and V heads of an export in torch, float32, over the real vocabulary only.

    ``q(h)``: ``[..., D] -> [K, ..., V]``; ``value(h)``: ``[..., D] -> [...]``. The same math as
    ``jaxrl_lm.models.heads.QHeads`` / ``VHead`` (module docstring); the padding rows ``>= vocab_size`` of the
    saved ``[K, Vp, M]`` output kernel and ``[K, Vp]`` bias are dropped.
    """

    def __init__(self, tensors: Mapping[str, Any], vocab_size: int, where: str = HEADS_FILE):
        """``tensors``: ``read_heads``' nested dict (``q_heads``, ``v_head``: numpy arrays); ``where`` names the
        file in errors."""
        super().__init__()
        q, v = tensors.get("q_heads"), tensors.get("v_head")
        if q is None or v is None or "out_kernel" not in q or "out_kernel" not in v:
            raise ValueError(f"{where}: q_heads.out_kernel and v_head.out_kernel are required; found "
                             f"{sorted(tensors)}")
        out = np.asarray(q["out_kernel"])
        if out.ndim != 3 or out.shape[1] < vocab_size:
            raise _shape_error(where, "q_heads.out_kernel", out.shape, ("K", f"Vp >= {vocab_size}", "M"))
        k, _, m = out.shape
        self.is_mlp = "fc_kernel" in q
        d = np.asarray(q["fc_kernel"]).shape[1] if self.is_mlp else m
        expected_q = {"out_kernel": (k, out.shape[1], m), "out_bias": (k, out.shape[1])}
        expected_v = {"out_kernel": (m,), "out_bias": ()}
        if self.is_mlp:
            expected_q.update(fc_kernel=(k, d, m), fc_bias=(k, m))
            expected_v.update(fc_kernel=(d, m), fc_bias=(m,))
        for prefix, given, expected in (("q_heads", q, expected_q), ("v_head", v, expected_v)):
            optional = {"out_bias"} if prefix == "q_heads" else set()  # model.q_head_bias=false saves none
            for name, shape in expected.items():
                if name not in given:
                    if name in optional:
                        continue
                    kind = "mlp" if self.is_mlp else "linear"
                    raise ValueError(f"{where}: tensor {prefix}.{name} is missing (a {kind} head needs "
                                     f"{sorted(expected)})")
                if tuple(np.shape(given[name])) != shape:
                    raise _shape_error(where, f"{prefix}.{name}", np.shape(given[name]), shape)
            extra = set(given) - set(expected)
            if extra:
                raise ValueError(f"{where}: unexpected tensors {sorted(f'{prefix}.{n}' for n in extra)}")
        self.n_heads, self.d_model, self.width, self.vocab_size = k, d, m, vocab_size

        def tensor(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.array(x, np.float32))

        # Buffers, not parameters: .to(device) moves them and nothing trains them.
        self.register_buffer("q_out_kernel", tensor(out[:, :vocab_size]))                       # [K, V, M]
        self.register_buffer("q_out_bias", tensor(q["out_bias"][:, :vocab_size]) if "out_bias" in q else None)
        self.register_buffer("q_fc_kernel", tensor(q["fc_kernel"]) if self.is_mlp else None)    # [K, D, M]
        self.register_buffer("q_fc_bias", tensor(q["fc_bias"]) if self.is_mlp else None)        # [K, M]
        self.register_buffer("v_out_kernel", tensor(v["out_kernel"]))                           # [M]
        self.register_buffer("v_out_bias", tensor(v["out_bias"]))                               # []
        self.register_buffer("v_fc_kernel", tensor(v["fc_kernel"]) if self.is_mlp else None)    # [D, M]
        self.register_buffer("v_fc_bias", tensor(v["fc_bias"]) if self.is_mlp else None)        # [M]

    def q(self, h: torch.Tensor) -> torch.Tensor:
        """All real actions' Q-values. ``[..., D] -> [K, ..., V]`` float32."""
        h = h.float()
        if self.is_mlp:
            z = torch.einsum("...d,kdm->k...m", h, self.q_fc_kernel)
            bias = self.q_fc_bias.reshape((self.n_heads,) + (1,) * (h.ndim - 1) + (self.width,))
            q = torch.einsum("k...m,kvm->k...v", torch.nn.functional.gelu(z + bias, approximate="tanh"),
                             self.q_out_kernel)
        else:
            q = torch.einsum("...m,kvm->k...v", h, self.q_out_kernel)
        if self.q_out_bias is not None:
            q = q + self.q_out_bias.reshape((self.n_heads,) + (1,) * (h.ndim - 1) + (self.vocab_size,))
        return q

    def value(self, h: torch.Tensor) -> torch.Tensor:
        """The state value. ``[..., D] -> [...]`` float32."""
        z = h.float()
        if self.is_mlp:
            z = torch.nn.functional.gelu(z @ self.v_fc_kernel + self.v_fc_bias, approximate="tanh")
        return z @ self.v_out_kernel + self.v_out_bias


def _capture_hidden(processor_ref: weakref.ReferenceType, module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook of the LM head: keeps the last position's input ``h`` ``[B, D]`` for the processor."""
    processor = processor_ref()
    if processor is not None:
        h = args[0]
        processor._hidden = (h[:, -1] if h.ndim == 3 else h).detach()


class ValueGuidedLogitsProcessor(transformers.LogitsProcessor):
    """``generate``'s next-token scores replaced by the engine's ``ilql`` or ``q`` policy scores (module docstring).

    ``__call__(input_ids [B, L] int64, scores [B, V] float32) -> [B, V] float32``, with ``h`` taken from the
    model's forward that produced ``scores``. Build it with ``from_export``; use it as a context manager (or call
    ``remove()``) to detach it from the model.

    Attributes:
      model: the ``transformers`` causal LM it reads hidden states from.
      heads: ``ExportedHeads``.
      kind: ``"ilql"`` or ``"q"``. beta: ilql's advantage weight.
      lm_rows: ``[V, D]`` float32 LM head rows when the model's own ``lm_head`` is not the LM (a merged-policy
        export), else None: the incoming ``scores`` are the LM logits.
    """

    supports_continuous_batching = False

    def __init__(self, model: transformers.PreTrainedModel, heads: ExportedHeads, *,
                 kind: Literal["ilql", "q"] = "ilql", beta: float = 1.0, lm_rows: Optional[torch.Tensor] = None):
        if kind not in GUIDED_KINDS:
            raise ValueError(f"kind must be one of {GUIDED_KINDS}, got {kind!r} (bc and actor are the LM head itself: "
                             f"call generate without this processor)")
        lm_head = model.get_output_embeddings()
        if lm_head is None or not hasattr(lm_head, "weight"):
            raise ValueError(f"{type(model).__name__} has no LM head (get_output_embeddings); load the export with "
                             f"AutoModelForCausalLM")
        vocab, d = lm_head.weight.shape
        if (vocab, d) != (heads.vocab_size, heads.d_model):
            raise ValueError(f"the model's LM head is [{vocab}, {d}] (vocab, hidden) but the heads are for vocab "
                             f"{heads.vocab_size} and hidden {heads.d_model}: load the model of the same export")
        self.model, self.kind, self.beta = model, kind, float(beta)
        self.heads = heads.to(lm_head.weight.device)
        self.lm_rows = None if lm_rows is None else lm_rows.to(lm_head.weight.device, torch.float32)
        self._hidden: Optional[torch.Tensor] = None
        handle = lm_head.register_forward_pre_hook(
            lambda module, args, ref=weakref.ref(self): _capture_hidden(ref, module, args))
        self._detach = weakref.finalize(self, handle.remove)

    @classmethod
    def from_export(cls, export_dir: str | Path, model: transformers.PreTrainedModel, *,
                    kind: Literal["ilql", "q"] = "ilql", beta: float = 1.0) -> "ValueGuidedLogitsProcessor":
        """The processor of an ``export_hf`` directory for ``model`` (``AutoModelForCausalLM.from_pretrained`` of
        the same directory): reads ``q_heads.safetensors`` and ``q_heads.json``."""
        meta, tensors = read_heads(export_dir)
        where = str(Path(export_dir) / meta["file"])
        heads = ExportedHeads(tensors, int(meta["vocab_size"]), where)
        head_type = "mlp" if heads.is_mlp else "linear"
        if (meta.get("head_type"), meta.get("n_q_heads")) != (head_type, heads.n_heads):
            raise ValueError(f"{where}: q_heads.json says {meta.get('n_q_heads')} {meta.get('head_type')} heads but "
                             f"the tensors are {heads.n_heads} {head_type} heads")
        lm_rows = None
        if meta.get("policy", {}).get("kind") in GUIDED_KINDS:  # merged: lm_head is the policy, not the LM
            v = heads.vocab_size
            if "lm_head" in tensors:  # the untied LM kernel [D, Vp] the merge replaced
                lm_rows = torch.from_numpy(np.array(tensors["lm_head"]["kernel"], np.float32).T[:v])
            else:  # tied: the LM head is the token embedding, which the export kept
                lm_rows = model.get_input_embeddings().weight.detach().float()[:v]
        return cls(model, heads, kind=kind, beta=beta, lm_rows=lm_rows)

    def policy_scores(self, hidden: torch.Tensor, lm_logits: Optional[torch.Tensor]) -> torch.Tensor:
        """The policy's scores at hidden states ``hidden`` ``[..., D]`` given the LM logits ``[..., V]`` there
        (ignored by ``q``; may be None for it). Returns ``[..., V]`` float32."""
        q = self.heads.q(hidden).amin(dim=0)
        if self.kind == "q":
            return q
        advantage = q - self.heads.value(hidden)[..., None]
        return torch.log_softmax(lm_logits.float(), dim=-1) + self.beta * advantage

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise RuntimeError(
                "ValueGuidedLogitsProcessor: no forward pass of its model since the last call. Use it in "
                "model.generate(...) of the model it was built with; assisted / speculative decoding (several "
                "positions scored per forward) is not supported")
        if hidden.shape[0] != scores.shape[0] or scores.shape[-1] != self.heads.vocab_size:
            raise RuntimeError(f"ValueGuidedLogitsProcessor: scores {list(scores.shape)} do not match the last "
                               f"forward's hidden states {list(hidden.shape)} and vocabulary {self.heads.vocab_size}")
        lm = scores if self.lm_rows is None else hidden.float() @ self.lm_rows.T
        guided = self.policy_scores(hidden, lm).to(scores.dtype)
        # Ids an earlier processor removed (suppress_tokens, bad words, min length) stay removed for every kind.
        return guided.masked_fill(torch.isneginf(scores), float("-inf"))

    def remove(self) -> None:
        """Removes the hook from the model's LM head (the processor no longer works)."""
        self._detach()

    def __enter__(self) -> "ValueGuidedLogitsProcessor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
