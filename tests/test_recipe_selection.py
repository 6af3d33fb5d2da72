"""A client picks its fine-tuning setting on held-out labels (smsd.protocol.recipe_selection),
and ``smsd simulate`` offers the same choice to every method."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from smsd.protocol.recipe_selection import (
    CANDIDATES,
    OWN_BODY,
    RETURNED_BODY_CANDIDATES,
    Candidate,
    best_candidate,
    holdout_split,
    select_finetune,
)
from smsd.protocol.training import FinetuneConfig


def test_holdout_is_stratified_disjoint_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2 + [3])
    train, held = holdout_split(labels, 0.2, seed=3)
    assert sorted(torch.cat([train, held]).tolist()) == list(range(labels.numel()))
    assert set(train.tolist()).isdisjoint(held.tolist())
    held_counts = torch.bincount(labels[held], minlength=4).tolist()
    assert held_counts == [2, 1, 0, 0]  # round(0.2 n), never a class's last image
    assert set(labels[train].tolist()) == {0, 1, 2, 3}
    again = holdout_split(labels, 0.2, seed=3)
    assert torch.equal(again[1], held)
    assert not torch.equal(holdout_split(labels, 0.2, seed=4)[1], held)
    with pytest.raises(ValueError, match="fraction"):
        holdout_split(labels, 1.0, seed=0)


def test_candidate_changes_only_its_fields():
    base = FinetuneConfig(epochs=100, warmup_epochs=2, body_lr_scale=0.3, lr=2e-3)
    short = Candidate("short", epochs_share=0.01).apply(base)
    assert (short.epochs, short.warmup_epochs, short.body_lr_scale) == (1, 0, 0.3)
    probe = Candidate("probe", freeze_body=True).apply(base)
    assert probe.freeze_body and probe.epochs == 100 and probe.lr == 2e-3
    assert Candidate("x1", body_lr_scale=1.0).apply(base).body_lr_scale == 1.0
    subsets = Candidate("subsets", token_keep=0.5).apply(base)
    assert subsets == FinetuneConfig(epochs=100, warmup_epochs=2, body_lr_scale=0.3, lr=2e-3,
                                     token_keep=0.5)
    assert Candidate("same").apply(replace(base, token_keep=0.7)).token_keep == 0.7
    with pytest.raises(ValueError, match="token_keep"):
        Candidate("none", token_keep=0.0)
    with pytest.raises(ValueError, match="epochs_share"):
        Candidate("none", epochs_share=0)
    with pytest.raises(ValueError, match="body_lr_scale"):
        Candidate("neg", body_lr_scale=-1.0)


class _Lookup(nn.Module):
    """Predicts a fixed label per input (its first token value), right for ``right`` of
    the inputs: a model whose validation accuracy the test sets."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.table: dict[int, int] = {}
        self.num_classes = num_classes

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens[:, 0, 0].long().tolist()
        return nn.functional.one_hot(torch.tensor([self.table.get(i, 0) for i in ids]),
                                     self.num_classes).float()


def _lookup_data(n: int = 40, num_classes: int = 2):
    tokens = torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 3, 4).clone()
    labels = torch.arange(n) % num_classes
    return tokens, labels


def test_the_best_held_out_setting_wins_and_never_sees_the_held_out_labels():
    tokens, labels = _lookup_data()
    fit, held = holdout_split(labels, 0.2, seed=0)
    right_share = {"a": 0.25, "b": 1.0, "c": 0.5}
    seen = []

    def train(model, x, y, config):
        seen.append(set(x[:, 0, 0].long().tolist()))
        name = {0.11: "a", 0.22: "b", 0.33: "c"}[config.body_lr_scale]
        held_ids = held.tolist()
        n_right = round(right_share[name] * len(held_ids))
        model.table = {i: int(labels[i]) if k < n_right else 1 - int(labels[i])
                       for k, i in enumerate(held_ids)}

    candidates = [Candidate("a", body_lr_scale=0.11), Candidate("b", body_lr_scale=0.22),
                  Candidate("c", body_lr_scale=0.33)]
    config, picked = select_finetune(lambda: _Lookup(2), tokens, labels,
                                     FinetuneConfig(seed=0), candidates=candidates,
                                     train=train)
    assert picked.picked == "b" and config.body_lr_scale == 0.22
    assert picked.n_validation == held.numel() == 8
    assert picked.validation["b"]["accuracy"] == 1.0
    assert picked.validation["a"]["accuracy"] == 0.25
    assert all(ids == set(fit.tolist()) for ids in seen)  # trained on the rest only


