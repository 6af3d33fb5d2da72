"""The Triton kernels of masked_sample compile for an H100 (sm_90) without a GPU.

The interpreter checks what the kernels compute (tests/test_masked_sample.py); compiling
them to PTX with triton's bundled toolchain checks what only the compiler sees: no
register spills to local memory, and 16-byte vector loads/stores on the token rows
(the access width a memory-bound gather needs to approach the copy ceiling). Runs in a
fresh process without TRITON_INTERPRET, which conftest sets for this one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compile_ptx(kernel, signature: dict, constexprs: dict, aligned: tuple, num_warps: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget

    names = list(signature)
    # What the JIT infers for real launches: pointers and row strides divisible by 16.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                    attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    return compiled.asm["ptx"]


def check_kernels(dtype: str) -> None:
    from smsd import _kernels

    module = _kernels.load("masked_sample")
    element = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}[dtype]
    block_r, block_d = module._tile(768, element)
    fwd = compile_ptx(
        module.masked_sample_fwd_kernel,
        {"x_ptr": f"*{dtype}", "index_ptr": "*i64", "perm_ptr": "*i64", "out_ptr": f"*{dtype}",
         "n_rows": "i32", "K": "i32", "D": "i32",
         "stride_xb": "i32", "stride_xn": "i32", "stride_xd": "constexpr",
         "stride_ib": "i32", "stride_ik": "constexpr", "stride_pb": "i32", "stride_pn": "constexpr",
         "HAS_PERM": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
        {"stride_xd": 1, "stride_ik": 1, "stride_pn": 1, "HAS_PERM": True,
         "BLOCK_R": block_r, "BLOCK_D": block_d},
        ("x_ptr", "index_ptr", "perm_ptr", "out_ptr", "D", "stride_xb", "stride_xn",
         "stride_ib", "stride_pb"),
        num_warps=4,
    )
    bwd = compile_ptx(
        module.masked_sample_bwd_kernel,
        {"grad_out_ptr": f"*{dtype}", "order_ptr": "*i64", "offsets_ptr": "*i64",
         "grad_x_ptr": f"*{dtype}", "n_rows": "i32", "N": "i32", "K": "i32", "D": "i32",
         "stride_gb": "i32", "stride_gk": "i32", "stride_gd": "constexpr",
         "BLOCK_R": "constexpr", "BLOCK_D": "constexpr", "ACC_FP64": "constexpr"},
        {"stride_gd": 1, "BLOCK_R": block_r, "BLOCK_D": block_d, "ACC_FP64": dtype == "fp64"},
        ("grad_out_ptr", "order_ptr", "offsets_ptr", "grad_x_ptr", "D", "stride_gb",
         "stride_gk"),
        num_warps=4,
    )
    for name, ptx in (("forward", fwd), ("backward", bwd)):
        assert ".local" not in ptx, f"{name} kernel spills registers"
        wide = r"v2\.b64" if dtype == "fp64" else r"v4\.b32"  # 16 bytes either way
        assert re.search(rf"st\.global(\.\w+)*\.{wide}", ptx), f"{name}: no 16-byte stores"
        assert re.search(rf"ld\.global(\.\w+)*\.{wide}", ptx), f"{name}: no 16-byte loads"


# fp64: the backward's sum is loop-carried, and an fp32 accumulator promoted by an fp64
# add does not compile (the interpreter accepts it), so fp64 is compiled too
@pytest.mark.parametrize("dtype", ("fp32", "bf16", "fp16", "fp64"))
def test_kernels_compile_for_h100_with_wide_accesses(dtype):
    # imported here: the child process runs this file and must not import conftest,
    # which turns the Triton interpreter on
    from conftest import run_without_interpreter

    pytest.importorskip("triton")
    run_without_interpreter(__file__, dtype)


if __name__ == "__main__":
    check_kernels(sys.argv[1])
