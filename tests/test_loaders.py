"""Image loaders without DALI: the torch loader's transforms, batching, sharding, DICOM,
errors, the loader choice and its report, and the client reading through a loader."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from image_files import SIZES, dicom_files, write_folder

from smsd.backend import BackendStatus, BackendUnavailableError
from smsd.cli import main
from smsd.data import (
    Augment,
    DataError,
    ImageSource,
    LoaderSpec,
    TorchLoader,
    collect,
    loaders,
    make_loader,
)
from smsd.data.folder import read_image
from smsd.data.source import shard_range
from smsd.data.transforms import eval_transform, resize, resize_matrix


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("dicom")
    for name, path in zip(("ct", "mr", "xray"), dicom_files(), strict=True):
        (root / name).mkdir()
        shutil.copy(path, root / name / "image.dcm")
    return root


# ----------------------------------------------------------------- transforms
@pytest.mark.parametrize("n_in,n_out", [(8, 32), (5, 7), (13, 13)])
def test_resize_matrix_enlarging_is_bilinear(n_in, n_out):
    x = torch.rand(1, 1, n_in, n_in, dtype=torch.float64)
    expected = F.interpolate(x, size=(n_out, n_out), mode="bilinear", align_corners=False)
    m = resize_matrix(n_in, n_out)
    torch.testing.assert_close(m @ x[0, 0] @ m.T, expected[0, 0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_in,n_out", [(224, 32), (53, 16), (100, 21)])
def test_resize_matrix_shrinking_is_antialiased_linear_inside(n_in, n_out):
    """Inside the image it is PIL's/torch's antialiased bilinear filter; only the border
    ring differs (clamped taps instead of renormalized weights, as DALI does)."""
    m = resize_matrix(n_in, n_out)
    torch.testing.assert_close(m.sum(1), torch.ones(n_out, dtype=torch.float64))
    x = torch.rand(1, 1, n_in, n_in, dtype=torch.float64)
    expected = F.interpolate(x, size=(n_out, n_out), mode="bilinear", align_corners=False,
                             antialias=True)[0, 0]
    ring = int(np.ceil(2 * n_out / n_in)) + 1  # outputs whose filter reaches the edge
    inner = slice(ring, n_out - ring)
    got = m @ x[0, 0] @ m.T
    torch.testing.assert_close(got[inner, inner], expected[inner, inner], rtol=0, atol=1e-12)


def test_eval_transform_of_an_output_sized_image_only_normalizes():
    img = torch.rand(3, 16, 16)
    torch.testing.assert_close(eval_transform(img, 16), (img - 0.5) / 0.5)
    assert eval_transform(torch.rand(1, 37, 53), 16, crop_ratio=0.875).shape == (1, 16, 16)
    torch.testing.assert_close(resize(img, (16, 16)), img)


# --------------------------------------------------------------- torch loader
def test_torch_loader_yields_every_image_in_order(folder):
    source = ImageSource.from_folder(folder)
    loader = make_loader(source, img_size=16, in_chans=3, loader="torch", batch_size=3)
    assert loader.name == "torch" and len(loader) == 7 and loader.num_samples == 20
    batches = list(loader)
    assert [len(b.labels) for b in batches] == [3] * 6 + [2]
    batch = collect(loader)
    assert batch.images.shape == (20, 3, 16, 16) and batch.images.dtype == torch.float32
    assert batch.indices.tolist() == list(range(20))
    assert batch.labels.tolist() == [0] * 10 + [1] * 10
    assert source.ids[0] == "a/0.jpg" and source.classes == ("a", "b")
    assert batch.images.abs().max() <= 1 + 1e-6 and batch.images.std() > 0.1
    # A gray PNG fills every channel with the same values.
    gray = source.ids.index("a/1.png")
    torch.testing.assert_close(batch.images[gray, 0], batch.images[gray, 2])


def test_torch_loader_epochs_repeat_and_fp16(folder):
    source = ImageSource.from_folder(folder)
    loader = make_loader(source, img_size=12, in_chans=1, loader="torch", batch_size=4)
    epochs = [collect(loader) for _ in range(3)]
    for later in epochs[1:]:
        assert torch.equal(later.images, epochs[0].images)
    half = collect(make_loader(source, img_size=12, in_chans=1, loader="torch",
                               batch_size=4, dtype=torch.float16))
    assert half.images.dtype == torch.float16
    # fp16 output = the fp32 result rounded once: within half an fp16 ulp of 1.
    assert (half.images.float() - epochs[0].images).abs().max() <= 2**-11


@pytest.mark.parametrize("last_batch,sizes", [("partial", [4, 4, 2]), ("drop", [4, 4])])
def test_last_batch_policy(tmp_path, last_batch, sizes):
    source = ImageSource.from_folder(write_folder(tmp_path, SIZES[:5], ("a",)))
    loader = make_loader(source, img_size=8, in_chans=1, loader="torch", batch_size=4,
                         last_batch=last_batch)
    for _ in range(2):  # the same every epoch
        batches = list(loader)
        assert [len(b.indices) for b in batches] == sizes
        assert torch.cat([b.indices for b in batches]).tolist() == list(range(sum(sizes)))
    assert len(loader) == len(sizes) and loader.num_samples == sum(sizes)


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_shards_cover_every_image_once(folder, num_shards):
    source = ImageSource.from_folder(folder)
    seen = []
    for shard_id in range(num_shards):
        loader = make_loader(source, img_size=8, in_chans=1, loader="torch", batch_size=2,
                             shard_id=shard_id, num_shards=num_shards)
        got = collect(loader).indices.tolist()
        assert got == list(shard_range(len(source), shard_id, num_shards))
        seen += got
    assert sorted(seen) == list(range(len(source)))


def test_finetune_mode_shuffles_and_augments_reproducibly(folder):
    source = ImageSource.from_folder(folder)
    options = dict(img_size=16, in_chans=3, mode="finetune", loader="torch", batch_size=8,
                   seed=3, augment=Augment(blur_sigma=(0.3, 1.0)))
    loader = make_loader(source, **options)
    first, second = collect(loader), collect(loader)
    for epoch in (first, second):
        assert sorted(epoch.indices.tolist()) == list(range(20))
        assert torch.isfinite(epoch.images).all() and epoch.images.shape == (20, 3, 16, 16)
    assert first.indices.tolist() != second.indices.tolist()
    again = collect(make_loader(source, **options))
    assert torch.equal(again.images, first.images)
    assert torch.equal(again.labels, torch.from_numpy(source.labels)[again.indices])


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_augmentation_changes_images_within_its_documented_ranges(loader):
    """A flat gray image (0.5) through crop scale 1, contrast 0 and brightness ±0.2: every
    pixel becomes b × 0.5, normalized (x − 0.5) / 0.5 = b − 1, with b drawn in [0.8, 1.2];
    a left-to-right ramp with flip probability 1 comes out mirrored."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    n, size = 64, 8
    gray = ImageSource.from_arrays(np.full((n, size, size), 0.5, np.float32), [0] * n)
    spec = dict(img_size=size, in_chans=1, mode="finetune", loader=loader, batch_size=16,
                seed=1)
    flat = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, brightness=0.2, contrast=0.0)
    images = collect(make_loader(gray, augment=flat, **spec)).images
    per_image = images.flatten(1)
    # One brightness per image: all its pixels equal (fp32 resize of a constant).
    assert (per_image.max(1).values - per_image.min(1).values).max() < 1e-5
    shifts = per_image.mean(1)
    assert shifts.min() >= -0.2 - 1e-5 and shifts.max() <= 0.2 + 1e-5
    assert shifts.max() - shifts.min() > 0.2, "brightness barely varies over 64 draws"
    ramp = np.tile(np.linspace(0.0, 1.0, size, dtype=np.float32), (4, size, 1))
    mirrored = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0, brightness=0.0,
                       contrast=0.0)
    out = collect(make_loader(ImageSource.from_arrays(ramp, [0] * 4), augment=mirrored,
                              **spec)).images
    expected = torch.from_numpy(ramp[:, None, :, ::-1].copy()) * 2 - 1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_in_memory_arrays(folder):
    digits = pytest.importorskip("sklearn.datasets").load_digits()
    source = ImageSource.from_arrays(digits.images[:50] / 16.0, digits.target[:50])
    batch = collect(make_loader(source, img_size=32, in_chans=1, loader="torch",
                                batch_size=16))
    assert batch.images.shape == (50, 1, 32, 32) and source.classes[-1] == "9"
    assert batch.labels.tolist() == digits.target[:50].tolist()
    as_uint8 = ImageSource.from_arrays((digits.images[:2] * 15).astype(np.uint8), [0, 1])
    assert as_uint8.pixels(0).max() <= 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ImageSource.from_arrays(digits.images[:2], [0, 1])  # 0..16, not scaled
    with pytest.raises(ValueError, match="labels"):
        ImageSource.from_arrays(digits.images[:2] / 16, [0])
    with pytest.raises(TypeError, match="uint8 or floating"):
        ImageSource.from_arrays(digits.images[:2].astype(np.int32), [0, 1])


