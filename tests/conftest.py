"""Test set-up: Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before any kernel is defined, so it is set here,
before smsd (which imports kernels lazily) is imported by any test module.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

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


# ------------------------------------------------------------------ fuzz targets
# Fuzz tests report how many cases they ran (``fuzz_count``); the totals close the test
# output. Every family ("kind" before " (" in the name) is declared here with the test
# file that runs it, the engine that file needs and the cases a full run must reach.
# With SMSD_REQUIRE_FUZZ=1 (``make test``) the session fails when a family whose test
# file lies under the paths pytest was given ran fewer cases than its target, however
# that happened: an engine missing (importorskip), tests skipped or deselected (-k, -m,
# --deselect, --ignore), fewer examples (SMSD_FUZZ_EXAMPLES, SMSD_ATHERIS_RUNS); and
# when a count is recorded under a name not declared here. Only naming fewer paths
# narrows what is enforced. Without it, a shortfall is a warning (docs/security.md).
FUZZ_COUNTS = pytest.StashKey[dict]()
FUZZ_REPORT = pytest.StashKey[tuple]()


def _require_fuzz() -> bool:
    return os.environ.get("SMSD_REQUIRE_FUZZ", "") not in ("", "0")


@dataclass(frozen=True)
class FuzzFamily:
    file: str  # the test file under tests/ that runs it
    engine: str | None  # the module its tests need
    target: int  # cases a full run must reach


_LOADERS, _EXAMPLES = 6, 60  # tests/fuzz_files.py LOADERS, SMSD_FUZZ_EXAMPLES default
FUZZ_FAMILIES: dict[str, FuzzFamily] = {
    **{f"hypothesis {kind}": FuzzFamily("test_fuzz_loaders.py", "hypothesis",
                                        _LOADERS * _EXAMPLES)
       for kind in ("truncated", "flipped bytes", "lying header size", "lying dtype",
                    "lying shape", "lying data_offsets", "huge shape", "nan/inf payload",
                    "arbitrary header", "random bytes")},
    "hypothesis dtype/metadata": FuzzFamily("test_fuzz_loaders.py", "hypothesis",
                                            3 * _EXAMPLES),
    # every digit and dtype character of each valid file's header (9,734 today)
    "exhaustive flipped header bytes": FuzzFamily("test_fuzz_loaders.py", "hypothesis", 9700),
    **{f"hypothesis sealed {kind}": FuzzFamily("test_fuzz_sealed.py", "hypothesis",
                                               2 * _EXAMPLES)
       for kind in ("flipped bytes", "truncated/extended", "random bytes")},
    "atheris libFuzzer inputs": FuzzFamily("test_fuzz_loaders_atheris.py", "atheris", 3000),
    "CLI broken files": FuzzFamily("test_fuzz_cli.py", None, 3 * 16),
    "CLI processes": FuzzFamily("test_fuzz_cli.py", None, 3),
}


@pytest.fixture
def fuzz_count(request):
    """``fuzz_count(name, n)`` adds ``n`` cases run under ``name`` to the run's summary."""
    counts = request.config.stash.setdefault(FUZZ_COUNTS, {})

    def record(name: str, n: int) -> None:
        counts[name] = counts.get(name, 0) + n
        request.node.user_properties.append((f"fuzz cases: {name}", n))

    return record


SKIPPED_MODULES: set[str] = set()  # test files skipped whole at collection


def pytest_sessionstart(session) -> None:
    SKIPPED_MODULES.clear()


def pytest_collectreport(report) -> None:
    if report.skipped:  # e.g. by importorskip of its engine
        SKIPPED_MODULES.add(Path(report.nodeid.split("::")[0]).name)


def _missing(engine: str) -> str | None:
    try:
        importlib.import_module(engine)
    except Exception as exc:  # ImportError, or an install that fails to import
        return f"{type(exc).__name__}: {exc}"
    return None


def _under_given_paths(config, file: Path) -> bool:
    for arg in config.args:
        given = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if file == given or given in file.parents:
            return True
    return False


def pytest_sessionfinish(session) -> None:
    config, require = session.config, _require_fuzz()
    if config.option.collectonly:
        return
    totals: dict[str, int] = {}
    for name, n in config.stash.get(FUZZ_COUNTS, {}).items():
        kind = name.partition(" (")[0]
        totals[kind] = totals.get(kind, 0) + n
    tests = Path(__file__).resolve().parent
    ran_files = {item.path.name for item in getattr(session, "items", [])}
    ran_files |= SKIPPED_MODULES
    problems = []
    for name, family in FUZZ_FAMILIES.items():
        if require:
            if not _under_given_paths(config, tests / family.file):
                continue
        elif family.file not in ran_files:
            continue
        ran = totals.get(name, 0)
        missing = family.engine and _missing(family.engine)
        if ran >= family.target or not (require or missing or ran):
            continue  # (without SMSD_REQUIRE_FUZZ, a family deselected entirely is quiet)
        why = f"; fuzz engine {family.engine} is missing ({missing})" if missing else ""
        problems.append(f"{name}: {ran} cases, target {family.target} "
                        f"(tests/{family.file}){why}")
    problems += [f"{kind}: {n} cases under a name with no target in tests/conftest.py "
                 "FUZZ_FAMILIES" for kind, n in sorted(totals.items())
                 if kind not in FUZZ_FAMILIES]
    config.stash[FUZZ_REPORT] = (require, tuple(problems))
    if require and problems and session.exitstatus in (pytest.ExitCode.OK,
                                                            pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
    require, problems = config.stash.get(FUZZ_REPORT, (False, ()))
    if problems:
        if require:
            terminalreporter.section("fuzz targets not met (SMSD_REQUIRE_FUZZ=1): the run "
                                     "FAILS", sep="!", red=True)
        else:
            terminalreporter.section("fuzz targets not met (a warning; make test sets "
                                     "SMSD_REQUIRE_FUZZ=1 and fails)", yellow=True)
        for line in problems:
            terminalreporter.write_line(line, red=require, yellow=not require)
