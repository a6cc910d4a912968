"""Per-device memory of the compiled pretraining step, for remat policies and batch sizes, on
this machine's devices or on a TPU topology compiled for ahead of time without a TPU.

Nothing runs: the trainer's step (`train_step.make_train_step`, sharded as the trainer shards
it) is lowered on abstract state and batch and compiled, and XLA's buffer assignment says what
each device needs (arguments, outputs, temporaries; `estimated_peak_bytes`), with XLA's FLOP
count. With `--topology`, the compiler is the TPU's own (libtpu's deviceless ahead-of-time
compilation): whether a config fits a TPU chip can be checked from any machine with libtpu
installed (`pip install "jax[tpu]"`), before the pod is booked.

  python benchmarks/compiled_memory.py --topology=v4:2x2x1 --chip_config=megacore \\
      --per_device_batch=128 --remat=off,nothing_saveable,dots_with_no_batch_dims_saveable \\
      --json=/tmp/vit_b_v4.json                 # configs/vit_b.py on TPU v4 chips
  python benchmarks/compiled_memory.py --tiny --remat=off,nothing_saveable --json=/tmp/m.json

`--remat` lists what to compile: "config" (the config's own setting), "off", or a policy of
`config.model.remat_policy` (remat on). The XLA CPU compiler keeps every activation whatever
the policy (docs/benchmarks.md, "Remat"), so CPU numbers do not show what remat saves.
"""

from __future__ import annotations

import importlib.metadata
import time
from typing import Any

import bench_lib
import ml_collections
import train_throughput
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS

# HBM per chip, GiB, matched in order against `device_kind` (lower case), as PEAK_BF16_FLOPS;
# TPU devices described by a topology report no memory statistics of their own.
TPU_MEMORY_GIB: tuple[tuple[str, float], ...] = (
    ("tpu v4", 32.0),
    ("tpu v5 lite", 16.0),
    ("tpu v5e", 16.0),
    ("tpu v5p", 95.0),
    ("tpu v5", 95.0),
    ("tpu v6 lite", 32.0),
)
CONFIG_SETTING = "config"
REMAT_OFF = "off"


def define_flags() -> None:
    train_throughput.define_config_flags()
    flags.DEFINE_string("topology", "", "A TPU topology to compile for without a TPU, e.g. "
                        "'v4:2x2x1', 'v5e:2x2' (needs libtpu); empty: this machine's devices.")
    flags.DEFINE_string("chip_config", "default", "TPU chip configuration: 'default', or "
                        "'megacore' (v4, v5p: one device per chip, as JAX runs them).")
    flags.DEFINE_integer("per_device_batch", 0, "Examples per device (the global batch is this "
                         "times the devices); 0 keeps config.batch_size.")
    flags.DEFINE_list("remat", [CONFIG_SETTING], "What to compile, in order: 'config', 'off', "
                      "or a remat policy name.")
    flags.DEFINE_integer("num_examples", 1_281_167, "Rows of the AMT bank.")


def topology_devices(topology: str, chip_config: str) -> list:
    """The devices of a TPU topology 'v4:2x2x1' (kind:bounds), described by libtpu for
    ahead-of-time compilation; hosts of at most 2x2x1 chips, as TPU VMs have."""
    from jax.experimental import topologies

    _, _, bounds = topology.partition(":")
    chips = tuple(int(n) for n in bounds.split("x"))
    per_host = (tuple(min(n, 2) for n in chips[:2]) + (1,) * 3)[:3]
    description = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name=chip_config,
        chips_per_host_bounds=per_host, num_slices=1)
    return list(description.devices)


def device_memory_gib(device) -> float | None:
    """Memory of one device: its allocator limit where it reports one, else the HBM of its TPU
    chip kind (`TPU_MEMORY_GIB`), else None."""
    limit = train_throughput.device_memory_limit(device)
    if limit:
        return limit / 2**30
    return bench_lib.match_device_kind(TPU_MEMORY_GIB, device.device_kind)


def with_remat(config: ml_collections.ConfigDict, setting: str) -> ml_collections.ConfigDict:
    """`config` with remat as `setting` says ('config', 'off' or a policy name)."""
    if setting == CONFIG_SETTING:
        return bench_lib.config_variant(config)
    if setting == REMAT_OFF:
        return bench_lib.config_variant(config, model__remat=False)
    return bench_lib.config_variant(config, model__remat=True, model__remat_policy=setting)


def compile_once(config: ml_collections.ConfigDict, phase: str, num_examples: int,
                 devices: list | None) -> dict[str, Any]:
    """Compiles the step of `config` over `devices`; its per-device memory (GiB) and FLOPs."""
    start = time.perf_counter()
    compiled, memory, mesh = train_throughput.compile_abstract_step(config, phase, num_examples,
                                                                    devices)
    per_device = config.batch_size // mesh.size
    flops = train_throughput.xla_flops(compiled)
    return {
        "remat": config.model.remat,
        "remat_policy": config.model.remat_policy if config.model.remat else None,
        "per_device_batch": per_device,
        "compile_s": time.perf_counter() - start,
        **{key.replace("_in_bytes", "_gib").replace("_bytes", "_gib"): value / 2**30
           for key, value in memory.items()},
        "xla_gflop_per_example": flops / per_device / 1e9 if flops else None,
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax

    config, phase = train_throughput.config_and_phase()
    if FLAGS.topology and FLAGS.dtype == "auto":
        config.model.dtype = "bfloat16"  # 'auto' read this machine's backend, not the TPU's
    devices = topology_devices(FLAGS.topology, FLAGS.chip_config) if FLAGS.topology else None
    device_list = devices or jax.devices()
    if FLAGS.per_device_batch:
        config.batch_size = FLAGS.per_device_batch * len(device_list)
    memory_gib = device_memory_gib(device_list[0])
    runs = []
    for setting in FLAGS.remat:
        run = compile_once(with_remat(config, setting), phase, FLAGS.num_examples, devices)
        run["setting"] = setting
        run["fits"] = (run["estimated_peak_gib"] <= memory_gib) if memory_gib else None
        print(f"[compiled_memory] {setting}: {run['estimated_peak_gib']:.2f} GiB per device "
              f"(temporaries {run['temp_size_gib']:.2f}), {run['compile_s']:.0f} s to compile",
              flush=True)
        runs.append(run)
    result = {
        "config": config_flags.get_config_filename(FLAGS["config"]),
        "model": config.model.variant or f"width {config.model.width}",
        "phase": phase, "dtype": config.model.dtype, "views": config.views.num,
        "global_batch": config.batch_size, "devices": len(device_list),
        "device_kind": device_list[0].device_kind, "platform": device_list[0].platform,
        "topology": FLAGS.topology or None, "chip_config": FLAGS.chip_config,
        "device_memory_gib": memory_gib, "jax": jax.__version__,
        "libtpu": importlib.metadata.version("libtpu") if FLAGS.topology else None, "runs": runs,
        "machine": bench_lib.machine_info(),
    }
    bench_lib.write_json(result, FLAGS.json)


if __name__ == "__main__":
    define_flags()
    app.run(main)
