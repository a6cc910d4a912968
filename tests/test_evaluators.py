"""Evaluators as plug-ins: the registry and schedule, the classification evaluator against
numpy, and both built-in evaluators in 2 processes (launch/local_multiprocess.sh) against 1."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
from types import SimpleNamespace

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mvmae_jax import config_lib, evaluators, sharding
from mvmae_jax.default_config import get_base_config
from mvmae_jax.evaluators import classification, common

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "local_multiprocess.sh"
WORKER = ROOT / "tests" / "evaluator_worker.py"


def context(evals: dict, num_classes=None, **kwargs) -> common.EvalContext:
    config = ml_collections.ConfigDict(dict(batch_size=16, evals=evals))
    return common.EvalContext(config=config, mesh=sharding.make_mesh(),
                              num_classes=num_classes, **kwargs)


# --- Registry and schedule.

def test_a_type_registered_here_is_built_from_config_evals(request, caplog):
    """make_evaluators builds every section by its type, in order, with its own settings;
    every_steps -1 builds nothing; without labels the kNN section is skipped with one line."""
    request.addfinalizer(lambda: common.REGISTRY.pop("constant", None))

    @evaluators.register("constant")
    class Constant:
        needs_labels = False

        def __init__(self, name, section, ctx):
            self.name, self.every_steps, self.value = name, section.every_steps, section.value

        def run(self, params):
            return {f"eval/{self.name}": self.value * params}

    evals = {"first": dict(type="constant", every_steps=5, value=2.0),
             "off": dict(type="constant", every_steps=-1, value=1.0),
             "knn": dict(get_base_config().evals.knn.to_dict(), every_steps=0),
             "second": dict(type="constant", every_steps=0, value=3.0)}
    with caplog.at_level(logging.WARNING):
        built = evaluators.make_evaluators(context(evals, encode=lambda p, x: x))
    assert [(type(e), e.name, e.every_steps) for e in built] == [
        (Constant, "first", 5), (Constant, "second", 0)]
    assert all(isinstance(e, evaluators.Evaluator) for e in built)
    assert [e.run(10.0) for e in built] == [{"eval/first": 20.0}, {"eval/second": 30.0}]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "knn" in warnings[0] and "labels" in warnings[0], warnings

    # With labels the kNN evaluator is built too.
    built = evaluators.make_evaluators(context(evals, num_classes=3, encode=lambda p, x: x))
    assert [e.name for e in built] == ["first", "knn", "second"]
    assert isinstance(built[1], evaluators.Evaluator)
    # The config check knows the registered type, and names the known ones for a wrong one.
    config = get_base_config()
    config.evals.first = ml_collections.ConfigDict(evals["first"])
    config_lib.validate(config, 8, 1)
    config.evals.first.type = "nope"
    with pytest.raises(config_lib.ConfigError, match=r"evals.first.type.*'constant'"):
        config_lib.validate(config, 8, 1)


@pytest.mark.parametrize("every_steps, due_steps", [
    (5, [5, 10, 12]), (4, [4, 8, 12]), (0, [12]), (-1, []), (20, [12])])
def test_schedule(every_steps, due_steps):
    evaluator = SimpleNamespace(every_steps=every_steps)
    assert [step for step in range(1, 13) if evaluators.due(evaluator, step, 12)] == due_steps


# --- Classification.

def numpy_metrics(logits, labels):
    logits = logits.astype(np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(
        1, keepdims=True)) - logits.max(1, keepdims=True)
    order = np.argsort(-logits, axis=1, kind="stable")
    return {"eval/top1": np.mean(order[:, 0] == labels),
            "eval/top5": np.mean(np.any(order[:, :5] == labels[:, None], axis=1)),
            "eval/loss": -np.mean(log_probs[np.arange(len(labels)), labels])}


def test_classification_counts_like_numpy_and_ignores_padding():
    """Padded batches split over 8 devices give the numpy top-1, top-5 and mean loss of the
    valid rows; the padding rows' logits would change all three."""
    rng = np.random.default_rng(0)
    num_classes, width, count, batch = 7, 5, 45, 16
    weights = rng.normal(size=(width, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, count)
    images = (weights[:, labels].T + 1.0 * rng.normal(size=(count, width))).astype(np.float32)
    padded = -(-count // batch) * batch  # 3 padding rows
    images_p = np.concatenate([images, rng.normal(size=(padded - count, width))]).astype(
        np.float32)
    labels_p = np.concatenate([labels, -np.ones(padded - count, int)]).astype(np.int32)
    valid = np.arange(padded) < count
    mesh = sharding.make_mesh()
    batches = [{name: sharding.shard_batch(value[start:start + batch], mesh)
                for name, value in (("image", images_p), ("label", labels_p), ("valid", valid))}
               for start in range(0, padded, batch)]

    evaluator = classification.ClassificationEvaluator(
        "classification", ml_collections.ConfigDict(dict(every_steps=0, batch_size=0)),
        context({}, num_classes=num_classes, logits=lambda params, x: x @ params))
    assert evaluator.batch_size == 16
    got = evaluator.evaluate(jnp.asarray(weights), batches)
    want = numpy_metrics(images @ weights, labels)
    assert 0.3 < want["eval/top1"] < want["eval/top5"] < 1.0  # neither trivial nor hopeless
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name
    assert got["eval/seconds"] >= 0


# --- Two processes against one (slow).

def run_bounded(command, env, timeout):
    """Runs `command` in its own process group; on timeout kills the group and fails."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command[:3]} did not finish in {timeout}s:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]
    return stdout, stderr


def without_seconds(runs):
    return [{k: v for k, v in run.items() if not k.endswith("seconds")} for run in runs]


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path):
    """kNN and classification on the digits with a random encoder, run twice, finish in 2
    processes x 2 devices (gloo) and give every process the numbers of 1 process x 4 devices.
    (Eager jnp ops on global arrays hung this run.)"""
    data_dir, one, two = tmp_path / "tfds", tmp_path / "one", tmp_path / "two"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    run_bounded([sys.executable, str(WORKER), f"--data_dir={data_dir}", f"--out_dir={one}"],
                env, timeout=300)
    reference = json.loads((one / "process_0.json").read_text())
    assert reference["device_count"] == 4
    assert reference["evaluators"] == ["classification", "knn"]

    # The launcher runs "$PYTHON -m mvmae_jax.main FLAGS..."; this stand-in runs the worker
    # with those flags instead (and anything else as python would).
    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = mvmae_jax.main ]; then\n'
        f'  shift 2\n  exec "{sys.executable}" "{WORKER}" "$@"\nfi\n'
        f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = dict(os.environ, PYTHON=str(python), LOG_DIR=str(tmp_path / "logs"))
    run_bounded(["bash", str(LAUNCHER), "2", "2", f"--data_dir={data_dir}",
                 f"--out_dir={two}"], env, timeout=300)

    want = without_seconds(reference["runs"])
    assert want[0] == want[1]
    assert want[0]["eval/knn_train_examples"] == 1437
    assert 0.5 < want[0]["eval/knn_top1"] < 1.0
    for process in (0, 1):
        report = json.loads((two / f"process_{process}.json").read_text())
        assert (report["process_count"], report["device_count"]) == (2, 4)
        for got in without_seconds(report["runs"]):
            assert got.keys() == want[0].keys()
            for name, value in want[0].items():
                assert got[name] == pytest.approx(value, rel=1e-5), (process, name)
