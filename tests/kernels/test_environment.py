"""`gopd env`'s report: versions, each device's backend and launch configs, settings checked."""

from __future__ import annotations

import types

import pytest
import torch

from gopd_kernels import aot, backend, environment
from gopd_kernels.ops import matmul_torch
from tests.kernels.helpers import fresh_device_caches


def test_the_report_names_versions_devices_and_settings(monkeypatch):
    for name in environment.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GOPD_DW_SUM", "pair")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    text = environment.report()
    assert f"torch {torch.__version__}" in text
    assert "transformers " in text and "liger-kernel " in text
    if not torch.cuda.is_available():
        assert "no CUDA device: backend auto runs the torch twin" in text
    assert "  GOPD_DW_SUM=pair\n" in text
    assert "float32 matmul precision: highest\n" in text
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert "float32 matmul precision: high (torch's fp32 GEMMs" in environment.report()
    assert "unset: GOPD_WORKSPACE_MB, GOPD_LOGITS_GEMM, GOPD_BACKWARD_GEMM, TRITON_INTERPRET" in text


def test_a_bad_setting_is_shown_with_the_error_the_ops_would_raise(monkeypatch):
    monkeypatch.setenv("GOPD_LOGITS_GEMM", "tritn")
    monkeypatch.setenv("GOPD_WORKSPACE_MB", "lots")
    monkeypatch.setenv("GOPD_BACKWARD_GEMM", "torch")
    lines = environment.setting_lines()
    assert (
        "  GOPD_LOGITS_GEMM=tritn: INVALID, the ops will raise: GOPD_LOGITS_GEMM must be one of"
        in "\n".join(lines)
    )
    assert any(
        line.startswith("  GOPD_WORKSPACE_MB=lots: INVALID") and "number of MiB" in line for line in lines
    )
    assert "  GOPD_BACKWARD_GEMM=torch" in lines


