"""The run's public settings, read from Flower's run config (``[tool.flwr.app.config]``).

Everything here is public: the recipe (model config, pre-training, fine-tuning) and, for
the simulation engine only, how the bundled data set is split across virtual SuperNodes.
Keys and data locations are per-site and live in each SuperNode's node config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..checks import positive_int
from ..data import DataSplit
from ..recipe import Recipe
from .transfer import DEFAULT_CHUNK_BYTES

__all__ = ["FederationConfig"]

# run-config key → DataSplit field (and its type); the rest are federation settings.
_SPLIT_KEYS = {"dataset": str, "clients": int, "alpha": float, "labeled-fraction": float,
               "test-fraction": float, "seed": int}


@dataclass(frozen=True)
class FederationConfig:
    """Settings of one federated run.

    Attributes:
        recipe: model, pre-training and fine-tuning (:class:`smsd.recipe.Recipe`).
        split: ``clients`` is the number of SuperNodes the server waits for; the other
            fields are used only by simulated SuperNodes (those with a ``partition-id``).
        chunk_bytes: largest piece a shard or body is split into (see ``transfer``).
        wait_s: how long the server waits for ``clients`` SuperNodes to connect, and for
            each round of replies.
        server_key_file: the server's private recipient key (``smsd keygen
            --recipient``), to open shards the SuperNodes sealed to it; a path on the
            machine that runs the ServerApp (the key itself never enters a message).
    """

    recipe: Recipe = field(default_factory=Recipe)
    split: DataSplit = field(default_factory=DataSplit)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    wait_s: float = 3600.0
    server_key_file: str | None = None

    def server_key(self):
        """The loaded :attr:`server_key_file` (checked: mode 0600, well-formed), or None."""
        if self.server_key_file is None:
            return None
        from ..sealing.keys import RecipientPrivateKey

        return RecipientPrivateKey.load(self.server_key_file)

    def __post_init__(self) -> None:
        positive_int("chunk_bytes", self.chunk_bytes)
        if not self.wait_s > 0:
            raise ValueError(f"wait_s must be positive, got {self.wait_s!r}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> FederationConfig:
        """Build from a Flower run config; unknown keys are an error (typos)."""
        known = {*_SPLIT_KEYS, "pretrain-epochs", "finetune-epochs", "quick", "chunk-bytes",
                 "wait-s", "server-key-file"}
        unknown = sorted(set(run_config) - known)
        if unknown:
            raise ValueError(f"run config has unknown keys {unknown}; known: {sorted(known)}")
        split = DataSplit(**{key.replace("-", "_"): _typed(run_config, key, kind)
                             for key, kind in _SPLIT_KEYS.items() if key in run_config})
        recipe = Recipe()
        if "pretrain-epochs" in run_config:
            recipe = recipe.with_pretrain_epochs(_typed(run_config, "pretrain-epochs", int))
        if "finetune-epochs" in run_config:
            recipe = replace(recipe, finetune=replace(
                recipe.finetune, epochs=_typed(run_config, "finetune-epochs", int)))
        recipe = recipe.with_seed(split.seed)
        if _typed(run_config, "quick", bool, False):
            recipe = recipe.quick()
        return cls(recipe=recipe, split=split,
                   chunk_bytes=_typed(run_config, "chunk-bytes", int, DEFAULT_CHUNK_BYTES),
                   wait_s=_typed(run_config, "wait-s", float, 3600.0),
                   server_key_file=_typed(run_config, "server-key-file", str))


def _typed(config: Mapping[str, object], key: str, kind: type, default=None):
    if key not in config:
        return default
    value = config[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise TypeError(f"run config {key!r} must be {kind.__name__}, got {value!r}")
    return value
