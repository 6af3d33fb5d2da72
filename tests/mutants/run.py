"""``make mutants``: plant each bug of :mod:`catalog` in a copy of the tree, run the tests
that must catch it, and print the kill table. Exits 1 unless every mutant is killed.

The copy (tracked and untracked files, plus the built ``smsd._C``) lives in a temporary
folder, so the working tree is never touched and other work can go on beside it; it is
imported through ``PYTHONPATH``. A mutant is killed when its tests fail (pytest exit 1);
a catalog entry that no longer applies, or selects no tests, is an error.

    python tests/mutants/run.py [--fast] [--only NAME ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from catalog import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parents[2]


def _tree_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    built = [str(p.relative_to(ROOT)) for p in (ROOT / "smsd").glob("_C*.so")]
    built += ["smsd/_build_info.py"] if (ROOT / "smsd" / "_build_info.py").exists() else []
    return sorted(set(listed + built))


def copy_tree(dest: Path) -> None:
    for name in _tree_files():
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_mutant(tree: Path, mutant: Mutant) -> dict:
    target = tree / mutant.path
    original = target.read_text()
    found = original.count(mutant.find)
    if found != 1:
        return {"name": mutant.name, "result": "ERROR",
                "detail": f"the snippet occurs {found} times in {mutant.path}"}
    target.write_text(original.replace(mutant.find, mutant.replace))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("SMSD_REQUIRE_FUZZ", None)  # a subset of the fuzz tests runs here
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                               "no:cacheprovider", *mutant.tests], cwd=tree, env=env,
                              capture_output=True, text=True, timeout=1200)
    finally:
        target.write_text(original)
    seconds = time.perf_counter() - started
    tail = [line for line in proc.stdout.splitlines() if line.strip()][-1:] or [""]
    result = {1: "killed", 0: "SURVIVED", 5: "ERROR"}.get(proc.returncode, "ERROR")
    detail = tail[0] if proc.returncode != 5 else "the tests selected nothing"
    if proc.returncode not in (0, 1, 5):
        detail = f"pytest exit {proc.returncode}: {tail[0]}"
    return {"name": mutant.name, "result": result, "seconds": round(seconds, 1),
            "detail": detail[:120]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="only the mutants CI runs")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these mutants")
    parser.add_argument("--json", default=None, help="also write the table as JSON")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if (not args.fast or m.fast)
              and (not args.only or m.name in args.only)]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown or not chosen:
        parser.error(f"no such mutants: {sorted(unknown)}" if unknown else "no mutant chosen")
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="smsd-mutants-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        print(f"{'mutant':<36}{'result':<10}{'s':>7}  invariant / detail", flush=True)
        for mutant in chosen:
            row = run_mutant(tree, mutant)
            rows.append(row)
            print(f"{row['name']:<36}{row['result']:<10}{row.get('seconds', 0):>7.1f}  "
                  f"{mutant.invariant}\n{'':<53}{row['detail']}", flush=True)
    killed = sum(r["result"] == "killed" for r in rows)
    total = time.perf_counter() - started
    print(f"\n{killed} of {len(rows)} mutants killed in {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "seconds": total}, indent=1))
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
