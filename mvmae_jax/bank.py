"""The AMT attention bank: one whole-image attention map per training example, (examples, N)
float32, split over examples along the mesh. Lookups and updates gather the batch's indices on
every device, which serves the rows it owns: only the batch's rows cross devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from mvmae_jax import sharding


def bank_size(num_examples: int, mesh: Mesh) -> int:
    """Rows of the bank: the example count rounded up to a multiple of the device count."""
    return -(-num_examples // mesh.size) * mesh.size


def init_bank(num_examples: int, num_patches: int, mesh: Mesh) -> jax.Array:
    """A bank of uniform maps (AMT on uniform weights is random masking), split over examples."""
    return jnp.ones((bank_size(num_examples, mesh), num_patches), jnp.float32)


def bank_spec(mesh: Mesh) -> PartitionSpec:
    return PartitionSpec(mesh.axis_names, None)


def _local_rows(all_indices: jax.Array, rows_per_shard: int, axes) -> tuple[jax.Array, jax.Array]:
    """This shard's row of each global index, and whether the shard owns it."""
    first_row = jax.lax.axis_index(axes) * rows_per_shard
    local = all_indices - first_row
    return local, (local >= 0) & (local < rows_per_shard)


def bank_lookup(bank: jax.Array, indices: jax.Array, mesh: Mesh) -> jax.Array:
    """bank[indices] for a batch split over the mesh: (B,) int → (B, N), split like the batch."""
    axes = mesh.axis_names

    def lookup(bank_shard, index_shard):
        all_indices = jax.lax.all_gather(index_shard, axes, tiled=True)
        local, owned = _local_rows(all_indices, bank_shard.shape[0], axes)
        rows = bank_shard[jnp.clip(local, 0, bank_shard.shape[0] - 1)]
        rows = jnp.where(owned[:, None], rows, 0.0)
        # Exactly one shard owns each index, so the sum is the row itself.
        return jax.lax.psum_scatter(rows, axes, scatter_dimension=0, tiled=True)

    return jax.shard_map(lookup, mesh=mesh, in_specs=(bank_spec(mesh), sharding.batch_spec(mesh)),
                         out_specs=bank_spec(mesh))(bank, indices)


def bank_update(bank: jax.Array, indices: jax.Array, maps: jax.Array, mesh: Mesh) -> jax.Array:
    """bank with rows `indices` set to `maps`; indices outside the bank (e.g. -1 padding) skip."""
    axes = mesh.axis_names

    def update(bank_shard, index_shard, map_shard):
        all_indices = jax.lax.all_gather(index_shard, axes, tiled=True)
        all_maps = jax.lax.all_gather(map_shard.astype(bank_shard.dtype), axes, tiled=True)
        rows = bank_shard.shape[0]
        local, owned = _local_rows(all_indices, rows, axes)
        return bank_shard.at[jnp.where(owned, local, rows)].set(all_maps, mode="drop")

    return jax.shard_map(
        update, mesh=mesh,
        in_specs=(bank_spec(mesh), sharding.batch_spec(mesh), bank_spec(mesh)),
        out_specs=bank_spec(mesh))(bank, indices, maps)
