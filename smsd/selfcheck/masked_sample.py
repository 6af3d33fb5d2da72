"""Self-check of masked_sample against the reference (random inputs, odd sizes)."""

from __future__ import annotations

import torch

from ..backend import use_backend
from ..ops import masked_sample, reference
from ..testing import accuracy, max_error
from . import Result

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (B, N, D, K, repeats allowed)
SHAPES = ((1, 197, 48, 98, False), (3, 50, 33, 50, False), (2, 17, 8, 13, True))


def checks(backend: str, device: torch.device) -> list[Result]:
    results = []
    gen = torch.Generator(device="cpu").manual_seed(1234)
    for dtype in DTYPES:
        for B, N, D, K, repeats in SHAPES:
            x64 = torch.randn(B, N, D, generator=gen, dtype=torch.float64)
            if repeats:
                index = torch.randint(0, N, (B, K), generator=gen)
            else:
                index = torch.rand(B, N, generator=gen).argsort(1)[:, :K]
            perm = torch.rand(B, N, generator=gen).argsort(1)
            g64 = torch.randn(B, K, D, generator=gen, dtype=torch.float64)
            x64, index, perm, g64 = (t.to(device) for t in (x64, index, perm, g64))
            x = x64.to(dtype).requires_grad_(True)
            with use_backend(backend):
                out = masked_sample(x, index, perm)
            out.backward(g64.to(dtype))
            x_ref = x64.to(dtype).double().requires_grad_(True)
            out_ref = reference.masked_sample(x_ref, index, perm)
            out_ref.backward(g64.to(dtype).double())
            x_base = x64.to(dtype).requires_grad_(True)
            reference.masked_sample(x_base, index, perm).backward(g64.to(dtype))
            fwd_err = max_error(out, out_ref)  # a copy: must be exact
            case = f"B={B} N={N} D={D} K={K}{' repeats' if repeats else ''}"
            if repeats:  # gradients of repeated tokens are sums: the accuracy rule
                grad_acc = accuracy(x.grad, x_base.grad, x_ref.grad)
                passed, grad_note = grad_acc.ok, f"grad {grad_acc}"
            else:  # every gradient row is a copy or zero: exact
                grad_err = max_error(x.grad, x_ref.grad)
                passed, grad_note = grad_err == 0.0, f"grad err {grad_err:.3g} (exact)"
            results.append(Result("masked_sample", backend, device.type,
                                  str(dtype).removeprefix("torch."), case,
                                  passed and fwd_err == 0.0,
                                  f"fwd err {fwd_err:.3g} (exact); {grad_note}"))
    return results
