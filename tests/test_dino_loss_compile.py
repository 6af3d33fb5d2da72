"""The Triton kernels of dino_loss compile for an H100 (sm_90) without a GPU, as their real
launches specialize them, and with no FMA contraction.

The interpreter runs the kernels' semantics (tests/test_dino_loss.py); this compiles them
down to PTX with the Triton bundled here, at the goal shapes (640 x 65,536), capturing the
launches of ``forward`` / ``backward`` and of the fused head's ``teacher_stats`` /
``student_loss_grad`` through ``benchmarks/kernel_resources.py`` (the same constexprs
and divisibility attributes a GPU run gets). Registers and spills are that script's job
(tests/test_kernel_resources.py); here: the kernels take ``x = (t - c) * (1 / T)`` and
then ``exp(x - max)``, and a fused multiply-add would round ``x`` differently in the
forward's statistics and in the backward's targets (teacher rows summing to 2 % off 1 at
logits of 1e4). Each compile runs in a fresh process without TRITON_INTERPRET, which
conftest sets for this one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def check_no_fma(dtype: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location(
        "kernel_resources", ROOT / "benchmarks" / "kernel_resources.py")
    resources = importlib.util.module_from_spec(spec)
    sys.modules["kernel_resources"] = resources
    spec.loader.exec_module(resources)
    scenarios = [s for s in resources.dino_loss_scenarios() if s.dtype == dtype]
    specs = resources.capture(scenarios)
    seen = {s.kernel for s in specs}
    want = {"forward_partials_kernel", "forward_combine_kernel", "backward_kernel",
            "teacher_stats_kernel", "student_loss_grad_kernel"}
    assert want <= seen, f"launches not captured: {sorted(want - seen)}"
    for s in specs:
        signature, constexprs, attrs, options = s.packed
        compiled = triton.compile(ASTSource(s.fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", 90, 32), options=options.__dict__)
        assert "fma.rn.f32" not in compiled.asm["ptx"], f"{s.kernel}: FMA contraction"


@pytest.mark.parametrize("dtype", ("fp32", "bf16"))
def test_kernels_compile_for_h100_without_fma(dtype):
    # imported here: the child process runs this file and must not import conftest,
    # which turns the Triton interpreter on
    from conftest import run_without_interpreter

    pytest.importorskip("triton")
    run_without_interpreter(__file__, dtype)


if __name__ == "__main__":
    check_no_fma(sys.argv[1])
