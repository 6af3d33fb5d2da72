"""Argument checks shared by the ops: clear errors that name the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor(name: str, value: object, ndim: int, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}"
        )
    if value.dtype not in dtypes:
        allowed = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {_dtype_name(value.dtype)}")
    return value


def same_device(
    reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None
) -> None:
    for name, other in others.items():
        if other is not None and other.device != reference.device:
            raise ValueError(
                f"{name} is on {other.device} but {reference_name} is on {reference.device}; "
                "move them to one device"
            )


def index_range(name: str, index: torch.Tensor, upper: int, upper_name: str) -> None:
    """Every value in ``[0, upper)``. Reads the values, so it synchronizes."""
    if index.numel() == 0:
        return
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{name} holds {bad}, outside [0, {upper}) where {upper} is {upper_name}"
        )


def permutation_rows(name: str, perm: torch.Tensor) -> None:
    """Each row is a permutation of ``0..n-1``. Reads the values, so it synchronizes."""
    n = perm.shape[-1]
    expected = torch.arange(n, device=perm.device, dtype=perm.dtype)
    bad = (perm.sort(dim=-1).values != expected).any(dim=-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{row}] is not a permutation of 0..{n - 1}")


def distinct_rows(name: str, index: torch.Tensor, why: str) -> None:
    """No row repeats a value (``why`` says who needs that). Reads the values, so it
    synchronizes."""
    if index.shape[-1] < 2:
        return
    repeats = (index.sort(dim=-1).values.diff(dim=-1) == 0).any(dim=-1)
    if bool(repeats.any()):
        row = int(repeats.nonzero()[0, 0])
        raise ValueError(f"{name}[{row}] repeats a token; {why}")
