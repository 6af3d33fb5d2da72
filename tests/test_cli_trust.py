"""The CLI a hospital ML engineer can trust (issue 20): every bad input is one line and exit
2 before any work, reruns never wipe work, resume checks the data's identity, the
defaults are the measured recipe, help shows defaults and examples, errors name flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from image_files import write_separable_folder

from smsd.cli import build_parser, in_flag_terms, main
from smsd.protocol.training_watch import CollapseWatch, warmup_warning
from smsd.recipe import Recipe, scale_to_data

MODEL = ["--img-size", "16", "--patch-size", "4", "--in-chans", "1"]
TINY = ["--batch-size", "4", "--out-dim", "32", "--hidden-dim", "16", "--bottleneck-dim", "8",
        "--local-keep", "0.25", "0.25", "--no-progress", *MODEL]


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def folder(tmp_path):
    return write_separable_folder(tmp_path / "data", per_class=6)


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "site.key"
    assert main(["keygen", "--out", str(path)]) == 0
    return path


@pytest.fixture
def shard(tmp_path, folder, key):
    path = tmp_path / "site.safetensors"
    assert main(["encode", "--data", str(folder), "--key", str(key), "--out", str(path),
                 "--loader", "torch", "--no-progress", *MODEL]) == 0
    return path


def _pretrain(shard, body, *extra):
    return main(["pretrain", "--shards", str(shard), "--out", str(body), "--epochs", "2",
                 "--warmup-epochs", "0", *TINY, *extra])


# ----------------------------------------------------------- output paths
def test_encode_into_a_missing_folder_is_one_line(tmp_path, folder, key, capsys):
    out = tmp_path / "no" / "such" / "dir" / "o.safetensors"
    assert main(["encode", "--data", str(folder), "--key", str(key), "--out", str(out),
                 *MODEL]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "does not exist")
    assert not (tmp_path / "no").exists()


def test_finetune_checks_its_output_before_training(tmp_path, folder, shard, monkeypatch,
                                                    capsys):
    from smsd.protocol.client import Client

    body = tmp_path / "body.safetensors"
    assert _pretrain(shard, body) == 0
    trained = []
    monkeypatch.setattr(Client, "finetune", lambda *a, **k: trained.append(1))
    out = tmp_path / "no" / "where" / "m.safetensors"
    assert main(["finetune", "--body", str(body), "--data", str(folder), "--out", str(out),
                 "--loader", "torch"]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "does not exist")
    assert not trained


@pytest.mark.parametrize("device, message", [
    ("gpu", "--device must be auto, cpu, cuda or cuda:N"),
    ("cuda:7", "--device cuda:7"),
])
def test_pretrain_refuses_a_bad_or_absent_device_before_any_work(tmp_path, shard, device,
                                                                 message, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    body = tmp_path / "b.safetensors"
    assert _pretrain(shard, body, "--device", device) == 2
    _one_error_line(capsys.readouterr().err, message)
    assert not body.exists() and not Path(f"{body}.work").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_only_machine_is_one_clear_line(tmp_path, shard, capsys):
    body = tmp_path / "b.safetensors"
    assert _pretrain(shard, body, "--device", "cuda") == 2
    _one_error_line(capsys.readouterr().err, "--device cuda", "no CUDA device is visible")
    assert not Path(f"{body}.work").exists()


def test_auto_device_is_the_default_and_resolves(tmp_path):
    from smsd.cli.common import resolve_device

    args = build_parser().parse_args(["pretrain", "--shards", "s", "--out", "b"])
    assert args.device == "auto"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


# ------------------------------------------------------------------ reruns
def test_encode_never_overwrites_a_shard_without_force(tmp_path, folder, key, shard, capsys):
    before = shard.read_bytes()
    args = ["encode", "--data", str(folder), "--key", str(key), "--out", str(shard),
            "--loader", "torch", "--no-progress", *MODEL]
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, str(shard), "--force")
    assert shard.read_bytes() == before
    assert main([*args, "--force"]) == 0


def test_pretrain_rerun_is_refused_and_overwrite_starts_one_history(tmp_path, shard, capsys):
    body = tmp_path / "b.safetensors"
    work = Path(f"{body}.work")
    assert _pretrain(shard, body) == 0
    first = safetensors.torch.load_file(body)
    capsys.readouterr()
    assert _pretrain(shard, body) == 2  # the body exists
    _one_error_line(capsys.readouterr().err, str(body), "--overwrite")
    body.unlink()  # a run whose body was moved away: its work folder still refuses
    assert _pretrain(shard, body) == 2
    _one_error_line(capsys.readouterr().err, str(work), "--resume", "--overwrite")
    assert _pretrain(shard, body, "--overwrite") == 0
    epochs = [json.loads(line)["epoch"] for line in (work / "metrics.jsonl").open()]
    assert epochs == [0, 1], "metrics.jsonl must hold one history"
    again = safetensors.torch.load_file(body)  # the same seeded run again
    assert all(torch.equal(first[k], again[k]) for k in first) and first.keys() == again.keys()


def test_resume_and_overwrite_exclude_each_other(tmp_path, shard, capsys):
    with pytest.raises(SystemExit) as exit_:
        _pretrain(shard, tmp_path / "b.safetensors", "--resume", "--overwrite")
    assert exit_.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_finetune_never_overwrites_a_model_without_force(tmp_path, folder, shard, capsys):
    body, model = tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    assert _pretrain(shard, body) == 0
    model.write_bytes(b"earlier work")
    args = ["finetune", "--body", str(body), "--data", str(folder), "--out", str(model),
            "--epochs", "1", "--loader", "torch", "--no-progress"]
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, str(model), "--force")
    assert model.read_bytes() == b"earlier work"
    assert main([*args, "--force"]) == 0 and model.read_bytes() != b"earlier work"


# ------------------------------------------------------------------ resume
def test_resume_with_other_data_of_the_same_size_is_refused(tmp_path, folder, shard, capsys):
    other_key, other = tmp_path / "other.key", tmp_path / "other.safetensors"
    assert main(["keygen", "--out", str(other_key)]) == 0
    assert main(["encode", "--data", str(folder), "--key", str(other_key), "--out", str(other),
                 "--loader", "torch", "--no-progress", *MODEL]) == 0
    body = tmp_path / "b.safetensors"
    assert _pretrain(shard, body) == 0
    capsys.readouterr()
    # Same image count, same header; another key: other tokens.
    assert _pretrain(other, body, "--resume") == 2
    _one_error_line(capsys.readouterr().err, "other.safetensors", "differs")
    assert _pretrain(shard, body, "--resume") == 0  # the same shard resumes


def test_a_checkpoint_without_shard_digests_cannot_be_resumed(tmp_path):
    from smsd.protocol.run_state import PretrainError, ShardRecord, _check_shards

    with pytest.raises(PretrainError, match="no shard digests"):
        _check_shards(tmp_path / "checkpoint-1.safetensors", None, [ShardRecord("s", "0")])
    with pytest.raises(PretrainError, match="2 shard"):
        _check_shards(tmp_path / "c", [{"name": "a", "sha256": "0"}] * 2,
                      [ShardRecord("a", "0")])


# ------------------------------------------------------------------ recipe
def test_cli_defaults_are_the_measured_recipe():
    parser = build_parser()
    pre = parser.parse_args(["pretrain", "--shards", "s", "--out", "b"])
    from smsd.cli.protocol import pretrain_config

    # On the digits the simulated server holds, the by-hand run is simulate's run.
    assert pretrain_config(pre, 1437) == Recipe().pretrain
    ft = parser.parse_args(["finetune", "--body", "b", "--data", "d"])
    recipe = Recipe().smsd_finetune
    assert (ft.epochs, ft.lr, ft.batch_size, ft.body_lr_scale) == (
        recipe.epochs, recipe.lr, recipe.batch_size, recipe.body_lr_scale)


def test_dp_turns_koleo_off_unless_asked():
    pytest.importorskip("dp_accounting")
    from smsd.cli.protocol import pretrain_config

    args = build_parser().parse_args(["pretrain", "--shards", "s", "--out", "b",
                                      "--dp-noise-multiplier", "1.0"])
    assert pretrain_config(args, 1437).koleo_weight == 0


def test_schedule_scales_with_the_data():
    base = Recipe().pretrain
    assert scale_to_data(base, 1437) == base  # what it was tuned on
    small, large = scale_to_data(base, 200), scale_to_data(base, 200_000)
    assert small.epochs > base.epochs and large.epochs < base.epochs
    assert large.epochs >= 10 and large.momentum_teacher > base.momentum_teacher
    assert small.warmup_epochs < small.epochs and small.momentum_teacher == 0.99
    fixed = scale_to_data(base, 1437, epochs=90)
    assert (fixed.epochs, fixed.warmup_epochs) == (90, 6)
    with pytest.raises(ValueError, match="n_images"):
        scale_to_data(base, 0)


def test_simulate_uses_the_same_scaled_recipe():
    from smsd.cli.simulate import _config

    args = build_parser().parse_args(["simulate"])
    cfg = _config(args)
    assert cfg.recipe.scale_pretrain and cfg.recipe.pretrain_for(1437) == Recipe().pretrain
    fixed = _config(build_parser().parse_args(["simulate", "--pretrain-epochs", "7"]))
    assert fixed.recipe.pretrain_for(1437).epochs == 7


# ----------------------------------------------------------- warnings
def test_collapse_to_uniform_is_seen_after_the_warm_up():
    k = 1024
    watch = CollapseWatch(k, patience=5, after_step=10)
    flat = math.log(k) - 0.01
    assert all(watch.update(step, flat) is None for step in range(10))  # warm-up: quiet
    alarms = [watch.update(step, flat) for step in range(10, 20)]
    assert alarms[:4] == [None] * 4 and "collapsed to uniform" in alarms[4]
    assert "--teacher-temp" in alarms[4] and alarms[5:] == [None] * 5  # once


def test_a_learning_run_or_a_short_dip_raises_nothing():
    watch = CollapseWatch(1024, patience=5)
    losses = [6.9, 6.9, 6.9, 6.9, 5.0, 6.9, 6.9, 6.9, 6.9] + [4.0 - 0.1 * i for i in range(30)]
    assert all(watch.update(i, x) is None for i, x in enumerate(losses))
    one_hot = CollapseWatch(1024, patience=3)
    assert [one_hot.update(i, 0.0) for i in range(3)][-1].startswith("the loss has sat near 0")


def test_warm_up_warning():
    assert warmup_warning(Recipe().pretrain) is None
    from dataclasses import replace

    text = warmup_warning(replace(Recipe().pretrain, epochs=2, warmup_epochs=10))
    assert "--epochs 2" in text and "--warmup-epochs 10" in text


def test_pretrain_warns_once_when_the_loss_sits_at_ln_k(tmp_path, shard, monkeypatch,
                                                         capsys):
    from smsd.protocol.distill import DistillStep

    # A step whose loss is that of a uniform student and teacher: ln K, every step.
    monkeypatch.setattr(DistillStep, "__call__",
                        lambda self, x, index, schedule: torch.tensor(math.log(32.0)))
    body = tmp_path / "b.safetensors"
    assert main(["pretrain", "--shards", str(shard), "--out", str(body), "--epochs", "30",
                 "--warmup-epochs", "2", *TINY]) == 0  # 3 steps an epoch: 20 after warm-up
    err = capsys.readouterr().err
    assert err.count("collapsed to uniform") == 1
    assert "ln(32) = 3.466 for 20 steps" in err and "--teacher-temp 0.02" in err


# ----------------------------------------------------------------- help
def _subparsers():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


@pytest.mark.parametrize("name", sorted(_subparsers()))
def test_every_option_has_help_and_the_command_an_example(name):
    command = _subparsers()[name]
    for action in command._actions:
        assert action.help, f"smsd {name} {action.option_strings or action.dest} has no help"
    assert command.epilog and command.epilog.startswith("examples:\n  smsd "), name
    text = command.format_help()
    assert "examples:" in text


def test_help_shows_defaults():
    text = " ".join(_subparsers()["pretrain"].format_help().split())
    assert "(default: 64)" in text and "(default: auto)" in text and "(default: 0.02)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    text = " ".join(_subparsers()["finetune"].format_help().split())
    assert f"(default: {Recipe().smsd_finetune.epochs})" in text


@pytest.mark.parametrize("argv, flag", [
    (["bench", "--budget", "-1"], "--budget"),
    (["pretrain", "--shards", "s", "--out", "b", "--epochs", "0"], "--epochs"),
    (["pretrain", "--shards", "s", "--out", "b", "--lr", "-1"], "--lr"),
    (["simulate", "--clients", "0"], "--clients"),
    (["simulate", "--labeled-fraction", "1.5"], "--labeled-fraction"),
    (["encode", "--data", "d", "--key", "k", "--out", "o", "--noise-std", "nan"], "--noise-std"),
])
def test_bad_numbers_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_library_errors_are_told_in_flag_terms():
    command = _subparsers()["simulate"]
    text = in_flag_terms("1797 samples cannot give 500 clients 10 samples each: lower "
                         "n_clients (500)", command)
    assert text.endswith("lower --clients (500)")
    pre = _subparsers()["pretrain"]
    assert in_flag_terms("batch_size must be a positive int", pre).startswith("--batch-size")
    assert in_flag_terms("lr must be positive", pre) == "--lr must be positive"
    assert in_flag_terms("a pretrained body", pre) == "a pretrained body"  # words stay
    in_a_path = "no/x.epochs: missing; a/batch_size.json must"
    assert in_flag_terms(in_a_path, pre) == in_a_path


def test_interrupt_is_on_its_own_line_and_says_how_to_resume(tmp_path, shard, monkeypatch,
                                                             capsys):
    from smsd.protocol.server import Server

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Server, "pretrain", interrupted)
    assert _pretrain(shard, tmp_path / "b.safetensors") == 130
    err = capsys.readouterr().err
    assert "\nsmsd pretrain: interrupted; continue it with the same command and --resume" in err


# ----------------------------------------------------------------- data
def test_finetune_refuses_one_class(tmp_path, shard, capsys):
    body = tmp_path / "b.safetensors"
    assert _pretrain(shard, body) == 0
    one = write_separable_folder(tmp_path / "one", per_class=3)
    for image in (one / "one").iterdir():
        image.unlink()
    (one / "one").rmdir()
    out = tmp_path / "m.safetensors"
    assert main(["finetune", "--body", str(body), "--data", str(one), "--out", str(out),
                 "--loader", "torch"]) == 2
    _one_error_line(capsys.readouterr().err, "one class (zero)", "two class folders")
    assert not out.exists()


def test_encode_reports_what_it_skipped(tmp_path, folder, key, caplog):
    (folder / "notes.txt").write_text("not data")
    (folder / "one" / "README.md").write_text("not an image")
    (folder / "one" / "nested").mkdir()
    (folder / "one" / "nested" / "0.png").write_bytes((folder / "one" / "0.png").read_bytes())
    out = tmp_path / "s.safetensors"
    with caplog.at_level("INFO", logger="smsd"):
        assert main(["encode", "--data", str(folder), "--key", str(key), "--out", str(out),
                     "--loader", "torch", "--no-progress", *MODEL]) == 0
    text = caplog.text
    assert "12 images in 2 classes (one 6, zero 6)" in text
    assert "skipped 3 file(s)" in text and "nested folder" in text
    assert "not an image suffix" in text and "not in a class folder" in text


def test_default_outputs_are_named_with_their_full_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--device", "cpu", "--size", "quick", "--budget", "0.01",
                 "--ops", "masked_sample"]) == 0
    out = capsys.readouterr().out
    assert f"# wrote {tmp_path / 'benchmarks' / 'results'}" in out
