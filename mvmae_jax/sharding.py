"""Device mesh and shardings.

The mesh has one `data` axis over all devices of all hosts. Batches are split over it along
their leading dimension; parameters and optimizer state are replicated; the AMT bank is split
over examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `data` over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """Leading dimension split over every mesh axis."""
    return PartitionSpec(mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    if global_batch % mesh.size:
        raise ValueError(f"batch_size={global_batch} is not divisible by the {mesh.size} devices "
                         "of the mesh; choose a multiple of the device count")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host-global batch (every process holds all of it) on the mesh."""
    return jax.device_put(batch, batch_sharding(mesh))
