"""Hostile files through the command line: ``smsd pretrain --shards BAD``,
``smsd finetune --body BAD`` and ``smsd evaluate --model BAD`` exit 2 with one line that
names the file, print no traceback, write nothing, and stay within time and memory limits."""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzz_files import flip, huge_shape, poison, set_header_size, split
from PIL import Image

from smsd.cli import main
from smsd.models import ClassifierTail, ViTBody, model_config
from smsd.protocol.body_io import save_body
from smsd.protocol.classifier_io import save_classifier
from smsd.protocol.client import Client
from smsd.protocol.training import TokenClassifier

ROOT = Path(__file__).resolve().parent.parent
MODEL_ARGS = ["--img-size", "16", "--patch-size", "4", "--in-chans", "1"]
CONFIG = model_config("demo").replace(img_size=16, patch_size=4, in_chans=1)
MEMORY_LIMIT = 4 * 1024**3  # address space of a CLI child: torch maps ~0.7 GiB


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict[str, Path]:
    """A labeled image folder and one valid file per command, all for ``CONFIG``."""
    root = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / "data" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(
                root / "data" / name / f"{i}.png")
    client = Client(CONFIG, None)
    files = {"data": root / "data",
             "shard": write_tokens(client, root / "shard.safetensors"),
             "body": save_body(root / "body.safetensors", ViTBody(CONFIG),
                               head_fingerprint=client.fingerprint)}
    model = TokenClassifier(ViTBody(CONFIG), ClassifierTail(CONFIG.embed_dim, 2))
    files["model"] = save_classifier(root / "model.safetensors", model, classes=["a", "b"],
                                     head_fingerprint=client.fingerprint)
    return files


def write_tokens(client: Client, path: Path) -> Path:
    from smsd.protocol.shard import write_shard

    tokens = client.tokens(torch.randn(3, 1, 16, 16))
    return write_shard(path, tokens, head_fingerprint=client.fingerprint, grid=CONFIG.grid)


