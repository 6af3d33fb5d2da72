"""End-to-end training-step benchmark: smsd's step against the plain PyTorch step.

    python benchmarks/train_step.py [--device cpu|cuda] [--preset vit_small ...] [--tiny]
                                    [--variants ...] [--steps N] [--json FILE]

``smsd bench --train-step`` runs the same code (:mod:`smsd.bench.train_step`).
"""

from __future__ import annotations

import sys

from smsd.bench.train_step import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
