"""DistillStep's fast paths (packed views, one fused gather, fused head + loss) give the
plain step's loss, weights, teacher and center.

Tolerance (fp32, the only dtype every op of the step has on CPU): the paths differ only
in summation order (varlen vs dense attention, chunked vs whole logits matmuls), about
1e-7 relative per op; two SGD steps at lr 0.1 measured at most 7e-7 apart in any weight,
so ``rtol=1e-4, atol=1e-5`` leaves a wide margin yet catches any real error (a wrong
view, row order or temperature moves the loss by more than 1e-2).
"""

from __future__ import annotations

import copy

import pytest
import torch

from smsd.models import DINOHead, ViTBody, ViTConfig
from smsd.nn import DINOLoss
from smsd.ops import sample_views
from smsd.protocol.distill import (
    PHASES,
    DistillStep,
    StepSchedule,
    StudentModel,
    pack_views,
    packed_cls_features,
)

TOL = dict(rtol=1e-4, atol=1e-5)
CONFIG = ViTConfig(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2)  # N=49
OUT_DIM = 97  # not a power of two
KEEP = [0.5, 0.5] + [0.2] * 4  # 25 + 25 + 4 x 10 tokens: 90 > N per image


def make_models(seed=0):
    torch.manual_seed(seed)
    student = StudentModel(ViTBody(CONFIG), DINOHead(CONFIG.embed_dim, OUT_DIM, 48, 16))
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():  # an EMA teacher differs from the student
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return student, teacher


def run_steps(batch, options, steps=2, koleo=0.0, clip=0.0, index=None):
    student, teacher = make_models()
    loss_fn = DINOLoss(OUT_DIM, len(KEEP), 0.04, 0.07, 2, 3)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    step = DistillStep(student, teacher, loss_fn, optimizer, koleo_weight=koleo,
                       clip_grad=clip, **options)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, CONFIG.n_tokens, CONFIG.embed_dim, generator=gen)
    losses = []
    for epoch in range(steps):
        views = sample_views(batch, CONFIG.n_tokens, KEEP, generator=gen)
        schedule = StepSchedule(epoch=epoch, lr=0.1, weight_decay=0.0, momentum=0.9,
                                freeze_last_layer=epoch == 0)
        losses.append(step(x, views, schedule))
    return torch.stack(losses), student, teacher, loss_fn.center


def assert_same(got, expected):
    loss, student, teacher, center = got
    torch.testing.assert_close(loss, expected[0], **TOL)
    for name, model, ref in (("student", student, expected[1]), ("teacher", teacher, expected[2])):
        for (key, a), b in zip(model.state_dict().items(), ref.state_dict().values(),
                               strict=True):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, k=key, n=name: f"{n} {k}: {m}")
    torch.testing.assert_close(center, expected[3], **TOL)


FAST_PATHS = {
    "packed": dict(packed=True),
    "fused_gather": dict(packed=True, fused_gather=True),
    "fused_head_loss": dict(packed=False, fused_head_loss=True),
    "all": dict(packed=True, fused_gather=True, fused_head_loss=True),
    "checkpointed": dict(packed=True, fused_gather=True, fused_head_loss=True,
                         checkpoint_blocks=1),
}


@pytest.mark.parametrize("batch", (1, 3))
@pytest.mark.parametrize("path", FAST_PATHS)
def test_fast_paths_match_plain_step(batch, path):
    expected = run_steps(batch, dict(packed=False))
    assert_same(run_steps(batch, FAST_PATHS[path]), expected)


def test_fast_paths_match_with_koleo_and_clipping():
    expected = run_steps(3, dict(packed=False), koleo=0.1, clip=0.5)
    assert_same(run_steps(3, FAST_PATHS["all"], koleo=0.1, clip=0.5), expected)


def test_all_paths_on_every_backend(backend):
    expected = run_steps(2, dict(packed=False), steps=1)
    assert_same(run_steps(2, FAST_PATHS["all"], steps=1), expected)


def test_packed_features_match_forward_views():
    torch.manual_seed(0)
    body = ViTBody(CONFIG)
    x = torch.randn(5, 48, CONFIG.embed_dim)[::2, 1:]  # non-contiguous, B=3, N=47
    index = sample_views(3, 47, [0.9, 0.4, 0.1])
    x.requires_grad_(True)
    got = packed_cls_features(body, pack_views(x, index))
    expected = body.forward_views([x[torch.arange(3)[:, None], i] for i in index])
    torch.testing.assert_close(got, expected, **TOL)
    (got.sum() * 2).backward()
    cls_grad, x_grad = body.cls_token.grad.clone(), x.grad.clone()
    body.zero_grad(), x.grad.zero_()
    (expected.sum() * 2).backward()
    torch.testing.assert_close(body.cls_token.grad, cls_grad, **TOL)
    torch.testing.assert_close(x.grad, x_grad, **TOL)


def test_on_phase_reports_every_phase_in_order():
    seen = []
    run_steps(2, dict(FAST_PATHS["all"], on_phase=seen.append), steps=2)
    assert seen == list(PHASES) * 2


def test_option_errors():
    student, teacher = make_models()
    loss_fn = DINOLoss(OUT_DIM, len(KEEP), 0.04, 0.07, 2, 3)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"fused_gather=True .* needs packed=True"):
        DistillStep(student, teacher, loss_fn, optimizer, packed=False, fused_gather=True)
    with pytest.raises(ValueError, match="checkpoint_blocks applies to the packed layout"):
        DistillStep(student, teacher, loss_fn, optimizer, packed=True, checkpoint_blocks=2)
    with pytest.raises(ValueError, match="checkpoint_blocks must be an int >= 0"):
        DistillStep(student, teacher, loss_fn, optimizer, packed=True, fused_gather=True,
                    checkpoint_blocks=-1)
    with pytest.raises(TypeError, match="fused_head_loss=True needs loss_fn"):
        DistillStep(student, teacher, lambda *a: None, optimizer, packed=True,
                    fused_head_loss=True)