def test_dicom_loads_with_the_folder_windowing(dicom_folder):
    source = ImageSource.from_folder(dicom_folder)
    assert not source.encoded
    # 128×128 CT read at 128: no resampling, so exactly folder.read_image's windowing.
    ct = collect(make_loader(source, img_size=128, in_chans=1, loader="torch", batch_size=1))
    assert ct.images.shape == (3, 1, 128, 128)
    torch.testing.assert_close(ct.images[0], read_image(source.files[0], 128, 1),
                               rtol=0, atol=1e-6)
    small = collect(make_loader(source, img_size=32, in_chans=3, loader="torch"))
    assert small.images.shape == (3, 3, 32, 32) and small.images.abs().max() <= 1 + 1e-6
    assert small.images.flatten(1).std(1).min() > 0.1  # windowed, not saturated


def test_corrupt_files_name_the_file(tmp_path):
    root = write_folder(tmp_path, SIZES[:2], ("a",))
    bad = root / "a" / "z.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    source = ImageSource.from_folder(root)
    with pytest.raises(DataError, match=str(bad)):
        collect(make_loader(source, img_size=8, in_chans=1, loader="torch"))
    bad.unlink()
    bad_dicom = root / "a" / "scan.dcm"
    bad_dicom.write_bytes(b"DICM" * 40)
    with pytest.raises(DataError, match=str(bad_dicom)):
        collect(make_loader(ImageSource.from_folder(root), img_size=8, in_chans=1,
                            loader="torch"))


