"""The four methods ``smsd simulate`` compares, on the same clients and the same start.

* SMSD: every client encodes its images once; the server pre-trains the body on all
  shards; each client fine-tunes the returned body on its labels (1 round), or, where
  its held-out labels show the body a handicap, declines it for the initial body.
* fine-tune only: each client trains from the initial body on its labels (0 rounds).
* FedAvg: supervised, ``rounds`` rounds, the full model goes down and up each round.
* centralized: one model trained on every client's labels pooled (upper bound).
* majority class: each client predicts its most frequent labeled class (what the label
  prior alone scores).

Every supervised step is :func:`~smsd.protocol.training.train_classifier` with the
recipe's fine-tuning settings; the methods differ only in where the body starts and
what it sees.
"""

from __future__ import annotations

import copy
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import ClientData
from ..models import ViTBody
from ..protocol.client import Client
from ..protocol.probes import probe
from ..protocol.recipe_selection import (
    CANDIDATES,
    HOLDOUT_FRACTION,
    RETURNED_BODY_CANDIDATES,
    Candidate,
    Selection,
    best_candidate,
    holdout_split,
    select_finetune,
)
from ..protocol.server import RunOptions, Server
from ..protocol.training import (
    FinetuneConfig,
    TokenClassifier,
    balanced_accuracy,
    classify,
    train_classifier,
)
from .config import SimulateConfig
from .results import MethodResult
from .scores import ClientScore, SharedTestSet, score

__all__ = [
    "Clients",
    "centralized",
    "fedavg",
    "finetune_only",
    "initial_body",
    "majority",
    "smsd",
]


def initial_body(cfg: SimulateConfig) -> ViTBody:
    """The body every method starts from (the server's student init)."""
    return ViTBody.seeded(cfg.recipe.model, cfg.recipe.pretrain.seed)


@dataclass
class Clients:
    """The simulated clients' data, their labeled and test images embedded by the public
    head (in patch order: the supervised baselines never see a permutation), and the
    shared class-balanced test set (:mod:`.scores`)."""

    data: list[ClientData]
    num_classes: int
    tokens: list[tuple[torch.Tensor, torch.Tensor]]  # (labeled, test) per client
    shared: SharedTestSet

    @classmethod
    def embed(cls, cfg: SimulateConfig, data: list[ClientData], num_classes: int) -> Clients:
        probe = Client(cfg.recipe.model, None)
        tokens = [(probe.tokens(d.labeled_images), probe.tokens(d.test_images)) for d in data]
        shared = SharedTestSet.balanced(torch.cat([test for _, test in tokens]),
                                        torch.cat([d.test_labels for d in data]), cfg.seed)
        return cls(data, num_classes, tokens, shared)

    def probe(self, body: torch.nn.Module, seed: int) -> dict:
        """k-NN and linear probes of ``body``'s frozen CLS features (per client: its labeled
        images -> its test split; pooled: all labeled images -> the shared set)."""
        clients = [(lt, d.labeled_labels, tt, d.test_labels)
                   for (lt, tt), d in zip(self.tokens, self.data, strict=True)]
        return probe(body, clients, (self.shared.tokens, self.shared.labels),
                     seed=seed).to_dict()

    def knn_pooled(self, body: torch.nn.Module) -> float:
        """k-NN accuracy (%) of ``body``: all labeled images vote, the shared set is scored."""
        from ..protocol.probes import cls_features, knn_accuracy

        labeled = torch.cat([lt for lt, _ in self.tokens])
        labels = torch.cat([d.labeled_labels for d in self.data])
        return round(100 * knn_accuracy(cls_features(body, labeled), labels,
                                        cls_features(body, self.shared.tokens),
                                        self.shared.labels), 2)

    def scores(self, models: list[torch.nn.Module]) -> list[ClientScore]:
        """Each client's model (one per client) scored on its test split and the shared set."""
        return [score(lambda x, m=m: classify(m, x), test_t, d.test_labels, self.shared)
                for m, (_, test_t), d in zip(models, self.tokens, self.data, strict=True)]


def _classifier(cfg: SimulateConfig, body: ViTBody, num_classes: int) -> TokenClassifier:
    return TokenClassifier.from_body(body, num_classes, seed=cfg.seed + 1)




def _state_bytes(module: torch.nn.Module) -> int:
    from safetensors.torch import save

    buffer = io.BytesIO()
    buffer.write(save({k: v.contiguous() for k, v in module.state_dict().items()}))
    return buffer.tell()


def smsd_flower(cfg: SimulateConfig, log_line) -> MethodResult:
    """The SMSD row through Flower's simulation engine, plus Flower's byte counts."""
    from ..federation.simulation import run_flower_simulation

    result = run_flower_simulation(cfg.recipe, cfg.split)
    nodes = result.nodes
    accs = [float(n.metrics["test_accuracy"]) for n in nodes]
    row = MethodResult("SMSD", accs, 1, sum(n.shard_bytes for n in nodes) // len(nodes),
                       nodes[0].body_bytes, 0.0)
    up = sum(n.bytes_up for n in nodes) // len(nodes)
    down = sum(n.bytes_down for n in nodes) // len(nodes)
    log_line("flower: uploads/downloads per node "
             + ", ".join(f"{n.uploads}/{n.downloads}" for n in nodes)
             + f"; Flower-counted bytes per client: up {up} B, down {down} B "
             f"(shard {row.bytes_up} B, body {row.bytes_down} B)")
    return row


