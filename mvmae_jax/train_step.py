"""Train state and the compiled steps: pretraining (one per masking phase) and bank refresh.

A pretraining batch is a dict of global arrays split over the mesh along the batch:
  views  (B, V, H, W, C) float, normalised; V = 1 (MAE) or 2 (MV-MAE)
  boxes  (B, V, 4) float, each view's crop (top, left, height, width) in source fractions
  flips  (B, V) int, each view's horizontal flip
  index  (B,) int, the example's stable index (its row in the AMT bank)
A bank-refresh batch holds `image` (B, H, W, C), the whole example resized, and `index`
(B,), with -1 for padding rows.

Masking runs in the compiled step. AMT with the bank has two phases of different static
shapes: `random` (warm-up: random masking at `amt.warmup_mask_ratio`, nothing thrown) and
`amt` (attention-driven masking and throwing). The host loop picks the step per epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from mvmae_jax import bank as bank_lib
from mvmae_jax import losses, masking, sharding
from mvmae_jax.models import MVMAE

RANDOM_PHASE = "random"
AMT_PHASE = "amt"


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # base PRNG key; each step folds in its step number
    bank: jax.Array | None  # (bank_size, N) AMT maps, or None without a bank


def uses_bank(config: ml_collections.ConfigDict) -> bool:
    return config.masking.strategy == "amt" and config.amt.source == "bank"


def phases(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The phases that a config's run goes through, in order."""
    if config.masking.strategy == "random":
        return (RANDOM_PHASE,)
    if config.masking.strategy == "amt":
        return (RANDOM_PHASE, AMT_PHASE) if config.amt.start_epoch > 0 else (AMT_PHASE,)
    raise ValueError(f"masking.strategy must be 'random' or 'amt', got "
                     f"{config.masking.strategy!r}")


def phase_at_epoch(config: ml_collections.ConfigDict, epoch: int) -> str:
    if config.masking.strategy == "amt" and epoch >= config.amt.start_epoch:
        return AMT_PHASE
    return RANDOM_PHASE


def bank_refresh_due(config: ml_collections.ConfigDict, epoch: int) -> bool:
    """Whether the bank is rebuilt at the start of `epoch` (AMT: every 40 epochs from 40)."""
    if not uses_bank(config) or epoch < config.amt.start_epoch:
        return False
    return (epoch - config.amt.start_epoch) % config.amt.refresh_every == 0


def phase_counts(config: ml_collections.ConfigDict, num_patches: int,
                 phase: str) -> tuple[int, int, int]:
    """(n_mask, n_throw, n_vis) of a phase; raises ValueError if no patch stays visible."""
    if phase == RANDOM_PHASE and config.masking.strategy == "amt":
        return masking.mask_counts(num_patches, config.amt.warmup_mask_ratio, 0.0)
    return masking.mask_counts(num_patches, config.masking.mask_ratio,
                               config.masking.throw_ratio)


def create_train_state(config: ml_collections.ConfigDict, model: MVMAE,
                       optimizer: optax.GradientTransformation, mesh: Mesh,
                       num_examples: int) -> TrainState:
    """Initialises the state directly in its sharding (no host copy of the parameters)."""
    n_mask, _, n_vis = phase_counts(config, model.num_patches, phases(config)[0])

    def init(seed):
        params_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
        images = jnp.zeros((1, model.image_size, model.image_size, model.channels), jnp.float32)
        order = jnp.arange(model.num_patches, dtype=jnp.int32)[None]
        masks = masking.Masks(visible=order[:, :n_vis], masked=order[:, n_vis:n_vis + n_mask],
                              thrown=order[:, :0])
        params = model.init(params_rng, images, masks)["params"]
        bank = (bank_lib.init_bank(num_examples, model.num_patches, mesh)
                if uses_bank(config) else None)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=state_rng, bank=bank)

    shapes = jax.eval_shape(init, config.seed)
    return jax.jit(init, static_argnums=0,
                   out_shardings=state_shardings(shapes, mesh, config))(config.seed)


def state_shardings(state: TrainState, mesh: Mesh,
                    config: ml_collections.ConfigDict | None = None) -> TrainState:
    """The state's shardings: parameters as `config.sharding` says (replicated without a
    config), the optimizer state's moments like their parameters, the bank split over
    examples, everything else replicated."""
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    params = sharding.param_shardings(state.params, mesh,
                                      None if config is None else config.sharding)
    shardings = shardings.replace(
        params=params,
        opt_state=sharding.follow_params(state.opt_state, state.params, params, mesh))
    if state.bank is not None:
        shardings = shardings.replace(bank=NamedSharding(mesh, bank_lib.bank_spec(mesh)))
    return shardings


