"""Multi-host training on one machine (launch/local_multiprocess.sh), FSDP, and jax.distributed
set-up.

The end-to-end runs train the quickstart model, shrunk, on the 360-example digits `test` split
read in file order (one file, shuffle buffer 1) as ONE global batch per step. Per-host input
gives each process a contiguous part of the split, so only then do a 1-process and a 2-process
run see the same global batch row for row, which equal losses need: a row's masks depend on its
place in the batch. AMT with the bank runs from the first step and the bank is refreshed every
step, so its lookups and updates cross processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import optax
import pytest
from helpers import tiny_config

from mvmae_jax import checkpointing, config_lib, distributed, metrics_io, optim, sharding, tasks
from mvmae_jax import train_step as ts

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "local_multiprocess.sh"
STEPS = 3
SMALL = [
    "--config=configs/quickstart.py", "--config.img_size=16", "--config.batch_size=360",
    f"--config.total_steps={STEPS}", "--config.model.width=32", "--config.model.depth=2",
    "--config.model.num_heads=2", "--config.model.mlp_dim=64",
    "--config.model.decoder_width=32", "--config.model.decoder_depth=1",
    "--config.model.decoder_heads=2", "--config.contrastive.hidden_dim=64",
    "--config.contrastive.output_dim=32", "--config.amt.start_epoch=0",
    "--config.amt.refresh_every=1", "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2", "--config.image_every_steps=0",
    "--config.dataset.split=test", "--config.input.shuffle_buffer=1",
]
# The kNN monitor runs at the end, on part of the train split: the evaluators must not hang
# or differ across processes.
SMALL += ["--config.evals.knn.every_steps=0", "--config.evals.knn.train_examples=360"]
KEYS = ("train/loss", "train/rec_loss", "train/con_loss", "train/con_top1", "train/grad_norm")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def run_one_process(workdir, data_dir, *flags, devices: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run(
        [sys.executable, "-m", "mvmae_jax.main", *SMALL, f"--workdir={workdir}",
         f"--config.dataset.data_dir={data_dir}", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_processes(workdir, data_dir, processes: int, devices: int, log_dir, *flags
                  ) -> subprocess.CompletedProcess:
    """The launcher with `processes` x `devices`; each process sets its own XLA_FLAGS."""
    env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(log_dir))
    return subprocess.run(
        ["bash", str(LAUNCHER), str(processes), str(devices), *SMALL, f"--workdir={workdir}",
         f"--config.dataset.data_dir={data_dir}", *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def train_records(workdir) -> dict[int, dict[str, float]]:
    """metrics.jsonl's training lines by step; fails on a step written twice."""
    records = [r for r in metrics_io.read_metrics(str(workdir)) if "train/loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps written more than once: {steps}"
    return {r["step"]: r for r in records}


def knn_top1(workdir) -> list[tuple[int, float]]:
    """(step, eval/knn_top1) of every kNN evaluation of a run."""
    return [(r["step"], r["eval/knn_top1"]) for r in metrics_io.read_metrics(str(workdir))
            if "eval/knn_top1" in r]


def assert_same_losses(got, want, steps, rtol):
    assert sorted(got) == sorted(steps), sorted(got)
    for step in steps:
        for key in KEYS:
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=rtol,
                                       err_msg=f"{key} at step {step}")


def assert_same_params(got_workdir, want_workdir):
    """The final parameters of two runs agree to 1e-4 relative (1e-6 of the tensor's scale
    for entries near zero). A wrong update is off by its own size, ~1e-3 of these values.

    Attention key biases are left out: softmax ignores them (they add the same number to
    every logit of a query), so their gradient is rounding noise, which Adam's normalisation
    turns into steps of the size of the learning rate, different in every run.
    """
    _, got, got_step = checkpointing.load_params(str(got_workdir))
    _, want, want_step = checkpointing.load_params(str(want_workdir))
    assert got_step == want_step == STEPS
    compared = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        name = sharding.param_path(path)
        if name.endswith("key/bias"):
            continue
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(b).max() + 1e-9,
                                   err_msg=name)
        compared += 1
    assert compared > 50


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir):
    """The reference: 1 process x 4 devices, data parallel. (It also prepares the digits.)"""
    workdir = tmp_path_factory.mktemp("one_process")
    result = run_one_process(workdir, data_dir, devices=4)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


# --- End to end through the launcher (slow).

