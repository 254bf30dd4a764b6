"""Which parameters a run trains: the model's ``Params`` split into a trained part and a frozen part (a frozen
trunk bottom, and with LoRA adapters every base weight of the trunk).

``train.frozen_layers = n`` freezes the embeddings and blocks ``0..n-1`` (``-1``: the whole trunk, final norm
included), the usual way to put value heads on a pretrained model with little compute. The trained part is
what the optimizer sees (so the frozen bottom has no gradient and no optimizer moments) and what EMA and frozen
parameter groups hold (so it has no second copy either); the frozen part is read from the trained parameters
``TrainState.params``, which stay the whole model for evaluation, export and checkpoints.

The stacked blocks are one array per parameter with a leading ``[n_layers]`` axis, so a split inside the stack
slices that axis: the trained part holds ``[n_layers - n, ...]``, the frozen part ``[n, ...]``. Both parts are
nested dicts shaped like ``Params`` with the other part's entries left out (an entry left with nothing is left
out too)::

    part = Partition.of(cfg)                   # from model.family, model.n_layers and train.frozen_layers
    trained, frozen = part.split(params)       # optimizer and EMA groups see ``trained``
    params = part.join(trained, frozen)        # the whole model again (concatenates the split blocks)

Any pytree shaped like ``Params`` splits the same way when given its own ``take`` (e.g. sharding specs, which
are not sliced: ``take=lambda leaf, rows: leaf``).

LoRA adapters (``model.lora.rank > 0``, ``jaxrl_lm.models.layers.LoraLinear``): every base weight of the trunk
(embeddings, norms, kernels and biases of every block, the final norm) is frozen, and the trunk's trained part is
its LoRA factors ``lora_a``/``lora_b`` alone; the heads (Q, V and an untied LM head) train whole. With
``train.frozen_layers = n`` too, the factors of blocks ``0..n-1`` are frozen with their blocks (sliced like any
stacked leaf), so the trained part holds the factors of blocks ``n..``. The frozen part then holds whole base
leaves beside the bottom's factor rows, and ``join`` concatenates a leaf exactly when both parts hold rows of it.

The module also holds the LoRA helpers on parameter trees: ``merge_adapters`` (``W + (alpha / rank) A B`` into
each targeted kernel, the factors dropped: the plain model a Hugging Face export writes) and
``with_fresh_adapters`` (a model without adapters, such as an imported pretrained trunk, completed with fresh
factors).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_lm.config import Config, LoraConfig, ModelConfig
from jaxrl_lm.models.layers import LORA_FACTORS
from jaxrl_lm.models.model import build, split_model

# The trunk's parameter names by family (jaxrl_lm.models.transformer): embeddings, the stacked blocks, final norm.
TRUNK_NAMES = {
    "gpt2": (("wte", "wpe"), "h", "ln_f"),
    "llama": (("embed_tokens",), "layers", "norm"),
}

Take = Callable[[Any, slice], Any]


def _take_rows(leaf: Any, rows: slice) -> Any:
    return leaf[rows]


def _join_trees(bottom: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts merged key by key; a leaf in both is a stacked leaf split by rows: concatenated."""
    out = dict(bottom)
    for k, t in top.items():
        if k not in out:
            out[k] = t
        elif isinstance(t, Mapping):
            out[k] = _join_trees(out[k], t)
        else:
            out[k] = jnp.concatenate([out[k], t], axis=0)
    return out


