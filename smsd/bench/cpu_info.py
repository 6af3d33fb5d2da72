"""What CPU a benchmark ran on and which instruction sets its kernels used.

CPU figures differ by model (an AMD EPYC with AVX2 only, a Xeon with AVX-512), and by
the paths torch, MKL and smsd's own kernels pick on it, so every CPU report carries
the model read from ``/proc/cpuinfo`` and those choices.
"""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path

import torch

from ..backend import backends

__all__ = ["NUMERIC_SWITCHES", "cpu_info", "cpu_summary"]

# Environment switches that change which kernels (and so which numerics) run.
NUMERIC_SWITCHES = ("SMSD_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
                    "OMP_NUM_THREADS", "OPENBLAS_CORETYPE")


def _proc_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str | None, set[str]]:
    try:
        text = path.read_text()
    except OSError:
        return None, set()
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def _widest_isa(flags: set[str]) -> str:
    if {"avx512f", "avx512dq", "avx512vl"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "baseline" if flags else "unknown"


def _smsd_row_loops() -> str:
    # Asks the backend probe first: it never loads an extension built for another torch.
    status = backends()["cpp"]
    if not status.available:
        return f"unavailable ({status.detail.splitlines()[0]})"
    try:
        return importlib.import_module("smsd._C").cpu_isa()
    except (ImportError, RuntimeError) as exc:
        return f"unavailable ({str(exc).splitlines()[0]})"


def cpu_info() -> dict:
    """The CPU model, its widest vector ISA and the ISA each kernel family runs with."""
    model, flags = _proc_cpuinfo()
    return {
        "model": model or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "cpu_isa": _widest_isa(flags),
        "torch_kernels": torch.backends.cpu.get_cpu_capability(),
        "smsd_row_loops": _smsd_row_loops(),
        "blas": "MKL" if torch.backends.mkl.is_available() else "non-MKL",
        "switches": {k: os.environ[k] for k in NUMERIC_SWITCHES if k in os.environ},
    }


def cpu_summary(info: dict | None = None) -> str:
    """One line: model, cores and ISAs, e.g. for a benchmark header."""
    info = info or cpu_info()
    switches = " ".join(f"{k}={v}" for k, v in info["switches"].items())
    return (f"{info['model']} ({info['cores']} cores), CPU ISA {info['cpu_isa']}; "
            f"torch kernels {info['torch_kernels']}, smsd row loops {info['smsd_row_loops']}, "
            f"BLAS {info['blas']}" + (f"; {switches}" if switches else ""))