# ------------------------------------------------------------ choice, report
def test_loader_choice_is_logged_and_reported(folder, monkeypatch, caplog, capsys):
    source = ImageSource.from_folder(folder)
    missing = BackendStatus("dali", False, "DALI is not importable (test)")
    monkeypatch.setattr(loaders, "_dali_status", lambda: missing)
    with caplog.at_level(logging.INFO, logger="smsd"):
        loader = make_loader(source, img_size=8, in_chans=1, loader="auto")
    assert isinstance(loader, TorchLoader)
    assert "loader 'auto' uses torch" in caplog.text and "not importable (test)" in caplog.text
    with pytest.raises(BackendUnavailableError, match="not importable"):
        make_loader(source, img_size=8, in_chans=1, loader="dali")
    report = loaders.loader_statuses()
    assert report["dali"] is missing and report["torch"].available
    assert main(["backends"]) == 0
    shown = capsys.readouterr().out
    assert "loader dali" in shown and "loader torch" in shown and "not importable (test)" in shown


@pytest.mark.parametrize("options,error,match", [
    (dict(loader="pil"), ValueError, "loader must be"),
    (dict(mode="train"), ValueError, "mode"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(shard_id=3, num_shards=3), ValueError, "shard_id"),
    (dict(last_batch="pad"), ValueError, "last_batch"),
    (dict(dtype=torch.bfloat16), TypeError, "dtype"),
    (dict(crop_ratio=1.5), ValueError, "crop_ratio"),
    (dict(in_chans=2), ValueError, "in_chans"),
    (dict(shard_id=0, num_shards=21), ValueError, "num_shards"),
])
def test_bad_arguments(folder, options, error, match):
    args = dict(img_size=8, in_chans=1, loader="torch") | options
    with pytest.raises(error, match=match):
        make_loader(ImageSource.from_folder(folder), **args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_gpu_says_so(folder):
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        make_loader(ImageSource.from_folder(folder), img_size=8, in_chans=1, device="cuda")


def test_bad_augment_and_source():
    with pytest.raises(ValueError, match="scale"):
        Augment(scale=(0.5, 0.2))
    with pytest.raises(TypeError, match="ImageSource"):
        make_loader(torch.zeros(2, 1, 8, 8), img_size=8, in_chans=1)
    with pytest.raises(TypeError, match="augment"):
        LoaderSpec(img_size=8, in_chans=1, augment=0.5)


# ---------------------------------------------------------------- the client
def test_client_encodes_from_a_loader(folder, tmp_path):
    from smsd.crypto import PermutationKey
    from smsd.models import model_config
    from smsd.protocol import Client
    from smsd.protocol.shard import read_shard

    config = model_config("demo", img_size=16, in_chans=3)
    client = Client(config, PermutationKey.generate())
    source = ImageSource.from_folder(folder)
    loader = make_loader(source, img_size=16, in_chans=3, loader="torch", batch_size=6)
    batch = collect(loader)
    by_loader = client.encode(loader, tmp_path / "loader.safetensors")
    by_tensor = client.encode(batch.images, tmp_path / "tensor.safetensors",
                              image_ids=list(source.ids))
    torch.testing.assert_close(read_shard(by_loader), read_shard(by_tensor))
    with pytest.raises(ValueError, match="image_ids must be None"):
        client.encode(loader, tmp_path / "x.safetensors", image_ids=list(source.ids))
    with pytest.raises(TypeError, match="loader"):
        client.tokens([1, 2])



CLI_ARGS = {"encode": ["--data", "d", "--key", "k", "--out", "o"],
            "finetune": ["--body", "b", "--data", "d"],
            "evaluate": ["--model", "m", "--data", "d"],
            "simulate": []}


def test_cli_loader_option(folder, tmp_path, capsys):
    from smsd.cli import build_parser, main
    from smsd.data import load_dataset

    for command, args in CLI_ARGS.items():
        parser = build_parser()
        assert parser.parse_args([command, *args]).loader == "auto"
        assert parser.parse_args([command, *args, "--loader", "torch"]).loader == "torch"
    key, shard = tmp_path / "k.key", tmp_path / "s.safetensors"
    assert main(["keygen", "--out", str(key)]) == 0
    assert main(["encode", "--data", str(folder), "--key", str(key), "--out", str(shard),
                 "--img-size", "16", "--patch-size", "4", "--in-chans", "3",
                 "--loader", "torch"]) == 0
    out = capsys.readouterr().out
    assert "20 images" in out and "(torch loader, UNSEALED)" in out and shard.is_file()
    images, labels, n_classes = load_dataset(f"folder:{folder}", img_size=16, in_chans=3,
                                             loader="torch")
    assert images.shape == (20, 3, 16, 16) and n_classes == 2 and labels.tolist()[-1] == 1
