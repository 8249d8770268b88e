"""Argument checks, one helper per kind, shared by the library and the training program: each
returns the value (normalised) or raises ValueError naming the argument and the bad value.

They run at the public boundary (a config's construction, a layer's construction, the function a
user calls), never per layer per step.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

# Pattern values must fit a 64-bit integer (the planner's tensors and the cache's positions).
MAX_INT64 = 2**63 - 1


def int_at_least(name: str, value, low: int) -> int:
    """value as an int >= low (bool refused, numpy ints accepted)."""
    if not isinstance(value, bool):
        try:
            value = operator.index(value)
        except TypeError:
            pass
        else:
            if value >= low:
                return value
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def positive_int(name: str, value) -> int:
    """value as an int >= 1."""
    try:
        return int_at_least(name, value, 1)
    except ValueError:
        raise ValueError(f"{name} must be a positive int, got {value!r}") from None


def positive_ints(name: str, values) -> tuple[int, ...]:
    """A list (or tuple) of ints >= 1 below 2**63, as a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of positive ints, got {values!r}")
    try:
        ints = tuple(positive_int(name, x) for x in values)
    except ValueError:
        raise ValueError(f"{name} must be a list of positive ints, got {list(values)!r}") from None
    if any(x > MAX_INT64 for x in ints):
        raise ValueError(f"{name} must be ints below 2**63, got {list(values)!r}")
    return ints


def positive_float(name: str, value) -> float:
    """value as a float > 0 (ints accepted, bool refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def flag(name: str, value) -> bool:
    """value if it is True or False (1, "yes" or a tensor are refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def choice(name: str, value, choices: tuple[str, ...]) -> str:
    """value if it is one of choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
