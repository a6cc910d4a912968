"""The linear-probe and fine-tuning loop, top to bottom: set-up, pretrained encoder, mesh,
input, model and optimizer, sharded state, compiled steps, checkpoint, loop.

Started from a pretraining workdir with `--config.init_from=DIR` (or from a random encoder
without it), through the same entry point as pretraining:
  python -m mvmae_jax.main --config=configs/finetune.py --workdir=FT --config.init_from=PT
It checkpoints and resumes like pretraining and logs `eval/top1`, `eval/top5` and `eval/loss`.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
import tensorflow as tf
from clu import parameter_overview, periodic_actions

from mvmae_jax import checkpointing, config_lib, input_pipeline, metrics_io, optim, sharding
from mvmae_jax import classify_step as cs
from mvmae_jax.models import encoder_dims
from mvmae_jax.train import PreemptionWatcher, check_finite

_ENCODER_FIELDS = ("variant", "width", "depth", "num_heads", "mlp_dim", "patch_size")


def with_pretraining_settings(config: ml_collections.ConfigDict,
                              pretrained: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the encoder size and input normalisation of the pretraining run."""
    config = ml_collections.ConfigDict(config.to_dict())
    for field in _ENCODER_FIELDS:
        config.model[field] = pretrained.model.get(field, config.model[field])
    config.input.mean = tuple(pretrained.input.mean)
    config.input.std = tuple(pretrained.input.std)
    return config


def load_pretrained(config: ml_collections.ConfigDict):
    """(config with the pretraining run's settings, encoder parameters, step) or the config
    unchanged and None when `init_from` is empty."""
    if not config.init_from:
        logging.warning("config.init_from is empty: the encoder is randomly initialised.")
        return config, None, None
    step = config.init_step if config.init_step >= 0 else None
    pretrained_config, params, step = checkpointing.load_params(config.init_from, step)
    logging.info("Initialising the encoder from %s, step %d.", config.init_from, step)
    return with_pretraining_settings(config, pretrained_config), params["encoder"], step


def evaluate(eval_step, state, batches) -> dict[str, float]:
    """Top-1, top-5 and loss over the whole eval split (sums stay on the devices until the end)."""
    totals = None
    for batch in batches:
        sums = eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"eval/top1": float(totals["top1"]) / count, "eval/top5": float(totals["top5"]) / count,
            "eval/loss": float(totals["loss"]) / count}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> cs.ClassifierState:
    """Trains the probe or fine-tunes as `config` says, in (or resuming from) `workdir`."""
    # --- Set-up, the pretrained encoder and checks, before anything is compiled.
    tf.config.set_visible_devices([], "GPU")
    config, pretrained_encoder, pretrained_step = load_pretrained(config)
    config_lib.validate_classify(config, jax.device_count(), jax.process_count())
    is_chief = jax.process_index() == 0

    # --- Mesh and input.
    mesh = sharding.make_mesh()
    source = input_pipeline.make_source(config, process_index=jax.process_index(),
                                        process_count=jax.process_count())
    eval_source = input_pipeline.make_source(config, train=False,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count())
    num_classes = config.num_classes or source.num_classes
    if not num_classes:
        raise config_lib.ConfigError(
            "the training data has no class labels; set config.num_classes and use a labelled "
            "data set (an image folder needs one sub-folder per class)")
    steps_per_epoch = source.num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise config_lib.ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {source.num_examples} training "
            "examples")
    total_steps = (config.total_steps if config.total_steps > 0
                   else config.total_epochs * steps_per_epoch)
    warmup_steps = int(config.optim.warmup_epochs * steps_per_epoch)

    # --- Model and optimizer.
    model = cs.build_classifier(config, num_classes)
    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, warmup_steps,
                                            total_steps)
    trainable = jax.eval_shape(
        lambda: cs.init_variables(config, model, None)["params"])
    trainable = {k: v for k, v in trainable.items() if k not in cs.frozen_names(config)}
    optimizer = optim.make_classify_optimizer(config.optim, schedule, trainable,
                                              encoder_dims(config.model)["depth"])

    # --- Sharded state, restored from this workdir's latest checkpoint if there is one.
    state = cs.create_state(config, model, optimizer, mesh, pretrained_encoder)
    state_sharding = cs.state_shardings(state, mesh)
    manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"),
                                         config.keep_checkpoints)
    position = 0
    restored = checkpointing.restore_latest(manager, state)
    if restored is not None:
        state, row, restored_step = restored
        position = (checkpointing.position_from_row(row, source.host_size) if row is not None
                    else (restored_step // steps_per_epoch) * source.host_size)
    start_step = int(jax.device_get(state.step))
    writer = metrics_io.create_writer(workdir, start_step if restored is not None else None)
    if is_chief:
        tf.io.gfile.makedirs(workdir)
        with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        logging.info("Config:\n%s", config)
        if restored is None:
            parameter_overview.log_parameter_overview(state.params)
    logging.info("%s: %d classes, %d steps of %d images (%d per epoch), starting at step %d; "
                 "encoder from %s.", config.task, num_classes, total_steps, config.batch_size,
                 steps_per_epoch, start_step,
                 f"{config.init_from} (step {pretrained_step})" if config.init_from
                 else "random initialisation")

    # --- Compiled steps.
    train_step = cs.make_train_step(config, model, optimizer, schedule, mesh, state_sharding,
                                    num_classes)
    eval_step = cs.make_eval_step(model, mesh, state_sharding)
    eval_batch_size = config.eval_batch_size or config.batch_size

    def run_eval(state, step):
        started = time.time()
        result = evaluate(eval_step, state, input_pipeline.eval_batches(
            config, mesh, eval_source, eval_batch_size))
        result["eval/seconds"] = time.time() - started
        logging.info("step %d: eval top-1 %.4f, top-5 %.4f, loss %.4f (%.1fs)", step,
                     result["eval/top1"], result["eval/top5"], result["eval/loss"],
                     result["eval/seconds"])
        writer.write_scalars(step, result)

    # --- The loop.
    batches = input_pipeline.classify_batches(config, mesh, source, start_position=position)
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=config.log_every_steps)
    preemption = PreemptionWatcher(manager)
    started = time.time()
    for step in range(start_step, total_steps):
        batch, position = next(batches)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = train_step(state, {"image": batch["image"],
                                                "label": batch["label"]})
        done = step + 1
        report(done)

        if done % config.log_every_steps == 0 or done == total_steps:
            values = jax.device_get(metrics)
            check_finite(values, done)
            scalars = {f"train/{k}": v for k, v in values.items()}
            scalars["train/epoch"] = done / steps_per_epoch
            writer.write_scalars(done, scalars)
            rate = (done - start_step) / max(time.time() - started, 1e-9)
            logging.info("step %d/%d (epoch %.1f) loss %.4f top1 %.3f | %.2f steps/s, %.0fs "
                         "left", done, total_steps, done / steps_per_epoch, values["loss"],
                         values["top1"], rate, (total_steps - done) / rate)
        if done == total_steps or (config.eval_every_steps > 0
                                   and done % config.eval_every_steps == 0):
            run_eval(state, done)

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

