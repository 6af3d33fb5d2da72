"""Time benchmark cases and print/write the table (see :mod:`smsd.bench`)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..backend import BackendUnavailableError, backends
from ..io import atomic_write_bytes
from . import OPS, Case, cases_for
from .cpu_info import cpu_info, cpu_summary

__all__ = ["copy_ceiling_gbps", "environment", "measure_cases", "run", "time_ms"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, min_reps: int = 5,
            budget_s: float = 1.0, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on GPU), repeated within a time budget."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < deadline and len(times) < 200):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory above what was allocated before ``fn`` (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_ceiling_gbps(device: torch.device) -> float:
    """Bandwidth of a large device copy (bytes read + written), measured now."""
    n = (256 if device.type == "cuda" else 16) * 2**20
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def environment(device: torch.device) -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "backends": {name: s.detail for name, s in backends().items() if s.available},
    }
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = cpu_info()
        env["card"] = f"CPU {cpu_summary(env['cpu'])}"
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _measure(case: Case, device: torch.device, budget_s: float) -> dict:
    row = {
        "op": case.op, "mode": case.mode, "shape": case.shape,
        "dtype": str(case.dtype).removeprefix("torch."), "backend": case.backend,
    }
    try:
        row["median_ms"] = time_ms(case.fn, device, budget_s=budget_s)
        row["peak_mib"] = peak_mib(case.fn, device)
    except (BackendUnavailableError, RuntimeError) as exc:
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return row


def measure_cases(cases: Sequence[Case], device: torch.device, ceiling_gbps: float,
                  budget_s: float = 1.0) -> list[dict]:
    """Time ``cases`` and derive speedup (against the group's reference, measured in the
    same call), GB/s, % of the copy ceiling, TFLOP/s and the design's traffic."""
    measured = [(case, _measure(case, device, budget_s)) for case in cases]
    reference = {case.group: row.get("median_ms") for case, row in measured if case.reference}
    rows = []
    for case, row in measured:
        ms = row.get("median_ms")
        if ms:
            ref = reference.get(case.group)
            row["speedup_vs_reference"] = round(ref / ms, 3) if ref else None
            if case.bytes_moved:
                row["GBps"] = round(case.bytes_moved / (ms * 1e-3) / 1e9, 1)
                row["pct_copy_ceiling"] = round(100 * row["GBps"] / ceiling_gbps, 1)
            if case.flops:
                row["TFLOPs"] = round(case.flops / (ms * 1e-3) / 1e12, 2)
        if case.traffic:
            row["traffic_MB"] = round(case.traffic["total"] / 1e6, 1)
            row["traffic_vs_autograd_floor"] = round(case.traffic["ratio_autograd"], 3)
            row["traffic_vs_ideal_floor"] = round(case.traffic["ratio_ideal"], 3)
        rows.append(row)
    return rows


def run(
    device: str | torch.device = "cpu",
    ops: Sequence[str] | None = None,
    *,
    size: str = "full",
    budget_s: float = 1.0,
    out_dir: str | os.PathLike | None = "benchmarks/results",
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the benchmark cases of ``ops`` (default all) on ``device``; return the report."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("--device cuda was asked for but no CUDA device is visible")
    env = environment(device)
    ceiling = copy_ceiling_gbps(device)
    env["copy_ceiling_GBps"] = round(ceiling, 1)
    echo(f"# {env['card']}, torch {env['torch']}, copy ceiling {ceiling:.1f} GB/s, {env['date']}")
    echo(HEADER)
    rows: list[dict] = []
    for op in ops or OPS:
        for row in measure_cases(cases_for(op, device, size), device, ceiling, budget_s):
            rows.append(row)
            echo(format_row(row))
    report = {"environment": env, "rows": rows}
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = folder / f"{stamp}-{device.type}.json"
        atomic_write_bytes(path, json.dumps(report, indent=1).encode())
        report["path"] = str(path)
        echo(f"# wrote {path}")
    return report


HEADER = (
    f"{'op':<24}{'mode':<9}{'shape':<28}{'dtype':<9}{'backend':<22}"
    f"{'median ms':>10}{'peak MiB':>10}{'speedup':>9}{'GB/s':>9}{'%copy':>7}{'TFLOP/s':>9}"
)


def format_row(row: dict) -> str:
    if "error" in row:
        return (f"{row['op']:<24}{row['mode']:<9}{row['shape']:<28}{row['dtype']:<9}"
                f"{row['backend']:<22}  {row['error']}")

    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return format(value, fmt) if value is not None else "-"

    return (
        f"{row['op']:<24}{row['mode']:<9}{row['shape']:<28}{row['dtype']:<9}{row['backend']:<22}"
        f"{num('median_ms', '.3f'):>10}{num('peak_mib', '.1f'):>10}"
        f"{num('speedup_vs_reference', '.2f'):>9}{num('GBps', '.1f'):>9}"
        f"{num('pct_copy_ceiling', '.0f'):>7}{num('TFLOPs', '.2f'):>9}{_traffic(row)}"
    )


def _traffic(row: dict) -> str:
    """What the kernels move against autograd's floor and the ideal one (see the op's
    ``traffic()``), where the case states it."""
    if "traffic_MB" not in row:
        return ""
    return (f"  moves {row['traffic_MB']:,.0f} MB = {row['traffic_vs_autograd_floor']:.2f}x "
            f"autograd's floor, {row['traffic_vs_ideal_floor']:.2f}x the ideal")
