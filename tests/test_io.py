"""Atomic writes: all or nothing, mode applied from the start."""

from __future__ import annotations

import os
import stat

import pytest

from smsd.io import atomic_write, atomic_write_bytes, write_with


def test_replaces_whole_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_failure_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as handle:
        handle.write(b"half")
        raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_mode_and_no_overwrite(tmp_path):
    path = tmp_path / "secret"
    atomic_write_bytes(path, b"s", mode=0o600, overwrite=False)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        atomic_write_bytes(path, b"t", overwrite=False)
    assert path.read_bytes() == b"s"


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_bytes(tmp_path / "nope" / "f", b"x")


def test_write_with_library_writer(tmp_path):
    path = tmp_path / "table.csv"
    write_with(path, lambda tmp: tmp.write_text("a,b\n"))
    assert path.read_text() == "a,b\n"

    def broken(tmp):
        tmp.write_text("partial")
        raise OSError("no space")

    with pytest.raises(OSError):
        write_with(path, broken)
    assert path.read_text() == "a,b\n"
    assert os.listdir(tmp_path) == ["table.csv"]
