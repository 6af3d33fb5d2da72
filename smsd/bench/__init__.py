"""Benchmark runner: every backend of every op, with its baselines, in one run.

Each op contributes a module ``smsd/bench/<op>.py`` with ``cases(device, size)``
returning :class:`Case` objects. The runner times them (median of CUDA events or
``perf_counter``), measures peak memory on CUDA and a copy ceiling on the same
device in the same run, and prints one table: op, mode, shape, dtype, backend,
median ms, peak MiB, speedup against the case marked ``reference``, GB/s and % of
the copy ceiling (or TFLOP/s). ``benchmarks/run.py`` and ``smsd bench`` call it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["OPS", "Case", "cases_for", "usable_backends"]

# op name -> module under smsd.bench holding its cases
OPS = ("masked_sample", "dino_loss", "fused_linear_dino_loss", "attention")


@dataclass
class Case:
    op: str
    mode: str  # "fwd", "bwd", "fwd+bwd"
    shape: str
    dtype: torch.dtype
    backend: str  # a backend name or a baseline such as "torch.compile"
    fn: Callable[[], object]
    bytes_moved: int | None = None  # the op's minimum traffic, for GB/s
    # what this backend's design moves and its floors (kernels' ``traffic()``: total,
    # floor_ideal, floor_autograd, ratio_ideal, ratio_autograd, in bytes)
    traffic: dict | None = None
    flops: int | None = None  # for TFLOP/s
    reference: bool = False  # speedups of the group are measured against this row

    @property
    def group(self) -> tuple[str, str, str, str]:
        return (self.op, self.mode, self.shape, str(self.dtype))


def usable_backends(device: torch.device) -> list[str]:
    """The kernel backends that can run on ``device`` here (the reference is always added
    by the cases). Triton under the CPU interpreter is left out: its timings mean nothing."""
    from ..backend import backends

    wanted = ("triton",) if device.type == "cuda" else ("cpp",)
    report = backends()
    return [name for name in wanted if report[name].available]


def cases_for(op: str, device: torch.device, size: str) -> list[Case]:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    module = importlib.import_module(f"smsd.bench.{op}")
    return module.cases(device, size)
