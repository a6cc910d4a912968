"""Test set-up: 8 fake CPU devices, so that multi-device code runs on any machine.

XLA reads the flag once, when jax first initialises its backends, so it is set here, before
any test module imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Compilation dominates the tests' time on the CPU; XLA's optimisation passes halve it and
# the tests check numerics, not speed.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# torchvision (imported by timm) segfaults when its native extensions load after tensorflow's
# (seen with tensorflow-cpu 2.21 and torchvision 0.29); loaded first, both work. Test modules of
# either kind may share a process under pytest-xdist.
try:
    import torchvision  # noqa: F401
except ImportError:
    pass
