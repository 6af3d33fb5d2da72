"""Crash-safe pre-training: kill -9, resume, and get the uninterrupted run's results exactly.

Checkpoints are safetensors (never pickle), written atomically, the previous one kept; a
corrupt newest checkpoint falls back to the previous with a warning. Same process set-up
and deterministic mode make the resumed run bit-identical, so comparisons are exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from smsd.crypto import PermutationKey
from smsd.models import model_config, vit_tiny
from smsd.protocol import Client, PretrainConfig, PretrainError, RunOptions, Server, load_body
from smsd.protocol.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_paths,
    load_checkpoint,
    save_checkpoint,
)

MODEL = vit_tiny(patch_size=4, img_size=16, in_chans=1, embed_dim=16, depth=1, num_heads=2)
# 20 images, batch 8: 2 steps per epoch; a checkpoint after every step (mid-epoch too).
TRAIN = PretrainConfig(epochs=2, batch_size=8, out_dim=32, hidden_dim=16, bottleneck_dim=8,
                       warmup_epochs=1, local_keep=(0.25,) * 3)
RUN = RunOptions(checkpoint_every=1, checkpoint_every_steps=1, deterministic=True)


def _server(train: PretrainConfig = TRAIN, model=MODEL) -> Server:
    return Server(model, train, options=RUN)


def _shard(model, folder: Path, n: int = 20) -> Path:
    images = torch.randn(n, 1, model.img_size, model.img_size,
                         generator=torch.Generator().manual_seed(5))
    return Client(model, PermutationKey.generate()).encode(images, folder / f"c{n}.safetensors")


def _assert_same_body(a: dict, b: dict) -> None:
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=0, atol=0, msg=name)


def _losses(path: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    return _shard(MODEL, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def uninterrupted(shard):
    server = _server()
    body = server.pretrain([shard], progress=False)
    return server.history, body.state_dict()


def test_checkpoints_are_safetensors_with_retention(shard, tmp_path):
    _server().pretrain([shard], work_dir=tmp_path, stop_after=1, progress=False)
    found = checkpoint_paths(tmp_path)
    assert [it for it, _ in found] == [2, 1]  # the newest and the one before it
    with safe_open(str(found[0][1]), framework="pt") as handle:  # no pickle: plain tensors
        meta = handle.metadata()
        keys = set(handle.keys())
    assert meta["format"] == CHECKPOINT_FORMAT
    assert {"rng/generator", "rng/torch", "loss/center"} <= keys
    assert any(k.startswith("optimizer/") for k in keys)
    assert any(k.startswith("teacher/") for k in keys)
    mid, _ = load_checkpoint(found[1][1])
    assert (mid["epoch"], mid["step"], len(mid["epoch_losses"])) == (0, 1, 1)
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("damage", ("flip", "truncate"))
def test_corrupt_latest_falls_back_to_previous(shard, uninterrupted, tmp_path, damage):
    _server().pretrain([shard], work_dir=tmp_path, stop_after=1, progress=False)
    (_, latest), _ = checkpoint_paths(tmp_path)
    data = bytearray(latest.read_bytes())
    if damage == "flip":  # parses fine; only the checksum sees it
        data[-100] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    latest.write_bytes(bytes(data))
    server = _server()
    with pytest.warns(UserWarning, match=f"skipping unreadable checkpoint {latest}"):
        # resumes mid-epoch 1 (previous = after step 1 of epoch 0), at the exact position
        body = server.pretrain([shard], work_dir=tmp_path, resume=True, progress=False)
    _assert_same_body(body.state_dict(), uninterrupted[1])
    assert [r["loss"] for r in server.history] == [r["loss"] for r in uninterrupted[0]]
    assert _losses(tmp_path / "metrics.jsonl") == [
        {k: v for k, v in r.items() if k != "seconds"} for r in uninterrupted[0]]


# ------------------------------------------------- resume does what it says
def _count_steps(monkeypatch) -> list[int]:
    """Counts the optimizer steps the next runs take."""
    from smsd.protocol import distill

    calls, original = [], distill.DistillStep.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(distill.DistillStep, "__call__", counted)
    return calls


def test_resume_takes_only_the_steps_left(shard, tmp_path, monkeypatch):
    """Training is deterministic from the seed, so a resume that silently restarted from
    step 0 would still end with the uninterrupted body: count the steps instead."""
    steps = _count_steps(monkeypatch)
    _server().pretrain([shard], work_dir=tmp_path, stop_after=1, progress=False)
    assert len(steps) == 2  # epoch 0: 20 images, batch 8
    (_, latest), (mid, _) = checkpoint_paths(tmp_path)
    latest.unlink()  # resume from the mid-epoch checkpoint: after step 1 of epoch 0
    steps.clear()
    server = _server()
    server.pretrain([shard], work_dir=tmp_path, resume=True, progress=False)
    assert len(steps) == 2 * TRAIN.epochs - mid == 3
    assert [r["epoch"] for r in server.history] == [0, 1]


def _altered(tensors: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    tensors = dict(tensors)
    if part == "rng/generator":  # another valid generator state
        tensors[part] = torch.Generator().manual_seed(12345).get_state()
        return tensors
    if part == "data/order":
        tensors[part] = tensors[part].roll(1)
        return tensors
    names = [k for k in tensors if k.startswith(part) and tensors[k].is_floating_point()]
    assert names, part
    for name in names:  # AdamW's moments scaled (the second must stay >= 0), others moved
        value = tensors[name]
        tensors[name] = value * 1.5 if part == "optimizer/" else (
            value + 0.05 * torch.randn_like(value))
    return tensors


@pytest.mark.parametrize("part", ["student/", "teacher/", "loss/center", "optimizer/",
                                  "rng/generator", "data/order"])
def test_what_the_checkpoint_holds_is_what_the_resume_uses(shard, uninterrupted, tmp_path,
                                                          part):
    """Alter one part of a mid-epoch checkpoint: the resumed body must differ from the
    uninterrupted one (a resume that ignored that part would reproduce it exactly)."""
    _server().pretrain([shard], work_dir=tmp_path, stop_after=1, progress=False)
    (_, latest), (mid, path) = checkpoint_paths(tmp_path)
    latest.unlink()
    state, tensors = load_checkpoint(path)
    save_checkpoint(tmp_path, mid, _altered(tensors, part), state)
    body = _server().pretrain([shard], work_dir=tmp_path, resume=True, progress=False)
    changed = [name for name, value in body.state_dict().items()
               if not torch.equal(value, uninterrupted[1][name])]
    assert changed, f"altering {part} in the checkpoint did not change the resumed run"


def test_resume_continues_the_history(shard, tmp_path):
    """The epochs logged before the interruption come back from the checkpoint."""
    first = _server()
    first.pretrain([shard], work_dir=tmp_path, stop_after=1, progress=False)
    resumed = _server()
    resumed.pretrain([shard], work_dir=tmp_path, resume=True, progress=False)
    assert resumed.history[0] == first.history[0] and len(resumed.history) == TRAIN.epochs


def test_no_readable_checkpoint_is_an_error(shard, tmp_path):
    _server().pretrain([shard], work_dir=tmp_path, stop_after=1, progress=False)
    for _, path in checkpoint_paths(tmp_path):
        path.write_bytes(b"\x00" * 16)
    with pytest.warns(UserWarning), pytest.raises(PretrainError, match="no readable checkpoint"):
        _server().pretrain([shard], work_dir=tmp_path, resume=True, progress=False)


def test_resume_checks_the_data_position(shard, tmp_path):
    """A checkpoint that parses and passes its checksum but holds an impossible position."""
    _server().pretrain([shard], work_dir=tmp_path, stop_after=1, progress=False)
    (newest, latest), (mid, path) = checkpoint_paths(tmp_path)
    assert (newest, mid) == (2, 1)
    latest.unlink()  # resume from the mid-epoch one
    state, tensors = load_checkpoint(path)
    tensors["data/order"] = torch.zeros(20, dtype=torch.int64)
    save_checkpoint(tmp_path, mid, tensors, state)
    with pytest.raises(PretrainError, match="not a permutation of 20 images"):
        _server().pretrain([shard], work_dir=tmp_path, resume=True, progress=False)
    del tensors["data/order"]
    save_checkpoint(tmp_path, mid, tensors, state)
    with pytest.raises(PretrainError, match="image order must be stored exactly when inside"):
        _server().pretrain([shard], work_dir=tmp_path, resume=True, progress=False)


def test_resume_with_another_config_is_a_clear_error(shard, tmp_path):
    _server().pretrain([shard], work_dir=tmp_path, stop_after=1, progress=False)
    other = PretrainConfig(**{**TRAIN.__dict__, "lr": 1e-2, "seed": 7})
    with pytest.raises(PretrainError, match=r"another training config \(lr: 0\.0005 in the "
                       r"checkpoint, 0\.01 now, seed: 0 in the checkpoint, 7 now\)"):
        _server(other).pretrain([shard], work_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(PretrainError, match="another model config"):
        _server(model=MODEL.replace(depth=2)).pretrain([shard], work_dir=tmp_path,
                                                       resume=True, progress=False)
    with pytest.raises(PretrainError, match="trained on 20 images; the shards given hold 24"):
        _server().pretrain([_shard(MODEL, tmp_path, n=24)], work_dir=tmp_path,
                                      resume=True, progress=False)
    # How often to checkpoint is not part of what the run computes: a resume may change it.
    relaxed = RunOptions(checkpoint_every=1, checkpoint_every_steps=0, deterministic=True)
    Server(MODEL, TRAIN, options=relaxed).pretrain([shard], work_dir=tmp_path, resume=True,
                                                   progress=False)


def test_checkpoint_every_steps_and_deterministic_mode(shard, monkeypatch):
    from smsd.protocol import server as server_module

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="checkpoint_every_steps must be an int >= 0"):
            RunOptions(checkpoint_every_steps=bad)
    seen, original = [], server_module.sample_views

    def sample_views(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(server_module, "sample_views", sample_views)
    assert not torch.are_deterministic_algorithms_enabled()
    _server().pretrain([shard], stop_after=1, progress=False)
    assert seen == [True, True]  # on during the run's 2 steps...
    assert not torch.are_deterministic_algorithms_enabled()  # ...and restored after


# ----------------------------------------------------------------- kill -9
CLI_MODEL = model_config("demo", img_size=16, in_chans=1)  # --model demo --img-size 16


def _pretrain_cli(shard: Path, out: Path, *extra: str) -> list[str]:
    # 20 images, batch 4: 5 steps per epoch, 40 in all; a checkpoint every 3 steps lands
    # mid-epoch, so the resume must restart inside an epoch at the exact data position.
    return [sys.executable, "-m", "smsd.cli", "pretrain", "--shards", str(shard),
            "--out", str(out), "--model", "demo", "--img-size", "16", "--in-chans", "1",
            "--epochs", "8", "--batch-size", "4", "--warmup-epochs", "1", "--out-dim", "64",
            "--hidden-dim", "32", "--bottleneck-dim", "16", "--local-keep", "0.25", "0.25",
            "--checkpoint-every", "100", "--checkpoint-every-steps", "3", "--deterministic",
            "--no-progress", *extra]


def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    shard = _shard(CLI_MODEL, tmp_path)
    # One thread: on a shared CI machine, OpenMP threads spin and slow tiny steps 10x.
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    killed, whole = tmp_path / "killed.safetensors", tmp_path / "whole.safetensors"
    work = Path(f"{killed}.work")

    proc = subprocess.Popen(_pretrain_cli(shard, killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not checkpoint_paths(work) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    running = proc.poll() is None
    proc.kill()  # SIGKILL: no cleanup, no flush
    _, stderr = proc.communicate()
    assert running, f"the run ended before it could be killed: {stderr.decode()[-2000:]}"
    assert 0 < checkpoint_paths(work)[0][0] < 40, "the kill must leave a run half done"
    assert not killed.exists()

    resumed = subprocess.run(_pretrain_cli(shard, killed, "--resume"), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = subprocess.run(_pretrain_cli(shard, whole), env=env, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    assert _losses(work / "metrics.jsonl") == _losses(Path(f"{whole}.work") / "metrics.jsonl")
    _assert_same_body(load_body(killed, CLI_MODEL)[0].state_dict(),
                      load_body(whole, CLI_MODEL)[0].state_dict())
