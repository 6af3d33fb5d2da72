"""The training recipe the project measured: model, pre-training, fine-tuning, defences.

One definition for everything that trains: ``smsd simulate`` (:mod:`smsd.experiments`),
the Flower app (:mod:`smsd.federation`) and the CLI. ``Recipe()`` is the recipe behind
the README's results (digits, 4 clients); :meth:`Recipe.quick` is a seconds-long version
for smoke tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .models import ViTConfig, model_config
from .protocol.pretrain_config import PretrainConfig
from .protocol.training import PRETRAINED_BODY_LR_SCALE, FinetuneConfig

__all__ = ["TUNED_STEPS", "Recipe", "demo_pretrain", "scale_to_data"]

# The demo recipe was tuned on the digits the simulated server holds: 1,437 images, 22
# steps of 64 per epoch, 30 epochs (2 of warm-up), teacher momentum 0.99.
TUNED_STEPS = 660
_TUNED_EPOCHS, _TUNED_WARMUP, _TUNED_MOMENTUM = 30, 2, 0.99
_MIN_EPOCHS, _MAX_EPOCHS = 10, 1000


def demo_pretrain() -> PretrainConfig:
    """DINO's recipe with the projection head scaled down to the demo model, adapted to a
    run of ~660 steps (epochs sized for the 10-minute demo).

    DINO's lr 5e-4/256 images, momentum 0.996 and teacher temperature 0.04 collapse here
    to a uniform output (the CLS features of different images differ by ~1 % at init, so
    the centered teacher is flat). A sharper teacher (0.02), a faster one (momentum
    0.99), lr 1e-3 and DINOv2's KoLeo term (0.1) on the CLS features keep it informative
    (docs/simulate-experiments.md).
    """
    return PretrainConfig(
        epochs=30, batch_size=64, lr=1e-3, warmup_epochs=2, momentum_teacher=0.99,
        warmup_teacher_temp=0.02, teacher_temp=0.02, koleo_weight=0.1, out_dim=1024,
        hidden_dim=256, bottleneck_dim=64)


def scale_to_data(cfg: PretrainConfig, n_images: int,
                  epochs: int | None = None) -> PretrainConfig:
    """``cfg`` (the demo schedule) sized for ``n_images``: epochs for about the tuned
    :data:`TUNED_STEPS` optimizer steps (10 to 1,000 epochs; or ``epochs`` when given),
    the warm-up the same share of the run (2/30), and a teacher that averages over the
    same share of the run (momentum ``1 - 0.01 × 660 / steps``, 0.99 to 0.9995). On the
    digits it was tuned on (1,437 images, batch 64) it returns ``cfg`` unchanged."""
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive int, got {n_images!r}")
    per_epoch = max(n_images // min(cfg.batch_size, n_images), 1)
    if epochs is None:
        epochs = min(max(round(TUNED_STEPS / per_epoch), _MIN_EPOCHS), _MAX_EPOCHS)
    warmup = min(round(epochs * _TUNED_WARMUP / _TUNED_EPOCHS), epochs - 1)
    steps = epochs * per_epoch
    momentum = min(max(1 - (1 - _TUNED_MOMENTUM) * TUNED_STEPS / steps, _TUNED_MOMENTUM),
                   0.9995)
    if math.isclose(momentum, _TUNED_MOMENTUM):
        momentum = _TUNED_MOMENTUM
    return replace(cfg, epochs=epochs, warmup_epochs=warmup, momentum_teacher=momentum)


@dataclass(frozen=True)
class Recipe:
    """What every site and the server agree on before training.

    Attributes:
        model: the public model config (head, body, tail sizes).
        pretrain: the server's masked sampling distillation.
        finetune: each client's supervised training of body + tail.
        smsd_body_lr_scale: SMSD's clients fine-tune a *pre-trained* body, so its LR is
            scaled down (the new tail keeps ``finetune.lr``); baselines that train a
            random body keep the full LR, their best.
        noise_std: the defence a client may apply: Gaussian noise on its uploaded tokens
            (``smsd audit`` measures what it hides; it is not a guarantee).
        scale_pretrain: size the pre-training schedule to the data (:func:`scale_to_data`,
            :meth:`pretrain_for`); off when a run fixes its epochs.
    """

    model: ViTConfig = field(default_factory=lambda: model_config("demo"))
    pretrain: PretrainConfig = field(default_factory=demo_pretrain)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=100))
    smsd_body_lr_scale: float = PRETRAINED_BODY_LR_SCALE
    noise_std: float = 0.0
    scale_pretrain: bool = True

    def __post_init__(self) -> None:
        if not self.smsd_body_lr_scale > 0:
            raise ValueError(f"smsd_body_lr_scale must be positive, got "
                             f"{self.smsd_body_lr_scale!r}")
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std!r}")

    def pretrain_for(self, n_images: int, epochs: int | None = None) -> PretrainConfig:
        """The server's pre-training for a data set of ``n_images`` (scaled to it unless
        ``scale_pretrain`` is off; ``epochs``: that many, the rest scaled to them)."""
        if not self.scale_pretrain:
            return self.pretrain
        return scale_to_data(self.pretrain, n_images, epochs)

    def with_pretrain_epochs(self, epochs: int) -> Recipe:
        """The recipe with a fixed number of pre-training epochs (no scaling)."""
        return replace(self, pretrain=replace(self.pretrain, epochs=epochs),
                       scale_pretrain=False)

    @property
    def smsd_finetune(self) -> FinetuneConfig:
        """The fine-tuning SMSD's clients run on the returned body."""
        return replace(self.finetune, body_lr_scale=self.smsd_body_lr_scale)

    def with_seed(self, seed: int) -> Recipe:
        """Every seed of the recipe (inits, shuffles) set to ``seed``."""
        return replace(self, pretrain=replace(self.pretrain, seed=seed),
                       finetune=replace(self.finetune, seed=seed))

    def quick(self) -> Recipe:
        """A seconds-long version (smoke tests, CI): tiny model, few epochs."""
        return replace(
            self, model=self.model.replace(embed_dim=16, depth=1, num_heads=2),
            pretrain=replace(self.pretrain, epochs=1, batch_size=128, out_dim=64,
                             hidden_dim=32, bottleneck_dim=16, warmup_epochs=0,
                             local_keep=(0.2,) * 2),
            finetune=replace(self.finetune, epochs=2), scale_pretrain=False)
