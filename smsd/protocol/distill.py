"""One masked-sampling distillation step: the server's hot loop body.

Kept apart from :class:`smsd.protocol.Server` (data, schedules, checkpoints, logging) so
that the training loop, the multi-GPU path and ``benchmarks/train_step.py`` run exactly
the same step. The step never synchronizes with the host: it returns the loss as a
tensor and leaves checking it to the caller.

Fast-path options (all off by default, each tested to give the plain step's result):
``fused_gather`` lays out every view of every image as one packed varlen batch with a
single row gather (the CLS token rides along as one more row), so the step needs no
per-view copies and no host-built ``cu_seqlens``; ``fused_head_loss``
runs the head's last layer inside :func:`~smsd.ops.fused_linear_dino_loss`, so the
``[views x B, 65536]`` logits never exist; ``compile_blocks`` compiles the transformer
blocks (the fused attention stays eager between the compiled pieces);
``checkpoint_blocks`` trades a second forward of some blocks for their activation memory.
The fast path's first step for a given batch shape moves its cached packing layout to
the device once; every later step is free of host synchronization.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import non_negative_int
from ..models import DINOHead, ViTBody
from ..nn import DINOLoss
from ..ops import masked_sample
from ..validation import validation

__all__ = ["PHASES", "DistillStep", "PackedViews", "StepSchedule", "StudentModel",
           "StudentOutput", "koleo_loss", "pack_views", "packed_cls_features"]

# Graphs one compiled step may keep: one per teacher temperature of the warm-up, and more.
_RECOMPILE_LIMIT = 64

# What DistillStep reports to its ``on_phase`` hook, in order, after each part of a step.
PHASES = ("sampling", "teacher_fwd", "student_fwd", "loss", "backward", "optimizer_ema")


@dataclass(frozen=True)
class PackedViews:
    """Every view of a batch as one packed varlen batch (see :func:`pack_views`).

    ``tokens`` ``[B, N, D]`` are the images. ``rows`` ``[B * L]`` indexes the ``B * N``
    token rows followed by one CLS row (row ``B * N``): for each image and each view in
    turn, the CLS row and then the view's tokens. The packed sequences are thus
    image-major; ``cls_rows`` lists their CLS rows view-major (the order DINO's loss wants).
    """

    tokens: torch.Tensor
    rows: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    cls_rows: torch.Tensor


class _PackedLayout:
    """The parts of a packing that depend only on the batch size and view sizes, built
    once on the host and moved to the device once (building them per step would cost a
    host-to-device copy, which synchronizes)."""

    def __init__(self, batch: int, sizes: Sequence[int], n_tokens: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        lengths = [k + 1 for k in sizes]  # each sequence: CLS + the view's tokens
        per_image = sum(lengths)
        offsets = [sum(lengths[:v]) for v in range(len(lengths))]
        cu = torch.tensor([0] + lengths * batch, dtype=torch.int64).cumsum(0)
        self.cu_seqlens = cu.to(device=device, dtype=torch.int32)
        self.max_seqlen = max(lengths)
        self.cls_rows = torch.tensor([b * per_image + offsets[v] for v in range(len(sizes))
                                      for b in range(batch)], device=device)
        # CLS slot of image b before its row offset b * N is added: B * N - b * N
        self.cls_slot = torch.arange(batch, 0, -1, dtype=dtype, device=device)[:, None] * n_tokens
        self.row_offset = torch.arange(batch, dtype=dtype, device=device)[:, None] * n_tokens


@functools.lru_cache(maxsize=16)
def _layout(batch: int, sizes: tuple[int, ...], n_tokens: int, device: torch.device,
            dtype: torch.dtype) -> _PackedLayout:
    return _PackedLayout(batch, sizes, n_tokens, device, dtype)


def packed_layout(x: torch.Tensor, index: Sequence[torch.Tensor]) -> _PackedLayout:
    """The cached, shape-only part of :func:`pack_views` for these views (host-built
    once per shape). A compiled step takes it as an input rather than tracing it."""
    sizes = tuple(int(i.shape[1]) for i in index)
    return _layout(x.shape[0], sizes, x.shape[1], x.device, index[0].dtype)


def pack_views(x: torch.Tensor, index: Sequence[torch.Tensor],
               layout: _PackedLayout | None = None) -> PackedViews:
    """Describe views ``index`` (one ``[B, k_v]`` tensor each, values in ``[0, N)``, not
    checked: reading them would synchronize) of images ``x`` ``[B, N, D]`` as one packed
    batch; the gather itself runs in :func:`packed_cls_features`. Two small launches,
    sync-free after the first call for a given shape."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D], got shape {list(x.shape)}")
    if not index:
        raise ValueError("index must hold at least one view")
    batch = x.shape[0]
    for v, i in enumerate(index):
        if i.dim() != 2 or i.shape[0] != batch or i.device != x.device:
            raise ValueError(f"index[{v}] must be [B={batch}, k] on {x.device}, got shape "
                             f"{list(i.shape)} on {i.device}")
    dtype = index[0].dtype
    if layout is None:
        layout = packed_layout(x, index)
    pieces = [p for i in index for p in (layout.cls_slot, i.to(dtype))]
    rows = (torch.cat(pieces, dim=1) + layout.row_offset).reshape(-1)
    return PackedViews(x, rows, layout.cu_seqlens, layout.max_seqlen, layout.cls_rows)


