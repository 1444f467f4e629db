"""The Triton backward's tiling (rows x vocabulary slices) and where its sums run in fp32.

The kernels themselves are checked against float64 through the public op (test_token_logprobs);
here grads_from_logit_grads gets a known dZ, so that its GEMMs' sums can be held to one
final bf16 rounding: a dW summed across chunks in bf16 (a pitfall of chunked kernels) fails."""

from __future__ import annotations

import pytest
import torch

from gopd_kernels.backend import BACKWARD_GEMMS, DW_SUMS
from gopd_kernels.ops import linear_logsoftmax_triton as tri
from gopd_kernels.ops.linear_logsoftmax_triton import backward_tiles, grads_from_logit_grads
from gopd_kernels.ops.matmul_triton import matmul
from gopd_kernels.ops.triton_common import token_bucket

pytestmark = pytest.mark.triton


def test_tiles_take_all_rows_while_an_fp32_dh_fits_and_key_the_slice_on_the_token_bucket():
    mib = 1 << 20
    # N = 16384, D = 4096 at a workspace of the bf16 head's size: all rows, 5 slices of 30464
    # columns (37888 would fit; 4 of them do not cover V, and 5 even ones leave no thin remainder)
    assert backward_tiles(16384, 151936, 4096, torch.bfloat16, 151936 * 4096 * 2) == (16384, 30464)
    # 130 and 200 tokens share a bucket (256): same slice width, so no new autotuning key
    tiles = lambda n: backward_tiles(n, 1031, 32, torch.float32, mib)
    assert tiles(130)[1] == tiles(200)[1] > tiles(257)[1]  # 257: the next bucket
    # an fp32 dH over all rows would outgrow the workspace: chunks of whole 128-row tiles
    assert backward_tiles(1000, 1031, 64, torch.float32, 100 * 64 * 4) == (128, 50)  # 25600 B / (128 x 4 B)
    assert backward_tiles(1000, 1031, 64, torch.float32, 300 * 64 * 4)[0] == 256
    # everything fits: one tile
    assert backward_tiles(7, 97, 16, torch.bfloat16, mib) == (7, 97)