def test_ties_go_to_balanced_accuracy_then_to_the_earlier_candidate():
    a, b, c = Candidate("a"), Candidate("b"), Candidate("c")
    scores = {"a": {"accuracy": 0.8, "balanced": 0.5}, "b": {"accuracy": 0.8, "balanced": 0.7},
              "c": {"accuracy": 0.8, "balanced": 0.7}}
    assert best_candidate([a, b, c], scores) is b
    scores["a"]["accuracy"] = 0.9
    assert best_candidate([a, b, c], scores) is a


def test_nothing_to_hold_out_keeps_the_first_candidate():
    tokens, labels = torch.zeros(2, 3, 4), torch.tensor([0, 1])  # one image per class
    config, picked = select_finetune(lambda: _Lookup(2), tokens, labels, FinetuneConfig(),
                                     train=lambda *_: pytest.fail("nothing to compare"))
    assert picked.picked == CANDIDATES[0].name and picked.n_validation == 0
    assert config == CANDIDATES[0].apply(FinetuneConfig())


def test_bad_candidate_lists_are_refused():
    tokens, labels = _lookup_data()
    with pytest.raises(ValueError, match="empty"):
        select_finetune(lambda: _Lookup(2), tokens, labels, FinetuneConfig(), candidates=())
    with pytest.raises(ValueError, match="distinct"):
        select_finetune(lambda: _Lookup(2), tokens, labels, FinetuneConfig(),
                        candidates=(Candidate("x"), Candidate("x", freeze_body=True)))


def test_client_finetune_selects_then_trains_on_all_labels():
    from smsd.models import ViTBody, model_config
    from smsd.protocol.client import Client

    config = model_config("demo").replace(embed_dim=16, depth=1, num_heads=2)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(30, config.in_chans, config.img_size, config.img_size, generator=gen)
    labels = torch.arange(30) % 3
    client = Client(config, None)
    ft = FinetuneConfig(epochs=2, batch_size=16)
    metrics = client.finetune(ViTBody(config), images, labels, num_classes=3, config=ft,
                              select=CANDIDATES)
    selection = metrics["selection"]
    assert set(selection["validation"]) == {c.name for c in CANDIDATES}
    assert selection["picked"] in selection["validation"]
    assert selection["n_validation"] == 6  # 2 of each class's 10
    assert client.model is not None and 0 <= metrics["train_accuracy"] <= 1
    with pytest.raises(ValueError, match="augment"):
        client.finetune(ViTBody(config), images, labels, num_classes=3, config=ft,
                        select=CANDIDATES, augment=[])


