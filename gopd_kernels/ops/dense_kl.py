"""Autograd wrapper for the dense (full-vocabulary) G-OPD KL, both backends.

Saves O(N) statistics (lse of the student, lse of the target, KL); the backward recomputes
the logit tiles of all three models and differentiates the student only: the teacher and
the reference are frozen by definition. A head is (hidden, weight, bias | None).
"""

from __future__ import annotations

import torch

from gopd_kernels.backend import implementation, workspace_bytes

# 1 / tau of the student's, the teacher's and the reference's logits: s_k / tau for a model that
# multiplies its head's output by s_k (logit_scale), else all three 1 / tau
InvTemps = tuple[float, float, float]
# their soft-caps / tau (None: a head whose logits are not capped), the same way
Caps = tuple[float | None, float | None, float | None]
NO_CAPS: Caps = (None, None, None)


def head_tiles(heads, rows: slice, cols: slice, weight=lambda w: w) -> list:
    """Each head (hidden, weight, bias | None), or None, cut to the hidden states' `rows` and the
    vocabulary's `cols` (weight rows and bias entries): a tile's own heads, on either backend
    (`weight` maps each weight slice, e.g. to the torch backend's GEMM operand)."""
    cut = lambda b: None if b is None else b[cols]  # noqa: E731
    return [None if hd is None else (hd[0][rows], weight(hd[1][cols]), cut(hd[2])) for hd in heads]


class DenseGopdKL(torch.autograd.Function):
    """(student, teacher, reference heads) -> (KL(p_s || q) [M], KL(p_s || p_T) [M] | None).

    shard: vocabulary-parallel heads (ops/vocab_parallel.py): the three weights (and biases)
    hold this rank's rows; the slices' partials merge over the ranks, and dH is summed."""

    @staticmethod
    def forward(
        ctx,
        hs,
        ws,
        bs,
        ht,
        wt,
        bt,
        hr,
        wr,
        br,
        lam,
        inv_temps,
        with_teacher_kl,
        backend,
        shard=None,
        caps=NO_CAPS,
    ):
        impl = implementation("dense_kl", backend)
        ws_bytes = workspace_bytes(backend, ws)
        ref = None if hr is None else (hr, wr, br)
        if hs.shape[0] == 0:
            empty = lambda: hs.new_zeros(0, dtype=torch.promote_types(hs.dtype, torch.float32))
            kl, lse_a, lse_c, kl_t = empty(), empty(), empty(), empty() if with_teacher_kl else None
        else:
            merge = {} if shard is None else {"merge": shard.merge_dense}
            kl, lse_a, lse_c, kl_t = impl.forward(
                (hs, ws, bs), (ht, wt, bt), ref, lam, inv_temps, with_teacher_kl, ws_bytes, **merge, caps=caps
            )
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, hr, wr, br, lse_a, lse_c, kl)
        ctx.impl, ctx.lam, ctx.inv_temps, ctx.workspace, ctx.shard = impl, lam, inv_temps, ws_bytes, shard
        ctx.caps = caps
        if kl_t is not None:
            ctx.mark_non_differentiable(kl_t)
        return kl, kl_t

    @staticmethod
    def backward(ctx, grad_kl, _grad_kl_teacher):
        hs, ws, bs, ht, wt, bt, hr, wr, br, lse_a, lse_c, kl = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if hs.shape[0] == 0 or grad_kl is None:
            student = (hs, ws, bs)
            grads = tuple(torch.zeros_like(x) if n else None for x, n in zip(student, needs, strict=True))
        else:
            ref = None if hr is None else (hr, wr, br)
            reduce_dh = ctx.shard is not None and ctx.shard.reduce_hidden_grad and needs[0]
            grads = ctx.impl.backward(
                (hs, ws, bs), (ht, wt, bt), ref, ctx.lam, ctx.inv_temps, lse_a, lse_c, kl,
                grad_kl.contiguous(), needs, ctx.workspace,
                dh_dtype=torch.promote_types(hs.dtype, torch.float32) if reduce_dh else None, caps=ctx.caps,
            )  # fmt: skip
            if reduce_dh:  # summed over the ranks in fp32, then rounded once
                grads = (ctx.shard.reduce_hidden(grads[0]).to(hs.dtype), *grads[1:])
        return *grads, *(None,) * 12
