"""mvmae_jax: Multi-View MAE pretraining with attention-driven masking and throwing (AMT).
`load_encoder` and `Encoder` load on first use: `import mvmae_jax` stays light."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"load_encoder": "mvmae_jax.inference", "Encoder": "mvmae_jax.inference"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
