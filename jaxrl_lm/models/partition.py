"""Which parameters a run trains: the model's ``Params`` split into a trained part and a frozen trunk bottom.

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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jaxrl_lm.config import Config

# The trunk's parameter names by family (jaxrl_lm.models.transformer): embeddings, the stacked blocks, final norm.
TRUNK_NAMES = {
    "gpt2": (("wte", "wpe"), "h", "ln_f"),
    "llama": (("embed_tokens",), "layers", "norm"),
}

Take = Callable[[Any, slice], Any]


def _take_rows(leaf: Any, rows: slice) -> Any:
    return leaf[rows]


@dataclasses.dataclass(frozen=True)
class Partition:
    """frozen_layers: blocks ``[0, frozen_layers)`` and the embeddings are frozen; ``n_layers`` with
    ``final_norm`` frozen too is the whole trunk. ``0`` freezes nothing (``split`` returns ``(params, {})``)."""

    family: str
    n_layers: int
    frozen_layers: int
    final_norm: bool = False

    @classmethod
    def of(cls, cfg: Config) -> "Partition":
        n = cfg.train.frozen_layers
        whole = n < 0
        return cls(cfg.model.family, cfg.model.n_layers, cfg.model.n_layers if whole else n, whole)

    @property
    def active(self) -> bool:
        return self.frozen_layers > 0 or self.final_norm

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
        if self.frozen_layers:
            frozen[blocks] = jax.tree.map(lambda x: take(x, slice(0, self.frozen_layers)), trunk[blocks])
        if self.frozen_layers < self.n_layers:
            trained[blocks] = jax.tree.map(lambda x: take(x, slice(self.frozen_layers, None)), trunk[blocks])
        (frozen if self.final_norm else trained)[norm] = trunk[norm]
        out = {k: v for k, v in params.items() if k != "transformer"}
        if trained:
            out["transformer"] = trained
        return out, {"transformer": frozen}

    def trained(self, params: Mapping[str, Any], take: Take = _take_rows) -> dict[str, Any]:
        """The trained part of ``params`` (``split(params)[0]``)."""
        return self.split(params, take)[0]

    def join(self, trained: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
        """The whole model from its parts: the inverse of ``split`` (the split blocks are concatenated)."""
        if not self.active:
            return dict(trained)
        _, blocks, _ = TRUNK_NAMES[self.family]
        top, bottom = dict(trained.get("transformer", {})), frozen["transformer"]
        trunk = {**bottom, **top}
        if blocks in top and blocks in bottom:
            trunk[blocks] = jax.tree.map(lambda b, t: jnp.concatenate([b, t], axis=0), bottom[blocks], top[blocks])
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
