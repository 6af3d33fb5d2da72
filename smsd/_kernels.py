"""Import the Triton kernels whether smsd is installed or run from the source tree.

Installed from a wheel, the top-level ``kernels/`` folder is the subpackage
``smsd.kernels`` (``package_dir`` in setup.py) and lies inside the package. Run
from a checkout (``PYTHONPATH=.`` or an editable install) there is no
``smsd/kernels`` folder, so the ``kernels/`` folder beside the package is
registered under that name. Kernels are imported lazily, on first use, so that
``TRITON_INTERPRET`` can still be set before they are defined.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PACKAGE = Path(__file__).resolve().parent


def _register_tree_kernels() -> None:
    tree = _PACKAGE.parent / "kernels"
    init = tree / "__init__.py"
    if not init.is_file():
        raise ModuleNotFoundError(
            f"smsd.kernels is missing: neither {_PACKAGE / 'kernels'} nor {tree} exists"
        )
    spec = importlib.util.spec_from_file_location(
        "smsd.kernels", init, submodule_search_locations=[str(tree)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["smsd.kernels"] = module
    spec.loader.exec_module(module)


def load(name: str) -> ModuleType:
    """Return the kernel module ``smsd.kernels.<name>``."""
    if "smsd.kernels" not in sys.modules and not (_PACKAGE / "kernels" / "__init__.py").is_file():
        _register_tree_kernels()
    return importlib.import_module(f"smsd.kernels.{name}")
