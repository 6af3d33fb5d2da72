"""The server: masked sampling distillation of the ViT body on uploaded token shards.

Per step, each image gives ``len(global_keep)`` global and ``len(local_keep)`` local
views (random token subsets, :func:`smsd.ops.sample_views`). The student (body +
DINO head) sees every view; the teacher (an EMA of the student) sees the global ones;
:class:`smsd.nn.DINOLoss` ties them. The tokens are already shuffled by each client,
and the body never sees positions, so the shuffle does not matter to training.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checks import non_negative_int, positive_ints
from ..errors import SmsdError
from ..models import DINOHead, ViTBody, ViTConfig
from ..nn import DINOLoss
from ..ops import sample_views
from .body_io import save_body
from .checkpoint import (
    CheckpointError,
    load_latest_checkpoint,
    load_optimizer,
    optimizer_tensors,
    save_checkpoint,
)
from .distill import DistillStep, StepSchedule, StudentModel, koleo_loss
from .distributed import Ranks, barrier, current_ranks, mean_across_ranks, rank_device
from .schedules import cosine_schedule
from .shard import inspect_shard, read_shard
from .training import _param_groups

__all__ = ["PretrainConfig", "Server", "koleo_loss"]
METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class PretrainConfig:
    """Masked sampling distillation hyper-parameters (DINO's names and defaults where
    they apply).

    ``checkpoint_every`` counts epochs, ``checkpoint_every_steps`` iterations (0 = off;
    a mid-epoch checkpoint resumes at the exact data position). ``deterministic`` runs
    with ``torch.use_deterministic_algorithms(True)`` (and a resume keeps the CPU thread
    count of the run it continues), so that a killed and resumed run matches one that
    was never interrupted. ``batch_size`` is the global batch, split across ranks.
    """

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
    checkpoint_every_steps: int = 0
    deterministic: bool = False

    @classmethod
    def with_teacher_temp(cls, teacher_temp: float, **fields) -> PretrainConfig:
        """A config whose teacher warms up from DINO's 0.04 to ``teacher_temp``, or starts
        at ``teacher_temp`` when that is sharper: a warm-up never raises it."""
        return cls(teacher_temp=teacher_temp,
                   warmup_teacher_temp=min(teacher_temp, cls.warmup_teacher_temp), **fields)

    def __post_init__(self) -> None:
        positive_ints(self, "epochs", "batch_size", "out_dim", "hidden_dim", "bottleneck_dim",
                      "checkpoint_every")
        if len(self.global_keep) != 2:
            raise ValueError("global_keep must list exactly 2 ratios (DINO's teacher sees two "
                             f"global views), got {self.global_keep!r}")
        for name in ("global_keep", "local_keep"):
            for ratio in getattr(self, name):
                if not 0.0 < ratio <= 1.0:
                    raise ValueError(f"{name} ratios must be in (0, 1], got {ratio!r}")
        non_negative_int("checkpoint_every_steps", self.checkpoint_every_steps, "0 = off")
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

        Runs data-parallel when a ``torch.distributed`` process group is initialized (see
        :mod:`smsd.protocol.distributed`): every rank loads the shards and trains on its
        block of each global batch of ``batch_size`` images; rank 0 alone writes files.

        Args:
            out: where to save the body (safetensors), written atomically at the end.
            work_dir: folder for checkpoints (every ``checkpoint_every`` epochs, every
                ``checkpoint_every_steps`` iterations if set, and at the end) and
                ``metrics.jsonl`` (one line per epoch).
            resume: continue from ``work_dir``'s newest readable checkpoint (same configs
                and shards), at the exact data position it was written at.
            stop_after: stop after this many epochs (checkpointed), e.g. to time-slice a
                job; schedules still follow ``epochs``.
            progress: show a tqdm progress bar (rank 0).
        """
        cfg = self.train_config
        ranks = current_ranks()
        work = Path(work_dir) if work_dir is not None else None
        if resume and work is None:
            raise PretrainError("resume asked for but no work_dir given")
        tokens = self.load_shards(shard_paths)
        batch = min(cfg.batch_size, tokens.shape[0])
        try:
            rows = ranks.rows(batch)
        except ValueError as exc:
            raise PretrainError(str(exc)) from None
        if work is not None and ranks.is_main:
            work.mkdir(parents=True, exist_ok=True)
        threads = torch.get_num_threads()
        try:
            with _deterministic_mode(cfg.deterministic):
                return self._train(tokens, batch, rows, ranks, out=out, work=work,
                                   resume=resume, stop_after=stop_after, progress=progress)
        finally:
            torch.set_num_threads(threads)  # a deterministic resume may have changed it

    def _train(self, tokens: torch.Tensor, batch: int, rows: slice, ranks: Ranks, *,
               out: str | os.PathLike | None, work: Path | None, resume: bool,
               stop_after: int | None, progress: bool) -> ViTBody:
        from tqdm.auto import tqdm

        cfg = self.train_config
        device = rank_device(cfg.device, ranks)
        packed = cfg.packed if cfg.packed is not None else device.type == "cuda"
        n = tokens.shape[0]
        steps = n // batch  # drop the ragged last batch, as DINO's loader does
        run = _Run.build(self.config, cfg, device)
        position = _Position()
        self.history = []  # this run's epochs (a resume restores the earlier ones)
        if resume:
            position = self._restore(work, run, device, n, steps)
        model: torch.nn.Module = run.student
        if ranks.distributed:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                run.student, device_ids=[device.index] if device.type == "cuda" else None)
        # On GPU the fast path of benchmarks/train_step.py: all views gathered into one
        # packed batch, and the head's last layer fused with the loss (no [rows, K] logits).
        # On CPU the plain step, whose numerics the demo's recorded results come from.
        on_gpu = device.type == "cuda"
        step_fn = DistillStep(model, run.teacher, run.loss_fn, run.optimizer, packed=packed,
                              koleo_weight=cfg.koleo_weight, clip_grad=cfg.clip_grad,
                              fused_gather=packed and on_gpu, fused_head_loss=on_gpu)
        lrs = cosine_schedule(cfg.lr, cfg.min_lr, cfg.epochs, steps, cfg.warmup_epochs)
        wds = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps)
        momenta = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps)
        end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
        done = position.epoch * steps + position.step
        bar = tqdm(total=max(end_epoch * steps - done, 0),
                   disable=not (progress and ranks.is_main), desc="pretrain", unit="step")
        while position.epoch < end_epoch:
            epoch, started = position.epoch, time.perf_counter()
            if position.order is None:
                position.order = torch.randperm(n, generator=run.gen)
            run.student.train()
            for step in range(position.step, steps):
                it = epoch * steps + step
                # The whole global batch is drawn on every rank (same generator, same
                # draws), then each rank keeps its rows: W ranks split the 1-rank run.
                images = position.order[step * batch:(step + 1) * batch]
                views = sample_views(batch, self.config.n_tokens, cfg.keep, generator=run.gen)
                x = tokens[images[rows]].to(device).float()
                index = [idx[rows].to(device) for idx in views]
                schedule = StepSchedule(epoch=epoch, lr=float(lrs[it]),
                                        weight_decay=float(wds[it]),
                                        momentum=float(momenta[it]),
                                        freeze_last_layer=epoch < cfg.freeze_last_layer)
                loss = mean_across_ranks(step_fn(x, index, schedule)).item()
                if not math.isfinite(loss):
                    raise PretrainError(f"loss became {loss} at epoch {epoch}, "
                                        f"step {step}; lower lr")
                position.losses.append(loss)
                position.step = step + 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
                if (work is not None and cfg.checkpoint_every_steps and step + 1 < steps
                        and (it + 1) % cfg.checkpoint_every_steps == 0):
                    self._save(work, it + 1, run, position, ranks, device, n)
            last = epoch * steps + steps - 1
            record = {"epoch": epoch, "loss": sum(position.losses) / len(position.losses),
                      "lr": float(lrs[last]), "weight_decay": float(wds[last]),
                      "momentum": float(momenta[last]),
                      "teacher_temp": _teacher_temp(cfg, epoch),
                      "seconds": time.perf_counter() - started}
            self.history.append(record)
            position = _Position(epoch=epoch + 1)
            if work is None:
                continue
            if ranks.is_main:
                with open(work / METRICS_NAME, "a") as log:
                    log.write(json.dumps(record) + "\n")
            every_steps = cfg.checkpoint_every_steps
            if ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == end_epoch
                    or (every_steps and (last + 1) % every_steps == 0)):
                self._save(work, last + 1, run, position, ranks, device, n)
        bar.close()
        body = run.teacher.body.cpu().eval()
        if out is not None and ranks.is_main:
            save_body(out, body, head_fingerprint=self.head_fingerprint)
        barrier()  # every rank returns once the body file exists
        return body

    # ------------------------------------------------------------ checkpoints
    def _save(self, work: Path, iteration: int, run: _Run, position: _Position, ranks: Ranks,
              device: torch.device, n_images: int) -> None:
        """Checkpoint (rank 0 only: after DDP's averaged update every rank holds the same
        models, optimizer state and center, and draws from the same generator)."""
        if not ranks.is_main:
            return
        tensors: dict[str, torch.Tensor] = {}
        for prefix, module in (("student", run.student), ("teacher", run.teacher),
                               ("loss", run.loss_fn)):
            tensors.update({f"{prefix}/{k}": v for k, v in module.state_dict().items()})
        optimizer, optimizer_record = optimizer_tensors(run.optimizer)
        tensors.update(optimizer)
        tensors["rng/generator"] = run.gen.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        if device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
        if position.order is not None:
            tensors["data/order"] = position.order
        state = {"epoch": position.epoch, "step": position.step, "iteration": iteration,
                 "epoch_losses": position.losses, "history": self.history,
                 "n_images": n_images, "model_config": self.config.to_json(),
                 "train_config": _config_record(self.train_config),
                 "optimizer": optimizer_record, "world_size": ranks.world_size,
                 "num_threads": torch.get_num_threads()}
        save_checkpoint(work, iteration, tensors, state)

    def _check_compatible(self, path: Path, state: dict[str, Any], n_images: int) -> None:
        """Refuse a checkpoint of another model, training config or data set."""
        if state.get("model_config") != self.config.to_json():
            raise PretrainError(f"checkpoint {path} is for another model config")
        stored, now = state.get("train_config"), _config_record(self.train_config)
        if not isinstance(stored, dict):
            raise PretrainError(f"checkpoint {path} holds no training config")
        changed = sorted(k for k in set(stored) | set(now)
                         if k not in _RUN_FIELDS and stored.get(k) != now.get(k))
        if changed:
            detail = ", ".join(f"{k}: {stored.get(k)!r} in the checkpoint, {now.get(k)!r} now"
                               for k in changed)
            raise PretrainError(f"checkpoint {path} is for another training config ({detail})")
        if state.get("n_images") != n_images:
            raise PretrainError(f"checkpoint {path} was trained on {state.get('n_images')} "
                                f"images; the shards given hold {n_images}")

    def _restore(self, work: Path, run: _Run, device: torch.device, n_images: int,
                 steps: int) -> _Position:
        """Load the newest readable checkpoint into ``run``; rewrite ``metrics.jsonl`` to
        the epochs it holds (later lines belong to a lost future)."""
        try:
            path, state, tensors = load_latest_checkpoint(work)
        except CheckpointError as exc:
            raise PretrainError(f"cannot resume: {exc}") from None
        self._check_compatible(path, state, n_images)
        try:
            for prefix, module in (("student", run.student), ("teacher", run.teacher),
                                   ("loss", run.loss_fn)):
                module.load_state_dict(_with_prefix(tensors, prefix))
            load_optimizer(run.optimizer, tensors, state["optimizer"])
            run.gen.set_state(tensors["rng/generator"])
            torch.set_rng_state(tensors["rng/torch"])
            if device.type == "cuda" and "rng/cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng/cuda"], device)
            position = _Position(epoch=int(state["epoch"]), step=int(state["step"]),
                                 order=tensors.get("data/order"),
                                 losses=[float(v) for v in state["epoch_losses"]])
            history = list(state["history"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise PretrainError(f"checkpoint {path} does not fit this run: {exc}") from None
        problem = position.problem(self.train_config.epochs, steps, n_images)
        if problem:
            raise PretrainError(f"checkpoint {path} has a bad data position: {problem}")
        threads = state.get("num_threads")
        if (self.train_config.deterministic and isinstance(threads, int)
                and threads != torch.get_num_threads()):
            warnings.warn(f"deterministic resume: using the {threads} CPU threads the run "
                          f"started with (not {torch.get_num_threads()})", stacklevel=3)
            torch.set_num_threads(threads)
        self.history = history
        if current_ranks().is_main:
            from ..io import atomic_write_bytes

            lines = "".join(json.dumps(record) + "\n" for record in history)
            atomic_write_bytes(work / METRICS_NAME, lines.encode())
        return position


# Fields that say how a run is operated, not what it computes: a resume may change them.
_RUN_FIELDS = frozenset({"checkpoint_every", "checkpoint_every_steps", "device",
                         "deterministic"})


def _config_record(cfg: PretrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))  # tuples → lists, as a checkpoint holds it


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    start = prefix + "/"
    return {k.removeprefix(start): v for k, v in tensors.items() if k.startswith(start)}


@contextlib.contextmanager
def _deterministic_mode(on: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` for the run (restored after)."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    # cuBLAS is deterministic only with a fixed workspace (read when it initializes).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


@dataclass
class _Position:
    """Where training stands: epoch, steps done in it, its image order, their losses."""

    epoch: int = 0
    step: int = 0
    order: torch.Tensor | None = None
    losses: list[float] = field(default_factory=list)

    def problem(self, epochs: int, steps: int, n_images: int) -> str | None:
        """Why this position cannot be one of a run of ``epochs`` × ``steps`` (or None)."""
        if not (0 <= self.epoch <= epochs and 0 <= self.step < steps):
            return f"epoch {self.epoch}, step {self.step} of {epochs} × {steps}"
        if len(self.losses) != self.step:
            return f"{len(self.losses)} losses logged for {self.step} steps"
        if (self.order is None) != (self.step == 0):
            return "an image order must be stored exactly when inside an epoch"
        if self.order is not None and not (
                self.order.dtype == torch.int64 and self.order.shape == (n_images,)
                and torch.equal(self.order.sort().values, torch.arange(n_images))):
            return f"the image order is not a permutation of {n_images} images"
        return None


@dataclass
class _Run:
    """What training updates (student unwrapped: checkpoints never depend on DDP)."""

    student: StudentModel
    teacher: StudentModel
    loss_fn: DINOLoss
    optimizer: torch.optim.Optimizer
    gen: torch.Generator

    @classmethod
    def build(cls, model_config: ViTConfig, cfg: PretrainConfig, device: torch.device) -> _Run:
        torch.manual_seed(cfg.seed)  # same init on every rank
        student = StudentModel(
            ViTBody(model_config),
            DINOHead(model_config.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                     norm_last_layer=cfg.norm_last_layer),
        ).to(device)
        teacher = copy.deepcopy(student).requires_grad_(False)
        loss_fn = DINOLoss(cfg.out_dim, len(cfg.keep), cfg.warmup_teacher_temp,
                           cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, cfg.epochs,
                           student_temp=cfg.student_temp,
                           center_momentum=cfg.center_momentum).to(device)
        optimizer = torch.optim.AdamW(_param_groups(student, 0.0), fused=device.type == "cuda")
        return cls(student, teacher, loss_fn, optimizer,
                   torch.Generator().manual_seed(cfg.seed))
