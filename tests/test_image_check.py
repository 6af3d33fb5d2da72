"""The structural check of PNG/JPEG files that the DALI loader runs before DALI reads
them (smsd.data.image_check): valid files of every kind pass, broken ones name the file."""

from __future__ import annotations

import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from smsd.data import DataError
from smsd.data.image_check import MAX_PIXELS, check_encoded_image, check_encoded_images

RGB = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)


def save(path, image: Image.Image, **options):
    image.save(path, **options)
    return path


@pytest.fixture
def png(tmp_path):
    """A small PNG with an Exif chunk (every prefix of it is tried)."""
    exif = Image.Exif()
    exif[274] = 6  # orientation: DALI's parser reads it
    return save(tmp_path / "ok.png", Image.fromarray(RGB[:6, :8]), exif=exif)


@pytest.fixture
def jpeg(tmp_path):
    exif = Image.Exif()
    exif[274] = 6
    return save(tmp_path / "ok.jpg", Image.fromarray(RGB), exif=exif)


def test_valid_images_of_every_kind_pass(tmp_path, png, jpeg):
    rgb = Image.fromarray(RGB)
    paths = [png, jpeg, save(tmp_path / "rgb.png", rgb),
             save(tmp_path / "gray.png", rgb.convert("L")),
             save(tmp_path / "bw.png", rgb.convert("1")),
             save(tmp_path / "palette.png", rgb.convert("P")),
             save(tmp_path / "gray_alpha.png", rgb.convert("LA")),
             save(tmp_path / "rgba.png", rgb.convert("RGBA")),
             save(tmp_path / "gray16.png", Image.fromarray(RGB[..., 0].astype(np.uint16) * 257)),
             save(tmp_path / "gray.jpg", rgb.convert("L")),
             save(tmp_path / "cmyk.jpg", rgb.convert("CMYK")),
             save(tmp_path / "progressive.jpg", rgb, progressive=True, optimize=True),
             save(tmp_path / "jpeg_named.png", rgb, format="JPEG")]  # read by content
    check_encoded_images(paths)


def broken(path) -> re.Pattern:
    return re.compile(f"^cannot read image {re.escape(str(path))}: ")


def test_every_truncated_png_fails(tmp_path, png):
    data = png.read_bytes()
    cut = tmp_path / "cut.png"
    for n in range(len(data) - 12):  # up to the IEND chunk
        cut.write_bytes(data[:n])
        with pytest.raises(DataError, match=broken(cut)):
            check_encoded_image(cut)


def test_a_jpeg_cut_before_its_image_data_fails(tmp_path, jpeg):
    data = jpeg.read_bytes()
    sos = data.index(b"\xff\xda")
    cut = tmp_path / "cut.jpg"
    for n in range(sos + 1):
        cut.write_bytes(data[:n])
        with pytest.raises(DataError, match=broken(cut)):
            check_encoded_image(cut)
    cut.write_bytes(data[:sos + 20])  # inside the scan: DALI's decoder reports that safely
    check_encoded_image(cut)


def png_with(ihdr: bytes, *chunks: tuple[bytes, bytes]) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(k, b) for k, b in
                                         [(b"IHDR", ihdr), *chunks, (b"IEND", b"")])


@pytest.mark.parametrize("name,payload,reason", [
    ("empty.jpg", b"", "the file is empty"),
    ("text.png", b"this is not an image\n", "not a PNG or JPEG file"),
    ("gif.png", b"GIF89a\x01\x00\x01\x00", "not a PNG or JPEG file"),
    ("depth.png", png_with(struct.pack(">IIBBBBB", 4, 4, 3, 2, 0, 0, 0), (b"IDAT", b"x")),
     "color type 2 with bit depth 3"),
    ("no_data.png", png_with(struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0)), "no image data"),
    ("huge.png", png_with(struct.pack(">IIBBBBB", 60_000, 60_000, 8, 0, 0, 0, 0),
                          (b"IDAT", b"x")), f"at most {MAX_PIXELS}"),
    ("no_frame.jpg", b"\xff\xd8\xff\xdb\x00\x03\x00\xff\xda\x00\x02", "no frame header"),
    ("eoi.jpg", b"\xff\xd8\xff\xd9", "ends before its image data"),
])
def test_broken_files_name_the_file_and_why(tmp_path, name, payload, reason):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(DataError, match=broken(path)) as info:
        check_encoded_image(path)
    assert reason in str(info.value) and "\n" not in str(info.value)


def test_a_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="FileNotFoundError"):
        check_encoded_image(tmp_path / "gone.png")