@pytest.mark.parametrize("seed", range(5))
def test_tiles_cover_the_vocabulary_within_the_workspace(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(200):
        n, v, d = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (40_000, 300_000, 8192))
        ws = int(torch.randint(1 << 16, 1 << 31, (1,), generator=g))
        dtype = torch.bfloat16 if seed % 2 else torch.float32
        rows, cols = backward_tiles(n, v, d, dtype, ws)
        assert 1 <= rows <= n and 1 <= cols <= v
        assert rows == n or (rows % 128 == 0 and rows * d * 4 <= ws)  # fp32 dH of a chunk fits
        if cols >= 128:  # whole 128 columns within the workspace (sized for the token bucket)
            widest = ws // (token_bucket(rows) * dtype.itemsize)
            assert (cols % 128 == 0 or cols == v) and cols <= widest
            fewest = 1 if widest >= v else -(-v // (widest - widest % 128))
            assert -(-v // cols) == fewest


def within_one_bf16_rounding(
    got: torch.Tensor, exact: torch.Tensor, fp32_sum: torch.Tensor | float = 0.0
) -> bool:
    """|got - exact| < one bf16 ulp of exact: one rounding of an fp32 sum. (One ulp, not half:
    the interpreter's fp32 -> bf16 casts truncate, where GPUs round to nearest.) Summing k
    chunks in bf16 rounds k times and lands several ulps off. fp32_sum: the fp32 sum's own
    error bound, for entries that cancel to far below their terms."""
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    return bool(((got.double() - exact).abs() <= ulp * 1.001 + fp32_sum + 1e-12).all())


@pytest.mark.parametrize("workspace", [2000, 40_000, 10**6], ids=["row-chunks", "vocab-slices", "one-tile"])
@pytest.mark.parametrize("gemm", BACKWARD_GEMMS)
@pytest.mark.parametrize("dw_sum", DW_SUMS)
def test_dw_and_dh_take_one_bf16_rounding_however_they_are_tiled(workspace, gemm, dw_sum, device,
                                                                 monkeypatch):  # fmt: skip
    monkeypatch.setenv("GOPD_BACKWARD_GEMM", gemm)  # Triton's matmul or torch's (cuBLAS on CUDA)
    monkeypatch.setenv("GOPD_DW_SUM", dw_sum)  # across row chunks: an fp32 [V, D], or dW and a remainder
    n, d, v = 300, 32, 211
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(device, torch.bfloat16)
    weight = torch.randn(v, d, generator=g).to(device, torch.bfloat16)
    dz_all = torch.randn(n, v, generator=g).to(torch.bfloat16)  # what each tile's dZ holds
    rows, cols = backward_tiles(n, v, d, torch.bfloat16, workspace)
    regime = {2000: (True, True), 40_000: (False, True), 10**6: (False, False)}[workspace]
    assert (rows < n, cols < v) == regime  # each regime is what it says

    def write_logit_grads(r, c, dz):
        return dz.copy_(dz_all[r, c])

    pairs = []
    real_matmul = tri.matmul
    monkeypatch.setattr(tri, "matmul", lambda *a, lo: pairs.append(lo.shape) or real_matmul(*a, lo=lo))
    dh, dw, db = grads_from_logit_grads(hidden, weight, (True, True, True), workspace, write_logit_grads)
    # the pair only where dW is summed across row chunks, once per tile
    assert len(pairs) == (-(-n // rows) * -(-v // cols) if dw_sum == "pair" and rows < n else 0)
    exact = dz_all.double()
    assert dh.dtype == dw.dtype == torch.bfloat16
    # the pair is exact to ~16 bits of its partial sums, not fp32's 24: entries that cancel need that much
    drift = 0.0 if not pairs else pair_error_bound(-(-n // rows), exact.abs().T @ hidden.cpu().double().abs())
    assert within_one_bf16_rounding(dw.cpu(), exact.T @ hidden.cpu().double(), fp32_sum=drift)
    assert within_one_bf16_rounding(dh.cpu(), exact @ weight.cpu().double())
    torch.testing.assert_close(db.cpu().double(), exact.sum(0), atol=1e-4, rtol=1e-5)


def pair_error_bound(chunks: int, magnitude: torch.Tensor) -> torch.Tensor:
    """How far matmul's pair (value + bf16 remainder) may drift from the exact sum of `chunks`
    products: each step rounds the remainder of a partial sum s, at most 2^-14 |s| when the
    casts truncate (the interpreter; 2^-16 rounding to nearest, as GPUs do), and |s| is at
    most the sum of the terms' magnitudes."""
    return chunks * 2.0**-14 * magnitude


def test_a_pair_carries_a_bf16_sum_to_near_fp32_accuracy(device):
    """matmul's PAIR epilogue: seven products summed into (dW, remainder), both bf16. dW + the
    remainder stays within pair_error_bound of the exact sum (float64); dW alone within one
    bf16 rounding of it. Summing into a bf16 dW alone fails the first."""
    v, d, rows, chunks = 67, 33, 40, 7  # odd shapes, masked edges in every tile
    g = torch.Generator().manual_seed(0)
    dz = [torch.randn(rows, v, generator=g).to(device, torch.bfloat16) for _ in range(chunks)]
    h = [torch.randn(rows, d, generator=g).to(device, torch.bfloat16) for _ in range(chunks)]
    exact = sum(a.cpu().double().T @ b.cpu().double() for a, b in zip(dz, h, strict=True))
    magnitude = sum(a.cpu().double().abs().T @ b.cpu().double().abs() for a, b in zip(dz, h, strict=True))
    hi = torch.full((v, d), float("nan"), dtype=torch.bfloat16, device=device)  # the first GEMM writes
    lo, plain = hi.clone(), hi.clone()
    for k, (a, b) in enumerate(zip(dz, h, strict=True)):
        matmul(a.T, b, hi, k > 0, lo=lo)
        matmul(a.T, b, plain, k > 0)  # bf16 sums: rounded at every chunk
    bound = pair_error_bound(chunks, magnitude)
    within = lambda got: bool(((got.cpu().double() - exact).abs() <= bound).all())  # noqa: E731
    assert within(hi.double() + lo.double())
    assert not within(plain)  # the check above can fail
    assert within_one_bf16_rounding(hi.cpu(), exact, fp32_sum=bound)
    with pytest.raises(ValueError, match="lo must be a bf16"):
        matmul(dz[0].T, h[0], hi, lo=lo.float())


def test_torch_gemms_round_dw_through_a_bounded_fp32_block(device, monkeypatch):
    """cuBLAS's dW GEMMs write fp32 and round into the bf16 dW once, through a buffer of at
    most a quarter of the workspace, also when one slice spans the whole vocabulary (bf16 dZ
    tiles at small N: the dense recompute held an fp32 [V, D], 2.4 GB, on the H100)."""
    from gopd_kernels.ops import linear_logsoftmax_triton as tri

    monkeypatch.setenv("GOPD_BACKWARD_GEMM", "torch")
    n, d, v, workspace = 300, 128, 211, 300_000
    assert backward_tiles(n, v, d, torch.bfloat16, workspace) == (n, v)  # one tile of every column
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(device, torch.bfloat16)
    weight = torch.randn(v, d, generator=g).to(device, torch.bfloat16)
    dz_all = torch.randn(n, v, generator=g).to(torch.bfloat16)
    dw_blocks = []

    def recorded(a, b, out, *args):
        if b.shape == hidden.shape:  # dW[cols] = dZ^T H
            dw_blocks.append((out.dtype, out.shape[0]))
        return gemm(a, b, out, *args)

    gemm = tri.gradient_gemm
    monkeypatch.setattr(tri, "gradient_gemm", recorded)
    dh, dw, _ = grads_from_logit_grads(hidden, weight, (True, True, False), workspace,
                                       lambda r, c, dz: dz.copy_(dz_all[r, c]))  # fmt: skip
    widest = workspace // 4 // (d * 4)  # 146 of the 211 columns
    assert dw_blocks == [(torch.float32, widest), (torch.float32, v - widest)]
    exact, h64, w64 = dz_all.double(), hidden.cpu().double(), weight.cpu().double()
    fp32_sum = lambda a, b: a.shape[1] * 2.0**-24 * (a.abs() @ b.abs())  # noqa: E731 (an entry cancels)
    assert within_one_bf16_rounding(dw.cpu(), exact.T @ h64, fp32_sum(exact.T, h64))
    assert within_one_bf16_rounding(dh.cpu(), exact @ w64, fp32_sum(exact, w64))
