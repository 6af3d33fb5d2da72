"""A bad image never crashes the DALI loader (issue 20).

DALI 2.4's image decoder can kill the process (SIGSEGV) on a file its parser rejects, in
a batch of 32 or more images (:mod:`smsd.data.image_check` says why), so the loader checks
PNG/JPEG files before DALI reads them. Every command that reads a folder then exits 2
with one error line naming the file, every time: each case runs ``REPEATS`` times in one
child process per command (a crash kills the child: return code -11), and once as a
plain ``smsd`` process. The folders hold 81 images, so that the CLI's batches of 64 are
parsed on several threads, as when the crash was seen.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install "
                    "'smsd[dali]'); the torch loader is tested in test_loaders.py")

from image_files import write_separable_folder

from smsd.data import DataError, ImageSource, collect, make_loader

REPEATS = 20
COMMANDS = ("encode", "finetune", "evaluate")
MODEL_ARGS = ["--img-size", "16", "--patch-size", "4", "--in-chans", "1"]
# case → (the bad file's name, its bytes made from a valid PNG's)
CASES = {
    "truncated-png": ("bad.png", lambda png: png[: len(png) // 2]),
    "text-as-png": ("bad.png", lambda png: b"this is not an image\n"),
    "empty-jpg": ("bad.jpg", lambda png: b""),
}

# Runs smsd.cli.main on each case's argv `repeats` times; one JSON line per call with its
# return code and everything written to fd 2 (DALI's C++ messages too).
CHILD = r"""
import contextlib, io, json, os, sys, tempfile
from smsd.cli import main

for case in json.loads(sys.argv[1]):
    for _ in range(case["repeats"]):
        out = io.StringIO()
        with tempfile.TemporaryFile("w+") as err:
            saved = os.dup(2)
            os.dup2(err.fileno(), 2)
            try:
                with contextlib.redirect_stdout(out):
                    code = main(case["argv"])
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
            err.seek(0)
            record = {"case": case["name"], "code": code, "stderr": err.read()}
        print(json.dumps(record), flush=True)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A key, a body, a fine-tuned model and, per case, a folder with one bad file."""
    from smsd.crypto import PermutationKey
    from smsd.models import ClassifierTail, PatchHead, ViTBody, head_fingerprint, model_config
    from smsd.protocol import save_body
    from smsd.protocol.classifier_io import save_classifier
    from smsd.protocol.training import TokenClassifier

    root = tmp_path_factory.mktemp("site")
    # A small model: finetune and evaluate build it on every call, before reading images.
    config = model_config("demo", img_size=16, patch_size=4, in_chans=1, embed_dim=16,
                          depth=1, num_heads=2)
    fingerprint = head_fingerprint(PatchHead(config))
    PermutationKey.generate().save(root / "client.key")
    save_body(root / "body.safetensors", ViTBody(config), head_fingerprint=fingerprint)
    model = TokenClassifier(ViTBody(config), ClassifierTail(config.embed_dim, 2))
    save_classifier(root / "model.safetensors", model, classes=["one", "zero"],
                    head_fingerprint=fingerprint)
    bad = {}
    for case, (name, make) in CASES.items():
        folder = write_separable_folder(root / case, per_class=40)
        bad[case] = folder / "one" / name
        bad[case].write_bytes(make((folder / "one" / "0.png").read_bytes()))
    return root, bad


def argv(command: str, root: Path, folder: Path) -> list[str]:
    """``smsd COMMAND`` on ``folder``; what it would write goes to ``root/out-COMMAND``."""
    out = str(root / f"out-{command}.safetensors")
    return {
        "encode": ["encode", "--data", str(folder), "--key", str(root / "client.key"),
                   "--out", out, *MODEL_ARGS],
        "finetune": ["finetune", "--body", str(root / "body.safetensors"), "--data",
                     str(folder), "--out", out, "--epochs", "1"],
        "evaluate": ["evaluate", "--model", str(root / "model.safetensors"), "--data",
                     str(folder)],
    }[command]


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def assert_one_error_line(stderr: str, command: str, bad: Path) -> None:
    """Exactly one line mentions an error: smsd's, naming the bad file."""
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"smsd {command}: error: cannot read image {bad}: "), stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_command_exits_2_naming_the_bad_file_every_time(site, command):
    root, bad = site
    before = files(root)
    cases = [{"name": case, "argv": [*argv(command, root, bad[case].parent.parent),
                                     "--loader", "dali"], "repeats": REPEATS}
             for case in CASES]
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)],
                          capture_output=True, text=True, timeout=300)
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0, (f"smsd {command} died (return code {proc.returncode}) "
                                  f"after {len(records)} calls:\n{proc.stderr[-3000:]}")
    assert [r["case"] for r in records] == [case for case in CASES for _ in range(REPEATS)]
    for record in records:
        assert record["code"] == 2, record
        assert_one_error_line(record["stderr"], command, bad[record["case"]])
    assert files(root) == before  # nothing written, no temporary file left


