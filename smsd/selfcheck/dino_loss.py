"""Self-check of dino_loss and fused_linear_dino_loss against the reference.

Random inputs, odd K, B=1, every dtype claimed; the accuracy rule of
:mod:`smsd.testing` for the loss, the gradients and the center update.
"""

from __future__ import annotations

import torch

from ..backend import use_backend
from ..ops import dino_loss, fused_linear_dino_loss, reference
from ..testing import accuracy, rounding_floor
from . import Result

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (n_student_views, B, K)
SHAPES = ((10, 1, 1000), (4, 3, 257))
# (n_student_views, B, D, K)
FUSED_SHAPES = ((4, 2, 32, 300),)


def _run(fn, student, teacher, center, extra_grad=None, **opts):
    leaves = [student.detach().clone().requires_grad_(True)]
    if extra_grad is not None:
        leaves.append(extra_grad.detach().clone().requires_grad_(True))
    c = center.detach().clone()
    if extra_grad is None:
        loss = fn(leaves[0], teacher, c, **opts)
    else:
        loss = fn(leaves[0], teacher, leaves[1], c, **opts)
    loss.backward()
    return [loss.detach(), *(leaf.grad for leaf in leaves), c]


def _compare(names, got, plain, exact, floors) -> tuple[bool, str]:
    notes, ok = [], True
    for name, value, base, ref, floor in zip(names, got, plain, exact, floors, strict=True):
        acc = accuracy(value, base, ref, floor=floor)
        ok = ok and acc.ok
        notes.append(f"{name} {acc}")
    return ok, "; ".join(notes)


def _loss_checks(backend, device, gen) -> list[Result]:
    results = []
    for dtype in DTYPES:
        for S, B, K in SHAPES:
            s64 = torch.randn(S * B, K, generator=gen, dtype=torch.float64)
            t64 = torch.randn(2 * B, K, generator=gen, dtype=torch.float64)
            c = (torch.randn(1, K, generator=gen) * 0.1).to(device)
            s, t = s64.to(device, dtype), t64.to(device, dtype)
            with use_backend(backend):
                got = _run(dino_loss, s, t, c, n_student_views=S)
            exact = _run(reference.dino_loss, s.double(), t.double(), c.double(),
                         n_student_views=S)
            plain = _run(reference.dino_loss, s, t, c, n_student_views=S)
            floors = rounding_floor(
                lambda *xs, S=S: _run(reference.dino_loss, *xs, n_student_views=S),
                [s.double(), t.double(), c.double()], K)
            ok, detail = _compare(("loss", "grad", "center"), got, plain, exact, floors)
            results.append(Result("dino_loss", backend, device.type,
                                  str(dtype).removeprefix("torch."), f"views={S}+2 B={B} K={K}",
                                  ok, detail))
    return results


def _fused_checks(backend, device, gen) -> list[Result]:
    results = []
    for dtype in DTYPES:
        for S, B, D, K in FUSED_SHAPES:
            sf = torch.nn.functional.normalize(torch.randn(S * B, D, generator=gen), dim=-1)
            tf = torch.nn.functional.normalize(torch.randn(2 * B, D, generator=gen), dim=-1)
            w = torch.randn(K, D, generator=gen) * 2.0
            c = (torch.randn(1, K, generator=gen) * 0.1).to(device)
            sf, tf, w = (x.to(device, dtype) for x in (sf, tf, w))
            with use_backend(backend):
                got = _run(fused_linear_dino_loss, sf, tf, c, w, n_student_views=S,
                           chunk_rows=3)
            plain = _run(reference.fused_linear_dino_loss, sf, tf, c, w, n_student_views=S)
            exact = _fused_oracle(sf, tf, w, c, S)
            floors = rounding_floor(lambda *xs, S=S: _fused_oracle(*xs, S),
                                    [x.double() for x in (sf, tf, w, c)], max(K, D))
            ok, detail = _compare(("loss", "grad_feats", "grad_weight", "center"),
                                  got, plain, exact, floors)
            results.append(Result("fused_linear_dino_loss", backend, device.type,
                                  str(dtype).removeprefix("torch."),
                                  f"rows={S * B}+{2 * B} D={D} K={K}", ok, detail))
    return results


def _fused_oracle(sf, tf, w, c, n_student_views) -> list[torch.Tensor]:
    """fp64 loss, gradients and center. The logits are exact in fp32 (an fp32 matmul's
    rounding depends on the BLAS kernel, so no implementation shares it) and rounded to
    the input dtype in fp16/bf16, where that rounding is shared and would swamp the rest
    (tests/test_fused_linear_dino_loss.py explains both)."""
    def logits(x):
        return x.double() @ w.double().T if x.dtype == torch.float32 else (x @ w.T).double()

    s_logits = logits(sf).requires_grad_(True)
    c64 = c.double().clone()
    loss = reference.dino_loss(s_logits, logits(tf), c64, n_student_views=n_student_views)
    loss.backward()
    return [loss.detach(), s_logits.grad @ w.double(), s_logits.grad.T @ sf.double(), c64]


def checks(backend: str, device: torch.device) -> list[Result]:
    gen = torch.Generator(device="cpu").manual_seed(1234)
    return _loss_checks(backend, device, gen) + _fused_checks(backend, device, gen)
