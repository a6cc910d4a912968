"""The training benchmarks (benchmarks/step_time.py, pytorch_reference.py).

The FLOP count behind MFU is checked against the matrix products in the traced training step,
the PyTorch reference's objective against ours on the same weights, masks and images, and
both scripts run at a tiny size, the reference compared with ours, and write the JSON they
promise.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.extend.core as jex
import numpy as np
import pytest
import torch
from absl import app
from helpers import smooth_images, tiny_config

from mvmae_jax import hardware, masking

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_lib  # noqa: E402
import pytorch_reference as ref  # noqa: E402
import step_time  # noqa: E402

# --------------------------------------------------------------------------------------------
# An independent FLOP count: every matrix product and convolution in a traced step.


def _jaxpr_matmul_flops(jaxpr: jex.Jaxpr, times: int = 1) -> int:
    """2 x multiply-adds of every dot_general and conv_general_dilated, sub-jaxprs included
    (a scan's body `length` times)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = math.prod(eqn.outvars[0].aval.shape)
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += times * 2 * out * math.prod(lhs[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            assert eqn.params["batch_group_count"] == 1
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            macs_per_output = math.prod(rhs) // out_features // eqn.params["feature_group_count"]
            total += times * 2 * out * macs_per_output
        assert name != "while", "a while loop's trip count is unknown to this count"
        inner = times * (eqn.params["length"] if name == "scan" else 1)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jex.ClosedJaxpr):
                    total += _jaxpr_matmul_flops(sub.jaxpr, inner)
                elif isinstance(sub, jex.Jaxpr):
                    total += _jaxpr_matmul_flops(sub, inner)
    return total


def _traced_step_flops(config, phase: str) -> int:
    run = step_time.build(config, phase, 64, abstract=True)
    return _jaxpr_matmul_flops(run.step.trace(run.state, run.batch).jaxpr.jaxpr)


MAE_ONE_VIEW = {"views.num": 1, "contrastive.weight": 0.0, "masking.strategy": "random",
                "masking.mask_ratio": 0.75, "masking.throw_ratio": 0.0}


@pytest.mark.parametrize("overrides, phase", [
    ({}, "amt"),  # MV-MAE, AMT with the bank, masking and throwing
    (MAE_ONE_VIEW, "random"),
    ({"amt.source": "online"}, "amt"),  # an extra no-gradient encoder pass
    ({"grad_accum_steps": 2, "batch_size": 16, "contrastive.num_layers": 1,
      "contrastive.pool": "mean", "model.decoder_depth": 2},
     "warmup"),  # the AMT warm-up phase, in two microbatches with the gradient cache
], ids=["mvmae_amt_bank", "mae", "amt_online", "accumulated_warmup"])
def test_analytic_flops_equal_the_traced_steps_matmuls(overrides, phase):
    """The count behind MFU is exactly the matmul and convolution FLOPs of the compiled
    step: the patch embedding of the visible patches, encoder, decoder, heads, backward (and
    the gradient cache's extra forward, counted apart)."""
    config = tiny_config(**overrides)
    online = bench_lib.computes_online_maps(config, phase)
    assert online == (overrides.get("amt.source") == "online")
    flops = bench_lib.analytic_train_flops(config, phase, online_maps=online)
    assert (flops["gradient_cache_forward"] > 0) == (config.grad_accum_steps > 1)
    assert flops["model"] + flops["gradient_cache_forward"] == _traced_step_flops(config, phase)


def test_peak_flops_table():
    """Matched on JAX's and torch's device-kind strings, the specific names first."""
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert hardware.peak_flops("NVIDIA H200") == 989e12
    assert hardware.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert hardware.peak_flops("TPU v4") == 275e12
    assert hardware.peak_flops("TPU v5 lite") == 197e12
    assert hardware.peak_flops("TPU v5e") == 197e12
    assert hardware.peak_flops("TPU v5p") == 459e12
    assert hardware.peak_flops("TPU v5") == 459e12
    assert hardware.peak_flops("TPU v6 lite") == 918e12
    assert hardware.peak_flops("cpu") is None


# --------------------------------------------------------------------------------------------
# The experiments' runs and ratios.


def _summary(run, phase):
    return (run.views.num, run.contrastive.weight, run.masking.strategy,
            *bench_lib.phase_ratios(run, phase), phase)


def test_experiment_runs_vary_one_thing_each():
    config = tiny_config()  # MV-MAE + AMT, mask 0.5 / throw 0.25
    runs = bench_lib.experiment_runs(config, "amt", ["amt_throw", "amt_overhead", "mvmae"])
    got = {name: _summary(*run) for name, run in runs.items()}
    assert got == {
        "main": (2, 1.0, "amt", 0.5, 0.25, "amt"),
        "amt": (2, 1.0, "amt", 0.45, 0.40, "amt"),
        "no_throw": (2, 1.0, "random", 0.75, 0.0, "random"),
        "random_same_counts": (2, 1.0, "random", 0.45, 0.40, "random"),
        "mvmae": (2, 1.0, "amt", 0.5, 0.25, "amt"),
        "mae": (1, 0.0, "amt", 0.5, 0.25, "amt"),
    }
    assert config.masking.mask_ratio == 0.5  # the base config is left as it was
    # The warm-up phase of an AMT config: random masking at the warm-up ratio on both sides.
    warmup = bench_lib.experiment_runs(config, "warmup", ["mvmae"])
    assert _summary(*warmup["mvmae"]) == (2, 1.0, "random", 0.75, 0.0, "random")
    assert _summary(*warmup["mae"]) == (1, 0.0, "random", 0.75, 0.0, "random")
    with pytest.raises(ValueError, match="unknown experiments"):
        bench_lib.experiment_runs(config, "amt", ["speed"])


def _run_name(runs, config, phase) -> str:
    """The first of `runs` with this config and phase."""
    return next(n for n, (c, p) in runs.items() if (c.to_json(), p) == (config.to_json(), phase))


def test_identical_runs_are_measured_once_and_ratios():
    """A run equal to an earlier one is copied with `same_as`; the ratios are taken from the
    right runs (amt over no_throw images/s, amt over random step time, per-image cost)."""
    config = tiny_config(**MAE_ONE_VIEW)
    experiments = ["amt_throw", "amt_overhead", "mvmae"]
    runs = bench_lib.experiment_runs(config, "random", experiments)
    step_s = {"main": 2.0, "amt": 1.0, "random_same_counts": 0.8, "mvmae": 3.0}
    calls = []

    def measure(run, phase):
        name = _run_name(runs, run, phase)
        calls.append(name)
        return {"step_s": step_s[name], "batch": run.batch_size,
                "img_per_s": run.batch_size / step_s[name], "flops_analytic_per_image": 1.0}

    result = bench_lib.measure_experiments(config, "random", experiments, measure,
                                           lambda c: (c, measure(c, "random"), None))
    measured = result["runs"]
    assert calls == ["main", "amt", "random_same_counts", "mvmae"]
    assert measured["no_throw"]["same_as"] == "main" and measured["mae"]["same_as"] == "main"
    summary = {key: result[key] for key, *_ in bench_lib.EXPERIMENTS.values() if key in result}
    assert summary == pytest.approx({"amt_throw_speedup": 2.0, "amt_masking_overhead": 0.25,
                                     "mvmae_over_mae_cost": 1.5})
    assert result["step_s"] == 2.0 and result["max_batch_search"] is None


def test_a_failed_experiment_run_is_reported_and_the_others_go_on():
    """A run that raises (a shape a kernel refuses) becomes {"error": ...}; the ratios that
    need it are left out."""
    config = tiny_config()
    runs = bench_lib.experiment_runs(config, "amt", ["amt_throw", "mvmae"])

    def measure(run, phase):
        if _run_name(runs, run, phase) == "amt":
            raise NotImplementedError("first line\nUnsupported sequence length Q 197, KV 197")
        return {"step_s": 1.0, "batch": run.batch_size, "img_per_s": float(run.batch_size),
                "flops_analytic_per_image": 1.0}

    result = bench_lib.measure_experiments(config, "amt", ["amt_throw", "mvmae"], measure,
                                           lambda c: (c, measure(c, "amt"), None))
    measured = result["runs"]
    assert measured["amt"] == {
        "error": "NotImplementedError: Unsupported sequence length Q 197, KV 197"}
    assert "img_per_s" in measured["no_throw"] and "img_per_s" in measured["mae"]
    assert [key for key, *_ in bench_lib.EXPERIMENTS.values() if key in result] == [
        "mvmae_over_mae_cost"]


def _largest_fitting(memory_at, limit: float, granularity: int, top: int = 100_000) -> int:
    return max(b for b in range(granularity, top, granularity) if memory_at(b) <= limit)


def test_search_largest_batch_linear_memory_takes_three_probes():
    """Step memory is a fixed part plus a part per example: the line through the first two
    probes lands on the answer, and the line through the fitting ones says the next multiple
    does not fit."""
    def memory_at(batch):
        return 5000 + 300 * batch

    limit = 5000 + 300 * 203
    batch, details = bench_lib.search_largest_batch(memory_at, 16, limit, 8)
    assert batch == 200 == _largest_fitting(memory_at, limit, 8)
    assert details["probe_batches"] == [16, 32, 200]
    assert details["smallest_over"] is None and details["largest_fitting"] == 200


@pytest.mark.parametrize("start", [8, 64, 256, 4096])
@pytest.mark.parametrize("limit", [2e5, 1e6, 3.3e6, 5e7])
def test_search_largest_batch_finds_the_largest_that_fits(start, limit):
    """Memory growing faster than linearly (the line overestimates the room), an allocation
    that fails outright above 3000 (math.inf), any start: the largest fitting multiple of the
    granularity, in a bounded number of probes."""
    def memory_at(batch):
        return math.inf if batch > 3000 else 1000 + 40 * batch + 0.3 * batch**2

    batch, details = bench_lib.search_largest_batch(memory_at, start, limit, 8)
    assert batch == _largest_fitting(memory_at, limit, 8, top=3008)
    assert len(details["probe_batches"]) <= 16


def test_search_largest_batch_when_nothing_fits():
    with pytest.raises(RuntimeError, match="even a batch of 8"):
        bench_lib.search_largest_batch(lambda b: 1e9, 64, 1e6, 8)


def test_largest_batch_per_device_out_of_memory_and_the_retry():
    """The search runs on per-device batches (the config holds the global one); an
    out-of-memory error while probing counts as too much memory, while timing it moves 10%
    lower; any other error is raised."""
    class OutOfMemory(Exception):
        pass

    def memory_at(config):
        if config.batch_size > 4 * 1000:
            raise OutOfMemory
        return 1000 + 10 * config.batch_size

    timed = []

    def measure_at(config):
        timed.append(config.batch_size // 4)
        if config.batch_size > 4 * 150:
            raise OutOfMemory
        return {"batch": config.batch_size}

    def largest(limit, measure=measure_at):
        return bench_lib.largest_batch(tiny_config(batch_size=64), memory_at, measure,
                                       lambda error: isinstance(error, OutOfMemory), limit, 4)

    config, run, search = largest(1000 + 40 * 203)
    assert timed == [200, 176, 152, 136] and search["failed_batches"] == [200, 176, 152]
    assert config.batch_size == run["batch"] == 4 * 136 and search["per_device_batch"] == 136
    assert search["probe_batches"][0] == 16 and search["largest_fitting"] == 200
    assert largest(1e9)[2]["largest_fitting"] == 1000  # probes over 1000 ran out of memory

    def fails(config):
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        largest(1e5, measure=fails)


# --------------------------------------------------------------------------------------------
# The PyTorch reference computes our objective.


def _linear(dense) -> dict[str, torch.Tensor]:
    return {"weight": torch.from_numpy(np.asarray(dense["kernel"]).T.copy()),
            "bias": torch.from_numpy(np.array(dense["bias"]))}


def _torch_state(params, config, model) -> dict[str, torch.Tensor]:
    """Our parameters under the reference's names (timm blocks; MAE's decoder names)."""
    from mvmae_jax import export

    state = export.encoder_to_timm(jax.device_get(params["encoder"]), config.img_size)
    state.update(export.decoder_to_mae(jax.device_get(params["decoder"]), model.grid_size[0]))
    state = {k.replace("patch_embed.proj.", "patch_embed."): torch.from_numpy(np.array(v))
             for k, v in state.items() if k not in ("pos_embed", "decoder_pos_embed")}
    if "projection" in params:
        for i in range(config.contrastive.num_layers):
            for name, value in _linear(params["projection"][f"Dense_{i}"]).items():
                state[f"projection.{2 * i}.{name}"] = value
    return state


@pytest.mark.parametrize("overrides", [{}, {**MAE_ONE_VIEW, "norm_pix_loss": False}],
                         ids=["mvmae_throw", "mae"])
def test_torch_reference_objective_equals_ours(overrides):
    """Same weights, images and masks: the reference's reconstruction and contrastive losses
    equal those of our training loss function, with as many parameters."""
    config = tiny_config(**overrides)
    phase = config.masking.strategy
    run = step_time.build(config, phase, config.batch_size, abstract=False)
    model, params = run.model, run.state.params
    batch, views = config.batch_size, config.views.num
    tokens = bench_lib.token_counts(config, phase)
    rng = np.random.default_rng(0)
    images = smooth_images(rng, batch * views, config.img_size).reshape(
        batch, views, config.img_size, config.img_size, 3)
    weights = rng.uniform(size=(batch * views, model.num_patches))
    masks = masking.amt_masking(jax.random.key(1), weights, num_masked=tokens["masked"],
                                num_thrown=tokens["thrown"])
    ours = jax.jit(run.task.loss)(
        params, images, jax.tree.map(lambda m: m.reshape(batch, views, -1), masks))[1]

    reference = ref.build_model(config)
    reference.load_state_dict(_torch_state(params, config, model))
    rows = torch.from_numpy(images).permute(0, 1, 4, 2, 3)  # NHWC → NCHW
    visible, masked = (torch.from_numpy(np.array(m)).long() for m in (masks.visible,
                                                                       masks.masked))
    with torch.no_grad():
        predictions, embeddings = reference(rows.flatten(0, 1), visible, masked)
        rec = ref.reconstruction_loss(predictions, rows.flatten(0, 1), masked,
                                      reference.patch_size, config.norm_pix_loss)
        total = ref.objective(reference, rows, visible, masked, config.norm_pix_loss,
                              config.contrastive.temperature, config.contrastive.weight)
    np.testing.assert_allclose(float(rec), float(ours["rec_loss"]), rtol=2e-5)
    np.testing.assert_allclose(float(total), float(ours["loss"]), rtol=2e-5)
    if views == 2:
        con = ref.info_nce(embeddings.reshape(batch, 2, -1), config.contrastive.temperature)
        np.testing.assert_allclose(float(con), float(ours["con_loss"]), rtol=2e-5)
    else:
        assert embeddings is None
    jax_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert sum(p.numel() for p in reference.parameters()) == jax_count


def test_torch_reference_masks():
    visible, masked = ref.random_masks(6, 16, 7, 5, torch.device("cpu"))
    assert visible.shape == (6, 4) and masked.shape == (6, 7)
    # Visible and masked patches are distinct, and 5 of the 16 are left out (thrown).
    both = torch.cat([visible, masked], dim=1)
    assert all(len(set(row.tolist())) == 11 for row in both)


# --------------------------------------------------------------------------------------------
# Smoke run of the scripts.


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def one_device_environment() -> dict[str, str]:
    """The benchmarks as a user runs them on a one-device machine (the 8 simulated devices of
    conftest.py would only multiply their compile time here)."""
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


@pytest.mark.slow
def test_against_pytorch_smoke(tmp_path):
    """step_time.py, then pytorch_reference.py --ours with its JSON, at --tiny: every
    experiment on both sides, ours / PyTorch per run in the reference's JSON, and our main
    run's profile: XLA operations with their HLO lines."""
    setting = ["--tiny", "--config=configs/mae_b.py", "--config.batch_size=8", "--dtype=auto",
               "--steps=2", "--warmup=1", "--amt_throw", "--mvmae"]
    ours_json, theirs_json = tmp_path / "ours.json", tmp_path / "torch.json"
    for script, args in (
            ("step_time.py", ["--num_examples=64", "--amt_overhead", "--profile_steps=1",
                              f"--json={ours_json}"]),
            ("pytorch_reference.py", [f"--ours={ours_json}", f"--json={theirs_json}"])):
        subprocess.run([sys.executable, f"benchmarks/{script}", *setting, *args], cwd=ROOT,
                       check=True, capture_output=True, timeout=900, env=one_device_environment())
    ours, theirs = (json.loads(path.read_text()) for path in (ours_json, theirs_json))
    for side in (ours, theirs):
        for key in ("img_per_s", "amt_throw_speedup", "mvmae_over_mae_cost"):
            assert _positive(side[key]), key
        assert side["dtype"] == "float32" and side["batch"] == 8
    assert math.isfinite(ours["amt_masking_overhead"]) and theirs["mode"] == "eager"
    assert theirs["ratio"] == pytest.approx(ours["img_per_s"] / theirs["img_per_s"])
    assert theirs["ours"]["amt_throw_speedup"] == ours["amt_throw_speedup"]
    assert set(theirs["ratio_by_run"]) == {"main", "amt", "no_throw", "mvmae", "mae"}
    assert ours["runs"]["main"]["tokens"] == {"num_patches": 16, "masked": 12, "thrown": 0,
                                              "visible": 4}
    assert ours["runs"]["amt"]["tokens"] == {"num_patches": 16, "masked": 7, "thrown": 6,
                                             "visible": 3}
    assert set(ours["runs"]) == {"main", "amt", "no_throw", "random_same_counts", "mvmae",
                                 "mae"}
    assert set(theirs["runs"]) == {"main", "amt", "no_throw", "mvmae", "mae"}
    runs = ours["runs"]
    assert ours["amt_throw_speedup"] == pytest.approx(
        runs["amt"]["img_per_s"] / runs["no_throw"]["img_per_s"])
    for name, run in runs.items():
        assert len(run["step_s_all"]) == 2, name
        for key in ("img_per_s", "step_s", "compile_s", "flops_analytic_per_image",
                    "flops_xla_per_image", "peak_memory_bytes"):
            assert _positive(run[key]), (name, key)
        # XLA counts every operation, the analytic count only the matrix products.
        assert run["flops_analytic_per_image"] <= run["flops_xla_per_image"], name
        twin = theirs["runs"][name] if name in theirs["runs"] else None
        if twin is not None:
            assert twin["flops_analytic_per_image"] == run["flops_analytic_per_image"], name
            assert twin["tokens"] == run["tokens"] and _positive(twin["img_per_s"]), name
    assert runs["mvmae"]["views"] == 2 and runs["mae"]["views"] == 1
    assert ours["mfu"] is None and ours["peak_memory_source"].startswith("process max RSS")
    assert ours["device_count"] == 1  # one_device_environment
    profile = ours["profile"]
    assert profile["steps_traced"] == 1 and profile["ops_ms_per_step"] > 0
    assert profile["top_ops"] and all(op["ms_per_step"] >= 0 for op in profile["top_ops"])
    # Operations of the compiled module are found in its HLO text.
    assert any(" = " in op["hlo"] for op in profile["top_ops"])
    assert sum(profile["by_kind_ms_per_step"].values()) == pytest.approx(
        profile["ops_ms_per_step"], rel=1e-2, abs=1e-2)


def test_the_comparison_refuses_runs_of_different_settings():
    run = {"encoder": {"width": 32}, "img_size": 16, "views": 1, "contrastive": False,
           "tokens": {"masked": 12}, "img_per_s": 4.0, "batch": 8}
    ours = {"runs": {"main": run, "amt": {"error": "refused"}}, "img_per_s": 4.0}
    theirs = {"runs": {"main": dict(run, img_per_s=2.0), "amt": dict(run)}}
    compared = ref.against_ours(ours, theirs)
    assert compared["ratio"] == 2.0 and set(compared["ratio_by_run"]) == {"main"}
    theirs["runs"]["main"]["tokens"] = {"masked": 7}
    with pytest.raises(app.UsageError, match="tokens"):
        ref.against_ours(ours, theirs)


def test_profile_counts_device_kernels_by_hlo_op_on_accelerators():
    """A GPU trace: the kernels on /device: streams, by their hlo_op (else the kernel name);
    host launches are left out. A CPU trace (no /device: process): the host's operations,
    runtime bookkeeping left out."""
    def meta(pid, name):
        return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}

    def span(pid, name, dur, **args):
        return {"ph": "X", "pid": pid, "tid": 1, "name": name, "dur": dur, "args": args}

    gpu_trace = [
        meta(1, "/host:CPU"), meta(2, "/device:GPU:0"),
        span(1, "cuLaunchKernelEx", 5), span(1, "ThunkExecutor::Execute", 9),
        span(2, "loop_add_fusion", 30, hlo_op="add_fusion.3", hlo_module="jit_step"),
        span(2, "loop_add_fusion", 20, hlo_op="add_fusion.3"),
        span(2, "sm90_xmma_gemm_bf16bf16", 100, hlo_op="custom-call.7"),
        span(2, "memcpy_kernel", 4),
    ]
    assert step_time.durations_by_op(gpu_trace) == {
        "add_fusion.3": 50, "custom-call.7": 100, "memcpy_kernel": 4}
    cpu_trace = [meta(1, "/host:CPU"), span(1, "fusion.2", 7), span(1, "fusion.2", 3),
                 span(1, "$profiler.py:151 start_trace", 50), span(1, "ThunkExecutor", 8)]
    assert step_time.durations_by_op(cpu_trace) == {"fusion.2": 10}
