"""Scores that the label prior cannot win (smsd.experiments.scores) and the majority-class
row of ``smsd simulate``."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch

from smsd.experiments.scores import SharedTestSet, balanced_accuracy, label_coverage, score


def test_balanced_accuracy_matches_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.randint(0, 5, (60,), generator=gen)
        labels[labels == 3] = 1  # a class absent from the truth, predicted sometimes
        pred = torch.randint(0, 5, (60,), generator=gen)
        with pytest.warns(UserWarning) if (pred == 3).any() else nullcontext():
            want = sklearn_metrics.balanced_accuracy_score(labels.numpy(), pred.numpy())
        assert balanced_accuracy(pred, labels) == pytest.approx(want, abs=1e-6)


def test_a_majority_guess_scores_high_locally_but_not_balanced():
    labels = torch.tensor([0] * 9 + [1])
    guess = torch.zeros(10, dtype=torch.long)
    assert balanced_accuracy(guess, labels) == pytest.approx(0.5)
    shared = SharedTestSet.balanced(torch.zeros(20, 3, 2), torch.tensor([0, 1] * 10), seed=0)
    s = score(lambda x: torch.zeros(x.shape[0], dtype=torch.long), torch.zeros(10, 3, 2),
              labels, shared)
    assert (s.local, s.balanced, s.shared) == pytest.approx((0.9, 0.5, 0.5))


def test_label_coverage_bounds_what_local_labels_can_score():
    labeled = torch.tensor([0, 0, 2, 5])
    test = torch.tensor([0, 1, 1, 1, 2, 3])  # classes 0 1 2 3; 0 and 2 labeled
    assert label_coverage(labeled, test) == 0.5
    # the best a model of the labeled classes can do: every labeled class right
    pred = torch.tensor([0, 0, 0, 0, 2, 0])
    assert balanced_accuracy(pred, test) == label_coverage(labeled, test)
    assert label_coverage(torch.tensor([1]), torch.tensor([1, 1])) == 1.0
    with pytest.raises(ValueError, match="zero test images"):
        label_coverage(labeled, torch.tensor([], dtype=torch.long))


def test_shared_set_is_balanced_and_seeded():
    labels = torch.tensor([0] * 30 + [1] * 7 + [2] * 12)
    tokens = torch.arange(labels.numel()).float()[:, None, None].expand(-1, 2, 3)
    a = SharedTestSet.balanced(tokens, labels, seed=1)
    assert torch.bincount(a.labels).tolist() == [7, 7, 7] and a.per_class == 7
    assert torch.equal(a.labels, labels[a.tokens[:, 0, 0].long()])  # tokens follow labels
    b = SharedTestSet.balanced(tokens, labels, seed=1)
    c = SharedTestSet.balanced(tokens, labels, seed=2)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_simulate_reports_balanced_shared_and_majority(tmp_path):
    from smsd.data import DataSplit
    from smsd.experiments import SimulateConfig, simulate

    cfg = SimulateConfig(split=DataSplit(clients=3),
                         methods=("finetune-only", "majority")).quick()
    lines = []
    results = simulate(cfg, tmp_path, progress=False, log=lines.append)
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())[
        "results"]}
    assert set(rows) == {"fine-tune only", "majority class"}
    coverage = next(line for line in lines if line.startswith("label coverage"))
    assert coverage.count("%") == 3
    for row in rows.values():
        assert len(row["client_bal_acc"]) == len(row["client_shared_acc"]) == 3
        assert 0 <= row["min_bal_acc"] <= row["mean_bal_acc"] <= 100
    majority = next(r for r in results if r.method == "majority class")
    # one class guessed: 1 / (classes in the set) on the balanced shared set
    shared_classes = 10  # digits: every class lands in the pooled test splits
    assert majority.shared == pytest.approx([1 / shared_classes] * 3)
    assert "mean_bal_acc" in (tmp_path / "results.csv").read_text().splitlines()[0]
    # the probe of fine-tune only's start (the random init); none for a constant guess
    assert 0 <= rows["fine-tune only"]["knn_pooled"] <= 100
    assert len(rows["fine-tune only"]["probe"]["client_knn"]) == 3
    assert "knn_pooled" not in rows["majority class"]


def test_knn_is_dinos_weighted_vote():
    from smsd.protocol.probes import knn_accuracy

    # two tight clusters, one mislabeled neighbour that the weighted vote outvotes
    gen = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 0.0]) + 0.01 * torch.randn(10, 2, generator=gen)
    b = torch.tensor([0.0, 1.0]) + 0.01 * torch.randn(10, 2, generator=gen)
    train = torch.cat([a, b])
    labels = torch.tensor([0] * 10 + [1] * 10)
    labels[0] = 1
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1]), k=5) == 1.0
    # k = 1 takes the nearest label only: the mislabeled point wins for its own position
    assert knn_accuracy(train, labels, a[:1], torch.tensor([0]), k=1) == 0.0


def test_probes_tell_features_from_noise():
    pytest.importorskip("sklearn")
    from smsd.protocol.probes import linear_probe_accuracy

    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (300,), generator=gen)
    informative = torch.randn(300, 8, generator=gen) + 3 * torch.nn.functional.one_hot(
        labels, 8).float()
    noise = torch.randn(300, 8, generator=gen)
    tr, te = slice(0, 200), slice(200, 300)
    assert linear_probe_accuracy(informative[tr], labels[tr], informative[te], labels[te]) > 0.9
    assert linear_probe_accuracy(noise[tr], labels[tr], noise[te], labels[te]) < 0.6


def test_smsd_row_keeps_loss_and_knn_per_epoch(tmp_path):
    from smsd.data import DataSplit
    from smsd.experiments import SimulateConfig, simulate

    cfg = SimulateConfig(split=DataSplit(clients=2), methods=("smsd",)).quick()
    (row,) = simulate(cfg, tmp_path, progress=False, log=lambda _: None)
    assert [h["epoch"] for h in row.history] == list(range(cfg.recipe.pretrain.epochs))
    assert all(0 <= h["knn"] <= 100 and h["loss"] > 0 for h in row.history)
    saved = json.loads((tmp_path / "results.json").read_text())["results"][0]
    assert saved["pretrain_history"] == row.history
