"""Accelerator slices by name: what ``mesh.topology`` may say, how many devices that is, and what each chip holds.

Pure Python (no JAX), so ``config.py`` validates a name when the YAML is loaded. ``train/aot.py`` turns a
``Topology`` into compile-only devices; ``train/mesh.py`` checks a real run's devices against it.

Names:

- ``v5e-16``, ``v6e-256``: TPU v5e / v6e slices counted in chips (one TensorCore each).
- ``v4-8``, ``v5p-128``: TPU v4 / v5p slices counted in TensorCores, two per chip (``v5p-128`` = 64 chips),
  run as one megacore device per chip.
- ``v5e:4x4``, ``v5p:4x4x8``: an explicit chip grid of that generation (any shape libtpu accepts).
- ``h100-8``: one node of 8 H100 SXM GPUs (1 to 8 per node). Several nodes: ``mesh.num_slices``.

A short TPU name has the standard slice shape: from ``2x2`` (``2x2x1`` for the 3D tori of v4 / v5p) each
doubling of the chip count doubles the last of the shortest axes (``2x4``, ``4x4``, ``4x8`` ...; ``2x2x2``,
``2x2x4``, ``2x4x4``, ``4x4x4`` ...), as Cloud TPU slices are laid out. An axis wraps around (a torus ring)
when it spans a whole pod edge: 16 chips on v5e / v6e; on v4 / v5p every axis once the slice is whole
4x4x4 cubes.
"""

from __future__ import annotations

