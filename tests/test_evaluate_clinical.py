"""``smsd evaluate``'s clinical metrics: the library against scikit-learn on known
predictions, and the command on small PNG folders (two classes, three, a class missing),
its JSON, plots, progress bar and bad paths."""

from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics

from smsd.cli import main
from smsd.data import ImageSource, collect, make_loader
from smsd.errors import SmsdError
from smsd.models import ClassifierTail, ViTBody, model_config
from smsd.protocol.classifier_io import save_classifier
from smsd.protocol.client import Client
from smsd.protocol.clinical import evaluate_predictions, resolve_positive
from smsd.protocol.evaluate import evaluate_model_file
from smsd.protocol.training import TokenClassifier, accuracy

CONFIG = model_config("demo").replace(img_size=16, patch_size=4, in_chans=1)
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- fixtures
def write_pngs(root, counts: dict[str, int], seed: int = 0):
    """16×16 gray PNGs, class ``i`` around brightness 70 + 50 i, overlapping a little."""
    rng = np.random.default_rng(seed)
    for i, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for j in range(n):
            pixels = rng.normal(70 + 50 * i + rng.normal(0, 25), 15, (16, 16))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                root / name / f"{j}.png")
    return root


def tokens_and_labels(folder):
    source = ImageSource.from_folder(folder)
    batch = collect(make_loader(source, img_size=16, in_chans=1, loader="torch"))
    return Client(CONFIG, None).tokens(batch.images), batch.labels, list(source.classes)


def write_model(path, folder, steps: int = 40):
    """A classifier on ``folder``'s classes, its tail briefly trained (full batch, seeded)."""
    tokens, labels, classes = tokens_and_labels(folder)
    torch.manual_seed(0)
    model = TokenClassifier(ViTBody(CONFIG), ClassifierTail(CONFIG.embed_dim, len(classes)))
    optimizer = torch.optim.Adam(model.tail.parameters(), lr=3e-2)
    with torch.no_grad():
        features = model.body(tokens)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model.tail(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_classifier(path, model.eval(), classes=classes,
                           head_fingerprint=Client(CONFIG, None).fingerprint)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("clinical")
    two = write_pngs(root / "two", {"benign": 7, "malignant": 5})
    three = write_pngs(root / "three", {"a": 4, "b": 3, "c": 3}, seed=1)
    return {"two": two, "three": three, "model2": write_model(root / "m2.safetensors", two),
            "model3": write_model(root / "m3.safetensors", three)}


def evaluate(*args: str) -> list[str]:
    return ["evaluate", *args, "--loader", "torch"]


# ------------------------------------------------------- library vs sklearn
Y3 = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
P3 = np.array([[.7, .2, .1], [.4, .5, .1], [.6, .3, .1], [.2, .7, .1], [.3, .3, .4],
               [.1, .1, .8], [.2, .2, .6], [.5, .1, .4], [.1, .3, .6], [.1, .8, .1]])


def test_three_classes_match_sklearn():
    ev = evaluate_predictions(Y3, P3, ["a", "b", "c"])
    pred = P3.argmax(1)
    p, r, f, s = metrics.precision_recall_fscore_support(Y3, pred)
    assert [c.precision for c in ev.per_class] == pytest.approx(p)
    assert [c.recall for c in ev.per_class] == pytest.approx(r)
    assert [c.f1 for c in ev.per_class] == pytest.approx(f)
    assert [c.support for c in ev.per_class] == list(s) == [3, 3, 4]
    assert ev.accuracy == pytest.approx(0.7) == metrics.accuracy_score(Y3, pred)
    assert ev.balanced_accuracy == pytest.approx(metrics.balanced_accuracy_score(Y3, pred))
    macro = metrics.precision_recall_fscore_support(Y3, pred, average="macro")
    assert (ev.macro.precision, ev.macro.recall, ev.macro.f1) == pytest.approx(macro[:3])
    weighted = metrics.precision_recall_fscore_support(Y3, pred, average="weighted")
    assert (ev.weighted.precision, ev.weighted.recall, ev.weighted.f1) == \
        pytest.approx(weighted[:3])
    assert ev.confusion == ((2, 1, 0), (0, 2, 1), (1, 0, 3))
    assert ev.binary is None and ev.absent == () and ev.images == 10
    assert json.loads(json.dumps(ev.to_dict(), allow_nan=False))["binary"] is None


def test_two_classes_sensitivity_specificity_auc():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 1])
    p1 = np.array([.1, .4, .35, .8, .9, .6, .3, .2, .7, .55])
    ev = evaluate_predictions(y, np.stack([1 - p1, p1], 1), ["healthy", "sick"],
                              positive="sick")
    b = ev.binary
    pred = (p1 > 0.5).astype(int)
    assert (b.positive, b.negative, b.positive_is_default) == ("sick", "healthy", False)
    assert b.sensitivity == pytest.approx(metrics.recall_score(y, pred)) == 0.8
    assert b.specificity == pytest.approx(metrics.recall_score(y, pred, pos_label=0)) == 0.8
    assert b.ppv == pytest.approx(metrics.precision_score(y, pred))
    assert b.npv == pytest.approx(metrics.precision_score(y, pred, pos_label=0))
    assert b.roc_auc == pytest.approx(metrics.roc_auc_score(y, p1)) == 0.76
    fpr, tpr, _ = metrics.roc_curve(y, p1)
    assert b.roc.fpr == pytest.approx(fpr) and b.roc.tpr == pytest.approx(tpr)
    # The other class as positive: sensitivity and specificity swap, AUC is the same.
    flipped = evaluate_predictions(y, np.stack([1 - p1, p1], 1), ["healthy", "sick"],
                                   positive="healthy").binary
    assert (flipped.sensitivity, flipped.specificity) == (b.specificity, b.sensitivity)
    assert flipped.roc_auc == pytest.approx(b.roc_auc)


