"""Smoke tests: each benchmark script runs at a tiny size and writes the JSON it promises; what
input_stall.py measures: the trainer's loop, and a pipeline slowed on purpose; what
compiled_memory.py compiles for each remat setting."""

import json
import pathlib
import subprocess
import sys
import time

import helpers
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compiled_memory  # noqa: E402
import input_stall  # noqa: E402


@pytest.mark.slow
def test_input_pipeline_benchmark(tmp_path):
    """benchmarks/input_pipeline.py --tiny: rates per thread count, the step rate, the ratio."""
    out = tmp_path / "input.json"
    subprocess.run([sys.executable, "benchmarks/input_pipeline.py", "--tiny", "--threads=1,2",
                    f"--json={out}"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    rates = result["input"]["examples_per_s_by_threads"]
    assert set(rates) == {"1", "2"} and all(r > 0 for r in rates.values())
    assert result["input"]["examples_per_s_per_core"] > 0
    assert result["train_step"]["images_per_s"] > 0 and result["train_step"]["phase"] == "amt"
    assert result["cores_to_feed_one_step_stream"] > 0


# --- benchmarks/input_stall.py


def test_input_stall_times_the_trainers_loop(monkeypatch):
    """Warm-up steps first, then the timed ones, with the metrics fetched every `log_every`
    steps and after the last, as the trainer fetches them."""
    import jax

    fetched = []
    monkeypatch.setattr(jax, "device_get", lambda tree: fetched.append(tree) or tree)
    fed = []

    def step(state, batch):
        fed.append(batch)
        return state + 1, {"step": state + 1}

    batches = iter(range(100))
    state, seconds = input_stall.timed_loop(step, 0, lambda: next(batches), steps=7, warmup=2,
                                            log_every=3)
    assert fed == list(range(9)) and state == 9
    assert [m["step"] for m in fetched] == [2, 5, 8, 9]
    assert seconds > 0


class _SlowStream:
    """A train_batches stream that takes `delay` seconds more per batch."""

    def __init__(self, stream, delay: float):
        self._stream, self._delay = stream, delay

    def __next__(self):
        time.sleep(self._delay)
        return next(self._stream)

    def close(self):
        self._stream.close()


@pytest.mark.slow
def test_input_stall_sees_a_slow_pipeline(tmp_path, monkeypatch):
    """With 0.3 s added to every batch of the pipeline, the input timing is slower than the
    cached one by about that much per step, and the pipeline alone does not keep up."""
    from helpers import tiny_config

    from mvmae_jax import input_pipeline

    config = tiny_config(**{"batch_size": 16, "dataset.data_dir": str(tmp_path),
                            "log_every_steps": 2})
    real = input_pipeline.train_batches
    monkeypatch.setattr(input_pipeline, "train_batches",
                        lambda *args, **kwargs: _SlowStream(real(*args, **kwargs), 0.3))
    result = input_stall.measure(config, "amt", steps=3, warmup=1, repeats=2, cached_batches=2)

    assert len(result["step_s_cached"]) == len(result["step_s_input"]) == 2
    cached, stalled = result["step_s_cached_median"], result["step_s_input_median"]
    assert cached < 0.15, "the tiny step should take far less than the added delay"
    assert stalled > 0.25 + cached
    assert result["input_slowdown"] == pytest.approx(stalled / cached - 1)
    assert result["pipeline"]["batch_s"] >= 0.3 and not result["pipeline_keeps_up"]
    assert result["num_examples"] == 1437 and result["phase"] == "amt"


@pytest.mark.slow
def test_input_stall_smoke(tmp_path):
    """benchmarks/input_stall.py --tiny on the quickstart's data writes the JSON it promises."""
    out = tmp_path / "stall.json"
    subprocess.run([sys.executable, "benchmarks/input_stall.py", "--config=configs/quickstart.py",
                    "--tiny", "--config.batch_size=16", f"--config.dataset.data_dir={tmp_path}",
                    "--steps=2", "--warmup=1", "--repeats=2", "--cached_batches=2",
                    f"--json={out}"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["tiny"] and result["dataset"] == "digits" and result["phase"] == "amt"
    assert len(result["step_s_cached"]) == len(result["step_s_input"]) == 2
    assert all(s > 0 for s in result["step_s_cached"] + result["step_s_input"])
    assert result["input_slowdown"] == pytest.approx(
        result["step_s_input_median"] / result["step_s_cached_median"] - 1)
    pipeline = result["pipeline"]
    assert pipeline["batch_s"] > 0 and pipeline["cpu_s_per_batch"] > 0
    assert pipeline["examples_per_s"] == pytest.approx(16 / pipeline["batch_s"])
    assert result["environment"]["backend"] == "cpu"


# --- benchmarks/compiled_memory.py


@pytest.mark.slow
def test_compiled_memory_smoke(tmp_path):
    """--tiny, three remat settings: per-device memory and FLOPs of each compiled step; remat
    recomputes the forward pass, so XLA counts more FLOPs; 'config' is the config's own
    setting (remat off in the base config)."""
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, "benchmarks/compiled_memory.py", "--tiny",
                    "--per_device_batch=8", "--remat=off,nothing_saveable,config",
                    f"--json={out}"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["platform"] == "cpu" and result["topology"] is None
    assert result["global_batch"] == 8 * result["devices"] and result["phase"] == "amt"
    assert result["config"].endswith("configs/vit_b.py")
    off, remat, config = result["runs"]
    assert [r["setting"] for r in result["runs"]] == ["off", "nothing_saveable", "config"]
    assert (off["remat"], remat["remat"], config["remat"]) == (False, True, False)
    assert remat["remat_policy"] == "nothing_saveable" and off["remat_policy"] is None
    assert all(r["per_device_batch"] == 8 and r["fits"] is None for r in result["runs"])
    for run in result["runs"]:
        assert run["estimated_peak_gib"] == pytest.approx(
            run["argument_size_gib"] + run["output_size_gib"] - run["alias_size_gib"]
            + run["temp_size_gib"] + run["generated_code_size_gib"])
        assert run["temp_size_gib"] > 0
    assert remat["xla_gflop_per_example"] > 1.1 * off["xla_gflop_per_example"]
    assert config["xla_gflop_per_example"] == pytest.approx(off["xla_gflop_per_example"])


def test_compiled_memory_device_memory_and_remat_settings():
    """TPU chips described by a topology report no memory: their HBM comes from the table, the
    more specific kind first; remat settings map onto the config."""
    class Described:
        def __init__(self, kind):
            self.device_kind = kind

        def memory_stats(self):
            return None

    assert compiled_memory.device_memory_gib(Described("TPU v5 lite")) == 16.0
    assert compiled_memory.device_memory_gib(Described("TPU v5")) == 95.0
    assert compiled_memory.device_memory_gib(Described("TPU v4")) == 32.0
    assert compiled_memory.device_memory_gib(Described("cpu")) is None
    config = helpers.tiny_config(**{"model.remat": True})
    assert compiled_memory.with_remat(config, "config").model.remat
    assert not compiled_memory.with_remat(config, "off").model.remat
    policy = compiled_memory.with_remat(config, "dots_saveable").model
    assert policy.remat and policy.remat_policy == "dots_saveable"
    assert config.model.remat_policy == "nothing_saveable"  # the argument is not changed