def packed_cls_features(body: ViTBody, views: PackedViews,
                        checkpoint_blocks: int = 0) -> torch.Tensor:
    """The body's CLS features ``[V * B, D]`` (view-major) of packed views: one gather,
    one varlen attention call per block. Equal to ``body.forward_views(views)``.

    ``checkpoint_blocks``: see :meth:`ViTBody.forward_packed`.
    """
    x = views.tokens
    dim = x.shape[-1]
    # A plain row gather, not masked_sample: an image's views together hold more than N
    # tokens, and the CLS row must be gathered too (its gradient flows back through it).
    table = torch.cat([x.reshape(-1, dim), body.cls_token.reshape(1, dim).to(x.dtype)])
    return body.forward_packed(table.index_select(0, views.rows), views.cu_seqlens,
                               views.max_seqlen, views.cls_rows, checkpoint_blocks)


class StudentOutput(NamedTuple):
    """What :class:`StudentModel` returns for every view (view-major rows)."""

    features: torch.Tensor  # the body's CLS features [V * B, D]
    logits: torch.Tensor | None  # the head's output (None with fused_head)
    bottleneck: torch.Tensor | None  # with fused_head: the head before its last layer,
    weight: torch.Tensor | None  # and that layer's weight (smsd.nn.DINOLoss.forward_fused)


