"""benchmarks/train_step.py runs on the CPU with the tiny model and writes its JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from smsd.bench.train_step import PHASES
from smsd.cli import main

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["smsd", "smsd+ckpt", "smsd-unfused", "torch-eager", "torch-loop"]


def check_report(report: dict, variants: list[str]) -> None:
    assert report["phases"] == list(PHASES)
    assert {"date", "torch", "card", "device"} <= set(report["environment"])
    (result,) = report["results"]
    assert result["preset"] == "tiny" and result["view_tokens"] == [48] * 2 + [16] * 8
    assert [row["variant"] for row in result["rows"]] == variants
    for row in result["rows"]:
        assert row["ms"] > 0 and row["img_per_s"] > 0 and row["peak_gib"] is None  # CPU
        assert set(row["phases_ms"]) == set(PHASES)
        assert all(t >= 0 for t in row["phases_ms"].values())
        assert row["speedup_vs_torch-eager"] > 0
        assert 0 < row["loss"] < 100  # a DINO loss, finite
    # Same seeds, data and view draws: every variant trains the same trajectory, so the
    # benchmark compares equal work (fp32 on the CPU; ~1e-7 apart after a few steps).
    losses = [row["loss"] for row in result["rows"]]
    assert max(losses) - min(losses) < 1e-4 * losses[0]


def test_benchmark_script_tiny(tmp_path):
    out = tmp_path / "train_step.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "--tiny", "--steps", "2", "--warmup", "1",
         "--interleave", "--threads", "1", "--variants", *VARIANTS, "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "img/s" in proc.stdout
    check_report(json.loads(out.read_text()), VARIANTS)


def test_smsd_bench_train_step_quick(tmp_path, capsys):
    assert main(["bench", "--train-step", "--device", "cpu", "--size", "quick",
                 "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-cpu-train_step.json")
    check_report(json.loads(path.read_text()), ["smsd", "torch-eager", "torch-loop"])
    assert "torch-loop" in capsys.readouterr().out
