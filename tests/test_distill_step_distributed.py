"""DistillStep's fast path under DistributedDataParallel (2 CPU processes, gloo).

Packed views travel through DDP's forward as they are, the fused head + loss returns the
last layer's weight from inside that forward, and every rank ends with the same weights as
the plain step's DDP run. Tolerance as in tests/test_distill_step.py.
"""

from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ranks import exit_passed_rank

WORLD = 2


def one_ddp_step(rank: int, options: dict) -> list[torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel

    from smsd.models import DINOHead, ViTBody, ViTConfig
    from smsd.nn import DINOLoss
    from smsd.ops import sample_views
    from smsd.protocol.distill import DistillStep, StepSchedule, StudentModel

    config = ViTConfig(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    student = StudentModel(ViTBody(config), DINOHead(32, 97, 48, 16))
    teacher = copy.deepcopy(student).requires_grad_(False)
    ddp = DistributedDataParallel(student)
    loss_fn = DINOLoss(97, 6, 0.04, 0.07, 2, 3)
    step = DistillStep(ddp, teacher, loss_fn, torch.optim.SGD(ddp.parameters(), lr=0.1),
                       **options)
    gen = torch.Generator().manual_seed(10 + rank)  # each rank its own images and views
    x = torch.randn(3, config.n_tokens, 32, generator=gen)
    views = sample_views(3, config.n_tokens, [0.5, 0.5] + [0.2] * 4, generator=gen)
    before = [t.detach().clone() for t in student.state_dict().values()]
    step(x, views, StepSchedule(epoch=0, lr=0.1, weight_decay=0.0, momentum=0.9))
    after = [t.detach().clone() for t in student.state_dict().values()]
    assert sum(not torch.equal(a, b) for a, b in zip(before, after, strict=True)) > len(after) // 2
    return [*after, loss_fn.center.detach().clone()]


def worker(rank: int, store: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        fast = one_ddp_step(rank, dict(packed=True, fused_gather=True, fused_head_loss=True))
        plain = one_ddp_step(rank, dict(packed=False))
        for a, b in zip(fast, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        # The averaged gradients made both ranks' students identical, in every tensor
        # (weights of every block, the head, the center), and the step moved them.
        flat = torch.cat([t.flatten() for t in fast])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1])
        dist.barrier()  # no rank leaves while its peer is in the last collective
    finally:
        dist.destroy_process_group()
    exit_passed_rank()  # see tests/ranks.py


def test_fast_step_under_ddp(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)