@pytest.mark.slow
def test_compiled_blocks_match_plain_step():
    """torch.compile of the blocks (Inductor on CPU: minutes on 2 cores, hence slow)."""
    expected = run_steps(2, dict(packed=False), steps=1)
    assert_same(run_steps(2, dict(FAST_PATHS["all"], compile_blocks=True), steps=1), expected)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_run(options, steps=2, sync_check=False):
    """Steps on CUDA in fp32 (no autocast), with fused AdamW; with ``sync_check`` every
    step after the first (which builds the cached packing layout) must not synchronize."""
    student, teacher = make_models()
    student, teacher = student.cuda(), teacher.cuda()
    loss_fn = DINOLoss(OUT_DIM, len(KEEP), 0.04, 0.07, 2, 3).cuda()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)
    step = DistillStep(student, teacher, loss_fn, optimizer, autocast_dtype=None, **options)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(3, CONFIG.n_tokens, CONFIG.embed_dim, device="cuda", generator=gen)
    losses = []
    for epoch in range(steps):
        views = sample_views(3, CONFIG.n_tokens, KEEP, generator=gen, device="cuda")
        schedule = StepSchedule(epoch=epoch, lr=1e-3, weight_decay=0.04, momentum=0.9)
        if sync_check and epoch > 0:
            torch.cuda.set_sync_debug_mode("error")
        try:
            losses.append(step(x, views, schedule))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return torch.stack(losses), student, teacher, loss_fn.center


@pytest.mark.gpu
@needs_cuda
def test_fast_step_on_gpu_is_sync_free_and_matches():
    """The fast step never waits for the GPU (the server can queue steps back to back)
    and gives the plain step's result. AdamW's first steps divide by sqrt(v): loose
    relative tolerance on weights (fp32, TF32 off by default)."""
    got = cuda_run(FAST_PATHS["all"], sync_check=True)
    expected = cuda_run(dict(packed=False))
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(got[1].parameters(), expected[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_checkpointed_blocks_save_less_for_backward():
    """Checkpointed blocks keep only their input: the bytes saved for the backward pass
    drop (measured with saved-tensor hooks, as the GPU's peak memory would)."""
    torch.manual_seed(0)
    body = ViTBody(CONFIG)
    x = torch.randn(3, CONFIG.n_tokens, CONFIG.embed_dim)
    views = pack_views(x, sample_views(3, CONFIG.n_tokens, KEEP))

    def saved_bytes(n_checkpointed):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = packed_cls_features(body, views, checkpoint_blocks=n_checkpointed)
        out.sum().backward()
        return sum(storages.values())

    full, half, none = saved_bytes(0), saved_bytes(1), saved_bytes(2)
    assert none < half < full
    assert none < 0.4 * full


def test_pack_views_errors():
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="index must hold at least one view"):
        pack_views(x, [])
    with pytest.raises(ValueError, match=r"index\[1\] must be \[B=2, k\]"):
        pack_views(x, [torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="x must be"):
        pack_views(x[0], [torch.zeros(2, 3, dtype=torch.long)])


@pytest.mark.parametrize("path", ["plain", "all"])
def test_one_step_is_sgd_then_the_ema_of_the_teacher(path):
    """After one step: student = student - lr * grad, then teacher = m * teacher +
    (1 - m) * student, checked against a copy taken before the step."""
    student, teacher = make_models()
    before = copy.deepcopy(teacher.state_dict())
    loss_fn = DINOLoss(OUT_DIM, len(KEEP), 0.04, 0.07, 2, 3)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    options = {"packed": False} if path == "plain" else FAST_PATHS["all"]
    step = DistillStep(student, teacher, loss_fn, optimizer, **options)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, CONFIG.n_tokens, CONFIG.embed_dim, generator=gen)
    views = sample_views(3, CONFIG.n_tokens, KEEP, generator=gen)
    momentum = 0.9
    step(x, views, StepSchedule(epoch=1, lr=0.1, weight_decay=0.0, momentum=momentum,
                                freeze_last_layer=False))
    moved = 0
    for name, value in teacher.state_dict().items():
        expected = momentum * before[name] + (1 - momentum) * student.state_dict()[name]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
        moved += not torch.equal(value, before[name])
    assert moved > 0, "the teacher did not move"


def test_the_step_keeps_its_dino_term_apart_from_koleo():
    """A collapse watch reads the DINO term (ln K when uniform); KoLeo adds to the loss."""
    student, teacher = make_models()
    loss_fn = DINOLoss(OUT_DIM, len(KEEP), 0.04, 0.07, 2, 3)
    step = DistillStep(student, teacher, loss_fn, torch.optim.SGD(student.parameters(), lr=0.1),
                       packed=False, koleo_weight=0.5)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, CONFIG.n_tokens, CONFIG.embed_dim, generator=gen)
    loss = step(x, sample_views(3, CONFIG.n_tokens, KEEP, generator=gen),
                StepSchedule(epoch=1, lr=0.1, weight_decay=0.0, momentum=0.9))
    assert step.dino_loss is not None and step.dino_loss.ndim == 0
    assert float(step.dino_loss) != float(loss)
