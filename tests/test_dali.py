"""DALI pipelines (CPU-only mode, ``device_id=None``) against the torch loader.

Tolerance on the deterministic path (decode + resize + center crop + normalize):
both loaders decode 8-bit JPEG/PNG identically (both use libjpeg-turbo/libpng; the
DICOM pixels come from the same pydicom windowing) and apply the same resampling filter
(linear, antialiased, clamped border), DALI with its own fp32 weights and summation
order, the torch loader with fp64 weights rounded to fp32. Measured max |dali - torch|
in [-1, 1] units: 2.0e-6 at 16-24 px, 7.3e-6 at 224 px (PNG, JPEG and DICOM, 1 and 3
channels). ``FP32_ATOL`` = 1e-5 (84 fp32 ulps of 1.0) is ~800× below one gray level
(2/255 = 7.8e-3): a wrong filter, size rounding, crop offset, channel mapping or
normalization shows up as ≥ 1e-3. fp16 outputs round that fp32 value once: they may
differ by one fp16 ulp of 1.0 (2^-10).
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from smsd.data import Augment, DataError, ImageSource, collect, make_loader
from smsd.data.source import shard_range

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install "
                    "'smsd[dali]'); the torch loader is tested in test_loaders.py")

from image_files import SIZES, dicom_files, write_folder

FP32_ATOL = 1e-5
FP16_ATOL = 2**-10


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))


def both(source, **options):
    """One epoch from each loader with the same options."""
    dali = make_loader(source, loader="dali", **options)
    torch_ = make_loader(source, loader="torch", **options)
    assert dali.name == "dali-cpu" and len(dali) == len(torch_)
    return dali, torch_


def assert_same(a, b, atol):
    assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
    assert a.images.dtype == b.images.dtype and a.images.shape == b.images.shape
    err = (a.images.float() - b.images.float()).abs().max().item()
    assert err <= atol, f"max |dali - torch| = {err:.3g} > {atol:.3g}"


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("img_size,crop_ratio", [(16, 1.0), (24, 0.875), (224, 1.0)])
def test_deterministic_path_matches_torch(folder, in_chans, img_size, crop_ratio):
    source = ImageSource.from_folder(folder)
    dali, torch_ = both(source, img_size=img_size, in_chans=in_chans, batch_size=6,
                        crop_ratio=crop_ratio)
    assert_same(collect(dali), collect(torch_), FP32_ATOL)


def test_fp16_batches(folder):
    source = ImageSource.from_folder(folder)
    dali, torch_ = both(source, img_size=16, in_chans=3, batch_size=8, dtype=torch.float16)
    assert_same(collect(dali), collect(torch_), FP16_ATOL)


def test_several_epochs_give_the_same_batches(folder):
    source = ImageSource.from_folder(folder)
    dali = make_loader(source, img_size=16, in_chans=1, loader="dali", batch_size=6)
    first = [b.images for b in dali]
    for _ in range(3):
        again = list(dali)
        assert len(again) == len(first) == len(dali) == 4
        for a, b in zip(again, first, strict=True):
            assert torch.equal(a.images, b)


@pytest.mark.parametrize("last_batch,sizes", [("partial", [4, 4, 2]), ("drop", [4, 4])])
def test_last_batch_policy(tmp_path, last_batch, sizes):
    source = ImageSource.from_folder(write_folder(tmp_path, SIZES, ("a",)))
    dali, torch_ = both(source, img_size=8, in_chans=1, batch_size=4, last_batch=last_batch)
    for _ in range(3):  # the dropped images do not leak into the next epoch
        got, expected = list(dali), list(torch_)
        assert [len(b.indices) for b in got] == sizes
        for a, b in zip(got, expected, strict=True):
            assert_same(a, b, FP32_ATOL)
    small = make_loader(source, img_size=8, in_chans=1, loader="dali", batch_size=64,
                        last_batch=last_batch)
    assert len(list(small)) == len(small) == (1 if last_batch == "partial" else 0)


@pytest.mark.parametrize("num_shards", [2, 3, 7])
def test_shards_cover_every_file_once(folder, num_shards):
    source = ImageSource.from_folder(folder)
    seen = []
    for shard_id in range(num_shards):
        dali = make_loader(source, img_size=8, in_chans=1, loader="dali", batch_size=2,
                           shard_id=shard_id, num_shards=num_shards)
        epochs = [collect(dali).indices.tolist() for _ in range(2)]
        assert epochs[0] == epochs[1] == list(shard_range(len(source), shard_id, num_shards))
        seen += epochs[0]
    assert sorted(seen) == list(range(len(source)))


@pytest.mark.parametrize("blur", [None, (0.5, 1.0)])
def test_finetune_pipeline(folder, blur):
    source = ImageSource.from_folder(folder)
    dali = make_loader(source, img_size=16, in_chans=3, mode="finetune", loader="dali",
                       batch_size=8, seed=1, augment=Augment(blur_sigma=blur))
    epochs = [collect(dali) for _ in range(2)]
    for epoch in epochs:
        assert sorted(epoch.indices.tolist()) == list(range(len(source)))
        assert epoch.images.shape == (20, 3, 16, 16) and torch.isfinite(epoch.images).all()
        assert epoch.labels.tolist() == source.labels[epoch.indices.numpy()].tolist()
        # brightness ≤ 1.2 and contrast ≤ 1.2 keep values near [-1, 1]
        assert epoch.images.abs().max() < 1.9 and epoch.images.std() > 0.1
    assert epochs[0].indices.tolist() != epochs[1].indices.tolist()


def test_dicom_through_external_source(tmp_path):
    for name, path in zip(("ct", "mr", "xray"), dicom_files(), strict=True):
        (tmp_path / name).mkdir()
        shutil.copy(path, tmp_path / name / "image.dcm")
    source = ImageSource.from_folder(tmp_path)
    for in_chans in (1, 3):
        dali, torch_ = both(source, img_size=32, in_chans=in_chans, batch_size=2)
        assert_same(collect(dali), collect(torch_), FP32_ATOL)


def test_in_memory_arrays_through_external_source():
    digits = pytest.importorskip("sklearn.datasets").load_digits()
    source = ImageSource.from_arrays(digits.images[:40] / 16.0, digits.target[:40])
    dali, torch_ = both(source, img_size=32, in_chans=1, batch_size=16)
    for _ in range(2):
        assert_same(collect(dali), collect(torch_), FP32_ATOL)
    # shard 1 of 3 holds images 13..25; "drop" leaves three full batches of 4
    dali, torch_ = both(source, img_size=32, in_chans=3, batch_size=4, shard_id=1,
                        num_shards=3, last_batch="drop")
    for _ in range(2):
        got = collect(dali)
        assert got.indices.tolist() == list(range(13, 25))
        assert_same(got, collect(torch_), FP32_ATOL)
    tuned = make_loader(source, img_size=32, in_chans=1, mode="finetune", loader="dali",
                        batch_size=16)
    assert sorted(collect(tuned).indices.tolist()) == list(range(40))


@pytest.mark.parametrize("suffix,payload", [
    (".png", b"\x89PNG\r\n\x1a\n garbage"),
    (".jpg", b"\xff\xd8\xff garbage"),
    (".dcm", b"DICM" * 40),
    (".jpg", None),  # a real JPEG cut short
])
def test_corrupt_file_names_the_file(tmp_path, suffix, payload):
    root = write_folder(tmp_path, SIZES[:2], ("a",))
    bad = root / "a" / f"broken{suffix}"
    bad.write_bytes(payload or (root / "a" / "1.jpg").read_bytes()[:400])
    with pytest.raises(DataError, match=str(bad)):  # PNG/JPEG: before DALI reads them
        collect(make_loader(ImageSource.from_folder(root), img_size=8, in_chans=1,
                            loader="dali", batch_size=2))


def test_auto_picks_dali_and_says_so(folder, caplog):
    with caplog.at_level(logging.INFO, logger="smsd"):
        loader = make_loader(ImageSource.from_folder(folder), img_size=8, in_chans=1)
    assert loader.name == "dali-cpu"
    assert "loader 'auto' uses dali (nvidia-dali" in caplog.text


def test_client_encodes_the_same_tokens_through_either_loader(folder, tmp_path):
    from smsd.crypto import PermutationKey
    from smsd.models import model_config
    from smsd.protocol import Client, read_shard

    client = Client(model_config("demo", img_size=16, in_chans=1), PermutationKey.generate())
    source = ImageSource.from_folder(folder)
    dali, torch_ = both(source, img_size=16, in_chans=1, batch_size=7)
    a = read_shard(client.encode(dali, tmp_path / "dali.safetensors"))
    b = read_shard(client.encode(torch_, tmp_path / "torch.safetensors"))
    # Shards hold fp16 tokens: fp32 tokens that differ by ~1e-6 may round to neighbouring
    # fp16 values, one fp16 ulp (2^-10 relative) apart.
    torch.testing.assert_close(a.float(), b.float(), rtol=2**-10, atol=2**-14)
    assert np.isfinite(a.numpy()).all()


def test_cli_encode_with_dali(folder, tmp_path, capsys):
    from smsd.cli import main

    key, shard = tmp_path / "k.key", tmp_path / "s.safetensors"
    assert main(["keygen", "--out", str(key)]) == 0
    assert main(["encode", "--data", str(folder), "--key", str(key), "--out", str(shard),
                 "--img-size", "16", "--patch-size", "4", "--in-chans", "1",
                 "--loader", "dali"]) == 0
    out = capsys.readouterr().out
    assert "20 images" in out and "(dali-cpu loader, UNSEALED)" in out and shard.is_file()


def test_leaving_an_epoch_early_starts_the_next_one_fresh(folder):
    source = ImageSource.from_folder(folder)
    dali = make_loader(source, img_size=8, in_chans=1, loader="dali", batch_size=6)
    first = next(iter(dali))
    assert first.indices.tolist() == list(range(6))
    assert collect(dali).indices.tolist() == list(range(20))
