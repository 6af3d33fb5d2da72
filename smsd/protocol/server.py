"""The server: masked sampling distillation of the ViT body on uploaded token shards.

Per step, each image gives ``len(global_keep)`` global and ``len(local_keep)`` local
views (random token subsets, :func:`smsd.ops.sample_views`). The student (body +
DINO head) sees every view; the teacher (an EMA of the student) sees the global ones;
:class:`smsd.nn.DINOLoss` ties them. The tokens are already shuffled by each client,
and the body never sees positions, so the shuffle does not matter to training.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import SmsdError
from ..models import DINOHead, ViTBody, ViTConfig
from ..nn import DINOLoss
from ..ops import sample_views
from .body_io import save_body
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .distill import DistillStep, StepSchedule, StudentModel, koleo_loss
from .schedules import cosine_schedule
from .shard import inspect_shard, read_shard
from .training import _param_groups

__all__ = ["PretrainConfig", "Server", "koleo_loss"]
METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class PretrainConfig:
    """Masked sampling distillation hyper-parameters (DINO's names and defaults where
    they apply)."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    global_keep: tuple[float, ...] = (0.5, 0.5)
    local_keep: tuple[float, ...] = field(default_factory=lambda: (0.2,) * 8)
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    clip_grad: float = 3.0
    freeze_last_layer: int = 1
    koleo_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 10
    packed: bool | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "out_dim", "hidden_dim", "bottleneck_dim",
                     "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(self.global_keep) != 2:
            raise ValueError("global_keep must list exactly 2 ratios (DINO's teacher sees two "
                             f"global views), got {self.global_keep!r}")
        for name in ("global_keep", "local_keep"):
            for ratio in getattr(self, name):
                if not 0.0 < ratio <= 1.0:
                    raise ValueError(f"{name} ratios must be in (0, 1], got {ratio!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.koleo_weight >= 0:
            raise ValueError(f"koleo_weight must be >= 0, got {self.koleo_weight!r}")

    @property
    def keep(self) -> tuple[float, ...]:
        return tuple(self.global_keep) + tuple(self.local_keep)


def _teacher_temp(cfg: PretrainConfig, epoch: int) -> float:
    """DINO's teacher temperature at ``epoch``: linear warm-up, then constant (for the log;
    the loss module keeps its own schedule)."""
    warm = cfg.warmup_teacher_temp_epochs
    if epoch >= warm:
        return cfg.teacher_temp
    step = (cfg.teacher_temp - cfg.warmup_teacher_temp) / max(warm - 1, 1)
    return cfg.warmup_teacher_temp + step * epoch


class PretrainError(SmsdError, ValueError):
    """Pre-training cannot start or resume (bad shards, checkpoint mismatch)."""


class Server:
    """Trains the ViT body once on every client's shard.

    Args:
        model_config: the public model config the clients encoded with.
        train_config: :class:`PretrainConfig`.
        head_fingerprint: the fingerprint every shard must carry (default: that of the
            seeded head of ``model_config``).
    """

    def __init__(self, model_config: ViTConfig, train_config: PretrainConfig | None = None,
                 head_fingerprint: str | None = None) -> None:
        from ..models import PatchHead
        from ..models import head_fingerprint as fingerprint_of

        self.config = model_config
        self.train_config = train_config or PretrainConfig()
        self.head_fingerprint = head_fingerprint or fingerprint_of(PatchHead(model_config))
        self.history: list[dict] = []

    # ------------------------------------------------------------------ data
    def load_shards(self, shard_paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Validate every shard's header first (nothing is trained on a bad set), then
        load and concatenate their tokens (fp16 ``[n, N, D]``)."""
        if not shard_paths:
            raise PretrainError("no shards given")
        expect = dict(head_fingerprint=self.head_fingerprint, grid=self.config.grid,
                      embed_dim=self.config.embed_dim)
        for path in shard_paths:
            inspect_shard(path, **expect)
        return torch.cat([read_shard(path, **expect) for path in shard_paths])

    # -------------------------------------------------------------- training
    def pretrain(self, shard_paths: Sequence[str | os.PathLike], *,
                 out: str | os.PathLike | None = None,
                 work_dir: str | os.PathLike | None = None, resume: bool = False,
                 stop_after: int | None = None, progress: bool = True) -> ViTBody:
        """Masked sampling distillation on the shards; returns the trained (teacher) body.

        Args:
            out: where to save the body (safetensors), written atomically at the end.
            work_dir: folder for ``checkpoint.pt`` (every ``checkpoint_every`` epochs and
                at the end) and ``metrics.jsonl`` (one line per epoch).
            resume: continue from ``work_dir``'s checkpoint (same configs and shards).
            stop_after: stop after this many epochs (checkpointed), e.g. to time-slice a
                job; schedules still follow ``epochs``.
            progress: show a tqdm progress bar.
        """
        from tqdm.auto import tqdm

        cfg = self.train_config
        tokens = self.load_shards(shard_paths)
        device = torch.device(cfg.device)
        packed = cfg.packed if cfg.packed is not None else device.type == "cuda"
        work = Path(work_dir) if work_dir is not None else None
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
        if resume and (work is None or not (work / CHECKPOINT_NAME).is_file()):
            raise PretrainError(f"resume asked for but no {CHECKPOINT_NAME} in {work}")

        n = tokens.shape[0]
        batch = min(cfg.batch_size, n)
        steps = n // batch  # drop the ragged last batch, as DINO's loader does
        n_tokens = self.config.n_tokens
        torch.manual_seed(cfg.seed)
        student = StudentModel(
            ViTBody(self.config),
            DINOHead(self.config.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                     norm_last_layer=cfg.norm_last_layer),
        ).to(device)
        teacher = copy.deepcopy(student).requires_grad_(False)
        loss_fn = DINOLoss(cfg.out_dim, len(cfg.keep), cfg.warmup_teacher_temp, cfg.teacher_temp,
                           cfg.warmup_teacher_temp_epochs, cfg.epochs,
                           student_temp=cfg.student_temp,
                           center_momentum=cfg.center_momentum).to(device)
        optimizer = torch.optim.AdamW(_param_groups(student, 0.0))
        lrs = cosine_schedule(cfg.lr, cfg.min_lr, cfg.epochs, steps,
                              cfg.warmup_epochs)
        wds = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps)
        momenta = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps)
        gen = torch.Generator().manual_seed(cfg.seed)
        start_epoch = 0
        if resume:
            start_epoch = self._load_checkpoint(work / CHECKPOINT_NAME, student, teacher,
                                                loss_fn, optimizer, gen)
        step_fn = DistillStep(student, teacher, loss_fn, optimizer, packed=packed,
                              koleo_weight=cfg.koleo_weight, clip_grad=cfg.clip_grad)
        end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
        bar = tqdm(total=(end_epoch - start_epoch) * steps, disable=not progress,
                   desc="pretrain", unit="step")
        for epoch in range(start_epoch, end_epoch):
            started, losses = time.perf_counter(), []
            order = torch.randperm(n, generator=gen)
            student.train()
            for step in range(steps):
                it = epoch * steps + step
                x = tokens[order[step * batch:(step + 1) * batch]].to(device).float()
                index = [idx.to(device) for idx in
                         sample_views(batch, n_tokens, cfg.keep, generator=gen)]
                schedule = StepSchedule(epoch=epoch, lr=float(lrs[it]),
                                        weight_decay=float(wds[it]),
                                        momentum=float(momenta[it]),
                                        freeze_last_layer=epoch < cfg.freeze_last_layer)
                loss = step_fn(x, index, schedule).item()
                if not math.isfinite(loss):
                    raise PretrainError(f"loss became {loss} at epoch {epoch}, "
                                        f"step {step}; lower lr")
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
            record = {"epoch": epoch, "loss": sum(losses) / len(losses), "lr": float(lrs[it]),
                      "weight_decay": float(wds[it]), "momentum": float(momenta[it]),
                      "teacher_temp": _teacher_temp(cfg, epoch),
                      "seconds": time.perf_counter() - started}
            self.history.append(record)
            if work is not None:
                with open(work / METRICS_NAME, "a") as log:
                    log.write(json.dumps(record) + "\n")
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == end_epoch:
                    self._save_checkpoint(work / CHECKPOINT_NAME, epoch + 1, student, teacher,
                                          loss_fn, optimizer, gen)
        bar.close()
        body = teacher.body.cpu().eval()
        if out is not None:
            save_body(out, body, head_fingerprint=self.head_fingerprint)
        return body

    # ------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, path: Path, epoch: int, student, teacher, loss_fn, optimizer,
                         gen) -> None:
        state = {"epoch": epoch, "student": student.state_dict(),
                 "teacher": teacher.state_dict(), "loss": loss_fn.state_dict(),
                 "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                 "model_config": self.config.to_json(),
                 "train_config": json.dumps(asdict(self.train_config), sort_keys=True)}
        save_checkpoint(path, state)

    def _load_checkpoint(self, path: Path, student, teacher, loss_fn, optimizer, gen) -> int:
        state = load_checkpoint(path)
        if state.get("model_config") != self.config.to_json():
            raise PretrainError(f"checkpoint {path} is for another model config")
        if state.get("train_config") != json.dumps(asdict(self.train_config), sort_keys=True):
            raise PretrainError(f"checkpoint {path} is for another training config")
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        return int(state["epoch"])
