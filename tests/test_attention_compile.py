"""The compiled (GPU) form of the Triton attention kernels builds for an H100, no GPU needed.

The interpreter runs the kernels with ``while`` loops (see kernels/attention.py), so
the ``for``-loop form that a GPU runs is checked here by compiling it for sm_90 in a
subprocess (the test process has TRITON_INTERPRET=1, which swaps the kernels out).
"""

from __future__ import annotations

import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from smsd import _kernels

    K = _kernels.load("attention")
    POINTERS = {"Q", "K", "V", "Out", "Lse", "Index", "Cu", "DOut", "Delta", "DK", "DV", "DQ"}
    FP32 = {"Lse", "Delta"}

    def signature(fn, consts):
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in POINTERS:
                sig[name] = ("*i64" if name == "Index" else "*i32" if name == "Cu"
                             else "*fp32" if name in FP32 else "*bf16")
            else:
                sig[name] = "fp32" if name in ("scale", "qk_scale") else "i32"
        return sig

    for varlen in (False, True):
        for fn, key in ((K.attention_fwd_kernel, "fwd"), (K.attention_bwd_dkdv_kernel, "dkdv"),
                        (K.attention_bwd_dq_kernel, "dq")):
            block_m, block_n, warps, stages = K._blocks(64, None, short_views=varlen)[key]
            consts = dict(HAS_INDEX=not varlen, VARLEN=varlen, DOT_PRECISION=None,
                          WHILE_LOOPS=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=64)
            src = triton.compiler.ASTSource(
                fn=fn, signature=signature(fn, consts),
                constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=stages))
    print("compiled")
""")


@pytest.mark.slow
def test_gpu_kernels_compile_for_sm90():
    # imported here: the child process runs this file and must not import conftest,
    # which turns the Triton interpreter on
    from conftest import run_without_interpreter

    pytest.importorskip("triton")
    run_without_interpreter("-c", SCRIPT, timeout=600)
