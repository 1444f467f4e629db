"""The row work of the folded losses in PyTorch (any device): see fold_rows_triton for the math.

Same contract as fold_rows_triton: log_softmax(z, y) -> (s, state), then
logit_grads(z, y, state, c, dtype) -> dz; lse(z, scratch) and dense_kl(...) for the dense
fold. Both consume z in logit_grads. Here they work in place on the fp32 tiles (after
log_softmax, z holds exp(z - max) and state is its row sums; lse leaves exp(z - max) in
scratch; dense_kl overwrites all its tiles), and dz is cast to `dtype`, the GEMM
operand's (matmul_torch.tile_dtype: fp32 for fp16, scaled into fp16 at the GEMM), at the end.
"""

from __future__ import annotations

import torch

from gopd_kernels.ops.dense_kl_torch import _lse_partials
from gopd_kernels.ops.linear_logsoftmax_torch import cap_grad
from gopd_kernels.ops.matmul_torch import tile_dtype

CAP_TILES = 1  # logit_grads over soft-capped logits: one more tile, for da/dz


def log_softmax(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """(s, state): state = (sum exp(z - m), m, z_y) per row; z then holds exp(z - m)."""
    z_y = z.gather(1, targets[:, None]).squeeze(1)
    m = z.amax(dim=1)
    sum_e = z.sub_(m[:, None]).exp_().sum(dim=1)  # in place: the tile now holds exp(z - m)
    return z_y - m - sum_e.log(), (sum_e, m, z_y)


def logit_grads(
    z: torch.Tensor,
    targets: torch.Tensor,
    state: tuple,
    c: torch.Tensor,
    dtype: torch.dtype,
    cap: float | None = None,
) -> torch.Tensor:
    """c (1[v = y] - p) from z = exp(z - m) (log_softmax's); for soft-capped logits (cap) times
    1 - (z / cap)^2, each z read back as m + log exp(z - m) through one more tile (0 where the
    exponential underflowed, whose p is 0 too; the target's from z_y itself)."""
    sum_e, m, z_y = state
    if cap is None:
        dz = z.mul_((-c / sum_e)[:, None]).scatter_add_(1, targets[:, None], c[:, None])  # c (1[v = y] - p)
        return dz.to(tile_dtype(dtype))
    logits = torch.log(z).add_(m[:, None])
    da_dz = cap_grad(logits, cap, out=logits).clamp_(min=0.0)
    dz = z.mul_((-c / sum_e)[:, None]).mul_(da_dz)
    del logits, da_dz
    target_grad = c * cap_grad(z_y, cap)
    return dz.scatter_add_(1, targets[:, None], target_grad[:, None]).to(tile_dtype(dtype))


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
