"""NVIDIA DALI pipelines for the client: encoding, fine-tuning and evaluation.

PNG/JPEG folders are read by ``fn.readers.file`` and decoded by DALI (``mixed`` on a
GPU, ``cpu`` in CPU-only mode, ``device_id=None``) once :mod:`.image_check` has checked
their structure (DALI 2.4 can crash on a file its parser rejects). DICOM files (decoded
and windowed by pydicom, :func:`smsd.data.folder.read_pixels`) and in-memory arrays come
in through ``fn.external_source`` as fp32 in [0, 1]. Then, as in :mod:`smsd.data.transforms`:
resize the shorter side (linear, antialiased) and center-crop, or the fine-tuning
augmentations; gray → model channels; normalize to [-1, 1]; CHW fp32/fp16 batches.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import numpy as np
import torch

from .folder import DataError, read_pixels
from .image_check import check_encoded_images
from .loader_spec import Batch, LoaderSpec
from .source import ImageSource, shard_range
from .transforms import MEAN, STD, channels_last

__all__ = ["DaliLoader", "decoded_pipeline", "file_pipeline"]

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as exc:  # the loaders module reports this; importing here is explicit
    raise ImportError(f"smsd.data.dali needs NVIDIA DALI (pip install 'smsd[dali]'): {exc}") \
        from exc

_READER = "reader"
# The decoder's message for an image it parsed but could not decode names its file.
_FAILED_SAMPLE = re.compile(r"Failed to decode sample #\d+ : (.+)$", re.MULTILINE)


def _factor(spread: float):
    """A factor drawn from ``1 ± spread``; exactly 1 for no spread (DALI's uniform refuses
    the empty range [1, 1))."""
    return fn.random.uniform(range=(1 - spread, 1 + spread)) if spread else 1.0


def _transform(images, spec: LoaderSpec, value_range: float):
    """Decoded HWC images with values in [0, value_range] → normalized CHW batches."""
    out_dtype = types.FLOAT16 if spec.dtype == torch.float16 else types.FLOAT
    size = spec.img_size
    if spec.mode == "finetune":
        aug = spec.augment
        images = fn.random_resized_crop(
            images, size=(size, size), random_area=list(aug.scale),
            random_aspect_ratio=list(aug.ratio), interp_type=types.INTERP_LINEAR,
            antialias=True, dtype=types.FLOAT)
        if value_range != 1:
            images = images * (1 / value_range)
        images = fn.brightness_contrast(
            images, brightness=_factor(aug.brightness), contrast=_factor(aug.contrast),
            contrast_center=0.5)
        if aug.blur_sigma is not None:
            images = fn.gaussian_blur(images, sigma=fn.random.uniform(range=aug.blur_sigma))
        mirror, value_range = fn.random.coin_flip(probability=aug.flip), 1.0
        crop = None
    else:
        shorter = math.floor(size / spec.crop_ratio + 0.5)
        # subpixel_scale=False: scale by the rounded output size, as the torch loader does.
        images = fn.resize(images, resize_shorter=shorter, interp_type=types.INTERP_LINEAR,
                           antialias=True, subpixel_scale=False, dtype=types.FLOAT)
        mirror, crop = 0, (size, size)
    if spec.in_chans == 1:
        images = fn.reductions.mean(images, axes=2, keep_dims=True)
    # The [0, value_range] → [0, 1] scale folds into the normalization.
    norm = dict(mean=[MEAN * value_range] * spec.in_chans, std=[STD * value_range] * spec.in_chans)
    if crop is not None:
        norm.update(crop=crop, crop_pos_x=0.5, crop_pos_y=0.5)
    return fn.crop_mirror_normalize(images, mirror=mirror, output_layout="CHW",
                                    dtype=out_dtype, **norm)


@pipeline_def
def file_pipeline(files: list[str], spec: LoaderSpec):
    """PNG/JPEG files → (images, source index). The reader's "label" is the index."""
    encoded, index = fn.readers.file(
        files=files, labels=list(range(len(files))), shard_id=spec.shard_id,
        num_shards=spec.num_shards, random_shuffle=spec.mode == "finetune",
        stick_to_shard=True, pad_last_batch=True, name=_READER)
    images = fn.decoders.image(encoded, device="mixed" if spec.cuda else "cpu",
                               output_type=types.RGB)
    return _transform(images, spec, 255.0), index


class _DecodedSource:
    """External-source callback: one batch of host-decoded images of this shard."""

    def __init__(self, source: ImageSource, spec: LoaderSpec) -> None:
        self.source, self.spec = source, spec
        self.shard = np.asarray(shard_range(len(source), spec.shard_id, spec.num_shards))
        self.n_batches = spec.num_batches(len(self.shard))
        self.error: Exception | None = None
        # Host decoding (pydicom) runs on the loader's threads, as in the torch loader.
        self._pool = ThreadPoolExecutor(spec.num_threads)

    def _read(self, index: int) -> np.ndarray:
        return channels_last(self.source.pixels(index), self.spec.in_chans,
                             self.source.name(index))

    def __call__(self, info) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if info.iteration >= self.n_batches:
            raise StopIteration
        order = self.shard
        if self.spec.mode == "finetune":
            rng = np.random.default_rng((self.spec.seed, info.epoch_idx))
            order = rng.permutation(order)
        idx = order[info.iteration * self.spec.batch_size:
                    (info.iteration + 1) * self.spec.batch_size]
        try:
            images = list(self._pool.map(self._read, idx.tolist()))
        except Exception as exc:  # DALI re-raises it without our type: keep it
            self.error = exc
            raise
        return images, [np.array([i], dtype=np.int64) for i in idx]


