"""The method's targets over seeds: is SMSD ahead of the baselines, and is no client worse off?

Checked from the rows of ``results.json`` (:meth:`MethodResult.row`, in %), one list per seed:

- SMSD's mean client balanced accuracy and mean local accuracy (means over seeds) are at
  least FedAvg's, and at least fine-tune only's + 3 points;
- on every seed, every client's local accuracy with SMSD is at least its fine-tune-only
  accuracy − 1 point (taking part never costs a client more than noise);
- the pooled k-NN accuracy of SMSD's body (mean over seeds) is at least that of the random
  body fine-tune only starts from + 10 points (pre-training learned something).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..io import atomic_write_bytes

__all__ = ["Target", "check_targets", "format_targets", "has_target_rows", "load_seed_rows",
           "targets_of_runs", "write_targets"]

SMSD, FINETUNE_ONLY, FEDAVG = "SMSD", "fine-tune only", "FedAvg"


@dataclass(frozen=True)
class Target:
    """One target: SMSD's ``value`` against ``threshold`` (both in %; met when
    ``value >= threshold``), with ``detail`` in words (per-seed figures)."""

    name: str
    value: float
    threshold: float
    detail: str

    @property
    def met(self) -> bool:
        return self.value >= self.threshold - 1e-9

    def to_dict(self) -> dict:
        return asdict(self) | {"met": self.met}


def load_seed_rows(folder: str | Path) -> dict[int, list[dict]]:
    """The rows of every ``folder/seed-N/results.json`` of an ``smsd simulate --seeds`` run."""
    runs = {}
    for path in sorted(Path(folder).glob("seed-*/results.json")):
        runs[int(path.parent.name.removeprefix("seed-"))] = json.loads(
            path.read_text())["results"]
    if not runs:
        raise FileNotFoundError(f"{folder}: no seed-N/results.json (an smsd simulate --seeds "
                                "output folder)")
    return dict(sorted(runs.items()))


def _row(rows: Sequence[dict], method: str, seed: int) -> dict:
    for row in rows:
        if row["method"] == method:
            return row
    raise ValueError(f"seed {seed}: no {method!r} row (the targets need the SMSD, "
                     "fine-tune only and FedAvg rows)")


def _mean_over_seeds(runs: Mapping[int, Sequence[dict]], method: str, key: str) -> float:
    values = []
    for seed, rows in runs.items():
        row = _row(rows, method, seed)
        if key not in row:
            raise ValueError(f"seed {seed}: the {method} row has no {key!r} (rerun smsd "
                             "simulate: rows from before balanced accuracy and the probes)")
        values.append(row[key])
    return statistics.fmean(values)


def _per_seed(runs: Mapping[int, Sequence[dict]], method: str, key: str) -> str:
    return ", ".join(f"seed {s} {_row(rows, method, s)[key]:.2f}" for s, rows in runs.items())


_KEYS = ("mean_acc", "mean_bal_acc", "client_acc", "knn_pooled")


def has_target_rows(runs: Mapping[int, Sequence[dict]]) -> bool:
    """Whether every seed has the rows the targets compare (SMSD, fine-tune only, FedAvg)
    with the scores they need (not so for a ``--engine flower`` SMSD row: no balanced
    accuracy or probes)."""
    needed = {SMSD, FINETUNE_ONLY, FEDAVG}
    return bool(runs) and all(
        needed <= {r["method"] for r in rows}
        and all(k in r for r in rows if r["method"] in needed for k in _KEYS)
        for rows in runs.values())


def check_targets(runs: Mapping[int, Sequence[dict]]) -> list[Target]:
    """Every target on ``runs`` (seed -> that seed's rows)."""
    if not runs:
        raise ValueError("runs is empty: the targets need at least one seed")
    targets = []
    for key, label in (("mean_bal_acc", "mean client balanced accuracy"),
                       ("mean_acc", "mean client local accuracy")):
        smsd = _mean_over_seeds(runs, SMSD, key)
        for method, margin in ((FEDAVG, 0.0), (FINETUNE_ONLY, 3.0)):
            base = _mean_over_seeds(runs, method, key)
            name = f"{label}: SMSD >= {method}" + (f" + {margin:g}" if margin else "")
            targets.append(Target(name, smsd, base + margin,
                                  f"SMSD {_per_seed(runs, SMSD, key)}; "
                                  f"{method} {_per_seed(runs, method, key)}"))
    gaps = []
    for seed, rows in runs.items():
        ours, theirs = _row(rows, SMSD, seed)["client_acc"], _row(rows, FINETUNE_ONLY,
                                                                  seed)["client_acc"]
        gaps += [(a - b, seed, i) for i, (a, b) in enumerate(zip(ours, theirs, strict=True))]
    worst, seed, client = min(gaps)
    targets.append(Target("every seed and client: SMSD local accuracy >= fine-tune only - 1",
                          worst, -1.0, f"worst SMSD - fine-tune only: {worst:+.2f} (seed "
                          f"{seed}, client {client}); per seed: " + ", ".join(
                              f"seed {s} {min(g for g, gs, _ in gaps if gs == s):+.2f}"
                              for s in runs)))
    smsd_knn = _mean_over_seeds(runs, SMSD, "knn_pooled")
    random_knn = _mean_over_seeds(runs, FINETUNE_ONLY, "knn_pooled")
    targets.append(Target("k-NN of SMSD's body >= the random body's + 10", smsd_knn,
                          random_knn + 10.0, f"SMSD {_per_seed(runs, SMSD, 'knn_pooled')}; "
                          f"random {_per_seed(runs, FINETUNE_ONLY, 'knn_pooled')}"))
    return targets


def targets_of_runs(runs: Mapping[int, Sequence]) -> list[Target] | None:
    """The targets of ``simulate_seeds``' results (seed -> its ``MethodResult`` rows), or
    ``None`` when a row they compare is missing (e.g. ``--methods smsd``, Flower)."""
    rows = {seed: [r.row() for r in results] for seed, results in runs.items()}
    return check_targets(rows) if has_target_rows(rows) else None


def format_targets(targets: Sequence[Target]) -> str:
    """One line per target (met / NOT met, value vs threshold) and its per-seed detail."""
    lines = [f"targets over seeds: {sum(t.met for t in targets)} of {len(targets)} met"]
    for t in targets:
        lines.append(f"  [{'met' if t.met else 'NOT met'}] {t.name}: {t.value:.2f} vs "
                     f"{t.threshold:.2f}")
        lines.append(f"      {t.detail}")
    return "\n".join(lines)


def write_targets(targets: Sequence[Target], path: Path) -> None:
    """``targets.json``: every target with its value, threshold, ``met`` and detail."""
    atomic_write_bytes(path, (json.dumps({"targets": [t.to_dict() for t in targets],
                                          "all_met": all(t.met for t in targets)},
                                         indent=2) + "\n").encode())
