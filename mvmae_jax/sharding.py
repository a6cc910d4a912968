"""Device mesh (data, fsdp) and shardings: parameters replicated or split over `fsdp` by
`config.sharding.fsdp_rules`; batches and the AMT bank over both axes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mvmae_jax.errors import ConfigError

DATA_AXIS, FSDP_AXIS = "data", "fsdp"
STRATEGIES = ("data", "fsdp")
LARGEST = "largest"  # fsdp rule: the largest dimension that divides over the fsdp axis
REPLICATE = "replicate"  # fsdp rule: not split


def make_mesh(devices: Sequence[jax.Device] | None = None, fsdp_axis_size: int = 0) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all) with `fsdp_axis_size` devices along
    `fsdp` (0: all). With several TPU slices, `fsdp` stays inside a slice where it fits."""
    devices = jax.devices() if devices is None else list(devices)
    fsdp = fsdp_axis_size or len(devices)
    shape = (len(devices) // fsdp, fsdp)
    num_slices = len({getattr(device, "slice_index", 0) for device in devices})
    if num_slices == 1:
        grid = mesh_utils.create_device_mesh(shape, devices)
    else:
        per_slice = len(devices) // num_slices
        inside = min(fsdp, per_slice)  # fsdp devices within one slice
        within = (per_slice // inside, inside)
        grid = mesh_utils.create_hybrid_device_mesh(
            within, (shape[0] // within[0], fsdp // inside), devices)
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS))


def config_mesh(sharding_config: ml_collections.ConfigDict,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh `config.sharding` asks for: (devices, 1) for the `data` strategy; for `fsdp`,
    `fsdp_axis_size` devices per copy of the parameters (0: all)."""
    fsdp = sharding_config.fsdp_axis_size if sharding_config.strategy == "fsdp" else 1
    return make_mesh(devices, fsdp)


def describe(mesh: Mesh) -> str:
    """The mesh's axes and sizes, e.g. "data 2 x fsdp 4"."""
    return " x ".join(f"{name} {size}" for name, size in mesh.shape.items())


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """Leading dimension split over every mesh axis."""
    return PartitionSpec(mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host-global batch (every process holds all of it) on the mesh."""
    return jax.device_put(batch, batch_sharding(mesh))


def param_path(path: Sequence[Any]) -> str:
    """A pytree key path as the names `fsdp_rules` match: "encoder/Transformer/..."."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def fsdp_dim(name: str, shape: Sequence[int], num_shards: int,
             rules: Sequence[tuple[str, Any]], min_size: int = 0) -> int | None:
    """The dimension of parameter `name` that FSDP splits into `num_shards`, or None (no rule
    whose regex matches the whole name, "replicate", under `min_size` elements, or nothing
    divisible for "largest"). An explicit dimension that does not divide is an error."""
    how = next((how for pattern, how in rules if re.fullmatch(pattern, name)), REPLICATE)
    if how == REPLICATE or num_shards == 1 or int(np.prod(shape)) < min_size:
        return None
    if how == LARGEST:
        divisible = [d for d in range(len(shape)) if shape[d] % num_shards == 0]
        # Ties go to the leading dimension: for kernels, the input features.
        return max(divisible, key=lambda d: (shape[d], -d)) if divisible else None
    dim = int(how)
    if not -len(shape) <= dim < len(shape) or shape[dim] % num_shards:
        raise ConfigError(
            f"config.sharding.fsdp_rules: parameter {name} of shape {tuple(shape)} cannot be "
            f"split along dimension {dim} into {num_shards} shards; use 'largest' or another "
            "dimension for it")
    return dim % len(shape)


def param_shardings(params: Any, mesh: Mesh,
                    sharding_config: ml_collections.ConfigDict | None = None) -> Any:
    """NamedShardings of a parameter tree (arrays or shapes): replicated for the `data`
    strategy (or no config), split over `fsdp` by `fsdp_rules` for `fsdp`."""
    replicated_ = replicated(mesh)
    strategy = "data" if sharding_config is None else sharding_config.strategy
    if strategy == "data":
        return jax.tree.map(lambda _: replicated_, params)
    rules = [tuple(rule) for rule in sharding_config.fsdp_rules]
    min_size = sharding_config.fsdp_min_size

    def place(path, leaf):
        shape = tuple(leaf.shape)
        dim = fsdp_dim(param_path(path), shape, mesh.shape[FSDP_AXIS], rules, min_size)
        if dim is None:
            return replicated_
        spec = [None] * len(shape)
        spec[dim] = FSDP_AXIS
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree_util.tree_map_with_path(place, params)


def follow_params(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings of a tree holding copies of the parameters (Adam's mu and nu): a leaf whose
    path ends with a parameter's path, with its shape, is placed like it; others replicated."""
    by_path = {tuple(param_path(path).split("/")): (tuple(leaf.shape), placed)
               for (path, leaf), placed in zip(jax.tree_util.tree_leaves_with_path(params),
                                               jax.tree.leaves(shardings), strict=True)}

    def place(path, leaf):
        names = tuple(param_path(path).split("/"))
        for start in range(len(names)):
            found = by_path.get(names[start:])
            if found is not None and found[0] == tuple(leaf.shape):
                return found[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(place, tree)
