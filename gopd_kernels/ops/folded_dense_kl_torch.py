"""The dense G-OPD loss with its gradient folded into the forward (torch backend).

For L = sum_t a_t KL_t (a_t the aggregation weights of token_loss_weights), with the
symbols of dense_kl_torch (a = z_s / tau, c = (lam z_T + (1 - lam) z_R) / tau):

    dL/da_tv = a_t p_s,tv ((a_tv - c_tv) - E_ps[a - c]_t)

since KL_t = E_ps[a - c]_t - lse(a)_t + lse(c)_t. Every term is known once row t's two
log-sum-exps are, so a chunk of rows holding its full-vocabulary tiles of a and c takes
one pass: the logits GEMMs, the row statistics, dL/da in place, dH = dz W_s and
dW += dz^T H_s. At lam = 1 that is 4 GEMMs of 2NDV FLOP (a, c, dH, dW), as materialising
autograd does, where the streaming forward plus the recomputing backward of DenseGopdKL
need 6 (5 against 8 when lam != 1: c then takes a reference GEMM too).

Costs, as for FoldedTokenLoss: dH and dW are held from the forward to the backward, and
dW is read and written once per row chunk, so chunks need hundreds of rows: the workspace
holds 2 full-vocabulary tiles of DENSE_FOLD_ROWS rows, or 3 tiles of 2/3 as many when the
KL to the teacher is reported too (lam != 1 and teacher_kl), so that memory does not grow with lam.
"""

from __future__ import annotations

import torch

from gopd_kernels.ops.dense_kl_torch import _lse_partials, _target_tile
from gopd_kernels.ops.folded_loss_torch import fold_rows, save_folded_grads, scale_saved_grads
from gopd_kernels.ops.linear_logsoftmax_torch import _logits_tile
from gopd_kernels.ops.matmul_torch import compute_dtype, like_operand, mm_add, mm_into, operand

# Measured at N = 1024, D = 1024, V = 151936 fp32 on the 2-core CPU, lam = 1 (s per call):
# 128 rows 15.3-16.0, 256 rows 12.7-14.5, 512 rows 11.8-14.0; 256 rows keep the tiles at 297 MiB.
DENSE_FOLD_ROWS = 256


def _lse(z: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    m, s = _lse_partials(z, scratch)
    return m + s.log()


class FoldedDenseKL(torch.autograd.Function):
    """(student, teacher, reference heads, lam, inv_temp, row weights a [M], with_teacher_kl,
    workspace bytes) -> (loss = sum_t a_t KL_t, KL(p_s || q) [M], KL(p_s || p_T) [M] | None).

    KL and KL to the teacher are returned detached; the loss is differentiable w.r.t. the
    student's hidden states and head only (teacher and reference are frozen).
    """

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, hr, wr, lam, inv_temp, row_weights, with_teacher_kl, ws_bytes):
        need_dh, need_dw = ctx.needs_input_grad[:2]
        rows, vocab = hs.shape[0], ws.shape[0]
        acc = compute_dtype(hs.dtype)
        like = dict(dtype=acc, device=hs.device)
        up = lambda t: None if t is None else operand(t)
        hs_, ws_, ht_, wt_, hr_, wr_ = (up(t) for t in (hs, ws, ht, wt, hr, wr))
        live = 3 if with_teacher_kl else 2
        chunk = fold_rows(ws_bytes, rows, vocab, acc, live)
        buf = torch.empty(live, chunk * vocab, **like)
        dh = torch.zeros(hs.shape, **like) if need_dh else None
        dw = torch.zeros(ws.shape, **like) if need_dw else None
        kl = torch.empty(rows, **like)
        kl_t = torch.empty(rows, **like) if with_teacher_kl else None
        weights = row_weights.to(acc)
        coef = weights * inv_temp  # d/d(raw logits) = d/da / tau
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            a, c, zt = (buf[k, : (r1 - r0) * vocab].view(r1 - r0, vocab) for k in (0, 1, live - 1))
            # c (and z_T) first, with the tile of a as scratch for their log-sum-exps
            if with_teacher_kl:
                lse_t = _lse(_logits_tile(zt, ht_[r0:r1], wt_, inv_temp, None), a)
                torch.mul(zt, lam, out=c)
                if hr_ is not None:
                    mm_add(c, hr_[r0:r1], wr_.T, alpha=(1.0 - lam) * inv_temp)
            else:
                _target_tile(c, (ht_[r0:r1], wt_), None if hr_ is None else (hr_[r0:r1], wr_), lam, inv_temp)
            lse_c = _lse(c, a)
            _logits_tile(a, hs_[r0:r1], ws_, inv_temp, None)
            m_a = a.amax(dim=1)
            diff = torch.sub(a, c, out=c)  # a - c
            if kl_t is not None:
                torch.sub(a, zt, out=zt)  # a - z_T
            e = a.sub_(m_a[:, None]).exp_()  # p_s * s_a
            s_a = e.sum(dim=1)
            lse_a = m_a + s_a.log()
            u = diff.mul_(e).sum(dim=1).div_(s_a)  # E_ps[a - c]; the tile c now holds e (a - c)
            kl[r0:r1] = (u - lse_a + lse_c).clamp_(min=0.0)
            if kl_t is not None:
                kl_t[r0:r1] = (zt.mul_(e).sum(dim=1).div_(s_a) - lse_a + lse_t).clamp_(min=0.0)
            if dh is None and dw is None:
                continue
            dz = diff.addcmul_(e, -u[:, None]).mul_((coef[r0:r1] / s_a)[:, None])  # e (a - c - u) coef / s_a
            dz = like_operand(dz, ws_)
            if dh is not None:
                mm_into(dh[r0:r1], dz, ws_)
            if dw is not None:
                mm_add(dw, dz.T, hs_[r0:r1])
        save_folded_grads(ctx, dh, dw, hs, ws)
        ctx.mark_non_differentiable(kl, *(() if kl_t is None else (kl_t,)))
        loss = (kl * weights).sum()
        return loss, kl, kl_t

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_kl_t):
        return *scale_saved_grads(ctx, grad_loss), None, None, None, None, None, None, None, None, None
