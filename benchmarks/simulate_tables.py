"""The Markdown tables of an ``smsd simulate --seeds`` run, for the docs: mean ± std per
method, the per-seed raw rows, each client's fine-tuning pick, each client's label
coverage (:func:`smsd.experiments.scores.label_coverage`, from the run's split), each
client's SMSD − fine-tune only difference with the standard error its test split allows,
and the method's targets (:mod:`smsd.experiments.targets`).

    python benchmarks/simulate_tables.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from smsd.data import DataSplit
from smsd.experiments.scores import label_coverage
from smsd.experiments.targets import check_targets, load_seed_rows

# (column, key in summary.json)
COLUMNS = (("local acc", "mean_acc"), ("min local", "min_acc"), ("balanced", "mean_bal_acc"),
           ("min balanced", "min_bal_acc"), ("shared set", "shared_acc"),
           ("kNN", "probe_pooled_knn"), ("linear", "probe_pooled_linear"))


def tables(folder: Path) -> str:
    runs = load_seed_rows(folder)
    methods = [r["method"] for r in next(iter(runs.values()))]
    by = {seed: {r["method"]: r for r in rows} for seed, rows in runs.items()}
    lines = [f"### {folder.name} (seeds {', '.join(map(str, runs))})", "",
             "| method | " + " | ".join(c for c, _ in COLUMNS) + " | wall s / seed |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    summary = {r["method"]: r for r in json.loads((folder / "summary.json").read_text())[
        "results"]}
    for m in methods:
        r = summary[m]
        cells = [f"{r[k]:.2f} ± {r[k + '_std']:.2f}" if k in r else "-" for _, k in COLUMNS]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} |")
    lines += ["", "Per seed (local / balanced / shared / kNN; each client's local accuracy):",
              "", "| seed | method | local | balanced | shared | kNN | clients' local acc "
              "| picked per client |", "|---|---|---:|---:|---:|---:|---|---|"]
    for s in runs:
        for m in methods:
            r = by[s][m]
            picks = ", ".join(r.get("client_picked", [])) or "-"
            lines.append(f"| {s} | {m} | {r['mean_acc']:.2f} | {r.get('mean_bal_acc', '-')} | "
                         f"{r.get('shared_acc', '-')} | {r.get('knn_pooled', '-')} | "
                         f"{' / '.join(f'{a:.1f}' for a in r['client_acc'])} | {picks} |")
    lines += ["", "Label coverage (the share of a client's test classes it has a labeled image of: "
              "the balanced-accuracy ceiling of learning from its own labels alone):", "",
              "| seed | clients' label coverage | mean |", "|---|---|---:|"]
    splits = {s: split_facts(folder / f"seed-{s}" / "results.json") for s in runs}
    for s, (cover, _) in splits.items():
        lines.append(f"| {s} | {' / '.join(f'{100 * c:.1f}' for c in cover)} | "
                     f"{100 * sum(cover) / len(cover):.2f} |")
    clients = len(next(iter(splits.values()))[1])
    if all("SMSD" in by[s] and "fine-tune only" in by[s] for s in runs):
        lines += ["", "SMSD − fine-tune only in each client's local accuracy, points, ± one "
                  "standard error of that difference on the client's n test images "
                  "(unpaired, sqrt(p1(1-p1)/n + p2(1-p2)/n); two models scored on the same "
                  "images usually differ by less):", "",
                  "| seed | " + " | ".join(f"client {i}" for i in range(clients)) + " |",
                  "|---" * (clients + 1) + "|"]
        for s, (_, n_test) in splits.items():
            a, b = by[s]["SMSD"]["client_acc"], by[s]["fine-tune only"]["client_acc"]
            cells = [f"{x - y:+.1f} ± {100 * difference_se(x / 100, y / 100, n):.1f} (n={n})"
                     for x, y, n in zip(a, b, n_test, strict=True)]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "| target | SMSD | threshold | met | per seed |", "|---|---:|---:|---|---|"]
    for t in check_targets(runs):
        lines.append(f"| {t.name} | {t.value:.2f} | {t.threshold:.2f} | "
                     f"{'yes' if t.met else '**no**'} | {t.detail} |")
    return "\n".join(lines)


def split_facts(results_json: Path) -> tuple[list[float], list[int]]:
    """Each client's label coverage and number of test images, in the split a run's
    ``results.json`` records (rebuilt from its seeded config)."""
    config = json.loads(results_json.read_text())["config"]
    model = config["recipe"]["model"]
    data, _, _ = DataSplit(**config["split"]).load(img_size=model["img_size"],
                                                   in_chans=model["in_chans"],
                                                   loader=config["loader"])
    return ([label_coverage(d.labeled_labels, d.test_labels) for d in data],
            [d.test_labels.numel() for d in data])


def difference_se(p1: float, p2: float, n: int) -> float:
    """Standard error of the difference of two accuracies measured on ``n`` images each,
    as if independent (two models scored on the same images usually err together, so
    their paired difference varies less)."""
    return math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    for folder in parser.parse_args().folders:
        print(tables(folder))
        print()
        config = json.loads(next(folder.glob("seed-*/results.json")).read_text())["config"]
        print(f"config: {json.dumps(config)[:400]}")
        print()


if __name__ == "__main__":
    main()
