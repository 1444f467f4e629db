"""Autograd wrapper for the fused linear + log-softmax + gather op (both backends).

Saves only O(N) statistics (lse, entropy) besides the inputs; the backward recomputes the
logit tiles. Upstream gradients are per token: any weighting of the tokens (masks,
advantages, token-mean scaling) flows through exactly, unlike kernels that fold a scalar
loss gradient into the forward.

Frozen head (hidden needs a gradient, weight and bias do not, no entropy): the gradient
of each log-prob w.r.t. its hidden state, x_t = (W_y - E_p[W]) / tau, does not depend on
the upstream gradient, so the forward can compute it ("fold") and the backward is
dh_t = g_t x_t, with no GEMM: 2 GEMMs in all instead of 3. The torch backend does it in
tiles (linear_logsoftmax_torch.frozen_head_forward), the Triton backend over
full-vocabulary row chunks with cuBLAS GEMMs and fused row passes
(folded_frozen_head_torch with fold_rows_triton).
"""

from __future__ import annotations

import torch

from gopd_kernels.backend import implementation, info_once, workspace_bytes
from gopd_kernels.ops import folded_frozen_head_torch
from gopd_kernels.ops.folded_loss_torch import FOLD_ROWS, fold_workspace_bytes
from gopd_kernels.ops.linear_logsoftmax_torch import cap_grad
from gopd_kernels.ops.matmul_torch import cublas_half


