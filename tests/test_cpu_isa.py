"""The C++ kernels' row loops on every instruction set this CPU has.

The extension carries AVX-512, AVX2 and baseline (SSE2) bodies and picks one at run
time; a CPU without AVX-512 (AMD EPYC before Zen 4) runs the AVX2 bodies, and every
x86-64 CPU can run the baseline. SMSD_CPU_ISA forces a narrower body, so each is
checked here against the float64 reference with the same rule as ``smsd check``.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import smsd

ISAS = ("baseline", "avx2", "avx512")

CHECK = """
import sys, torch, smsd, smsd._C
from smsd.selfcheck import attention, dino_loss
assert smsd._C.cpu_isa() == sys.argv[1], (smsd._C.cpu_isa(), sys.argv[1])
bad = [r for m in (attention, dino_loss) for r in m.checks("cpp", torch.device("cpu"))
       if not r.passed]
assert not bad, bad
print("ok", smsd._C.cpu_isa())
"""


def _run(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cpu_isa() -> str:
    if not smsd.backends()["cpp"].available:
        pytest.skip("cpp extension not built")
    return importlib.import_module("smsd._C").cpu_isa()


@pytest.mark.parametrize("isa", ISAS)
def test_cpp_kernels_on_each_isa(cpu_isa, isa):
    if ISAS.index(isa) > ISAS.index(cpu_isa):
        pytest.skip(f"this CPU runs {cpu_isa} at most")
    proc = _run(CHECK, isa, SMSD_CPU_ISA=isa)
    assert proc.returncode == 0 and f"ok {isa}" in proc.stdout, proc.stderr[-3000:]


def test_a_wider_isa_than_the_cpu_has_is_capped(cpu_isa):
    proc = _run("import smsd._C; print(smsd._C.cpu_isa())", SMSD_CPU_ISA="avx512")
    assert proc.stdout.strip() == cpu_isa


def test_unknown_isa_name_is_refused(cpu_isa):
    proc = _run("import smsd; print(smsd.backends()['cpp'].detail)", SMSD_CPU_ISA="sse9")
    assert "SMSD_CPU_ISA=sse9 is not one of avx512, avx2, baseline" in proc.stdout
    code = ("import torch, smsd; from smsd.ops import dino_loss\n"
            "s = torch.randn(4, 64); t = torch.randn(4, 64); c = torch.zeros(1, 64)\n"
            "with smsd.use_backend('cpp'): dino_loss(s, t, c, n_student_views=2)")
    proc = _run(code, SMSD_CPU_ISA="sse9")
    assert proc.returncode != 0
    assert "SMSD_CPU_ISA=sse9 is not one of avx512, avx2, baseline" in proc.stderr
