"""Results of ``smsd simulate``: one row per method, tables, and the JSON/CSV/PNG files."""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from ..extras import available
from ..io import atomic_write_bytes, write_with

__all__ = ["MethodResult", "format_summary", "format_table", "summary_rows", "write_results",
           "write_summary"]

log = logging.getLogger("smsd")


@dataclass
class MethodResult:
    method: str
    accuracies: list[float]  # per client, on its own test split
    rounds: int
    bytes_up: int  # per client (mean over clients)
    bytes_down: int
    seconds: float
    # SMSD only: the returned body's DP guarantee (None: not private) and the
    # membership-inference attack on it (smsd.audit.membership)
    dp_epsilon: float | None = None
    membership: dict | None = None
    # per client: balanced accuracy on its own test split, accuracy on the shared
    # class-balanced test set (smsd.experiments.scores); None where not measured (Flower)
    balanced: list[float] | None = None
    shared: list[float] | None = None
    # k-NN / linear probes of the row's body (smsd.protocol.probes.ProbeScores.to_dict, in
    # %): SMSD's returned body, the random init fine-tune only starts from, FedAvg's and
    # centralized's trained bodies
    probe: dict | None = None
    # SMSD only: per pre-training epoch the mean loss and the teacher body's k-NN accuracy
    history: list[dict] | None = None
    # per client: the fine-tuning setting it picked on its held-out labels and every
    # candidate's validation scores (smsd.protocol.recipe_selection.Selection.to_dict)
    selection: list[dict] | None = None

    @classmethod
    def scored(cls, method: str, scores: list, rounds: int, bytes_up: int, bytes_down: int,
               **extra) -> MethodResult:
        """A row from per-client :class:`~smsd.experiments.scores.ClientScore` s."""
        return cls(method, [s.local for s in scores], rounds, bytes_up, bytes_down, 0.0,
                   balanced=[s.balanced for s in scores], shared=[s.shared for s in scores],
                   **extra)

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def min_accuracy(self) -> float:
        return min(self.accuracies)

    @property
    def mean_balanced(self) -> float | None:
        return None if self.balanced is None else sum(self.balanced) / len(self.balanced)

    @property
    def min_balanced(self) -> float | None:
        return None if self.balanced is None else min(self.balanced)

    @property
    def mean_shared(self) -> float | None:
        return None if self.shared is None else sum(self.shared) / len(self.shared)

    def row(self) -> dict:
        return {"method": self.method, "mean_acc": round(100 * self.mean_accuracy, 2),
                "min_acc": round(100 * self.min_accuracy, 2), "rounds": self.rounds,
                "bytes_up_per_client": self.bytes_up, "bytes_down_per_client": self.bytes_down,
                "wall_s": round(self.seconds, 2),
                "client_acc": [round(100 * a, 2) for a in self.accuracies],
                **({} if self.balanced is None else {
                    "mean_bal_acc": round(100 * self.mean_balanced, 2),
                    "min_bal_acc": round(100 * self.min_balanced, 2),
                    "shared_acc": round(100 * self.mean_shared, 2),
                    "client_bal_acc": [round(100 * a, 2) for a in self.balanced],
                    "client_shared_acc": [round(100 * a, 2) for a in self.shared]}),
                **({} if self.probe is None else {
                    "knn_pooled": self.probe["pooled_knn"],
                    "linear_pooled": self.probe["pooled_linear"],
                    "knn_client_mean": self.probe["mean_knn"],
                    "linear_client_mean": self.probe["mean_linear"], "probe": self.probe}),
                **({} if self.history is None else {"pretrain_history": self.history}),
                **({} if self.selection is None else {
                    "picked": picked_counts(self.selection),
                    "client_picked": [s["picked"] for s in self.selection],
                    "selection": self.selection}),
                **({} if self.dp_epsilon is None else {"dp_epsilon": self.dp_epsilon}),
                **({} if self.membership is None else
                   {"membership_auc": round(self.membership["auc"], 4),
                    "membership": self.membership})}


def picked_counts(selection: list[dict]) -> str:
    """``"body lr x0.3 x3; linear probe x1"``: how many clients picked each setting."""
    counts: dict[str, int] = {}
    for s in selection:
        counts[s["picked"]] = counts.get(s["picked"], 0) + 1
    return "; ".join(f"{name} x{n}" for name, n in counts.items())


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_row(r: MethodResult) -> str:
    return (f"{r.method:<16}{100 * r.mean_accuracy:>9.2f}{100 * r.min_accuracy:>9.2f}"
            f"{_pct(r.mean_balanced):>9}{_pct(r.min_balanced):>9}{_pct(r.mean_shared):>9}"
            f"{_probe(r, 'pooled_knn'):>7}{_probe(r, 'pooled_linear'):>8}"
            f"{r.rounds:>8}{_human(r.bytes_up):>12}{_human(r.bytes_down):>12}{r.seconds:>9.1f}")


def _probe(r: MethodResult, key: str) -> str:
    return "-" if r.probe is None else f"{r.probe[key]:.1f}"


