"""Backend selection: auto, set_backend, use_backend, SMSD_BACKEND, and clear errors."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import smsd
from smsd import backend as backend_mod
from smsd.backend import BackendStatus, BackendUnavailableError, select_backend

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def fake_status(monkeypatch):
    """Replace the availability probes: fake_status(triton=False, cpp=True, ...)."""

    def apply(**available):
        for name, ok in available.items():
            monkeypatch.setitem(
                backend_mod._STATUS_PROBES, name,
                lambda n=name, ok=ok: BackendStatus(n, ok, "fake: present" if ok else "fake: gone"),
            )
        backend_mod._status.cache_clear()

    yield apply
    backend_mod._status.cache_clear()


@pytest.fixture(autouse=True)
def _restore_global_backend(monkeypatch):
    monkeypatch.delenv("SMSD_BACKEND", raising=False)
    yield
    smsd.set_backend(None)


def test_backends_report_lists_every_backend_with_a_reason():
    report = smsd.backends()
    assert {"triton", "cpp", "torch"} <= set(report)
    assert report["torch"].available
    for status in report.values():
        assert status.detail
    text = str(report)
    assert "backend" in text and "requested: auto" in text


def test_auto_picks_cpp_on_cpu_then_torch(fake_status):
    fake_status(cpp=True, triton=True)
    assert select_backend("op", CPU) == "cpp"
    fake_status(cpp=False)
    assert select_backend("op", CPU) == "torch"


def test_auto_picks_triton_on_cuda(fake_status):
    fake_status(triton=True)
    assert select_backend("op", CUDA) == "triton"
    fake_status(triton=False)
    assert select_backend("op", CUDA) == "torch"


def test_auto_respects_what_the_op_supports(fake_status):
    fake_status(cpp=True)
    assert select_backend("op", CPU, supported=("torch",)) == "torch"


def test_named_backend_that_is_missing_says_why(fake_status):
    fake_status(cpp=False)
    smsd.set_backend("cpp")
    with pytest.raises(BackendUnavailableError, match="'cpp' is unavailable: fake: gone"):
        select_backend("masked_sample", CPU)


def test_cpp_refuses_cuda_tensors(fake_status):
    fake_status(cpp=True)
    with smsd.use_backend("cpp"), pytest.raises(BackendUnavailableError, match="CPU tensors only"):
        select_backend("op", CUDA)


def test_triton_on_cpu_needs_the_interpreter(fake_status, monkeypatch):
    fake_status(triton=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with smsd.use_backend("triton"), pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        select_backend("op", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with smsd.use_backend("triton"):
        assert select_backend("op", CPU) == "triton"


def test_backend_not_implemented_by_op(fake_status):
    with smsd.use_backend("cpp"):
        with pytest.raises(BackendUnavailableError, match="does not implement"):
            select_backend("op", CPU, supported=("torch",))


def test_precedence_scoped_over_global_over_env(monkeypatch):
    monkeypatch.setenv("SMSD_BACKEND", "torch")
    assert smsd.get_backend() == "torch"
    smsd.set_backend("cpp")
    assert smsd.get_backend() == "cpp"
    with smsd.use_backend("triton"):
        assert smsd.get_backend() == "triton"
        with smsd.use_backend("auto"):
            assert smsd.get_backend() == "auto"
        assert smsd.get_backend() == "triton"
    assert smsd.get_backend() == "cpp"


def test_unknown_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        smsd.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown backend"), smsd.use_backend("fast"):
        pass
    monkeypatch.setenv("SMSD_BACKEND", "nope")
    with pytest.raises(ValueError, match="SMSD_BACKEND"):
        smsd.get_backend()


def test_env_selects_backend_for_ops(monkeypatch):
    monkeypatch.setenv("SMSD_BACKEND", "torch")
    x = torch.randn(1, 4, 2)
    out = smsd.ops.masked_sample(x, torch.tensor([[3, 1]]))
    assert torch.equal(out, x[:, [3, 1]])


def test_register_backend_shows_in_report():
    backend_mod.register_backend("fakeblas", lambda: BackendStatus("fakeblas", False, "not here"))
    try:
        report = smsd.backends()
        assert report["fakeblas"].detail == "not here"
    finally:
        del backend_mod._STATUS_PROBES["fakeblas"]
        backend_mod._status.cache_clear()


@pytest.fixture
def fake_build(monkeypatch):
    """fake_build(built="2.13.0+cpu", running="2.14.1", ext=...): the build info setup.py
    wrote, the running torch, and smsd._C (a module, or None for one that fails to import)."""

    def apply(built, running, ext=None, present=True):
        info = None if built is None else types.SimpleNamespace(TORCH_VERSION=built)
        monkeypatch.setitem(sys.modules, "smsd._build_info", info)  # None: import fails
        monkeypatch.setitem(sys.modules, "smsd._C", ext)
        monkeypatch.setattr(torch, "__version__", running)
        monkeypatch.setattr(backend_mod, "_extension_present", lambda: present)
        return backend_mod._cpp_status()

    yield apply
    backend_mod._status.cache_clear()  # backends() cached the faked status


MISMATCH = ("built for torch 2.13.0+cpu, running {}: rebuild (pip install -e . "
            "--no-build-isolation, or a wheel built for torch {})")
FAKE_EXT = types.SimpleNamespace(cpu_isa=lambda: "avx2", num_threads=lambda: 4)


def test_cpp_built_for_another_torch_minor_says_rebuild_without_loading_it(fake_build):
    status = fake_build("2.13.0+cpu", "2.14.1+cu130", ext=FAKE_EXT)  # would load: not tried
    assert not status.available
    assert status.detail == MISMATCH.format("2.14.1+cu130", "2.14.1+cu130")


def test_cpp_built_for_another_torch_patch_says_rebuild_when_it_fails_to_load(fake_build):
    assert fake_build("2.13.0+cpu", "2.13.1", ext=FAKE_EXT).available
    status = fake_build("2.13.0+cpu", "2.13.1", ext=None)
    assert not status.available
    assert status.detail == MISMATCH.format("2.13.1", "2.13.1")


@pytest.mark.parametrize(("built", "present"), [(None, True), ("2.13.0+cpu", True),
                                                ("2.12.0+cpu", False)])
def test_cpp_missing_extension_is_not_built(fake_build, built, present):
    status = fake_build(built, "2.13.0+cpu", ext=None, present=present)
    assert not status.available
    assert status.detail.startswith("the C++ extension smsd._C is not built")


@pytest.mark.parametrize("name", ["torch", "triton"])  # triton: interpreted (conftest.py)
def test_torch_and_triton_run_beside_a_mismatched_extension(fake_build, name):
    fake_build("2.13.0+cpu", "2.14.1", ext=None)
    assert smsd.backends()["cpp"].detail.startswith("built for torch 2.13.0+cpu, running 2.14.1")
    x = torch.randn(1, 4, 2)
    with smsd.use_backend(name):
        assert torch.equal(smsd.ops.masked_sample(x, torch.tensor([[3, 1]])), x[:, [3, 1]])
