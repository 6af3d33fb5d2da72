"""Non-IID client splits: Dirichlet label skew, a labeled fraction, a local test set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..checks import positive_int
from ..crypto import PermutationKey

__all__ = ["ClientData", "DataSplit", "dirichlet_split", "make_clients"]


def dirichlet_split(labels: torch.Tensor, n_clients: int, alpha: float, seed: int,
                    min_size: int = 2) -> list[np.ndarray]:
    """Split sample indices across clients with per-class proportions ~ Dirichlet(alpha).

    Small ``alpha`` gives strong label skew. Redraws (seeded) until every client has at
    least ``min_size`` samples, as in the usual FL benchmarks.
    """
    positive_int("n_clients", n_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    labels_np = labels.cpu().numpy()
    if len(labels_np) < n_clients * min_size:
        raise ValueError(f"{len(labels_np)} samples cannot give {n_clients} clients "
                         f"{min_size} samples each: lower n_clients ({n_clients})")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for cls in np.unique(labels_np):
            idx = rng.permutation(np.flatnonzero(labels_np == cls))
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [rng.permutation(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"could not split so that every client has {min_size} samples; "
                     f"raise alpha ({alpha}) or lower n_clients ({n_clients})")


@dataclass
class ClientData:
    """One simulated client's images: all training images (unlabeled use), the labeled
    subset, and a local test set with the same label distribution."""

    train_images: torch.Tensor
    labeled_images: torch.Tensor
    labeled_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def make_clients(images: torch.Tensor, labels: torch.Tensor, n_clients: int = 4,
                 alpha: float = 0.5, labeled_fraction: float = 0.2,
                 test_fraction: float = 0.2, seed: int = 0) -> list[ClientData]:
    """Dirichlet-split ``images`` across clients; each keeps ``test_fraction`` of its
    images as a local test set and labels ``labeled_fraction`` of the rest."""
    for name, value in (("labeled_fraction", labeled_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    rng = np.random.default_rng(seed + 1)
    clients = []
    for part in dirichlet_split(labels, n_clients, alpha, seed, min_size=10):
        part = rng.permutation(part)
        n_test = max(1, round(test_fraction * len(part)))
        test, train = part[:n_test], part[n_test:]
        n_labeled = max(1, round(labeled_fraction * len(train)))
        labeled = train[:n_labeled]
        clients.append(ClientData(
            train_images=images[train], labeled_images=images[labeled],
            labeled_labels=labels[labeled], test_images=images[test], test_labels=labels[test],
        ))
    return clients


@dataclass(frozen=True)
class DataSplit:
    """A named data set split across simulated clients (public: no keys, no paths beyond
    ``folder:`` specs). Used by ``smsd simulate`` and by simulated Flower SuperNodes."""

    dataset: str = "digits"
    clients: int = 4
    alpha: float = 0.5
    labeled_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        positive_int("clients", self.clients)

    def load(self, *, img_size: int, in_chans: int, loader: str = "auto"
             ) -> tuple[list[ClientData], int, int]:
        """Each client's part, the number of classes and of images in the data set."""
        from .datasets import load_dataset

        data = load_dataset(self.dataset, img_size=img_size, in_chans=in_chans, loader=loader)
        parts = make_clients(data.images, data.labels, self.clients, self.alpha,
                             self.labeled_fraction, self.test_fraction, self.seed)
        return parts, data.num_classes, int(data.labels.numel())

    def client_key(self, client: int) -> PermutationKey:
        """Simulated client ``client``'s reproducible key (public: simulations only)."""
        return PermutationKey.derive(f"smsd/simulate/{self.seed}/{client}")

    def to_record(self) -> dict[str, str | int | float]:
        """As sent to Flower SuperNodes (run-config key names)."""
        return {"dataset": self.dataset, "clients": self.clients, "alpha": self.alpha,
                "labeled-fraction": self.labeled_fraction,
                "test-fraction": self.test_fraction, "seed": self.seed}

    @classmethod
    def from_record(cls, record) -> DataSplit:
        return cls(dataset=str(record["dataset"]), clients=int(record["clients"]),
                   alpha=float(record["alpha"]),
                   labeled_fraction=float(record["labeled-fraction"]),
                   test_fraction=float(record["test-fraction"]), seed=int(record["seed"]))
