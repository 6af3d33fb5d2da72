"""pytest-benchmark suite over every op's benchmark cases (the same cases as run.py).

    pytest benchmarks/ --benchmark-group-by=param:group          # CPU, full shapes
    SMSD_BENCH_DEVICE=cuda pytest benchmarks/                    # on a GPU
    SMSD_BENCH_SIZE=quick pytest benchmarks/                     # tiny shapes, a smoke run
"""

from __future__ import annotations

import os

import pytest
import torch

from smsd.bench import OPS, cases_for

DEVICE = torch.device(os.environ.get("SMSD_BENCH_DEVICE", "cpu"))
SIZE = os.environ.get("SMSD_BENCH_SIZE", "full")

if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("SMSD_BENCH_DEVICE=cuda but no CUDA device is visible", allow_module_level=True)


def _all_cases():
    for op in OPS:
        for case in cases_for(op, DEVICE, SIZE):
            name = f"{case.op}-{case.mode}-{case.shape}-{case.dtype}-{case.backend}"
            yield pytest.param(case, id=name.replace(" ", "_"))


@pytest.mark.parametrize("case", list(_all_cases()))
def test_case(benchmark, case):
    benchmark.group = f"{case.op} {case.mode} {case.shape} {case.dtype}"
    benchmark.extra_info.update(backend=case.backend, bytes_moved=case.bytes_moved,
                                reference=case.reference)
    if DEVICE.type == "cuda":
        def run():
            case.fn()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(case.fn)
