"""What the ops' ``torch.library`` custom ops share.

Every op of :mod:`smsd.ops` is a ``torch.library.custom_op`` (namespace ``smsd``) with a
fake (meta) implementation and an autograd formula, so ``torch.compile(fullgraph=True)``
traces through it without a graph break. The backend is chosen *inside* the op, at run
time, by :func:`smsd.backend.select_backend` (which reads context variables that Dynamo
cannot trace); value checks that read tensors (index ranges, permutations) run inside too.
The Python wrappers around the ops only check shapes, dtypes and devices, which tracing
sees as constants. A backend that cannot run raises, compiled or not: there is no silent
fallback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = ["CUSTOM_OPS", "no_autocast", "reference_vjp"]

# Qualified names of the ops, forward and backward (tests run torch.library.opcheck on each).
CUSTOM_OPS: list[str] = []


def register(name: str) -> str:
    """Record ``smsd::name`` in :data:`CUSTOM_OPS`; returns the qualified name."""
    qualified = f"smsd::{name}"
    if qualified not in CUSTOM_OPS:
        CUSTOM_OPS.append(qualified)
    return qualified


@contextlib.contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """Run an op's implementation in its inputs' dtypes: autocast does not reach inside a
    custom op's dispatch, but its thread-local state would reach the ops it calls."""
    with torch.autocast(device.type, enabled=False):
        yield


def _autograd_inside_op() -> torch._C._ForceDispatchKeyGuard:
    """A custom op's implementation runs below the autograd dispatch keys (they are in
    the thread's exclude set), so no graph would be recorded; this guard takes them out
    of the exclude set for the enclosed block."""
    C = torch._C
    exclude = C._dispatch_tls_local_exclude_set()
    for key in (C.DispatchKey.AutogradFunctionality, C.DispatchKey.AutogradOther,
                C.DispatchKey.AutogradNestedTensor, C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)
    return C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude)


def reference_vjp(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None],
                  wrt: Sequence[int], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``fn(*inputs)`` with respect to ``inputs[i]`` for ``i`` in ``wrt``,
    given the output's gradient: the ``torch`` backend's backward is autograd through
    the reference (:mod:`smsd.ops.reference`)."""
    args = [x.detach() if isinstance(x, torch.Tensor) else x for x in inputs]
    for i in wrt:
        args[i] = args[i].requires_grad_(True)
    with _autograd_inside_op(), torch.enable_grad():
        out = fn(*args)
        grads = torch.autograd.grad(out, [args[i] for i in wrt], grad_out,
                                    allow_unused=True)
    return [torch.zeros_like(args[i]) if g is None else g for i, g in zip(wrt, grads, strict=True)]