import dataclasses
import math
import re

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator generation.

    hbm_bytes: memory per device. peak_flops: dense bf16 matmul FLOP/s per device (the MFU denominator).
    device_kind: what ``jax.Device.device_kind`` says on it. The rest describes TPU slices to libtpu:
    libtpu_name (``v5`` for v5p), chip_config (``megacore``: both TensorCores of a chip as one device),
    cores_per_chip_in_name (the short name counts TensorCores on v4 / v5p), ndim (2D or 3D torus),
    max_chips (a whole pod). GPU nodes: max_chips is the GPUs one node holds, target_config the file of
    XLA's ``GpuTargetConfigProto`` that describes the GPU to the compiler (relative to the repository).
    """

    name: str
    platform: str
    hbm_bytes: int
    peak_flops: float
    device_kind: str
    max_chips: int
    libtpu_name: str = ""
    chip_config: str = "default"
    cores_per_chip_in_name: int = 1
    ndim: int = 2
    target_config: str = ""


# HBM and peak bf16 FLOP/s per chip from the vendors' spec pages (Cloud TPU v4 / v5e / v5p / v6e system
# architecture; NVIDIA H100 SXM datasheet, dense tensor-core bf16).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "tpu", 32 * GIB, 275e12, "TPU v4", 4096, "v4", "megacore", 2, 3),
    "v5e": Chip("v5e", "tpu", 16 * GIB, 197e12, "TPU v5 lite", 256, "v5e", "default", 1, 2),
    "v5p": Chip("v5p", "tpu", 95 * GIB, 459e12, "TPU v5", 8960, "v5", "megacore", 2, 3),
    "v6e": Chip("v6e", "tpu", 32 * GIB, 918e12, "TPU v6 lite", 256, "v6e", "default", 1, 2),
    "h100": Chip("h100", "cuda", 80 * GIB, 989e12, "NVIDIA H100 80GB HBM3", 8,
                 target_config="configs/topologies/h100_sxm.txtpb"),
}

_SHORT = re.compile(r"^([a-z0-9]+)-(\d+)$")
_GRID = re.compile(r"^([a-z0-9]+):(\d+(?:x\d+)+)$")


class TopologyError(ValueError):
    """A ``mesh.topology`` name that does not describe a slice; the message says what would."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice (or GPU node) times ``num_slices``.

    shape: chips per slice along each physical axis (TPU), or ``(gpus_per_node,)``.
    wrap: per TPU axis, whether it closes into a torus ring (always three entries, as libtpu wants).
    """

    name: str
    chip: Chip
    shape: tuple[int, ...]
    num_slices: int = 1

    @property
    def devices_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def n_devices(self) -> int:
        return self.devices_per_slice * self.num_slices

    @property
    def libtpu_topology(self) -> str:
        """``v5:4x4x4``: the grid in libtpu's spelling."""
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        if self.chip.ndim == 3:
            whole_cubes = all(s % 4 == 0 for s in self.shape)
            return (whole_cubes,) * 3
        return (self.shape[0] == 16, self.shape[1] == 16, False)

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Four-chip hosts (2x2x1), or fewer in a smaller slice: which devices share a process."""
        return (min(2, self.shape[0]), min(2, self.shape[1]), 1)

    def describe(self) -> str:
        """``v5p-128 = 64 x TPU v5 (4x4x4), 1 slice``."""
        kind = self.chip.device_kind
        grid = "x".join(map(str, self.shape))
        unit = "node" if self.chip.platform == "cuda" else "slice"
        return (f"{self.name} = {self.n_devices} x {kind} ({grid} per {unit}), {self.num_slices} "
                f"{unit}{'s' if self.num_slices > 1 else ''}")


def standard_shape(chips: int, ndim: int) -> tuple[int, ...]:
    """The slice shape of ``chips`` chips (1, or 4 times a power of two) on a 2D or 3D torus."""
    if chips == 1:
        return (1,) * ndim
    shape = [2, 2] + [1] * (ndim - 2)
    while math.prod(shape) < chips:
        shortest = min(shape)
        axis = max(i for i, s in enumerate(shape) if s == shortest)
        shape[axis] *= 2
    return tuple(shape)


def _chip(kind: str, name: str) -> Chip:
    if kind not in CHIPS:
        raise TopologyError(f"mesh.topology {name!r}: unknown accelerator {kind!r}; known: {sorted(CHIPS)} "
                            f"(e.g. 'v5p-128', 'v5e:4x4', 'h100-8'), or '' for the devices present")
    return CHIPS[kind]


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """``mesh.topology`` (and ``mesh.num_slices``) as a Topology; a TopologyError says what is wrong."""
    short, grid = _SHORT.match(name), _GRID.match(name)
    if not (short or grid):
        raise TopologyError(f"mesh.topology {name!r} is not of the form 'v5p-128' (kind-count), 'v5e:4x4' "
                            f"(kind:grid) or 'h100-8' (GPUs per node)")
    chip = _chip((short or grid).group(1), name)
    if chip.platform == "cuda":
        gpus = int(short.group(2)) if short else 0
        if not 1 <= gpus <= chip.max_chips:
            raise TopologyError(f"mesh.topology {name!r}: a {chip.name} node is 'h100-N' with N = 1 to "
                                f"{chip.max_chips} GPUs; more nodes: mesh.num_slices")
        return Topology(name, chip, (gpus,), num_slices)
    if grid:
        shape = tuple(int(s) for s in grid.group(2).split("x"))
        if len(shape) != chip.ndim or min(shape) < 1:
            raise TopologyError(f"mesh.topology {name!r}: {chip.name} chips form a {chip.ndim}D grid")
    else:
        count = int(short.group(2))
        if count % chip.cores_per_chip_in_name:
            raise TopologyError(f"mesh.topology {name!r}: {chip.name} names count TensorCores, "
                                f"{chip.cores_per_chip_in_name} per chip")
        chips = count // chip.cores_per_chip_in_name
        if chips != 1 and (chips < 4 or chips & (chips - 1)):
            example = "4x4x12" if chip.ndim == 3 else "4x4"
            raise TopologyError(f"mesh.topology {name!r}: {chips} chips is not a standard slice (1, 4, 8, 16, ... "
                                f"chips); give the grid explicitly, e.g. '{chip.name}:{example}'")
        shape = standard_shape(chips, chip.ndim)
    if math.prod(shape) > chip.max_chips:
        raise TopologyError(f"mesh.topology {name!r}: {math.prod(shape)} chips is more than a {chip.name} pod "
                            f"({chip.max_chips}); use mesh.num_slices for several slices")
    return Topology(name, chip, shape, num_slices)
