"""The project's XLA flag defaults for GPUs, in one place.

`apply_gpu_defaults()` appends `GPU_DEFAULTS` to the XLA_FLAGS environment variable when the
process's JAX platform will be a GPU, leaving every flag the user set alone. XLA reads XLA_FLAGS
once, when JAX initialises its first backend, so the trainer (`mvmae_jax.main`) and the
benchmark scripts call it first thing; launch scripts need nothing extra. Deciding touches no
JAX backend: it reads JAX_PLATFORMS and looks for an installed CUDA plugin.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import MutableMapping, Sequence

# A flag belongs here only with a GPU measurement that shows it faster (the `xla_flags` step of
# benchmarks/gpu_suite.py: each candidate alone against the default, alternated). None has been
# measured yet, so the tuple is empty; docs/benchmarks.md ("GPU speed") lists the
# candidates and the command, and is where the measurement behind each added flag goes.
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
    """Appends to XLA_FLAGS each flag of `defaults` whose name XLA_FLAGS does not mention, when
    the platform will be a GPU; returns the flags appended. Call before JAX initialises a
    backend (the first computation or `jax.devices()`): XLA reads XLA_FLAGS only then."""
    environ = os.environ if environ is None else environ
    if not defaults or not platform_is_gpu(environ):
        return []
    current = environ.get("XLA_FLAGS", "")
    present = {flag_name(flag) for flag in current.split()}
    added = [flag for flag in defaults if flag_name(flag) not in present]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
