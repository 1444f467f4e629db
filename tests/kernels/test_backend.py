"""Which backend runs on which device (gopd_kernels.backend.resolve_backend)."""

from __future__ import annotations

import logging

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
