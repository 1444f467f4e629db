"""The dense G-OPD loss with its gradient folded into the forward.

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

from gopd_kernels.ops.dense_kl import NO_CAPS
from gopd_kernels.ops.dense_kl_torch import _target_tile, add_ref_logits, scaled_heads
from gopd_kernels.ops.folded_loss_torch import (
    HeadGrad,
    HiddenGrad,
    add_chunk_grads,
    fold_rows,
    row_tiles,
    save_folded_grads,
    scale_saved_grads,
)
from gopd_kernels.ops.linear_logsoftmax_torch import logits_tile
from gopd_kernels.ops.matmul_torch import compute_dtype, operand

# Rows per chunk (2 tiles) by who does the row work. torch, measured at N = 1024, D = 1024,
# V = 151936 fp32 on the 2-core CPU, lam = 1 (s per call): 128 rows 15.3-16.0, 256 rows
# 12.7-14.5, 512 rows 11.8-14.0; 256 rows keep the tiles at 297 MiB. triton: 1024 rows hold
# the same 1.2 GB of fp32 tiles as gopd_loss's fold (FOLD_ROWS); other sizes not yet timed.
DENSE_FOLD_ROWS = {"torch": 256, "triton": 1024}


class FoldedDenseKL(torch.autograd.Function):
    """(student, teacher, reference heads (hidden, weight, bias | None each), lam, inv_temps,
    row weights a [M], with_teacher_kl, workspace bytes) -> (loss = sum_t a_t KL_t,
    KL(p_s || q) [M], KL(p_s || p_T) [M] | None).

    KL and KL to the teacher are returned detached; the loss is differentiable w.r.t. the
    student's hidden states and head (weight and bias) only (teacher and reference are frozen).
    """

    @staticmethod
    def forward(
        ctx, hs, ws, bs, ht, wt, bt, hr, wr, br, lam, inv_temps, row_weights, with_teacher_kl, ws_bytes,
        rows_impl, caps=NO_CAPS,
    ):  # fmt: skip
        """rows_impl: the module doing each chunk's row work (fold_rows_torch or fold_rows_triton).
        caps: the three heads' soft-caps / tau (dense_kl.Caps): each tile capped where it is
        built (a capped reference's through the tile of a, free until a is formed), the
        student's dz taken on to its raw logits by the row work (rows_impl.SCRATCH_TILES more)."""
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        rows, vocab = hs.shape[0], ws.shape[0]
        acc = compute_dtype(hs.dtype)
        like = dict(dtype=acc, device=hs.device)
        ref = None if hr is None else (hr, wr, br)
        student, teacher, ref = scaled_heads(((hs, ws, bs), (ht, wt, bt), ref), inv_temps, acc)
        (hs_, ws_, bs_), (ht_, wt_, bt_) = ((h, operand(w), b) for h, w, b in (student, teacher))
        ref = None if ref is None else (ref[0], operand(ref[1]), ref[2])
        live = 3 if with_teacher_kl else 2
        chunk = fold_rows(ws_bytes, rows, vocab, acc, row_tiles(rows_impl, live, caps[0] is not None))
        dh = HiddenGrad(hs, acc, chunk) if need_dh else None
        dw = HeadGrad(ws, hs_, ws_.dtype, acc, chunk, rows_impl) if need_dw else None
        db = torch.zeros(vocab, **like) if need_db else None
        kl = torch.empty(rows, **like)
        kl_t = torch.empty(rows, **like) if with_teacher_kl else None
        weights = row_weights.to(acc)
        coef = weights * inv_temps[0]  # d/d(raw logits) = d/da / tau
        wants_dz = dh is not None or dw is not None or db is not None

        def fold_chunks() -> None:
            # A function so that the tiles and every view of them die with its frame, before dH
            # and dW are cast below (see FoldedTokenLoss)
            buf = torch.empty(live, chunk * vocab, **like)
            for r0 in range(0, rows, chunk):
                r1 = min(rows, r0 + chunk)
                a, c, zt = (rows_impl.tile(buf[k], r1 - r0, vocab) for k in (0, 1, live - 1))
                # c (and z_T) first, with the tile of a as scratch for their log-sum-exps
                lse_t = None
                ref_rows = None if ref is None else (ref[0][r0:r1], ref[1], ref[2])
                if with_teacher_kl:
                    lse_t = rows_impl.lse(logits_tile(zt, ht_[r0:r1], wt_, inv_temps[1], bt_, cap=caps[1]), a)
                    torch.mul(zt, lam, out=c)
                    if ref_rows is not None:
                        add_ref_logits(c, ref_rows, lam, inv_temps[2], caps[2], a)
                else:
                    _target_tile(c, (ht_[r0:r1], wt_, bt_), ref_rows, lam, inv_temps, caps, a)
                lse_c = rows_impl.lse(c, a)
                logits_tile(a, hs_[r0:r1], ws_, inv_temps[0], bs_, cap=caps[0])
                coef_rows = coef[r0:r1] if wants_dz else None  # None: no dz
                z_t = zt if with_teacher_kl else None
                kl[r0:r1], kl_t_rows, dz = rows_impl.dense_kl(
                    a, c, z_t, lse_c, lse_t, coef_rows, ws_.dtype, caps[0]
                )
                if kl_t is not None:
                    kl_t[r0:r1] = kl_t_rows
                if dz is None:
                    continue
                add_chunk_grads(dz, hs_, ws_, (r0, r1), dh, dw, db)
                del dz  # before the next chunk's is made

        fold_chunks()
        dh = None if dh is None else dh.dh  # its fp32 scratch gone before dW's cast
        save_folded_grads(ctx, (dh, hs), (None if dw is None else dw.result(), ws), (db, bs))
        ctx.mark_non_differentiable(kl, *(() if kl_t is None else (kl_t,)))
        loss = (kl * weights).sum()
        return loss, kl, kl_t

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_kl_t):
        return *scale_saved_grads(ctx, grad_loss), *(None,) * 13
