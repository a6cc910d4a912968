"""Pretraining: MV-MAE (masked-patch reconstruction + cross-view InfoNCE) under a masking
policy; the objective is `loss_from_outputs`."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from mvmae_jax import bank as bank_lib
from mvmae_jax import losses, masking, models, optim, sharding, visualize
from mvmae_jax import train_step as ts


class PretrainTask:
    """Pretraining as a `tasks.Task`: model, state, gradients, the AMT bank refresh, pictures."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, train_source: Any):
        self.config = config
        self.mesh = mesh
        self.source = train_source
        self.model = models.build_model(config)
        # uint8 images as they leave the host → the model's normalised input.
        self.pixels = functools.partial(models.normalise_pixels, mean=config.input.mean,
                                        std=config.input.std)
        self.masking = masking.MaskingPolicy(config, self.model, mesh)
        self.phases = self.masking.phases
        self.num_classes = None
        self._contrastive_weight = config.contrastive.weight if self.model.contrastive else 0.0

    # --- State.
    # The AMT bank: split over examples, in its own checkpoint item (padding differs by mesh).
    extras_spec = {"bank": ts.ExtraSpec(sharding=bank_lib.bank_spec, item="bank")}

    def init(self, rng: jax.Array) -> tuple[Any, dict[str, Any]]:
        """(parameters, extras) of a fresh run; extras hold the AMT bank when there is one."""
        n_mask, n_throw, _ = self.masking.counts(self.phases[0])
        model = self.model
        images = jnp.zeros((1, model.image_size, model.image_size, model.channels), jnp.float32)
        masks = masking.split_order(jnp.arange(model.num_patches)[None], n_mask, n_throw)
        params = model.init(rng, images, masks)["params"]
        extras = ({"bank": bank_lib.init_bank(self.source.num_examples, model.num_patches,
                                              self.mesh)}
                  if self.masking.uses_bank else {})
        return params, extras

    def optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
        return optim.make_optimizer(self.config.optim, schedule)

    def phase_at_epoch(self, epoch: int) -> str:
        return self.masking.phase_at_epoch(epoch)

    # --- The objective.
    def _rows(self, images, masks):
        """Views (b, V, ...) and masks (b, V, k) → one row per view."""
        batch, num_views = images.shape[:2]
        rows = images.reshape((batch * num_views,) + images.shape[2:])
        return rows, jax.tree.map(lambda m: m.reshape(batch * num_views, m.shape[-1]), masks)

    def forward(self, params: Any, images: jax.Array, masks: masking.Masks) -> dict[str, jax.Array]:
        """The model on views (b, V, H, W, C) under masks (b, V, k): `predictions`, their
        `targets` and `masked` indices per view row, and `embeddings` (b, V, d) if contrastive."""
        rows, flat = self._rows(images, masks)
        out = dict(self.model.apply({"params": params}, rows, flat),
                   targets=losses.patchify(rows, self.model.patch_size), masked=flat.masked)
        if "embeddings" in out:
            out["embeddings"] = out["embeddings"].reshape(images.shape[:2] + (-1,))
        return out

    def loss_from_outputs(self, out: dict[str, jax.Array]
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metrics) of `forward`'s outputs: reconstruction plus weighted InfoNCE."""
        rec_loss = losses.reconstruction_loss(out["predictions"], out["targets"], out["masked"],
                                              norm_pix=self.config.norm_pix_loss)
        metrics = {"rec_loss": rec_loss, "loss": rec_loss}
        if self.model.contrastive:
            con_loss, con_top1 = losses.info_nce_loss(out["embeddings"],
                                                      self.config.contrastive.temperature)
            metrics.update(con_loss=con_loss, con_top1=con_top1,
                           loss=rec_loss + self._contrastive_weight * con_loss)
        return metrics["loss"], metrics

    def loss(self, params: Any, images: jax.Array, masks: masking.Masks
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metrics) of views (b, V, H, W, C) under masks (b, V, k)."""
        return self.loss_from_outputs(self.forward(params, images, masks))

    def gradients(self, params: Any, extras: dict[str, Any], batch: dict[str, jax.Array],
                  rng: jax.Array, phase: str) -> tuple[Any, dict[str, jax.Array], dict]:
        """(gradients, metrics, extras): masks from the policy, then the loss's gradient,
        averaged over `grad_accum_steps` microbatches."""
        batch = dict(batch, views=self.pixels(batch["views"]))
        masks = self.masking.masks(params, extras.get("bank"), batch, rng, phase)
        images = batch["views"]
        num_micro = self.config.grad_accum_steps
        if num_micro == 1:
            (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(params, images, masks)
            return grads, metrics, extras
        micro = ts.split_microbatches((images, masks), num_micro, self.mesh)
        cached = self._embeddings(params, *micro) if self.model.contrastive else None

        def micro_loss(p, images, masks, index):
            out = self.forward(p, images, masks)
            if cached is not None:
                # Gradient cache: InfoNCE couples the whole batch, so it sees every
                # microbatch's embeddings, the others' as constants. Scaled by num_micro,
                # this microbatch's share survives the mean below.
                z = out["embeddings"]
                live = jax.lax.stop_gradient(z) + num_micro * (z - jax.lax.stop_gradient(z))
                out["embeddings"] = jax.lax.dynamic_update_index_in_dim(
                    cached, live, index, 0).reshape((-1,) + z.shape[1:])
            return self.loss_from_outputs(out)

        def grad_fn(p, microbatch):
            (_, metrics), grads = jax.value_and_grad(micro_loss, has_aux=True)(p, *microbatch)
            return grads, metrics

        grads, metrics = ts.accumulate_gradients(grad_fn, params, (*micro, jnp.arange(num_micro)))
        grads = jax.tree.map(lambda g: g / num_micro, grads)
        return grads, jax.tree.map(jnp.mean, metrics), extras

    def _embeddings(self, params, images, masks):
        """Embeddings (k, b, V, d) of every microbatch, encoder only, no activations kept."""
        def embed(microbatch):
            rows, flat = self._rows(*microbatch)
            z = self.model.apply({"params": params}, rows, flat, method="embeddings")
            return z.reshape(microbatch[0].shape[:2] + (-1,))

        return jax.lax.stop_gradient(jax.lax.map(embed, (images, masks)))

    # --- Epoch starts.
    def make_epoch_start(self, state_sharding: ts.TrainState, bank_batches: Iterable[dict]):
        """(state, epoch) → (state, scalars) that rebuilds the AMT bank when the policy says,
        from `bank_batches` (whole images of every example)."""
        if not self.masking.uses_bank:
            return None
        policy = self.masking

        def refresh(state: ts.TrainState, batch: dict[str, jax.Array]) -> ts.TrainState:
            batch = dict(batch, image=self.pixels(batch["image"]))
            bank = policy.refresh_bank(state.params, state.extras["bank"], batch)
            return state.replace(extras=dict(state.extras, bank=bank))

        refresh = jax.jit(refresh,
                          in_shardings=(state_sharding, sharding.batch_sharding(self.mesh)),
                          out_shardings=state_sharding, donate_argnums=0)

        def epoch_start(state: ts.TrainState, epoch: int):
            if not policy.bank_refresh_due(epoch):
                return state, {}
            started = time.time()
            for batch in bank_batches:
                state = refresh(state, {"image": batch["image"], "index": batch["index"]})
            jax.block_until_ready(state.extras["bank"])
            seconds = time.time() - started
            logging.info("Refreshed the AMT bank (%d maps) at epoch %d in %.1fs.",
                         self.source.num_examples, epoch, seconds)
            return state, {"amt/bank_refresh_s": seconds}

        return epoch_start

    # --- What evaluators and pictures see.
    def eval_params(self, state: ts.TrainState) -> Any:
        return state.params

    def encode(self, params: Any, images: jax.Array) -> jax.Array:
        """Final-norm tokens (B, 1 + N, D) of uint8 images, all patches visible."""
        return self.model.apply({"params": params}, self.pixels(images),
                                method=lambda module, x: module.encoder(x)["tokens"])

    logits = None

    def make_pictures(self, state_sharding: ts.TrainState):
        """(state, batch, rng, phase, step) → uint8 RGB grid of the first examples (inputs,
        reconstructions, the attention that chose the masks), or None when off."""
        if self.config.image_every_steps <= 0:
            return None
        compiled = {phase: visualize.make_visualize_fn(self.config, self.model, self.masking,
                                                       self.mesh, state_sharding, phase)
                    for phase in self.phases}
        config, model = self.config, self.model

        def pictures(state, batch, rng, phase, step):
            out = jax.device_get(compiled[phase](state, batch, rng))
            return visualize.grid_image(out, config.views.num, model.patch_size,
                                        model.grid_size, config.input.mean, config.input.std,
                                        config.norm_pix_loss, step=step, phase=phase)

        return pictures
