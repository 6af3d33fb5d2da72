"""``smsd check``: validate every op and backend on this machine against the reference.

Each op contributes ``smsd/selfcheck/<op>.py`` with ``checks(backend, device)``
returning :class:`Result` rows (random inputs, odd sizes, every dtype claimed).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backend import BackendUnavailableError, backends, triton_interpret_mode

__all__ = ["OPS", "Result", "run_checks"]

OPS = ("masked_sample", "sample_views", "crypto", "dino_loss", "attention")


@dataclass
class Result:
    op: str
    backend: str
    device: str
    dtype: str
    case: str
    passed: bool
    detail: str


def _runnable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device`` here, else why not."""
    status = backends()[backend]
    if not status.available:
        return status.detail
    if backend == "cpp" and device.type != "cpu":
        return "cpp runs on CPU tensors only"
    if backend == "triton" and device.type == "cpu" and not triton_interpret_mode():
        return "needs CUDA (or TRITON_INTERPRET=1)"
    return None


def run_checks(
    devices: list[torch.device],
    ops: tuple[str, ...] = OPS,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    results: list[Result] = []

    def emit(result: Result) -> None:
        results.append(result)
        if on_result:
            on_result(result)

    for op in ops:
        module = importlib.import_module(f"smsd.selfcheck.{op}")
        for device in devices:
            for backend in getattr(module, "BACKENDS", ("triton", "cpp", "torch")):
                why_not = _runnable(backend, device)
                if why_not:
                    emit(Result(op, backend, device.type, "-", "-", True, f"skipped: {why_not}"))
                    continue
                try:
                    for result in module.checks(backend, device):
                        emit(result)
                except (BackendUnavailableError, RuntimeError, ValueError, TypeError) as exc:
                    emit(Result(op, backend, device.type, "-", "-", False,
                                f"{type(exc).__name__}: {exc}".splitlines()[0]))
    return results
