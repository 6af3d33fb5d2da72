"""What a pre-training run updates and where it stands, and their checkpoints.

:class:`RunState` holds the models, the loss (with its center), the optimizer and the
data generator; :class:`Position` the epoch, the step within it, that epoch's image order
and losses. :func:`save_run` writes both (plus RNG states and the configs) through
:mod:`.checkpoint`; :func:`restore_run` reads the newest readable checkpoint back after
checking it belongs to this model, recipe and data set.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SmsdError
from ..models import DINOHead, ViTBody, ViTConfig
from ..nn import DINOLoss
from .checkpoint import (
    CheckpointError,
    checkpoint_paths,
    load_latest_checkpoint,
    load_optimizer,
    optimizer_tensors,
    save_checkpoint,
)
from .distill import StudentModel
from .pretrain_config import PretrainConfig
from .training import param_groups

__all__ = ["METRICS_NAME", "Position", "PretrainError", "RunState", "ShardRecord",
           "deterministic_mode", "restore_run", "run_files", "save_run"]

METRICS_NAME = "metrics.jsonl"


class PretrainError(SmsdError, ValueError):
    """Pre-training cannot start or go on (bad shards, a checkpoint of another run...)."""


@dataclass
class Position:
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
class RunState:
    """What training updates (student unwrapped: checkpoints never depend on DDP)."""

    student: StudentModel
    teacher: StudentModel
    loss_fn: DINOLoss
    optimizer: torch.optim.Optimizer
    gen: torch.Generator

    @classmethod
    def build(cls, model_config: ViTConfig, cfg: PretrainConfig,
              device: torch.device) -> RunState:
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
        optimizer = torch.optim.AdamW(param_groups(student, 0.0), fused=device.type == "cuda")
        return cls(student, teacher, loss_fn, optimizer,
                   torch.Generator().manual_seed(cfg.seed))

    def modules(self) -> tuple[tuple[str, torch.nn.Module], ...]:
        return (("student", self.student), ("teacher", self.teacher), ("loss", self.loss_fn))


def _config_record(cfg: PretrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg)))  # tuples → lists, as a checkpoint holds it


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    start = prefix + "/"
    return {k.removeprefix(start): v for k, v in tensors.items() if k.startswith(start)}


@dataclass(frozen=True)
class ShardRecord:
    """One shard a run trains on: its file name and the SHA-256 of its bytes."""

    name: str
    sha256: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}


def save_run(work: Path, iteration: int, run: RunState, position: Position, *,
             history: list[dict], model_config: ViTConfig, train_config: PretrainConfig,
             n_images: int, shards: list[ShardRecord], world_size: int,
             device: torch.device) -> None:
    """Checkpoint ``run`` at ``position`` (the caller writes on one rank only)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in run.modules():
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
             "epoch_losses": position.losses, "history": history,
             "n_images": n_images, "shards": [s.to_json() for s in shards],
             "model_config": model_config.to_json(),
             "train_config": _config_record(train_config),
             "optimizer": optimizer_record, "world_size": world_size,
             "num_threads": torch.get_num_threads()}
    save_checkpoint(work, iteration, tensors, state)


def _check_shards(path: Path, stored: object, shards: list[ShardRecord]) -> None:
    """Refuse a checkpoint trained on other shards (by content, in order)."""
    if not isinstance(stored, list):
        raise PretrainError(f"checkpoint {path} records no shard digests (written by an "
                            "older smsd): it cannot prove the shards are the same")
    if len(stored) != len(shards):
        raise PretrainError(f"checkpoint {path} was trained on {len(stored)} shard(s); "
                            f"{len(shards)} given")
    for i, (old, new) in enumerate(zip(stored, shards, strict=True)):
        if not isinstance(old, dict) or old.get("sha256") != new.sha256:
            was = old.get("name") if isinstance(old, dict) else "?"
            raise PretrainError(
                f"shard {new.name} (position {i + 1}) is not the shard the run in {path.parent} "
                f"was trained on ({was}): its content differs; resume with the same shards "
                "in the same order, or start over without --resume")


def _check_compatible(path: Path, state: dict[str, Any], model_config: ViTConfig,
                      train_config: PretrainConfig, n_images: int,
                      shards: list[ShardRecord]) -> None:
    """Refuse a checkpoint of another model, training config or data set."""
    if state.get("model_config") != model_config.to_json():
        raise PretrainError(f"checkpoint {path} is for another model config")
    stored, now = state.get("train_config"), _config_record(train_config)
    if not isinstance(stored, dict):
        raise PretrainError(f"checkpoint {path} holds no training config")
    changed = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
    if changed:
        detail = ", ".join(f"{k}: {stored.get(k)!r} in the checkpoint, {now.get(k)!r} now"
                           for k in changed)
        raise PretrainError(f"checkpoint {path} is for another training config ({detail})")
    if state.get("n_images") != n_images:
        raise PretrainError(f"checkpoint {path} was trained on {state.get('n_images')} "
                            f"images; the shards given hold {n_images}")
    _check_shards(path, state.get("shards"), shards)


def run_files(work: Path) -> list[Path]:
    """The files of a run in ``work``: its checkpoints and ``metrics.jsonl``."""
    found = [p for _, p in checkpoint_paths(work)]
    if (work / METRICS_NAME).exists():
        found.append(work / METRICS_NAME)
    return found


def restore_run(work: Path, run: RunState, *, model_config: ViTConfig,
                train_config: PretrainConfig, device: torch.device, n_images: int,
                shards: list[ShardRecord], steps: int,
                deterministic: bool) -> tuple[Position, list[dict]]:
    """Load the newest readable checkpoint into ``run``; return its position and the
    epochs' history."""
    try:
        path, state, tensors = load_latest_checkpoint(work)
    except CheckpointError as exc:
        raise PretrainError(f"cannot resume: {exc}") from None
    _check_compatible(path, state, model_config, train_config, n_images, shards)
    try:
        for prefix, module in run.modules():
            module.load_state_dict(_with_prefix(tensors, prefix))
        load_optimizer(run.optimizer, tensors, state["optimizer"])
        run.gen.set_state(tensors["rng/generator"])
        torch.set_rng_state(tensors["rng/torch"])
        if device.type == "cuda" and "rng/cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng/cuda"], device)
        position = Position(epoch=int(state["epoch"]), step=int(state["step"]),
                            order=tensors.get("data/order"),
                            losses=[float(v) for v in state["epoch_losses"]])
        history = list(state["history"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise PretrainError(f"checkpoint {path} does not fit this run: {exc}") from None
    problem = position.problem(train_config.epochs, steps, n_images)
    if problem:
        raise PretrainError(f"checkpoint {path} has a bad data position: {problem}")
    threads = state.get("num_threads")
    if deterministic and isinstance(threads, int) and threads != torch.get_num_threads():
        warnings.warn(f"deterministic resume: using the {threads} CPU threads the run "
                      f"started with (not {torch.get_num_threads()})", stacklevel=4)
        torch.set_num_threads(threads)
    return position, history


@contextlib.contextmanager
def deterministic_mode(on: bool) -> Iterator[None]:
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
