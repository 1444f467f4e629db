"""The row work of a folded loss on the GPU: two memory-bound passes over a chunk's logits.

A folded loss (folded_loss_torch) forms each row chunk's fp32 logits z [rows, V] with one
GEMM, then needs, per row t with target y_t,

    s_t   = z_ty - lse_t,      lse_t = log sum_v exp(z_tv)            (row_log_softmax)
    dz_tv = c_t (1[v = y_t] - exp(z_tv - lse_t))                      (row_logit_grads)

with c_t = dL/ds_t from the loss. In PyTorch that is some ten passes over the fp32 tile
(max, shift, exp, sum, scale, scatter, cast); here it is one read for the log-sum-exp
(an online maximum per lane) and one read plus a bf16 write for dz, which the two
gradient GEMMs then take as their operand. One program per row; no tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gopd_kernels.backend import interpreter_enabled
from gopd_kernels.ops.matmul_triton import matmul

# One config, not tuned: columns per step (8 KB of fp32 per row and step) over 8 warps.
CONFIGS = [triton.Config({"BLOCK_V": 2048}, num_warps=8)]


@triton.jit
def row_log_softmax_kernel(z_ptr, y_ptr, s_ptr, lse_ptr, V, stride_zm, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_zm
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane running maximum
    acc = tl.zeros([BLOCK_V], tl.float32)  # per-lane sum of exp(z - m)
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(z_row + v0 + cols, mask=v0 + cols < V, other=float("-inf"))
        m_new = tl.maximum(m, z)
        seen = m_new > float("-inf")  # a lane past V so far: nothing to rescale (avoids inf - inf)
        acc = tl.where(seen, acc * tl.exp(m - m_new) + tl.exp(z - m_new), 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(acc * tl.exp(m - m_row), axis=0))
    z_y = tl.load(z_row + tl.load(y_ptr + row))
    tl.store(lse_ptr + row, lse)
    tl.store(s_ptr + row, z_y - lse)


@triton.jit
def row_logit_grads_kernel(
    z_ptr, y_ptr, lse_ptr, c_ptr, dz_ptr, V, stride_zm, stride_dzm, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_zm
    dz_row = dz_ptr + row.to(tl.int64) * stride_dzm
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    c = tl.load(c_ptr + row)
    y = tl.load(y_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + cols
        z = tl.load(z_row + v, mask=v < V, other=float("-inf"))
        dz = tl.where(v == y, c, 0.0) - c * tl.exp(z - lse)
        tl.store(dz_row + v, dz.to(dz_ptr.dtype.element_ty), mask=v < V)


def _launch_config(vocab: int) -> dict:
    cfg = CONFIGS[0]
    block = cfg.kwargs["BLOCK_V"]
    if interpreter_enabled():  # numpy per step: a narrow block for small test vocabularies
        block = min(block, triton.next_power_of_2(vocab))
    return dict(BLOCK_V=block, num_warps=cfg.num_warps)


def log_softmax(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, lse) [rows] of fp32 logits z [rows, V] (unit column stride), targets [rows] in [0, V).
    z is left as it is."""
    rows, vocab = z.shape
    s = torch.empty(rows, dtype=torch.float32, device=z.device)
    lse = torch.empty_like(s)
    if rows:
        row_log_softmax_kernel[(rows,)](z, targets, s, lse, vocab, z.stride(0), **_launch_config(vocab))
    return s, lse


def logit_grads(
    z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, c: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """A new dz [rows, V] of `dtype` <- c (1[v = y] - exp(z - lse)); c [rows] fp32."""
    rows, vocab = z.shape
    dz = torch.empty(rows, vocab, dtype=dtype, device=z.device)
    if rows:
        row_logit_grads_kernel[(rows,)](
            z, targets, lse, c, dz, vocab, z.stride(0), dz.stride(0), **_launch_config(vocab)
        )
    return dz


def gemm_rounded(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out <- a @ b, accumulated in fp32 and rounded once into out's dtype (the Triton matmul:
    cuBLAS's bf16 results may reduce in bf16). The fold's dW when its rows are one chunk."""
    return matmul(a, b, out)
