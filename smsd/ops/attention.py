"""attention: non-causal multi-head attention on token subsets (``index``) or packed views.

The server trains on views that are token subsets of permuted sequences; reading
rows through ``index`` inside the kernel makes the view free of gather/scatter
copies, and ``cu_seqlens`` runs views of every size of a step in one launch.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import _kernels
from ..backend import BackendStatus, BackendUnavailableError, register_backend, select_backend
from ..validation import validation_enabled
from . import _checks, reference
from ._ext import extension

__all__ = ["attention"]

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
BACKENDS = ("triton", "cpp", "torch", "xformers")


def _xformers_status() -> BackendStatus:
    try:
        import xformers
        import xformers.ops
    except ImportError as exc:
        return BackendStatus("xformers", False, f"xformers not installed ({exc})")
    if not torch.cuda.is_available():
        return BackendStatus("xformers", False, f"xformers {xformers.__version__}: no CUDA device")
    return BackendStatus(
        "xformers", True, f"xformers {xformers.__version__} on {torch.cuda.get_device_name()}"
    )


register_backend("xformers", _xformers_status)


# ---------------------------------------------------------------- validation
def _validate_qkv(q: object, k: object, v: object, packed: bool) -> None:
    ndim = 3 if packed else 4
    layout = "[T, H, d] (packed, with cu_seqlens)" if packed else "[B, H, N, d]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.dim() != ndim:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        _checks.tensor(name, t, ndim, ATTENTION_DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}; "
                "they must match"
            )
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    _checks.same_device("q", q, k=k, v=v)
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim d={d} of q is not in [1, {MAX_HEAD_DIM}]")


def _validate_index(index: object, q: torch.Tensor) -> None:
    index = _checks.tensor("index", index, 2, _checks.INDEX_DTYPES)
    B, _, N, _ = q.shape
    if index.shape[0] != B:
        raise ValueError(f"index has {index.shape[0]} rows but q has batch size B={B}")
    if index.shape[1] > N:
        raise ValueError(f"index selects {index.shape[1]} tokens but q has only N={N}")
    _checks.same_device("q", q, index=index)
    if validation_enabled():
        _checks.index_range("index", index, N, "the number of tokens N of q")
        if index.shape[1] > 1 and bool((index.sort(dim=1).values.diff(dim=1) == 0).any()):
            row = int((index.sort(dim=1).values.diff(dim=1) == 0).any(dim=1).nonzero()[0, 0])
            raise ValueError(
                f"index[{row}] repeats a token; a view selects each token at most once"
            )


def _validate_cu_seqlens(cu_seqlens: object, q: torch.Tensor) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be a 1-D [S + 1] tensor, got shape {tuple(cu_seqlens.shape)}"
        )
    _checks.same_device("q", q, cu_seqlens=cu_seqlens)
    if validation_enabled():
        _check_cu_values(cu_seqlens, q.shape[0])


def _check_cu_values(cu_seqlens: torch.Tensor, total: int) -> None:
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if cu_seqlens.numel() > 1 and bool((cu_seqlens.diff() < 0).any()):
        s = int((cu_seqlens.diff() < 0).nonzero()[0, 0])
        raise ValueError(f"cu_seqlens must be non-decreasing; it drops after entry {s}")
    if last != total:
        raise ValueError(
            f"cu_seqlens ends at {last} but q has {total} tokens; the last entry must equal T"
        )


def _max_seqlen(cu_seqlens: torch.Tensor, given: int | None) -> int:
    """The longest packed sequence: computed (a sync) unless given; a given value is
    checked while validation is on, since kernels size their grid by it."""
    if given is not None and (isinstance(given, bool) or not isinstance(given, int)
                              or given < 0):
        raise ValueError(f"max_seqlen must be a non-negative int or None, got {given!r}")
    if given is not None and not validation_enabled():
        return given
    longest = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
    if given is not None and given < longest:
        raise ValueError(f"max_seqlen={given} is shorter than the longest sequence ({longest})")
    return longest if given is None else int(given)


# ---------------------------------------------------------------- kernels
def _forward(backend, q, k, v, index, cu_seqlens, max_seqlen, scale):
    if backend == "cpp":
        return extension().attention_forward(q, k, v, index, cu_seqlens, scale)
    return _kernels.load("attention").attention_forward(
        q, k, v, index, cu_seqlens, max_seqlen, scale
    )


def _backward(backend, grad_out, q, k, v, out, lse, index, cu_seqlens, max_seqlen, scale):
    if backend == "cpp":
        return extension().attention_backward(
            grad_out, q, k, v, out, lse, index, cu_seqlens, scale
        )
    return _kernels.load("attention").attention_backward(
        grad_out, q, k, v, out, lse, index, cu_seqlens, max_seqlen, scale
    )


class Attention(torch.autograd.Function):
    """Autograd wrapper of the ``cpp`` and ``triton`` kernels (saves the log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v, index, cu_seqlens, max_seqlen: int, scale: float, backend: str):
        out, lse = _forward(backend, q, k, v, index, cu_seqlens, max_seqlen, scale)
        ctx.backend, ctx.max_seqlen, ctx.scale = backend, max_seqlen, scale
        ctx.save_for_backward(q, k, v, out, lse, index, cu_seqlens)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, index, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _backward(
            ctx.backend, grad_out.contiguous(), q, k, v, out, lse, index, cu_seqlens,
            ctx.max_seqlen, ctx.scale,
        )
        needs = ctx.needs_input_grad
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                None, None, None, None, None)