@pytest.mark.parametrize("case,command", list(zip(CASES, COMMANDS, strict=True)))
def test_plain_smsd_process(site, case, command):
    """The installed ``smsd`` with the default ``--loader auto`` (DALI here)."""
    root, bad = site
    before = files(root)
    script = Path(sys.executable).with_name("smsd")
    smsd = [str(script)] if script.is_file() else [sys.executable, "-m", "smsd.cli"]
    proc = subprocess.run([*smsd, *argv(command, root, bad[case].parent.parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "loader 'auto' uses dali" in proc.stderr
    assert_one_error_line(proc.stderr, command, bad[case])
    assert files(root) == before


def _corrupt_pixels(png: bytes) -> bytes:
    """``png`` with its compressed pixels overwritten (0xFF bytes), every chunk whole
    and its CRC right: it passes the structural check and only decoding fails."""
    out, pos = bytearray(png[:8]), 8
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        data = png[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            data = data[:2] + b"\xff" * (len(data) - 2)
        out += png[pos:pos + 8] + data + struct.pack(">I", zlib.crc32(kind + data))
        pos += 12 + length
    return bytes(out)


def test_an_image_dali_cannot_decode_fails_every_later_epoch(tmp_path):
    """After DALI fails, its pipeline is no longer valid: each later epoch raises the same
    error instead of running it again (a second epoch used to yield batches, and one
    after an epoch left early to hang)."""
    folder = write_separable_folder(tmp_path, per_class=40)
    bad = folder / "zero" / "bad.png"
    bad.write_bytes(_corrupt_pixels((folder / "zero" / "0.png").read_bytes()))
    source = ImageSource.from_folder(folder)
    loader = make_loader(source, img_size=16, in_chans=1, loader="dali")
    for _ in range(3):
        with pytest.raises(DataError, match=f"cannot read image {re.escape(str(bad))}: "
                           ".*DALI: Failed to decode sample"):
            collect(loader)
    # Left after the first batch, the failure comes in the rest of the epoch: it is kept.
    early = make_loader(source, img_size=16, in_chans=1, loader="dali", batch_size=32)
    first = next(iter(early))
    assert first.indices.tolist() == list(range(32)) and torch.isfinite(first.images).all()
    with pytest.raises(DataError, match=re.escape(str(bad))):
        collect(early)


def test_every_shard_checks_only_its_own_files(tmp_path):
    folder = write_separable_folder(tmp_path, per_class=4)
    (folder / "zero" / "bad.png").write_bytes(b"")  # the last file: shard 1 of 2
    source = ImageSource.from_folder(folder)
    assert len(collect(make_loader(source, img_size=16, in_chans=1, loader="dali",
                                   shard_id=0, num_shards=2)).indices) == 4
    with pytest.raises(DataError, match=r"bad\.png: the file is empty"):
        make_loader(source, img_size=16, in_chans=1, loader="dali", shard_id=1, num_shards=2)
