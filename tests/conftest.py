"""Test set-up: Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any kernel is defined, so it is set here,
before smsd (which imports kernels lazily) is imported by any test module.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import smsd
from smsd.backend import CORE_BACKENDS

# The second numeric environment (Makefile: test-numerics) emulates a CPU without
# AVX-512 by capping torch's kernels (ATEN_CPU_CAPABILITY). torch's oneDNN paths ask the
# CPU itself, not that cap, and bf16 SDPA then dies in an AVX-512-only packing routine
# ("pack_vnni2 is only supported when avx512 is supported"). A CPU that lacks AVX-512
# never takes those paths, so oneDNN is turned off to match it.
if os.environ.get("ATEN_CPU_CAPABILITY"):
    torch.backends.mkldnn.enabled = False

# `make test` sets SMSD_REQUIRE_BACKENDS so that a backend that failed to build fails
# the run instead of being skipped.
REQUIRED = {b for b in os.environ.get("SMSD_REQUIRE_BACKENDS", "").split(",") if b}


def backend_or_skip(name: str) -> str:
    status = smsd.backends()[name]
    if not status.available:
        if name in REQUIRED:
            pytest.fail(f"backend {name} is required (SMSD_REQUIRE_BACKENDS) but {status.detail}")
        pytest.skip(f"backend {name} unavailable: {status.detail}")
    return name


@pytest.fixture(params=CORE_BACKENDS)
def backend(request) -> str:
    """Each core backend in turn, active for the test (skipped with the reason if missing)."""
    name = backend_or_skip(request.param)
    with smsd.use_backend(name):
        yield name


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_without_interpreter(*args: str, timeout: float = 300) -> None:
    """Run ``python ARGS`` in a fresh process without TRITON_INTERPRET (which this test
    process sets), for tests that compile the Triton kernels for a GPU target; skip when
    triton ships no ptxas, fail with the child's stderr otherwise."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, *args], env=env, cwd=root, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("triton's ptxas is not available here")
    assert proc.returncode == 0, proc.stderr[-3000:]


# Fuzz tests report how many cases they ran; the totals close the test output.
FUZZ_COUNTS = pytest.StashKey[dict]()


@pytest.fixture
def fuzz_count(request):
    """``fuzz_count(name, n)`` adds ``n`` cases run under ``name`` to the run's summary."""
    counts = request.config.stash.setdefault(FUZZ_COUNTS, {})

    def record(name: str, n: int) -> None:
        counts[name] = counts.get(name, 0) + n
        request.node.user_properties.append((f"fuzz cases: {name}", n))

    return record


def pytest_terminal_summary(terminalreporter, config) -> None:
    counts = config.stash.get(FUZZ_COUNTS, {})
    if counts:
        # "kind (target)" names are summed per kind, the targets listed after the count.
        groups: dict[str, dict[str, int]] = {}
        for name, n in counts.items():
            kind, _, target = name.partition(" (")
            groups.setdefault(kind, {})[target.rstrip(")")] = n
        terminalreporter.section("fuzz cases run")
        for kind, parts in sorted(groups.items()):
            detail = ", ".join(f"{t} {n}" for t, n in sorted(parts.items()) if t)
            terminalreporter.write_line(f"{kind:<40}{sum(parts.values()):>8}  {detail}")
        terminalreporter.write_line(f"{'total':<40}{sum(counts.values()):>8}")