@dataclasses.dataclass(frozen=True)
class Partition:
    """frozen_layers: blocks ``[0, frozen_layers)`` and the embeddings are frozen; ``n_layers`` with
    ``final_norm`` frozen too is the whole trunk. ``lora``: every base weight of the trunk is frozen, its LoRA
    factors train (those of blocks ``[0, frozen_layers)`` excepted). Neither freezes nothing (``split`` returns
    ``(params, {})``)."""

    family: str
    n_layers: int
    frozen_layers: int
    final_norm: bool = False
    lora: bool = False

    @classmethod
    def of(cls, cfg: Config) -> "Partition":
        n = cfg.train.frozen_layers
        whole = n < 0
        return cls(cfg.model.family, cfg.model.n_layers, cfg.model.n_layers if whole else n, whole,
                   cfg.model.lora.rank > 0)

    @property
    def active(self) -> bool:
        return self.frozen_layers > 0 or self.final_norm or self.lora

    @property
    def forward_arg(self) -> int:
        """What ``QTransformer.hidden(frozen_layers=...)`` takes: ``-1`` for the whole trunk."""
        return -1 if self.final_norm else self.frozen_layers

    def split(self, params: Mapping[str, Any], take: Take = _take_rows) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(trained, frozen)`` parts of ``params`` (module docstring); ``take(leaf, rows)`` slices a stacked
        block leaf's leading axis."""
        if not self.active:
            return dict(params), {}
        embeddings, blocks, norm = TRUNK_NAMES[self.family]
        trunk = params["transformer"]
        frozen = {k: trunk[k] for k in embeddings if k in trunk}
        trained = {k: v for k, v in trunk.items() if k not in embeddings and k not in (blocks, norm)}
        top, bottom = self._split_blocks(trunk[blocks], take)
        if bottom:
            frozen[blocks] = bottom
        if top:
            trained[blocks] = top
        (frozen if self.final_norm or self.lora else trained)[norm] = trunk[norm]
        out = {k: v for k, v in params.items() if k != "transformer"}
        if trained:
            out["transformer"] = trained
        return out, {"transformer": frozen}

    def _split_blocks(self, tree: Mapping[str, Any], take: Take) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(trained, frozen)`` of the stacked blocks' subtree: a leaf's rows ``[0, frozen_layers)`` are frozen
        and the rest trained, except that with ``lora`` a base leaf (not a LoRA factor) is frozen whole."""
        trained, frozen = {}, {}
        for k, v in tree.items():
            if isinstance(v, Mapping):
                top, bottom = self._split_blocks(v, take)
                trained.update({k: top} if top else {})
                frozen.update({k: bottom} if bottom else {})
            elif self.lora and k not in LORA_FACTORS:
                frozen[k] = v
            else:
                if self.frozen_layers:
                    frozen[k] = take(v, slice(0, self.frozen_layers))
                if self.frozen_layers < self.n_layers:
                    trained[k] = take(v, slice(self.frozen_layers, None))
        return trained, frozen

    def trained(self, params: Mapping[str, Any], take: Take = _take_rows) -> dict[str, Any]:
        """The trained part of ``params`` (``split(params)[0]``)."""
        return self.split(params, take)[0]

    def join(self, trained: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
        """The whole model from its parts: the inverse of ``split`` (a leaf split by rows is concatenated)."""
        if not self.active:
            return dict(trained)
        trunk = _join_trees(frozen["transformer"], trained.get("transformer", {}))
        return {**{k: v for k, v in trained.items() if k != "transformer"}, "transformer": trunk}

    def with_group(self, params: Mapping[str, Any], group: Mapping[str, Any]) -> dict[str, Any]:
        """The whole model with a parameter group's keys swapped in: the group holds (the trained part of) some
        top-level keys, the frozen bottom is always the trained parameters'."""
        if not self.active:
            return {**params, **group}
        trained, frozen = self.split(params)
        return self.join({**trained, **group}, frozen)

    def group_keys(self, params: Mapping[str, Any], keys: tuple[str, ...]) -> list[str]:
        """Those of a group's ``keys`` that the trained part of ``params`` has (a model with tied embeddings has
        no ``lm_head``; a wholly frozen trunk leaves no ``transformer`` to train)."""
        trained = self.trained(params, take=lambda leaf, rows: leaf)
        return [k for k in keys if k in trained]


# ----------------------------------------------------------------------------------------------------------------
# LoRA factors in a parameter tree.


def merge_adapters(params: Mapping[str, Any], cfg: ModelConfig) -> tuple[dict[str, Any], ModelConfig]:
    """The plain model a LoRA model computes, and its config (``model.lora`` off).

    Every linear layer with factors gets ``kernel + (alpha / rank) lora_a @ lora_b`` (``[..., in, out]``,
    ``[..., in, r]``, ``[..., r, out]``: the leading axes, the stacked layers or a stack of seeds, batch the
    product) and loses its factors; nothing else changes. NumPy or jax arrays, in their own dtype. A config
    without adapters gives ``(params, cfg)`` back as they are.
    """
    if not cfg.lora.rank:
        return dict(params), cfg
    scale = cfg.lora.scale

    def merged(tree: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in tree.items():
            if isinstance(v, Mapping) and LORA_FACTORS[0] in v:
                out[k] = {n: x for n, x in v.items() if n not in LORA_FACTORS}
                out[k]["kernel"] = v["kernel"] + scale * (v["lora_a"] @ v["lora_b"])
            else:
                out[k] = merged(v) if isinstance(v, Mapping) else v
        return out

    return merged(params), dataclasses.replace(cfg, lora=LoraConfig())


def _factors(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The LoRA factor leaves of a parameter tree (the dicts that hold none left out)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            sub = _factors(v)
            if sub:
                out[k] = sub
        elif k in LORA_FACTORS:
            out[k] = v
    return out


def with_fresh_adapters(cfg: ModelConfig, params: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """``params`` of ``cfg``'s model lacking its LoRA factors (an imported pretrained trunk, a run without
    adapters) completed with the factors a fresh model of ``cfg`` draws from ``seed``: ``A`` random, ``B = 0``,
    so the model computes exactly what ``params`` did. A layer that has factors keeps them; axes of ``params``
    before the model's own (a stack of seeds) get the same factors. The added factors are NumPy float32; without
    adapters in ``cfg`` (rank 0) ``params`` come back as they are. Only the factors are computed (one jitted
    draw; the rest of the fresh model is dead code)."""
    if not cfg.lora.rank:
        return dict(params)
    fresh = jax.device_get(jax.jit(lambda: _factors(split_model(build(cfg, seed))[1]))())

    def fill(tree: Mapping[str, Any], factors: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(tree)
        for k, f in factors.items():
            if k not in tree or not isinstance(f, Mapping) or not isinstance(tree[k], Mapping):
                continue  # present already, or a structure the model lacks: left for the caller's shape checks
            if LORA_FACTORS[0] in f and LORA_FACTORS[0] not in tree[k]:
                kernel = tree[k]["kernel"]
                lead = tuple(kernel.shape[:np.ndim(kernel) - f["lora_a"].ndim])
                out[k] = {**tree[k], **{n: np.broadcast_to(np.asarray(f[n], np.float32), lead + f[n].shape)
                                       for n in LORA_FACTORS}}
            else:
                out[k] = fill(tree[k], f)
        return out

    return fill(params, fresh)