def smsd(cfg: SimulateConfig, clients: Clients, work: Path, progress: bool) -> MethodResult:
    recipe = cfg.recipe
    sites = [Client(recipe.model, cfg.split.client_key(i), noise_std=recipe.noise_std,
                    noise_seed=cfg.seed * 1000 + i) for i in range(len(clients.data))]
    shards = [site.encode(d.train_images, work / f"client{i}.safetensors")
              for i, (site, d) in enumerate(zip(sites, clients.data, strict=True))]
    # One checkpoint, at the end: a simulation is not resumed.
    pretrain = recipe.pretrain_for(sum(d.train_images.shape[0] for d in clients.data))
    server = Server(recipe.model, pretrain, head_fingerprint=sites[0].fingerprint,
                    options=RunOptions(checkpoint_every=pretrain.epochs))
    body_path = work / "body.safetensors"
    # per epoch, besides the loss: the teacher body's k-NN accuracy (labels are at hand in
    # a simulation; a real server has none)
    body = server.pretrain(shards, out=body_path, work_dir=work / "server", progress=progress,
                           epoch_metrics=lambda b: {"knn": clients.knn_pooled(b)})
    selection = []
    # a client may decline the body for the one fine-tune only starts from
    own = initial_body(cfg)
    for site, d in zip(sites, clients.data, strict=True):
        metrics = site.finetune(body, d.labeled_images, d.labeled_labels,
                                num_classes=clients.num_classes, config=recipe.smsd_finetune,
                                select=RETURNED_BODY_CANDIDATES if cfg.select else None,
                                own_body=own)
        selection.append(metrics.get("selection"))
    up = sum(os.path.getsize(s) for s in shards) // len(shards)
    privacy = server.privacy_record()
    return MethodResult.scored("SMSD", clients.scores([s.model for s in sites]), 1, up,
                               os.path.getsize(body_path),
                               dp_epsilon=None if privacy is None else privacy["epsilon_spent"],
                               membership=_membership(cfg, clients, body),
                               probe=clients.probe(body, cfg.seed),
                               history=[dict(r) for r in server.history],
                               selection=selection if cfg.select else None)


def _membership(cfg: SimulateConfig, clients: Clients, body: ViTBody) -> dict | None:
    """The membership-inference attack on the returned body: uploaded training images
    (members) against the clients' test images, never uploaded (as many of each)."""
    if not cfg.membership:
        return None
    from ..audit.membership import membership_inference

    probe = Client(cfg.recipe.model, None)
    non_members = torch.cat([test for _, test in clients.tokens])
    members = probe.tokens(torch.cat([d.train_images for d in clients.data]))
    n = min(len(members), len(non_members))
    pick = torch.randperm(len(members), generator=torch.Generator().manual_seed(cfg.seed))[:n]
    return membership_inference(body, members[pick], non_members[:n], seed=cfg.seed).to_dict()


