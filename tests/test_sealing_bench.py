"""benchmarks/sealing.py runs at a tiny size and writes every row (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sealing_benchmark_writes_its_rows(tmp_path):
    path = ROOT / "benchmarks" / "sealing.py"
    spec = importlib.util.spec_from_file_location("sealing_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sealing.json"
    assert bench.main(["--mib", "1", "--repeats", "1", "--budget", "0", "--dir", str(tmp_path),
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    ops = {(r["op"], r.get("aead")) for r in rows}
    for aead in ("aes-256-gcm", "chacha20-poly1305"):
        assert ("seal", aead) in ops and ("unseal", aead) in ops
    assert all(r["MBps"] > 0 for r in rows)