HEADER = (f"{'method':<16}{'mean acc':>9}{'min acc':>9}{'mean bal':>9}{'min bal':>9}"
          f"{'shared':>9}{'kNN':>7}{'linear':>8}{'rounds':>8}{'up/client':>12}"
          f"{'down/client':>12}{'wall s':>9}")
LEGEND = ("acc: on each client's own test split; bal: balanced accuracy there (mean recall "
          "over its classes); shared: accuracy on one class-balanced test set of all "
          "clients;\nkNN / linear: probes of the row's body (frozen CLS features, all labeled "
          "images -> the shared set; fine-tune only: the random init it starts from)")


def format_table(results: list[MethodResult]) -> str:
    head = HEADER
    lines = [head, *(format_row(r) for r in results), LEGEND]
    for r in results:
        if r.dp_epsilon is not None:
            lines.append(f"{r.method}: differential privacy ε = {r.dp_epsilon:.3g} per image")
        if r.selection is not None:
            lines.append(f"{r.method}: fine-tuning picked on held-out labels: "
                         f"{picked_counts(r.selection)}")
        if r.membership is not None:
            lines.append(f"{r.method}: membership-inference AUC {r.membership['auc']:.3f} "
                         f"(95 % CI {r.membership['auc_ci95'][0]:.3f}–"
                         f"{r.membership['auc_ci95'][1]:.3f}; 0.5 = chance)")
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _csv(rows: list[dict], fields: list[str]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def write_results(results: list[MethodResult], config: object, out: Path) -> list[Path]:
    """``results.json`` and ``results.csv`` (always), then ``results.png`` when matplotlib
    (the ``data`` extra) is installed; without it the plot is skipped with one warning,
    after the numbers are safe. Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in results]
    payload = {"config": json.loads(json.dumps(asdict(config), default=str)), "results": rows}
    atomic_write_bytes(out / "results.json", (json.dumps(payload, indent=2) + "\n").encode())
    fields = list(dict.fromkeys(k for row in rows for k in row
                                if not k.startswith("client_")
                                and k not in ("probe", "pretrain_history", "selection")))
    atomic_write_bytes(out / "results.csv", _csv(rows, fields))
    written = [out / "results.json", out / "results.csv"]
    history = next((r.history for r in results if r.history), None)
    if history is not None:
        atomic_write_bytes(out / "metrics.jsonl",
                           "".join(json.dumps(line) + "\n" for line in history).encode())
        written.append(out / "metrics.jsonl")
    if not available("matplotlib"):
        log.warning("results.png skipped: matplotlib is not installed "
                    "(pip install 'smsd[data]')")
        return written
    _plot(results, out / "results.png")
    written.append(out / "results.png")
    if history is not None:
        _plot_history(history, out / "pretrain.png")
        written.append(out / "pretrain.png")
    return written


def _plot_history(history: list[dict], path: Path) -> None:
    """The pre-training loss and the teacher's k-NN accuracy per epoch (two y axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, loss_ax = plt.subplots(figsize=(6, 3.2))
    loss_ax.plot(epochs, [h["loss"] for h in history], color="tab:blue", marker=".")
    loss_ax.set_xlabel("pre-training epoch")
    loss_ax.set_ylabel("DINO loss", color="tab:blue")
    if all("knn" in h for h in history):
        knn_ax = loss_ax.twinx()
        knn_ax.plot(epochs, [h["knn"] for h in history], color="tab:orange", marker=".")
        knn_ax.set_ylabel("teacher k-NN acc. (%)", color="tab:orange")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _plot(results: list[MethodResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    names = [r.method for r in results]
    xs = range(len(results))
    series = (("mean", [r.mean_accuracy for r in results]),
              ("min", [r.min_accuracy for r in results]),
              ("mean balanced", [r.mean_balanced for r in results]),
              ("shared balanced set", [r.mean_shared for r in results]))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        bars = ax.bar([x + offset for x in xs], [0 if v is None else 100 * v for v in values],
                      width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("client test accuracy (%)")
    ax.set_ylim(0, 105)
    # Outside the axes: inside, it covers the first method's bars.
    ax.legend(title="client acc.", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def summary_rows(runs: dict[int, list[MethodResult]]) -> list[dict]:
    """Per method: mean and sample std over seeds of the mean and min client accuracy."""
    first = next(iter(runs.values()))
    rows = []
    for i, method in enumerate(r.method for r in first):
        per_seed = [results[i] for results in runs.values()]
        means = [100 * r.mean_accuracy for r in per_seed]
        mins = [100 * r.min_accuracy for r in per_seed]
        std = statistics.stdev if len(per_seed) > 1 else (lambda _: 0.0)
        rows.append({"method": method, "seeds": len(per_seed),
                     "mean_acc": round(statistics.fmean(means), 2),
                     "mean_acc_std": round(std(means), 2),
                     "min_acc": round(statistics.fmean(mins), 2),
                     "min_acc_std": round(std(mins), 2),
                     "rounds": per_seed[0].rounds,
                     "bytes_up_per_client": round(statistics.fmean(r.bytes_up for r in per_seed)),
                     "bytes_down_per_client": round(
                         statistics.fmean(r.bytes_down for r in per_seed)),
                     "wall_s": round(statistics.fmean(r.seconds for r in per_seed), 2),
                     "per_seed_mean_acc": [round(m, 2) for m in means]})
        if all(r.probe is not None for r in per_seed):
            for key in ("pooled_knn", "pooled_linear", "mean_knn", "mean_linear"):
                values = [r.probe[key] for r in per_seed]
                rows[-1] |= {f"probe_{key}": round(statistics.fmean(values), 2),
                             f"probe_{key}_std": round(std(values), 2)}
        if all(r.balanced is not None for r in per_seed):
            for key, values in (("mean_bal_acc", [r.mean_balanced for r in per_seed]),
                                ("min_bal_acc", [r.min_balanced for r in per_seed]),
                                ("shared_acc", [r.mean_shared for r in per_seed])):
                values = [100 * v for v in values]
                rows[-1] |= {key: round(statistics.fmean(values), 2),
                             f"{key}_std": round(std(values), 2),
                             f"per_seed_{key}": [round(v, 2) for v in values]}
        if all(r.dp_epsilon is not None for r in per_seed):
            rows[-1]["dp_epsilon"] = max(r.dp_epsilon for r in per_seed)
        if all(r.membership is not None for r in per_seed):
            aucs = [r.membership["auc"] for r in per_seed]
            rows[-1] |= {"membership_auc": round(statistics.fmean(aucs), 4),
                         "membership_auc_std": round(std(aucs), 4),
                         "per_seed_membership_auc": [round(a, 4) for a in aucs]}
    return rows


def write_summary(runs: dict[int, list[MethodResult]], out: Path) -> None:
    """``summary.json`` and ``summary.csv``: mean ± std over seeds; ``summary.png`` (bars
    with the std as error bars) when matplotlib is installed."""
    rows = summary_rows(runs)
    atomic_write_bytes(out / "summary.json", (json.dumps(
        {"seeds": list(runs), "results": rows}, indent=2) + "\n").encode())
    atomic_write_bytes(out / "summary.csv",
                       _csv(rows, list(dict.fromkeys(k for row in rows for k in row))))
    if available("matplotlib"):
        _plot_summary(rows, list(runs), out / "summary.png")


def _plot_summary(rows: list[dict], seeds: list[int], path: Path) -> None:
    """Mean client local and balanced accuracy and the body's pooled k-NN per method,
    mean over seeds with the std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = (("mean client acc.", "mean_acc"), ("mean balanced acc.", "mean_bal_acc"),
              ("shared balanced set", "shared_acc"), ("body kNN", "probe_pooled_knn"))
    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    xs = range(len(rows))
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        bars = ax.bar([x + offset for x in xs], [r.get(key, 0.0) for r in rows], width,
                      yerr=[r.get(f"{key}_std", 0.0) for r in rows], capsize=2, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(list(xs), [r["method"] for r in rows])
    ax.set_ylabel(f"% (mean ± std, seeds {', '.join(map(str, seeds))})")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def format_summary(runs: dict[int, list[MethodResult]]) -> str:
    rows = summary_rows(runs)
    head = (f"{'method':<16}{'mean acc':>15}{'min acc':>15}{'rounds':>8}{'up/client':>12}"
            f"{'down/client':>12}  per seed")
    lines = [f"mean ± std over seeds {list(runs)}", head]
    for r in rows:
        lines.append(f"{r['method']:<16}{r['mean_acc']:>8.2f} ± {r['mean_acc_std']:<4.2f}"
                     f"{r['min_acc']:>8.2f} ± {r['min_acc_std']:<4.2f}{r['rounds']:>8}"
                     f"{_human(r['bytes_up_per_client']):>12}"
                     f"{_human(r['bytes_down_per_client']):>12}  "
                     + " ".join(f"{m:.2f}" for m in r["per_seed_mean_acc"]))
        if "mean_bal_acc" in r:
            lines.append(f"{'':<16}balanced acc {r['mean_bal_acc']:.2f} ± "
                         f"{r['mean_bal_acc_std']:.2f} (min {r['min_bal_acc']:.2f} ± "
                         f"{r['min_bal_acc_std']:.2f}); shared balanced set "
                         f"{r['shared_acc']:.2f} ± {r['shared_acc_std']:.2f}")
        if "probe_pooled_knn" in r:
            lines.append(f"{'':<16}body probes: kNN {r['probe_pooled_knn']:.2f} ± "
                         f"{r['probe_pooled_knn_std']:.2f}, linear {r['probe_pooled_linear']:.2f}"
                         f" ± {r['probe_pooled_linear_std']:.2f}")
        if "dp_epsilon" in r:
            lines.append(f"{'':<16}differential privacy: ε = {r['dp_epsilon']:.3g} per image")
        if "membership_auc" in r:
            lines.append(f"{'':<16}membership-inference AUC {r['membership_auc']:.3f} ± "
                         f"{r['membership_auc_std']:.3f} (0.5 = chance)")
    return "\n".join(lines)
