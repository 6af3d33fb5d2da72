"""The package runs from the source tree (PYTHONPATH=.), as on the GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import smsd

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_load_from_the_tree_without_the_extension(tmp_path):
    """With only the tree on the path, smsd.kernels is the tree's kernels/ folder and the
    Triton path runs; a missing smsd._C is reported, not fatal."""
    code = (
        "import os, sys, torch\n"
        "sys.modules['smsd._C'] = None  # as if the extension were not built\n"
        "import smsd\n"
        "from smsd import _kernels\n"
        "module = _kernels.load('masked_sample')\n"
        "print(module.__file__)\n"
        "report = smsd.backends()\n"
        "print('cpp', report['cpp'].available, report['cpp'].detail)\n"
        "with smsd.use_backend('triton'):\n"
        "    x = torch.randn(2, 5, 3)\n"
        "    out = smsd.ops.masked_sample(x, torch.tensor([[4, 0], [1, 1]]))\n"
        "print(torch.equal(out, torch.stack([x[0, [4, 0]], x[1, [1, 1]]])))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0] == str(ROOT / "kernels" / "masked_sample.py")
    assert lines[1].startswith("cpp False") and "not built" in lines[1]
    assert lines[2] == "True"


def test_builds_are_named_for_the_torch_they_compile_against():
    """setup.py tags the version with the build's torch minor (wheels require it)."""
    proc = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True,
                          text=True, cwd=ROOT, check=True)
    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert proc.stdout.split()[-1] == f"{smsd.__version__}+torch{minor}"
