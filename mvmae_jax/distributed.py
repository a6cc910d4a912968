"""Joins this process to a multi-process JAX run (coordinator flags, or a cluster JAX reads from
the environment); a single-machine run never waits for a coordinator."""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence

import jax

# What JAX's SLURM detection reads; a job's batch script alone (no srun) lacks the step's.
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _int(env: Mapping[str, str], name: str, default: int = 0) -> int:
    value = env.get(name, "")
    return int(value) if value.isdigit() else default


def _on_cloud_tpu_vm() -> bool:
    """libtpu installed and TPU chips attached (/dev/accel* on v2-v4, /dev/vfio/N from v5)."""
    return importlib.util.find_spec("libtpu") is not None and bool(
        glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def detect_cluster(env: Mapping[str, str] | None = None, on_tpu_vm: bool | None = None
                   ) -> str | None:
    """The cluster environment that `jax.distributed.initialize()` can configure itself from,
    or None: "env" (JAX_COORDINATOR_ADDRESS), "slurm" (an srun step of more than one task),
    "openmpi" (mpirun), "cloud_tpu" (a Cloud TPU VM)."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    if all(name in env for name in _SLURM) and _int(env, "SLURM_NTASKS") > 1:
        return "slurm"  # One task needs no coordinator.
    if "OMPI_MCA_orte_hnp_uri" in env and _int(env, "OMPI_COMM_WORLD_SIZE", 2) > 1:
        return "openmpi"
    return "cloud_tpu" if (_on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm) else None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None) -> bool:
    """Initialises jax.distributed (before any JAX backend starts) if settings are given or a
    cluster is detected; returns whether it did. JAX fills in the settings left as None."""
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id,
                                            local_device_ids))
    cluster = None if explicit else detect_cluster()
    if not explicit and cluster is None:
        return False
    # Processes on the CPU need gloo for collectives between them (accelerators ignore it).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    logging.info("jax.distributed initialised (%s): process %d of %d, %d local devices of %d.",
                 "flags" if explicit else cluster, jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True