def _fake_gpu(
    monkeypatch, name: str, capability: tuple[int, int], shared: int, arch: str | None = None
) -> None:
    """A device as torch would describe it; `arch`: an AMD GPU's gfx name, under ROCm's torch."""
    props = types.SimpleNamespace(total_memory=24 * 2**30, gcnArchName=f"{arch}:sramecc+:xnack-")
    if arch is None:  # ROCm's torch need not report NVIDIA's opt-in figure; triton_common knows the LDS
        props.shared_memory_per_block_optin = shared
    monkeypatch.setattr(torch.version, "hip", "6.4.43482" if arch else None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(backend, "cuda_capability", lambda device: capability)
    monkeypatch.setattr(matmul_torch, "half_gemm_mode", lambda device, dtype: "addmm")
    if backend.triton_importable():
        fresh_device_caches(monkeypatch)


@pytest.mark.parametrize(
    ("name", "capability", "shared", "coverage"),
    [
        ("NVIDIA H100", (9, 0), 232448, "sm_90: every kernel compiled ahead of time"),
        (
            "NVIDIA L4",
            (8, 9),
            101376,
            "sm_89: not in the test suite (python -m gopd_kernels.aot --targets 89",
        ),
        ("NVIDIA B200", (10, 0), 232448, "sm_100: the bf16 training paths"),
        (
            "NVIDIA A10G",
            (8, 6),
            101376,
            "sm_86: not in the test suite (python -m gopd_kernels.aot --targets 86",
        ),
        ("Jetson AGX Orin", (8, 7), 166912, "sm_87: never compiled ahead of time"),
    ],
)
def test_a_gpu_gets_its_backend_coverage_and_configs(monkeypatch, name, capability, shared, coverage):
    pytest.importorskip("triton")
    _fake_gpu(monkeypatch, name, capability, shared)
    lines = environment.cuda_device_lines(0)
    assert lines[0] == f"cuda:0: {name}, compute capability {capability[0]}.{capability[1]}, 24.0 GiB"
    assert lines[1].startswith(f"  backend auto: triton; {coverage}")
    assert lines[2].startswith(
        f"  shared memory per block {shared // 1024} KiB; launch configs kept for bf16: "
    )
    from gopd_kernels.ops.triton_common import estimated_shared_bytes

    for family, kernel in environment.CONFIG_FAMILIES.items():  # bf16 tiles within the limit, 10 % spare
        variant = next(v for v in aot.kernel_variants() if v.kernel == kernel and aot.is_hot(v))
        configs = aot.module_configs(variant)
        fit = sum(estimated_shared_bytes(c, *variant.tile, 2) * 1.1 <= shared for c in configs)
        assert f"{family} {fit}/{len(configs)}" in lines[2]
    if shared < 232448:  # less shared memory keeps fewer of the widest tiles
        assert environment.pruned_config_counts(232448) != lines[2].split("bf16: ")[1]
    assert lines[3:] == [
        f"  torch backend {d} GEMMs: {environment.GEMM_MODES['addmm']}" for d in ("bfloat16", "float16")
    ]


@pytest.mark.parametrize(
    ("name", "arch", "coverage", "kept"),
    [
        (
            "AMD Instinct MI300X",
            "gfx942",
            "gfx942: the training paths (bf16, fp32) compiled",
            "GEMMs 5/5",
        ),
        (
            "AMD Instinct MI355X",
            "gfx950",
            "gfx950: not in the test suite (python -m gopd_kernels.aot",
            "GEMMs 5/5",
        ),
    ],
)
def test_an_amd_gpu_gets_its_gfx_name_lds_and_two_stage_configs(monkeypatch, name, arch, coverage, kept):
    """Under ROCm's torch: the gfx name instead of a compute capability, its LDS from
    triton_common (64 KiB on MI300X, 160 KiB on MI355X), the two-stage AMD configs counted."""
    pytest.importorskip("triton")
    from gopd_kernels.ops.triton_common import SHARED_MEMORY_LIMIT

    _fake_gpu(monkeypatch, name, (9, 4), 0, arch=arch)
    lines = environment.cuda_device_lines(0)
    assert lines[0] == f"cuda:0: {name}, {arch}, 24.0 GiB"
    assert lines[1].startswith(f"  backend auto: triton; {coverage}")
    assert lines[2].startswith(f"  shared memory per block {SHARED_MEMORY_LIMIT[arch] // 1024} KiB; ")
    assert kept in lines[2]  # every bf16 GEMM tile fits in two stages, where NVIDIA's stages kept 3 of 6
    assert "ROCm (HIP) build: 6.4.43482" in environment.report()


def test_an_amd_gpu_triton_is_not_compiled_for_runs_the_torch_backend(monkeypatch):
    _fake_gpu(monkeypatch, "AMD Radeon RX 7900 XTX", (11, 0), 0, arch="gfx1100")
    lines = environment.cuda_device_lines(0)
    assert lines[0] == "cuda:0: AMD Radeon RX 7900 XTX, gfx1100, 24.0 GiB"
    assert lines[1].startswith(
        "  backend auto: torch (AMD Radeon RX 7900 XTX (gfx1100) is not among the AMD GPUs"
    )


def test_an_older_gpu_runs_the_torch_backend_and_says_why(monkeypatch):
    _fake_gpu(monkeypatch, "Tesla T4", (7, 5), 65536)
    monkeypatch.setattr(matmul_torch, "half_gemm_mode", lambda device, dtype: None)
    lines = environment.cuda_device_lines(0)
    assert lines[1].startswith(
        "  backend auto: torch (Tesla T4 has compute capability 7.5, and the Triton kernels need"
    )
    assert lines[2] == f"  torch backend bfloat16 GEMMs: {environment.GEMM_MODES[None]}"


def test_gopd_env_prints_the_report(capsys):
    from gopd.cli import main

    assert main(["env"]) == 0
    assert f"torch {torch.__version__}" in capsys.readouterr().out
