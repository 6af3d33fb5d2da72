"""Backend selection: which implementation of an op runs.

Every op in :mod:`smsd.ops` has a ``torch`` implementation (the pure-PyTorch
reference), a ``cpp`` one (the ``smsd._C`` extension, CPU tensors) and a
``triton`` one (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
Some ops have more (``xformers`` for attention).

The requested backend comes from, in order: :func:`use_backend` (a context
manager), :func:`set_backend`, the environment variable ``SMSD_BACKEND``, and
``"auto"``. ``auto`` picks ``triton`` for CUDA tensors, ``cpp`` for CPU tensors
when the extension is built, else ``torch``. A backend that is requested by name
but cannot run raises :class:`BackendUnavailableError` saying why; it is never
replaced silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "AUTO",
    "CORE_BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "backends",
    "get_backend",
    "register_backend",
    "select_backend",
    "set_backend",
    "use_backend",
]

log = logging.getLogger("smsd")

AUTO = "auto"
CORE_BACKENDS = ("triton", "cpp", "torch")


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run here (the message says why)."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    detail: str  # version and device when available, the reason when not


def triton_interpret_mode() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> BackendStatus:
    try:
        import triton
    except ImportError as exc:
        return BackendStatus("triton", False, f"triton is not installed ({exc})")
    if torch.cuda.is_available():
        return BackendStatus(
            "triton", True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
        )
    if triton_interpret_mode():
        return BackendStatus(
            "triton", True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU"
        )
    return BackendStatus(
        "triton",
        False,
        f"triton {triton.__version__} is installed but no CUDA device is visible "
        "(set TRITON_INTERPRET=1 before importing smsd kernels to run them on CPU tensors)",
    )


def _built_for_torch() -> str | None:
    """The torch ``smsd._C`` was compiled against, from the build info that setup.py
    writes (read without loading the extension); None in a tree never built."""
    try:
        return importlib.import_module("smsd._build_info").TORCH_VERSION
    except (ImportError, AttributeError):
        return None


def _extension_present() -> bool:
    """Whether an ``smsd._C`` file is there, found without loading it."""
    try:
        return importlib.util.find_spec("smsd._C") is not None
    except (ImportError, ValueError):
        return False


def _torch_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _cpp_status() -> BackendStatus:
    built, running = _built_for_torch(), str(torch.__version__)
    mismatched = BackendStatus(
        "cpp",
        False,
        f"built for torch {built}, running {running}: rebuild "
        f"(pip install -e . --no-build-isolation, or a wheel built for torch {running})",
    )
    present = built is not None and _extension_present()
    if present and _torch_minor(built) != _torch_minor(running):
        # Not even loaded: torch keeps no C++ ABI across minors, so an extension built
        # for another one may load and then fail or crash at its first call.
        return mismatched
    try:
        ext = importlib.import_module("smsd._C")
    except ImportError as exc:
        if present and built != running:
            return mismatched
        return BackendStatus(
            "cpp",
            False,
            "the C++ extension smsd._C is not built "
            f"(pip install -e . --no-build-isolation): {exc}",
        )
    try:
        isa = ext.cpu_isa()
    except RuntimeError as exc:  # an SMSD_CPU_ISA value it does not know
        return BackendStatus("cpp", False, str(exc).splitlines()[0])
    return BackendStatus("cpp", True, f"smsd._C, {ext.num_threads()} threads, {isa} row loops")


def _torch_status() -> BackendStatus:
    return BackendStatus("torch", True, f"PyTorch {torch.__version__} reference")


_STATUS_PROBES: dict[str, Callable[[], BackendStatus]] = {
    "triton": _triton_status,
    "cpp": _cpp_status,
    "torch": _torch_status,
}


def register_backend(name: str, probe: Callable[[], BackendStatus]) -> None:
    """Add an op-specific backend (such as ``xformers``) to :func:`backends`."""
    _STATUS_PROBES[name] = probe
    _status.cache_clear()


@functools.cache
def _status(name: str) -> BackendStatus:
    return _STATUS_PROBES[name]()


class BackendReport(dict):
    """``{name: BackendStatus}`` of the ops' backends; prints as a table. (The image
    loaders report themselves: :func:`smsd.data.loader_statuses`.)"""

    def __str__(self) -> str:
        width = max(len(n) for n in self)
        lines = [f"{'backend':<{width}}  available  detail"]
        for status in self.values():
            mark = "yes" if status.available else "no"
            lines.append(f"{status.name:<{width}}  {mark:<9}  {status.detail}")
        lines.append(f"requested: {get_backend()}")
        return "\n".join(lines)


def backends() -> BackendReport:
    """Which backends can run on this machine and, for each missing one, why."""
    _status.cache_clear()
    return BackendReport((name, _status(name)) for name in _STATUS_PROBES)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in (AUTO, *_STATUS_PROBES):
        known = ", ".join((AUTO, *_STATUS_PROBES))
        raise ValueError(f"unknown backend {name!r}; expected one of: {known}")
    return name


def _env_backend() -> str:
    name = os.environ.get("SMSD_BACKEND", AUTO).strip().lower() or AUTO
    try:
        return _check_name(name)
    except ValueError as exc:
        raise ValueError(f"environment variable SMSD_BACKEND: {exc}") from None


_global_backend: str | None = None
_scoped_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "smsd_backend", default=None
)


def set_backend(name: str | None) -> None:
    """Request a backend for all ops from now on; ``None`` goes back to ``SMSD_BACKEND``
    (or ``"auto"`` when that is unset)."""
    global _global_backend
    _global_backend = None if name is None else _check_name(name)


def get_backend() -> str:
    """The backend requested right now (``"auto"`` unless overridden)."""
    return _scoped_backend.get() or _global_backend or _env_backend()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Request a backend inside a ``with`` block (thread- and task-local)."""
    token = _scoped_backend.set(_check_name(name))
    try:
        yield
    finally:
        _scoped_backend.reset(token)


@functools.cache
def _log_once(level: int, message: str) -> None:
    log.log(level, message)


def _require(op: str, name: str, device: torch.device, supported: tuple[str, ...]) -> str:
    if name not in supported:
        raise BackendUnavailableError(
            f"{op}: backend {name!r} does not implement this op (it has: {', '.join(supported)})"
        )
    status = _status(name)
    if not status.available:
        raise BackendUnavailableError(f"{op}: backend {name!r} is unavailable: {status.detail}")
    if name == "cpp" and device.type != "cpu":
        raise BackendUnavailableError(
            f"{op}: backend 'cpp' runs on CPU tensors only, got tensors on {device}"
        )
    if name == "triton" and device.type != "cuda" and not triton_interpret_mode():
        raise BackendUnavailableError(
            f"{op}: backend 'triton' needs CUDA tensors, got tensors on {device} "
            "(set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
        )
    return name


def select_backend(
    op: str, device: torch.device, supported: tuple[str, ...] = CORE_BACKENDS
) -> str:
    """Resolve the requested backend for ``op`` on tensors living on ``device``."""
    requested = get_backend()
    if requested != AUTO:
        return _require(op, requested, device, supported)
    preferred = "triton" if device.type == "cuda" else "cpp"
    if preferred in supported and _status(preferred).available:
        return preferred
    if preferred in supported:
        # Documented behaviour of "auto", but a slow path worth one log line.
        _log_once(
            logging.WARNING if device.type == "cuda" else logging.INFO,
            f"smsd: backend 'auto' uses 'torch' for {op} on {device.type}: "
            f"{preferred} is unavailable ({_status(preferred).detail})",
        )
    return "torch"
