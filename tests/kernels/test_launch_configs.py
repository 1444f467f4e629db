"""Every launch config the autotuner may pick, each run and checked on odd shapes.

On a GPU the autotuner times every config but checks only the output of the one it picks,
and under the interpreter one small config runs (INTERPRET_CONFIG). Without this file the
shipped block shapes (128 x 256 logit tiles, 64-deep steps, 256 x 128 GEMM tiles) would be
compiled ahead of time but never run in the tests. Each test pins one config: under the
interpreter as the module's INTERPRET_CONFIG, on a GPU as the autotuner's only config (a
config whose tiles do not fit the device's shared memory for the dtype is skipped there, as
the pruner would drop it). The configs are the autotuners' own lists: on an AMD GPU, the
two-stage ones (triton_common.amd_configs). Shapes are odd in every dimension the blocks cover: 130 rows,
D = 72 and 40, V = 1031.
"""

from __future__ import annotations

import pytest
import torch

from gopd_kernels import frozen_logprobs, token_logprobs_reference
from gopd_kernels.backend import interpreter_enabled
from gopd_kernels.ops import dense_kl_triton, matmul_triton
from gopd_kernels.ops import linear_logsoftmax_triton as tiles
from gopd_kernels.ops.triton_common import device_shared_limit, device_stages_in_registers, fitting_configs
from tests.kernels.helpers import make_inputs, rel_err
from tests.kernels.test_dense_kl import compare as compare_dense
from tests.kernels.test_token_logprobs import check_against_reference

pytestmark = pytest.mark.triton

BLOCKS = {  # (rows, columns, depth) block names of each family, for the shared-memory check
    "tile": ("BLOCK_M", "BLOCK_V", "BLOCK_D"),
    "matmul": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
}


def pin(monkeypatch, modules, tuned_kernels, cfg, family, dtype):
    """Run `cfg` and only it in `modules`' launches (module doc)."""
    if interpreter_enabled():
        for module in modules:
            monkeypatch.setattr(module, "INTERPRET_CONFIG", dict(cfg.kwargs))
        return
    elem = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    if not fitting_configs(
        [cfg], *BLOCKS[family], elem, device_shared_limit(0), device_stages_in_registers(0)
    ):
        pytest.skip(f"{cfg} does not fit this GPU's shared memory in {dtype}")
    for tuned in tuned_kernels:
        monkeypatch.setattr(tuned, "configs", [cfg])
        monkeypatch.setattr(tuned, "cache", {})


def _ids(configs):
    return [str(k) for k in range(len(configs))]


TILE_CONFIGS = tiles.vocab_partials_kernel_tuned.configs
MATMUL_CONFIGS = matmul_triton.matmul_kernel_tuned.configs
DENSE_CONFIGS = dense_kl_triton.dense_kl_partials_kernel_tuned.configs


@pytest.mark.parametrize("cfg", TILE_CONFIGS, ids=_ids(TILE_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_in_every_tile_config(cfg, dtype, device, monkeypatch):
    """Forward (one model) and the backward's logit gradient, with the entropy, a bias, a
    temperature, ignored positions and every gradient; then teacher + reference scoring (the
    two-model forward) with hidden sizes 72 and 40."""
    tuned = [tiles.vocab_partials_kernel_tuned, tiles.logits_grad_kernel_tuned]
    pin(monkeypatch, [tiles], tuned, cfg, "tile", dtype)
    check_against_reference(
        "triton", device, 130, 72, 1031, dtype, temperature=0.7, entropy=True, bias=True, ignore_frac=0.2
    )
    th, tw, tb, y = make_inputs(130, 72, 1031, dtype, device, seed=3)
    rh, rw, _, _ = make_inputs(130, 40, 1031, dtype, device, bias=False, seed=4)
    scores = frozen_logprobs(th, tw, y, rh, rw, teacher_bias=tb, temperature=0.9, backend="triton")
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    for got, (h, w, b) in ((scores.teacher_logp, (th, tw, tb)), (scores.ref_logp, (rh, rw, None))):
        to64 = lambda t: None if t is None else t.cpu().double()
        want = token_logprobs_reference(to64(h), to64(w), y.cpu(), bias=to64(b), temperature=0.9)
        torch.testing.assert_close(got.double().cpu(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("cfg", MATMUL_CONFIGS, ids=_ids(MATMUL_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matmul_in_every_config(cfg, dtype, device, monkeypatch):
    """out (+)= a @ b with odd M, N, K, a transposed operand, an fp32 accumulator and an output
    in the operands' dtype, against float64."""
    pin(monkeypatch, [matmul_triton], [matmul_triton.matmul_kernel_tuned], cfg, "matmul", dtype)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(72, 130, generator=g).to(device, dtype).t()  # [130, 72], column-major
    b = torch.randn(72, 1031, generator=g).to(device, dtype)
    c0 = torch.randn(130, 1031, generator=g).to(device)
    want = a.cpu().double() @ b.cpu().double()
    acc = matmul_triton.matmul(a, b, c0.clone(), accumulate=True)
    assert rel_err(acc, c0.cpu().double() + want) <= 1e-5
    out = matmul_triton.matmul(a, b, torch.empty(130, 1031, device=device, dtype=dtype))
    assert rel_err(out, want) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("cfg", DENSE_CONFIGS, ids=_ids(DENSE_CONFIGS))
def test_dense_loss_in_every_config(cfg, device, monkeypatch):
    """The dense loss's streaming forward and recomputing backward (lam = 1.25, three models of
    hidden sizes 72, 40 and 24) against float64."""
    tuned = [dense_kl_triton.dense_kl_partials_kernel_tuned, dense_kl_triton.dense_kl_grad_kernel_tuned]
    pin(monkeypatch, [dense_kl_triton], tuned, cfg, "tile", torch.float32)
    compare_dense("triton", device, 1.25, n=(5, 26), v=1031, dims=(72, 40, 24))


@pytest.mark.autotune
def test_the_autotuner_restores_an_accumulated_output_between_timings(device, monkeypatch):
    """On a GPU the autotuner times every config of the accumulating GEMM on one C: its
    restore_value must put C back after each timing, or the result holds several products.
    The in-memory and on-disk picks are set aside so that this call times the configs."""
    if interpreter_enabled():
        pytest.skip("the interpreter runs one config and times none")
    tuned = matmul_triton.matmul_kernel_tuned
    monkeypatch.setattr(tuned, "cache", {})
    monkeypatch.setattr(tuned, "cache_results", False)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(137, 40, generator=g).to(device), torch.randn(40, 263, generator=g).to(device)
    c0 = torch.randn(137, 263, generator=g).to(device)
    out = matmul_triton.matmul(a, b, c0.clone(), accumulate=True)
    assert len(tuned.cache) == 1  # it did tune
    assert rel_err(out, c0.cpu().double() + a.cpu().double() @ b.cpu().double()) <= 1e-5
