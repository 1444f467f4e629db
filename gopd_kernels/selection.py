"""The positions of a [..., *] batch that take part in an op: the others never reach a kernel.

Padding and prompt tokens are often half of an RL batch; dropping them before the kernels
saves that compute, and scattering zeros back keeps shapes (and autograd) intact.
"""

from __future__ import annotations

import torch


class RowSelection:
    """Valid positions of a batch with leading shape `valid.shape` (one device sync)."""

    def __init__(self, valid: torch.Tensor):
        self.shape = valid.shape
        flat = valid.reshape(-1)
        self.total = flat.numel()
        self.keep = None if bool(flat.all()) else flat.nonzero().squeeze(1)

    @property
    def count(self) -> int:
        return self.total if self.keep is None else self.keep.numel()

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """[*shape, ...] -> [count, ...] (rows of the valid positions)."""
        x = x.reshape(self.total, *x.shape[len(self.shape) :])
        return x if self.keep is None else x.index_select(0, self.keep)

    def put(self, x: torch.Tensor) -> torch.Tensor:
        """[count] -> [*shape], zeros at the skipped positions (differentiable)."""
        if self.keep is not None:
            x = x.new_zeros(self.total).index_copy(0, self.keep, x)
        return x.reshape(self.shape)