def corruptions(data: bytes) -> dict[str, bytes]:
    """Broken variants of a valid file that every loader must refuse."""
    header, _ = split(data)
    n_tensors = len(header) - 1
    size = int.from_bytes(data[:8], "little")
    return {
        "empty": b"",
        "truncated header": data[:5],
        "truncated json": data[: 8 + size // 2],
        "truncated data": data[:-3],
        "trailing bytes": data + b"\0" * 8,
        "header size 2**63": set_header_size(data, 2**63),
        "header size beyond file": set_header_size(data, len(data)),
        "json flipped": flip(data, [(9, 0x55)]),
        "huge shape 2**40": huge_shape(data, 0),
        "huge shape 2**44 last": huge_shape(data, n_tensors - 1, 2**44),
        "nan payload": poison(data, 0, 1, math.nan),
        "inf payload": poison(data, n_tensors - 1, 7, -math.inf),
        "random bytes": np.random.default_rng(1).bytes(256),
        "pickle": b"\x80\x04\x95" + bytes(40),
    }


COMMANDS = {
    "shard": lambda bad, site, out: ["pretrain", "--shards", str(site["shard"]), str(bad),
                                     "--out", str(out), "--epochs", "1", "--no-progress",
                                     *MODEL_ARGS],
    "body": lambda bad, site, out: ["finetune", "--body", str(bad), "--data", str(site["data"]),
                                    "--out", str(out), "--epochs", "1"],
    "model": lambda bad, site, out: ["evaluate", "--model", str(bad), "--data",
                                     str(site["data"])],
}


@pytest.mark.parametrize("kind", list(COMMANDS))
def test_cli_refuses_broken_files(kind, site, tmp_path, capsys, fuzz_count):
    valid = site[kind].read_bytes()
    cases = corruptions(valid)
    for name, data in cases.items():
        bad = tmp_path / f"{name.replace(' ', '-')}.safetensors"
        bad.write_bytes(data)
        out = tmp_path / "out.safetensors"
        assert main(COMMANDS[kind](bad, site, out)) == 2, name
        err = capsys.readouterr().err
        assert str(bad) in err and "Traceback" not in err, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists(), name
    for name, path in {"missing": tmp_path / "missing.safetensors", "folder": tmp_path}.items():
        assert main(COMMANDS[kind](path, site, tmp_path / "out.safetensors")) == 2, name
        assert str(path) in capsys.readouterr().err, name
    fuzz_count(f"CLI broken files ({COMMANDS[kind](0, site, 0)[0]})", len(cases) + 2)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.parametrize("kind", list(COMMANDS))
def test_cli_process_huge_shape_no_traceback_within_limits(kind, site, tmp_path, fuzz_count):
    """A real ``smsd`` process, memory capped and timed: a header declaring 2**40 values
    is refused before anything is allocated."""
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(huge_shape(site[kind].read_bytes(), 0))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    args = COMMANDS[kind](bad, site, tmp_path / "out.safetensors")
    proc = subprocess.run([sys.executable, "-m", "smsd.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120, preexec_fn=_limit_memory)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and str(bad) in proc.stderr, proc.stderr[-2000:]
    fuzz_count("CLI processes (memory-capped)", 1)


_UNPICKLED: list[str] | None = None  # while a test records: every global unpickled


def _audit(event: str, args: tuple) -> None:
    # Both unpicklers (C and pure Python) raise this audit event for each class or
    # function a pickle names, however they were reached (an alias bound at import
    # time, a library's own reference); pure data pickles name none and run no code.
    if event == "pickle.find_class" and _UNPICKLED is not None:
        _UNPICKLED.append(f"pickle.find_class{args}")


sys.addaudithook(_audit)  # cannot be removed; idle outside refuse_unpickling


def _refused(name: str) -> None:
    if _UNPICKLED is not None:
        _UNPICKLED.append(name)
        raise AssertionError(f"a file from another site was unpickled ({name})")


def _refusing(name: str):
    def refuse(*args, **kwargs):
        _refused(name)
    return refuse


def _refusing_class(base: type, name: str) -> type:
    # A class, not a function: modules imported meanwhile may subclass the Unpickler
    # (torch._dynamo does); it refuses only while a guard is on.
    class Refusing(base):
        def __init__(self, *args, **kwargs):
            _refused(name)
            super().__init__(*args, **kwargs)

    Refusing.__name__ = Refusing.__qualname__ = base.__name__
    return Refusing


def refuse_unpickling(monkeypatch) -> list[str]:
    """Every unpickler smsd could reach (``pickle``/``_pickle`` load, loads and the
    Unpickler classes, ``torch.load``/``torch.serialization.load``/``torch.jit.load``,
    ``numpy.load`` and ``numpy.lib.format.read_array`` with ``allow_pickle``) made to fail
    the test, plus the audit hook; → the list of what was attempted (empty if nothing)."""
    import _pickle
    import inspect
    import pickle

    def without_pickle(module, name: str) -> None:
        original = getattr(module, name)
        signature = inspect.signature(original)

        def guarded(*args, **kwargs):
            if signature.bind(*args, **kwargs).arguments.get("allow_pickle"):
                _refused(f"{module.__name__}.{name}(allow_pickle=True)")
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, guarded)

    for module, names in ((pickle, ("load", "loads", "Unpickler", "_load", "_loads",
                                    "_Unpickler")),
                          (_pickle, ("load", "loads", "Unpickler")),
                          (torch, ("load",)), (torch.serialization, ("load",)),
                          (torch.jit, ("load",))):
        for name in names:
            original, full = getattr(module, name), f"{module.__name__}.{name}"
            monkeypatch.setattr(module, name, _refusing_class(original, full)
                                if isinstance(original, type) else _refusing(full))
    without_pickle(np, "load")
    without_pickle(np.lib.format, "read_array")
    attempts: list[str] = []
    monkeypatch.setattr(sys.modules[__name__], "_UNPICKLED", attempts)
    return attempts


def test_refuse_unpickling_sees_every_unpickler(monkeypatch, tmp_path):
    """The guard itself: each way to unpickle is refused or seen."""
    import _pickle
    import io
    import pickle

    data = pickle.dumps(tmp_path)  # names a class: pathlib.PosixPath
    tensor_file = tmp_path / "t.pt"
    torch.save({"x": torch.zeros(2)}, tensor_file)
    np.save(tmp_path / "o.npy", np.array([tmp_path], dtype=object), allow_pickle=True)
    loads = pickle.loads  # bound before the guard, like ``from pickle import loads``
    attempts = refuse_unpickling(monkeypatch)
    for attempt in (lambda: pickle.loads(data), lambda: pickle.load(io.BytesIO(data)),
                    lambda: pickle.Unpickler(io.BytesIO(data)).load(),
                    lambda: pickle._Unpickler(io.BytesIO(data)).load(),
                    lambda: _pickle.loads(data), lambda: _pickle.Unpickler(io.BytesIO(data)),
                    lambda: torch.load(tensor_file, weights_only=True),
                    lambda: torch.serialization.load(tensor_file),
                    lambda: np.load(tmp_path / "o.npy", allow_pickle=True),
                    lambda: np.load(tmp_path / "o.npy", None, True),
                    lambda: np.lib.format.read_array(io.BytesIO((tmp_path / "o.npy")
                                                                .read_bytes()), True)):
        with pytest.raises(AssertionError, match="unpickled"):
            attempt()
    assert len(attempts) == 11, attempts
    loads(data)  # not refused, but seen by the audit hook
    assert attempts[-1].startswith("pickle.find_class"), attempts
    np.save(tmp_path / "f.npy", np.zeros(3))
    assert np.load(tmp_path / "f.npy").shape == (3,)  # no pickle: allowed


def test_cli_never_unpickles_files_from_other_sites(site, tmp_path, monkeypatch):
    """Shards, bodies and models go through the safetensors reader only: with every
    unpickler disabled (``refuse_unpickling``), a full pretrain → finetune → evaluate
    still runs and nothing was unpickled."""
    attempts = refuse_unpickling(monkeypatch)

    def run(args: list[str]) -> None:
        code = main(args)
        assert not attempts, attempts
        assert code == 0, args

    body, model = tmp_path / "body.safetensors", tmp_path / "model.safetensors"
    run(["pretrain", "--shards", str(site["shard"]), "--out", str(body), "--epochs",
         "1", "--batch-size", "3", "--out-dim", "16", "--hidden-dim", "8",
         "--bottleneck-dim", "8", "--warmup-epochs", "0", "--local-keep", "0.25",
         "--no-progress", *MODEL_ARGS])
    run(["finetune", "--body", str(body), "--data", str(site["data"]), "--out", str(model),
         "--epochs", "1"])
    run(["evaluate", "--model", str(model), "--data", str(site["data"])])
