"""Accelerator facts by device kind (no JAX or torch import: the PyTorch reference uses them)."""

from __future__ import annotations

from collections.abc import Sequence

# Dense bfloat16 peak FLOP/s per chip, matched in order against `device_kind` (lower case),
# so that the more specific names come first ("tpu v5 lite" is v5e, a bare "tpu v5" is v5p).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
)


def match_device_kind(table: Sequence[tuple[str, float]], device_kind: str) -> float | None:
    """The value of the first row of `table` whose name is in `device_kind`, or None."""
    kind = device_kind.lower()
    return next((value for name, value in table if name in kind), None)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one chip of this kind, or None when it is not in the table."""
    return match_device_kind(PEAK_BF16_FLOPS, device_kind)
