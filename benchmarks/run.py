"""Benchmark every backend of every op against its baselines in one run and print a table.

    python benchmarks/run.py [--device cpu|cuda] [--ops NAME ...] [--size full|quick]

Rows are written as JSON under benchmarks/results/ (card, versions, date).
``smsd bench`` runs the same code.
"""

from __future__ import annotations

import sys

from smsd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