@pipeline_def
def decoded_pipeline(callback: _DecodedSource, spec: LoaderSpec):
    """Host-decoded fp32 HWC images in [0, 1] (DICOM, arrays) → (images, source index)."""
    images, index = fn.external_source(source=callback, num_outputs=2, batch=True,
                                       batch_info=True, layout=["HWC", ""],
                                       dtype=[types.FLOAT, types.INT64])
    if spec.cuda:
        images = images.gpu()
    return _transform(images, spec, 1.0), index


class DaliLoader:
    """Batches from a DALI pipeline as torch tensors (cloned: DALI reuses its output
    buffers), with the same interface as :class:`~smsd.data.loaders.TorchLoader`."""

    def __init__(self, source: ImageSource, spec: LoaderSpec) -> None:
        self.source, self.spec = source, spec
        self.shard = shard_range(len(source), spec.shard_id, spec.num_shards)
        self.name = "dali-gpu" if spec.cuda else "dali-cpu"
        self._labels = torch.from_numpy(source.labels)
        device_id = (torch.device(spec.device).index or 0) if spec.cuda else None
        # A batch larger than the shard only repeats padding, so the batch is capped.
        batch_size = max(1, min(spec.batch_size, len(self.shard)))
        common = dict(batch_size=batch_size, num_threads=spec.num_threads,
                      device_id=device_id, seed=spec.seed, spec=spec,
                      prefetch_queue_depth=2)
        policy = (LastBatchPolicy.DROP if spec.last_batch == "drop"
                  else LastBatchPolicy.PARTIAL)
        self._callback: _DecodedSource | None = None
        # DALI's pipeline is no longer valid after an error: later iterations raise it.
        self._error: Exception | None = None
        if source.encoded:
            # Before DALI sees them: a file its parser rejects can crash DALI 2.4.
            check_encoded_images(source.files[i] for i in self.shard)
            pipe = file_pipeline(files=[str(f) for f in source.files], **common)
            self._iterator = DALIGenericIterator(
                pipe, ["images", "index"], reader_name=_READER, last_batch_policy=policy,
                auto_reset=True, prepare_first_batch=False)
        else:
            self._callback = _DecodedSource(source, spec)
            pipe = decoded_pipeline(callback=self._callback, **common)
            # The callback ends each epoch itself (and drops a partial batch for "drop").
            self._iterator = DALIGenericIterator(
                pipe, ["images", "index"], last_batch_policy=LastBatchPolicy.PARTIAL,
                auto_reset=True, prepare_first_batch=False)

    @property
    def num_samples(self) -> int:
        return min(len(self.shard), len(self) * self.spec.batch_size)

    def __len__(self) -> int:
        return self.spec.num_batches(len(self.shard))

    def __iter__(self) -> Iterator[Batch]:
        if self._error is not None:  # the pipeline failed: never run it again
            raise self._error.with_traceback(None)
        if len(self) == 0:  # "drop" with fewer images than one batch
            return
        finished = False
        try:
            for (out,) in self._iterator:
                index = out["index"].reshape(-1).to(torch.int64).cpu()
                yield Batch(out["images"].clone(), self._labels[index], index)
            finished = True
        except RuntimeError as exc:
            finished = True
            self._error = self._data_error(exc)
            raise self._error from None
        finally:
            if not finished:
                self._finish_epoch()

    def _finish_epoch(self) -> None:
        """Left mid-epoch: DALI's iterator cannot reset there, so run it to the end and
        the next iteration starts a new epoch, as the torch loader's does. An error on
        the way is kept for the next iteration (the consumer has stopped reading)."""
        try:
            for _ in self._iterator:
                pass
        except RuntimeError as exc:
            self._error = self._data_error(exc)

    def _data_error(self, exc: RuntimeError) -> Exception:
        """Name the file DALI could not read: DALI's message names it, or the host
        decoder finds it. A failure of another operator is DALI's own: ``exc``."""
        if self._callback is not None:  # host decoding's error (with its type), or DALI's
            return self._callback.error or exc
        text = str(exc)
        if "fn.decoders.image" not in text and "fn.readers.file" not in text:
            return exc
        # DALI's message names the operator; its cause follows "encountered:".
        lines = [line for line in text.splitlines() if line.strip()]
        cause = next((after for before, after in pairwise(lines)
                      if before.strip() == "encountered:"), lines[0] if lines else "")
        files = [self.source.files[i] for i in self.shard]
        match = _FAILED_SAMPLE.search(cause)
        named = [f for f in files if match and str(f) == match[1]]
        for path in named or files:  # the host decoder says why
            try:
                read_pixels(path)
            except DataError as bad:
                return DataError(f"{bad} (DALI: {cause})")
        if named:
            return DataError(f"DALI could not decode image {named[0]}: {cause}")
        return DataError(f"DALI could not read one of the images under "
                         f"{files[0].parent.parent}: {cause}")
