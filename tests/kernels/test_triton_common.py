"""Launch plumbing shared by the Triton kernels: what the autotuner keys on."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gopd_kernels.ops.linear_logsoftmax_triton import vocab_slices  # noqa: E402
from gopd_kernels.ops.triton_common import token_bucket  # noqa: E402
from tests.kernels.helpers import autotuned_kernels, fresh_device_caches  # noqa: E402

# Arguments that carry a token count (rows of H, or of dZ: M, and K in dW += dZ^T H).
TOKEN_COUNTS = {"M", "K"}


@pytest.mark.parametrize(
    ("n", "bucket"), [(0, 1), (1, 1), (2, 2), (3, 4), (4096, 4096), (4097, 8192), (16383, 16384)]
)
def test_token_bucket_is_the_next_power_of_two(n, bucket):
    assert token_bucket(n) == bucket


def test_no_autotuner_keys_on_a_raw_token_count():
    """Token counts change every step; a raw one in the key re-tunes every config each time."""
    tuned = autotuned_kernels()
    assert {"vocab_partials_kernel_tuned", "logits_grad_kernel_tuned", "matmul_kernel_tuned"} <= set(tuned)
    for name, autotuner in tuned.items():
        assert not TOKEN_COUNTS & set(autotuner.keys), (name, autotuner.keys)
        assert any(k.endswith("_BUCKET") for k in autotuner.keys), (name, autotuner.keys)


def test_vocab_slices_take_one_value_per_token_bucket():
    """The slice length is an autotuning key too: it must not move within a bucket."""
    cpu = torch.device("cpu")
    for lo in (1025, 4097):
        assert len({vocab_slices(rows, 151936, cpu) for rows in range(lo, 2 * lo - 1, 31)}) == 1


def test_gradient_kernels_key_on_the_slice_width_not_on_each_slice():
    """The backward's last vocabulary slice is narrower than the others; keyed on V (the
    width a launch sees) it would be tuned again. dZ's row stride is the width of them all,
    and takes one value per token bucket (backward_tiles)."""
    from gopd_kernels.ops.linear_logsoftmax_triton import backward_tiles

    tuned = autotuned_kernels()
    for name in ("logits_grad_kernel_tuned", "dense_kl_grad_kernel_tuned"):
        assert "stride_dzm" in tuned[name].keys and "V" not in tuned[name].keys, tuned[name].keys
    widths = {
        backward_tiles(rows, 151936, 4096, torch.bfloat16, 151936 * 4096 * 2)[1]
        for rows in range(8193, 16385, 97)
    }
    assert len(widths) == 1


def test_autotuned_keeps_its_picks_on_disk(monkeypatch):
    """A new process (a resumed run, the next benchmark) reuses the picks instead of timing
    every config again; Triton ignores the flag under the interpreter, so the call is checked."""
    from gopd_kernels.ops import triton_common

    seen = {}

    def fake_autotune(configs, **kwargs):
        seen.update(kwargs, configs=configs)
        return lambda kernel: ("tuned", kernel)

    monkeypatch.setattr(triton_common.triton, "autotune", fake_autotune)
    prune = object()
    assert triton_common.autotuned("k", ["c"], ["M_BUCKET"], prune, restore_value=["c_ptr"]) == ("tuned", "k")
    assert seen == {"configs": ["c"], "key": ["M_BUCKET"], "prune_configs_by": {"early_config_prune": prune},
                    "cache_results": True, "restore_value": ["c_ptr"]}  # fmt: skip


def test_gpu_launches_name_fp_fusion(monkeypatch):
    """FP fusion is named at each compiled launch (Triton 3.10 turns its default off; 3.9 warns
    where it is left unset): the tuned kernel gets it, the interpreter's raw one need not."""
    from gopd_kernels.ops import fold_rows_triton, triton_common

    calls = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, kwargs))

    for interpreted in (False, True):
        monkeypatch.setattr(triton_common, "interpreter_enabled", lambda interpreted=interpreted: interpreted)
        triton_common.launch(Kernel("raw"), Kernel("tuned"), (1,), {"BLOCK": 16}, 1, M=2)
    assert calls == [("tuned", {"M": 2, "enable_fp_fusion": True}), ("raw", {"M": 2, "BLOCK": 16})]
    assert fold_rows_triton._launch_config(151936)["enable_fp_fusion"] is True  # the row passes' launches


