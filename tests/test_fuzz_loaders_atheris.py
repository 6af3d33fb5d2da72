"""A short, bounded atheris (libFuzzer) run over every loader, in a subprocess with a
capped address space (``tests/atheris_loaders.py``). ``SMSD_ATHERIS_RUNS`` sets the
number of inputs (default 3000)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("SMSD_ATHERIS_RUNS", "3000"))


def test_atheris_loaders(tmp_path, fuzz_count):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "atheris_loaders.py"), str(tmp_path / "corpus"),
         f"-runs={RUNS}", "-timeout=20", "-rss_limit_mb=4096", "-seed=1",
         f"-artifact_prefix={tmp_path}/"],
        env=env, capture_output=True, text=True, timeout=600)
    done = re.search(r"Done (\d+) runs", proc.stderr)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash", "timeout",
                                                                              "oom")))
    assert proc.returncode == 0 and not crashes, (crashes, proc.stderr[-4000:])
    assert done, proc.stderr[-2000:]
    fuzz_count("atheris libFuzzer inputs (all loaders)", int(done.group(1)))
