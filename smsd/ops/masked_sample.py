"""masked_sample: gather tokens for a view, with the client's permutation composed in."""

from __future__ import annotations

import torch

from .. import _kernels
from ..backend import select_backend
from ..validation import validation_enabled
from . import _checks, reference
from ._ext import extension

__all__ = ["masked_sample"]


def _validate(x: object, index: object, perm: object) -> None:
    x = _checks.tensor("x", x, 3, _checks.FLOAT_DTYPES)
    index = _checks.tensor("index", index, 2, _checks.INDEX_DTYPES)
    B, N, _ = x.shape
    if index.shape[0] != B:
        raise ValueError(f"index has {index.shape[0]} rows but x has batch size {B}")
    if index.shape[1] > N:
        raise ValueError(
            f"index samples {index.shape[1]} tokens per image but x has only N={N}"
        )
    if perm is not None:
        perm = _checks.tensor("perm", perm, 2, _checks.INDEX_DTYPES)
        if tuple(perm.shape) != (B, N):
            raise ValueError(f"perm must have shape [B, N] = {[B, N]}, got {list(perm.shape)}")
    _checks.same_device("x", x, index=index, perm=perm)
    if validation_enabled():
        _checks.index_range("index", index, N, "the number of tokens N of x")
        if perm is not None:
            _checks.permutation_rows("perm", perm)


def _forward(backend: str, x, index, perm):
    if backend == "cpp":
        return extension().masked_sample_forward(x, index, perm)
    return _kernels.load("masked_sample").masked_sample_forward(x, index, perm)


def _backward(backend: str, grad_out, index, perm, n_tokens: int):
    if backend == "cpp":
        return extension().masked_sample_backward(grad_out, index, perm, n_tokens)
    return _kernels.load("masked_sample").masked_sample_backward(grad_out, index, perm, n_tokens)


class MaskedSample(torch.autograd.Function):
    """Autograd wrapper of the ``cpp`` and ``triton`` kernels."""

    @staticmethod
    def forward(ctx, x, index, perm, backend: str):
        ctx.backend = backend
        ctx.n_tokens = x.shape[1]
        ctx.save_for_backward(index, perm)
        return _forward(backend, x, index, perm)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        index, perm = ctx.saved_tensors
        return _backward(ctx.backend, grad_out, index, perm, ctx.n_tokens), None, None, None


def masked_sample(
    x: torch.Tensor, index: torch.Tensor, perm: torch.Tensor | None = None
) -> torch.Tensor:
    """Sample tokens of each image, composing an optional permutation in the same pass.

    Args:
        x: ``[B, N, D]`` tokens (fp32, fp16, bf16 or fp64; any strides).
        index: ``[B, K]`` int32/int64 positions to keep, ``K <= N``. Repeats are allowed:
            each is an independent copy and their gradients add up.
        perm: optional ``[B, N]`` permutation per image (same dtype family as ``index``).

    Returns:
        ``[B, K, D]`` with ``out[b, j] = x[b, index[b, j]]``, or, with ``perm``,
        ``x[b, perm[b, index[b, j]]]``. The backward pass scatters into ``x``'s shape
        (rows never selected get zero).

    Index ranges and ``perm`` being a permutation are checked unless validation is
    off (:func:`smsd.set_validation`); those checks synchronize with the device.
    """
    _validate(x, index, perm)
    backend = select_backend("masked_sample", x.device)
    if backend == "torch":
        return reference.masked_sample(x, index, perm)
    if perm is not None and perm.dtype != index.dtype:
        perm = perm.to(index.dtype)
    return MaskedSample.apply(x, index, perm, backend)
