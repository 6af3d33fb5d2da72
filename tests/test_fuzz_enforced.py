"""The fuzz targets are enforced (``tests/conftest.py``, ``FUZZ_FAMILIES``): pytest
sessions in a subprocess with atheris made unimportable, a family deselected and another
run with fewer examples: under ``SMSD_REQUIRE_FUZZ=1`` (as ``make test`` sets it) the
session fails, naming each family, its count and its target; without it, it passes
with a warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# atheris made unimportable the way a missing install is (`import atheris` fails); the
# same sessions with and without SMSD_REQUIRE_FUZZ, in one process (one torch import).
SESSIONS = """
import os, sys
sys.modules["atheris"] = None
import pytest
for require in ("1", ""):
    os.environ["SMSD_REQUIRE_FUZZ"] = require
    print("@@ session", repr(require), flush=True)
    code = pytest.main(sys.argv[1:])
    print("@@ exit", int(code), flush=True)
"""
ARGS = ["-q", "-p", "no:cacheprovider", "tests/test_fuzz_loaders_atheris.py",
        "tests/test_fuzz_sealed.py", "-k", "random_bytes"]


def test_missing_engine_and_short_families_fail_the_enforced_session():
    env = dict(os.environ, SMSD_FUZZ_EXAMPLES="2", PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", SESSIONS, *ARGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, enforced, warned = proc.stdout.split("@@ session")
    atheris = ("atheris libFuzzer inputs: 0 cases, target 3000 "
               "(tests/test_fuzz_loaders_atheris.py); fuzz engine atheris is missing")
    short = "hypothesis sealed random bytes: 4 cases, target 120 (tests/test_fuzz_sealed.py)"
    deselected = "hypothesis sealed flipped bytes: 0 cases, target 120"
    for out in (enforced, warned):
        assert atheris in out and short in out, out[-3000:]
        assert "hypothesis truncated" not in out, out[-3000:]  # its file was not given
    assert "@@ exit 1" in enforced and "the run FAILS" in enforced, enforced[-3000:]
    assert deselected in enforced, enforced[-3000:]
    assert "@@ exit 0" in warned and "a warning" in warned, warned[-3000:]
    assert deselected not in warned, warned[-3000:]  # deselected without the env var: quiet
