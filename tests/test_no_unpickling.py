"""No module of smsd or kernels can unpickle, found by reading their code (AST).

Fails when a module imports a pickle-based module (``pickle``, ``_pickle``, ``dill``,
``cloudpickle``, ``shelve``, ``marshal``, ``joblib``, ``torch.package``), names one in
``__import__``/``importlib.import_module``, or calls or refers to a loader that
unpickles: ``torch.load``/``torch.serialization.load`` without ``weights_only=True``
(and with it, outside ``ALLOWED``), ``numpy.load``/``numpy.lib.format.read_array`` with
``allow_pickle`` anything but ``False``, ``torch.jit.load``, ``torch.hub.load``,
``pandas.read_pickle``. Names are resolved through the module's imports
(``import torch as t``, ``from torch import serialization``). The run-time half is
``tests/test_fuzz_cli.py::test_cli_never_unpickles_files_from_other_sites``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("smsd", "kernels")
BANNED_MODULES = frozenset({"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve",
                            "marshal", "joblib", "torch.package"})
TORCH_LOADS = frozenset({"torch.load", "torch.serialization.load"})
NUMPY_LOADS = {"numpy.load": 2, "numpy.lib.format.read_array": 1}  # allow_pickle's position
ALWAYS_BANNED = frozenset({"torch.jit.load", "torch.hub.load", "pandas.read_pickle",
                           "joblib.load"})
# (file, function, call): the documented uses. load_pretrained also reads the user's own
# timm/DINO .pt/.pth download, never a file from another site (docs/security.md).
ALLOWED = {("smsd/models/pretrained.py", "_read_state_dict", "torch.load")}


def _banned_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in BANNED_MODULES)


class _Scan(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.aliases: dict[str, str] = {}
        self.functions: list[str] = ["<module>"]
        self.findings: list[str] = []
        self.allowed_uses: set[tuple[str, str, str]] = set()
        self.called: set[int] = set()

    def flag(self, node: ast.AST, problem: str) -> None:
        self.findings.append(f"{self.path}:{node.lineno} ({self.functions[-1]}): {problem}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _banned_module(alias.name):
                self.flag(node, f"imports {alias.name}")
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                top = alias.name.partition(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # smsd's own modules: scanned themselves
            return
        for alias in node.names:
            full = f"{node.module}.{alias.name}"
            if _banned_module(node.module or "") or _banned_module(full):
                self.flag(node, f"imports {full}")
            self.aliases[alias.asname or alias.name] = full

    def _function(self, node) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def resolve(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def visit_Call(self, node: ast.Call) -> None:
        name = self.resolve(node.func)
        self.called.add(id(node.func))
        keywords = {k.arg: k.value for k in node.keywords}
        spread = None in keywords  # f(**kwargs): nothing can be proven
        if name in ("__import__", "importlib.import_module") and node.args:
            target = node.args[0]
            if isinstance(target, ast.Constant) and _banned_module(str(target.value)):
                self.flag(node, f"imports {target.value} by name")
        elif name in TORCH_LOADS:
            safe = keywords.get("weights_only")
            if spread or not (isinstance(safe, ast.Constant) and safe.value is True):
                self.flag(node, f"calls {name} without weights_only=True")
            elif (self.path, self.functions[-1], "torch.load") in ALLOWED:
                self.allowed_uses.add((self.path, self.functions[-1], "torch.load"))
            else:
                self.flag(node, f"calls {name}(weights_only=True) outside ALLOWED")
        elif name in NUMPY_LOADS:
            flag = keywords.get("allow_pickle")
            positional = len(node.args) > NUMPY_LOADS[name]
            unsafe = flag is not None and not (isinstance(flag, ast.Constant)
                                               and flag.value is False)
            if spread or positional or unsafe or any(isinstance(a, ast.Starred)
                                                     for a in node.args):
                self.flag(node, f"calls {name} with allow_pickle not False")
        elif name in ALWAYS_BANNED:
            self.flag(node, f"calls {name}")
        self.generic_visit(node)

    def _reference(self, node: ast.AST) -> None:
        name = self.resolve(node)
        risky = TORCH_LOADS | set(NUMPY_LOADS) | ALWAYS_BANNED
        if id(node) not in self.called and name in risky:
            self.flag(node, f"refers to {name} (only a direct call can be checked)")
        self.generic_visit(node)

    visit_Name = visit_Attribute = _reference


def scan(source: str, path: str) -> tuple[list[str], set[tuple[str, str, str]]]:
    """``(findings, allowed uses)`` of one module's source."""
    visitor = _Scan(path)
    visitor.visit(ast.parse(source, path))
    return visitor.findings, visitor.allowed_uses


def test_no_module_can_unpickle():
    findings, used = [], set()
    modules = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    assert len(modules) > 50, modules  # both packages were found
    for path in modules:
        found, allowed = scan(path.read_text(), str(path.relative_to(ROOT)))
        findings += found
        used |= allowed
    assert not findings, "\n".join(findings)
    assert used == ALLOWED, f"ALLOWED lists uses that are gone: {sorted(ALLOWED - used)}"


BAD = {
    "import pickle": "imports pickle",
    "import _pickle as p": "imports _pickle",
    "from pickle import loads": "imports pickle.loads",
    "import dill.settings": "imports dill.settings",
    "from cloudpickle import load": "imports cloudpickle.load",
    "import shelve": "imports shelve",
    "import marshal": "imports marshal",
    "from torch import package": "imports torch.package",
    "__import__('pickle')": "imports pickle by name",
    "import importlib\nimportlib.import_module('_pickle')": "imports _pickle by name",
    "import torch\ntorch.load(f)": "torch.load without weights_only",
    "import torch\ntorch.load(f, weights_only=False)": "torch.load without weights_only",
    "import torch as t\nt.load(f, **kw)": "torch.load without weights_only",
    "import torch\ntorch.load(f, weights_only=True)": "outside ALLOWED",
    "from torch import load\nload(f)": "torch.load without weights_only",
    "from torch import serialization as s\ns.load(f)": "torch.serialization.load without",
    "import torch.serialization\ntorch.serialization.load(f)": "torch.serialization.load",
    "import numpy as np\nnp.load(f, allow_pickle=True)": "numpy.load with allow_pickle",
    "import numpy as np\nnp.load(f, None, True)": "numpy.load with allow_pickle",
    "import numpy as np\nnp.load(f, allow_pickle=flag)": "numpy.load with allow_pickle",
    "import numpy\nnumpy.lib.format.read_array(f, True)": "read_array with allow_pickle",
    "import torch\nloader = torch.load": "refers to torch.load",
    "import torch\ntorch.jit.load(f)": "calls torch.jit.load",
    "import pandas as pd\npd.read_pickle(f)": "calls pandas.read_pickle",
}
GOOD = ["import numpy as np\nnp.load(f)", "import numpy as np\nnp.load(f, allow_pickle=False)",
        "import torch\ntorch.save(x, f)", "from . import pickle_free",
        "import safetensors.torch\nsafetensors.torch.load_file(f)", "self.load(f)"]


@pytest.mark.parametrize("source", list(BAD))
def test_scan_finds(source):
    findings, _ = scan(source, "x.py")
    assert any(BAD[source] in f for f in findings), findings


@pytest.mark.parametrize("source", GOOD)
def test_scan_passes(source):
    assert scan(source, "x.py") == ([], set())


def test_allowed_use_is_recognised():
    source = "import torch\ndef _read_state_dict(p):\n    torch.load(p, weights_only=True)"
    path, function, call = next(iter(ALLOWED))
    assert scan(source, path) == ([], {(path, function, call)})