def head_requires_grad(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether an LM head (its weight, or its bias when it has one) wants a gradient."""
    return weight.requires_grad or (bias is not None and bias.requires_grad)


def folds_frozen_head(
    fold: bool | None,
    backend: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    with_entropy: bool,
) -> bool:
    """Whether token_logprobs computes dlogp/dh in its forward (the frozen-head fold above).

    Only a frozen head can fold, and only when a gradient is wanted. fold=None folds on the
    torch backend (forward + backward, N = 2048, D = 1024, V = 151936, fp32, Intel VM, 3
    calls each: 3.05-3.22 s against the recomputing backward's 4.64-4.78 s) and on the Triton
    backend for bf16 and fp16 heads where torch has their GEMM with an fp32 result (cuBLAS): 2
    of those GEMMs in place of 3 Triton ones. Measured on an H100 (N = 16384, D = 4096,
    V = 151936, bf16, 2026-11-27): 67.5 ms / 1443 MiB against the recomputing backward's
    116.9 ms / 1336 MiB (torch.compile 74.0 ms / 14244 MiB); fp16 not yet measured (its dz
    is scaled into fp16 at the GEMM, one more pass per chunk). fold=True on a head that is not
    frozen, or with the entropy, is an error; fold=False always recomputes. A vocabulary-parallel
    head folds the same way, each rank over its rows, the ranks' x merged in the forward
    (VocabShard.merge_fold). A soft-capped head folds too (x = (f'_y W_y - E_p[f' W]) / tau).
    """
    if fold is not None and not isinstance(fold, bool):
        raise ValueError(f"fold must be True, False or None, got {fold!r}")
    head_grad = head_requires_grad(weight, bias)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or head_grad):
        return False  # no gradient wanted: nothing to fold
    can_fold = hidden.requires_grad and not head_grad and not with_entropy
    if fold and not can_fold:
        raise ValueError(
            "fold=True needs a frozen head: hidden requires a gradient, weight and bias do not, and "
            "return_entropy=False; a trained head's gradient depends on the upstream gradient, so its "
            "logits are recomputed in the backward"
        )
    if fold is False or not can_fold:
        return False
    if fold or backend == "torch":
        return True
    folds = cublas_half(hidden, weight)
    if folds:
        info_once(
            f"token_logprobs: frozen {weight.dtype} head on the Triton backend: dlogp/dh is computed in "
            "the forward over full-vocabulary row chunks (2 cuBLAS GEMMs instead of 3 Triton ones: 1.7x "
            "faster on an H100, bf16, for 8 % more memory); fold=False recomputes the logits in the backward"
        )
    return folds


def _frozen_head_forward(hidden, weight, bias, targets, inv_temp, backend, cap=None):
    """(logp, lse, x = dlogp/dh) by the backend's frozen-head fold (module doc)."""
    if backend == "torch":
        impl = implementation("linear_logsoftmax", backend)
        ws = workspace_bytes(backend, weight)
        return impl.frozen_head_forward(hidden, weight, bias, targets, inv_temp, ws, cap)
    ws = fold_workspace_bytes(weight, rows=FOLD_ROWS[backend])
    rows_impl = implementation("fold_rows", backend)
    return folded_frozen_head_torch.forward(hidden, weight, bias, targets, inv_temp, ws, rows_impl, cap)


class LinearTokenLogprobs(torch.autograd.Function):
    """(hidden [M, D], weight [V, D], bias [V]|None, targets [M]) -> (logp [M], entropy [M]|None).

    All targets must be valid ids (ignored positions are removed by the caller). fold: the
    frozen-head fold, as decided by folds_frozen_head. shard: for a vocabulary-parallel head
    (ops/vocab_parallel.py), weight and bias are this rank's rows and targets are ids of the
    whole vocabulary; its fold merges the ranks' (VocabShard.merge_fold). cap: a soft-capped
    head's cap / tau (linear_logsoftmax_torch's module doc).
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, temperature, with_entropy, backend, fold, shard=None, cap=None
    ):
        inv_temp = 1.0 / temperature
        ctx.fold = fold and hidden.shape[0] > 0
        ctx.shard = shard
        if shard is not None:
            targets = shard.local_targets(targets)
        if hidden.shape[0] == 0:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            ctx.save_for_backward(hidden, weight, bias)
            return empty, empty.clone() if with_entropy else None
        if fold:  # a shard folds its own rows, on a valid stand-in id where the target is another's
            y = targets if shard is None else targets.clamp(min=0)
            logp, lse, x = _frozen_head_forward(hidden, weight, bias, y, inv_temp, backend, cap)
            if shard is not None:  # the stand-in's W_y' as it enters x: times f'_y' for a capped head
                w_y = weight[y] if cap is None else weight[y] * cap_grad(logp + lse, cap)[:, None]
                logp, x = shard.merge_fold(targets, logp, lse, x, w_y, inv_temp)
            ctx.save_for_backward(x)
            ctx.hidden_dtype = hidden.dtype
            return logp, None
        impl = implementation("linear_logsoftmax", backend)
        ws = workspace_bytes(backend, weight)
        logp, lse, entropy = impl.forward(hidden, weight, bias, targets, inv_temp, with_entropy, ws, cap=cap)
        if shard is not None:
            logp, lse, entropy = shard.merge(targets, logp, lse, entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.impl, ctx.inv_temp, ctx.workspace, ctx.cap = impl, inv_temp, ws, cap
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        needs = tuple(ctx.needs_input_grad[:3])
        none = (None,) * 7
        if ctx.fold:  # dh = g x
            (x,) = ctx.saved_tensors
            return (x * grad_logp.to(x.dtype)[:, None]).to(ctx.hidden_dtype), None, None, *none
        saved = ctx.saved_tensors
        if (grad_logp is None and grad_entropy is None) or saved[0].shape[0] == 0:
            return *(torch.zeros_like(x) if n else None for x, n in zip(saved[:3], needs, strict=True)), *none
        hidden, weight, bias, targets, lse, entropy = saved
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        shard = ctx.shard
        reduce_dh = shard is not None and shard.reduce_hidden_grad and needs[0]
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
            dh_dtype=torch.promote_types(hidden.dtype, torch.float32) if reduce_dh else None,
            cap=ctx.cap,
        )
        if reduce_dh:  # summed over the ranks in fp32, then rounded once
            dh = shard.reduce_hidden(dh).to(hidden.dtype)
        return dh, dw, db, *none
