"""The planted-bug catalog (``make mutants``) still applies to this tree: every snippet
occurs exactly once and every test file it names exists (a stale entry would otherwise
be found only when the harness runs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "mutants"))
from catalog import MUTANTS  # noqa: E402


def test_names_are_unique_and_ci_runs_some():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))
    assert any(m.fast for m in MUTANTS) and not all(m.fast for m in MUTANTS)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_each_mutant_applies_once_and_names_real_tests(mutant):
    text = (ROOT / mutant.path).read_text()
    assert text.count(mutant.find) == 1, f"{mutant.name}: snippet not found once in {mutant.path}"
    assert mutant.find != mutant.replace
    files = [t.split("::")[0] for t in mutant.tests if t.startswith("tests/")]
    assert files and all((ROOT / f).is_file() for f in files), mutant.tests
