"""Batch loaders for the client: DALI pipelines or a plain torch/PIL fallback.

Both yield :class:`Batch` (images ``[B, C, S, S]``, int64 labels, int64 source indices),
have a length (batches per epoch) so that ``tqdm(loader)`` shows progress, and apply the
same deterministic transforms (``encode`` and ``eval`` modes). :func:`make_loader`
picks one; ``"auto"`` takes DALI when it imports, else torch, and logs which and why.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from ..backend import BackendStatus, BackendUnavailableError
from .loader_spec import MODES, Batch, LoaderSpec
from .source import ImageSource, shard_range
from .transforms import eval_transform, to_channels, train_transform

__all__ = [
    "LOADERS",
    "MODES",
    "Batch",
    "LoaderSpec",
    "TorchLoader",
    "collect",
    "loader_statuses",
    "make_loader",
]

log = logging.getLogger("smsd")

LOADERS = ("dali", "torch")


class TorchLoader:
    """The fallback: Pillow/pydicom decoding and torch transforms on ``num_threads``
    threads. Same interface and deterministic output as :class:`~smsd.data.dali.DaliLoader`."""

    name = "torch"

    def __init__(self, source: ImageSource, spec: LoaderSpec) -> None:
        self.source, self.spec = source, spec
        self.shard = shard_range(len(source), spec.shard_id, spec.num_shards)
        self.epoch = 0
        self._labels = torch.from_numpy(source.labels)

    @property
    def num_samples(self) -> int:
        """Images one epoch yields (after a dropped last batch)."""
        return min(len(self.shard), len(self) * self.spec.batch_size)

    def __len__(self) -> int:
        return self.spec.num_batches(len(self.shard))

    def _order(self) -> torch.Tensor:
        order = torch.tensor(self.shard, dtype=torch.int64)
        if self.spec.mode == "finetune":
            gen = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + self.epoch)
            order = order[torch.randperm(len(order), generator=gen)]
        return order

    def _image(self, index: int, epoch: int) -> torch.Tensor:
        spec = self.spec
        img = to_channels(self.source.pixels(index), spec.in_chans, self.source.name(index))
        if spec.mode == "finetune":
            # Seeded per (seed, epoch, image): threads cannot change the draws.
            gen = torch.Generator().manual_seed(hash((spec.seed, epoch, index)) & (2**62 - 1))
            img = train_transform(img, spec.img_size, spec.augment, gen)
        else:
            img = eval_transform(img, spec.img_size, spec.crop_ratio)
        return img.to(spec.dtype)

    def __iter__(self) -> Iterator[Batch]:
        spec, epoch = self.spec, self.epoch
        order = self._order()[:self.num_samples]
        self.epoch += 1
        with ThreadPoolExecutor(spec.num_threads) as pool:
            for start in range(0, len(order), spec.batch_size):
                idx = order[start:start + spec.batch_size]
                images = torch.stack(list(pool.map(self._image, idx.tolist(),
                                                   [epoch] * len(idx))))
                yield Batch(images.to(spec.device), self._labels[idx], idx)


def collect(loader) -> Batch:
    """One epoch of ``loader`` as a single :class:`Batch`."""
    batches = list(loader)
    if not batches:
        raise ValueError("the loader yielded no batch (fewer images than one batch with "
                         "last_batch='drop'?)")
    return Batch(*(torch.cat(parts) for parts in zip(*batches, strict=True)))


@functools.cache
def _dali_status() -> BackendStatus:
    try:
        import nvidia.dali as dali
    except ImportError as exc:
        return BackendStatus("dali", False, f"DALI is not importable ({exc}); install the "
                             "dali extra: pip install 'smsd[dali]'")
    gpu = "cuda" if torch.cuda.is_available() else "no CUDA device: CPU-only (device_id=None)"
    return BackendStatus("dali", True, f"nvidia-dali {dali.__version__}, {gpu}")


def loader_statuses() -> dict[str, BackendStatus]:
    """Which image loaders can run here and, for a missing one, why."""
    return {"dali": _dali_status(),
            "torch": BackendStatus("torch", True, f"Pillow/pydicom + PyTorch {torch.__version__}")}


def _choose(loader: str) -> str:
    if loader not in (*LOADERS, "auto"):
        raise ValueError(f"loader must be one of dali, torch, auto; got {loader!r}")
    dali = _dali_status()
    if loader == "dali" and not dali.available:
        raise BackendUnavailableError(f"loader 'dali' is unavailable: {dali.detail}")
    if loader == "auto":
        loader = "dali" if dali.available else "torch"
        log.info("smsd: loader 'auto' uses %s (%s)", loader,
                 dali.detail if dali.available else f"DALI unavailable: {dali.detail}")
    else:
        log.info("smsd: loader %s", loader)
    return loader


def make_loader(source: ImageSource, *, img_size: int, in_chans: int, mode: str = "eval",
                loader: str = "auto", **options):
    """A :class:`TorchLoader` or :class:`~smsd.data.dali.DaliLoader` over ``source``;
    ``options`` are the other :class:`LoaderSpec` fields. The chosen loader is logged
    and available as ``.name``."""
    if not isinstance(source, ImageSource):
        raise TypeError(f"source must be an ImageSource, got {type(source).__name__}")
    spec = LoaderSpec(img_size=img_size, in_chans=in_chans, mode=mode, **options)
    if spec.num_shards > len(source):
        raise ValueError(f"num_shards ({spec.num_shards}) exceeds the number of images "
                         f"({len(source)}): some shards would be empty")
    if spec.cuda and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {spec.device!r} was asked for but no CUDA "
                                      "device is visible (use device='cpu': DALI CPU-only mode)")
    if _choose(loader) == "dali":
        from .dali import DaliLoader

        return DaliLoader(source, spec)
    return TorchLoader(source, spec)