def test_pruner_keeps_what_fits_the_devices_shared_memory(monkeypatch, caplog):
    """A GPU with 99 KiB per block (L4, RTX 4090, RTX 5090) gets only the configs that fit it;
    where none does, the last is tried, and a log line says so."""
    from gopd_kernels.ops import matmul_triton, triton_common

    prune = triton_common.make_pruner("BLOCK_M", "BLOCK_N", "BLOCK_K", "a_ptr")
    configs = matmul_triton.CONFIGS
    half, single = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    kib = lambda cfg, elem: triton_common.estimated_shared_bytes(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_K", elem)
    for limit in (232448, 101376):
        monkeypatch.setattr(triton_common, "device_shared_limit", lambda index, limit=limit: limit)
        for t in (half, single):
            kept = prune(configs, {"a_ptr": t})
            assert kept and all(kib(c, t.element_size()) * 1.1 <= limit for c in kept)
            assert [c for c in configs if c not in kept] == [
                c for c in configs if kib(c, t.element_size()) * 1.1 > limit
            ]
    assert len(prune(configs, {"a_ptr": single})) < len(configs)  # 99 KiB drops the widest fp32 tiles
    monkeypatch.setattr(triton_common, "device_shared_limit", lambda index: 32 * 1024)
    triton_common.warn_once.cache_clear()  # it says a message once per process
    with caplog.at_level("WARNING", logger="gopd_kernels"):
        assert prune(configs, {"a_ptr": single}) == configs[-1:]
    assert "no Triton launch config fits 32 KiB" in caplog.text


def test_amd_configs_keep_every_tile_in_two_stages():
    from gopd_kernels.ops import linear_logsoftmax_triton, matmul_triton, triton_common

    for configs in (matmul_triton.CONFIGS, linear_logsoftmax_triton.TILE_CONFIGS):
        amd = triton_common.amd_configs(configs)
        tiles = lambda cs: {(tuple(sorted(c.kwargs.items())), c.num_warps) for c in cs}
        assert tiles(amd) == tiles(configs) and len(amd) == len(tiles(configs))  # each tile once
        assert {c.num_stages for c in amd} == {triton_common.AMD_STAGES}


def test_the_estimate_counts_the_stages_a_target_keeps_in_shared_memory():
    """Against what gopd_kernels.aot measured (Triton 3.9): the 128 x 256 x 64 bf16 backward GEMM
    (dH's, accumulating) in 3 stages compiled to 98304 bytes of LDS on gfx942 and gfx90a (two
    tiles: the third waits in registers) and to 154288 on gfx950 (three tiles and an epilogue,
    within the estimate's 10 % headroom, as NVIDIA's)."""
    from gopd_kernels.ops import triton_common

    cfg = triton_common.config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64)
    tile = ("BLOCK_M", "BLOCK_N", "BLOCK_K", 2)
    for arch in ("gfx90a", "gfx942"):
        held_back = triton_common.STAGES_IN_REGISTERS[arch]
        assert triton_common.estimated_shared_bytes(cfg, *tile, held_back) == 98304
    assert "gfx950" not in triton_common.STAGES_IN_REGISTERS
    assert triton_common.estimated_shared_bytes(cfg, *tile) == 147456 <= 154288 <= 147456 * 1.1


@pytest.mark.parametrize(("arch", "kept_fp32"), [("gfx942", 2), ("gfx950", 3)])
def test_pruner_on_an_amd_gpu_keeps_the_wide_tiles_that_fit_its_lds(monkeypatch, arch, kept_fp32):
    """Under ROCm's torch the pruner reads the LDS of the device's gfx name and keeps each tile
    whose two stages fit: every bf16 GEMM tile on MI300X's 64 KiB (one stage in LDS), where
    NVIDIA's 3-4 stage configs kept the narrowest three; fp32 drops the widest."""
    import types

    from gopd_kernels.ops import matmul_triton, triton_common

    props = types.SimpleNamespace(gcnArchName=f"{arch}:sramecc+:xnack-")
    monkeypatch.setattr(torch.version, "hip", "6.4.43482")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    fresh_device_caches(monkeypatch)
    prune = triton_common.make_pruner("BLOCK_M", "BLOCK_N", "BLOCK_K", "a_ptr")
    amd = triton_common.amd_configs(matmul_triton.CONFIGS)
    assert triton_common.device_shared_limit(0) == triton_common.SHARED_MEMORY_LIMIT[arch]
    assert prune(amd, {"a_ptr": torch.empty(1, dtype=torch.bfloat16)}) == amd
    assert len(prune(amd, {"a_ptr": torch.empty(1)})) == kept_fp32
    if arch == "gfx942":
        nvidia = triton_common.fitting_configs(
            matmul_triton.CONFIGS, "BLOCK_M", "BLOCK_N", "BLOCK_K", 2, 65536
        )
        assert len(nvidia) == 3
