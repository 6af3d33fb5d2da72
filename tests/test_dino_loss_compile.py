"""The Triton kernels of dino_loss compile for an H100 (sm_90) without a GPU.

The interpreter runs the kernels' semantics (tests/test_dino_loss.py); this compiles them
down to a cubin with the ptxas bundled with triton, catching what only the compiler
sees (loop-carried types, register spills into local memory), at the block sizes used
for K=65536. Each compile runs in a fresh process without TRITON_INTERPRET, which
conftest sets for this one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compile_for_h100(dtype: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    from smsd import _kernels

    module = _kernels.load("dino_loss")
    ptr = "*" + dtype
    student = {
        "s_ptr": ptr, "t_ptr": ptr, "c_ptr": "*fp32", "pmax_ptr": "*fp32", "psum_ptr": "*fp32",
        "g_ptr": ptr, "loss_ptr": "*fp32", "row_offset": "i32", "B": "i32", "K": "i32",
        "n_teacher_views": "i32", "n_chunks": "i32",
        "stride_s": "i32", "stride_t": "i32", "stride_g": "i32",
        "inv_ts": "fp32", "inv_tt": "fp32", "grad_scale": "fp32",
        "WRITE_GRAD": "constexpr", "BLOCK": "constexpr", "CHUNKS": "constexpr",
    }
    teacher = {
        "t_ptr": ptr, "c_ptr": "*fp32", "pmax_ptr": "*fp32", "psum_ptr": "*fp32",
        "colsum_ptr": "*fp32", "n_rows": "i32", "K": "i32", "stride_t": "i32",
        "n_chunks": "i32", "inv_tt": "fp32", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr",
    }
    kernels = (
        (module.student_loss_grad_kernel, student,
         {"WRITE_GRAD": True, "BLOCK": module._STUDENT_BLOCK, "CHUNKS": 128}, 8),
        (module.teacher_stats_kernel, teacher,
         {"BLOCK_R": module._TEACHER_BLOCK_R, "BLOCK_C": module._TEACHER_BLOCK_C}, 4),
    )
    for kernel, signature, constexprs, num_warps in kernels:
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, **module._COMPILE})
        ptx = compiled.asm["ptx"]
        assert ".local" not in ptx, f"{kernel.fn.__name__} spills registers"
        assert "fma.rn.f32" not in ptx, f"{kernel.fn.__name__}: FMA contraction (see _COMPILE)"


@pytest.mark.parametrize("dtype", ("fp32", "bf16", "fp16"))
def test_kernels_compile_for_h100_without_spills(dtype):
    # imported here: the child process runs this file and must not import conftest,
    # which turns the Triton interpreter on
    from conftest import run_without_interpreter

    pytest.importorskip("triton")
    run_without_interpreter(__file__, dtype)


if __name__ == "__main__":
    compile_for_h100(sys.argv[1])