def test_missing_class_keeps_its_row_and_auc_is_undefined_with_one_class():
    ev = evaluate_predictions([0, 0, 2, 2], [[.9, .1, 0], [.2, .7, .1], [0, .1, .9],
                                             [.1, .2, .7]], ["a", "b", "c"])
    b_row = ev.per_class[1]
    assert ev.absent == ("b",) and b_row.support == 0 and math.isnan(b_row.recall)
    assert b_row.precision == 0.0  # predicted once, never right
    assert ev.confusion[1] == (0, 0, 0) and ev.balanced_accuracy == pytest.approx(0.75)
    assert ev.macro.recall == pytest.approx(0.75)  # b's undefined recall left out
    d = ev.to_dict()
    assert d["per_class"]["b"]["recall"] is None and d["absent_classes"] == ["b"]
    one = evaluate_predictions([1, 1, 1], [[.2, .8], [.6, .4], [.1, .9]], ["neg", "pos"])
    b = one.binary
    assert b.positive == "pos" and b.positive_is_default
    assert math.isnan(b.roc_auc) and b.roc is None and "only pos images" in b.note
    assert b.sensitivity == pytest.approx(2 / 3) and math.isnan(b.specificity)
    assert one.to_dict()["binary"]["roc_auc"] is None


def test_positive_class_rules():
    assert resolve_positive(["malignant", "benign"], None) == "malignant"
    assert resolve_positive(["1", "0"], None) == "1"
    assert resolve_positive(["a", "b", "c"], None) is None
    with pytest.raises(SmsdError, match="one of the model's classes"):
        resolve_positive(["a", "b"], "c")
    with pytest.raises(SmsdError, match="needs a two-class model"):
        resolve_positive(["a", "b", "c"], "a")
    with pytest.raises(ValueError, match="probabilities"):
        evaluate_predictions([0, 1], [[1.0, 0.0]], ["a", "b"])


def test_model_file_keeps_accuracy_and_images(site):
    ev = evaluate_model_file(site["model2"], site["two"], loader="torch")
    tokens, labels, _ = tokens_and_labels(site["two"])
    from smsd.protocol.classifier_io import load_classifier

    model = load_classifier(site["model2"])[0]
    assert ev.accuracy == pytest.approx(accuracy(model, tokens, labels)) and ev.images == 12
    with torch.no_grad():
        p = torch.softmax(model(tokens).double(), -1)[:, 1].numpy()
    assert ev.binary.roc_auc == pytest.approx(metrics.roc_auc_score(labels.numpy(), p))


