"""The smsd ops are torch.library custom ops: opcheck passes on every op and backend, and
``torch.compile(fullgraph=True)`` traces the whole forward of DistillStep (no graph break)
on the CPU (Inductor's C++ backend), giving the eager step's result.

Tolerance of the compiled step: Inductor reorders and fuses the elementwise ops around
the kernels (LayerNorm, GELU, residuals, softmax of the head), which moves fp32 results by
a few ulps per op; tests/test_distill_step.py's ``rtol=1e-4, atol=1e-5`` (measured gaps
below 1e-6 after two steps) applies unchanged.
"""

from __future__ import annotations

import pytest
import torch
from test_distill_step import FAST_PATHS, assert_same, run_steps

import smsd
from smsd.ops import _library

BACKENDS = ["cpp", "torch", "triton"]


def _backend_or_skip(name: str) -> None:
    status = smsd.backends()[name]
    if not status.available:
        pytest.skip(f"{name}: {status.detail}")


def _op(name: str):
    return getattr(torch.ops.smsd, name.split("::")[1]).default


def _inputs(gen: torch.Generator) -> dict[str, tuple]:
    """Small odd-sized arguments for every forward and backward op."""
    def rand(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)

    B, N, D, K = 2, 7, 5, 4
    x = rand(B, N, D, grad=True)
    index = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)])
    perm = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)])
    S, T, rows, cols = 3, 2, 2, 11
    student, teacher = rand(S * rows, cols, grad=True), rand(T * rows, cols)
    center = rand(1, cols)
    H, d = 2, 8
    q, k, v = (rand(B, H, N, d, grad=True) for _ in range(3))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = rand(7, H, d, grad=True)
    qkv = rand(B, N, 3, H, d, grad=True)
    feats, w = rand(S * rows, 6, grad=True), rand(cols, 6, grad=True)
    dino = (student, teacher, center, S, T, 0.1, 0.04)
    att_out, att_lse = _op("smsd::attention")(q, k, v, index, None, 0, 0.3)
    return {
        "smsd::masked_sample": (x, index, perm, True),
        "smsd::masked_sample_backward": (rand(B, K, D), index, perm, N, True),
        "smsd::dino_loss": (*dino, True),
        "smsd::dino_loss_backward": (
            torch.tensor(0.37), student.detach(), teacher, center,
            *(t.detach() for t in _op("smsd::dino_loss")(*dino, False)[2:]), *dino[3:]),
        "smsd::fused_linear_dino_loss": (feats, rand(T * rows, 6), w, center, None, S, T, 0.1,
                                         0.04, 4, True, True),
        "smsd::attention": (q, k, v, index, None, 0, 0.3),
        "smsd::attention_backward": (rand(B, H, K, d), q.detach(), k.detach(), v.detach(),
                                     att_out.detach(), att_lse.detach(), index, None, 0, 0.3),
        "smsd::attention_qkv": (rand(7, 3, H, d, grad=True), None, cu, -1, 0.3),
        "smsd::attention_qkv_backward": (
            rand(B, H, N, d), qkv.detach(), *(t.detach() for t in _op("smsd::attention_qkv")(
                qkv, None, None, 0, 0.3)), None, None, 0, 0.3),
        "_packed": (packed, packed, packed, None, cu, 4, 0.3),
    }


def test_every_op_is_listed():
    assert sorted(_library.CUSTOM_OPS) == sorted(
        n for n in _inputs(torch.Generator().manual_seed(0)) if n.startswith("smsd::"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(_library.CUSTOM_OPS))
def test_opcheck(name, backend):
    """Schema, fake (meta) implementation, autograd registration and AOT tracing."""
    _backend_or_skip(backend)
    with smsd.use_backend(backend):
        args = _inputs(torch.Generator().manual_seed(0))[name]
        torch.library.opcheck(_op(name), args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_packed_attention(backend):
    _backend_or_skip(backend)
    with smsd.use_backend(backend):
        torch.library.opcheck(_op("smsd::attention"),
                              _inputs(torch.Generator().manual_seed(0))["_packed"])


def test_backend_is_chosen_when_the_compiled_graph_runs():
    """The backend is resolved inside the op: a graph compiled under one backend runs the
    one requested when it is called, and a backend that cannot run still raises."""
    x = torch.randn(2, 5, 3)
    index = torch.tensor([[0, 2], [4, 1]])
    fn = torch.compile(lambda x, i: smsd.ops.masked_sample(x, i) * 2, fullgraph=True)
    with smsd.use_backend("torch"):
        expected = fn(x, index)
    with smsd.use_backend("cpp"):
        torch.testing.assert_close(fn(x, index), expected, rtol=0, atol=0)
    smsd.backend.register_backend(
        "absent", lambda: smsd.backend.BackendStatus("absent", False, "not here"))
    try:
        with smsd.use_backend("absent"), pytest.raises(smsd.BackendUnavailableError,
                                                       match=r"not here|does not implement"):
            fn(x, index)
    finally:
        smsd.backend._STATUS_PROBES.pop("absent")
        smsd.backend._status.cache_clear()


def test_value_checks_run_inside_the_compiled_graph():
    x = torch.randn(2, 5, 3)
    fn = torch.compile(lambda x, i: smsd.ops.masked_sample(x, i), fullgraph=True)
    with pytest.raises(ValueError, match="outside"):
        fn(x, torch.tensor([[0, 5], [1, 2]]))
    with smsd.validation(True), pytest.raises(ValueError, match="repeats"):
        torch.compile(lambda x, i: smsd.ops.masked_sample(x, i, unique=True),
                      fullgraph=True)(x, torch.tensor([[1, 1], [1, 2]]))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["plain", "all"])
def test_compiled_step_matches_eager(path):
    """fullgraph=True: any graph break in sampling, models or loss raises."""
    _backend_or_skip("cpp")
    options = {"plain": dict(packed=False), "all": FAST_PATHS["all"]}[path]
    torch._dynamo.reset()
    with smsd.use_backend("cpp"):
        expected = run_steps(3, options, koleo=0.1)
        got = run_steps(3, {**options, "compile_step": True}, koleo=0.1)
    assert_same(got, expected)


def test_compile_step_and_compile_blocks_are_exclusive():
    with pytest.raises(ValueError, match="compile_step"):
        run_steps(2, dict(packed=False, compile_step=True, compile_blocks=True), steps=1)
