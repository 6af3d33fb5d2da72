"""The protocol's commands end to end on a tiny image folder, their errors, and a tiny
``smsd simulate``."""

from __future__ import annotations

import json

import pytest
import torch
from image_files import write_separable_folder

from smsd.cli import main

MODEL_ARGS = ["--img-size", "16", "--patch-size", "4", "--in-chans", "1"]


@pytest.fixture
def folder(tmp_path):
    return write_separable_folder(tmp_path / "data", per_class=6)


def test_encode_pretrain_finetune_evaluate(tmp_path, folder, capsys):
    key, shard = tmp_path / "client.key", tmp_path / "client.safetensors"
    body, model = tmp_path / "body.safetensors", tmp_path / "model.safetensors"
    assert main(["keygen", "--out", str(key)]) == 0
    assert main(["encode", "--data", str(folder), "--key", str(key), "--out", str(shard),
                 *MODEL_ARGS]) == 0
    assert main(["pretrain", "--shards", str(shard), "--out", str(body), "--epochs", "1",
                 "--batch-size", "4", "--out-dim", "32", "--hidden-dim", "16",
                 "--bottleneck-dim", "8", "--warmup-epochs", "0", "--local-keep", "0.25",
                 "0.25", "--no-progress", *MODEL_ARGS]) == 0
    assert (tmp_path / "body.safetensors.work" / "metrics.jsonl").is_file()
    assert main(["finetune", "--body", str(body), "--data", str(folder), "--out", str(model),
                 "--epochs", "10", "--batch-size", "4"]) == 0
    assert main(["evaluate", "--model", str(model), "--data", str(folder)]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_encode_errors_exit_2_and_write_nothing(tmp_path, folder, capsys):
    key, shard = tmp_path / "client.key", tmp_path / "out.safetensors"
    args = ["encode", "--data", str(folder), "--key", str(key), "--out", str(shard), *MODEL_ARGS]
    assert main(args) == 2
    assert f"key file {key} does not exist" in capsys.readouterr().err
    assert main(["keygen", "--out", str(key)]) == 0
    bad = folder / "one" / "broken.png"
    bad.write_bytes(b"not an image")
    assert main(args) == 2
    assert str(bad) in capsys.readouterr().err
    bad.unlink()
    (folder / "two").mkdir()
    assert main(args) == 2
    assert str(folder / "two") in capsys.readouterr().err
    assert not shard.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp leftovers


def test_pretrain_rejects_foreign_shard(tmp_path, folder, capsys):
    key = tmp_path / "k.key"
    main(["keygen", "--out", str(key)])
    shard = tmp_path / "s.safetensors"
    assert main(["encode", "--data", str(folder), "--key", str(key), "--out", str(shard),
                 "--head-seed", "3", *MODEL_ARGS]) == 0
    body = tmp_path / "body.safetensors"
    assert main(["pretrain", "--shards", str(shard), "--out", str(body), "--epochs", "1",
                 "--no-progress", *MODEL_ARGS]) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "different head" in err
    assert not body.exists()


def test_evaluate_rejects_a_body_file(tmp_path, folder, capsys):
    from smsd.models import ViTBody, model_config
    from smsd.protocol import save_body

    path = save_body(tmp_path / "b.safetensors", ViTBody(model_config("demo")),
                     head_fingerprint="")
    assert main(["evaluate", "--model", str(path), "--data", str(folder)]) == 2
    assert "not a smsd classifier file" in capsys.readouterr().err


def test_simulate_quick(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--quick", "--no-progress", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for method in ("SMSD", "fine-tune only", "FedAvg", "centralized"):
        assert method in table
    payload = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in payload["results"]}
    assert rows["SMSD"]["rounds"] == 1 and rows["FedAvg"]["rounds"] == 2
    assert rows["SMSD"]["bytes_up_per_client"] > 0 and rows["fine-tune only"]["rounds"] == 0
    assert all(0 <= r["min_acc"] <= r["mean_acc"] <= 100 for r in rows.values())
    assert (out / "results.csv").read_text().startswith("method,")
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_simulate_seeds_reports_mean_and_std_over_runs(tmp_path, capsys):
    import statistics

    out = tmp_path / "sim"
    assert main(["simulate", "--quick", "--no-progress", "--seeds", "3", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mean ± std over seeds [3, 4]" in printed
    assert "targets over seeds:" in printed
    per_seed = {s: {r["method"]: r for r in json.loads(
        (out / f"seed-{s}" / "results.json").read_text())["results"]} for s in (3, 4)}
    assert per_seed[3]["SMSD"]["client_acc"] != per_seed[4]["SMSD"]["client_acc"] or \
        per_seed[3]["FedAvg"]["client_acc"] != per_seed[4]["FedAvg"]["client_acc"]
    summary = {r["method"]: r for r in json.loads((out / "summary.json").read_text())["results"]}
    for method, row in summary.items():
        accs = [per_seed[s][method]["mean_acc"] for s in (3, 4)]
        assert row["seeds"] == 2
        assert row["mean_acc"] == pytest.approx(statistics.fmean(accs), abs=0.011)
        assert row["mean_acc_std"] == pytest.approx(statistics.stdev(accs), abs=0.011)
    assert (out / "summary.csv").read_text().startswith("method,seeds,")
    assert (out / "summary.png").read_bytes().startswith(b"\x89PNG")
    from smsd.experiments.targets import check_targets, load_seed_rows

    written = json.loads((out / "targets.json").read_text())
    recomputed = [t.to_dict() for t in check_targets(load_seed_rows(out))]
    assert written["targets"] == recomputed and len(recomputed) == 6
    assert written["all_met"] == all(t["met"] for t in recomputed)
    # the docs' tables come from benchmarks/simulate_tables.py on such a folder
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "simulate_tables.py"
    text = subprocess.run([sys.executable, str(script), str(out)], check=True,
                          capture_output=True, text=True).stdout
    assert f"| SMSD | {summary['SMSD']['mean_acc']:.2f} ± " in text
    # a row per method and seed, each seed's label coverage and SMSD - fine-tune only
    assert text.count("| 3 | ") == len(summary) + 2
    assert text.count("| 4 | ") == len(summary) + 2
    assert "Label coverage" in text and "| every seed and client:" in text
    smsd, ft = per_seed[3]["SMSD"]["client_acc"][0], per_seed[3]["fine-tune only"]["client_acc"][0]
    assert f"| 3 | {smsd - ft:+.1f} ± " in text


def test_simulate_seeds_must_be_distinct(tmp_path, capsys):
    assert main(["simulate", "--quick", "--no-progress", "--seeds", "1", "1",
                 "--out", str(tmp_path)]) == 2
    assert "seeds must be distinct" in capsys.readouterr().err


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_finetune_with_augmentation_sees_fresh_images_every_epoch(tmp_path, folder, loader,
                                                                  monkeypatch):
    """``Client.finetune(augment=...)`` embeds a new augmented pass of the images each
    epoch (the loader's fine-tuning pipeline), and still learns the task."""
    from smsd.data import ImageSource, loader_statuses, make_loader
    from smsd.models import ViTBody, model_config
    from smsd.protocol import Client, FinetuneConfig

    dali = loader_statuses()["dali"]
    if loader == "dali" and not dali.available:
        pytest.skip(f"DALI unavailable: {dali.detail}")
    config = model_config("demo").replace(img_size=16)
    source = ImageSource.from_folder(folder)
    clean = make_loader(source, img_size=16, in_chans=1, loader=loader)
    augment = make_loader(source, img_size=16, in_chans=1, mode="finetune", loader=loader,
                          batch_size=4, seed=1)
    client = Client(config, None)
    passes = []
    original = Client._loader_tokens

    def spy(self, it, *rest):
        out = original(self, it, *rest)
        if it is augment:
            passes.append(out)
        return out

    monkeypatch.setattr(Client, "_loader_tokens", spy)
    torch.manual_seed(0)
    metrics = client.finetune(ViTBody(config), clean, num_classes=2, augment=augment,
                              config=FinetuneConfig(epochs=12, batch_size=4, lr=3e-3))
    assert len(passes) == 12
    tokens_by_epoch = [t[i.argsort()] for t, _, i in passes]  # back to source order
    assert not torch.allclose(tokens_by_epoch[0], tokens_by_epoch[1])
    assert all(torch.equal(lab[i.argsort()], passes[0][1][passes[0][2].argsort()])
               for _, lab, i in passes)
    assert metrics["train_accuracy"] >= 0.9


def test_train_classifier_rejects_epoch_data_of_another_size():
    from smsd.models import ClassifierTail, ViTBody, model_config
    from smsd.protocol.training import FinetuneConfig, TokenClassifier, train_classifier

    config = model_config("demo")
    model = TokenClassifier(ViTBody(config), ClassifierTail(config.embed_dim, 2))
    tokens = torch.randn(6, config.n_tokens, config.embed_dim)
    labels = torch.tensor([0, 1] * 3)
    with pytest.raises(ValueError, match=r"epoch_data\(0\) gave 5 images"):
        train_classifier(model, tokens, labels, FinetuneConfig(epochs=1),
                         epoch_data=lambda e: (tokens[:5], labels[:5]))


def _random_body_file(tmp_path):
    """A body file of the demo model at 16×16 with random weights (no pre-training)."""
    from smsd.models import PatchHead, ViTBody, head_fingerprint, model_config
    from smsd.protocol import save_body

    config = model_config("demo").replace(img_size=16)
    return save_body(tmp_path / "b.safetensors", ViTBody(config),
                     head_fingerprint=head_fingerprint(PatchHead(config)))


def test_cli_finetune_augment(tmp_path, folder, capsys):
    body, model = _random_body_file(tmp_path), tmp_path / "m.safetensors"
    assert main(["finetune", "--body", str(body), "--data", str(folder), "--out", str(model),
                 "--epochs", "2", "--batch-size", "4", "--augment", "--loader", "torch"]) == 0
    assert model.is_file() and "train accuracy" in capsys.readouterr().out


def test_cli_finetune_select_reports_each_candidate_and_the_pick(tmp_path, folder, capsys):
    from smsd.protocol.recipe_selection import RETURNED_BODY_CANDIDATES

    body, model = _random_body_file(tmp_path), tmp_path / "m.safetensors"
    assert main(["finetune", "--body", str(body), "--data", str(folder), "--out", str(model),
                 "--epochs", "3", "--batch-size", "4", "--select", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert model.is_file()
    # 6 images per class, a fifth of each class held out: 1 + 1
    assert "held out 2 labeled images" in out
    # every candidate, declining the body for the client's own random one included
    assert all(c.name + ":" in out for c in RETURNED_BODY_CANDIDATES)
    assert out.count("<- picked") == 1
    declined = "own random body: accuracy" in out.split("<- picked")[0].splitlines()[-1]
    assert ("the returned body was declined" in out) is declined


@pytest.mark.parametrize("flag", ("--augment", "--freeze-body"))
def test_cli_finetune_select_refuses_a_conflicting_flag(tmp_path, folder, capsys, flag):
    model = tmp_path / "m.safetensors"
    code = main(["finetune", "--body", str(tmp_path / "missing.safetensors"), "--data",
                 str(folder), "--out", str(model), "--select", flag])
    assert code == 2 and not model.exists()
    assert "--select cannot be combined with " + flag in capsys.readouterr().err
