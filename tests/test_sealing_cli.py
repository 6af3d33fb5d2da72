"""The protocol through the CLI with sealed files, and every bad sealed input: one line
naming the file, exit 2, nothing written."""

from __future__ import annotations

import os

import pytest
from image_files import write_separable_folder

from smsd.cli import main

MODEL_ARGS = ["--img-size", "16", "--patch-size", "4", "--in-chans", "1"]
PRETRAIN_ARGS = ["--epochs", "1", "--batch-size", "4", "--out-dim", "32", "--hidden-dim", "16",
                 "--bottleneck-dim", "8", "--warmup-epochs", "0", "--local-keep", "0.25",
                 "0.25", "--no-progress", *MODEL_ARGS]


@pytest.fixture
def site(tmp_path):
    folder = write_separable_folder(tmp_path / "data", per_class=6)
    assert main(["keygen", "--out", str(tmp_path / "client.key")]) == 0
    for who in ("server", "site"):
        assert main(["keygen", "--recipient", "--out", str(tmp_path / who)]) == 0
    shard = tmp_path / "shard.sealed"
    assert main(["encode", "--data", str(folder), "--key", str(tmp_path / "client.key"),
                 "--out", str(shard), "--seal-to", str(tmp_path / "server.pub"),
                 *MODEL_ARGS]) == 0
    return tmp_path, folder, shard


def _one_error_line(capsys, *needles: str) -> None:
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    assert "Traceback" not in err[0]


def test_sealed_protocol_end_to_end(site, capsys):
    tmp, folder, shard = site
    body, model = tmp / "body.sealed", tmp / "model.safetensors"
    assert main(["pretrain", "--shards", str(shard), "--unseal-key", str(tmp / "server.key"),
                 "--out", str(body), "--seal-to", str(tmp / "site.pub"), *PRETRAIN_ARGS]) == 0
    assert body.read_bytes().startswith(b"SMSDSEAL")
    assert main(["finetune", "--body", str(body), "--unseal-key", str(tmp / "site.key"),
                 "--data", str(folder), "--out", str(model), "--epochs", "2",
                 "--batch-size", "4"]) == 0
    assert main(["evaluate", "--model", str(model), "--data", str(folder)]) == 0


def test_keygen_recipient_refuses_to_overwrite(site, capsys):
    tmp, _, _ = site
    before = (tmp / "server.key").read_bytes()
    assert main(["keygen", "--recipient", "--out", str(tmp / "server")]) == 2
    _one_error_line(capsys, "server", "--force")
    assert (tmp / "server.key").read_bytes() == before


@pytest.mark.parametrize("problem", ["no key", "wrong key", "flipped bit", "truncated",
                                     "extended", "open key", "public key as key"])
def test_bad_sealed_shards_exit_2_and_write_nothing(site, capsys, problem):
    tmp, _, shard = site
    key = tmp / "server.key"
    raw = shard.read_bytes()
    named = shard
    if problem == "wrong key":
        key = tmp / "site.key"
    elif problem == "flipped bit":
        shard.write_bytes(raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 4])
                          + raw[len(raw) // 2 + 1:])
    elif problem == "truncated":
        shard.write_bytes(raw[:-7])
    elif problem == "extended":
        shard.write_bytes(raw + b"more")
    elif problem == "open key":
        os.chmod(key, 0o644)
        named = key
    elif problem == "public key as key":
        key = tmp / "server.pub"
        os.chmod(key, 0o600)
        named = key
    args = ["pretrain", "--shards", str(shard), "--out", str(tmp / "body.sealed"),
            *PRETRAIN_ARGS]
    if problem != "no key":
        args += ["--unseal-key", str(key)]
    capsys.readouterr()
    assert main(args) == 2
    _one_error_line(capsys, str(named))
    assert not (tmp / "body.sealed").exists()


def test_finetune_refuses_a_body_sealed_to_another_site(site, capsys):
    tmp, folder, shard = site
    body = tmp / "body.sealed"
    assert main(["pretrain", "--shards", str(shard), "--unseal-key", str(tmp / "server.key"),
                 "--out", str(body), "--seal-to", str(tmp / "site.pub"), *PRETRAIN_ARGS]) == 0
    capsys.readouterr()
    out = tmp / "model.safetensors"
    assert main(["finetune", "--body", str(body), "--unseal-key", str(tmp / "server.key"),
                 "--data", str(folder), "--out", str(out)]) == 2
    _one_error_line(capsys, str(body), "is not sealed to private key 'server'")
    assert not out.exists()


def test_seal_an_existing_shard(site, capsys, tmp_path):
    tmp, folder, _ = site
    clear = tmp / "clear.safetensors"
    assert main(["encode", "--data", str(folder), "--key", str(tmp / "client.key"),
                 "--out", str(clear), *MODEL_ARGS]) == 0
    assert "UNSEALED" in capsys.readouterr().out
    sealed = tmp / "resealed.sealed"
    assert main(["seal", str(clear), "--seal-to", str(tmp / "server.pub"), "--out",
                 str(sealed)]) == 0
    assert main(["pretrain", "--shards", str(sealed), "--unseal-key", str(tmp / "server.key"),
                 "--out", str(tmp / "b.safetensors"), *PRETRAIN_ARGS]) == 0
    assert main(["seal", str(clear), "--seal-to", str(tmp / "server.pub"), "--out",
                 str(sealed)]) == 2
    _one_error_line(capsys, str(sealed), "--force")


def test_attestation_evidence_needs_a_policy(site, capsys):
    tmp, folder, _ = site
    assert main(["encode", "--data", str(folder), "--key", str(tmp / "client.key"),
                 "--out", str(tmp / "x.sealed"), "--seal-to", str(tmp / "server.pub"),
                 "--attestation-evidence", str(tmp / "e.json"), *MODEL_ARGS]) == 2
    _one_error_line(capsys, "--require-attestation")
    assert not (tmp / "x.sealed").exists()
