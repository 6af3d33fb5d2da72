"""Benchmark cases of fused_linear_dino_loss (see smsd.bench): the fused head+loss of every
usable backend against the unfused head+loss (eager reference, reference=True), the
unfused head + smsd's dino_loss, and on CUDA ``torch.compile`` of the unfused reference.
Peak MiB (CUDA) is the number the issue's target is about."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..backend import use_backend
from ..ops import dino_loss, fused_linear_dino_loss, reference
from ..validation import validation
from . import Case, usable_backends
from .dino_loss import compiled_reference

# (B images, n_student_views, n_teacher_views, D bottleneck, K, dtype)
SHAPES = {
    ("cuda", "full"): [(64, 10, 2, 256, 65536, torch.float32),
                       (64, 10, 2, 256, 65536, torch.bfloat16)],
    ("cpu", "full"): [(16, 10, 2, 256, 8192, torch.float32)],
    ("cuda", "quick"): [(4, 4, 2, 64, 4096, torch.float32)],
    ("cpu", "quick"): [(2, 4, 2, 32, 1000, torch.float32)],
}


def _unfused(loss_fn: Callable) -> Callable:
    def run(sf, tf, w, center, **opts):
        return loss_fn(sf @ w.T, tf @ w.T, center, **opts)

    return run


def _in_backend(backend: str, fn: Callable) -> Callable:
    def run(*args, **kwargs):
        with use_backend(backend), validation(False):
            return fn(*args, **kwargs)

    return run


def _shape_cases(device, backends, B, S, T, D, K, dtype) -> list[Case]:
    gen = torch.Generator(device=device).manual_seed(0)
    sf = torch.nn.functional.normalize(
        torch.randn(S * B, D, device=device, generator=gen), dim=-1).to(dtype)
    tf = torch.nn.functional.normalize(
        torch.randn(T * B, D, device=device, generator=gen), dim=-1).to(dtype)
    weight = torch.randn(K, D, device=device, generator=gen).to(dtype)
    sf.requires_grad_(True)
    weight.requires_grad_(True)
    shape = f"rows={S * B}+{T * B} D={D} K={K}"
    flops = 2 * D * K * (3 * S * B + T * B)  # logits, grad_feats, grad_weight; teacher logits
    variants: list[tuple[str, Callable, bool]] = [
        ("torch unfused", reference.fused_linear_dino_loss, True),
    ]
    for backend in backends:
        variants.append((backend, _in_backend(backend, fused_linear_dino_loss), False))
        variants.append((f"{backend} unfused", _in_backend(backend, _unfused(dino_loss)), False))
    if device.type == "cuda":
        variants.append(("torch.compile unfused", _unfused(compiled_reference()), False))
    cases = []
    for name, fn, is_ref in variants:
        center = torch.zeros(1, K, device=device)

        def step(fn=fn, center=center):
            sf.grad = weight.grad = None
            fn(sf, tf, weight, center, n_student_views=S, n_teacher_views=T).backward()

        cases.append(Case("fused_linear_dino_loss", "fwd+bwd", shape, dtype, name, step,
                          flops=flops, reference=is_ref))
    return cases


def cases(device: torch.device, size: str) -> list[Case]:
    out: list[Case] = []
    for shape in SHAPES[(device.type, size)]:
        out += _shape_cases(device, usable_backends(device), *shape)
    return out
