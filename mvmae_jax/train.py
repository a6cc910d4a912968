"""The training loop of every task, top to bottom: set-up, input, model and optimizer, sharded
state, compiled steps, checkpoint, loop."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import tensorflow as tf
from clu import parameter_overview

from mvmae_jax import (
    checkpointing,
    config_lib,
    console,
    evaluators,
    input_pipeline,
    metrics_io,
    optim,
    sharding,
    tasks,
    utils,
    visualize,
    workdir_lock,
)
from mvmae_jax import train_step as ts
from mvmae_jax.data import sources

DONE_FILE = "done.json"


class NonFiniteError(FloatingPointError):
    """A step's loss, gradient norm or parameters are not finite; the message is one line."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> ts.TrainState | None:
    """Trains as `config` says, in (or resuming from) `workdir`; returns the final state, or
    None when the workdir holds a finished run of at least the steps `config` asks for."""
    # --- Set-up and checks, before anything is compiled.
    tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators are JAX's.
    # Grappler's loop optimizer finds no loops here and only warns about RandAugment's conds.
    tf.config.optimizer.set_experimental_options({"loop_optimization": False})
    is_chief = jax.process_index() == 0
    done_path = os.path.join(workdir, DONE_FILE)
    extending = False
    if tf.io.gfile.exists(done_path):
        with tf.io.gfile.GFile(done_path) as f:
            done = json.load(f)
        if not _asks_for_more(config, done):
            logging.info("%s is complete already (step %d): nothing to do. %s", workdir,
                         done["step"], done.get("next", ""))
            return None
        extending = True
        logging.info("%s finished at step %d; the config asks for more steps: going on from "
                     "there.", workdir, done["step"])
    created = is_chief and not tf.io.gfile.exists(workdir)
    try:
        with console.workdir_log(workdir, enabled=is_chief) as log, \
                workdir_lock.hold(workdir, enabled=is_chief):
            if log is not None:
                log.start()
            if extending and is_chief:
                tf.io.gfile.remove(done_path)  # unfinished again until the new end
            return _train(config, workdir)
    except BaseException:
        # A workdir that this failed start created and left with nothing but its log goes.
        if created and tf.io.gfile.isdir(workdir) and set(
                tf.io.gfile.listdir(workdir)) <= {console.LOG_FILE}:
            tf.io.gfile.rmtree(workdir)
        raise


def _asks_for_more(config: ml_collections.ConfigDict, done: dict) -> bool:
    """Whether `config` asks for more steps than the finished run of `done` (its done.json)."""
    if config.total_steps > 0:
        return config.total_steps > done["step"]
    steps_per_epoch = done.get("steps_per_epoch")  # absent from older runs' done.json
    return bool(steps_per_epoch) and config.total_epochs * steps_per_epoch > done["step"]


