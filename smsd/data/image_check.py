"""Structural checks of PNG and JPEG files, before DALI reads them.

DALI's image decoder parses every image of a batch (nvImageCodec's parsers) before
decoding it. In DALI 2.4 a file that fails that parse, in a batch of 32 or more images,
can crash the process: the parse runs in blocks on the pipeline's threads and on the
calling one, and when the calling thread's block throws, the decoder returns without
waiting for the other threads, which go on using its freed stack (a segmentation fault
in ``ImageDecoder<CPUBackend>::RunImplImpl``; the GPU decoder shares that code).
Decoding errors come later, after every thread has stopped, and are reported safely.

:func:`check_encoded_image` reads what those parsers read (no pixels are decoded): for a
PNG the signature, the IHDR chunk and every chunk up to IEND; for a JPEG the markers up
to the first scan, one of them a frame header (SOF); and the image's size, whose buffer
DALI allocates while parsing. A file that passes gets past the parsers; damaged pixels
fail in decoding, which the loader reports naming the file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from .folder import DataError

__all__ = ["check_encoded_image", "check_encoded_images"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
# PNG color type → the bit depths it allows (PNG spec, table 11.1)
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_JPEG_SOS, _JPEG_EOI, _JPEG_APP1 = 0xDA, 0xD9, 0xE1
# Pillow's decompression-bomb limit (2 × Image.MAX_IMAGE_PIXELS), which the torch loader
# meets too. DALI allocates an image's buffer while parsing: one it cannot allocate is a
# parse error.
MAX_PIXELS = 2 * 89_478_485


class _Broken(Exception):
    """Why a file is not a complete image (becomes the :class:`DataError`'s reason)."""


def _read(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise _Broken(f"the file ends inside {what} (truncated?)")
    return data


def _check_size(width: int, height: int) -> None:
    if not width or not height or width * height > MAX_PIXELS:
        raise _Broken(f"the image is {width}×{height} pixels (at most {MAX_PIXELS} are read)")


def _check_png(f: BinaryIO, size: int) -> None:
    f.seek(len(PNG_SIGNATURE))
    length, kind = struct.unpack(">I4s", _read(f, 8, "the IHDR chunk"))
    if kind != b"IHDR" or length != 13:
        raise _Broken("a PNG must start with a 13-byte IHDR chunk")
    width, height, depth, color = struct.unpack(">IIBB", _read(f, 10, "the IHDR chunk"))
    _check_size(width, height)
    if depth not in _PNG_DEPTHS.get(color, ()):
        raise _Broken(f"PNG color type {color} with bit depth {depth} is not valid")
    f.seek(3 + 4, os.SEEK_CUR)  # the other IHDR fields and its CRC
    has_data = False
    while True:
        if f.tell() + 8 > size:
            raise _Broken("the file ends before the PNG's IEND chunk (truncated?)")
        length, kind = struct.unpack(">I4s", f.read(8))
        if kind == b"IEND":
            break
        if f.tell() + length + 4 > size:
            raise _Broken(f"the file ends inside the PNG's {kind.decode('latin-1')} chunk "
                          "(truncated?)")
        has_data |= kind == b"IDAT"
        f.seek(length + 4, os.SEEK_CUR)  # data and CRC
    if not has_data:
        raise _Broken("the PNG has no image data (IDAT chunk)")


def _check_jpeg(f: BinaryIO, size: int) -> None:
    f.seek(len(JPEG_SOI))
    frame = False
    while True:
        first, marker = _read(f, 2, "the JPEG's markers")
        while marker == 0xFF:  # fill bytes may precede a marker
            marker = _read(f, 1, "the JPEG's markers")[0]
        if first != 0xFF or marker == 0:
            raise _Broken(f"invalid JPEG marker at byte {f.tell() - 2}")
        if marker == _JPEG_SOS:
            break
        if marker == _JPEG_EOI:
            raise _Broken("the JPEG ends before its image data")
        start = f.tell()
        (length,) = struct.unpack(">H", _read(f, 2, "a JPEG segment"))
        if length < 2 or start + length > size:
            raise _Broken(f"the file ends inside a JPEG segment (marker 0x{marker:02X}, "
                          "truncated?)")
        body = f.read(6)  # the parser reads these six bytes whatever the length says
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header
            if len(body) < 6:
                raise _Broken("the file ends inside the JPEG's frame header (truncated?)")
            precision, height, width, components = struct.unpack(">BHHB", body)
            if not 1 <= precision <= 16 or components not in (1, 3, 4):
                raise _Broken(f"unsupported JPEG frame: {precision}-bit, {components} "
                              "components")
            if length < 8 + 3 * components:
                raise _Broken("the JPEG's frame header is too short")
            _check_size(width, height or 1)  # height 0: given after the first scan (DNL)
            frame = True
        elif marker == _JPEG_APP1 and body == b"Exif\0\0" and length < 8:
            raise _Broken("the JPEG's Exif segment is too short")
        f.seek(start + length)
    if not frame:
        raise _Broken("the JPEG has no frame header (SOF) before its image data")


def check_encoded_image(path: str | os.PathLike) -> None:
    """Raise :class:`DataError` naming ``path`` unless it is a PNG or JPEG (by content)
    whose structure DALI's parser reads without error. Cheap: headers only."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if not head:
                raise _Broken("the file is empty")
            if head.startswith(PNG_SIGNATURE):
                _check_png(f, size)
            elif head.startswith(JPEG_SOI):
                _check_jpeg(f, size)
            else:
                raise _Broken(f"not a PNG or JPEG file (it starts with {head!r})")
    except _Broken as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


def check_encoded_images(paths: Iterable[str | os.PathLike]) -> None:
    """:func:`check_encoded_image` on each of ``paths``; the first bad one raises."""
    for path in paths:
        check_encoded_image(path)