class StudentModel(nn.Module):
    """Body + DINO projection head."""

    def __init__(self, body: ViTBody, head: DINOHead) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, views: Sequence[torch.Tensor] | PackedViews, *, packed: bool = False,
                fused_head: bool = False, checkpoint_blocks: int = 0) -> StudentOutput:
        """Views as tensors ``[B, k_v, D]`` (``packed``: one varlen batch) or as
        :class:`PackedViews` (``checkpoint_blocks``: see :meth:`ViTBody.forward_packed`).
        ``fused_head`` stops the head before its last layer, for
        :func:`~smsd.ops.fused_linear_dino_loss`, which never stores the logits."""
        if isinstance(views, PackedViews):
            features = packed_cls_features(self.body, views, checkpoint_blocks)
        else:
            features = self.body.forward_views(views, packed=packed)
        if not fused_head:
            return StudentOutput(features, self.head(features), None, None)
        # DINOHead.forward without its last layer
        bottleneck = F.normalize(self.head.mlp(features), dim=-1, p=2)
        return StudentOutput(features, None, bottleneck, self.head.last_layer.weight)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regularizer: ``-mean log(distance to the nearest neighbour)`` of the
    L2-normalized rows; it spreads features over the sphere, against collapse."""
    x = nn.functional.normalize(features.float(), dim=-1, eps=eps)
    dots = x @ x.T
    dots.fill_diagonal_(-2.0)  # never pick yourself as the neighbour
    nearest = dots.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()


@dataclass(frozen=True)
class StepSchedule:
    """The scheduled values of one step."""

    epoch: int
    lr: float
    weight_decay: float
    momentum: float
    freeze_last_layer: bool = False


class DistillStep:
    """Student on every view, EMA teacher on the two global views, DINO loss, update.

    Args:
        student: the trained model, or its ``DistributedDataParallel`` wrapper.
        teacher: a :class:`StudentModel` updated as an EMA of the student.
        loss_fn: :class:`smsd.nn.DINOLoss` (holds the center).
        optimizer: its param group 0 is decayed, the others are not.
        packed: run all views in one packed varlen attention call.
        koleo_weight: weight of :func:`koleo_loss` on the global views' CLS features.
        clip_grad: max gradient norm (0 = off).
        autocast_dtype: autocast dtype on CUDA (None = full precision).
        fused_gather: gather all views with one :func:`~smsd.ops.masked_sample` into one
            packed batch (:func:`pack_views`); needs ``packed``.
        fused_head_loss: compute the head's last layer and the loss with
            :func:`~smsd.ops.fused_linear_dino_loss` (the logits are never stored).
        compile_blocks: ``torch.compile`` every transformer block of student and teacher
            (static shapes), in place.
        compile_step: ``torch.compile(fullgraph=True)`` the whole forward of the step:
            sampling, teacher, student and loss, with the smsd ops inside the graph (they
            are ``torch.library`` custom ops), so LayerNorm, GELU and residuals fuse around
            the kernels; backward and optimizer stay eager. One graph per teacher
            temperature (each warm-up epoch has its own). ``on_phase`` then sees the
            forward as one phase, reported as ``"loss"``.
        checkpoint_blocks: recompute the first this many student blocks in the backward
            pass instead of storing their activations (less memory, one more forward of
            those blocks); needs ``fused_gather``.
        on_phase: called with each name of :data:`PHASES` as that part of the step ends
            (for a timing breakdown; ``None`` in training).
    """

    def __init__(self, student: nn.Module, teacher: StudentModel, loss_fn: DINOLoss,
                 optimizer: torch.optim.Optimizer, *, packed: bool, koleo_weight: float = 0.0,
                 clip_grad: float = 0.0,
                 autocast_dtype: torch.dtype | None = torch.bfloat16,
                 fused_gather: bool = False, fused_head_loss: bool = False,
                 compile_blocks: bool = False, compile_step: bool = False,
                 checkpoint_blocks: int = 0, on_phase: Callable[[str], None] | None = None) -> None:
        if fused_gather and not packed:
            raise ValueError("fused_gather=True lays views out as one packed batch: it needs "
                             "packed=True")
        non_negative_int("checkpoint_blocks", checkpoint_blocks)
        if checkpoint_blocks and not fused_gather:
            raise ValueError("checkpoint_blocks applies to the packed layout of "
                             "fused_gather=True; set fused_gather=True")
        if fused_head_loss and not isinstance(loss_fn, DINOLoss):
            raise TypeError("fused_head_loss=True needs loss_fn to be a smsd.nn.DINOLoss, got "
                            f"{type(loss_fn).__name__}")
        self.student = student
        self.teacher = teacher
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.packed = packed
        self.koleo_weight = koleo_weight
        self.dino_loss: torch.Tensor | None = None  # the last step's DINO term (detached)
        self.clip_grad = clip_grad
        self.autocast_dtype = autocast_dtype
        self.fused_gather = fused_gather
        self.fused_head_loss = fused_head_loss
        self.checkpoint_blocks = checkpoint_blocks
        self.on_phase = on_phase
        module = getattr(student, "module", student)  # unwrap DDP
        self._student_params = list(module.parameters())
        self._teacher_params = list(teacher.parameters())
        self._last_layer = [p for name, p in module.head.named_parameters()
                            if name.startswith("last_layer")]
        if compile_blocks and compile_step:
            raise ValueError("compile_step compiles the blocks too: pass one of "
                             "compile_blocks and compile_step")
        if compile_blocks:
            for model in (module, teacher):
                for block in model.body.blocks:
                    block.compile(dynamic=False)
        self._loss_options: dict = {}
        self._compiled_loss = None
        if compile_step:
            self._compiled_loss = torch.compile(self._forward_loss, fullgraph=True,
                                                dynamic=False)

    def _mark(self, phase: str) -> None:
        if self.on_phase is not None:
            self.on_phase(phase)

    def _forward_loss(self, x: torch.Tensor, index: tuple[torch.Tensor, ...],
                      layouts: tuple[_PackedLayout, _PackedLayout] | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views, teacher and student forward, loss: ``(loss, detached DINO term)``. What
        ``compile_step`` compiles whole (``fullgraph=True``)."""
        batch = x.shape[0]
        autocast_on = x.device.type == "cuda" and self.autocast_dtype is not None
        autocast = torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16,
                                  enabled=autocast_on)
        fused = self.fused_head_loss
        marks = self._compiled_loss is None  # phase hooks cannot run inside a graph
        with autocast:
            if self.fused_gather:
                student_in = pack_views(x, index, layouts[0])
                teacher_in = pack_views(x, index[:2], layouts[1])
            else:
                student_in = [masked_sample(x, idx, unique=True) for idx in index]
                teacher_in = student_in[:2]
            if marks:
                self._mark("sampling")
            with torch.no_grad():
                teacher_out = self.teacher(teacher_in, packed=self.packed, fused_head=fused)
            if marks:
                self._mark("teacher_fwd")
            student_out = self.student(student_in, packed=self.packed, fused_head=fused,
                                       checkpoint_blocks=self.checkpoint_blocks)
            features = student_out.features
            if marks:
                self._mark("student_fwd")
            options = self._loss_options
            if fused:
                # The op computes in its inputs' dtype: under autocast, the autocast dtype,
                # as the unfused head's last Linear would.
                dtype = self.autocast_dtype if autocast_on else student_out.bottleneck.dtype
                loss = self.loss_fn.forward_fused(
                    student_out.bottleneck.to(dtype), teacher_out.bottleneck.to(dtype),
                    student_out.weight.to(dtype), options=options,
                    teacher_weight=teacher_out.weight.to(dtype))
            else:
                loss = self.loss_fn(student_out.logits.float(), teacher_out.logits.float(),
                                    options=options)
            dino = loss.detach()
            if self.koleo_weight:
                # As in DINOv2: on the CLS features of each global view separately.
                loss = loss + self.koleo_weight * sum(
                    koleo_loss(f) for f in features[:2 * batch].chunk(2))
            if marks:
                self._mark("loss")
        return loss, dino

    def __call__(self, x: torch.Tensor, index: Sequence[torch.Tensor],
                 schedule: StepSchedule) -> torch.Tensor:
        """One update on images ``x`` ``[B, N, D]`` with one index ``[B, k]`` per view
        (global views first); returns the detached loss."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = schedule.lr
            group["weight_decay"] = schedule.weight_decay if i == 0 else 0.0
        self._loss_options = self.loss_fn.options(schedule.epoch)
        index = tuple(index)
        # built (once per shape) outside a compiled graph, which takes them as inputs
        layouts = ((packed_layout(x, index), packed_layout(x, index[:2]))
                   if self.fused_gather else None)
        with validation(False):  # indices come from sample_views: in range and distinct
            if self._compiled_loss is None:
                loss, dino = self._forward_loss(x, index, layouts)
            else:
                # each warm-up epoch's teacher temperature is a constant of its own graph
                with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                    loss, dino = self._compiled_loss(x, index, layouts)
                self._mark("loss")
        self.dino_loss = dino  # without KoLeo: what a collapse watch reads
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._mark("backward")
        if self.clip_grad:
            nn.utils.clip_grad_norm_(self._student_params, self.clip_grad)
        if schedule.freeze_last_layer:
            for p in self._last_layer:
                p.grad = None
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self._teacher_params, self._student_params,
                                 1.0 - schedule.momentum)
        self._mark("optimizer_ema")
        return loss.detach()