@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_resumes_on_one_device(
        tmp_path, data_dir, one_process):
    """2 processes x 2 devices log the same losses as 1 process x 4 devices; only process 0
    writes metrics, events and pictures; every process writes its part of the checkpoint. That
    checkpoint (of step 2) restores into 1 process on 1 device, which continues to the same
    step-3 loss and final parameters as the 2-process run."""
    workdir, logs = tmp_path / "two", tmp_path / "logs"
    result = run_processes(workdir, data_dir, 2, 2, logs, f"--config.image_every_steps={STEPS}")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"step {STEPS}/{STEPS}" in result.stdout  # process 0's output comes through
    assert (workdir / "log.txt").read_text().count(f"Done: {STEPS} steps") == 1  # process 0's
    for process in (0, 1):
        log = (logs / f"process_{process}.log").read_text()
        assert f"process {process} of 2, 2 local devices of 4" in log, log[-3000:]

    two = train_records(workdir)
    assert_same_losses(two, train_records(one_process), range(1, STEPS + 1), rtol=1e-5)
    assert knn_top1(workdir) == knn_top1(one_process)
    assert len([f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]) == 1
    assert os.listdir(workdir / "images") == [f"step_{STEPS:07d}.png"]
    for step in (2, STEPS):
        checkpoint = workdir / "checkpoints" / str(step)
        assert {"state", "bank", "input"} <= set(os.listdir(checkpoint))
        saved = json.loads((checkpoint / "input" / "metadata").read_text())
        assert saved == {"process_count": 2, "positions": [[step, 0], [step, 0]]}

    # The step-2 checkpoint alone, continued by one process on one device.
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    (resumed / "done.json").unlink()
    result = run_one_process(resumed, data_dir, devices=1)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Restored checkpoint of step 2" in result.stdout
    assert "written by 2 processes and is restored by 1" in result.stderr
    assert "on 1 device (1 process)" in result.stdout
    assert_same_losses(train_records(resumed), two, range(1, STEPS + 1), rtol=1e-5)
    assert_same_params(resumed, workdir)


@pytest.mark.slow
def test_fsdp_over_two_processes_matches_data_parallel(tmp_path, data_dir, one_process):
    """FSDP on 8 devices (2 processes x 4): every parameter split over the devices, the same
    losses and final parameters as data parallel on 4 devices in one process."""
    workdir, logs = tmp_path / "fsdp", tmp_path / "logs"
    result = run_processes(workdir, data_dir, 2, 4, logs, "--config.sharding.strategy=fsdp",
                           "--config.sharding.fsdp_min_size=0")
    assert result.returncode == 0, result.stderr[-4000:]
    # Split parameters cannot be fetched to one host: the overview shows their shardings.
    log = (workdir / "params.txt").read_text()
    kernel = re.search(r"\| encoder/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel +\| "
                       r"\(32, 64\) +\|[^\n]*\| \(None, 'fsdp'\) +\|", log)
    assert kernel is not None, log[-3000:]
    assert_same_losses(train_records(workdir), train_records(one_process),
                       range(1, STEPS + 1), rtol=1e-5)
    assert_same_params(workdir, one_process)


# --- FSDP shardings, in this process (8 fake devices).

def new_state(config, devices: int = 8):
    mesh = sharding.config_mesh(config.sharding, jax.devices()[:devices])
    task = tasks.PretrainTask(config, mesh, SimpleNamespace(num_examples=20))
    optimizer = task.optimizer(optim.learning_rate_schedule(
        config.optim, config.batch_size, 1, 10))
    return mesh, ts.create_train_state(task, optimizer, mesh, config)


def fsdp_state(config):
    return new_state(config)


def find_adam(opt_state) -> optax.ScaleByAdamState:
    def is_adam(x):
        return isinstance(x, optax.ScaleByAdamState)

    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x))


def test_fsdp_state_is_split_over_the_devices_and_equals_the_replicated_one():
    """Under fsdp every parameter of >= fsdp_min_size elements is split along one dimension
    into 8 slices (one per device), Adam's mu and nu exactly like their parameter; step counts
    stay whole; the values are those of the replicated (data-parallel) state."""
    config = tiny_config(**{"sharding.strategy": "fsdp", "sharding.fsdp_min_size": 1000})
    mesh, state = fsdp_state(config)
    _, reference = fsdp_state(tiny_config())
    adam = find_adam(state.opt_state)
    split = whole = 0
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    for (path, param), mu, nu in zip(leaves, jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu),
                                     strict=True):
        name = sharding.param_path(path)
        shard_shapes = {s.data.shape for s in param.addressable_shards}
        if param.size < 1000:
            assert param.sharding.is_fully_replicated, name
            assert shard_shapes == {param.shape}
            whole += 1
            continue
        # One dimension divided by 8 on every device: the device holds an eighth.
        (shard_shape,) = shard_shapes
        divided = [d for d in range(param.ndim) if shard_shape[d] != param.shape[d]]
        assert len(divided) == 1 and shard_shape[divided[0]] * 8 == param.shape[divided[0]], name
        assert len({s.device for s in param.addressable_shards}) == 8
        for moment in (mu, nu):
            assert moment.sharding.is_equivalent_to(param.sharding, param.ndim), name
        split += 1
    assert split >= 10 and whole >= 10, (split, whole)  # kernels split; biases, norms whole
    assert adam.count.sharding.is_fully_replicated and state.step.sharding.is_fully_replicated
    assert state.extras["bank"].sharding.spec == sharding.PartitionSpec(("data", "fsdp"), None)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(p.sharding.is_fully_replicated for p in jax.tree.leaves(reference.params))


