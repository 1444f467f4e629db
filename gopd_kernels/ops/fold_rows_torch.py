"""The row work of the folded losses in PyTorch (any device): see fold_rows_triton for the math.

Same contract as fold_rows_triton: log_softmax(z, y, cap) -> (s, state), then
logit_grads(z, y, state, c, dtype, cap) -> dz; lse(z, scratch) and dense_kl(...) for the dense
fold. Both consume z in logit_grads. Here they work in place on the fp32 tiles (after
log_softmax, z holds exp(z - max), unless capped, and state is its row sums; lse leaves
exp(z - max) in scratch; dense_kl overwrites all its tiles), and dz is cast to `dtype`, the GEMM
operand's (matmul_torch.tile_dtype: fp32 for fp16, scaled into fp16 at the GEMM), at the end.
"""

from __future__ import annotations

import torch

from gopd_kernels.ops.dense_kl_torch import _lse_partials
from gopd_kernels.ops.linear_logsoftmax_torch import cap_grad
from gopd_kernels.ops.matmul_torch import tile_dtype

# Soft-capped logits: logit_grads needs each logit z and exp(z - m) together. It takes the
# exponentials again a column block at a time through a scratch of 1 / CAP_BLOCKS of a tile,
# rather than hold a second tile (which halved the chunk) or read z back from exp(z - m) by a
# log pass: measured on the AMD VM (gopd_loss, N = 2048, D = 1024, V = 151936, fp32), that log
# took 0.95 s and the halved chunk's GEMMs 0.9 s more of a 12.1 s step.
CAP_BLOCKS = 8
CAP_TILES = 1 / CAP_BLOCKS  # logit_grads over soft-capped logits: the block scratch
DENSE_CAP_TILES = 1  # dense_kl over a soft-capped student: one more tile, for da/dz


def log_softmax(
    z: torch.Tensor, targets: torch.Tensor, cap: float | None = None
) -> tuple[torch.Tensor, tuple]:
    """(s, state): state = (sum exp(z - m), m, z_y) per row; z then holds exp(z - m), or, for
    soft-capped logits (cap), z itself (logit_grads reads both)."""
    z_y = z.gather(1, targets[:, None]).squeeze(1)
    m = z.amax(dim=1)
    if cap is None:
        sum_e = z.sub_(m[:, None]).exp_().sum(dim=1)  # in place: the tile now holds exp(z - m)
    else:
        sum_e = sum(e.sum(dim=1) for _, e in _exp_blocks(z, m))
    return z_y - m - sum_e.log(), (sum_e, m, z_y)


def _exp_blocks(z: torch.Tensor, m: torch.Tensor):
    """(columns, exp(z[:, columns] - m)) over CAP_BLOCKS column blocks of z, each exponential
    in one scratch of a block's size (valid until the next block)."""
    width = -(-z.shape[1] // CAP_BLOCKS)
    scratch = torch.empty(z.shape[0], width, dtype=z.dtype, device=z.device)
    for c0 in range(0, z.shape[1], width):
        cols = slice(c0, min(c0 + width, z.shape[1]))
        yield cols, torch.sub(z[:, cols], m[:, None], out=scratch[:, : cols.stop - c0]).exp_()


def logit_grads(
    z: torch.Tensor,
    targets: torch.Tensor,
    state: tuple,
    c: torch.Tensor,
    dtype: torch.dtype,
    cap: float | None = None,
) -> torch.Tensor:
    """c (1[v = y] - p) from z = exp(z - m) (log_softmax's); for soft-capped logits (cap) times
    1 - (z / cap)^2 from z itself (log_softmax leaves it), a column block at a time."""
    sum_e, m, z_y = state
    minus_c_over_sum = (-c / sum_e)[:, None]
    if cap is None:
        dz = z.mul_(minus_c_over_sum).scatter_add_(1, targets[:, None], c[:, None])  # c (1[v = y] - p)
        return dz.to(tile_dtype(dtype))
    for cols, e in _exp_blocks(z, m):
        block = z[:, cols]
        cap_grad(block, cap, out=block).clamp_(min=0.0).mul_(e).mul_(minus_c_over_sum)
    target_grad = c * cap_grad(z_y, cap)
    return z.scatter_add_(1, targets[:, None], target_grad[:, None]).to(tile_dtype(dtype))


def lse(z: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    m, sum_e = _lse_partials(z, scratch)
    return m + sum_e.log()


def dense_kl(
    a: torch.Tensor,
    c: torch.Tensor,
    z_t: torch.Tensor | None,
    lse_c: torch.Tensor,
    lse_t: torch.Tensor | None,
    coef: torch.Tensor | None,
    dtype: torch.dtype,
    cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """cap: a holds a soft-capped student's logits; dz is taken on to the raw ones, times
    1 - (a / cap)^2, through one more tile."""
    da_dz = None if cap is None or coef is None else cap_grad(a, cap)
    m_a = a.amax(dim=1)
    diff = torch.sub(a, c, out=c)  # a - c
    if z_t is not None:
        torch.sub(a, z_t, out=z_t)  # a - z_T
    e = a.sub_(m_a[:, None]).exp_()  # p_s * s_a
    s_a = e.sum(dim=1)
    lse_a = m_a + s_a.log()
    u = diff.mul_(e).sum(dim=1).div_(s_a)  # E_ps[a - c]; the tile c now holds e (a - c)
    kl = (u - lse_a + lse_c).clamp_(min=0.0)
    kl_t = None if z_t is None else (z_t.mul_(e).sum(dim=1).div_(s_a) - lse_a + lse_t).clamp_(min=0.0)
    if coef is None:
        return kl, kl_t, None
    dz = diff.addcmul_(e, -u[:, None]).mul_((coef / s_a)[:, None])  # e (a - c - u) coef / s_a
    if da_dz is not None:
        dz.mul_(da_dz)
    return kl, kl_t, dz.to(tile_dtype(dtype))
