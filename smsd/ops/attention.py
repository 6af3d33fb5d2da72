"""attention: non-causal multi-head attention on token subsets (``index``) or packed views.

The server trains on views that are token subsets of permuted sequences; reading
rows through ``index`` inside the kernel makes the view free of gather/scatter
copies, and ``cu_seqlens`` runs views of every size of a step in one launch.
"""

from __future__ import annotations

import torch

from .. import _kernels
from ..backend import BackendStatus, BackendUnavailableError, register_backend, select_backend
from ..validation import validation_enabled
from . import _checks, _library, reference
from ._ext import extension

__all__ = ["attention", "attention_qkv"]

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


def _max_seqlen_arg(given: object) -> int:
    """``max_seqlen`` as the op takes it: -1 when unknown (the op then computes it, a sync;
    a given value is checked against the data while validation is on)."""
    if given is None:
        return -1
    if isinstance(given, bool) or not isinstance(given, int) or given < 0:
        raise ValueError(f"max_seqlen must be a non-negative int or None, got {given!r}")
    return given


# ---------------------------------------------------------------- custom ops
OP = _library.register("attention")
BACKWARD_OP = _library.register("attention_backward")
QKV_OP = _library.register("attention_qkv")
QKV_BACKWARD_OP = _library.register("attention_qkv_backward")


def _check_values(q: torch.Tensor, index: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                  max_seqlen: int) -> int:
    """The checks that read values (they synchronize; skipped with validation off), and
    the longest packed sequence, computed when not given (``max_seqlen < 0``, a sync)."""
    if index is not None and validation_enabled():
        N = q.shape[2]
        _checks.index_range("index", index, N, "the number of tokens N of q")
        if index.shape[1] > 1:
            _checks.distinct_rows("index", index, "a view selects each token at most once")
    if cu_seqlens is None:
        return max_seqlen
    if validation_enabled():
        _check_cu_values(cu_seqlens, q.shape[0])
    elif max_seqlen >= 0:
        return max_seqlen
    longest = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
    if 0 <= max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence "
                         f"({longest})")
    return longest if max_seqlen < 0 else max_seqlen


def _plain_forward(backend: str):
    """The backends without a saved log-sum-exp: their backward is autograd through them."""
    if backend == "xformers":
        return _xformers_attention
    return lambda q, k, v, index, cu_seqlens, scale: reference.attention(
        q, k, v, index=index, cu_seqlens=cu_seqlens, scale=scale)


def _lse_shape(q: torch.Tensor, index: torch.Tensor | None, packed: bool) -> tuple[int, ...]:
    if packed:
        return (q.shape[1], q.shape[0])
    return (*q.shape[:2], index.shape[1] if index is not None else q.shape[2])


def _out_shape(q: torch.Tensor, index: torch.Tensor | None, packed: bool) -> tuple[int, ...]:
    if packed or index is None:
        return tuple(q.shape)
    return (*q.shape[:2], index.shape[1], q.shape[3])


def _forward(q, k, v, index, cu_seqlens, max_seqlen: int, scale: float):
    backend = select_backend("attention", q.device, supported=BACKENDS)
    if backend == "xformers" and q.device.type != "cuda":
        raise BackendUnavailableError(
            f"attention: backend 'xformers' needs CUDA tensors, got tensors on {q.device}")
    max_seqlen = _check_values(q, index, cu_seqlens, max_seqlen)
    with _library.no_autocast(q.device):
        if backend == "cpp":
            return extension().attention_forward(q, k, v, index, cu_seqlens, scale)
        if backend == "triton":
            return _kernels.load("attention").attention_forward(
                q, k, v, index, cu_seqlens, max_seqlen, scale)
        out = _plain_forward(backend)(q, k, v, index, cu_seqlens, scale)
        lse = q.new_zeros(_lse_shape(q, index, cu_seqlens is not None), dtype=torch.float32)
        return out.contiguous(), lse


def _backward(grad_out, q, k, v, out, lse, index, cu_seqlens, max_seqlen: int, scale: float,
              grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """``(dq, dk, dv)``; the Triton kernels write them into ``grads`` when given."""
    backend = select_backend("attention", q.device, supported=BACKENDS)
    if cu_seqlens is not None and max_seqlen < 0:
        max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
    with _library.no_autocast(q.device):
        if backend == "cpp":
            return extension().attention_backward(
                grad_out, q, k, v, out, lse, index, cu_seqlens, scale)
        if backend == "triton":
            kernels = _kernels.load("attention")
            if grads is None:
                return kernels.attention_backward(
                    grad_out, q, k, v, out, lse, index, cu_seqlens, max_seqlen, scale)
            return kernels.attention_backward(
                grad_out, q, k, v, out, lse, index, cu_seqlens, max_seqlen, scale, out=grads)
        fn = _plain_forward(backend)
        return tuple(_library.reference_vjp(
            lambda q, k, v: fn(q, k, v, index, cu_seqlens, scale), (q, k, v), (0, 1, 2),
            grad_out))


@torch.library.custom_op(OP, mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  index: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                  max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, index, cu_seqlens, max_seqlen, scale)


@_attention_op.register_fake
def _(q, k, v, index, cu_seqlens, max_seqlen, scale):
    packed = cu_seqlens is not None
    return (q.new_empty(_out_shape(q, index, packed)),
            q.new_empty(_lse_shape(q, index, packed), dtype=torch.float32))


@torch.library.custom_op(BACKWARD_OP, mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, index: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None, max_seqlen: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(g.contiguous() for g in _backward(grad_out, q, k, v, out, lse, index,
                                                    cu_seqlens, max_seqlen, scale))


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, index, cu_seqlens, max_seqlen, scale):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape, dtype=q.dtype, device=q.device))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, index, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.save_for_backward(q, k, v, out, lse, index, cu_seqlens)