def test_checkpoints_move_between_fsdp_and_data_parallel(tmp_path):
    """A checkpoint of the FSDP state on 8 devices restores into the replicated state on one
    device with the same values, and back into the FSDP layout."""
    fsdp_config = tiny_config(**{"sharding.strategy": "fsdp", "sharding.fsdp_min_size": 1000})
    _, split = fsdp_state(fsdp_config)
    manager = checkpointing.make_manager(str(tmp_path), 2, async_save=False)
    checkpointing.save(manager, split, [[0, 0]])
    _, one = new_state(tiny_config(), devices=1)
    restored, _, step = checkpointing.restore_latest(manager, one)
    assert step == 0
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(split), strict=True):
        assert a.sharding.is_fully_replicated and len(a.sharding.device_set) == 1
        # The bank has 24 rows on 8 devices (20 examples, padded), 20 on one.
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[tuple(map(slice, a.shape))])
    back, _, _ = checkpointing.restore_latest(manager, split)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(split), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    manager.close()


def test_checkpoints_restore_across_mesh_shapes(tmp_path):
    """A checkpoint of FSDP on the (data, fsdp) mesh (2, 4) restores on (8, 1) and (4, 2)
    with its values, each array placed as the new mesh says."""
    def state_on(fsdp, seed=0):
        return new_state(tiny_config(seed=seed, **{"sharding.strategy": "fsdp",
                                                   "sharding.fsdp_axis_size": fsdp,
                                                   "sharding.fsdp_min_size": 0}))

    mesh, saved = state_on(4, seed=1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    manager = checkpointing.make_manager(str(tmp_path), 2, async_save=False)
    checkpointing.save(manager, saved, [[0, 0]])
    for fsdp in (1, 2):
        mesh, target = state_on(fsdp)
        restored, _, _ = checkpointing.restore_latest(manager, target)
        kernel = restored.params["encoder"]["Transformer"]["encoderblock_0"]["MlpBlock_0"][
            "Dense_0"]["kernel"]
        assert kernel.sharding.mesh.shape == mesh.shape
        for a, b, t in zip(jax.tree.leaves(restored), jax.tree.leaves(saved),
                           jax.tree.leaves(target), strict=True):
            assert a.sharding == t.sharding
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    manager.close()


def test_fsdp_rules_pick_the_dimension():
    """The first matching rule decides: largest divisible dimension (ties: the leading one), an
    explicit dimension, replicate, the size floor, and no dimension that divides."""
    rules = [(r"encoder/.*/query/kernel", 2), (r".*/bias", "replicate"), (r".*", "largest")]
    assert sharding.fsdp_dim("encoder/b/query/kernel", (32, 2, 16), 8, rules) == 2
    assert sharding.fsdp_dim("encoder/b/key/kernel", (32, 2, 16), 8, rules) == 0
    assert sharding.fsdp_dim("decoder/Dense_0/kernel", (32, 64), 8, rules) == 1
    assert sharding.fsdp_dim("decoder/Dense_0/kernel", (64, 64), 8, rules) == 0
    assert sharding.fsdp_dim("decoder/Dense_0/bias", (64,), 8, rules) is None
    assert sharding.fsdp_dim("decoder/Dense_0/kernel", (3, 5), 8, rules) is None
    assert sharding.fsdp_dim("decoder/Dense_0/kernel", (32, 64), 8, rules, min_size=4096) is None
    assert sharding.fsdp_dim("decoder/Dense_0/kernel", (32, 64), 1, rules) is None
    assert sharding.fsdp_dim("anything", (32, 64), 8, []) is None
    with pytest.raises(config_lib.ConfigError, match=r"query/kernel of shape \(32, 2, 12\)"):
        sharding.fsdp_dim("encoder/b/query/kernel", (32, 2, 12), 8, rules)


def test_optimizer_state_follows_the_parameters():
    """Leaves of an optimizer state whose path ends with a parameter's path (and shape) take
    its sharding; others (counts, a same-named leaf of another shape) are replicated."""
    mesh = sharding.make_mesh(jax.devices()[:8])
    params = {"a": {"kernel": np.zeros((8, 3))}, "b": {"kernel": np.zeros((3, 16))}}
    config = tiny_config(**{"sharding.strategy": "fsdp", "sharding.fsdp_min_size": 0}).sharding
    placed = sharding.param_shardings(params, mesh, config)
    assert placed["a"]["kernel"].spec == sharding.PartitionSpec("fsdp", None)
    assert placed["b"]["kernel"].spec == sharding.PartitionSpec(None, "fsdp")
    opt_state = optax.adamw(1e-3).init(params)
    opt_state = (opt_state, {"a": {"kernel": np.zeros((4,))}})
    follow = sharding.follow_params(opt_state, params, placed, mesh)
    adam = find_adam(follow[0])
    assert adam.mu["a"]["kernel"] == placed["a"]["kernel"]
    assert adam.nu["b"]["kernel"] == placed["b"]["kernel"]
    assert adam.count.is_fully_replicated
    assert follow[1]["a"]["kernel"].is_fully_replicated  # same path, other shape


@pytest.mark.parametrize("field, value, message", [
    ("strategy", "zero3", "config.sharding.strategy"),
    ("fsdp_rules", ((".*",),), r"is not a \(regex, 'largest' \| 'replicate' \| dimension\) pair"),
    ("fsdp_rules", (("(", "largest"),), "not a regular expression"),
    ("fsdp_rules", ((".*", "biggest"),), "\\('.\\*', 'biggest'\\) is not a \\(regex,"),
    ("fsdp_min_size", -1, "config.sharding.fsdp_min_size"),
    ("fsdp_axis_size", -1, "config.sharding.fsdp_axis_size=-1 must be >= 0"),
    ("fsdp_axis_size", 2, "fsdp_axis_size=2 splits parameters only under .*strategy='fsdp'"),
])
def test_sharding_config_errors_name_the_field(field, value, message):
    config = tiny_config(**{f"sharding.{field}": value})
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, 8, 1)


