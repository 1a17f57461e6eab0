"""Boundary checks for every number and tensor that enters from a file or a request.

A value read from outside is checked here for type/dtype, shape, range, finiteness and
uniqueness, and rejected (never coerced: 1.7 does not become neuron 1, "3" does not
become 3, true does not become 1) with an `SSNError` whose one line names where the value
came from (`where`: a file, a request), which key, and the offending value.
"""

from __future__ import annotations

import math

import torch

from .errors import SSNError

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(where: str, key: str, message: str) -> SSNError:
    """The error for a bad value: `<where>: <key>: <message>`."""
    prefix = f"{where}: " if where else ""
    return SSNError(f"{prefix}{key}: {message}")


# ----- JSON scalars -----
def check_int(value, where: str, key: str, lo: int | None = None, hi: int | None = None) -> int:
    """A JSON integer in [lo, hi] (both inclusive). Floats (even 3.0), bools and strings are rejected."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(where, key, f"expected an integer, got {_show(value)}")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise fail(where, key, f"{value} is out of range [{lo if lo is not None else '-inf'}, "
                               f"{hi if hi is not None else 'inf'}]")
    return value


def check_number(value, where: str, key: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> float:
    """A finite JSON number in [lo, hi] (or (lo, hi] with `lo_open`); bools and strings are rejected."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(where, key, f"expected a number, got {_show(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise fail(where, key, f"must be finite, got {_show(value)}")
    if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and v > hi:
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise fail(where, key, f"{value} is out of range {'(' if lo_open else '['}{lo_s}, {hi_s}]")
    return v


def check_str(value, where: str, key: str, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise fail(where, key, f"expected a string, got {_show(value)}")
    if not allow_empty and not value:
        raise fail(where, key, "must not be empty")
    return value


def check_int_list(values, where: str, key: str, lo: int, hi: int) -> list[int]:
    """A JSON list of unique integers in [lo, hi]."""
    if not isinstance(values, list):
        raise fail(where, key, f"expected a list of integers, got {_show(values)}")
    out = [check_int(v, where, f"{key}[{i}]", lo, hi) for i, v in enumerate(values)]
    seen: set[int] = set()
    for v in out:
        if v in seen:
            raise fail(where, key, f"index {v} appears twice")
        seen.add(v)
    return out


def check_layer_key(key, where: str, what: str, num_layers: int) -> int:
    """A layer number written as a JSON object key: a decimal string of an integer in range."""
    if not isinstance(key, str) or not key.isdigit() or (len(key) > 1 and key[0] == "0"):
        raise fail(where, what, f"layer key {_show(key)} is not a layer number")
    layer = int(key)
    if layer >= num_layers:
        raise fail(where, what, f"layer {layer} is out of range: the model has {num_layers} layers")
    return layer


# ----- tensors -----
def check_index_tensor(t: torch.Tensor, where: str, key: str, upper: int) -> torch.Tensor:
    """A 1-D tensor of unique integer indices in [0, upper); returned as int64."""
    if t.dtype not in _INT_DTYPES:
        raise fail(where, key, f"indices must have an integer dtype, got {t.dtype}")
    if t.dim() != 1:
        raise fail(where, key, f"indices must be 1-D, got shape {tuple(t.shape)}")
    t = t.to(torch.int64)
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0:
            raise fail(where, key, f"index {lo} is negative")
        if hi >= upper:
            raise fail(where, key, f"index {hi} is out of range [0, {upper})")
        uniq = t.unique()
        if uniq.numel() != t.numel():
            vals, counts = torch.unique(t, return_counts=True)
            raise fail(where, key, f"index {int(vals[counts > 1][0])} appears twice")
    return t


def check_float_tensor(t: torch.Tensor, where: str, key: str, shape: tuple[int, ...] | None = None,
                       nonnegative: bool = False) -> torch.Tensor:
    """A floating tensor of the given shape, every value finite (and >= 0 with `nonnegative`)."""
    if not t.dtype.is_floating_point:
        raise fail(where, key, f"must be a floating-point tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise fail(where, key, f"must have shape {tuple(shape)}, got {tuple(t.shape)}")
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise fail(where, key, f"holds a non-finite value ({float(t[tuple(bad)])}) at {bad}")
    if nonnegative and t.numel() and bool((t < 0).any()):
        bad = (t < 0).nonzero()[0].tolist()
        raise fail(where, key, f"holds a negative value ({float(t[tuple(bad)])}) at {bad}")
    return t


def check_count_tensor(t: torch.Tensor, where: str, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of non-negative integer counts of the given shape, returned as int64."""
    if t.dtype not in _INT_DTYPES:
        raise fail(where, key, f"counts must have an integer dtype, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise fail(where, key, f"must have shape {tuple(shape)}, got {tuple(t.shape)}")
    t = t.to(torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise fail(where, key, f"holds a negative count ({int(t.min())})")
    return t
