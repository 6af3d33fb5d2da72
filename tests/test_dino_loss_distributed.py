"""In a distributed run the center moves toward the mean teacher output of all ranks.

Two CPU processes (gloo): each rank has its own teacher batch; after one call both
ranks hold the center moved toward the mean over both batches, as DINO's all-reduce
gives, and the loss is each rank's own.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

S, B, K, MOMENTUM = 4, 2, 96, 0.9


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(S * B, K, generator=gen), torch.randn(2 * B, K, generator=gen)


def worker(rank: int, world: int, store: str, backend: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    import oracles

    import smsd
    from smsd.ops import dino_loss

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        student, teacher = batch(rank)
        center = torch.full((1, K), 0.5)
        with smsd.use_backend(backend):
            loss = dino_loss(student, teacher, center, n_student_views=S,
                             center_momentum=MOMENTUM)
        mean = torch.cat([batch(r)[1] for r in range(world)]).double().mean(0, keepdim=True)
        expected = 0.5 * MOMENTUM + mean * (1 - MOMENTUM)
        assert torch.allclose(center.double(), expected, atol=1e-6), "center not all-reduced"
        alone = oracles.dino_loss(student.double(), teacher.double(),
                                  torch.full((1, K), 0.5, dtype=torch.float64),
                                  n_student_views=S)[0]  # the fp64 formula, this rank's batch
        assert abs(float(loss) - float(alone)) < 1e-4, "loss must be the rank's own"
        dist.barrier()  # no rank leaves while its peer is in the last collective
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend_name", ("torch", "cpp"))
def test_center_all_reduced_across_ranks(backend_name, tmp_path):
    import smsd

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if not smsd.backends()[backend_name].available:
        pytest.skip(f"backend {backend_name} unavailable")
    mp.spawn(worker, args=(2, str(tmp_path / "store"), backend_name), nprocs=2, join=True)