def test_fsdp_axis_size_must_divide_the_devices():
    config = tiny_config(batch_size=24, **{"sharding.strategy": "fsdp",
                                           "sharding.fsdp_axis_size": 3})
    with pytest.raises(config_lib.ConfigError, match="fsdp_axis_size=3 does not divide the 8 "):
        config_lib.validate(config, 8, 1)
    config_lib.validate(config, 6, 1)


def test_large_configs_use_fsdp():
    """ViT-L and ViT-H shard their state (the others stay data parallel)."""
    for name, strategy in (("vit_l", "fsdp"), ("vit_h", "fsdp"), ("vit_b", "data")):
        spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        assert config.sharding.strategy == strategy, name
        config_lib.validate_sharding(config.sharding, 256)


# --- jax.distributed set-up.

SLURM_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "16",
              "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}


@pytest.mark.parametrize("env, on_tpu_vm, want", [
    ({}, False, None),
    ({"HOME": "/root", "PATH": "/bin"}, False, None),
    (SLURM_STEP, False, "slurm"),
    (dict(SLURM_STEP, SLURM_NTASKS="1"), False, None),  # one task needs no coordinator
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}, False, None),  # no srun
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4", "OMPI_COMM_WORLD_SIZE": "4"}, False,
     "openmpi"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False, "env"),
    ({}, True, "cloud_tpu"),
])
def test_cluster_detection(env, on_tpu_vm, want):
    assert distributed.detect_cluster(env, on_tpu_vm=on_tpu_vm) == want


def test_initialize_calls_jax_only_with_flags_or_a_cluster(monkeypatch):
    """No flags, no cluster: nothing is called (a laptop run). Flags: passed on as given, with
    gloo CPU collectives. A detected cluster: jax.distributed.initialize() fills it in."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed, "detect_cluster", lambda: None)
    assert distributed.initialize() is False and calls == []

    assert distributed.initialize("127.0.0.1:1234", 2, 1) is True
    assert calls[-1] == dict(coordinator_address="127.0.0.1:1234", num_processes=2,
                             process_id=1, local_device_ids=None)
    assert jax.config.jax_cpu_collectives_implementation == "gloo"

    monkeypatch.setattr(distributed, "detect_cluster", lambda: "slurm")
    assert distributed.initialize() is True
    assert calls[-1] == dict(coordinator_address=None, num_processes=None, process_id=None,
                             local_device_ids=None)
