"""benchmarks/device_session.py: each stage writes its rows as it goes and stops starting
items once its budget is spent (here at tiny shapes on the CPU, ``--smoke``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_session.py"


def _run(tmp_path: Path, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                               "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = args[args.index("--stage") + 1]
    return [json.loads(line) for line in (tmp_path / f"{stage}.jsonl").read_text().splitlines()]


def test_correctness_stage_checks_every_kernel(tmp_path):
    rows = _run(tmp_path, "--stage", "correctness")
    assert rows[0]["kind"] == "environment" and rows[-1]["kind"] == "done"
    checks = [r for r in rows if r["kind"] == "check"]
    assert {r["op"] for r in checks} >= {"masked_sample", "dino_loss", "attention"}
    assert all(r["backend"] == "triton" for r in checks)
    assert all(r["passed"] for r in checks), [r for r in checks if not r["passed"]]
    assert not [r for r in rows if r["kind"] == "error"]


def test_a_spent_budget_skips_items_and_still_closes(tmp_path):
    rows = _run(tmp_path, "--stage", "goals", "--budget-s", "0")
    skipped = [r["item"] for r in rows if r["kind"] == "skipped"]
    assert skipped[:3] == ["gather", "dino_loss", "attention"]
    assert any(item.startswith("train_step") for item in skipped)
    assert rows[-1]["kind"] == "done"
