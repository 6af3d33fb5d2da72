"""Benchmark cases of dino_loss (see smsd.bench): fwd+bwd of every usable backend, the eager
reference and, on CUDA, ``torch.compile`` of the reference, in the same run."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _kernels
from ..backend import use_backend
from ..ops import dino_loss, reference
from ..validation import validation
from . import Case, usable_backends

# (B images, n_student_views, n_teacher_views, K, dtype); the target shapes first.
SHAPES = {
    ("cuda", "full"): [(64, 10, 2, 65536, torch.float32), (64, 10, 2, 65536, torch.bfloat16)],
    ("cpu", "full"): [(16, 10, 2, 8192, torch.float32)],
    ("cuda", "quick"): [(4, 4, 2, 4096, torch.float32)],
    ("cpu", "quick"): [(2, 4, 2, 1000, torch.float32)],
}


def compiled_reference() -> Callable:
    """``torch.compile`` of the reference; a failure shows up as the row's error."""
    compiled = torch.compile(reference.dino_loss)

    def run(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # any compiler failure: report it, don't abort the table
            raise RuntimeError(f"torch.compile failed: {type(exc).__name__}: {exc}") from exc

    return run


def _op(backend: str) -> Callable:
    if backend == "torch":
        return reference.dino_loss
    if backend == "torch.compile":
        return compiled_reference()

    def run(*args, **kwargs):
        with use_backend(backend), validation(False):
            return dino_loss(*args, **kwargs)

    return run


def _shape_cases(device, backends, B, S, T, K, dtype) -> list[Case]:
    gen = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(S * B, K, device=device, dtype=dtype, generator=gen)
    student.requires_grad_(True)
    teacher = torch.randn(T * B, K, device=device, dtype=dtype, generator=gen)
    shape = f"B={B} views={S}+{T} K={K}"
    elt = student.element_size()
    # the floor: read student and teacher once, write the gradient once
    bytes_moved = (2 * S * B + T * B) * K * elt
    # what the Triton kernels move (forward + backward, partials included): autograd's
    # contract makes the backward read student and teacher again
    traffic = (_kernels.load("dino_loss").traffic(S * B, T * B, K, elt, T)
               if device.type == "cuda" else None)
    cases = []
    for backend in backends:
        op = _op(backend)
        center = torch.zeros(1, K, device=device)

        def step(op=op, center=center):
            student.grad = None
            op(student, teacher, center, n_student_views=S, n_teacher_views=T).backward()

        cases.append(Case("dino_loss", "fwd+bwd", shape, dtype, backend, step, bytes_moved,
                          traffic=traffic if backend == "triton" else None,
                          reference=backend == "torch"))
    return cases


def cases(device: torch.device, size: str) -> list[Case]:
    backends = [*usable_backends(device), "torch"]
    if device.type == "cuda":
        backends.append("torch.compile")
    out: list[Case] = []
    for shape in SHAPES[(device.type, size)]:
        out += _shape_cases(device, backends, *shape)
    return out
