"""A PyTorch eager implementation of jaxrl_lm's token-level ILQL optimizer step: the benchmark's baseline.

``scripts/benchmark.py`` times this step beside ours at the same shape (``torch_gpt2_small_heads_k2``), so that the
speed and memory targets of docs/design.md section 8 are ratios measured in one invocation on one machine. It is
written from the equations of docs/design.md section 2, not translated from ``jaxrl_lm/rl``:

- trunk: ``transformers.GPT2Model`` (learned positions, LayerNorm, tanh GELU), final normed states ``h [B, L, D]``;
  packed rows get positions that restart per segment and a causal same-segment attention mask;
- decision slots (2.4): per row the first ``M = ceil(rl.decision_fraction * L)`` decision positions are gathered
  into ``[B, M, D]`` before any head runs; later decisions are dropped but still count in the denominator ``N``;
- heads (2.2): ``K`` Q-heads stored stacked like ours (``fc_kernel [K, D, E]``, ``fc_bias [K, E]``,
  ``out_kernel [K, V, E]``, ``out_bias [K, V]``; ``mlp``: ``gelu_tanh(h W1 + b1) W2^T + b2``, ``E = mult * D``),
  a V head of the same shape with a scalar output, the LM head tied to the token table (or untied);
- targets (2.2): EMA copies of what ``token_q.target_scope`` copies: the Q-heads (``heads``: they read the online
  trunk's states, detached) or the trunk and the Q-heads (``full``: a target trunk forward);
- backups and losses (2.3, 2.4): expectile / max / sarsa / mc backups, ``y = r + (1 - d) g B`` (clipped when
  bounds are set), ``L = lambda_q L_Q + lambda_v L_V + cql_alpha L_CQL + lambda_bc L_BC``, each a weighted sum over
  the slots divided by ``N = max(|D|, 1)`` of the whole optimizer step;
- the step (2.5): ``optim.grad_accum`` micro-batches with summed gradients, a non-finite guard (a step whose loss or
  gradient norm is not finite changes nothing), global-norm clipping, AdamW (weight decay where ours decays: on
  every parameter that ours stores with two or more axes; our stacked blocks carry a leading layer axis, so their
  biases and norm scales count as such), the learning-rate schedule of ``optim.schedule``, then the target EMA
  ``theta_bar <- theta_bar + eta (theta - theta_bar)`` with the new parameters, every applied step.

Weights come from an export of our initial state (``export_initial_state``: ``jaxrl_lm.interop.export_hf`` plus a
JSON of the step's settings), so the process that runs this step never imports JAX and its peak RSS is its own.
The real vocabulary is used throughout (an export drops the padding rows, which every softmax of ours masks).
Float32 on CPU; ``model.family`` gpt2 with ``model.context: history``, no dropout, no LoRA, no frozen layers.

Example (``tests/test_torch_baseline.py`` checks that the loss equals ours)::

    export_initial_state(cfg, jaxrl_lm.init_state(cfg), "/tmp/init")    # in a process that has JAX
    step = TorchILQLStep.from_export("/tmp/init")                         # in one that need not
    metrics = step.step(torch_batch(batch))                               # the loss before the update
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:  # torch is in the dev extra, not a dependency of jaxrl_lm
    raise ImportError("scripts/torch_ilql_step.py needs PyTorch: pip install -e '.[dev]'") from e

SETTINGS_FILE = "ilql_step.json"
SETTINGS_FORMAT = "jaxrl_lm.torch_ilql_step/1"


# ----------------------------------------------------------------------------------------------------------------
# Settings: what of our Config the step reads, as plain JSON (so the torch process needs no jaxrl_lm import).

def settings_from_config(cfg: Any) -> dict[str, Any]:
    """The step's settings from a ``jaxrl_lm`` Config: the model, ``token_q``, ``rl``, ``optim`` sections and
    ``train.steps`` (the schedule's length). Refuses what this baseline does not implement, naming the key."""
    problems = []
    if cfg.rl.objective != "token_q":
        problems.append(f"rl.objective={cfg.rl.objective!r} (only token_q)")
    m = cfg.model
    for key, value, ok in (("family", m.family, "gpt2"), ("context", m.context, "history"),
                           ("dtype", m.dtype, "float32")):
        if value != ok:
            problems.append(f"model.{key}={value!r} (only {ok})")
    if m.dropout:
        problems.append(f"model.dropout={m.dropout} (only 0)")
    if m.lora.rank:
        problems.append(f"model.lora.rank={m.lora.rank} (only 0)")
    if cfg.train.frozen_layers:
        problems.append(f"train.frozen_layers={cfg.train.frozen_layers} (only 0)")
    if problems:
        raise ValueError("the PyTorch ILQL step does not implement: " + "; ".join(problems))
    asdict = lambda section: json.loads(json.dumps(dataclasses.asdict(section)))  # noqa: E731
    return {"format": SETTINGS_FORMAT, "model": asdict(m), "token_q": asdict(cfg.objective), "rl": asdict(cfg.rl),
            "optim": asdict(cfg.optim), "train_steps": cfg.train.steps}


def export_initial_state(cfg: Any, state: Any, out_dir: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Writes ``state`` (a ``jaxrl_lm`` TrainState) as a Hugging Face directory (``jaxrl_lm.interop.export_hf``, the
    EMA target heads beside the online ones) and the step's settings (``ilql_step.json``, plus ``extra``).

    With ``token_q.target_scope: full`` the target trunk is not in an export: it must still equal the online trunk
    (true of an initial state), which is checked.
    """
    # Imported here, not at the top: the torch process loads this module without JAX (its RSS is measured).
    import jax

    from jaxrl_lm.interop import export_hf

    settings = settings_from_config(cfg)
    target = state.groups["target"]
    if "transformer" in target:
        same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                            target["transformer"], state.params["transformer"])
        if not all(jax.tree.leaves(same)):
            raise ValueError("export_initial_state: the target trunk differs from the online one; only an initial "
                             "state (target = online) can be exported for the full-scope baseline")
    out = export_hf(state.params, cfg.model, out_dir, target_params=target)
    (Path(out) / SETTINGS_FILE).write_text(json.dumps({**settings, **dict(extra or {})}, indent=1))
    return Path(out)


# ----------------------------------------------------------------------------------------------------------------
# The token-level MDP of a batch (docs/design.md 2.1), on [B, L] tensors.

def torch_batch(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A ``jaxrl_lm.batch`` dict of ``[B, L]`` arrays as torch tensors: int64 ids and flags, float32 reward."""
    out = {k: torch.as_tensor(np.asarray(v), dtype=torch.int64) for k, v in batch.items() if k != "reward"}
    out["reward"] = torch.as_tensor(np.asarray(batch["reward"]), dtype=torch.float32)
    return out


def _shift_left(x: torch.Tensor, fill) -> torch.Tensor:
    """``out[:, i] = x[:, i + 1]``, ``fill`` in the last column."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], fill)], dim=1)


def _first_true_at_or_after(flags: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest ``j >= i`` with ``flags[j]``; ``L`` where there is none. ``[B, L] bool -> int64``."""
    length = flags.shape[1]
    index = torch.where(flags, torch.arange(length).expand_as(flags), torch.full_like(flags, length, dtype=torch.int64))
    return torch.flip(torch.cummin(torch.flip(index, [1]), dim=1).values, [1])


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its segment (a maximal run of one id). ``[B, L] -> [B, L] int64``."""
    length = segment_ids.shape[1]
    columns = torch.arange(length).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.cummax(torch.where(starts, columns, torch.zeros_like(columns)), dim=1).values
    return columns - first


@dataclasses.dataclass
class Transitions:
    """``[B, L]`` per position ``i`` (zero off decisions; ``next_index`` is then ``i`` itself)."""

    decision: torch.Tensor          # bool: x[i+1] is an agent token of i's (non-padding) segment
    action: torch.Tensor            # int64: x[i+1]
    reward: torch.Tensor            # float32: reward[i+1]
    done: torch.Tensor              # float32: done[i+1]
    discount: torch.Tensor          # float32: gamma, or 1 inside an agent turn (utterance time steps)
    next_index: torch.Tensor        # int64: the next decision of the segment, else the segment's last position
    next_is_decision: torch.Tensor  # bool
    next_action: torch.Tensor       # int64: x[next_index + 1] where next_is_decision
    segment_end: torch.Tensor       # bool: i is the last position of its segment


def transitions(batch: Mapping[str, torch.Tensor], gamma: float, time_step: str) -> Transitions:
    tokens, seg = batch["tokens"], batch["segment_ids"]
    length = tokens.shape[1]
    decision = (_shift_left(batch["action_mask"], 0) == 1) & (_shift_left(seg, 0) == seg) & (seg != 0)
    after = _shift_left(tokens, 0)
    action = torch.where(decision, after, 0)
    reward = torch.where(decision, _shift_left(batch["reward"], 0.0), 0.0)
    done = torch.where(decision, _shift_left(batch["done"], 0).float(), 0.0)
    segment_end = _shift_left(seg, -1) != seg
    segment_end[:, -1] = True
    last = _first_true_at_or_after(segment_end)
    next_decision = _first_true_at_or_after(_shift_left(decision, False)) + 1
    own = torch.arange(length).expand_as(tokens)
    next_index = torch.where(next_decision <= last, next_decision, last).clamp(0, length - 1)
    next_index = torch.where(decision, next_index, own)
    next_is_decision = decision & torch.gather(decision, 1, next_index)
    next_action = torch.where(next_is_decision, torch.gather(after, 1, next_index), 0)
    if time_step == "token":
        discount = torch.where(decision, gamma, 0.0)
    elif time_step == "utterance":  # gamma only when n(i) lies in a later turn than the action a_i
        turns = batch["turn_ids"]
        turn_of_state = torch.where(decision, _shift_left(turns, 0), turns)
        later = torch.gather(turn_of_state, 1, next_index) > _shift_left(turns, 0)
        discount = torch.where(decision, torch.where(later, gamma, 1.0), 0.0)
    else:
        raise ValueError(f"rl.time_step must be token or utterance, got {time_step!r}")
    return Transitions(decision, action, reward.float(), done, discount.float(), next_index, next_is_decision,
                       next_action, segment_end)


def return_to_go(tr: Transitions) -> torch.Tensor:
    """G_i = r_i + (1 - d_i) g_i G_{n(i)} at decisions, 0 at a segment's end (the ``mc`` backup). ``[B, L]``."""
    batch_size, length = tr.decision.shape
    out = torch.zeros(batch_size, length)
    carry = torch.zeros(batch_size)  # G of the nearest later decision of the segment
    for i in range(length - 1, -1, -1):
        carry = torch.where(tr.segment_end[:, i], 0.0, carry)
        g = tr.reward[:, i] + (1.0 - tr.done[:, i]) * tr.discount[:, i] * carry
        out[:, i] = torch.where(tr.decision[:, i], g, 0.0)
        carry = torch.where(tr.decision[:, i], g, carry)
    return out


def decision_slots(decision: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``capacity`` decision positions of each row ``[B, M] int64`` (unused slots: 0) and the slot
    weights ``[B, M] float32`` (1 for a used slot)."""
    length = decision.shape[1]
    index = torch.where(decision, torch.arange(length).expand_as(decision), length)
    first = torch.sort(index, dim=1).values[:, :capacity]
    if first.shape[1] < capacity:  # a row shorter than the buffer
        first = torch.cat([first, torch.full((first.shape[0], capacity - first.shape[1]), length)], dim=1)
    weight = (first < length).float()
    return torch.where(first < length, first, 0), weight


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, L, ...]`` at per-row positions ``index [B, M]`` -> ``[B, M, ...]``."""
    return x[torch.arange(x.shape[0])[:, None], index]


# ----------------------------------------------------------------------------------------------------------------
# Heads.

def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _param(array: np.ndarray) -> torch.nn.Parameter:
    """A float32 parameter holding a copy of ``array``."""
    return torch.nn.Parameter(torch.tensor(np.asarray(array, np.float32)))


class QHeads(torch.nn.Module):
    """K Q-heads in our layout: ``fc_kernel [K, D, E]``, ``fc_bias [K, E]`` (mlp), ``out_kernel [K, V, E]``,
    ``out_bias [K, V]`` (when ``q_head_bias``); a linear head reads ``h`` itself (``E = D``)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], vocab_size: int):
        super().__init__()
        self.is_mlp = "fc_kernel" in tensors
        if self.is_mlp:
            self.fc_kernel, self.fc_bias = _param(tensors["fc_kernel"]), _param(tensors["fc_bias"])
        self.out_kernel = _param(np.asarray(tensors["out_kernel"])[:, :vocab_size])
        self.out_bias = _param(np.asarray(tensors["out_bias"])[:, :vocab_size]) if "out_bias" in tensors else None

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """``[S, D] -> [K, S, E]`` (mlp) or ``[1, S, D]`` (linear: shared by every head)."""
        if not self.is_mlp:
            return h[None]
        k = self.fc_kernel.shape[0]
        return _gelu(torch.baddbmm(self.fc_bias[:, None, :], h.expand(k, *h.shape), self.fc_kernel))

    def all_actions(self, h: torch.Tensor) -> torch.Tensor:
        """Every action's Q. ``[S, D] -> [K, S, V]``."""
        z = self.features(h).expand(self.out_kernel.shape[0], -1, -1)
        w = self.out_kernel.transpose(1, 2)
        if self.out_bias is None:
            return torch.bmm(z, w)
        return torch.baddbmm(self.out_bias[:, None, :], z, w)

    def at(self, h: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q of the given actions only (their output rows gathered first). ``[S, D], [S] -> [K, S]``."""
        z = self.features(h)
        q = torch.sum(z * self.out_kernel[:, actions], dim=-1)
        return q if self.out_bias is None else q + self.out_bias[:, actions]


class VHead(torch.nn.Module):
    """``gelu_tanh(h W1 + b1) . w2 + b2`` (mlp) or ``h . w2 + b2`` (linear). ``[S, D] -> [S]``."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        super().__init__()
        self.is_mlp = "fc_kernel" in tensors
        if self.is_mlp:
            self.fc_kernel, self.fc_bias = _param(tensors["fc_kernel"]), _param(tensors["fc_bias"])
        self.out_kernel, self.out_bias = _param(tensors["out_kernel"]), _param(tensors["out_bias"])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = torch.addmm(self.fc_bias, h, self.fc_kernel) if self.is_mlp else h
        z = _gelu(z) if self.is_mlp else z
        return z @ self.out_kernel + self.out_bias


# ----------------------------------------------------------------------------------------------------------------
# The step.

def learning_rate(optim: SimpleNamespace, total_steps: int, count: int) -> float:
    """``optim.schedule`` at the ``count``-th applied update (0-based): linear warm-up from 0, then constant,
    cosine or linear decay to 0 at ``total_steps``."""
    if count < optim.warmup_steps:
        return optim.learning_rate * count / optim.warmup_steps
    t = count - optim.warmup_steps
    decay = max(total_steps - optim.warmup_steps, 1)
    if optim.schedule == "constant":
        return optim.learning_rate
    if optim.schedule == "cosine":
        return optim.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(t, decay) / decay))
    return optim.learning_rate * (1.0 - min(t, decay) / decay)


class TorchILQLStep:
    """The online model (GPT-2 trunk, LM, K Q-heads, V head), its EMA targets and AdamW; ``step(batch)`` performs
    one optimizer step and returns the loss terms before it (docs/design.md 2.4-2.5)."""

    def __init__(self, settings: Mapping[str, Any], trunk: torch.nn.Module, lm_head: torch.Tensor | None,
                 q_heads: QHeads, v_head: VHead, target_q_heads: QHeads, target_trunk: torch.nn.Module | None):
        ns = lambda d: SimpleNamespace(**d)  # noqa: E731
        self.model, self.q, self.rl, self.optim = (ns(settings[k]) for k in ("model", "token_q", "rl", "optim"))
        self.total_steps = settings["train_steps"]
        self.trunk, self.lm_head, self.q_heads, self.v_head = trunk, lm_head, q_heads, v_head
        self.target_q_heads, self.target_trunk = target_q_heads, target_trunk
        for module in (target_q_heads, target_trunk):
            if module is not None:
                module.requires_grad_(False)
        named = [(f"transformer.{n}", p) for n, p in trunk.named_parameters()]
        named += [("lm_head", lm_head)] if lm_head is not None else []
        named += [(f"q_heads.{n}", p) for n, p in q_heads.named_parameters()]
        named += [(f"v_head.{n}", p) for n, p in v_head.named_parameters()]
        self.named_params = named
        # Weight decay where ours applies it (jaxrl_lm.train.state.decays): weights, not biases or LayerNorm scales.
        plain_name = lambda n: n.endswith("bias") or ".ln_" in n  # noqa: E731  (GPT-2's LayerNorms: ln_1, ln_2, ln_f)
        decayed = [p for n, p in named if not plain_name(n)]
        plain = [p for n, p in named if plain_name(n)]
        o = self.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": o.weight_decay}, {"params": plain, "weight_decay": 0.0}],
            lr=learning_rate(o, self.total_steps, 0), betas=(o.b1, o.b2), eps=o.eps)
        self.params = [p for _, p in named]
        self.targets = list(target_q_heads.parameters())
        self.target_sources = list(q_heads.parameters())
        if target_trunk is not None:
            self.targets += list(target_trunk.parameters())
            self.target_sources += list(trunk.parameters())
        self.applied = 0  # AdamW's own count: applied (finite) steps only
        self.skipped = 0

    @classmethod
    def from_export(cls, path: str | Path) -> "TorchILQLStep":
        """Builds the step from ``export_initial_state``'s directory (weights, target heads, settings)."""
        import transformers
        from safetensors.numpy import load_file

        path = Path(path)
        settings = json.loads((path / SETTINGS_FILE).read_text())
        if settings.get("format") != SETTINGS_FORMAT:
            raise ValueError(f"{path / SETTINGS_FILE}: not a {SETTINGS_FORMAT} file")
        m = settings["model"]
        config = transformers.GPT2Config.from_pretrained(path)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        tensors: dict[str, np.ndarray] = {}
        for file in sorted(path.glob("model*.safetensors")):
            tensors.update(load_file(file))

        def make_trunk() -> torch.nn.Module:
            trunk = transformers.GPT2Model(config)
            state = {k.removeprefix("transformer."): torch.from_numpy(v.copy()) for k, v in tensors.items()
                     if k.startswith("transformer.")}
            missing, unexpected = trunk.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{path}: trunk tensors missing {missing}, unexpected {unexpected}")
            return trunk.train()  # no dropout (probabilities 0); train mode as in a training step

        trunk = make_trunk()
        lm_head = None
        if not m["tie_embeddings"]:
            lm_head = torch.nn.Parameter(torch.from_numpy(tensors["lm_head.weight"].copy()))  # [V, D]
        heads = load_file(path / "q_heads.safetensors")
        part = lambda prefix: {k[len(prefix):]: v for k, v in heads.items() if k.startswith(prefix)}  # noqa: E731
        vocab = m["vocab_size"]
        target_part = part("target.q_heads.") or part("q_heads.")
        target_trunk = make_trunk() if settings["token_q"]["target_scope"] == "full" else None
        return cls(settings, trunk, lm_head, QHeads(part("q_heads."), vocab), VHead(part("v_head.")),
                   QHeads(target_part, vocab), target_trunk)

    # -- forward pieces ----------------------------------------------------------------------------------------

    def hidden(self, trunk: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Final normed states ``[B, L, D]``: causal attention inside each segment, positions restarting there."""
        seg = batch["segment_ids"]
        if bool(torch.all(seg == seg[:, :1])) and bool(torch.all(seg != 0)):
            return trunk(input_ids=batch["tokens"]).last_hidden_state  # one segment per row: the plain causal path
        length = seg.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = (causal[None] & (seg[:, :, None] == seg[:, None, :]))[:, None]  # [B, 1, L, L]
        return trunk(input_ids=batch["tokens"], position_ids=segment_positions(seg),
                     attention_mask=mask).last_hidden_state

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``[S, D] -> [S, V]`` (tied: the token table)."""
        return h @ (self.trunk.wte.weight if self.lm_head is None else self.lm_head).T

    def count_decisions(self, batch: Mapping[str, torch.Tensor]) -> float:
        return float(transitions(batch, self.rl.gamma, self.rl.time_step).decision.sum())

    def loss(self, batch: Mapping[str, torch.Tensor], denominator: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective of one (micro-)batch, divided by the whole step's decision count ``denominator``."""
        q, rl = self.q, self.rl
        tr = transitions(batch, rl.gamma, rl.time_step)
        batch_size, length = batch["tokens"].shape
        capacity = max(1, math.ceil(round(rl.decision_fraction * length, 6)))
        slots, weight = decision_slots(tr.decision, capacity)  # [B, M]
        n = max(denominator, 1.0)
        take = lambda x: gather_rows(x, slots).reshape(-1)  # noqa: E731  [B, L] -> [S = B M]
        action, reward, done, discount = take(tr.action), take(tr.reward), take(tr.done), take(tr.discount)
        weight = weight.reshape(-1)
        next_slots = gather_rows(tr.next_index, slots)  # [B, M]

        hidden = self.hidden(self.trunk, batch)  # [B, L, D]
        d = hidden.shape[-1]
        h = gather_rows(hidden, slots).reshape(-1, d)  # [S, D]
        with torch.no_grad():
            if self.target_trunk is None:
                target_hidden = hidden.detach()
            else:
                target_hidden = self.hidden(self.target_trunk, batch)
            target_q_taken = self.target_q_heads.at(gather_rows(target_hidden, slots).reshape(-1, d), action)
            if q.backup == "expectile":  # V on the online trunk's states at n(i), no gradient
                backup = self.v_head(gather_rows(hidden.detach(), next_slots).reshape(-1, d))
            elif q.backup == "mc":
                backup = gather_rows(return_to_go(tr), next_slots).reshape(-1)
            else:
                target_next = gather_rows(target_hidden, next_slots).reshape(-1, d)
                backup = self.target_q_heads.all_actions(target_next).min(dim=0).values.max(dim=-1).values
                if q.backup == "sarsa":
                    on_policy = self.target_q_heads.at(target_next, take(tr.next_action)).min(dim=0).values
                    backup = torch.where(take(tr.next_is_decision), on_policy, backup)
            backup = torch.where(weight > 0, backup, 0.0)
            target = reward + (1.0 - done) * discount * backup
            if q.value_min is not None or q.value_max is not None:
                target = target.clamp(q.value_min, q.value_max)

        terms = {}
        if q.cql_alpha > 0:
            q_all = self.q_heads.all_actions(h)  # [K, S, V]
            q_taken = torch.gather(q_all, 2, action.expand(q_all.shape[0], -1)[..., None])[..., 0]
            scaled = q_all / q.cql_temperature
            ce = torch.logsumexp(scaled, dim=-1) - q_taken / q.cql_temperature  # [K, S]
            terms["cql_loss"] = torch.sum(weight * ce.sum(0)) / n
        else:
            q_taken = self.q_heads.at(h, action)
            terms["cql_loss"] = torch.zeros(())
        terms["q_loss"] = torch.sum(weight * torch.square(q_taken - target).sum(0)) / n
        needs_value = q.backup == "expectile" or (q.lambda_bc > 0 and q.awr_beta != 0)
        value = self.v_head(h) if needs_value else None
        if q.backup == "expectile":
            u = target_q_taken.min(dim=0).values - value
            terms["v_loss"] = torch.sum(weight * torch.abs(q.expectile_tau - (u < 0).float()) * torch.square(u)) / n
        else:
            terms["v_loss"] = torch.zeros(())
        if q.lambda_bc > 0:
            if q.awr_beta == 0:
                awr = torch.ones_like(weight)
            else:
                advantage = (target_q_taken.min(dim=0).values - value).detach()
                awr = torch.clamp(torch.exp(q.awr_beta * advantage), max=q.awr_max_weight)
            logits = self.lm_logits(h)
            ce = torch.logsumexp(logits, dim=-1) - torch.gather(logits, 1, action[:, None])[:, 0]
            terms["bc_loss"] = torch.sum(weight * awr * ce) / n
        else:
            terms["bc_loss"] = torch.zeros(())
        loss = (q.lambda_q * terms["q_loss"] + q.lambda_v * terms["v_loss"] + q.cql_alpha * terms["cql_loss"]
                + q.lambda_bc * terms["bc_loss"])
        return loss, {k: float(v.detach()) for k, v in terms.items()}

    # -- the optimizer step ---------------------------------------------------------------------------------------

    def step(self, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on ``batch`` (``torch_batch``); returns ``loss`` and its terms before the update,
        ``grad_norm`` and ``update_applied``."""
        denominator = self.count_decisions(batch)
        n_micro = self.optim.grad_accum
        for p in self.params:
            p.grad = None
        totals: dict[str, float] = {}
        rows = batch["tokens"].shape[0] // n_micro
        for i in range(n_micro):
            micro = {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}
            loss, terms = self.loss(micro, denominator)
            loss.backward()
            for k, v in {"loss": float(loss.detach()), **terms}.items():
                totals[k] = totals.get(k, 0.0) + v
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p, g in zip(self.params, grads):
            p.grad = g
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        ok = math.isfinite(totals["loss"]) and bool(torch.isfinite(norm))
        if ok:
            if self.optim.grad_clip > 0 and norm >= self.optim.grad_clip:
                torch._foreach_mul_(grads, float(self.optim.grad_clip / norm))
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.optim, self.total_steps, self.applied)
            self.optimizer.step()
            self.applied += 1
            with torch.no_grad():
                torch._foreach_lerp_(self.targets, self.target_sources, self.rl.target_ema)
        else:
            self.skipped += 1
        return {**totals, "grad_norm": float(norm), "update_applied": float(ok)}

    def state_numpy(self) -> dict[str, np.ndarray]:
        """Every trained tensor by name (``transformer.<HF GPT2Model name>``, ``q_heads.*``, ``v_head.*``) and the
        target Q-heads (``target.q_heads.*``), as float32 numpy arrays."""
        out = {n: p.detach().numpy().copy() for n, p in self.named_params}
        out.update({f"target.q_heads.{n}": p.detach().numpy().copy()
                    for n, p in self.target_q_heads.named_parameters()})
        return out
