"""The smsd command line: backends, check, bench, keygen, errors without tracebacks."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

from smsd.cli import main


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    for command in ("backends", "check", "bench", "keygen"):
        assert command in out


def test_backends(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "triton" in out and "cpp" in out and "torch" in out


def test_check_passes_on_every_backend(capsys):
    assert main(["check", "--device", "cpu", "--triton-interpret"]) == 0
    out = capsys.readouterr().out
    assert " 0 failed" in out
    for backend in ("triton", "cpp", "torch"):
        assert re.search(rf"^masked_sample\s+{backend}\s+cpu\s.*\spass\s", out, re.M)


def test_bench_quick_writes_json(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--size", "quick", "--budget", "0.05",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "median ms" in out and "torch.gather" in out
    (result,) = tmp_path.glob("*.json")
    report = json.loads(result.read_text())
    assert report["environment"]["card"].startswith("CPU")
    assert report["environment"]["copy_ceiling_GBps"] > 0
    # The header names the CPU model (/proc/cpuinfo) and the ISA each kernel family used.
    cpu = report["environment"]["cpu"]
    header = out.splitlines()[0]
    assert cpu["model"] in header and f"CPU ISA {cpu['cpu_isa']}" in header
    assert f"smsd row loops {cpu['smsd_row_loops']}" in header
    assert cpu["smsd_row_loops"] in ("avx512", "avx2", "baseline")
    rows = report["rows"]
    assert {r["backend"] for r in rows} >= {"torch.gather", "torch 2x gather"}
    assert all(r["median_ms"] > 0 for r in rows)
    refs = [r for r in rows if r["backend"].startswith("torch")]
    assert all(r["speedup_vs_reference"] == 1.0 for r in refs)


def test_keygen_creates_0600_key_and_refuses_to_overwrite(tmp_path, capsys):
    path = tmp_path / "site.key"
    assert main(["keygen", "--out", str(path)]) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first = path.read_bytes()
    assert first.hex() not in capsys.readouterr().out
    assert main(["keygen", "--out", str(path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert path.read_bytes() == first
    assert main(["keygen", "--out", str(path), "--force"]) == 0
    assert path.read_bytes() != first


def test_errors_print_one_line_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "smsd.cli", "keygen", "--out", str(tmp_path / "no" / "k")],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr
