"""The project's XLA flag defaults for GPUs: `apply_gpu_defaults()` adds them to XLA_FLAGS,
leaving the user's flags alone. The trainer and the benchmarks call it before JAX starts a
backend, deciding from JAX_PLATFORMS and the installed CUDA plugins alone."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import MutableMapping, Sequence

# A flag belongs here only with a GPU measurement that shows it faster (benchmarks/gpu_suite.py's
# `xla_flags` step; docs/benchmarks.md, "GPU speed", lists the candidates). None is measured yet.
GPU_DEFAULTS: tuple[str, ...] = ()

_GPU_PLATFORMS = ("cuda", "gpu", "rocm")
# Modules of JAX's CUDA plugins (pip's jax[cuda12] / jax[cuda13] extras).
_CUDA_PLUGIN_MODULES = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13",
                        "jax_plugins.xla_cuda12")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False


def platform_is_gpu(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether JAX's default platform will be a GPU: the first platform that JAX_PLATFORMS
    (or the older JAX_PLATFORM_NAME) names, else whether a CUDA plugin is installed."""
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
    first = platforms.split(",")[0].strip().lower()
    if first:
        return first in _GPU_PLATFORMS
    return any(_installed(module) for module in _CUDA_PLUGIN_MODULES)


def flag_name(flag: str) -> str:
    """'--xla_gpu_enable_triton_gemm=false' -> 'xla_gpu_enable_triton_gemm'."""
    return flag.lstrip("-").split("=", 1)[0]


def apply_gpu_defaults(environ: MutableMapping[str, str] | None = None,
                       defaults: Sequence[str] = GPU_DEFAULTS) -> list[str]:
    """Appends to XLA_FLAGS, on a GPU platform, each flag of `defaults` it does not name;
    returns those flags. Call before JAX starts a backend: XLA reads XLA_FLAGS only then."""
    environ = os.environ if environ is None else environ
    if not defaults or not platform_is_gpu(environ):
        return []
    current = environ.get("XLA_FLAGS", "")
    present = {flag_name(flag) for flag in current.split()}
    added = [flag for flag in defaults if flag_name(flag) not in present]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
