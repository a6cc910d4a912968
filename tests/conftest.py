"""Test set-up: 8 fake CPU devices, so that multi-device code runs on any machine.

XLA reads the flag once, when jax first initialises its backends, so it is set here, before
any test module imports jax.
"""

import atexit
import os
import shutil
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Compilation dominates the tests' time on the CPU; XLA's optimisation passes halve it and
# the tests check numerics, not speed.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Many tests start `python -m mvmae_jax.main` several times with the same tiny model (a run,
# its preemption, its resume); a compilation cache shared by the pytest workers and their
# subprocesses compiles each program once. One fresh directory per pytest invocation: the
# first process to import this file makes it, and the xdist workers and subprocesses inherit
# the variable.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="mvmae_jax_test_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# torchvision (imported by timm) segfaults when its native extensions load after tensorflow's
# (seen with tensorflow-cpu 2.21 and torchvision 0.29); loaded first, both work. Test modules of
# either kind may share a process under pytest-xdist.
try:
    import torchvision  # noqa: F401
except ImportError:
    pass
