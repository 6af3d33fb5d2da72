"""What the server's pre-training computes (:class:`PretrainConfig`, part of the recipe)
and how one run of it is operated (:class:`RunOptions`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import non_negative_int, positive_int, positive_ints
from .privacy import DPConfig

__all__ = ["PretrainConfig", "RunOptions", "teacher_temp"]


@dataclass(frozen=True)
class PretrainConfig:
    """Masked sampling distillation hyper-parameters (DINO's names and defaults where
    they apply).

    ``dp``: differentially private pre-training (:class:`~smsd.protocol.privacy.DPConfig`,
    :mod:`smsd.protocol.privacy`); ``None``: not private.

    What a run computes: a resume must use the same values. How a run is operated
    (device, checkpoints, determinism) is :class:`RunOptions`. ``batch_size`` is the
    global batch, split across ranks.
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
    packed: bool | None = None
    dp: DPConfig | None = None

    @classmethod
    def with_teacher_temp(cls, teacher_temp: float, **fields) -> PretrainConfig:
        """A config whose teacher warms up from DINO's 0.04 to ``teacher_temp``, or starts
        at ``teacher_temp`` when that is sharper: a warm-up never raises it."""
        return cls(teacher_temp=teacher_temp,
                   warmup_teacher_temp=min(teacher_temp, cls.warmup_teacher_temp), **fields)

    def __post_init__(self) -> None:
        positive_ints(self, "epochs", "batch_size", "out_dim", "hidden_dim", "bottleneck_dim")
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
        if self.dp is not None and self.koleo_weight:
            raise ValueError("differentially private pre-training needs koleo_weight=0 "
                             "(--koleo-weight 0): KoLeo ties the images of a batch together, "
                             "so no per-image clipping bounds it")

    @property
    def keep(self) -> tuple[float, ...]:
        return tuple(self.global_keep) + tuple(self.local_keep)


@dataclass(frozen=True)
class RunOptions:
    """How a pre-training run is operated; a resume may change any of these.

    ``checkpoint_every`` counts epochs, ``checkpoint_every_steps`` iterations (0 = off;
    a mid-epoch checkpoint resumes at the exact data position). ``deterministic`` runs
    with ``torch.use_deterministic_algorithms(True)`` (and a resume keeps the CPU thread
    count of the run it continues), so that a killed and resumed run matches one that
    was never interrupted.
    """

    device: str = "cpu"
    checkpoint_every: int = 10
    checkpoint_every_steps: int = 0
    deterministic: bool = False

    def __post_init__(self) -> None:
        positive_int("checkpoint_every", self.checkpoint_every)
        non_negative_int("checkpoint_every_steps", self.checkpoint_every_steps, "0 = off")


def teacher_temp(cfg: PretrainConfig, epoch: int) -> float:
    """DINO's teacher temperature at ``epoch``: linear warm-up, then constant (for the log;
    the loss module keeps its own schedule)."""
    warm = cfg.warmup_teacher_temp_epochs
    if epoch >= warm:
        return cfg.teacher_temp
    step = (cfg.teacher_temp - cfg.warmup_teacher_temp) / max(warm - 1, 1)
    return cfg.warmup_teacher_temp + step * epoch
