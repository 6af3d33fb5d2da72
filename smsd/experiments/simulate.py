"""``smsd simulate``: the protocol against its baselines on one machine.

K simulated clients hold a non-IID (Dirichlet label-skew) split of a data set, with
labels for a fraction of their images and a local test set; the methods of
:mod:`.methods` run on them. Reported per method: mean and min client test accuracy,
mean and min balanced accuracy, accuracy on the shared class-balanced test set
(:mod:`.scores`), rounds, bytes uploaded and downloaded per client (mean over clients),
wall time.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from . import methods
from .config import SimulateConfig
from .results import MethodResult, format_row, write_results, write_summary
from .scores import label_coverage
from .targets import targets_of_runs, write_targets

__all__ = ["simulate", "simulate_seeds"]

ENGINES = ("local", "flower")


def _timed(fn: Callable[[], MethodResult]) -> MethodResult:
    start = time.perf_counter()
    result = fn()
    result.seconds = time.perf_counter() - start
    return result


def simulate(cfg: SimulateConfig, out_dir: str | os.PathLike | None = None, *,
             progress: bool = True, log: Callable[[str], None] = print,
             engine: str = "local") -> list[MethodResult]:
    """Run the methods of ``cfg.methods`` (default: all four); with ``out_dir``, write
    ``results.json``, ``results.csv`` and ``results.png`` there (atomically).
    ``engine="flower"`` runs the SMSD row through Flower's simulation engine
    (:mod:`smsd.federation`)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be 'local' or 'flower', got {engine!r}")
    if engine == "flower" and cfg.select:
        # Flower's nodes fine-tune with the recipe's setting: every row does the same.
        log("--engine flower: no fine-tuning selection (every method uses the recipe's "
            "setting)")
        cfg = replace(cfg, select=False)
    torch.manual_seed(cfg.seed)
    model = cfg.recipe.model
    data, num_classes, n_images = cfg.split.load(img_size=model.img_size,
                                                 in_chans=model.in_chans, loader=cfg.loader)
    split = cfg.split
    log(f"{split.dataset}: {n_images} images, {num_classes} classes, {split.clients} clients "
        f"(alpha={split.alpha}); train/labeled/test per client: "
        + ", ".join(f"{d.train_images.shape[0]}/{d.labeled_labels.numel()}/"
                    f"{d.test_labels.numel()}" for d in data))
    log("label coverage (share of a client's test classes it has a labeled image of: the "
        "balanced-accuracy ceiling of learning from its own labels alone): "
        + " / ".join(f"{100 * label_coverage(d.labeled_labels, d.test_labels):.1f}%"
                     for d in data))
    clients = methods.Clients.embed(cfg, data, num_classes)
    log(f"shared class-balanced test set: {clients.shared.labels.numel()} images "
        f"({clients.shared.per_class} per class, from the clients' pooled test splits)")
    body = methods.initial_body(cfg)
    results = []
    if "smsd" in cfg.methods:
        if engine == "flower":
            results.append(_timed(lambda: methods.smsd_flower(cfg, log)))
        else:
            with tempfile.TemporaryDirectory(prefix="smsd-simulate-") as tmp:
                results.append(_timed(lambda: methods.smsd(cfg, clients, Path(tmp), progress)))
        log(format_row(results[-1]))
    baselines = {"finetune-only": methods.finetune_only, "fedavg": methods.fedavg,
                 "centralized": methods.centralized, "majority": methods.majority}
    for name, run in baselines.items():
        if name in cfg.methods:
            results.append(_timed(lambda run=run: run(cfg, clients, body)))
            log(format_row(results[-1]))
    if out_dir is not None:
        write_results(results, cfg, Path(out_dir))
    return results


def simulate_seeds(cfg: SimulateConfig, seeds: list[int], out_dir: str | os.PathLike | None,
                   *, progress: bool = True, log: Callable[[str], None] = print,
                   engine: str = "local") -> dict[int, list[MethodResult]]:
    """:func:`simulate` once per seed; with ``out_dir``, each run's files go to
    ``seed-N/``, the mean ± std over seeds to ``summary.json`` / ``summary.csv`` /
    ``summary.png`` and, with the SMSD, fine-tune only and FedAvg rows, the method's
    targets to ``targets.json`` (:mod:`smsd.experiments.targets`)."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds!r}")
    runs = {}
    for seed in seeds:
        log(f"--- seed {seed}")
        sub = None if out_dir is None else Path(out_dir) / f"seed-{seed}"
        runs[seed] = simulate(cfg.with_seed(seed), sub, progress=progress, log=log,
                              engine=engine)
    if out_dir is not None:
        write_summary(runs, Path(out_dir))
        targets = targets_of_runs(runs)
        if targets is not None:
            write_targets(targets, Path(out_dir) / "targets.json")
    return runs
