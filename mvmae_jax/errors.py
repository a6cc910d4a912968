"""The error a bad config raises and the small checks that raise it, apart from config_lib so
that each component can check its own config section."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
    """The config cannot run; the message names the field and what to change."""


def need(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def one_of(path: str, value: Any, choices: Sequence[Any]) -> None:
    need(value in choices, f"config.{path}={value!r} must be one of {tuple(choices)}")


def interval(low: float, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def in_range(path: str, value: float, low: float, high: float | None = None,
             low_open: bool = False, high_open: bool = False) -> None:
    """`config.<path>` is a finite number from low to high (None: unbounded), either end open."""
    need(math.isfinite(value), f"config.{path}={value!r} must be a finite number")
    above = value > low if low_open else value >= low
    below = high is None or (value < high if high_open else value <= high)
    need(above and below,
         f"config.{path}={value!r} must be {interval(low, high, low_open, high_open)}")
