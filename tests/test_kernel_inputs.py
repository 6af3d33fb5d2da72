"""Bad kernel inputs are rejected before any kernel runs, on every backend.

An out-of-range index on a GPU is an illegal memory access or silent garbage, so every
op must refuse it (and mismatched shapes) in Python. Here every kernel entry point
(the Triton modules and the C++ extension) is replaced by one that fails the test when
called; each bad input must raise ``ValueError``/``TypeError`` naming the argument.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import smsd
from smsd.ops import attention, dino_loss, fused_linear_dino_loss, masked_sample

OP_MODULES = ("smsd.ops.masked_sample", "smsd.ops.attention", "smsd.ops.dino_loss")


class _KernelLaunched(AssertionError):
    pass


class _NoKernels:
    """Stands in for a kernel module: any function taken from it fails when called."""

    def __getattr__(self, name: str):
        def launched(*args, **kwargs):
            raise _KernelLaunched(f"kernel {name} was launched with invalid input")

        return launched


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setattr(smsd._kernels, "load", lambda op: _NoKernels())
    for name in OP_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "extension", lambda: _NoKernels())


def test_the_guard_catches_a_launch(backend, no_kernels):
    if backend == "torch":
        pytest.skip("the torch backend launches no smsd kernel")
    with pytest.raises(_KernelLaunched):
        masked_sample(torch.randn(2, 5, 3), torch.tensor([[0, 4], [1, 2]]))


def _x(B=2, N=5, D=3):
    return torch.randn(B, N, D)


def _perm(B=2, N=5):
    return torch.stack([torch.randperm(N) for _ in range(B)])


MASKED_SAMPLE = {
    "index >= N": (lambda: masked_sample(_x(), torch.tensor([[0, 5], [1, 2]])), r"index.*5"),
    "index < 0": (lambda: masked_sample(_x(), torch.tensor([[0, -1], [1, 2]])), r"index.*-1"),
    "int32 index >= N": (lambda: masked_sample(_x(), torch.tensor([[0, 1], [2, 9]],
                                                                  dtype=torch.int32)), "index"),
    "index rows != B": (lambda: masked_sample(_x(), torch.zeros(3, 2, dtype=torch.long)),
                        "batch size"),
    "K > N": (lambda: masked_sample(_x(), torch.zeros(2, 6, dtype=torch.long)), "N=5"),
    "float index": (lambda: masked_sample(_x(), torch.zeros(2, 2)), "index"),
    "x 2-D": (lambda: masked_sample(torch.randn(5, 3), torch.zeros(2, 2, dtype=torch.long)),
              "x must have 3"),
    "perm shape": (lambda: masked_sample(_x(), torch.zeros(2, 2, dtype=torch.long),
                                         _perm(2, 4)), "perm must have shape"),
    "perm value >= N": (lambda: masked_sample(_x(), torch.zeros(2, 2, dtype=torch.long),
                                              _perm().masked_fill(_perm() == 0, 5)),
                        "not a permutation"),
    "perm repeats": (lambda: masked_sample(_x(), torch.zeros(2, 2, dtype=torch.long),
                                           torch.tensor([[0, 1, 2, 3, 3], [0, 1, 2, 3, 4]])),
                     r"perm\[0\]"),
    "perm negative": (lambda: masked_sample(_x(), torch.zeros(2, 2, dtype=torch.long),
                                            torch.tensor([[0, 1, 2, 3, 4], [-1, 1, 2, 3, 4]])),
                      r"perm\[1\]"),
}


def _qkv(*shape, dtype=torch.float32):
    return tuple(torch.randn(*shape, dtype=dtype) for _ in range(3))


ATTENTION = {
    "index >= N": (lambda: attention(*_qkv(2, 2, 5, 4), index=torch.tensor([[0, 5], [1, 2]])),
                   r"index.*5"),
    "index < 0": (lambda: attention(*_qkv(2, 2, 5, 4), index=torch.tensor([[0, 1], [-3, 2]])),
                  r"index.*-3"),
    "index repeats": (lambda: attention(*_qkv(2, 2, 5, 4),
                                        index=torch.tensor([[0, 1], [2, 2]])), r"index\[1\]"),
    "index rows != B": (lambda: attention(*_qkv(2, 2, 5, 4),
                                          index=torch.zeros(1, 2, dtype=torch.long)), "B=2"),
    "M > N": (lambda: attention(*_qkv(2, 2, 5, 4), index=torch.arange(6).expand(2, 6)), "N=5"),
    "k shape": (lambda: attention(*_qkv(2, 2, 5, 4)[:2], torch.randn(2, 2, 6, 4)), "v has"),
    "dtype mix": (lambda: attention(*_qkv(2, 2, 5, 4)[:2],
                                    torch.randn(2, 2, 5, 4, dtype=torch.float16)), "dtype"),
    "head dim 300": (lambda: attention(*_qkv(1, 1, 2, 300)), "head dim"),
    "3-D dense": (lambda: attention(*_qkv(2, 5, 4)), r"\[B, H, N, d\]"),
    "index and cu_seqlens": (lambda: attention(*_qkv(5, 2, 4), index=torch.zeros(1, 1).long(),
                                               cu_seqlens=torch.tensor([0, 5],
                                                                       dtype=torch.int32)),
                             "not both"),
}


def _cu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


PACKED = {
    "cu_seqlens start != 0": (lambda: attention(*_qkv(6, 2, 4), cu_seqlens=_cu(1, 3, 6)),
                              "start at 0"),
    "cu_seqlens decreasing": (lambda: attention(*_qkv(6, 2, 4), cu_seqlens=_cu(0, 4, 2, 6)),
                              "non-decreasing"),
    "cu_seqlens end > T": (lambda: attention(*_qkv(6, 2, 4), cu_seqlens=_cu(0, 3, 9)),
                           "ends at 9"),
    "cu_seqlens end < T": (lambda: attention(*_qkv(6, 2, 4), cu_seqlens=_cu(0, 3, 5)),
                           "ends at 5"),
    "cu_seqlens negative": (lambda: attention(*_qkv(6, 2, 4), cu_seqlens=_cu(0, -2, 6)),
                            "non-decreasing"),
    "cu_seqlens int64": (lambda: attention(*_qkv(6, 2, 4),
                                           cu_seqlens=_cu(0, 6, dtype=torch.int64)), "int32"),
    "cu_seqlens 2-D": (lambda: attention(*_qkv(6, 2, 4), cu_seqlens=_cu(0, 6)[None]),
                       "1-D"),
    "max_seqlen too short": (lambda: attention(*_qkv(6, 2, 4), cu_seqlens=_cu(0, 2, 6),
                                               max_seqlen=3), "max_seqlen=3"),
    "max_seqlen not int": (lambda: attention(*_qkv(6, 2, 4), cu_seqlens=_cu(0, 2, 6),
                                             max_seqlen=4.5), "max_seqlen"),
    "max_seqlen negative": (lambda: attention(*_qkv(6, 2, 4), cu_seqlens=_cu(0, 2, 6),
                                              max_seqlen=-1), "max_seqlen"),
    "packed 4-D": (lambda: attention(*_qkv(1, 6, 2, 4), cu_seqlens=_cu(0, 6)), r"\[T, H, d\]"),
}


def _center(K=7, dtype=torch.float32):
    return torch.zeros(1, K, dtype=dtype)


DINO_LOSS = {
    "student rows": (lambda: dino_loss(torch.randn(7, 7), torch.randn(4, 7), _center(),
                                       n_student_views=4), "multiple of n_student_views"),
    "teacher rows": (lambda: dino_loss(torch.randn(8, 7), torch.randn(6, 7), _center(),
                                       n_student_views=4), "teacher has 6 rows"),
    "K mismatch": (lambda: dino_loss(torch.randn(8, 7), torch.randn(4, 6), _center(),
                                     n_student_views=4), "columns"),
    "center shape": (lambda: dino_loss(torch.randn(8, 7), torch.randn(4, 7), _center(6),
                                       n_student_views=4), "center must have shape"),
    "center dtype": (lambda: dino_loss(torch.randn(8, 7), torch.randn(4, 7),
                                       _center(dtype=torch.float16), n_student_views=4),
                     "center"),
    "dtype mix": (lambda: dino_loss(torch.randn(8, 7), torch.randn(4, 7).half(), _center(),
                                    n_student_views=4), "dtype"),
    "K = 0": (lambda: dino_loss(torch.randn(8, 0), torch.randn(4, 0), _center(0),
                                n_student_views=4), "K=0"),
}

FUSED = {
    "feature dim": (lambda: fused_linear_dino_loss(torch.randn(8, 5), torch.randn(4, 4),
                                                   torch.randn(7, 4), _center(),
                                                   n_student_views=4), "student_feats has 5"),
    "teacher rows": (lambda: fused_linear_dino_loss(torch.randn(8, 4), torch.randn(3, 4),
                                                    torch.randn(7, 4), _center(),
                                                    n_student_views=4), "teacher_feats has 3"),
    "center shape": (lambda: fused_linear_dino_loss(torch.randn(8, 4), torch.randn(4, 4),
                                                    torch.randn(7, 4), _center(8),
                                                    n_student_views=4), "center"),
    "chunk_rows 0": (lambda: fused_linear_dino_loss(torch.randn(8, 4), torch.randn(4, 4),
                                                    torch.randn(7, 4), _center(),
                                                    n_student_views=4, chunk_rows=0),
                     "chunk_rows"),
}

CASES = {f"{op}: {name}": case for op, table in (
    ("masked_sample", MASKED_SAMPLE), ("attention", ATTENTION), ("attention packed", PACKED),
    ("dino_loss", DINO_LOSS), ("fused_linear_dino_loss", FUSED)) for name, case in table.items()}
# Checks that read values (and so sync); smsd.validation(False) turns only these off.
VALUE_CHECKS = {
    *(f"masked_sample: {n}" for n in ("index >= N", "index < 0", "int32 index >= N",
                                      "perm value >= N", "perm repeats", "perm negative")),
    *(f"attention: {n}" for n in ("index >= N", "index < 0", "index repeats")),
    *(f"attention packed: {n}" for n in ("cu_seqlens start != 0", "cu_seqlens decreasing",
                                         "cu_seqlens end > T", "cu_seqlens end < T",
                                         "cu_seqlens negative", "max_seqlen too short")),
}
SHAPE_ONLY = [name for name in CASES if name not in VALUE_CHECKS]


@pytest.mark.parametrize("case", list(CASES))
def test_rejected_before_any_kernel(case, backend, no_kernels):
    call, message = CASES[case]
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("case", SHAPE_ONLY)
def test_shape_checks_stay_on_without_validation(case, backend, no_kernels):
    call, message = CASES[case]
    with smsd.validation(False), pytest.raises((ValueError, TypeError), match=message):
        call()


def test_valid_inputs_reach_the_kernel(backend, no_kernels):
    """The guard is not vacuous: the same calls with good inputs do launch."""
    if backend == "torch":
        pytest.skip("the torch backend launches no smsd kernel")
    calls = [
        lambda: masked_sample(_x(), torch.tensor([[0, 4], [1, 2]]), _perm()),
        lambda: attention(*_qkv(2, 2, 5, 4), index=torch.tensor([[0, 4], [1, 2]])),
        lambda: attention(*_qkv(6, 2, 4), cu_seqlens=_cu(0, 2, 6)),
        lambda: dino_loss(torch.randn(8, 7), torch.randn(4, 7), _center(), n_student_views=4),
        lambda: fused_linear_dino_loss(torch.randn(8, 4), torch.randn(4, 4), torch.randn(7, 4),
                                       _center(), n_student_views=4),
    ]
    for call in calls:
        with pytest.raises(_KernelLaunched):
            call()
