"""Benchmark cases of masked_sample (see smsd.bench)."""

from __future__ import annotations

import torch

from ..backend import use_backend
from ..ops import masked_sample, reference
from ..validation import validation
from . import Case, usable_backends

# (B, N, D, keep, dtype) per device and size; the issues' target shapes come first.
SHAPES = {
    ("cuda", "full"): [
        (1024, 196, 768, 0.5, torch.bfloat16),
        (256, 196, 384, 0.5, torch.bfloat16),
        (256, 196, 768, 0.25, torch.bfloat16),
        (256, 196, 384, 0.5, torch.float32),
    ],
    ("cpu", "full"): [(64, 196, 384, 0.5, torch.float32), (64, 196, 384, 0.5, torch.bfloat16)],
    ("cuda", "quick"): [(8, 197, 64, 0.5, torch.bfloat16)],
    ("cpu", "quick"): [(4, 197, 32, 0.5, torch.float32)],
}


def _op(backend: str, x, index, perm):
    if backend == "torch":
        return reference.masked_sample(x, index, perm)
    # Value checks synchronize; a training loop turns them off, so the benchmark does too.
    with use_backend(backend), validation(False):
        return masked_sample(x, index, perm)


def _shape_cases(device, backends, B, N, D, keep, dtype) -> list[Case]:
    K = round(keep * N)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, N, D, device=device, dtype=dtype, generator=gen)
    xg = x.clone().requires_grad_(True)
    index = torch.rand(B, N, device=device, generator=gen).argsort(1)[:, :K]
    perm = torch.rand(B, N, device=device, generator=gen).argsort(1)
    grad = torch.randn(B, K, D, device=device, dtype=dtype, generator=gen)
    shape = f"B={B} N={N} D={D} K={K}"
    elt = x.element_size()
    fwd_bytes = 2 * B * K * D * elt  # read the sampled rows, write them
    bwd_bytes = (B * K + B * N) * D * elt  # read grad_out, write all of grad_x
    cases = []
    for backend in backends:
        ref = backend == "torch"
        y = _op(backend, xg, index, perm)
        cases += [
            Case("masked_sample", "fwd", shape, dtype, "torch.gather" if ref else backend,
                 lambda b=backend: _op(b, x, index, None), fwd_bytes, reference=ref),
            Case("masked_sample", "fwd+perm", shape, dtype, "torch 2x gather" if ref else backend,
                 lambda b=backend: _op(b, x, index, perm), fwd_bytes, reference=ref),
            Case("masked_sample", "bwd+perm", shape, dtype, "torch 2x scatter" if ref else backend,
                 lambda y=y: torch.autograd.grad(y, xg, grad, retain_graph=True),
                 bwd_bytes, reference=ref),
        ]
    return cases


def cases(device: torch.device, size: str) -> list[Case]:
    backends = [*usable_backends(device), "torch"]
    out: list[Case] = []
    for shape in SHAPES[(device.type, size)]:
        out += _shape_cases(device, backends, *shape)
    return out
