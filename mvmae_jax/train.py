"""The pretraining loop, top to bottom: set-up, mesh, input, model and optimizer, sharded state,
compiled steps, checkpoint, loop.

Every process of a multi-host run executes this same code on its own part of the data; the
compiled steps see global arrays over all devices. Only process 0 writes metrics and pictures;
every process writes its part of each checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from clu import parameter_overview, periodic_actions

from mvmae_jax import (
    checkpointing,
    config_lib,
    input_pipeline,
    knn,
    metrics_io,
    models,
    optim,
    sharding,
    visualize,
)
from mvmae_jax import train_step as ts


class PreemptionWatcher:
    """Becomes true after SIGTERM (SLURM, GCE) or at orbax's preemption sync point (TPU
    maintenance events; on multi-host runs every host reaches it at the same step)."""

    def __init__(self, manager):
        self._manager = manager
        self._signalled = False
        if jax.process_count() == 1:
            # Multi-host runs leave SIGTERM to JAX's preemption service, which syncs hosts.
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: checkpointing after this step, then exiting.")
        self._signalled = True

    def should_stop(self, step: int) -> bool:
        return self._signalled or self._manager.reached_preemption(step)


def check_finite(metrics: dict, step: int) -> None:
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(
            f"The loss is {loss} at step {step}; stopping without writing a checkpoint. "
            "Lower config.optim.base_lr, set config.optim.grad_clip_norm (e.g. 1.0) or use "
            "config.model.dtype='float32'; the run resumes from the last good checkpoint.")


def make_knn_monitor(config: ml_collections.ConfigDict, model, mesh,
                     train_source) -> knn.KnnEvaluator | None:
    """The kNN monitor of a config, or None when it is off or the data has no labels."""
    if config.eval_every_steps < 0:
        return None
    eval_source = input_pipeline.make_source(config, train=False,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count())
    num_classes = train_source.num_classes
    if not num_classes or eval_source.num_classes != num_classes:
        logging.warning("No kNN monitor: the train and eval splits need the same labelled "
                        "classes (set config.eval_every_steps=-1 to silence this).")
        return None
    batch_size = config.knn.batch_size or config.batch_size
    return knn.KnnEvaluator(
        knn.encoder_tokens(model), mesh,
        lambda: input_pipeline.eval_batches(config, mesh, train_source, batch_size,
                                            max_examples=config.knn.train_examples),
        lambda: input_pipeline.eval_batches(config, mesh, eval_source, batch_size),
        num_classes=num_classes, k=config.knn.k, temperature=config.knn.temperature,
        pool=config.knn.feature)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> ts.TrainState:
    """Pretrains as `config` says, in (or resuming from) `workdir`; returns the final state."""
    # --- Set-up and checks, before anything is compiled.
    tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators are JAX's.
    config_lib.validate(config, jax.device_count(), jax.process_count())
    is_chief = jax.process_index() == 0

    # --- Mesh and input.
    mesh = sharding.make_mesh()
    source = input_pipeline.make_source(config, process_index=jax.process_index(),
                                        process_count=jax.process_count())
    steps_per_epoch = source.num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise config_lib.ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {source.num_examples} training "
            "examples")
    total_steps = (config.total_steps if config.total_steps > 0
                   else config.total_epochs * steps_per_epoch)
    warmup_steps = int(config.optim.warmup_epochs * steps_per_epoch)

    # --- Model and optimizer.
    model = models.build_model(config)
    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, warmup_steps,
                                            total_steps)
    optimizer = optim.make_optimizer(config.optim, schedule)

    # --- Sharded state, restored from the latest checkpoint if there is one.
    state = ts.create_train_state(config, model, optimizer, mesh, source.num_examples)
    state_sharding = ts.state_shardings(state, mesh, config)
    manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"),
                                         config.keep_checkpoints)
    position = 0
    restored = checkpointing.restore_latest(manager, state)
    if restored is not None:
        state, row, start_step = restored
        position = (checkpointing.position_from_row(row, source.host_size) if row is not None
                    else (start_step // steps_per_epoch) * source.host_size)
    start_step = int(jax.device_get(state.step))
    writer = metrics_io.create_writer(workdir, start_step if restored is not None else None)
    if is_chief:
        tf.io.gfile.makedirs(workdir)
        with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        logging.info("Config:\n%s", config)
        if restored is None:
            # Statistics fetch every value to this host: not possible for parameters split
            # over several hosts (FSDP), whose shardings are shown instead.
            local = all(x.is_fully_addressable for x in jax.tree.leaves(state.params))
            parameter_overview.log_parameter_overview(
                state.params, include_stats=True if local else "sharding")
    logging.info("%d devices, %d processes; %d steps of %d images (%d per epoch); starting at "
                 "step %d.", jax.device_count(), jax.process_count(), total_steps,
                 config.batch_size, steps_per_epoch, start_step)

    # --- Compiled steps.
    steps = {phase: ts.make_train_step(config, model, optimizer, schedule, mesh, state_sharding,
                                       phase) for phase in ts.phases(config)}
    refresh = (ts.make_bank_refresh_step(model, mesh, state_sharding)
               if ts.uses_bank(config) else None)
    pictures = ({phase: visualize.make_visualize_fn(config, model, mesh, state_sharding, phase)
                 for phase in ts.phases(config)} if config.image_every_steps > 0 else {})
    knn_monitor = make_knn_monitor(config, model, mesh, source)

    def refresh_bank(state: ts.TrainState, epoch: int) -> ts.TrainState:
        started = time.time()
        for batch in input_pipeline.eval_batches(config, mesh, source, config.batch_size,
                                                 mode="bank"):
            state = refresh(state, {"image": batch["image"], "index": batch["index"]})
        jax.block_until_ready(state.bank)
        seconds = time.time() - started
        logging.info("Refreshed the AMT bank (%d maps) at epoch %d in %.1fs.",
                     source.num_examples, epoch, seconds)
        writer.write_scalars(int(jax.device_get(state.step)), {"amt/bank_refresh_s": seconds})
        return state

    def write_pictures(state, batch, rng, phase, step):
        out = jax.device_get(pictures[phase](state, batch, rng))
        image = visualize.grid_image(out, config.views.num, model.patch_size, model.grid_size,
                                     config.input.mean, config.input.std, config.norm_pix_loss)
        writer.write_images(step, {"views": image[None]})
        if is_chief:
            folder = os.path.join(workdir, "images")
            tf.io.gfile.makedirs(folder)
            with tf.io.gfile.GFile(os.path.join(folder, f"step_{step:07d}.png"), "wb") as f:
                f.write(visualize.to_png(image, scale=max(1, 128 // config.img_size)))

    # --- The loop.
    batches = input_pipeline.train_batches(config, mesh, source, start_position=position)
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps)
    preemption = PreemptionWatcher(manager)
    started = time.time()
    for step in range(start_step, total_steps):
        epoch = step // steps_per_epoch
        if refresh is not None and step % steps_per_epoch == 0 and ts.bank_refresh_due(
                config, epoch):
            state = refresh_bank(state, epoch)
        phase = ts.phase_at_epoch(config, epoch)
        batch, position = next(batches)
        done = step + 1
        picture_due = bool(pictures) and (done % config.image_every_steps == 0
                                          or done == total_steps)
        # Taken before the step: the key that drew its masks.
        step_rng = ts.step_key(state) if picture_due else None
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = steps[phase](state, batch)
        report(done)

        if done % config.log_every_steps == 0 or done == total_steps:
            values = jax.device_get(metrics)
            check_finite(values, done)
            scalars = {f"train/{k}": v for k, v in values.items()}
            scalars["train/epoch"] = done / steps_per_epoch
            writer.write_scalars(done, scalars)
            rate = (done - start_step) / max(time.time() - started, 1e-9)
            logging.info(
                "step %d/%d (epoch %.1f, %s) loss %.4f rec %.4f%s | %.2f steps/s, %.0fs left",
                done, total_steps, done / steps_per_epoch, phase, values["loss"],
                values["rec_loss"],
                f" con {values['con_loss']:.4f} top1 {values['con_top1']:.3f}"
                if "con_loss" in values else "", rate, (total_steps - done) / rate)
        if picture_due:
            write_pictures(state, batch, step_rng, phase, done)
        if knn_monitor is not None and (done == total_steps or (
                config.eval_every_steps > 0 and done % config.eval_every_steps == 0)):
            writer.write_scalars(done, knn_monitor(state.params))

        stop = preemption.should_stop(done)
        if done % config.checkpoint_every_steps == 0 or done == total_steps or stop:
            check_finite(jax.device_get(metrics), done)
            checkpointing.save(manager, state, checkpointing.gather_positions(
                position, source.host_size), force=stop)
        if stop:
            logging.warning("Stopping at step %d for preemption; the checkpoint resumes it.",
                            done)
            break

    manager.wait_until_finished()
    manager.close()
    batches.close()
    writer.flush()
    if is_chief and int(jax.device_get(state.step)) == total_steps:
        summary = {"step": total_steps, "seconds": time.time() - started}
        with tf.io.gfile.GFile(os.path.join(workdir, "done.json"), "w") as f:
            f.write(json.dumps(summary))
    return state
