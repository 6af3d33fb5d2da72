"""`import smsd` is light; its subpackages load on first access, as `torch.nn` does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import smsd

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("flwr", "nvidia.dali", "matplotlib", "smsd.federation", "smsd.data", "smsd._C")


def test_import_is_light_and_subpackages_load_on_access(tmp_path):
    # A fresh interpreter: this one has imported everything the other tests need.
    code = (
        "import sys\n"
        "import smsd\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print(smsd.nn.DINOLoss.__name__, smsd.models.SplitViT.__name__,\n"
        "      smsd.protocol.Client.__name__)\n"
        "print('smsd.nn' in sys.modules, 'smsd.federation' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, check=True)
    assert proc.stdout.splitlines() == ["[]", "DINOLoss SplitViT Client", "True False"]


def test_lazy_names_are_listed_and_resolve_to_the_submodule():
    names = dir(smsd)
    for name in ("nn", "models", "protocol", "data", "testing", "bench", "backends"):
        assert name in names
    assert smsd.testing is sys.modules["smsd.testing"]


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="module 'smsd' has no attribute 'no_such_thing'"):
        smsd.no_such_thing  # noqa: B018
    assert not hasattr(smsd, "no_such_thing")
