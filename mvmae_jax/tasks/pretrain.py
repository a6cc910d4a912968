"""Pretraining: MV-MAE (masked-patch reconstruction + cross-view InfoNCE) with a masking policy.

The objective lives here: `loss` is what a step minimises, from the losses of
`mvmae_jax.losses`; changing the loss means changing this function (and its config fields).
A batch holds uint8 `views` (B, V, H, W, C), `boxes` (B, V, 4), `flips` (B, V) and `index`
(B,); the views are normalised here, inside the compiled step.
"""

from __future__ import annotations

import logging
import time
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
    """What the training loop needs to pretrain: model, state, gradients, batches, the bank
    refresh at epoch starts, the evaluators' encoder and the pictures."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, train_source: Any):
        self.config = config
        self.mesh = mesh
        self.source = train_source
        self.model = models.build_model(config)
        self.masking = masking.MaskingPolicy(config, self.model, mesh)
        self.phases = self.masking.phases
        self.num_classes = None
        self._contrastive_weight = config.contrastive.weight if self.model.contrastive else 0.0

    # --- State.
    # The AMT bank: split over examples; its own checkpoint item (its padding rows differ
    # between device counts).
    extras_spec = {"bank": ts.ExtraSpec(sharding=bank_lib.bank_spec, item="bank")}

    def init(self, rng: jax.Array) -> tuple[Any, dict[str, Any]]:
        """(parameters, extras) of a fresh run; extras hold the AMT bank when there is one."""
        n_mask, _, n_vis = self.masking.counts(self.phases[0])
        model = self.model
        images = jnp.zeros((1, model.image_size, model.image_size, model.channels), jnp.float32)
        order = jnp.arange(model.num_patches, dtype=jnp.int32)[None]
        masks = masking.Masks(visible=order[:, :n_vis], masked=order[:, n_vis:n_vis + n_mask],
                              thrown=order[:, :0])
        params = model.init(rng, images, masks)["params"]
        extras = ({"bank": bank_lib.init_bank(self.source.num_examples, model.num_patches,
                                              self.mesh)}
                  if self.masking.uses_bank else {})
        return params, extras

    def optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
        return optim.make_optimizer(self.config.optim, schedule)

    def phase_at_epoch(self, epoch: int) -> str:
        return self.masking.phase_at_epoch(epoch)

    def pixels(self, images: jax.Array) -> jax.Array:
        """uint8 images as they leave the host → the model's normalised input."""
        return models.normalise_pixels(images, self.config.input.mean, self.config.input.std)

    # --- The objective.
    def loss(self, params: Any, images: jax.Array, masks: masking.Masks
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metrics) of views (b, V, H, W, C) under masks (b, V, k)."""
        rows, masks = self._rows(images, masks)
        out = self.model.apply({"params": params}, rows, masks)
        rec_loss = self._reconstruction_loss(out["predictions"], rows, masks)
        metrics = {"rec_loss": rec_loss}
        loss = rec_loss
        if self.model.contrastive:
            con_loss, con_top1 = self._contrastive_loss(
                out["embeddings"].reshape(images.shape[0], images.shape[1], -1))
            loss = loss + self._contrastive_weight * con_loss
            metrics.update(con_loss=con_loss, con_top1=con_top1)
        metrics["loss"] = loss
        return loss, metrics

    def _rows(self, images, masks):
        batch, num_views = images.shape[:2]
        rows = images.reshape((batch * num_views,) + images.shape[2:])
        return rows, jax.tree.map(lambda m: m.reshape(batch * num_views, m.shape[-1]), masks)

    def _reconstruction_loss(self, predictions, rows, masks):
        return losses.reconstruction_loss(
            predictions, losses.patchify(rows, self.model.patch_size), masks.masked,
            norm_pix=self.config.norm_pix_loss)

    def _contrastive_loss(self, embeddings):
        return losses.info_nce_loss(embeddings, self.config.contrastive.temperature)

    def gradients(self, params: Any, extras: dict[str, Any], batch: dict[str, jax.Array],
                  rng: jax.Array, phase: str) -> tuple[Any, dict[str, jax.Array], dict]:
        """(gradients, metrics, extras) of one step: masks from the policy, then the loss's
        gradient, over `grad_accum_steps` microbatches when asked."""
        batch = dict(batch, views=self.pixels(batch["views"]))
        masks = self.masking.masks(params, extras.get("bank"), batch, rng, phase)
        images = batch["views"]
        num_micro = self.config.grad_accum_steps
        if num_micro == 1:
            (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(
                params, images, masks)
            return grads, metrics, extras
        micro = ts.split_microbatches((images, masks), num_micro, self.mesh)
        if self.model.contrastive:
            grads, metrics = self._cached_contrastive_gradients(params, micro)
        else:
            def grad_fn(p, microbatch):
                (_, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(p, *microbatch)
                return grads, metrics

            grads, metrics = ts.accumulate_gradients(grad_fn, params, micro)
            grads = jax.tree.map(lambda g: g / num_micro, grads)
            metrics = jax.tree.map(jnp.mean, metrics)
        return grads, metrics, extras

    def _cached_contrastive_gradients(self, params, micro):
        """The gradient of the whole batch's loss, microbatch by microbatch (gradient cache).

        The contrastive loss couples every view of the global batch, so the embeddings of all
        microbatches are computed first (no activations kept), the loss and its gradient with
        respect to each embedding are taken on all of them, and each microbatch then
        back-propagates its reconstruction loss plus <embedding, d loss / d embedding>: the sum
        over microbatches is the gradient of the unaccumulated step.
        """
        num_micro = self.config.grad_accum_steps
        images, masks = micro
        views = images.shape[2]

        def embed(microbatch):
            rows, flat = self._rows(*microbatch)
            return self.model.apply({"params": params}, rows, flat,
                                    method="embeddings").reshape(rows.shape[0] // views,
                                                                 views, -1)

        embeddings = jax.lax.stop_gradient(jax.lax.map(embed, micro))  # (k, b, V, d)

        def contrastive(z):
            return self._contrastive_loss(z.reshape((-1,) + z.shape[2:]))

        (con_loss, con_top1), embedding_grads = jax.value_and_grad(contrastive, has_aux=True)(
            embeddings)

        def grad_fn(p, microbatch):
            micro_images, micro_masks, micro_embedding_grads = microbatch

            def surrogate(p):
                rows, flat = self._rows(micro_images, micro_masks)
                out = self.model.apply({"params": p}, rows, flat)
                rec_loss = self._reconstruction_loss(out["predictions"], rows, flat)
                z = out["embeddings"].reshape(micro_embedding_grads.shape)
                coupling = jnp.sum(z * jax.lax.stop_gradient(micro_embedding_grads))
                return rec_loss / num_micro + self._contrastive_weight * coupling, rec_loss

            return jax.grad(surrogate, has_aux=True)(p)

        grads, rec_losses = ts.accumulate_gradients(grad_fn, params,
                                                    (images, masks, embedding_grads))
        rec_loss = jnp.mean(rec_losses)
        metrics = {"rec_loss": rec_loss, "con_loss": con_loss, "con_top1": con_top1,
                   "loss": rec_loss + self._contrastive_weight * con_loss}
        return grads, metrics

    # --- Input and epoch starts.
    def train_batches(self, start_position: int, should_stop=None):
        from mvmae_jax import input_pipeline  # TensorFlow: not needed to build the step alone

        return input_pipeline.train_batches(self.config, self.mesh, self.source,
                                            start_position=start_position,
                                            should_stop=should_stop)

    def make_epoch_start(self, state_sharding: ts.TrainState):
        """A function (state, epoch) → (state, scalars to log): rebuilds the AMT bank at the
        epochs the policy says, from the whole images of every training example."""
        if not self.masking.uses_bank:
            return None
        from mvmae_jax import input_pipeline  # TensorFlow: not needed to build the step alone

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
            for batch in input_pipeline.eval_batches(self.config, self.mesh, self.source,
                                                     self.config.batch_size, mode="bank"):
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
        """Final-norm tokens (B, 1 + N, D) of the encoder, all patches visible, of uint8
        images."""
        return self.model.apply({"params": params}, self.pixels(images),
                                method=lambda module, x: module.encoder(x)["tokens"])

    logits = None

    def make_pictures(self, state_sharding: ts.TrainState):
        """A function (state, batch, rng, phase, step) → uint8 RGB grid of the first examples
        (what the encoder saw, the reconstruction, the attention weights that chose the masks),
        titled with the step and the phase, or None when off."""
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
