"""Smoke tests: each benchmark script runs at a tiny size and writes the JSON it promises; what
step_time.py's memory mode compiles for each remat setting, its option parsing and the flag
sweep's verdicts; and mvmae_jax.xla_flags, the GPU flag defaults."""

import json
import pathlib
import subprocess
import sys

import helpers
import pytest

from mvmae_jax import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import step_time  # noqa: E402


@pytest.mark.slow
def test_input_pipeline_benchmark(tmp_path):
    """benchmarks/input_pipeline.py --tiny: every pipeline at one core and at all cores, MAE's
    recipe among them, their ratios, the stages at one core and the cores an accelerator
    needs."""
    out = tmp_path / "input.json"
    subprocess.run([sys.executable, "benchmarks/input_pipeline.py", "--tiny", "--repeats=1",
                    f"--json={out}"], cwd=ROOT, check=True, capture_output=True, timeout=900)
    result = json.loads(out.read_text())
    (files,) = result["sets"].values()
    assert files["mean_bytes"] > 0 and set(files["by_cores"]) >= {"1"}
    for row in files["by_cores"].values():
        rates = row["examples_per_s"]
        assert set(rates) == {"tfds", "folder", "mae", "decode_tf", "decode_pil"}
        assert all(rate > 0 for rate in rates.values())
        assert row["ratio_to_mae"]["tfds"] == pytest.approx(rates["tfds"] / rates["mae"])
    stages = [stage["stage"] for stage in files["stages_one_core"]]
    assert stages[0] == "read the bytes" and stages[-1] == "copy to the device"
    assert all(cores > 0 for cores in files["cores_per_accelerator"].values())


# --- benchmarks/step_time.py --mode=memory


@pytest.mark.slow
def test_memory_mode_smoke(tmp_path):
    """--mode=memory --tiny, three remat settings: per-device memory and FLOPs of each
    compiled step; remat recomputes the forward pass, so XLA counts more FLOPs; 'config' is
    the config's own setting (remat off in the base config)."""
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, "benchmarks/step_time.py", "--mode=memory", "--tiny",
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