def _attention_grads(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, index, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out.contiguous(), q, k, v, out, lse, index,
                                        cu_seqlens, ctx.max_seqlen, ctx.scale)
    needs = ctx.needs_input_grad
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            None, None, None, None)


_attention_op.register_autograd(_attention_grads, setup_context=_setup_context)


def _split_qkv(qkv: torch.Tensor, packed: bool):
    """Views q, k, v of a ``[B, N, 3, H, d]`` (dense, as ``[B, H, N, d]``) or
    ``[T, 3, H, d]`` (packed, as ``[T, H, d]``) projection."""
    q, k, v = qkv.unbind(-3)
    if not packed:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return q, k, v


def _kernel_qkv(qkv: torch.Tensor, packed: bool):
    """q, k, v of ``qkv`` as the kernels take them: views, unless rows are strided."""
    return tuple(_rows_contiguous(t) for t in _split_qkv(qkv, packed))


@torch.library.custom_op(QKV_OP, mutates_args=())
def _attention_qkv_op(qkv: torch.Tensor, index: torch.Tensor | None,
                      cu_seqlens: torch.Tensor | None, max_seqlen: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _kernel_qkv(qkv, cu_seqlens is not None)
    return _forward(q, k, v, index, cu_seqlens, max_seqlen, scale)


@_attention_qkv_op.register_fake
def _(qkv, index, cu_seqlens, max_seqlen, scale):
    packed = cu_seqlens is not None
    q = _split_qkv(qkv, packed)[0]
    return (q.new_empty(_out_shape(q, index, packed)),
            q.new_empty(_lse_shape(q, index, packed), dtype=torch.float32))


@torch.library.custom_op(QKV_BACKWARD_OP, mutates_args=())
def _attention_qkv_backward_op(
    grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    index: torch.Tensor | None, cu_seqlens: torch.Tensor | None, max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    """``d qkv`` in ``qkv``'s layout, one buffer (the Triton kernels write into it)."""
    packed = cu_seqlens is not None
    q, k, v = _kernel_qkv(qkv, packed)
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    views = _split_qkv(grad_qkv, packed)
    grads = _backward(grad_out, q, k, v, out, lse, index, cu_seqlens, max_seqlen, scale,
                      grads=views)
    for view, grad in zip(views, grads, strict=True):
        if grad.data_ptr() != view.data_ptr():
            view.copy_(grad)
    return grad_qkv


@_attention_qkv_backward_op.register_fake
def _(grad_out, qkv, out, lse, index, cu_seqlens, max_seqlen, scale):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _qkv_setup_context(ctx, inputs, output) -> None:
    qkv, index, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.save_for_backward(qkv, out, lse, index, cu_seqlens)


def _attention_qkv_grads(ctx, grad_out, _grad_lse):
    qkv, out, lse, index, cu_seqlens = ctx.saved_tensors
    grad_qkv = _attention_qkv_backward_op(grad_out.contiguous(), qkv, out, lse, index,
                                          cu_seqlens, ctx.max_seqlen, ctx.scale)
    return grad_qkv if ctx.needs_input_grad[0] else None, None, None, None, None


_attention_qkv_op.register_autograd(_attention_qkv_grads, setup_context=_qkv_setup_context)


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
    index, cu_seqlens, max_seqlen, scale = _common_args(q, index, cu_seqlens, max_seqlen,
                                                        scale)
    q, k, v = (_rows_contiguous(t) for t in (q, k, v))
    return _attention_op(q, k, v, index, cu_seqlens, max_seqlen, scale)[0]


def _common_args(q, index, cu_seqlens, max_seqlen, scale):
    packed = cu_seqlens is not None
    if packed and index is not None:
        raise ValueError("pass either index (dense views) or cu_seqlens (packed views), not both")
    if index is not None:
        _validate_index(index, q)
        index = index.long().contiguous()
    if packed:
        _validate_cu_seqlens(cu_seqlens, q)
        cu_seqlens = cu_seqlens.contiguous()
    max_seqlen = _max_seqlen_arg(max_seqlen) if packed else 0
    if scale is None:
        scale = q.shape[-1] ** -0.5
    elif not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return index, cu_seqlens, max_seqlen, float(scale)


def attention_qkv(
    qkv: torch.Tensor,
    *,
    index: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`attention` of the q, k, v packed in one projection output, as a ViT's qkv
    Linear gives them: ``[B, N, 3, H, d]`` (dense; the result is ``[B, H, M, d]``) or
    ``[T, 3, H, d]`` (packed, with ``cu_seqlens``; the result is ``[T, H, d]``).

    Its gradient is one ``qkv``-shaped buffer, which the Triton kernels write directly,
    instead of three that autograd would stack again. Other arguments as :func:`attention`.
    """
    packed = cu_seqlens is not None
    ndim = 4 if packed else 5
    qkv = _checks.tensor("qkv", qkv, ndim, ATTENTION_DTYPES)
    if qkv.shape[-3] != 3:
        layout = "[T, 3, H, d]" if packed else "[B, N, 3, H, d]"
        raise ValueError(f"qkv must be {layout}, got shape {tuple(qkv.shape)}")
    q = _split_qkv(qkv, packed)[0]
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim d={d} of qkv is not in [1, {MAX_HEAD_DIM}]")
    index, cu_seqlens, max_seqlen, scale = _common_args(q, index, cu_seqlens, max_seqlen,
                                                        scale)
    return _attention_qkv_op(qkv, index, cu_seqlens, max_seqlen, scale)[0]
