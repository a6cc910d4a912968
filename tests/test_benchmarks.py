"""benchmarks/input_pipeline.py and step_time.py --mode=memory at tiny sizes; step_time's HLO
collectives, device memory, remat settings, XLA options and flag verdicts; mvmae_jax.xla_flags."""

import json
import pathlib
import subprocess
import sys

import helpers
import pytest

from mvmae_jax import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import input_pipeline  # noqa: E402
import step_time  # noqa: E402


def _run(script: str, *args: str, timeout: int = 900) -> None:
    subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, check=True,
                   capture_output=True, timeout=timeout)


@pytest.mark.slow
def test_input_pipeline_benchmark(tmp_path):
    """Every pipeline at one core and at all cores, the ratios to MAE's recipe and the cores
    an accelerator needs."""
    _run("input_pipeline.py", "--tiny", "--repeats=1", f"--json={tmp_path / 'in.json'}")
    (files,) = json.loads((tmp_path / "in.json").read_text())["sets"].values()
    assert files["mean_bytes"] > 0 and "1" in files["by_cores"]
    for row in files["by_cores"].values():
        rates = row["examples_per_s"]
        assert set(rates) == {"tfds", "folder", "mae"}
        assert all(rate > 0 for rate in rates.values())
        assert row["ratio_to_mae"]["tfds"] == pytest.approx(rates["tfds"] / rates["mae"])
        assert row["all_rounds"]["folder"] == [rates["folder"]]
    one_core = files["by_cores"]["1"]["examples_per_s"]["tfds"]
    assert files["cores_per_accelerator"] == {
        name: pytest.approx(rate / one_core) for name, rate in input_pipeline.STEP_RATES.items()}


@pytest.mark.slow
def test_memory_mode_smoke(tmp_path):
    """Per-device memory and FLOPs for each remat setting: remat recomputes the forward pass
    (more FLOPs); 'config' is the config's own setting (off in configs/vit_b.py)."""
    _run("step_time.py", "--mode=memory", "--tiny", "--per_device_batch=8",
         "--remat=off,nothing_saveable,config", f"--json={tmp_path / 'm.json'}")
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["platform"] == "cpu" and result["phase"] == "amt"
    assert result["global_batch"] == 8 * result["devices"]
    off, remat, config = result["runs"]
    assert [r["setting"] for r in result["runs"]] == ["off", "nothing_saveable", "config"]
    assert (off["remat"], remat["remat"], config["remat"]) == (False, True, False)
    assert remat["remat_policy"] == "nothing_saveable" and off["remat_policy"] is None
    for run in result["runs"]:
        assert run["per_device_batch"] == 8 and run["fits"] is None and run["temp_size_gib"] > 0
        assert run["estimated_peak_gib"] == pytest.approx(
            run["argument_size_gib"] + run["output_size_gib"] - run["alias_size_gib"]
            + run["temp_size_gib"] + run["generated_code_size_gib"])
    assert remat["xla_gflop_per_example"] > 1.1 * off["xla_gflop_per_example"]
    assert config["xla_gflop_per_example"] == pytest.approx(off["xla_gflop_per_example"])