def _train(config: ml_collections.ConfigDict, workdir: str) -> ts.TrainState:
    """The run itself, with the workdir held."""
    is_chief = jax.process_index() == 0
    config = tasks.resolve_config(config)
    config_lib.validate(config, jax.device_count(), jax.process_count())

    # --- Mesh and input.
    mesh = sharding.config_mesh(config.sharding)
    source = input_pipeline.make_source(config)
    steps_per_epoch = source.num_examples // config.batch_size
    if steps_per_epoch < 1:
        # Counts this host's readable images and names a batch size that they fill.
        batch_multiple = jax.device_count() * (config.grad_accum_steps
                                               if config.task == "pretrain" else 1)
        sources.check_fills_batch(source, config.batch_size // jax.process_count(),
                                  jax.process_count(), batch_multiple)
        raise config_lib.ConfigError(  # another host's part is the one too small
            f"config.batch_size={config.batch_size} exceeds the {source.num_examples} training "
            f"examples; {sources.batch_size_advice(source.num_examples, 1, batch_multiple)}")
    total_steps = (config.total_steps if config.total_steps > 0
                   else config.total_epochs * steps_per_epoch)
    warmup_steps = int(config.optim.warmup_epochs * steps_per_epoch)

    # --- Model and optimizer.
    task = tasks.build(config, mesh, source)
    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, warmup_steps,
                                            total_steps)
    optimizer = task.optimizer(schedule)

    # --- Sharded state, restored from the latest checkpoint if there is one.
    state = ts.create_train_state(task, optimizer, mesh, config)
    state_sharding = ts.state_shardings(state, mesh, config)
    manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"),
                                         config.keep_checkpoints)
    state, position = _restore(manager, state, source, steps_per_epoch)

    def restart() -> ts.TrainState:
        """The last good checkpoint's state, or the initial one (for a rollback)."""
        fresh = ts.create_train_state(task, optimizer, mesh, config)
        return _restore(manager, fresh, source, steps_per_epoch)[0]

    start_step = int(jax.device_get(state.step))
    writer = metrics_io.create_writer(workdir, start_step if start_step else None)
    if is_chief:
        _write_run_files(workdir, config, state)
    per_device, total = utils.state_bytes(state)
    logging.info("%s on %s (%s), mesh %s: %d steps of %d images (%d per epoch), from step "
                 "%d; state: %.1f MiB per device (%.1f MiB in total).", config.task,
                 utils.plural(jax.device_count(), "device"),
                 utils.plural(jax.process_count(), "process"), sharding.describe(mesh),
                 total_steps, config.batch_size, steps_per_epoch, start_step,
                 per_device / 2**20, total / 2**20)

    # --- Compiled steps, evaluators and pictures.
    jitted = {phase: ts.make_train_step(task, optimizer, schedule, mesh, state_sharding, phase)
              for phase in task.phases}
    compiled, flops = {}, {}
    state_is_finite = ts.make_state_check(mesh, state_sharding)
    epoch_start = task.make_epoch_start(state_sharding, input_pipeline.EvalBatches(
        config, mesh, source, config.batch_size, mode="bank"))
    pictures = task.make_pictures(state_sharding)
    splits = {"train": source, "eval": input_pipeline.make_source(config, train=False)}
    evals = evaluators.make_evaluators(evaluators.EvalContext(
        config=config, mesh=mesh,
        num_classes=(task.num_classes or source.num_classes) if splits["eval"].num_classes
        else None,
        batches=lambda split, batch_size, max_examples: input_pipeline.EvalBatches(
            config, mesh, splits[split], batch_size, max_examples=max_examples),
        encode=task.encode, logits=task.logits))

    def write_pictures(state, batch, rng, phase, step):
        image = pictures(state, batch, rng, phase, step)
        writer.write_images(step, {"views": image[None]})
        if is_chief:
            folder = os.path.join(workdir, "images")
            tf.io.gfile.makedirs(folder)
            with tf.io.gfile.GFile(os.path.join(folder, f"step_{step:07d}.png"), "wb") as f:
                f.write(visualize.to_png(image))

    # --- The loop.
    preemption = utils.PreemptionWatcher(manager)
    batches = input_pipeline.train_batches(config, mesh, source, position,
                                           should_stop=lambda: preemption.signalled)
    saves = checkpointing.SaveMonitor(manager)
    throughput = utils.Throughput(config.batch_size, start_step)
    started = time.time()
    rollbacks = 0
    last_scalars, last_evals = {}, {}
    step = start_step
    while step < total_steps:
        epoch = step // steps_per_epoch
        if epoch_start is not None and step % steps_per_epoch == 0:
            state, scalars = epoch_start(state, epoch)
            if scalars:
                writer.write_scalars(step, scalars)
        phase = task.phase_at_epoch(epoch)
        waited = time.time()
        try:
            batch, position = next(batches)
        except input_pipeline.InputStopped:
            logging.warning("Stopping at step %d while waiting for input (SIGTERM).", step)
            if step > start_step and state_is_finite(state):
                saves.save(state, checkpointing.gather_positions(position, source.host_size),
                           force=True)
            break
        waited = time.time() - waited
        saves.poll()
        if phase not in compiled:
            compile_started = time.time()
            compiled[phase] = jitted[phase].lower(state, batch).compile()
            flops[phase] = utils.xla_flops(compiled[phase])
            logging.info("Compiled the %s step in %.1fs.", phase, time.time() - compile_started)
        done = step + 1
        picture_due = pictures is not None and (done % config.image_every_steps == 0
                                                or done == total_steps)
        # Taken before the step: the key that drew its masks.
        step_rng = ts.step_key(state) if picture_due else None
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = compiled[phase](state, batch)
        throughput.add_step(waited, flops[phase])
        step = done

        stop = preemption.should_stop(done)
        save_due = done % config.checkpoint_every_steps == 0 or done == total_steps or stop
        if done % config.log_every_steps == 0 or done == total_steps or save_due:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if save_due and values["finite"] and not state_is_finite(state):
                values["finite"] = 0.0  # never checkpointed
            if not values["finite"]:
                # The input stream stays where it is: the batches that led here are skipped.
                state, rollbacks = _non_finite(config, values, done, manager, restart,
                                               rollbacks, workdir)
                step = int(jax.device_get(state.step))
                throughput = utils.Throughput(config.batch_size, step)
                continue
        if done % config.log_every_steps == 0 or done == total_steps:
            perf = throughput.measure(done)
            last_scalars = {f"train/{k}": v for k, v in values.items()}
            writer.write_scalars(done, {**last_scalars, **perf,
                                        "train/epoch": done / steps_per_epoch})
            rate = (done - start_step) / max(time.time() - started, 1e-9)
            logging.info("%s", utils.progress_line(done, total_steps, steps_per_epoch, phase,
                                                   values, perf, (total_steps - done) / rate))
        if picture_due:
            write_pictures(state, batch, step_rng, phase, done)
        for evaluator in evals:
            if evaluators.due(evaluator, done, total_steps):
                result = evaluator.run(task.eval_params(state))
                last_evals.update(result)
                writer.write_scalars(done, result)

        if save_due:
            saves.save(state, checkpointing.gather_positions(position, source.host_size),
                       force=stop)
        if stop:
            logging.warning("Stopping at step %d for preemption; the checkpoint resumes it.", done)
            break

    # --- Done.
    batches.close()
    saves.finish()
    manager.close()
    writer.flush()
    final_step = int(jax.device_get(state.step))
    if final_step == total_steps:
        seconds = time.time() - started
        summary = _summary(config, workdir, final_step, seconds, last_scalars, last_evals)
        if is_chief:
            with tf.io.gfile.GFile(os.path.join(workdir, DONE_FILE), "w") as f:
                f.write(json.dumps({"step": final_step, "seconds": seconds,
                                    "steps_per_epoch": steps_per_epoch,
                                    "next": summary["next"]}))
        for line in summary["lines"]:
            logging.info("%s", line)
    return state


