"""The AMT bank: sharded lookups and updates against plain numpy indexing."""

import jax
import numpy as np
import pytest

from mvmae_jax import bank as bank_lib
from mvmae_jax import sharding


@pytest.mark.parametrize("num_devices", [1, 2, 8])
def test_lookup_matches_numpy_indexing(num_devices):
    """Any example, wherever its shard, comes back to the device that holds its batch row."""
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    rng = np.random.default_rng(0)
    num_examples, num_patches = 37, 6
    size = bank_lib.bank_size(num_examples, mesh)
    assert size % num_devices == 0 and size >= num_examples
    table = rng.random((size, num_patches)).astype(np.float32)
    indices = rng.permutation(num_examples)[:16].astype(np.int32)
    bank = jax.device_put(table, jax.sharding.NamedSharding(mesh, bank_lib.bank_spec(mesh)))
    lookup = jax.jit(lambda b, i: bank_lib.bank_lookup(b, i, mesh))
    rows = lookup(bank, sharding.shard_batch(indices, mesh))
    np.testing.assert_array_equal(np.asarray(rows), table[indices])
    assert rows.sharding.spec == bank_lib.bank_spec(mesh)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_update_sets_rows_and_skips_padding(num_devices):
    """Rows of the batch's indices are replaced; -1 padding rows change nothing."""
    mesh = sharding.make_mesh(jax.devices()[:num_devices])
    rng = np.random.default_rng(1)
    size = bank_lib.bank_size(30, mesh)
    table = rng.random((size, 5)).astype(np.float32)
    indices = np.array([3, 29, 0, 17, -1, 8, -1, 12], np.int32)
    maps = rng.random((8, 5)).astype(np.float32)
    bank = jax.device_put(table, jax.sharding.NamedSharding(mesh, bank_lib.bank_spec(mesh)))
    update = jax.jit(lambda b, i, m: bank_lib.bank_update(b, i, m, mesh))
    new = np.asarray(update(bank, sharding.shard_batch(indices, mesh),
                            sharding.shard_batch(maps, mesh)))
    expected = table.copy()
    for index, row in zip(indices, maps, strict=True):
        if index >= 0:
            expected[index] = row
    np.testing.assert_array_equal(new, expected)


def test_init_bank_is_uniform_and_padded():
    """A fresh bank holds uniform weights for a device-count multiple of examples."""
    mesh = sharding.make_mesh(jax.devices()[:8])
    bank = bank_lib.init_bank(13, 4, mesh)
    assert bank.shape == (16, 4)
    np.testing.assert_array_equal(np.asarray(bank), 1.0)
