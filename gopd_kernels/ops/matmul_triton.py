"""C (+)= alpha A @ B with a float32 accumulator, on tensor cores, for the backward GEMMs.

The backward needs two products of the logit-gradient tile dZ [rows, V]:
dH += dZ @ W (summed over vocabulary slices in an fp32 buffer) and dW = dZ^T @ H (over all
rows of a slice, written in the weight's dtype). Strides make dZ^T free. Both operands are
cast to A's dtype before the dot (bf16 x bf16, fp16 x fp16, or fp32 x fp32 through 3xTF32).
alpha, a float32 scalar read on the device (no host sync), undoes the power-of-two scale an
fp16 dZ is written with (linear_logsoftmax_triton.logit_grad_scale) before C is added to or
rounded: exact, and the product never meets fp16's range.

A bf16 dW summed over row chunks can be carried as a pair (C, LO) of bf16 [V, D] tensors,
C + LO its value (PAIR): each GEMM forms s = acc + (C + LO) in fp32 and stores C = bf16(s),
LO = bf16(s - C), the exact remainder rounded. The pair holds about 16 significant bits
(an fp32 buffer 24, the bf16 result 8): each chunk adds at most 2^-16 of its partial sum
(2^-24 in fp32), far under the final rounding's 2^-8 unless the sum cancels to a small
fraction of its partial sums. C is that final rounding at the end, so the result needs no
fp32 [V, D] buffer (4 bytes an element) beside it, only LO (2). Its reads and writes per
chunk are an fp32 buffer's (4 + 4 bytes an element).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gopd_kernels.backend import warn_once
from gopd_kernels.ops.matmul_torch import mm_add, mm_into, operand
from gopd_kernels.ops.triton_common import (
    DOT_PRECISION,
    autotuned,
    config,
    dot_acc,
    grouped_tile,
    launch,
    make_pruner,
    token_bucket,
)

CONFIGS = [  # 8 warps for 128 x 128 tiles: on 4 warps the dW accumulation spills registers
    config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
    config(8, 4, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64),
    config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
    config(8, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
    config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),  # fp32 within 99 KiB (sm_86, sm_89, sm_120)
]
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32)
GROUP_M = 8


@triton.jit
def matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    lo_ptr,  # the bf16 remainder of C (same strides), read and written when PAIR
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    alpha_ptr,  # float32 scalar, read when SCALED
    M_BUCKET,  # token_bucket of M, N, K: the autotuning key (rows of dZ are M or K), not read
    N_BUCKET,
    K_BUCKET,
    ACCUMULATE: tl.constexpr,
    SCALED: tl.constexpr,
    PAIR: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # int64 offsets: rows x stride exceeds 2^31 for [16k, 152k] gradient tiles.
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + rk[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (rn[None, :] < N), other=0.0)
        acc = dot_acc(a, b.to(a.dtype), acc, DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :].to(tl.int64) * stride_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SCALED:
        acc *= tl.load(alpha_ptr)
    if PAIR:
        lo_ptrs = lo_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :].to(tl.int64) * stride_cn
        if ACCUMULATE:  # C + LO is exact in fp32 (LO is under half of C's last place): one rounding
            hi = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
            acc += hi + tl.load(lo_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        hi = acc.to(c_ptr.dtype.element_ty)
        tl.store(c_ptrs, hi, mask=c_mask)
        tl.store(lo_ptrs, (acc - hi.to(tl.float32)).to(lo_ptr.dtype.element_ty), mask=c_mask)
    else:
        if ACCUMULATE:
            acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


matmul_kernel_tuned = autotuned(
    matmul_kernel,
    CONFIGS,
    ["M_BUCKET", "N_BUCKET", "K_BUCKET", "ACCUMULATE", "SCALED", "PAIR"],
    make_pruner("BLOCK_M", "BLOCK_N", "BLOCK_K", "a_ptr"),
    restore_value=["c_ptr", "lo_ptr"],  # timing runs must not accumulate into C (or its remainder)
)


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    accumulate: bool = False,
    alpha: torch.Tensor | None = None,
    lo: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (+)= alpha a @ b; a [M, K], b [K, N] (any strides), out [M, N] of any float dtype,
    alpha None (1) or a float32 scalar tensor on the device. lo: out's bf16 remainder, the
    pair (out, lo) holding the sum (module doc); both bf16, of one shape and strides."""
    if lo is not None and not (
        out.dtype == lo.dtype == torch.bfloat16 and lo.shape == out.shape and lo.stride() == out.stride()
    ):
        raise ValueError(
            f"lo must be a bf16 tensor of out's shape and strides, with out bf16; got out {out.dtype} "
            f"{tuple(out.shape)} {out.stride()}, lo {lo.dtype} {tuple(lo.shape)} {lo.stride()}"
        )
    M, K = a.shape
    N = b.shape[1]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    launch(
        matmul_kernel,
        matmul_kernel_tuned,
        grid,
        INTERPRET_CONFIG,
        a,
        b,
        out,
        out.new_empty(1) if lo is None else lo,  # not read; not out, which autotuning would copy twice
        M,
        N,
        K,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        out if alpha is None else alpha,
        token_bucket(M),
        token_bucket(N),
        token_bucket(K),
        ACCUMULATE=accumulate,
        SCALED=alpha is not None,
        PAIR=lo is not None,
        DOT_PRECISION=DOT_PRECISION[a.dtype],
        GROUP_M=GROUP_M,
    )
    return out


def gradient_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    accumulate: bool,
    runner: str,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (+)= alpha a @ b for the backward, by `runner` (backend.backward_gemm()): "triton",
    matmul() above, or "torch", torch's GEMM (cuBLAS on CUDA, bf16 operands with an fp32
    result: matmul_torch) into an `out` of float32, where the caller rounds once. Operands of
    two dtypes (dZ in bf16 against an fp16 head) and a scaled fp16 dZ (alpha on the device,
    which torch's GEMMs would read with a host sync) always take matmul(); a log line says so
    once."""
    if runner == "torch":
        if a.dtype == b.dtype and out.dtype == torch.float32 and alpha is None:
            return (mm_add if accumulate else mm_into)(out, operand(a), operand(b))
        scaled = ", and no device-side scale, which this fp16 dZ has" if alpha is not None else ""
        warn_once(
            f"GOPD_BACKWARD_GEMM=torch: {a.dtype} x {b.dtype} -> {out.dtype} products run on the Triton "
            f"matmul (torch's GEMMs take one operand dtype and an fp32 result here{scaled})"
        )
    return matmul(a, b, out, accumulate, alpha)
