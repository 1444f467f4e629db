"""The row work of a folded loss in PyTorch (any device): see fold_rows_triton for the math.

Same contract as fold_rows_triton: log_softmax(z, y) -> (s, state), then
logit_grads(z, y, state, c, dtype) -> dz. Here both work in place on the fp32 tile z (after
log_softmax it holds exp(z - max), and state is its row sums), and dz is cast to `dtype`,
the GEMM operand's, at the end.
"""

from __future__ import annotations

import torch


def log_softmax(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z_y = z.gather(1, targets[:, None]).squeeze(1)
    m = z.amax(dim=1)
    sum_e = z.sub_(m[:, None]).exp_().sum(dim=1)  # in place: the tile now holds exp(z - m)
    return z_y - m - sum_e.log(), sum_e


def logit_grads(
    z: torch.Tensor, targets: torch.Tensor, sum_e: torch.Tensor, c: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    dz = z.mul_((-c / sum_e)[:, None]).scatter_add_(1, targets[:, None], c[:, None])  # c (1[v = y] - p)
    return dz.to(dtype)
