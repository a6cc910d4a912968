"""Helpers of the training loop: preemption, the state's size, throughput and the console."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax

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


def duration(seconds: float) -> str:
    """4h02m, 3m12s or 41s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def xla_flops(compiled) -> float | None:
    """FLOPs of one device's program from XLA's cost analysis, None where the backend gives none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if not cost or cost.get("flops", -1) < 0:
        return None
    return float(cost["flops"])


class Throughput:
    """Images per second, model FLOP utilisation and the time share spent waiting for input over
    each logging interval."""

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


def plural(count: int, noun: str) -> str:
    """`1 device`, `8 devices`, `2 processes`."""
    if count == 1:
        return f"1 {noun}"
    return f"{count} {noun}{'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else 's'}"


# Console names of the step's scalars; the rest stay in metrics.jsonl, so that a progress line
# fits in 120 characters.
CONSOLE_NAMES = {"rec_loss": "rec", "con_loss": "con"}
NOT_ON_CONSOLE = ("finite", "lr", "grad_norm")


def _number(value: float) -> str:
    """4.217, 1.890, 0.008, 251.3: five characters for most values."""
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.4g}"


def progress_line(step: int, total_steps: int, steps_per_epoch: int, phase: str,
                  metrics: Mapping[str, float], perf: Mapping[str, float],
                  seconds_left: float) -> str:
    """`step 176/352 (epoch 8.0, amt) loss 4.217 con 3.512 rec 0.716 | 128 img/s, ETA 1m20s`."""
    shown = sorted(k for k in metrics if k not in NOT_ON_CONSOLE and k != "loss")
    names = (["loss"] if "loss" in metrics else []) + shown
    values = " ".join(f"{CONSOLE_NAMES.get(k, k)} {_number(metrics[k])}" for k in names)
    return (f"step {step}/{total_steps} (epoch {step / steps_per_epoch:.1f}, {phase}) {values} | "
            f"{perf['perf/img_per_s']:.0f} img/s, ETA {duration(seconds_left)}")
