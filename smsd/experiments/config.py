"""What ``smsd simulate`` runs: a data split, the recipe, and the FedAvg baseline's budget."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..checks import positive_ints
from ..data import DataSplit
from ..recipe import Recipe

__all__ = ["SimulateConfig"]


@dataclass(frozen=True)
class SimulateConfig:
    dataset: str = "digits"
    clients: int = 4
    alpha: float = 0.5
    labeled_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    rounds: int = 20  # FedAvg
    local_epochs: int = 10  # FedAvg
    loader: str = "auto"  # for 'folder:' data sets: "dali", "torch" or "auto"
    recipe: Recipe = field(default_factory=Recipe)

    def __post_init__(self) -> None:
        positive_ints(self, "clients", "rounds", "local_epochs")

    @property
    def split(self) -> DataSplit:
        return DataSplit(self.dataset, self.clients, self.alpha, self.labeled_fraction,
                         self.test_fraction, self.seed)

    def with_seed(self, seed: int) -> SimulateConfig:
        """Every seed (split, keys, inits, shuffles) set to ``seed``."""
        return replace(self, seed=seed, recipe=self.recipe.with_seed(seed))

    def quick(self) -> SimulateConfig:
        """A seconds-long version (smoke tests, CI)."""
        return replace(self, rounds=2, local_epochs=1, recipe=self.recipe.quick())
