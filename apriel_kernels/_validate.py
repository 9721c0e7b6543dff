"""Argument checks shared by every public entry point: each error names the argument and what was expected.

Shapes are given as tuples whose entries are ints (must match), None (any size) or a str naming a size
that must agree across arguments of one call (a `Sizes` binds the names on first sight).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32,)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Sizes:
    """Binds symbolic dimension names (e.g. 'batch', 'seqlen') to the first size seen for them."""

    def __init__(self, **known: int):
        self.values: dict[str, int] = dict(known)
        self.where: dict[str, str] = {k: "given" for k in known}

    def bind(self, symbol: str, size: int, where: str) -> None:
        if symbol not in self.values:
            self.values[symbol] = size
            self.where[symbol] = where
        elif self.values[symbol] != size:
            raise ValueError(
                f"{where}: expected {symbol} = {self.values[symbol]} (from {self.where[symbol]}), got {size}"
            )

    def __getitem__(self, symbol: str) -> int:
        return self.values[symbol]


def check_tensor(
    name: str,
    t,
    shape: Sequence[int | str | None] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    sizes: Sizes | None = None,
    optional: bool = False,
    last_dim_contiguous: bool = False,
) -> None:
    """Raise a ValueError/TypeError naming `name` unless t matches the contract."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        if t.dim() != len(shape):
            raise ValueError(f"{name}: expected {len(shape)} dims {tuple(shape)}, got shape {tuple(t.shape)}")
        for axis, (want, got) in enumerate(zip(shape, t.shape)):
            if want is None:
                continue
            if isinstance(want, str):
                if sizes is None:
                    raise AssertionError("symbolic shapes need a Sizes binder")
                sizes.bind(want, int(got), f"{name} dim {axis}")
            elif int(got) != want:
                raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)} (dim {axis})")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(_dtype_name(d) for d in dtypes)
            raise TypeError(f"{name}: expected dtype in ({names}), got {_dtype_name(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like the main input), got {t.device}")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dim, got strides {t.stride()}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_env_positive_int(name: str) -> None:
    """An integer knob read from the environment by a CUDA op (e.g. APRIEL_SSCAN_BWD_SEGMENTS), unset or empty meaning
    the default, is checked here: the C++ side's own check would throw, and a C++ exception from an extension op kills
    the GPU machine's process (docs/notes/STATUS.md item 4)."""
    value = os.environ.get(name, "")
    digits = value.strip()
    if value and not (digits.isascii() and digits.isdigit() and int(digits) >= 1):
        raise ValueError(f"{name}: expected a positive integer (or unset), got {value!r}")


def check_positive_multiple(name: str, value: int, of: int, of_name: str) -> None:
    if value <= 0 or value % of != 0:
        raise ValueError(f"{name}: expected a positive multiple of {of_name} ({of}), got {value}")


def check_index_range(name: str, idx: torch.Tensor, upper: int, allow_padding: bool = True) -> None:
    """Slot indices must lie in [0, upper) (or be -1 for padding). Reads the values: eager only."""
    if idx.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(idx.min()), int(idx.max())
    floor = -1 if allow_padding else 0
    if lo < floor or hi >= upper:
        pad = " or -1 for padding" if allow_padding else ""
        raise ValueError(f"{name}: expected values in [0, {upper}){pad}, got range [{lo}, {hi}]")
