"""``smsd simulate``: the protocol against its baselines on one machine.

K simulated clients hold a non-IID (Dirichlet label-skew) split of a data set, with
labels for a fraction of their images and a local test set. Four methods, one recipe
for every supervised step (:func:`~smsd.protocol.training.train_classifier`), the same
initial body for all:

* SMSD: every client encodes its images once; the server pre-trains the body on all
  shards; each client fine-tunes the returned body on its labels (1 round).
* fine-tune only: each client trains from the initial body on its labels (0 rounds).
* FedAvg: supervised, ``rounds`` rounds, the full model goes down and up each round.
* centralized: one model trained on every client's labels pooled (upper bound).

Reported per method: mean and min client test accuracy, rounds, bytes uploaded and
downloaded per client (mean over clients), wall time.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..crypto import PermutationKey
from ..data import ClientData, ImageSource, collect, load_digits, make_clients, make_loader
from ..io import atomic_write_bytes, write_with
from ..models import ClassifierTail, ViTBody, ViTConfig, vit_tiny
from .client import Client
from .server import PretrainConfig, Server
from .training import (
    PRETRAINED_BODY_LR_SCALE,
    FinetuneConfig,
    TokenClassifier,
    accuracy,
    train_classifier,
)

__all__ = ["MethodResult", "SimulateConfig", "default_model_config", "simulate"]


def default_model_config(img_size: int = 32, in_chans: int = 1) -> ViTConfig:
    """The demo model: a 4-block, 64-wide ViT on 32×32 images with 4×4 patches."""
    return vit_tiny(patch_size=4, img_size=img_size, in_chans=in_chans, embed_dim=64, depth=4,
                    num_heads=4)


@dataclass(frozen=True)
class SimulateConfig:
    dataset: str = "digits"
    clients: int = 4
    alpha: float = 0.5
    labeled_fraction: float = 0.2
    test_fraction: float = 0.2
    rounds: int = 20
    local_epochs: int = 10
    seed: int = 0
    model: ViTConfig = field(default_factory=default_model_config)
    # DINO's recipe with the projection head scaled down to the demo model, adapted to a
    # run of ~660 steps (epochs sized for the 10-minute demo): DINO's lr 5e-4/256 images,
    # momentum 0.996 and teacher temperature 0.04 collapse here to a uniform output (the
    # CLS features of different images differ by ~1 % at init, so the centered teacher is
    # flat). A sharper teacher (0.02), a faster one (momentum 0.99), lr 1e-3 and DINOv2's
    # KoLeo term (0.1) on the CLS features keep it informative (notes/protocol.md).
    pretrain: PretrainConfig = field(default_factory=lambda: PretrainConfig(
        epochs=30, batch_size=64, lr=1e-3, warmup_epochs=2, momentum_teacher=0.99,
        warmup_teacher_temp=0.02, teacher_temp=0.02, koleo_weight=0.1, out_dim=1024,
        hidden_dim=256, bottleneck_dim=64, checkpoint_every=1000))
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=100))
    # SMSD's clients fine-tune a pre-trained body: its LR is scaled down (the tail keeps
    # the recipe's LR). Every other method trains a random body at the full LR, its best.
    smsd_body_lr_scale: float = PRETRAINED_BODY_LR_SCALE

    # Image loader for 'folder:' data sets: "dali", "torch" or "auto" (smsd.data.make_loader).
    loader: str = "auto"

    # Gaussian noise each client adds to its uploaded tokens (privacy mitigation; smsd audit).
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        if not self.smsd_body_lr_scale > 0:
            raise ValueError(f"smsd_body_lr_scale must be positive, got "
                             f"{self.smsd_body_lr_scale!r}")


@dataclass
class MethodResult:
    method: str
    accuracies: list[float]
    rounds: int
    bytes_up: int
    bytes_down: int
    seconds: float

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def min_accuracy(self) -> float:
        return min(self.accuracies)

    def row(self) -> dict:
        return {"method": self.method, "mean_acc": round(100 * self.mean_accuracy, 2),
                "min_acc": round(100 * self.min_accuracy, 2), "rounds": self.rounds,
                "bytes_up_per_client": self.bytes_up, "bytes_down_per_client": self.bytes_down,
                "wall_s": round(self.seconds, 2),
                "client_acc": [round(100 * a, 2) for a in self.accuracies]}


def _load_dataset(spec: str, model: ViTConfig, loader: str = "auto"
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    if spec == "digits":
        images, labels = load_digits(model.img_size)
        if model.in_chans != 1:
            images = images.expand(-1, model.in_chans, -1, -1).contiguous()
        return images, labels, 10
    if spec.startswith("folder:"):
        source = ImageSource.from_folder(spec[len("folder:"):])
        batch = collect(make_loader(source, img_size=model.img_size, in_chans=model.in_chans,
                                    loader=loader))
        return batch.images, batch.labels, len(source.classes)
    raise ValueError(f"dataset must be 'digits' or 'folder:PATH', got {spec!r}")


def _simulation_key(seed: int, client: int) -> PermutationKey:
    # Reproducible keys for the simulation only; real clients use PermutationKey.generate().
    return PermutationKey(hashlib.sha256(f"smsd/simulate/{seed}/{client}".encode()).digest())


def initial_body(model: ViTConfig, seed: int) -> ViTBody:
    """The body every method starts from (the server's student init for ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTBody(model)


def _new_classifier(body: ViTBody, num_classes: int, seed: int) -> TokenClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        tail = ClassifierTail(body.config.embed_dim, num_classes)
    return TokenClassifier(copy.deepcopy(body), tail)


def _state_bytes(module: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    from safetensors.torch import save

    buffer.write(save({k: v.contiguous() for k, v in module.state_dict().items()}))
    return buffer.tell()


def _timed(fn: Callable[[], MethodResult]) -> MethodResult:
    start = time.perf_counter()
    result = fn()
    result.seconds = time.perf_counter() - start
    return result


def _run_smsd(cfg: SimulateConfig, data: list[ClientData], num_classes: int, work: Path,
              progress: bool) -> MethodResult:
    clients = [Client(cfg.model, _simulation_key(cfg.seed, i), noise_std=cfg.noise_std,
                      noise_seed=cfg.seed * 1000 + i) for i in range(len(data))]
    shards = [c.encode(d.train_images, work / f"client{i}.safetensors")
              for i, (c, d) in enumerate(zip(clients, data, strict=True))]
    server = Server(cfg.model, cfg.pretrain, head_fingerprint=clients[0].fingerprint)
    body_path = work / "body.safetensors"
    body = server.pretrain(shards, out=body_path, work_dir=work / "server", progress=progress)
    accs = []
    finetune = replace(cfg.finetune, body_lr_scale=cfg.smsd_body_lr_scale)
    for client, d in zip(clients, data, strict=True):
        metrics = client.finetune(body, d.labeled_images, d.labeled_labels,
                                  num_classes=num_classes, config=finetune,
                                  test_images=d.test_images, test_labels=d.test_labels)
        accs.append(metrics["test_accuracy"])
    up = sum(os.path.getsize(s) for s in shards) // len(shards)
    return MethodResult("SMSD", accs, 1, up, os.path.getsize(body_path), 0.0)


def _run_finetune_only(cfg, tokens, data, num_classes, body) -> MethodResult:
    accs = []
    for (train_t, test_t), d in zip(tokens, data, strict=True):
        model = _new_classifier(body, num_classes, cfg.seed)
        train_classifier(model, train_t, d.labeled_labels, cfg.finetune)
        accs.append(accuracy(model, test_t, d.test_labels))
    return MethodResult("fine-tune only", accs, 0, 0, 0, 0.0)


def _run_fedavg(cfg, tokens, data, num_classes, body) -> MethodResult:
    global_model = _new_classifier(body, num_classes, cfg.seed)
    weights = torch.tensor([float(d.labeled_labels.numel()) for d in data])
    weights /= weights.sum()
    ft = cfg.finetune
    for r in range(cfg.rounds):
        # The global LR follows the fine-tuning recipe's cosine over rounds.
        lr = ft.min_lr + 0.5 * (ft.lr - ft.min_lr) * (1 + torch.cos(
            torch.tensor(torch.pi * r / cfg.rounds))).item()
        local = FinetuneConfig(epochs=cfg.local_epochs, lr=lr, min_lr=lr,
                               weight_decay=ft.weight_decay, batch_size=ft.batch_size,
                               warmup_epochs=0, seed=ft.seed + r)
        states = []
        for (train_t, _), d in zip(tokens, data, strict=True):
            model = copy.deepcopy(global_model)
            train_classifier(model, train_t, d.labeled_labels, local)
            states.append(model.state_dict())
        averaged = {k: sum(w * s[k].float() for w, s in zip(weights, states, strict=True))
                    for k in states[0]}
        global_model.load_state_dict(averaged)
    accs = [accuracy(global_model, test_t, d.test_labels)
            for (_, test_t), d in zip(tokens, data, strict=True)]
    size = _state_bytes(global_model)
    return MethodResult("FedAvg", accs, cfg.rounds, cfg.rounds * size, cfg.rounds * size, 0.0)


def _run_centralized(cfg, tokens, data, num_classes, body) -> MethodResult:
    model = _new_classifier(body, num_classes, cfg.seed)
    pooled = torch.cat([t for t, _ in tokens])
    labels = torch.cat([d.labeled_labels for d in data])
    train_classifier(model, pooled, labels, cfg.finetune)
    accs = [accuracy(model, test_t, d.test_labels)
            for (_, test_t), d in zip(tokens, data, strict=True)]
    # Pooling means uploading the labeled images (fp32 tensors) and their labels.
    up = sum(d.labeled_images.numel() * 4 + d.labeled_labels.numel() * 8 for d in data) \
        // len(data)
    return MethodResult("centralized", accs, 1, up, 0, 0.0)


def simulate(cfg: SimulateConfig, out_dir: str | os.PathLike | None = None, *,
             progress: bool = True, log: Callable[[str], None] = print,
             engine: str = "local") -> list[MethodResult]:
    """Run the four methods; with ``out_dir``, write ``results.json``, ``results.csv`` and
    ``results.png`` there (atomically). ``engine="flower"`` runs the SMSD row through
    Flower's simulation engine (:mod:`smsd.federation`)."""
    if engine not in ("local", "flower"):
        raise ValueError(f"engine must be 'local' or 'flower', got {engine!r}")
    torch.manual_seed(cfg.seed)
    images, labels, num_classes = _load_dataset(cfg.dataset, cfg.model, cfg.loader)
    data = make_clients(images, labels, cfg.clients, cfg.alpha, cfg.labeled_fraction,
                        cfg.test_fraction, cfg.seed)
    log(f"{cfg.dataset}: {len(labels)} images, {num_classes} classes, {cfg.clients} clients "
        f"(alpha={cfg.alpha}); train/labeled/test per client: "
        + ", ".join(f"{d.train_images.shape[0]}/{d.labeled_labels.numel()}/"
                    f"{d.test_labels.numel()}" for d in data))
    probe = Client(cfg.model, None)
    tokens = [(probe.tokens(d.labeled_images), probe.tokens(d.test_images)) for d in data]
    body = initial_body(cfg.model, cfg.pretrain.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="smsd-simulate-") as tmp:
        if engine == "flower":
            from ..federation.simulation import smsd_row

            results.append(smsd_row(cfg, log_line=log))
        else:
            results.append(_timed(lambda: _run_smsd(cfg, data, num_classes, Path(tmp),
                                                    progress)))
    log(_format_row(results[-1]))
    for run in (_run_finetune_only, _run_fedavg, _run_centralized):
        results.append(_timed(lambda run=run: run(cfg, tokens, data, num_classes, body)))
        log(_format_row(results[-1]))
    if out_dir is not None:
        write_results(results, cfg, Path(out_dir))
    return results


def _format_row(r: MethodResult) -> str:
    return (f"{r.method:<16}{100 * r.mean_accuracy:>9.2f}{100 * r.min_accuracy:>9.2f}"
            f"{r.rounds:>8}{_human(r.bytes_up):>12}{_human(r.bytes_down):>12}{r.seconds:>9.1f}")


def format_table(results: list[MethodResult]) -> str:
    head = (f"{'method':<16}{'mean acc':>9}{'min acc':>9}{'rounds':>8}{'up/client':>12}"
            f"{'down/client':>12}{'wall s':>9}")
    return "\n".join([head, *(_format_row(r) for r in results)])


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def write_results(results: list[MethodResult], cfg: SimulateConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in results]
    payload = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "results": rows}
    atomic_write_bytes(out / "results.json", (json.dumps(payload, indent=2) + "\n").encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[k for k in rows[0] if k != "client_acc"],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", text.getvalue().encode())
    _plot(results, out / "results.png")


def _plot(results: list[MethodResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r.method for r in results]
    xs = range(len(results))
    for offset, label, values in ((-0.2, "mean", [r.mean_accuracy for r in results]),
                                  (0.2, "min", [r.min_accuracy for r in results])):
        bars = ax.bar([x + offset for x in xs], [100 * v for v in values], 0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("client test accuracy (%)")
    ax.set_ylim(0, 105)
    # Outside the axes: inside, it covers the first method's bars.
    ax.legend(title="client acc.", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def quick_config(cfg: SimulateConfig) -> SimulateConfig:
    """A seconds-long version of ``cfg`` (smoke tests, CI): tiny model, few epochs."""
    return replace(
        cfg, rounds=2, local_epochs=1,
        model=cfg.model.replace(embed_dim=16, depth=1, num_heads=2),
        pretrain=replace(cfg.pretrain, epochs=1, batch_size=128, out_dim=64, hidden_dim=32,
                         bottleneck_dim=16, warmup_epochs=0, local_keep=(0.2,) * 2),
        finetune=replace(cfg.finetune, epochs=2))


def with_seed(cfg: SimulateConfig, seed: int) -> SimulateConfig:
    """``cfg`` with every seed (split, keys, inits, shuffles) set to ``seed``."""
    return replace(cfg, seed=seed, pretrain=replace(cfg.pretrain, seed=seed),
                   finetune=replace(cfg.finetune, seed=seed))


def simulate_seeds(cfg: SimulateConfig, seeds: list[int], out_dir: str | os.PathLike | None,
                   *, progress: bool = True, log: Callable[[str], None] = print,
                   engine: str = "local") -> dict[int, list[MethodResult]]:
    """:func:`simulate` once per seed; with ``out_dir``, each run's files go to
    ``seed-N/`` and the mean ± std over seeds to ``summary.json`` / ``summary.csv``."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds!r}")
    runs = {}
    for seed in seeds:
        log(f"--- seed {seed}")
        sub = None if out_dir is None else Path(out_dir) / f"seed-{seed}"
        runs[seed] = simulate(with_seed(cfg, seed), sub, progress=progress, log=log,
                              engine=engine)
    if out_dir is not None:
        rows = summary_rows(runs)
        atomic_write_bytes(Path(out_dir) / "summary.json", (json.dumps(
            {"seeds": seeds, "results": rows}, indent=2) + "\n").encode())
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(Path(out_dir) / "summary.csv", text.getvalue().encode())
    return runs


def summary_rows(runs: dict[int, list[MethodResult]]) -> list[dict]:
    """Per method: mean and sample std over seeds of the mean and min client accuracy."""
    import statistics

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
    return rows


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
    return "\n".join(lines)