def _xformers_attention(q, k, v, index, cu_seqlens, scale):
    import xformers.ops as xops

    if cu_seqlens is not None:
        # Empty sequences own no tokens: leaving them out of the mask changes nothing.
        lengths = [n for n in cu_seqlens.diff().tolist() if n > 0]
        if not lengths:
            return torch.empty_like(q)
        mask = xops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(lengths)
        return xops.memory_efficient_attention(
            q[None], k[None], v[None], attn_bias=mask, scale=scale
        )[0]
    if index is not None:  # xformers reads rows in order: gather (autograd scatters back)
        rows = index.long()[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])
        q, k, v = (torch.gather(t, 2, rows) for t in (q, k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # xformers wants [B, M, H, d]
    return xops.memory_efficient_attention(q, k, v, scale=scale).transpose(1, 2)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    index: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Non-causal multi-head attention (see :func:`smsd.ops.reference.attention`).

    Args:
        q, k, v: ``[B, H, N, d]`` (dense) or ``[T, H, d]`` (packed, with ``cu_seqlens``);
            fp16, bf16 or fp32, same shape, dtype and device; any strides; d <= 256.
        index: optional ``[B, M]`` int32/int64 distinct token ids per sequence: attention
            among those tokens, in that order, gives ``[B, H, M, d]``; gradients go to the
            full inputs (zero for unselected tokens). A permutation gives
            ``attention(q, k, v)[:, :, index]`` (attention is permutation-equivariant).
        cu_seqlens: optional int32 ``[S + 1]`` cumulative lengths of packed sequences;
            each sequence attends only within itself. Not combined with ``index``.
        max_seqlen: longest packed sequence, if known (saves a device sync).
        scale: softmax scale, default ``d ** -0.5``.

    Value checks (index range and no repeats, cu_seqlens monotone and ending at T)
    synchronize with the device; turn them off with :func:`smsd.set_validation`.
    """
    packed = cu_seqlens is not None
    _validate_qkv(q, k, v, packed)
    if packed and index is not None:
        raise ValueError("pass either index (dense views) or cu_seqlens (packed views), not both")
    if index is not None:
        _validate_index(index, q)
    if packed:
        _validate_cu_seqlens(cu_seqlens, q)
        cu_seqlens = cu_seqlens.contiguous()
        max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    scale = float(scale)

    backend = select_backend("attention", q.device, supported=BACKENDS)
    if backend == "torch":
        return reference.attention(q, k, v, index=index, cu_seqlens=cu_seqlens, scale=scale)
    if backend == "xformers":
        if q.device.type != "cuda":
            raise BackendUnavailableError(
                f"attention: backend 'xformers' needs CUDA tensors, got tensors on {q.device}"
            )
        return _xformers_attention(q, k, v, index, cu_seqlens, scale)
    q, k, v = (_rows_contiguous(t) for t in (q, k, v))
    if index is not None:
        index = index.long().contiguous()
    return Attention.apply(q, k, v, index, cu_seqlens, max_seqlen or 0, scale, backend)