def _restore(manager, state: ts.TrainState, source, steps_per_epoch: int
             ) -> tuple[ts.TrainState, int]:
    """(state, this host's input position) from the latest checkpoint, or (state, 0)."""
    restored = checkpointing.restore_latest(manager, state)
    if restored is None:
        return state, 0
    state, row, step = restored
    position = (checkpointing.position_from_row(row, source.host_size) if row is not None
                else (step // steps_per_epoch) * source.host_size)
    return state, position


def _write_run_files(workdir: str, config: ml_collections.ConfigDict, state: ts.TrainState) -> None:
    """config.json and params.txt (the parameter table), each announced in one line."""
    tf.io.gfile.makedirs(workdir)
    config_path = os.path.join(workdir, "config.json")
    with tf.io.gfile.GFile(config_path, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    # Statistics fetch every value to this host: not possible for parameters split over
    # several hosts (FSDP), whose shardings are shown instead.
    local = all(x.is_fully_addressable for x in jax.tree.leaves(state.params))
    table = parameter_overview.get_parameter_overview(
        state.params, include_stats=True if local else "sharding")
    params_path = os.path.join(workdir, "params.txt")
    with tf.io.gfile.GFile(params_path, "w") as f:
        f.write(table + "\n")
    logging.info("%s parameters (table in %s); config in %s.",
                 f"{parameter_overview.count_parameters(state.params):,}", params_path, config_path)


def _non_finite(config, values: dict, step: int, manager, restart, rollbacks: int,
                workdir: str) -> tuple[ts.TrainState, int]:
    """After a non-finite step: NonFiniteError (policy "stop", or no rollback left), or
    `restart()` and the rollback count (policy "rollback")."""
    manager.wait_until_finished()
    last_good = manager.latest_step()
    where = (f"the last good checkpoint is step {last_good} "
             f"({os.path.join(workdir, 'checkpoints', str(last_good))})"
             if last_good is not None else "no checkpoint was written")
    found = (f"step {step}: the loss ({values['loss']:.4g}), the gradient norm "
             f"({values['grad_norm']:.4g}) or the parameters are not finite")
    if config.nonfinite.policy != "rollback" or rollbacks >= config.nonfinite.max_rollbacks:
        limit = (f" after {rollbacks} rollbacks (config.nonfinite.max_rollbacks)"
                 if config.nonfinite.policy == "rollback" else "")
        raise NonFiniteError(
            f"{found}{limit}; nothing after it was saved and {where}. Lower "
            "config.optim.base_lr, set config.optim.grad_clip_norm (e.g. 1.0), use "
            "config.model.dtype='float32' or --config.nonfinite.policy=rollback.")
    state = restart()
    back_to = int(jax.device_get(state.step))
    logging.warning("%s; rolled back to step %d (rollback %d of %d); the batches since are "
                    "skipped.", found, back_to, rollbacks + 1, config.nonfinite.max_rollbacks)
    if jax.process_index() == 0:
        metrics_io.truncate_after(os.path.join(workdir, metrics_io.METRICS_FILE), back_to)
    return state, rollbacks + 1


def _summary(config, workdir, step, seconds, scalars, eval_results) -> dict[str, Any]:
    """The run's last lines (time, final loss, evaluations, checkpoint, log, next commands)
    and the next commands in one line (`next`, for done.json)."""
    rows = []
    if "train/loss" in scalars:
        rows.append(("final loss", f"{scalars['train/loss']:.4f}"))
    rows += [(k, f"{v:.4f}") for k, v in sorted(eval_results.items())
             if not k.endswith(("seconds", "_examples"))]
    rows += [("checkpoint", os.path.join(workdir, "checkpoints", str(step))),
             ("full log", os.path.join(workdir, console.LOG_FILE))]
    commands = []
    if config.task == "pretrain":
        commands = [("linear probe", "python -m mvmae_jax.main --config=configs/linear_probe.py "
                                     f"--workdir={workdir}_probe --config.init_from={workdir}"),
                    ("export", f"python -m mvmae_jax.export --workdir={workdir} "
                               f"--output={workdir}/encoder.safetensors")]
    rows += [(f"next, {label}", command) for label, command in commands]
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"Done: {step} steps in {utils.duration(seconds)}."]
    lines += [f"  {label + ':':<{width}}{value}" for label, value in rows]
    next_command = ("Next: " + "  or  ".join(command for _, command in commands)
                    if commands else "")
    return {"lines": lines, "next": next_command}
