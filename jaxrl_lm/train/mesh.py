"""The device mesh ``(data, fsdp, tensor)`` of ``cfg.mesh``, and how batches are laid out on it.

Axis order is network intensity: ``data`` (one gradient all-reduce per step) outermost, then ``fsdp``
(parameter all-gathers every layer), then ``tensor`` (activation collectives inside every matmul), so
``mesh_utils`` puts the chattiest axes on the fastest links. With ``mesh.num_slices > 1`` the mesh is hybrid:
``data`` is split into ``num_slices`` groups across slices (TPU multi-slice over DCN, or GPU nodes over the
data-centre network), while ``fsdp`` and ``tensor`` stay inside one slice. ``mesh.topology`` names the slice a
config is for: a run on other devices stops at ``check_topology``, and ``train/aot.py`` builds this very mesh
from that slice's compile-only devices on a machine without it.

Batches are split over ``(data, fsdp)`` along their row axis: every process contributes its loader's
``[B / process_count, L]`` rows and together they form the global ``[B, L]`` batch.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl_lm.config import BATCH_AXES, MESH_AXES, ConfigError, MeshConfig
from jaxrl_lm.data.loader import to_global_batch
from jaxrl_lm.topology import parse_topology



def mesh_shape(m: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` sizes for ``n_devices``, with ``mesh.data = -1`` filled in."""
    inner = m.fsdp * m.tensor
    data = m.data
    if data == -1:
        if n_devices % inner:
            raise ConfigError(f"mesh.fsdp x mesh.tensor = {m.fsdp} x {m.tensor} = {inner} does not divide the "
                              f"{n_devices} devices; change mesh.fsdp or mesh.tensor")
        data = n_devices // inner
    if data * inner != n_devices:
        raise ConfigError(f"mesh.data x mesh.fsdp x mesh.tensor = {data} x {m.fsdp} x {m.tensor} = {data * inner} "
                          f"but there are {n_devices} devices; set mesh.data=-1 to use every device")
    if data % m.num_slices:
        raise ConfigError(f"the data axis ({data}) must be divisible by mesh.num_slices ({m.num_slices}): it is the "
                          f"axis that spans slices")
    return data, m.fsdp, m.tensor


def device_grid(m: MeshConfig, devices: Sequence[jax.Device]) -> np.ndarray:
    """``devices`` as a ``[data, fsdp, tensor]`` array ordered for the interconnect (see the module docstring)."""
    shape = mesh_shape(m, len(devices))
    if m.num_slices == 1:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    ici = (shape[0] // m.num_slices, shape[1], shape[2])
    dcn = (m.num_slices, 1, 1)
    # TPU devices know their slice; elsewhere (GPU nodes) each process is one granule of the slow network. GPU
    # devices carry a slice_index too, but it is 0 on every node, so only a TPU's is asked.
    attr = "slice_index" if devices[0].platform == "tpu" else "process_index"
    granules = len({getattr(d, attr) for d in devices})
    if granules != m.num_slices:
        raise ConfigError(f"mesh.num_slices is {m.num_slices} but the devices form {granules} "
                          f"{'slices' if attr == 'slice_index' else 'processes'}; set mesh.num_slices={granules}")
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=attr == "process_index",
                                                allow_split_physical_axes=True)


def check_topology(m: MeshConfig, devices: Sequence[jax.Device]) -> None:
    """With ``mesh.topology`` set, ``devices`` must be that slice (times ``mesh.num_slices``): as many devices,
    all of its chip. So a pod run and ``scripts/aot_compile.py`` that read the same config compile the same
    program, and a run on the wrong machine stops here rather than on a mesh nobody checked."""
    if not m.topology:
        return
    topology = parse_topology(m.topology, m.num_slices)
    kinds = sorted({d.device_kind for d in devices})
    if len(devices) != topology.n_devices or kinds != [topology.chip.device_kind]:
        raise ConfigError(f"mesh.topology is {m.topology!r} ({topology.describe()}) but the devices here are "
                          f"{len(devices)} x {' + '.join(kinds)}; run on that slice, or set mesh.topology='' to "
                          f"use the devices present (scripts/aot_compile.py checks a topology from any machine)")


def make_mesh(m: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: every device), which
    must be the slice ``mesh.topology`` names when it names one."""
    devices = list(jax.devices() if devices is None else devices)
    check_topology(m, devices)
    return Mesh(device_grid(m, devices), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over ``data x fsdp``; the sequence axis whole. For every ``[B, L]`` batch field."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def check_batch_size(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
    """Every micro-batch (``data.batch_size / optim.grad_accum`` rows) must split evenly over ``data x fsdp``."""
    ways = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if (batch_size // grad_accum) % ways:
        raise ConfigError(f"data.batch_size / optim.grad_accum = {batch_size} / {grad_accum} rows per micro-batch "
                          f"must be divisible by mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}")


def place_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's ``[B_local, L]`` numpy batch -> global ``jax.Array`` s ``[B_local * process_count, L]``.

    Every process calls it with its own loader's rows (``make_loader(process_index=..., process_count=...)``).
    """
    return to_global_batch(batch, batch_sharding(mesh))