def _split_microbatches(tree: Any, num_micro: int, mesh: Mesh) -> Any:
    """(B, ...) → (num_micro, B / num_micro, ...), each microbatch spread over all devices.

    Microbatch j takes examples j, j + k, j + 2k, ... so that every device keeps its own
    examples and no data moves.
    """
    def split(x):
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, mesh.axis_names)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(split, tree)


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the step about to run: a function of the step number alone, so that a
    resumed run draws the same masks as an uninterrupted one."""
    return jax.random.fold_in(state.rng, state.step)


def make_loss_fn(config: ml_collections.ConfigDict, model: MVMAE) -> Callable:
    """loss_fn(params, images (b, V, H, W, C), masks (b, V, k)) → (loss, metrics)."""
    contrastive_weight = config.contrastive.weight if model.contrastive else 0.0

    def loss_fn(params, images, masks):
        batch, num_views = images.shape[:2]
        rows = images.reshape((batch * num_views,) + images.shape[2:])
        masks = jax.tree.map(lambda m: m.reshape(batch * num_views, m.shape[-1]), masks)
        out = model.apply({"params": params}, rows, masks)
        rec_loss = losses.reconstruction_loss(
            out["predictions"], losses.patchify(rows, model.patch_size), masks.masked,
            norm_pix=config.norm_pix_loss)
        metrics = {"rec_loss": rec_loss}
        loss = rec_loss
        if model.contrastive:
            con_loss, con_top1 = losses.info_nce_loss(
                out["embeddings"].reshape(batch, num_views, -1), config.contrastive.temperature)
            loss = loss + contrastive_weight * con_loss
            metrics.update(con_loss=con_loss, con_top1=con_top1)
        metrics["loss"] = loss
        return loss, metrics

    return loss_fn


def amt_weights(config: ml_collections.ConfigDict, model: MVMAE, mesh: Mesh, params: Any,
                bank: jax.Array | None, batch: dict[str, jax.Array]) -> jax.Array:
    """(B * V, N) AMT weights of every view, without gradient: the bank map aligned to the
    view's crop and flip, or the current encoder's map of the view (`amt.source`)."""
    views = batch["views"]
    rows = views.shape[0] * views.shape[1]
    if config.amt.source == "bank":
        maps = bank_lib.bank_lookup(bank, batch["index"], mesh)
        weights = masking.align_bank_maps(maps, batch["boxes"], batch["flips"], model.grid_size)
    elif config.amt.source == "online":
        images = views.reshape((rows,) + views.shape[2:])
        weights = model.apply({"params": params}, images, method=MVMAE.attention_maps)
    else:
        raise ValueError(f"amt.source must be 'bank' or 'online', got {config.amt.source!r}")
    return jax.lax.stop_gradient(weights.reshape(rows, model.num_patches))


def make_masks(config: ml_collections.ConfigDict, model: MVMAE, phase: str, mesh: Mesh,
               params: Any, bank: jax.Array | None, batch: dict[str, jax.Array],
               rng: jax.Array) -> masking.Masks:
    """The masks of every view of the batch, (B, V, k) each."""
    batch_size, num_views = batch["views"].shape[:2]
    rows = batch_size * num_views
    num_patches = model.num_patches
    n_mask, n_throw, _ = phase_counts(config, num_patches, phase)
    if phase == AMT_PHASE:
        weights = amt_weights(config, model, mesh, params, bank, batch)
        masks = masking.amt_masking(rng, weights, num_masked=n_mask, num_thrown=n_throw)
    elif n_throw:
        # Random throwing (the AMT ablation): sampling on equal weights is a uniform order.
        masks = masking.amt_masking(rng, jnp.ones((rows, num_patches)), num_masked=n_mask,
                                    num_thrown=n_throw)
    else:
        masks = masking.random_masking(rng, batch_size=rows, num_patches=num_patches,
                                       num_masked=n_mask)
    return jax.tree.map(lambda m: m.reshape(batch_size, num_views, m.shape[-1]), masks)


def make_train_step(config: ml_collections.ConfigDict, model: MVMAE,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh: Mesh, state_sharding: TrainState,
                    phase: str) -> Callable[[TrainState, dict], tuple]:
    """The compiled step of one phase: (state, batch) → (state, metrics); the state is donated.

    Metrics (replicated scalars): loss, rec_loss, con_loss, con_top1 (with a contrastive head),
    grad_norm (before clipping), lr (of this step).
    """
    loss_fn = make_loss_fn(config, model)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    num_micro = config.get("grad_accum_steps", 1)
    if config.batch_size % num_micro:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by "
                         f"grad_accum_steps={num_micro}")

    def compute_grads(params, images, masks):
        if num_micro == 1:
            (_, metrics), grads = grad_fn(params, images, masks)
            return grads, metrics
        micro = _split_microbatches((images, masks), num_micro, mesh)

        def accumulate(grad_sum, micro_batch):
            (_, metrics), grads = grad_fn(params, *micro_batch)
            return jax.tree.map(jnp.add, grad_sum, grads), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        grad_sum, metrics = jax.lax.scan(accumulate, zeros, micro)
        grads = jax.tree.map(lambda g: g / num_micro, grad_sum)
        return grads, jax.tree.map(jnp.mean, metrics)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        step_rng = step_key(state)
        masks = make_masks(config, model, phase, mesh, state.params, state.bank, batch,
                           step_rng)
        grads, metrics = compute_grads(state.params, batch["views"], masks)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return jax.jit(train_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=0)


def make_bank_refresh_step(model: MVMAE, mesh: Mesh, state_sharding: TrainState
                           ) -> Callable[[TrainState, dict], TrainState]:
    """Compiled (state, {image, index}) → state with those examples' bank rows recomputed."""
    def refresh(state: TrainState, batch: dict[str, jax.Array]) -> TrainState:
        maps = model.apply({"params": state.params}, batch["image"],
                           method=MVMAE.attention_maps)
        return state.replace(bank=bank_lib.bank_update(state.bank, batch["index"], maps, mesh))

    return jax.jit(refresh, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=state_sharding, donate_argnums=0)

