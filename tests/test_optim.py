"""The MAE optimisation recipe: learning-rate schedule and weight-decay mask."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from helpers import tiny_config

from mvmae_jax import masking, models, optim


def _optim_config(**kw):
    base = dict(base_lr=1.5e-4, b1=0.9, b2=0.95, weight_decay=0.05, warmup_epochs=1,
                grad_clip_norm=0.0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def test_schedule_warmup_then_cosine_to_zero():
    """Peak = base_lr * batch / 256; linear warm-up; half-cosine reaching 0 at the end."""
    schedule = optim.learning_rate_schedule(_optim_config(), global_batch=512, warmup_steps=10,
                                            total_steps=100)
    peak = 1.5e-4 * 512 / 256
    expected = {0: 0.0, 5: peak / 2, 10: peak, 55: peak / 2, 100: 0.0,
                32: peak * 0.5 * (1 + np.cos(np.pi * 22 / 90))}
    for step, value in expected.items():
        np.testing.assert_allclose(float(schedule(step)), value, rtol=1e-5, atol=1e-12)


def test_weight_decay_only_on_kernels():
    """With zero gradients AdamW moves exactly the kernels, by -lr * wd * p; nothing else."""
    model = models.build_model(tiny_config())
    images = jnp.zeros((1, 16, 16, 3))
    masks = masking.random_masking(jax.random.PRNGKey(0), batch_size=1, num_patches=16,
                                   num_masked=8)
    params = model.init(jax.random.PRNGKey(1), images, masks)["params"]
    lr, wd = 0.1, 0.05
    tx = optim.make_optimizer(_optim_config(weight_decay=wd), optax.constant_schedule(lr))
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    flat_old = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_new = jax.tree.leaves(new)
    decayed = set()
    for (path, old), updated in zip(flat_old, flat_new, strict=True):
        name = jax.tree_util.keystr(path)
        if path[-1].key == "kernel":
            np.testing.assert_allclose(updated, old * (1 - lr * wd), rtol=1e-6, err_msg=name)
            decayed.add(name)
        else:
            np.testing.assert_array_equal(updated, old, err_msg=name)
    assert any("embedding" in n for n in decayed) and any("decoder_pred" in n for n in decayed)
    mask = optim.weight_decay_mask(params)
    assert not mask["encoder"]["cls"] and not mask["decoder"]["mask_token"]


def test_clipping_rescales_gradients_before_adamw():
    """With grad_clip_norm, AdamW sees globally clipped gradients; without, it does not."""
    def run(tx, grads_seq):
        params = {"w": {"kernel": jnp.ones((3,))}}
        state = tx.init(params)
        for grads in grads_seq:
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params["w"]["kernel"]

    # Two steps of different norms: Adam is invariant to one common scale, not to two.
    raw = [{"w": {"kernel": jnp.array([30.0, 40.0, 0.0])}},
           {"w": {"kernel": jnp.array([0.3, -0.1, 0.2])}}]
    clipped = [jax.tree.map(lambda leaf, g=g: leaf / jnp.maximum(optax.tree.norm(g), 1.0), g)
               for g in raw]
    plain = optim.make_optimizer(_optim_config(weight_decay=0.0), optax.constant_schedule(0.1))
    clipping = optim.make_optimizer(_optim_config(grad_clip_norm=1.0, weight_decay=0.0),
                                    optax.constant_schedule(0.1))
    np.testing.assert_allclose(run(clipping, raw), run(plain, clipped), rtol=1e-6)
    assert not np.allclose(run(plain, raw), run(plain, clipped), rtol=1e-4)