# ------------------------------------------------------------------ the CLI
def test_cli_two_classes(site, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(evaluate("--model", str(site["model2"]), "--data", str(site["two"]),
                         "--json", str(out), "--plots", str(tmp_path / "plots"))) == 0
    text = capsys.readouterr().out
    for needle in ("precision", "recall", "f1", "support", "benign", "macro avg",
                   "balanced accuracy", "positive class: malignant (default: the second "
                   "class in sorted order)", "sensitivity (recall of malignant)",
                   "specificity (recall of benign)", "ROC-AUC", "confusion matrix"):
        assert needle in text, needle
    data = json.loads(out.read_text())
    lib = evaluate_model_file(site["model2"], site["two"], loader="torch").to_dict()
    assert data == {"format": "smsd-evaluation", "version": 1, "model": str(site["model2"]),
                    "data": str(site["two"]), **lib}
    assert data["binary"]["positive"] == "malignant" and data["images"] == 12
    assert sum(map(sum, data["confusion_matrix"]["matrix"])) == 12
    assert 0 <= data["binary"]["roc_auc"] <= 1 and data["binary"]["roc_curve"]["fpr"][0] == 0
    assert f"{data['accuracy']:.3f}" in text and f"{data['binary']['roc_auc']:.3f}" in text
    plots = sorted((tmp_path / "plots").iterdir())
    assert [p.name for p in plots] == ["confusion_matrix.png", "roc_curve.png"]
    assert all(p.read_bytes()[:8] == PNG for p in plots)


def test_cli_three_classes_has_no_binary_block(site, tmp_path, capsys):
    assert main(evaluate("--model", str(site["model3"]), "--data", str(site["three"]),
                         "--json", "-", "--plots", str(tmp_path / "p"))) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # stdout: the JSON only
    assert data["binary"] is None and list(data["per_class"]) == ["a", "b", "c"]
    assert "confusion matrix" in captured.err and "b  " in captured.err
    for absent in ("sensitivity", "specificity", "ROC-AUC"):
        assert absent not in captured.err
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["confusion_matrix.png"]


def test_cli_data_missing_classes(site, tmp_path, capsys):
    shutil.copytree(site["three"] / "a", tmp_path / "d" / "a")
    assert main(evaluate("--model", str(site["model3"]), "--data", str(tmp_path / "d"))) == 0
    text = capsys.readouterr().out
    assert "n/a: undefined, left out of the averages (no recall for b, c: no images in the " \
        "data; no precision for b, c: never predicted)" in text
    shutil.copytree(site["two"] / "benign", tmp_path / "e" / "benign")
    assert main(evaluate("--model", str(site["model2"]), "--data", str(tmp_path / "e"),
                         "--plots", str(tmp_path / "p"), "--positive", "benign")) == 0
    text = capsys.readouterr().out
    assert "ROC-AUC is undefined: the data has only benign images" in text
    assert "no roc_curve.png: ROC-AUC is undefined" in text and "(default" not in text
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["confusion_matrix.png"]


@pytest.mark.parametrize(("model", "extra", "needle"), [
    ("model2", ["--json", "{tmp}/no/such/eval.json"], "--json {tmp}/no/such/eval.json: the folder"),
    ("model2", ["--plots", "{model}"], "--plots {model}: exists and is not a folder"),
    ("model2", ["--positive", "cyst"], "--positive must be one of the model's classes"),
    ("model3", ["--positive", "a"], "--positive: 'a' was given, but a positive class"),
])
def test_cli_bad_options_fail_before_reading_images(site, tmp_path, capsys, monkeypatch, model,
                                                    extra, needle):
    monkeypatch.setattr(ImageSource, "from_folder", lambda *a: pytest.fail("images read"))
    fill = {"tmp": tmp_path, "model": site[model]}
    assert main(evaluate("--model", str(site[model]), "--data", str(site["two"]),
                         *(a.format(**fill) for a in extra))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("smsd evaluate: error:")
    assert needle.format(**fill) in err[0], err[0]


@pytest.mark.parametrize(("module", "needle"), [("matplotlib", "--plots needs matplotlib"),
                                              ("sklearn", "smsd evaluate needs sklearn")])
def test_cli_without_an_extra_fails_first(site, tmp_path, capsys, monkeypatch, module, needle):
    import smsd.extras

    real = smsd.extras.available
    monkeypatch.setattr(smsd.extras, "available", lambda m: m != module and real(m))
    assert main(evaluate("--model", str(tmp_path / "missing"), "--data", str(site["two"]),
                         "--plots", str(tmp_path / "p"))) == 2
    err = capsys.readouterr().err
    assert needle in err and "pip install 'smsd[data]'" in err
    assert not (tmp_path / "p").exists()


def test_cli_progress_bar_only_on_a_terminal(site, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    args = evaluate("--model", str(site["model2"]), "--data", str(site["two"]))
    for extra, shown in (([], True), (["--no-progress"], False)):
        fake = Terminal()
        monkeypatch.setattr("sys.stderr", fake)
        assert main([*args, *extra]) == 0
        assert ("evaluate: 100%" in fake.getvalue()) == shown, fake.getvalue()
    monkeypatch.undo()
    assert main(args) == 0
    assert "evaluate:" not in capsys.readouterr().err  # stderr not a terminal: quiet


def test_cli_help_shows_defaults_and_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "(default: auto)" in text and "--positive CLASS" in text
    assert "smsd evaluate --model model.safetensors --data test/ --json eval.json " \
        "--plots eval-plots" in text


def test_cli_knn_and_linear_probes(site, tmp_path, capsys):
    """--knn DIR: the body's frozen CLS features, DIR votes; the numbers match the probes
    computed by hand on the same features."""
    from smsd.protocol.classifier_io import load_classifier
    from smsd.protocol.probes import knn_accuracy, linear_probe_accuracy

    reference = write_pngs(tmp_path / "ref", {"benign": 9, "malignant": 8}, seed=5)
    out = tmp_path / "eval.json"
    assert main(evaluate("--model", str(site["model2"]), "--data", str(site["two"]),
                         "--knn", str(reference), "--linear", "--json", str(out))) == 0
    text = capsys.readouterr().out
    probes = json.loads(out.read_text())["probes"]
    assert probes["reference"] == str(reference) and probes["reference_images"] == 17
    assert probes["knn"]["k"] == 20 and probes["knn"]["temperature"] == 0.07
    model = load_classifier(site["model2"])[0]
    feats = {}
    for name, folder in (("ref", reference), ("data", site["two"])):
        tokens, labels, _ = tokens_and_labels(folder)
        with torch.no_grad():
            feats[name] = (model.body.eval()(tokens), labels)
    want_knn = knn_accuracy(*feats["ref"], *feats["data"])
    want_lin = linear_probe_accuracy(*feats["ref"], *feats["data"])
    assert probes["knn"]["accuracy"] == pytest.approx(100 * want_knn, abs=0.01)
    assert probes["linear"]["accuracy"] == pytest.approx(100 * want_lin, abs=0.01)
    assert f"k-NN {probes['knn']['accuracy']:.2f} %" in text


def test_cli_linear_needs_knn_and_a_bad_reference_fails_first(site, tmp_path, capsys,
                                                              monkeypatch):
    import smsd.protocol.evaluate as ev

    def never(*a, **k):
        raise AssertionError("images were read")

    monkeypatch.setattr(ev, "evaluate_model_file", never)
    assert main(evaluate("--model", str(site["model2"]), "--data", str(site["two"]),
                         "--linear")) != 0
    assert "--linear needs --knn" in capsys.readouterr().err
    assert main(evaluate("--model", str(site["model2"]), "--data", str(site["two"]),
                         "--knn", str(tmp_path / "missing"))) != 0
    assert "missing" in capsys.readouterr().err