@pytest.mark.slow
def test_two_slices_only_the_gradient_reduction_crosses(tmp_path):
    """Two TPU v4 2x2 slices (libtpu's compiler, no TPU), MAE with FSDP inside each slice
    (data 2 x fsdp 4, a slice per row): only all-reduces cross slices; FSDP over both slices
    (fsdp 8): parameter all-gathers cross too."""
    pytest.importorskip("libtpu", reason="the TPU compiler is not installed (pip install "
                        "'libtpu==0.0.42.*', the version jax[tpu]==0.10.2 pins)")
    crossing = {}
    for fsdp in (4, 8):
        out = tmp_path / f"fsdp{fsdp}.json"
        _run("step_time.py", "--mode=memory", "--tiny", "--topology=v4:2x2x1",
             "--chip_config=megacore", "--num_slices=2", "--per_device_batch=4",
             "--config.masking.strategy=random", "--config.contrastive.weight=0",
             "--config.sharding.strategy=fsdp", f"--config.sharding.fsdp_axis_size={fsdp}",
             "--config.sharding.fsdp_min_size=0", f"--json={out}")
        (run,) = json.loads(out.read_text())["runs"]
        assert run["mesh"] == {"data": 8 // fsdp, "fsdp": fsdp}
        assert run["collectives"]["all-gather, within slices"]["count"] > 0
        crossing[fsdp] = {c["kind"] for c in run["across_slices"]}
        if fsdp == 4:
            assert all(sorted(set(row)) == [i] for i, row in enumerate(run["mesh_slices"]))
    assert crossing[4] == {"all-reduce"} and "all-gather" in crossing[8]


def test_collectives_device_memory_and_remat_settings():
    """XLA's collectives count within a slice, sends to the multi-slice runtime across; a
    described TPU chip's memory comes from the table, the more specific kind first; remat
    settings map onto a copy of the config."""
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

    class Described:
        def __init__(self, kind):
            self.device_kind = kind

        def memory_stats(self):
            return None

    for kind, gib in (("TPU v5 lite", 16), ("TPU v5", 95), ("TPU v4", 32), ("cpu", None)):
        assert step_time.device_memory_bytes(Described(kind)) == (gib and gib * 2**30), kind
    config = helpers.tiny_config(**{"model.remat": True})
    assert step_time.with_remat(config, "config").model.remat
    assert not step_time.with_remat(config, "off").model.remat
    policy = step_time.with_remat(config, "dots_saveable").model
    assert policy.remat and policy.remat_policy == "dots_saveable"
    assert config.model.remat_policy == "nothing_saveable"  # the argument is not changed


def test_xla_options_and_flag_verdicts():
    """Booleans are typed, other values stay text for XLA to parse, and each option the
    sweep uses compiles on this CPU without changing the result (an unknown one raises); a
    flag wins or loses only by 2% in every pair of at least two."""
    import jax
    import jax.numpy as jnp

    assert step_time.parse_options(["xla_gpu_enable_triton_gemm=false",
                                    "--xla_gpu_autotune_level=0",
                                    "xla_gpu_enable_command_buffer="]) == {
        "xla_gpu_enable_triton_gemm": False, "xla_gpu_autotune_level": "0",
        "xla_gpu_enable_command_buffer": ""}
    with pytest.raises(Exception, match="name=value"):
        step_time.parse_options(["xla_gpu_enable_triton_gemm"])
    lowered = jax.jit(lambda x: x @ x + 1).lower(jnp.ones((4, 4)))
    options = step_time.parse_options(step_time.XLA_FLAG_CANDIDATES)
    assert options["xla_gpu_enable_command_buffer"] == ""  # CUDA graphs off is swept too
    options.update(step_time.SEARCH_OPTIONS)
    for name, value in options.items():
        compiled = lowered.compile(compiler_options={name: value})
        assert float(compiled(jnp.ones((4, 4))).sum()) == 80.0, name
    with pytest.raises(Exception, match="xla_no_such_option"):
        lowered.compile(compiler_options={"xla_no_such_option": True})
    verdicts = {(0.95, 0.97): "winner", (0.95, 0.99): "no clear difference",
                (1.05, 1.03): "loser", (0.90, 1.10): "no clear difference",
                (0.90,): "too few pairs", (): "too few pairs"}
    assert {r: step_time.flag_verdict(list(r)) for r in verdicts} == verdicts


def test_gpu_defaults_are_appended_on_gpus_only(monkeypatch):
    """On a GPU platform each default joins XLA_FLAGS unless the user set that flag; on the
    CPU nothing changes; without JAX_PLATFORMS a CUDA plugin decides. None is measured yet."""
    import importlib.util

    defaults = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_cublaslt=true")
    env = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_gpu_enable_cublaslt=false"}
    assert xla_flags.apply_gpu_defaults(env, defaults) == ["--xla_gpu_enable_triton_gemm=false"]
    assert env["XLA_FLAGS"] == ("--xla_gpu_enable_cublaslt=false "
                                "--xla_gpu_enable_triton_gemm=false")
    assert xla_flags.apply_gpu_defaults(env, defaults) == []  # a second call adds nothing
    env = {"JAX_PLATFORMS": "gpu"}
    assert xla_flags.apply_gpu_defaults(env, defaults) == list(defaults)
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_flags.apply_gpu_defaults(env, defaults) == []
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: (
        object() if name == "jax_cuda12_plugin" else real(name)))
    assert xla_flags.platform_is_gpu({})
    assert xla_flags.platform_is_gpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert not xla_flags.platform_is_gpu({"JAX_PLATFORMS": "tpu,cuda"})
    assert xla_flags.platform_is_gpu({"JAX_PLATFORM_NAME": "gpu"})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not xla_flags.platform_is_gpu({})
    assert xla_flags.GPU_DEFAULTS == ()
    assert xla_flags.flag_name("--xla_gpu_enable_triton_gemm=false") == (
        "xla_gpu_enable_triton_gemm")