@pytest.mark.slow
def test_two_slices_only_the_gradient_reduction_crosses(tmp_path):
    """Compiled for two TPU v4 slices of 2x2 chips (libtpu's ahead-of-time compiler, no TPU),
    MAE with FSDP inside each slice (mesh data 2 x fsdp 4, one slice per row): parameters are
    gathered within a slice and only all-reduces (the gradients') cross slices. With FSDP
    over both slices (fsdp 8) parameter all-gathers cross them too."""
    pytest.importorskip("libtpu", reason="the TPU compiler is not installed (pip install "
                        "'libtpu==0.0.42.*', the version jax[tpu]==0.10.2 pins)")
    crossing = {}
    for fsdp in (4, 8):
        out = tmp_path / f"fsdp{fsdp}.json"
        subprocess.run([sys.executable, "benchmarks/step_time.py", "--mode=memory", "--tiny",
                        "--topology=v4:2x2x1", "--chip_config=megacore", "--num_slices=2",
                        "--per_device_batch=4", "--config.masking.strategy=random",
                        "--config.contrastive.weight=0", "--config.sharding.strategy=fsdp",
                        f"--config.sharding.fsdp_axis_size={fsdp}",
                        "--config.sharding.fsdp_min_size=0", f"--json={out}"],
                       cwd=ROOT, check=True, capture_output=True, timeout=900)
        (run,) = json.loads(out.read_text())["runs"]
        assert run["mesh"] == {"data": 8 // fsdp, "fsdp": fsdp}
        crossing[fsdp] = {c["kind"] for c in run["across_slices"]}
        assert run["collectives"]["all-gather, within slices"]["count"] > 0
    assert all(sorted(set(row)) == [i] for i, row in enumerate(
        json.loads((tmp_path / "fsdp4.json").read_text())["runs"][0]["mesh_slices"]))
    assert crossing[4] == {"all-reduce"}
    assert "all-gather" in crossing[8]


def test_collectives_are_read_from_the_compiled_text():
    """XLA's collectives count within a slice, sends to the multi-slice runtime across."""
    hlo = "\n".join([
        "  %all-gather-start.1 = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%p), "
        "channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}",
        "  %all-reduce.2 = (f32[8]{0}, f32[4]{0}) all-reduce(%a, %b), replica_groups={{0,1}}",
        "  %all-gather-done.1 = bf16[16,8]{1,0} all-gather-done(%all-gather-start.1)",
        '  %send.1 = (f32[8,1,128]{2,1,0}, u32[], token[]) send(%x, %t), channel_id=5, '
        'is_host_transfer=true, frontend_attributes={_xla_host_transfer_rendezvous='
        '"reduce-scatter.5_0",_xla_megascale_transfer_type="REDUCE_SCATTER"}',
    ])
    found = step_time.collectives(hlo)
    assert [(c["kind"], c["bytes"], c["crosses_slices"]) for c in found] == [
        ("all-gather", 256, False), ("all-reduce", 48, False), ("reduce-scatter", 4096, True)]
    assert step_time.collective_totals(found)["reduce-scatter, across slices"] == {
        "count": 1, "mib": 4096 / 2**20}


def test_memory_mode_device_memory_and_remat_settings():
    """TPU chips described by a topology report no memory: their HBM comes from the table, the
    more specific kind first; remat settings map onto the config."""
    class Described:
        def __init__(self, kind):
            self.device_kind = kind

        def memory_stats(self):
            return None

    assert step_time.device_memory_gib(Described("TPU v5 lite")) == 16.0
    assert step_time.device_memory_gib(Described("TPU v5")) == 95.0
    assert step_time.device_memory_gib(Described("TPU v4")) == 32.0
    assert step_time.device_memory_gib(Described("cpu")) is None
    config = helpers.tiny_config(**{"model.remat": True})
    assert step_time.with_remat(config, "config").model.remat
    assert not step_time.with_remat(config, "off").model.remat
    policy = step_time.with_remat(config, "dots_saveable").model
    assert policy.remat and policy.remat_policy == "dots_saveable"
    assert config.model.remat_policy == "nothing_saveable"  # the argument is not changed


# --- step_time.py: XLA options and the flag sweep


def test_parse_options_types_and_empty_values():
    """Booleans and integers become typed options; the empty value (command buffers off)
    stays an empty string; a missing '=' is an error."""
    assert step_time.parse_options(["xla_gpu_enable_triton_gemm=false",
                                    "--xla_gpu_autotune_level=0",
                                    "xla_gpu_enable_command_buffer=",
                                    "xla_enable_command_buffers_during_profiling=True"]) == {
        "xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": 0,
        "xla_gpu_enable_command_buffer": "",
        "xla_enable_command_buffers_during_profiling": True}
    with pytest.raises(Exception, match="name=value"):
        step_time.parse_options(["xla_gpu_enable_triton_gemm"])


@pytest.mark.parametrize("ratios, verdict", [
    ([0.95, 0.97], "winner"),
    ([0.95, 0.99], "no clear difference"),  # not faster by 2% in every pair
    ([1.05, 1.03], "loser"),
    ([0.90, 1.10], "no clear difference"),
    ([0.90], "too few pairs"),
    ([], "too few pairs"),
])
def test_flag_verdict(ratios, verdict):
    assert step_time.flag_verdict(ratios) == verdict


def test_the_sweeps_flags_compile_on_this_cpu():
    """Every candidate of the sweep and the command-buffer switch are options this XLA knows
    (an unknown one raises): on the CPU they compile and change nothing."""
    import jax
    import jax.numpy as jnp

    lowered = jax.jit(lambda x: x @ x + 1).lower(jnp.ones((4, 4)))
    options = step_time.parse_options(list(step_time.XLA_FLAG_CANDIDATES))
    options.update(step_time.COMMAND_BUFFERS_OFF, **step_time.SEARCH_OPTIONS,
                   xla_enable_command_buffers_during_profiling=True)
    for name, value in options.items():
        compiled = lowered.compile(compiler_options={name: value})
        assert float(compiled(jnp.ones((4, 4))).sum()) == 80.0, name
    with pytest.raises(Exception, match="xla_no_such_option"):
        lowered.compile(compiler_options={"xla_no_such_option": True})


# --- mvmae_jax/xla_flags.py


def test_gpu_defaults_are_appended_on_gpus_only(monkeypatch):
    """On a GPU platform each default joins XLA_FLAGS unless the user set that flag, whatever
    its value; on the CPU nothing changes."""
    defaults = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_cublaslt=true")
    env = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_gpu_enable_cublaslt=false"}
    assert xla_flags.apply_gpu_defaults(env, defaults) == ["--xla_gpu_enable_triton_gemm=false"]
    assert env["XLA_FLAGS"] == ("--xla_gpu_enable_cublaslt=false "
                                "--xla_gpu_enable_triton_gemm=false")
    assert xla_flags.apply_gpu_defaults(env, defaults) == []  # a second call adds nothing
    env = {"JAX_PLATFORMS": "gpu"}
    assert xla_flags.apply_gpu_defaults(env, defaults) == list(defaults)
    assert env["XLA_FLAGS"] == " ".join(defaults)
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.apply_gpu_defaults(env, defaults) == []
    assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.apply_gpu_defaults({"JAX_PLATFORMS": "cuda"}, ()) == []


def test_platform_without_jax_platforms_follows_the_cuda_plugin(monkeypatch):
    """JAX_PLATFORMS unset: a GPU exactly when a CUDA plugin is installed; the first platform
    named decides otherwise (JAX_PLATFORM_NAME too)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: (
        object() if name == "jax_cuda12_plugin" else real(name)))
    assert xla_flags.platform_is_gpu({})
    assert not xla_flags.platform_is_gpu({"JAX_PLATFORMS": "cpu"})
    assert xla_flags.platform_is_gpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert not xla_flags.platform_is_gpu({"JAX_PLATFORMS": "tpu,cuda"})
    assert xla_flags.platform_is_gpu({"JAX_PLATFORM_NAME": "gpu"})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not xla_flags.platform_is_gpu({})
    assert xla_flags.apply_gpu_defaults({}, ("--xla_gpu_enable_cublaslt=true",)) == []


def test_no_gpu_default_without_a_measurement():
    """A flag enters GPU_DEFAULTS with the GPU measurement that justifies it
    (docs/benchmarks.md); none has been measured."""
    assert xla_flags.GPU_DEFAULTS == ()
    assert xla_flags.flag_name("--xla_gpu_enable_triton_gemm=false") == (
        "xla_gpu_enable_triton_gemm")
