"""Optional dependencies ("extras"): what each is for, whether it is installed here, and
one clear error naming the ``pip install`` line when a command needs a missing one.

Commands check what they need before any work starts (:func:`require`); ``smsd
backends`` lists every extra and its state (:func:`extra_statuses`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .errors import SmsdError

__all__ = ["EXTRAS", "ExtraStatus", "MissingExtraError", "available", "extra_statuses",
           "require"]

# extra → (modules it provides, what needs it)
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "data": (("PIL", "sklearn", "matplotlib", "skimage"),
             "image folders (Pillow), the bundled digits (scikit-learn), the simulate plot, "
             "the bundled textures (scikit-image)"),
    "dicom": (("pydicom",), "DICOM images"),
    "audit": (("scipy", "sklearn", "dp_accounting"),
              "smsd audit (assignment and graph matching, the prior's covariance, ε)"),
    "dp": (("dp_accounting",), "differentially private pre-training's accountant (ε)"),
    "flower": (("flwr",), "the Flower app and smsd simulate --engine flower"),
    "dali": (("nvidia.dali",), "NVIDIA DALI image pipelines (--loader dali)"),
    "attestation": (("nv_attestation_sdk",),
                    "--require-attestation (NVIDIA's attestation SDK)"),
}


class MissingExtraError(SmsdError, ImportError):
    """An optional dependency a command needs is not installed."""


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a bad name
        return False


def require(extra: str, *modules: str, purpose: str | None = None) -> None:
    """Raise :class:`MissingExtraError` unless ``modules`` (default: all of ``extra``'s)
    import; the message says what needs them and how to install them."""
    needed, default_purpose = EXTRAS[extra]
    missing = [m for m in (modules or needed) if not available(m)]
    if missing:
        raise MissingExtraError(
            f"{purpose or default_purpose} needs {', '.join(missing)}, which is not "
            f"installed: pip install 'smsd[{extra}]'")


@dataclass(frozen=True)
class ExtraStatus:
    name: str
    installed: bool
    detail: str


def extra_statuses() -> dict[str, ExtraStatus]:
    """Every extra: installed or not, and which of its modules are missing."""
    statuses = {}
    for name, (modules, purpose) in EXTRAS.items():
        missing = [m for m in modules if not available(m)]
        detail = purpose if not missing else f"{purpose}; missing: {', '.join(missing)}"
        statuses[name] = ExtraStatus(name, not missing, detail)
    return statuses
