"""Commands without an optional extra: one clear line naming ``pip install 'smsd[...]'``,
before any work, nothing half-written; or, for the simulate plot only, the numbers first
and the plot skipped with a warning.

Each case runs the CLI in a fresh process in which the extra's modules cannot be
imported (``sys.modules[name] = None``, which both ``import`` and ``find_spec`` honour).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

RUN_WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
from smsd.cli import main
sys.exit(main(sys.argv[2:]))
"""


def smsd_without(modules: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                     os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", RUN_WITHOUT, modules, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("smsd ")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def png_folder(tmp_path) -> Path:
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    return tmp_path / "images"


def test_simulate_without_matplotlib_keeps_the_numbers(tmp_path):
    proc = smsd_without("matplotlib", "simulate", "--quick", "--no-progress", "--out", "sim",
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "sim"
    assert (out / "results.json").is_file() and (out / "results.csv").is_file()
    assert not (out / "results.png").exists()
    assert "results.png skipped: matplotlib is not installed (pip install 'smsd[data]')" \
        in proc.stdout + proc.stderr


def test_simulate_flower_engine_without_flower_fails_before_work(tmp_path):
    started = time.perf_counter()
    proc = smsd_without("flwr", "simulate", "--quick", "--engine", "flower", "--out", "sim",
                        cwd=tmp_path)
    one_error_line(proc, "--engine flower needs flwr", "pip install 'smsd[flower]'")
    assert not (tmp_path / "sim").exists()
    assert "SMSD" not in proc.stdout  # no method ran
    assert time.perf_counter() - started < 60


def test_simulate_digits_without_scikit_learn(tmp_path):
    proc = smsd_without("sklearn", "simulate", "--quick", "--out", "sim", cwd=tmp_path)
    one_error_line(proc, "--dataset digits needs sklearn", "pip install 'smsd[data]'")
    assert not (tmp_path / "sim").exists()


@pytest.mark.parametrize("module", ["scipy", "dp_accounting"])
def test_audit_without_its_extra(tmp_path, module):
    proc = smsd_without(module, "audit", "--images", "digits", "--limit", "4", "--out", "a",
                        cwd=tmp_path)
    one_error_line(proc, "smsd audit", f"needs {module}", "pip install 'smsd[audit]'")
    assert not (tmp_path / "a").exists()


def test_encode_without_pillow_writes_nothing(tmp_path, png_folder):
    assert subprocess.run([sys.executable, "-m", "smsd.cli", "keygen", "--out", "k.key"],
                          cwd=tmp_path, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode == 0
    proc = smsd_without("PIL", "encode", "--data", str(png_folder), "--key", "k.key",
                        "--out", "s.safetensors", "--img-size", "16", "--loader", "torch",
                        cwd=tmp_path)
    one_error_line(proc, "needs PIL", "pip install 'smsd[data]'")
    assert not (tmp_path / "s.safetensors").exists()


def test_encode_dicom_without_pydicom(tmp_path):
    (tmp_path / "scans" / "x").mkdir(parents=True)
    (tmp_path / "scans" / "x" / "a.dcm").write_bytes(b"\0" * 256)
    subprocess.run([sys.executable, "-m", "smsd.cli", "keygen", "--out", "k.key"], cwd=tmp_path,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    proc = smsd_without("pydicom", "encode", "--data", "scans", "--key", "k.key",
                        "--out", "s.safetensors", "--loader", "torch", cwd=tmp_path)
    one_error_line(proc, "a.dcm (DICOM) needs pydicom", "pip install 'smsd[dicom]'")
    assert not (tmp_path / "s.safetensors").exists()


def test_backends_lists_the_missing_extras(tmp_path):
    proc = smsd_without("flwr,scipy", "backends", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[1]: line for line in proc.stdout.splitlines()
            if line.startswith("extra ")}
    assert set(rows) == {"data", "dicom", "audit", "flower", "dali", "attestation", "dp"}
    sdk = importlib.util.find_spec("nv_attestation_sdk") is not None
    assert rows["attestation"].split()[2] == ("yes" if sdk else "no")
    assert rows["flower"].split()[2] == "no" and "missing: flwr" in rows["flower"]
    assert rows["audit"].split()[2] == "no" and "missing: scipy" in rows["audit"]
