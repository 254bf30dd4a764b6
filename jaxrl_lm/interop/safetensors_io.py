"""Safetensors files of a HF directory: reading (lazily, single file or shards) and writing (sharded past a size).

Tensors travel as flat dicts keyed by dotted names (``flatten`` / ``unflatten`` convert to and from our nested
parameter dicts); everything read comes back as float32 numpy on the host, whatever float dtype was stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxrl_lm.interop.names import set_path

WEIGHTS_INDEX = "model.safetensors.index.json"


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a FileNotFoundError or ValueError naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


class SafetensorsDir(Mapping[str, np.ndarray]):
    """The tensors of a HF directory by name, read lazily as float32 numpy whatever their stored float dtype."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / WEIGHTS_INDEX
        if index.is_file():
            self.file_of = {k: self.dir / v for k, v in read_json(index)["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(self.dir / "model.safetensors", "np") as f:
                self.file_of = {k: self.dir / "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or {WEIGHTS_INDEX} (PyTorch .bin weights are "
                                    f"not read: re-save the model with save_pretrained, which writes safetensors)")
        self._handles: dict[Path, Any] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        path = self.file_of[name]
        if path not in self._handles:
            # "flax" reads every float dtype (numpy has no bfloat16); arrays stay on the host.
            self._handles[path] = safe_open(path, "flax")
        with jax.default_device(jax.devices("cpu")[0]):
            return np.asarray(self._handles[path].get_tensor(name), np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": leaf}``, every key prefixed with ``prefix``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``flatten``: ``{"a.b.c": leaf}`` as a nested dict."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        set_path(tree, name, value)
    return tree


def save_weights(tensors: dict[str, np.ndarray], out: Path, max_shard_size: int | str) -> None:
    """Writes ``tensors`` as float32 ``model.safetensors``, or shards plus ``WEIGHTS_INDEX`` past
    ``max_shard_size`` (bytes, or a string such as ``"2GB"``); an earlier export's weight files are removed."""
    for stale in (*out.glob("model*.safetensors"), out / WEIGHTS_INDEX):
        stale.unlink(missing_ok=True)
    split = split_state_dict_into_shards_factory(tensors, get_storage_size=lambda a: a.nbytes,
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: np.array(tensors[n], np.float32, order="C") for n in names}, out / filename,
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))
