"""masked_sample: gather tokens for a view, with the client's permutation composed in."""

from __future__ import annotations

import torch

from .. import _kernels
from ..backend import select_backend
from ..validation import validation_enabled
from . import _checks, _library, reference
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


OP = _library.register("masked_sample")
BACKWARD_OP = _library.register("masked_sample_backward")


def _check_values(x: torch.Tensor, index: torch.Tensor, perm: torch.Tensor | None,
                  unique: bool) -> None:
    """The checks that read values (and so synchronize), while validation is on."""
    if not validation_enabled():
        return
    _checks.index_range("index", index, x.shape[1], "the number of tokens N of x")
    if perm is not None:
        _checks.permutation_rows("perm", perm)
    if unique:
        _checks.distinct_rows("index", index, "unique=True needs distinct indices")


@torch.library.custom_op(OP, mutates_args=())
def _masked_sample_op(x: torch.Tensor, index: torch.Tensor, perm: torch.Tensor | None,
                      unique: bool) -> torch.Tensor:
    _check_values(x, index, perm, unique)
    backend = select_backend("masked_sample", x.device)
    with _library.no_autocast(x.device):
        if backend == "torch":
            return reference.masked_sample(x, index, perm)
        if backend == "cpp":
            return extension().masked_sample_forward(x, index, perm)
        return _kernels.load("masked_sample").masked_sample_forward(x, index, perm)


@_masked_sample_op.register_fake
def _(x, index, perm, unique):
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))


@torch.library.custom_op(BACKWARD_OP, mutates_args=())
def _masked_sample_backward_op(grad_out: torch.Tensor, index: torch.Tensor,
                               perm: torch.Tensor | None, n_tokens: int,
                               unique: bool) -> torch.Tensor:
    backend = select_backend("masked_sample", grad_out.device)
    with _library.no_autocast(grad_out.device):
        if backend == "torch":
            B, _, D = grad_out.shape
            x = grad_out.new_zeros((B, n_tokens, D))
            return _library.reference_vjp(reference.masked_sample, (x, index, perm), (0,),
                                          grad_out)[0]
        if backend == "cpp":
            return extension().masked_sample_backward(grad_out, index, perm, n_tokens)
        kernels = _kernels.load("masked_sample")
        return kernels.masked_sample_backward(grad_out, index, perm, n_tokens, unique=unique)


@_masked_sample_backward_op.register_fake
def _(grad_out, index, perm, n_tokens, unique):
    return grad_out.new_empty((grad_out.shape[0], n_tokens, grad_out.shape[2]))


def _setup_context(ctx, inputs, output) -> None:
    x, index, perm, unique = inputs
    ctx.n_tokens, ctx.unique = x.shape[1], unique
    ctx.save_for_backward(index, perm)


def _backward(ctx, grad_out):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    index, perm = ctx.saved_tensors
    grad_x = _masked_sample_backward_op(grad_out.contiguous(), index, perm, ctx.n_tokens,
                                        ctx.unique)
    return grad_x, None, None, None


_masked_sample_op.register_autograd(_backward, setup_context=_setup_context)


def masked_sample(
    x: torch.Tensor, index: torch.Tensor, perm: torch.Tensor | None = None, *,
    unique: bool = False,
) -> torch.Tensor:
    """Sample tokens of each image, composing an optional permutation in the same pass.

    Args:
        x: ``[B, N, D]`` tokens (fp32, fp16, bf16 or fp64; any strides).
        index: ``[B, K]`` int32/int64 positions to keep, ``K <= N``. Repeats are allowed:
            each is an independent copy and their gradients add up.
        perm: optional ``[B, N]`` permutation per image (same dtype family as ``index``).
        unique: the caller's promise that each row of ``index`` holds distinct positions
            (as :func:`smsd.ops.sample_views` gives): the backward then scatters through
            an inverse index instead of sorting. Checked while validation is on.

    Returns:
        ``[B, K, D]`` with ``out[b, j] = x[b, index[b, j]]``, or, with ``perm``,
        ``x[b, perm[b, index[b, j]]]``. The backward pass scatters into ``x``'s shape
        (rows never selected get zero).

    Index ranges, ``perm`` being a permutation and, with ``unique``, distinct indices are
    checked unless validation is off (:func:`smsd.set_validation`); those checks
    synchronize with the device. A ``torch.library`` custom op (``smsd::masked_sample``):
    ``torch.compile(fullgraph=True)`` traces through it.
    """
    _validate(x, index, perm)
    if not isinstance(unique, bool):
        raise TypeError(f"unique must be a bool, got {type(unique).__name__}")
    if perm is not None and perm.dtype != index.dtype:
        perm = perm.to(index.dtype)
    return _masked_sample_op(x, index, perm, unique)
