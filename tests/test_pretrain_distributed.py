"""Data-parallel pre-training (gloo, 2 CPU processes) is the single-process run split in two.

Both runs see the same global batches and views (drawn from one generator seeded alike on
every rank); DDP averages the two half-batch gradients, DINOLoss all-reduces the center.
The only difference is float summation order (half-batch sums, then the all-reduce), so
losses and weights agree to fp32 rounding amplified over a few Adam steps, not exactly:
tolerances below. The teacher EMA must be bit-identical on both ranks.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ranks import exit_passed_rank

from smsd.crypto import PermutationKey
from smsd.models import model_config
from smsd.protocol import Client, PretrainConfig, RunOptions, Server, load_body
from smsd.protocol.checkpoint import checkpoint_paths, load_checkpoint

# The CLI builds the same config from `--model demo --img-size 16 --in-chans 1`.
MODEL = model_config("demo", img_size=16, in_chans=1)
TRAIN = PretrainConfig(epochs=3, batch_size=8, out_dim=32, hidden_dim=16, bottleneck_dim=8,
                       warmup_epochs=1, local_keep=(0.25,) * 3)
RUN = RunOptions(checkpoint_every=1)


def _server(train: PretrainConfig = TRAIN, model=MODEL) -> Server:
    return Server(model, train, options=RUN)
# fp32 sums in another order differ by ~1e-7 relative; Adam's normalized steps carry that
# through 6 updates. Measured (CPU, 1 thread per rank): max loss difference 7.7e-7 on losses
# of 1.3-2.0 (4e-7 relative), max teacher weight difference 3.7e-9 (5e-7 relative). The
# tolerances leave a 20x margin for other thread counts and CPUs.
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
WEIGHT_TOL = dict(rtol=1e-5, atol=1e-7)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    images = torch.randn(20, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    path = tmp_path_factory.mktemp("data") / "client.safetensors"
    return Client(MODEL, PermutationKey.generate()).encode(images, path)


@pytest.fixture(scope="module")
def single(shard, tmp_path_factory):
    """The uninterrupted single-process run: (history, body state)."""
    server, work = _server(), tmp_path_factory.mktemp("single")
    body = server.pretrain([shard], work_dir=work, progress=False)
    return server.history, body.state_dict(), work


def _losses(history: list[dict]) -> torch.Tensor:
    return torch.tensor([record["loss"] for record in history], dtype=torch.float64)


def worker(rank: int, world: int, store: str, shard: str, work: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)  # two processes share the CI machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        # Killed after epoch 1 and resumed: distributed resume continues the same run.
        _server().pretrain([shard], work_dir=work, stop_after=1, progress=False)
        server = _server()
        body = server.pretrain([shard], work_dir=work, resume=True, out=f"{work}/body.st",
                               progress=False)
        flat = torch.cat([p.flatten() for p in body.state_dict().values()])
        every = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(every, flat)
        assert all(torch.equal(other, flat) for other in every), "teacher differs across ranks"
        assert len(server.history) == TRAIN.epochs
        dist.barrier()  # no rank leaves while its peer is in the last collective
    finally:
        dist.destroy_process_group()
    exit_passed_rank()  # see tests/ranks.py


def test_two_ranks_match_single_process(shard, single, tmp_path):
    work = tmp_path / "work"
    mp.spawn(worker, args=(2, str(tmp_path / "store"), str(shard), str(work)), nprocs=2,
             join=True)
    history, state, single_work = single
    lines = (work / "metrics.jsonl").read_text().splitlines()
    distributed = [json.loads(line) for line in lines]  # rank 0 alone wrote: one per epoch
    assert [r["epoch"] for r in distributed] == list(range(TRAIN.epochs))
    torch.testing.assert_close(_losses(distributed), _losses(history), **LOSS_TOL)
    body, _, _ = load_body(work / "body.st", MODEL)
    for name, value in body.state_dict().items():
        torch.testing.assert_close(value, state[name], **WEIGHT_TOL, msg=name)
    # The DINO center moved by the mean over both ranks' rows, not rank 0's half alone.
    center = [load_checkpoint(checkpoint_paths(w)[0][1])[1]["loss/center"]
              for w in (work, single_work)]
    torch.testing.assert_close(*center, **WEIGHT_TOL)


def test_torchrun_cli(shard, single, tmp_path):
    """``smsd pretrain`` unchanged under torchrun: 2 gloo ranks on CPU."""
    out = tmp_path / "body.safetensors"
    args = ["pretrain", "--shards", str(shard), "--out", str(out), "--model", "demo",
            "--img-size", "16", "--in-chans", "1", "--epochs", str(TRAIN.epochs),
            "--batch-size", str(TRAIN.batch_size), "--out-dim", str(TRAIN.out_dim),
            "--hidden-dim", str(TRAIN.hidden_dim), "--bottleneck-dim",
            str(TRAIN.bottleneck_dim), "--warmup-epochs", str(TRAIN.warmup_epochs),
            "--local-keep", *map(str, TRAIN.local_keep), "--checkpoint-every", "1",
            "--lr", str(TRAIN.lr), "--teacher-temp", str(TRAIN.teacher_temp),
            "--momentum-teacher", str(TRAIN.momentum_teacher),
            "--koleo-weight", str(TRAIN.koleo_weight), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "-m", "smsd.cli", *args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1 and "2 ranks" in run.stdout  # rank 0 only
    history, state, _ = single
    lines = (Path(f"{out}.work") / "metrics.jsonl").read_text().splitlines()
    torch.testing.assert_close(_losses([json.loads(line) for line in lines]),
                               _losses(history), **LOSS_TOL)
    body, _, _ = load_body(out, MODEL)
    for name, value in body.state_dict().items():
        torch.testing.assert_close(value, state[name], **WEIGHT_TOL, msg=name)


def test_rank_rows_split_the_global_batch():
    from smsd.protocol.distributed import Ranks

    blocks = [Ranks(rank, 4).rows(12) for rank in range(4)]
    assert [(b.start, b.stop) for b in blocks] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert Ranks().rows(7) == slice(0, 7) and Ranks().is_main and not Ranks().distributed
    with pytest.raises(ValueError, match="batch size 8 is not divisible by the world size 3"):
        Ranks(1, 3).rows(8)