@pytest.mark.parametrize("dataset", ("digits", "textures"))
def test_simulate_reports_each_clients_pick_for_every_method(tmp_path, dataset):
    """The quick simulate on both bundled data sets (CI runs it): every trained method
    records a pick per client, the SMSD row writes metrics.jsonl and pretrain.png."""
    from smsd.data import DataSplit
    from smsd.experiments import SimulateConfig, simulate

    cfg = SimulateConfig(split=DataSplit(dataset=dataset, clients=2)).quick()
    simulate(cfg, tmp_path, progress=False, log=lambda _: None)
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())[
        "results"]}
    for method in ("SMSD", "fine-tune only", "FedAvg", "centralized"):
        # only a client given a pre-trained body may decline it
        names = {c.name for c in (RETURNED_BODY_CANDIDATES if method == "SMSD"
                                  else CANDIDATES)}
        assert len(rows[method]["client_picked"]) == 2
        assert set(rows[method]["client_picked"]) <= names
        assert set(rows[method]["selection"][0]["validation"]) == names
    assert "selection" not in rows["majority class"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(
        range(cfg.recipe.pretrain.epochs))
    assert all("knn" in json.loads(line) and "loss" in json.loads(line) for line in lines)
    assert (tmp_path / "pretrain.png").stat().st_size > 0


def test_simulate_without_selection_uses_the_recipe(tmp_path):
    from smsd.data import DataSplit
    from smsd.experiments import SimulateConfig, simulate

    cfg = SimulateConfig(split=DataSplit(clients=2), methods=("finetune-only",),
                         select=False).quick()
    (row,) = simulate(cfg, tmp_path, progress=False, log=lambda _: None)
    assert row.selection is None
    assert "client_picked" not in json.loads((tmp_path / "results.json").read_text())[
        "results"][0]


def test_a_full_tie_keeps_the_recipes_own_setting():
    """Held-out images that cannot tell two settings apart leave the recipe's (tuned) one."""
    recipe = FinetuneConfig(epochs=10, body_lr_scale=0.3)
    scores = {c.name: {"accuracy": 0.9, "balanced": 0.8} for c in CANDIDATES}
    assert best_candidate(CANDIDATES, scores, recipe=recipe).name == "body lr x0.3"
    assert best_candidate(CANDIDATES, scores).name == CANDIDATES[0].name
    # evidence still wins over the recipe: one more held-out image right
    scores["body lr x1"]["accuracy"] = 0.95
    assert best_candidate(CANDIDATES, scores, recipe=recipe).name == "body lr x1"
    scores["body lr x1"]["accuracy"] = 0.9
    scores["linear probe"]["balanced"] = 0.85
    assert best_candidate(CANDIDATES, scores, recipe=recipe).name == "linear probe"


class _Start(nn.Module):
    """A stand-in body whose ``marker`` tells which start a trial was built from."""

    def __init__(self, marker: float) -> None:
        super().__init__()
        self.marker = marker


def _marked_training(labels: torch.Tensor, held: torch.Tensor, right: dict[float, float]):
    """A ``train`` for select_finetune: the model built from the start marked ``m`` gets
    ``right[m]`` of the held-out images right."""
    def train(model, x, y, config):
        held_ids = held.tolist()
        n_right = round(right[model.marker] * len(held_ids))
        table = {i: int(labels[i]) if k < n_right else 1 - int(labels[i])
                 for k, i in enumerate(held_ids)}
        model.forward = lambda tokens: nn.functional.one_hot(torch.tensor(
            [table.get(i, 0) for i in tokens[:, 0, 0].long().tolist()]), 2).float()
    return train


def test_a_client_declines_the_body_only_when_its_own_does_strictly_better():
    tokens, labels = _lookup_data()
    _, held = holdout_split(labels, 0.2, seed=0)
    given, own = 1.0, 2.0
    candidates = (Candidate("given"), OWN_BODY)
    for right, declined in (({given: 0.5, own: 0.75}, True), ({given: 0.75, own: 0.75}, False),
                            ({given: 0.75, own: 0.5}, False)):
        config, picked = select_finetune(
            lambda: _Start(given), tokens, labels, FinetuneConfig(body_lr_scale=0.3),
            candidates=candidates, train=_marked_training(labels, held, right),
            new_own_model=lambda: _Start(own))
        assert picked.own_body is declined
        assert picked.picked == ("own random body" if declined else "given")
        assert config.body_lr_scale == (1.0 if declined else 0.3)
    with pytest.raises(ValueError, match="new_own_model"):
        select_finetune(lambda: _Start(given), tokens, labels, FinetuneConfig(),
                        candidates=candidates)


def test_declining_the_body_never_counts_as_keeping_the_recipe():
    recipe = FinetuneConfig(body_lr_scale=1.0)  # OWN_BODY's setting on another body
    scores = {c.name: {"accuracy": 0.9, "balanced": 0.8} for c in RETURNED_BODY_CANDIDATES}
    assert best_candidate(RETURNED_BODY_CANDIDATES, scores, recipe=recipe).name == "body lr x1"
    assert RETURNED_BODY_CANDIDATES[-1] is OWN_BODY
    assert not any(c.own_body for c in CANDIDATES)


def test_client_that_declines_trains_its_own_body_on_all_labels():
    from smsd.models import ViTBody, model_config
    from smsd.protocol.client import Client

    config = model_config("demo").replace(embed_dim=16, depth=1, num_heads=2)
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    # the class is the image's brightness: any random body tells the classes apart
    images = (labels.view(-1, 1, 1, 1).float() / 3
              + 0.01 * torch.rand(30, config.in_chans, config.img_size, config.img_size,
                                  generator=gen))
    returned, own = ViTBody(config), ViTBody(config)
    with torch.no_grad():  # a returned body whose output is constant: a handicap
        for p in returned.parameters():
            p.zero_()
    client = Client(config, None)
    ft = FinetuneConfig(epochs=30, batch_size=8, lr=3e-2, warmup_epochs=0)
    probe = Candidate("linear probe", freeze_body=True)
    own_probe = replace(OWN_BODY, freeze_body=True)
    metrics = client.finetune(returned, images, labels, num_classes=3, config=ft,
                              select=(probe, own_probe), own_body=own)
    selection = metrics["selection"]
    assert selection["validation"][probe.name]["accuracy"] == pytest.approx(1 / 3)
    assert selection["picked"] == own_probe.name and selection["own_body"] is True
    # the final model is the client's own body (frozen: unchanged), trained on all labels
    assert all(torch.equal(v, own.state_dict()[k])
               for k, v in client.model.body.state_dict().items())
    assert metrics["train_accuracy"] == 1.0
    # without own_body, the client draws one of its own, seeded by the fine-tuning config
    again = Client(config, None)
    again.finetune(returned, images, labels, num_classes=3, config=ft, select=(own_probe,))
    drawn = ViTBody.seeded(config, ft.seed)
    assert all(torch.equal(v, drawn.state_dict()[k])
               for k, v in again.model.body.state_dict().items())
