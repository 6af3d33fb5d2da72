"""The method's targets over seeds (smsd.experiments.targets) on hand-made rows."""

from __future__ import annotations

import json

import pytest

from smsd.experiments.targets import (
    check_targets,
    format_targets,
    has_target_rows,
    load_seed_rows,
)


def _row(method, client_acc, bal, knn):
    return {"method": method, "client_acc": client_acc,
            "mean_acc": sum(client_acc) / len(client_acc), "mean_bal_acc": bal,
            "knn_pooled": knn}


def _seed(smsd_acc, ft_acc, fedavg_acc, *, smsd_bal=80.0, ft_bal=70.0, fedavg_bal=75.0,
          smsd_knn=60.0, ft_knn=40.0):
    return [_row("SMSD", smsd_acc, smsd_bal, smsd_knn),
            _row("fine-tune only", ft_acc, ft_bal, ft_knn),
            _row("FedAvg", fedavg_acc, fedavg_bal, 50.0),
            _row("majority class", [50.0, 50.0], 10.0, 0.0)]


def _by_name(targets):
    return {t.name: t for t in targets}


def test_all_met_when_smsd_leads_everywhere():
    runs = {0: _seed([90, 80], [80, 70], [85, 75]), 1: _seed([88, 82], [79, 71], [84, 76])}
    targets = check_targets(runs)
    assert len(targets) == 6 and all(t.met for t in targets)
    assert "6 of 6 met" in format_targets(targets)


def test_one_client_worse_off_on_one_seed_fails_only_that_target():
    # seed 1, client 0: SMSD 1.5 points below fine-tune only, the means still lead
    runs = {0: _seed([95, 90], [80, 70], [85, 75]), 1: _seed([78.5, 95], [80, 70], [84, 76])}
    targets = _by_name(check_targets(runs))
    worst = targets["every seed and client: SMSD local accuracy >= fine-tune only - 1"]
    assert not worst.met and worst.value == pytest.approx(-1.5)
    assert "seed 1, client 0" in worst.detail
    assert sum(not t.met for t in targets.values()) == 1
    assert "NOT met" in format_targets(list(targets.values()))


def test_a_client_exactly_one_point_below_still_meets_it():
    runs = {0: _seed([79, 90], [80, 70], [70, 70])}
    worst = _by_name(check_targets(runs))[
        "every seed and client: SMSD local accuracy >= fine-tune only - 1"]
    assert worst.met and worst.value == pytest.approx(-1.0)


def test_margins_over_fine_tune_only_and_fedavg_and_knn():
    # balanced: SMSD 72.5 vs fine-tune only 70 (+2.5 < 3); FedAvg 73 above SMSD; kNN +9
    runs = {0: _seed([90, 80], [80, 70], [85, 75], smsd_bal=72.5, fedavg_bal=73.0,
                     smsd_knn=49.0, ft_knn=40.0)}
    targets = _by_name(check_targets(runs))
    assert not targets["mean client balanced accuracy: SMSD >= fine-tune only + 3"].met
    assert not targets["mean client balanced accuracy: SMSD >= FedAvg"].met
    assert targets["mean client local accuracy: SMSD >= fine-tune only + 3"].met
    knn = targets["k-NN of SMSD's body >= the random body's + 10"]
    assert not knn.met and knn.threshold == pytest.approx(50.0)


def test_means_are_over_seeds():
    runs = {0: _seed([90, 90], [80, 80], [95, 95]), 1: _seed([90, 90], [80, 80], [80, 80])}
    fedavg = _by_name(check_targets(runs))["mean client local accuracy: SMSD >= FedAvg"]
    assert fedavg.value == pytest.approx(90.0) and fedavg.threshold == pytest.approx(87.5)
    assert "seed 0 95.00" in fedavg.detail and "seed 1 80.00" in fedavg.detail


def test_missing_rows_and_keys_are_named():
    runs = {0: [r for r in _seed([90], [80], [85]) if r["method"] != "FedAvg"]}
    assert not has_target_rows(runs)
    with pytest.raises(ValueError, match="no 'FedAvg' row"):
        check_targets(runs)
    old = {0: [{k: v for k, v in r.items() if k != "mean_bal_acc"}
               for r in _seed([90], [80], [85])]}
    assert not has_target_rows(old)
    with pytest.raises(ValueError, match="no 'mean_bal_acc'"):
        check_targets(old)
    with pytest.raises(ValueError, match="at least one seed"):
        check_targets({})


def test_load_seed_rows(tmp_path):
    for seed in (2, 0):
        (tmp_path / f"seed-{seed}").mkdir()
        (tmp_path / f"seed-{seed}" / "results.json").write_text(json.dumps(
            {"config": {}, "results": _seed([90], [80], [85])}))
    runs = load_seed_rows(tmp_path)
    assert list(runs) == [0, 2] and has_target_rows(runs)
    with pytest.raises(FileNotFoundError, match=r"no seed-N/results\.json"):
        load_seed_rows(tmp_path / "seed-0")
