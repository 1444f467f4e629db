"""Autograd wrapper for the fused linear + log-softmax + gather op (both backends).

Saves only O(N) statistics (lse, entropy) besides the inputs; the backward recomputes the
logit tiles. Upstream gradients are per token: any weighting of the tokens (masks,
advantages, token-mean scaling) flows through exactly, unlike kernels that fold a scalar
loss gradient into the forward.

Frozen head on the torch backend (hidden needs a gradient, weight and bias do not, no
entropy): the forward also keeps E_p[W] [N, D], and the backward is a gather with no GEMM
(linear_logsoftmax_torch.hidden_grad_frozen_head). The Triton backend recomputes as usual.
"""

from __future__ import annotations

import torch

from gopd_kernels.backend import implementation, workspace_bytes


def frozen_head_fast_path(backend: str, needs: tuple[bool, bool, bool], with_entropy: bool) -> bool:
    """Whether the forward keeps E_p[W] so that the backward needs no GEMM (see module doc)."""
    return backend == "torch" and needs == (True, False, False) and not with_entropy


class LinearTokenLogprobs(torch.autograd.Function):
    """(hidden [M, D], weight [V, D], bias [V]|None, targets [M]) -> (logp [M], entropy [M]|None).

    All targets must be valid ids (ignored positions are removed by the caller).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, backend):
        impl = implementation("linear_logsoftmax", backend)
        inv_temp = 1.0 / temperature
        ws = workspace_bytes(backend, weight)
        frozen = frozen_head_fast_path(backend, tuple(ctx.needs_input_grad[:3]), with_entropy)
        expected_w = hidden.new_empty(hidden.shape, dtype=torch.float32) if frozen else None
        if hidden.shape[0] == 0:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            lse, logp, entropy = empty, empty, empty.clone() if with_entropy else None
        else:
            args = (hidden, weight, bias, targets, inv_temp, with_entropy, ws)
            extra = (expected_w,) if frozen else ()  # only the torch forward takes it
            logp, lse, entropy = impl.forward(*args, *extra)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy, expected_w)
        ctx.impl, ctx.inv_temp, ctx.workspace = impl, inv_temp, ws
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy, expected_w = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if hidden.shape[0] == 0 or (grad_logp is None and grad_entropy is None):
            inputs = (hidden, weight, bias)
            dh, dw, db = (torch.zeros_like(x) if n else None for x, n in zip(inputs, needs, strict=True))
            return dh, dw, db, None, None, None, None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        if expected_w is not None:
            dh = ctx.impl.hidden_grad_frozen_head(
                weight, targets, ctx.inv_temp, expected_w, grad_logp, hidden.dtype
            )
            return dh, None, None, None, None, None, None
        dh, dw, db = ctx.impl.backward(
            hidden,
            weight,
            bias,
            targets,
            ctx.inv_temp,
            lse,
            entropy,
            grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(),
            needs,
            ctx.workspace,
        )
        return dh, dw, db, None, None, None, None