def _train_selected(cfg: SimulateConfig, body: ViTBody, num_classes: int,
                    tokens: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[TokenClassifier, dict | None]:
    """A classifier on ``body`` trained on all of ``tokens``, with the setting picked on a
    held-out part of them when ``cfg.select`` (else the recipe's)."""
    config, selection = cfg.recipe.finetune, None
    if cfg.select:
        config, picked = select_finetune(lambda: _classifier(cfg, body, num_classes),
                                         tokens, labels, config)
        selection = picked.to_dict()
    model = _classifier(cfg, body, num_classes)
    train_classifier(model, tokens, labels, config)
    return model, selection


def finetune_only(cfg: SimulateConfig, clients: Clients, body: ViTBody) -> MethodResult:
    models, selection = [], []
    for (train_t, _), d in zip(clients.tokens, clients.data, strict=True):
        model, picked = _train_selected(cfg, body, clients.num_classes, train_t,
                                        d.labeled_labels)
        models.append(model)
        selection.append(picked)
    # its probe: the body it starts from, with no pre-training (random init)
    return MethodResult.scored("fine-tune only", clients.scores(models), 0, 0, 0,
                               probe=clients.probe(body, cfg.seed),
                               selection=selection if cfg.select else None)


class _Constant(torch.nn.Module):
    """Predicts one class for every input (logits one-hot on ``cls``)."""

    def __init__(self, cls: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(
            torch.tensor(cls), num_classes).float())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(tokens.shape[0], -1)


def majority(cfg: SimulateConfig, clients: Clients, body: ViTBody) -> MethodResult:
    """Each client predicts the most frequent class among its labels (ties: the lowest)."""
    del cfg, body
    models = [_Constant(int(torch.bincount(d.labeled_labels,
                                           minlength=clients.num_classes).argmax()),
                        clients.num_classes) for d in clients.data]
    return MethodResult.scored("majority class", clients.scores(models), 0, 0, 0)


def _fedavg_train(cfg: SimulateConfig, model: TokenClassifier,
                 sets: list[tuple[torch.Tensor, torch.Tensor]],
                 candidate: Candidate | None = None) -> None:
    """``cfg.rounds`` rounds of FedAvg on ``model`` in place; each client trains locally on
    its ``(tokens, labels)`` (the local setting changed by ``candidate`` when given)."""
    weights = torch.tensor([float(labels.numel()) for _, labels in sets])
    weights /= weights.sum()
    ft = cfg.recipe.finetune
    for r in range(cfg.rounds):
        # The global LR follows the fine-tuning recipe's cosine over rounds.
        lr = ft.min_lr + 0.5 * (ft.lr - ft.min_lr) * (1 + torch.cos(
            torch.tensor(torch.pi * r / cfg.rounds))).item()
        local = FinetuneConfig(epochs=cfg.local_epochs, lr=lr, min_lr=lr,
                               weight_decay=ft.weight_decay, batch_size=ft.batch_size,
                               warmup_epochs=0, body_lr_scale=ft.body_lr_scale,
                               seed=ft.seed + r)
        if candidate is not None:
            local = candidate.apply(local)
        states = []
        for tokens, labels in sets:
            client_model = copy.deepcopy(model)
            train_classifier(client_model, tokens, labels, local)
            states.append(client_model.state_dict())
        averaged = {k: sum(w * s[k].float() for w, s in zip(weights, states, strict=True))
                    for k in states[0]}
        model.load_state_dict(averaged)


def _fedavg_select(cfg: SimulateConfig, clients: Clients, body: ViTBody) -> list[dict]:
    """FedAvg's share of the selection: every client holds out part of its labels, each
    candidate is trained federated on the rest, the clients report their held-out
    accuracy and balanced accuracy, and the candidate with the best mean over clients
    (weighted by held-out images) wins. Every client records the one global pick."""
    splits = [holdout_split(d.labeled_labels, HOLDOUT_FRACTION, cfg.recipe.finetune.seed)
              for d in clients.data]
    fit = [(t[a], d.labeled_labels[a])
           for (t, _), d, (a, _) in zip(clients.tokens, clients.data, splits, strict=True)]
    held = [(t[b], d.labeled_labels[b])
            for (t, _), d, (_, b) in zip(clients.tokens, clients.data, splits, strict=True)]
    n_held = sum(labels.numel() for _, labels in held)
    scores = {}
    for candidate in CANDIDATES:
        model = _classifier(cfg, body, clients.num_classes)
        _fedavg_train(cfg, model, fit, candidate)
        acc = bal = 0.0
        for tokens, labels in held:
            if labels.numel():
                pred = classify(model, tokens)
                acc += float((pred == labels).float().sum())
                bal += balanced_accuracy(pred, labels) * labels.numel()
        scores[candidate.name] = {"accuracy": acc / max(n_held, 1),
                                  "balanced": bal / max(n_held, 1)}
    record = Selection(best_candidate(CANDIDATES, scores, recipe=cfg.recipe.finetune).name,
                       scores, n_held).to_dict()
    return [dict(record) for _ in clients.data]


def fedavg(cfg: SimulateConfig, clients: Clients, body: ViTBody) -> MethodResult:
    selection = _fedavg_select(cfg, clients, body) if cfg.select else None
    candidate = (None if selection is None else
                 next(c for c in CANDIDATES if c.name == selection[0]["picked"]))
    global_model = _classifier(cfg, body, clients.num_classes)
    _fedavg_train(cfg, global_model,
                  [(t, d.labeled_labels) for (t, _), d in zip(clients.tokens, clients.data,
                                                              strict=True)], candidate)
    size = _state_bytes(global_model)
    # The selection's trial runs are not counted in the bytes: a deployment would pick once.
    return MethodResult.scored("FedAvg", clients.scores([global_model] * len(clients.data)),
                               cfg.rounds, cfg.rounds * size, cfg.rounds * size,
                               probe=clients.probe(global_model.body, cfg.seed),
                               selection=selection)


def centralized(cfg: SimulateConfig, clients: Clients, body: ViTBody) -> MethodResult:
    pooled = torch.cat([t for t, _ in clients.tokens])
    labels = torch.cat([d.labeled_labels for d in clients.data])
    model, picked = _train_selected(cfg, body, clients.num_classes, pooled, labels)
    # Pooling means uploading the labeled images (fp32 tensors) and their labels.
    up = sum(d.labeled_images.numel() * 4 + d.labeled_labels.numel() * 8
             for d in clients.data) // len(clients.data)
    return MethodResult.scored("centralized", clients.scores([model] * len(clients.data)), 1,
                               up, 0, probe=clients.probe(model.body, cfg.seed),
                               selection=None if picked is None
                               else [dict(picked) for _ in clients.data])
