"""Helpers of the training loop: preemption, the state's size, throughput and the console."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mvmae_jax.hardware import peak_flops


class PreemptionWatcher:
    """Becomes true after SIGTERM (SLURM, GCE) or at orbax's preemption sync point (TPU
    maintenance events; on multi-host runs every host reaches it at the same step)."""

    def __init__(self, manager):
        self._manager = manager
        self.signalled = False
        if jax.process_count() == 1:
            # Multi-host runs leave SIGTERM to JAX's preemption service, which syncs hosts.
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: checkpointing after this step, then exiting.")
        self.signalled = True

    def should_stop(self, step: int) -> bool:
        return self.signalled or self._manager.reached_preemption(step)


def state_bytes(state: Any) -> tuple[int, int]:
    """(bytes on one device, bytes in total) of a pytree of global arrays."""
    leaves = jax.tree.leaves(state)
    per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    return per_device, sum(x.nbytes for x in leaves)


def count_params(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def duration(seconds: float) -> str:
    """4h02m, 3m12s or 41s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def xla_flops(compiled) -> float | None:
    """FLOPs of one device's program from XLA's cost analysis, or None when the backend gives
    none (a dict, or in older JAX a list of one dict per program)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or cost.get("flops", -1) < 0:
        return None
    return float(cost["flops"])


class Throughput:
    """Images per second, model FLOP utilisation and the share of time spent waiting for input
    over each logging interval."""

    def __init__(self, batch_size: int, start_step: int):
        self._batch_size = batch_size
        self._devices = jax.device_count()
        self._peak = peak_flops(jax.devices()[0].device_kind)
        self._step = start_step
        self._time = time.time()
        self._input_wait = 0.0
        self._flops = 0.0  # per device, summed over the interval's steps

    def add_step(self, input_wait_s: float, flops_per_device: float | None):
        self._input_wait += input_wait_s
        self._flops += flops_per_device or 0.0

    def measure(self, step: int) -> dict[str, float]:
        """The interval's numbers (the `perf/` scalars); starts the next interval."""
        now = time.time()
        seconds = max(now - self._time, 1e-9)
        steps = step - self._step
        out = {"perf/img_per_s": steps * self._batch_size / seconds,
               "perf/img_per_s_per_device": steps * self._batch_size / seconds / self._devices,
               "perf/input_wait": self._input_wait / seconds}
        if self._peak and self._flops:
            out["perf/mfu"] = self._flops / seconds / self._peak
        self._step, self._time, self._input_wait, self._flops = step, now, 0.0, 0.0
        return out


def progress_line(step: int, total_steps: int, steps_per_epoch: int, phase: str,
                  metrics: Mapping[str, float], perf: Mapping[str, float],
                  seconds_left: float) -> str:
    """`step 110/352 (epoch 5.0, amt) loss 4.1201 rec_loss 0.7130 ... | 412 img/s, input 3%,
    ETA 4m12s`: every metric of the step, loss first."""
    shown = {k: v for k, v in metrics.items() if k not in ("finite", "lr")}
    names = ["loss"] + sorted(k for k in shown if k != "loss")
    values = " ".join(f"{k} {shown[k]:.4g}" for k in names if k in shown)
    speed = f"{perf['perf/img_per_s']:.0f} img/s"
    if "perf/mfu" in perf:
        speed += f", MFU {100 * perf['perf/mfu']:.1f}%"
    return (f"step {step}/{total_steps} (epoch {step / steps_per_epoch:.1f}, {phase}) {values} | "
            f"{speed}, input {100 * perf['perf/input_wait']:.0f}%, ETA {duration(seconds_left)}")
