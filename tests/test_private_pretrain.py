"""Differentially private pre-training: the private step's clipping and noise, its
accounting, and a private run end to end (ε in the metrics and the body)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from smsd.models import DINOHead, ViTBody, ViTConfig
from smsd.nn import DINOLoss
from smsd.ops import sample_views
from smsd.protocol.body_io import body_privacy
from smsd.protocol.distill import DistillStep, StepSchedule, StudentModel
from smsd.protocol.pretrain_config import PretrainConfig
from smsd.protocol.privacy import (
    DPConfig,
    DPPlan,
    calibrate_noise,
    effective_noise,
    epsilon_spent,
)
from smsd.protocol.private_step import PrivateDistillStep
from smsd.protocol.server import Server
from smsd.protocol.shard import write_shard

pytest.importorskip("dp_accounting")

CONFIG = ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                   mlp_ratio=2.0, init_std=0.25)
KEEP = (0.5, 0.5, 0.25, 0.25)
K = 32


def _models(seed: int = 0):
    torch.manual_seed(seed)
    student = StudentModel(ViTBody(CONFIG), DINOHead(16, K, 16, 8))
    teacher = copy.deepcopy(student).requires_grad_(False)
    loss = DINOLoss(K, len(KEEP), 0.04, 0.04, 0, 10)
    loss.center.normal_(0, 0.05)
    return student, teacher, loss


def _plan(clip: float, grad_noise: float, center_noise: float,
          center_clip: float = 1e9) -> DPPlan:
    config = DPConfig(noise_multiplier=1.0, clip=clip, center_clip=center_clip)
    return DPPlan(config, 0.5, 10, 1.0, grad_noise, center_noise, math.inf)


def _batch(b: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, CONFIG.n_tokens, 16, generator=gen)
    return x, sample_views(b, CONFIG.n_tokens, KEEP, generator=gen)


SCHEDULE = StepSchedule(epoch=0, lr=0.1, weight_decay=0.0, momentum=0.9)


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)


def test_without_clipping_or_noise_the_private_step_is_the_plain_step():
    """Per-image gradients summed = the batch gradient; center from the clipped sums =
    DINO's batch center (both with a bound no image reaches and zero noise). fp32 (the
    kernels' dtype): the two sum the same terms in another order, so they agree to a
    few fp32 ulps of the update, not bitwise."""
    x, index = _batch(6)
    start = _models()[0].state_dict()
    results = []
    for private in (False, True):
        student, teacher, loss = _models()
        opt = _sgd(student)
        if private:
            step = PrivateDistillStep(student, teacher, loss, opt, plan=_plan(1e9, 0.0, 0.0),
                                      expected_batch=6, generator=torch.Generator())
        else:
            step = DistillStep(student, teacher, loss, opt, packed=False, autocast_dtype=None)
        value = step(x, index, SCHEDULE)
        results.append((value, student.state_dict(), loss.center.clone()))
    (plain_loss, plain, plain_center), (dp_loss, dp, dp_center) = results
    torch.testing.assert_close(dp_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name in plain:
        update, expected = dp[name] - start[name], plain[name] - start[name]
        if not expected.abs().max() > 0:
            continue  # untouched by this step (the frozen weight-norm gain)
        scale = expected.abs().max().item()
        torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-4 * scale, msg=name)
    torch.testing.assert_close(dp_center, plain_center, rtol=1e-5, atol=1e-6)


def test_each_image_contributes_at_most_the_clip():
    """With one image at a time, the update is the clipped gradient: its norm is the bound."""
    x, index = _batch(1)
    student, teacher, loss = _models()
    before = [p.detach().clone() for p in student.parameters() if p.requires_grad]
    opt = _sgd(student)
    clip = 1e-3
    step = PrivateDistillStep(student, teacher, loss, opt, plan=_plan(clip, 0.0, 0.0),
                              expected_batch=1, generator=torch.Generator())
    step(x, index, SCHEDULE)
    after = [p.detach() for p in student.parameters() if p.requires_grad]
    moved = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a - b) for a, b in zip(after, before, strict=True)]))
    assert moved.item() == pytest.approx(0.1 * clip, rel=1e-6)  # lr × clip: it was clipped


def test_the_noise_has_the_planned_scale():
    """An empty Poisson sample still releases noise: std = noise × clip / expected batch."""
    x, index = _batch(0)
    student, teacher, loss = _models()
    before = torch.cat([p.detach().flatten().clone() for p in student.parameters()
                        if p.requires_grad])
    center = loss.center.clone()
    step = PrivateDistillStep(student, teacher, loss, _sgd(student),
                              plan=_plan(2.0, 1.5, 3.0, center_clip=0.5), expected_batch=4,
                              generator=torch.Generator().manual_seed(0))
    step(x, index, SCHEDULE)
    after = torch.cat([p.detach().flatten() for p in student.parameters() if p.requires_grad])
    noise = (after - before) / 0.1
    assert noise.std().item() == pytest.approx(1.5 * 2.0 / 4, rel=0.05)
    center_noise = (loss.center - center) / (1 - loss.center_momentum)
    assert center_noise.std().item() == pytest.approx(3.0 * 0.5 / 4, rel=0.35)  # K=32 draws


def test_accounting_calibrates_and_is_an_upper_bound():
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    q, steps, delta = 0.04, 500, 1e-5
    for eps in (1.0, 4.0, 8.0):
        noise = calibrate_noise(eps, q, steps, delta)
        assert epsilon_spent(noise, q, steps, delta) <= eps * (1 + 1e-3)
        assert epsilon_spent(noise * 0.97, q, steps, delta) > eps  # the smallest noise
    rdp = epsilon_spent(1.0, q, steps, delta)
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.0)), steps)
    assert pld.get_epsilon(delta) <= rdp <= 1.5 * pld.get_epsilon(delta)
    assert effective_noise(2.0, 2.0) == pytest.approx(2.0 / math.sqrt(2))


def test_dp_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig()
    with pytest.raises(ValueError, match="--dp-epsilon"):
        DPConfig(epsilon=-1.0)
    with pytest.raises(ValueError, match="koleo_weight=0"):
        PretrainConfig(koleo_weight=0.1, dp=DPConfig(epsilon=1.0))


def _shards(tmp_path, n=24):
    from smsd.models import PatchHead, head_fingerprint

    fingerprint = head_fingerprint(PatchHead(CONFIG))
    path = write_shard(tmp_path / "s.safetensors", torch.randn(n, CONFIG.n_tokens, 16),
                       head_fingerprint=fingerprint, grid=CONFIG.grid)
    return [path]


def _train_config(**fields) -> PretrainConfig:
    return PretrainConfig(epochs=2, batch_size=8, out_dim=K, hidden_dim=16, bottleneck_dim=8,
                          warmup_epochs=0, local_keep=(0.25, 0.25), **fields)


def test_a_private_run_reports_epsilon_in_metrics_and_body(tmp_path):
    cfg = _train_config(dp=DPConfig(epsilon=4.0))
    server = Server(CONFIG, cfg)
    server.pretrain(_shards(tmp_path), out=tmp_path / "body.safetensors",
                    work_dir=tmp_path / "work", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    spent = [line["dp_epsilon"] for line in lines]
    assert len(spent) == 2 and 0 < spent[0] < spent[1] <= 4.0 * (1 + 1e-3)
    record = body_privacy(tmp_path / "body.safetensors")
    assert record["epsilon_spent"] == pytest.approx(spent[1])
    assert record["delta"] == 1e-5 and record["steps"] == 2 * 3 and record["sample_rate"] == 8 / 24


def test_a_private_run_resumes_exactly(tmp_path):
    """Killed after one epoch and resumed: same body as the uninterrupted run (the Poisson
    samples and the noise come from the checkpointed generator)."""
    from smsd.protocol.server import RunOptions

    cfg = _train_config(dp=DPConfig(noise_multiplier=1.0))
    shards = _shards(tmp_path)
    opts = RunOptions(checkpoint_every=1, deterministic=True)
    whole = Server(CONFIG, cfg, options=opts).pretrain(shards, work_dir=tmp_path / "a",
                                                       progress=False)
    Server(CONFIG, cfg, options=opts).pretrain(shards, work_dir=tmp_path / "b", stop_after=1,
                                               progress=False)
    resumed = Server(CONFIG, cfg, options=opts).pretrain(shards, work_dir=tmp_path / "b",
                                                         resume=True, progress=False)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    other = Server(CONFIG, replace(cfg, dp=DPConfig(noise_multiplier=2.0)), options=opts)
    changed = other.pretrain(shards, work_dir=tmp_path / "c", progress=False)
    assert not torch.equal(changed.state_dict()["cls_token"], whole.state_dict()["cls_token"])
