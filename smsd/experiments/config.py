"""What ``smsd simulate`` runs: a data split, the recipe, and the FedAvg baseline's budget."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..checks import positive_ints
from ..data import DataSplit
from ..recipe import Recipe

__all__ = ["METHODS", "SimulateConfig"]

METHODS = ("smsd", "finetune-only", "fedavg", "centralized", "majority")


@dataclass(frozen=True)
class SimulateConfig:
    """``split``: the clients and their data (its ``seed`` also seeds the keys, the noise
    and the baselines' tails); ``rounds`` and ``local_epochs``: the FedAvg baseline's
    budget; ``loader`` for ``folder:`` data sets ("dali", "torch" or "auto"); ``methods``:
    which of :data:`METHODS` to run (a defence changes only SMSD's row); ``membership``:
    run the membership-inference attack on SMSD's returned body (its AUC in the row);
    ``select``: every method's fine-tuning setting is picked on held-out labels
    (:mod:`smsd.protocol.recipe_selection`; off: the recipe's setting as it is)."""

    split: DataSplit = field(default_factory=DataSplit)
    rounds: int = 20
    local_epochs: int = 10
    loader: str = "auto"
    recipe: Recipe = field(default_factory=Recipe)
    methods: tuple[str, ...] = METHODS
    membership: bool = False
    select: bool = True

    def __post_init__(self) -> None:
        positive_ints(self, "rounds", "local_epochs")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must be distinct names among {', '.join(METHODS)}; "
                             f"got {list(self.methods)}")

    @property
    def seed(self) -> int:
        return self.split.seed

    def with_seed(self, seed: int) -> SimulateConfig:
        """Every seed (split, keys, inits, shuffles) set to ``seed``."""
        return replace(self, split=replace(self.split, seed=seed),
                       recipe=self.recipe.with_seed(seed))

    def quick(self) -> SimulateConfig:
        """A seconds-long version (smoke tests, CI)."""
        return replace(self, rounds=2, local_epochs=1, recipe=self.recipe.quick())
