"""Signs that a pre-training run is not learning, told to the user in one line.

DINO-style self-distillation fails quietly: the student and the teacher agree on a
*uniform* output (the loss then sits at ``ln K`` for a ``K``-dimensional head) or on a
*single* dimension (the loss goes to 0); either way the body learns nothing, and the loss
curve looks calm. :class:`CollapseWatch` sees both from the DINO term of the loss alone
(KoLeo, when on, adds to it: a collapsed run with KoLeo 1.0 measured 7.34 for ln K = 6.93);
:func:`warmup_warning` sees a schedule that never leaves its warm-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .pretrain_config import PretrainConfig

__all__ = ["CollapseWatch", "warmup_warning"]

# Within 2 % of ln K: a teacher and a student that are both uniform give exactly ln K.
_UNIFORM_SHARE = 0.02
# Below this (nats) the teacher is one-hot and the student copies it.
_ONE_HOT_LOSS = 1e-3

_ADVICE = ("the recipe that trains on the demo model: --teacher-temp 0.02 "
           "--momentum-teacher 0.99 --koleo-weight 0.1 --out-dim 1024 (the defaults of "
           "smsd pretrain), or a lower --lr")


@dataclass
class CollapseWatch:
    """Warns once when the loss has sat at ``ln out_dim`` (a uniform output) or at 0
    (a one-hot output) for ``patience`` consecutive steps after ``after_step`` (the
    warm-up, during which the loss may pass there)."""

    out_dim: int
    patience: int = 50
    after_step: int = 0
    _run: int = field(default=0, init=False)
    _kind: str | None = field(default=None, init=False)
    warned: bool = field(default=False, init=False)

    def _state(self, loss: float) -> str | None:
        uniform = math.log(self.out_dim)
        if abs(loss - uniform) <= _UNIFORM_SHARE * uniform:
            return "uniform"
        if loss <= _ONE_HOT_LOSS:
            return "one-hot"
        return None

    def update(self, step: int, loss: float) -> str | None:
        """Feed one step's loss; returns the warning the first time collapse is seen."""
        kind = self._state(loss) if step >= self.after_step else None
        self._run = self._run + 1 if kind is not None and kind == self._kind else int(
            kind is not None)
        self._kind = kind
        if self.warned or self._run < self.patience:
            return None
        self.warned = True
        if kind == "uniform":
            what = (f"the loss has sat at ln({self.out_dim}) = {math.log(self.out_dim):.3f} "
                    f"for {self._run} steps: the outputs collapsed to uniform")
        else:
            what = (f"the loss has sat near 0 for {self._run} steps: the outputs collapsed "
                    "to one dimension")
        return f"{what}, so the body is learning nothing; try {_ADVICE}"


def warmup_warning(cfg: PretrainConfig) -> str | None:
    """Why the run ends inside its learning-rate warm-up (or None)."""
    if cfg.epochs > cfg.warmup_epochs:
        return None
    return (f"the run ends inside the learning-rate warm-up (--epochs {cfg.epochs} <= "
            f"--warmup-epochs {cfg.warmup_epochs}): the lr never reaches --lr {cfg.lr:g}; "
            "raise --epochs or lower --warmup-epochs")
