"""Which backend runs on which device (gopd_kernels.backend.resolve_backend)."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from gopd_kernels import backend
from gopd_kernels.backend import resolve_backend, warn_once

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device of a chosen compute capability, without one: set gpu[0] = (major, minor)."""
    cap = [(9, 0)]
    monkeypatch.setattr(backend, "cuda_capability", lambda device: cap[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(backend, "triton_importable", lambda: True)
    warn_once.cache_clear()
    yield cap
    warn_once.cache_clear()


@pytest.mark.parametrize("cap", [(8, 0), (8, 6), (9, 0), (10, 0)])
def test_ampere_and_newer_run_triton(gpu, cap):
    gpu[0] = cap
    assert resolve_backend("auto", CUDA) == "triton"
    assert resolve_backend("triton", CUDA) == "triton"


@pytest.mark.parametrize("cap", [(7, 5), (7, 0)])
def test_older_gpus_run_the_torch_backend_and_say_so(gpu, cap, caplog):
    gpu[0] = cap
    with caplog.at_level(logging.WARNING, logger="gopd_kernels"):
        assert resolve_backend("auto", CUDA) == "torch"
        assert resolve_backend("auto", CUDA) == "torch"
    assert caplog.text.count(f"compute capability {cap[0]}.{cap[1]}") == 1  # once
    assert "running the torch backend" in caplog.text
    why = rf"backend='triton': Tesla T4 has compute capability {cap[0]}\.{cap[1]}"
    with pytest.raises(ValueError, match=why):
        resolve_backend("triton", CUDA)
    assert resolve_backend("torch", CUDA) == "torch"


def test_the_cpu_never_asks_for_a_capability(monkeypatch):
    def no_gpu(device):
        raise AssertionError("cuda_capability called for a CPU tensor")

    monkeypatch.setattr(backend, "cuda_capability", no_gpu)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    if backend.interpreter_enabled():
        assert resolve_backend("triton", torch.device("cpu")) == "triton"


@pytest.fixture
def amd_gpu(monkeypatch):
    """A "cuda" device under ROCm's torch, of a chosen gfx name: set amd_gpu[0] = (name, arch)."""
    chosen = [("AMD Instinct MI300X", "gfx942")]
    props = lambda device=None: types.SimpleNamespace(gcnArchName=f"{chosen[0][1]}:sramecc+:xnack-")
    monkeypatch.setattr(torch.version, "hip", "6.4.43482")
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: chosen[0][0])
    monkeypatch.setattr(backend, "cuda_capability", lambda device: (9, 4))  # what ROCm reports for gfx942
    monkeypatch.setattr(backend, "triton_importable", lambda: True)
    warn_once.cache_clear()
    yield chosen
    warn_once.cache_clear()


@pytest.mark.parametrize("arch", backend.AMD_TRITON_ARCHS)
def test_amd_instinct_gpus_run_triton(amd_gpu, arch):
    amd_gpu[0] = ("AMD Instinct", arch)
    assert backend.amd_arch(CUDA) == arch
    assert resolve_backend("auto", CUDA) == "triton"
    assert resolve_backend("triton", CUDA) == "triton"


def test_other_amd_gpus_run_the_torch_backend_and_say_so(amd_gpu, caplog):
    """An AMD GPU the kernels are not compiled for (RDNA3 here, whose ROCm capability reads as
    11.0, past the NVIDIA gate) runs the torch twin, and says which GPUs Triton runs on."""
    amd_gpu[0] = ("AMD Radeon RX 7900 XTX", "gfx1100")
    with caplog.at_level(logging.WARNING, logger="gopd_kernels"):
        assert resolve_backend("auto", CUDA) == "torch"
    assert "AMD Radeon RX 7900 XTX (gfx1100) is not among the AMD GPUs" in caplog.text
    assert "gfx90a, gfx942, gfx950" in caplog.text and "running the torch backend" in caplog.text
    with pytest.raises(ValueError, match=r"backend='triton': AMD Radeon RX 7900 XTX \(gfx1100\)"):
        resolve_backend("triton", CUDA)


def test_nvidia_builds_never_ask_for_a_gfx_name(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    assert backend.amd_arch(CUDA) is None  # without touching torch.cuda: no device here
