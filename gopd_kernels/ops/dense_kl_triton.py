"""Dense (full-vocabulary) G-OPD: Triton kernels (math in dense_kl_torch's docstring).

Forward (`dense_kl_partials_kernel`): a program owns BLOCK_M rows and a vocabulary slice
and streams, tile by tile, the student's logits a, the teacher's z_T and (lam != 1) the
reference's z_R side by side, each from its own hidden states and head (D may differ),
keeping online log-sum-exps of a and of c = lam z_T + (1 - lam) z_R, the sum of
exp(a - m)(a - c), and optionally the same for the teacher alone (KL to the teacher).

Backward (`dense_kl_grad_kernel`): recomputes the three tiles and writes
dL/d(raw a) = g p_s (log p_s - log q - KL) / tau into the workspace that
`grads_from_logit_grads` turns into dH and dW of the student with tensor-core GEMMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gopd_kernels.ops.dense_kl import NO_CAPS, head_tiles
from gopd_kernels.ops.linear_logsoftmax_triton import (
    GROUP_M,
    INTERPRET_CONFIG,
    cap_grad,
    capped,
    grads_from_logit_grads,
    lm_head_args,
    logits_tile,
    scaled_for_fp16_dz,
    vocab_slices,
)
from gopd_kernels.ops.matmul_torch import fp16_dz_scale
from gopd_kernels.ops.triton_common import (
    DOT_PRECISION,
    autotuned,
    config,
    grouped_tile,
    launch,
    make_pruner,
    token_bucket,
)
from gopd_kernels.ops.vocab_partials import merge_dense_kl_partials

# Three logit tiles live at once (student, teacher, reference): narrower tiles than the
# single-model kernels, chosen with the AOT report's spill counts.
DENSE_CONFIGS = [
    config(8, 3, BLOCK_M=128, BLOCK_V=64, BLOCK_D=64),
    config(8, 3, BLOCK_M=128, BLOCK_V=32, BLOCK_D=64),
    config(8, 4, BLOCK_M=64, BLOCK_V=32, BLOCK_D=64),  # ExOPD's without spills on sm_120; fp32 on sm_100
    config(8, 4, BLOCK_M=64, BLOCK_V=128, BLOCK_D=32),
    config(8, 4, BLOCK_M=128, BLOCK_V=64, BLOCK_D=32),
    config(4, 4, BLOCK_M=64, BLOCK_V=64, BLOCK_D=32),
    config(8, 3, BLOCK_M=128, BLOCK_V=64, BLOCK_D=16),  # fp32 (3xTF32 holds operands twice)
]


@triton.jit
def target_tile(
    ht_ptr, wt_ptr, bt_ptr, hr_ptr, wr_ptr, br_ptr, rows, cols, M, V, DT, DR,
    s_htm, s_htd, s_wtv, s_wtd, s_hrm, s_hrd, s_wrv, s_wrd, inv_temp_t, inv_temp_r, cap_t, cap_r, lam,
    HAS_REF: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_BIAS_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP_T: tl.constexpr, SOFTCAP_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(z_T tile, c tile) with c = lam z_T + (1 - lam) z_R (c = z_T without a reference); -inf past V.
    Each model's tile at its own 1 / tau, and soft-capped at its own cap / tau where SOFTCAP_*."""
    zt = logits_tile(
        ht_ptr, wt_ptr, bt_ptr, rows, cols, M, V, DT, s_htm, s_htd, s_wtv, s_wtd,
        inv_temp_t, HAS_BIAS_T, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
    )  # fmt: skip
    zt = capped(zt, cols, V, cap_t, SOFTCAP_T)
    c = zt
    if HAS_REF:
        zr = logits_tile(
            hr_ptr, wr_ptr, br_ptr, rows, cols, M, V, DR, s_hrm, s_hrd, s_wrv, s_wrd,
            inv_temp_r, HAS_BIAS_R, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        zr = capped(zr, cols, V, cap_r, SOFTCAP_R)
        # Both are -inf past V: combine real columns only (lam > 1 would give -inf + inf there).
        col_ok = cols[None, :] < V
        mixed = lam * tl.where(col_ok, zt, 0.0) + (1.0 - lam) * tl.where(col_ok, zr, 0.0)
        c = tl.where(col_ok, mixed, float("-inf"))
    return zt, c


@triton.jit
def lse_update(z, m, s):
    m_new = tl.maximum(m, tl.max(z, axis=1))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    return m_new, s


@triton.jit
def dense_kl_partials_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hr_ptr, wr_ptr, br_ptr,
    ma_ptr, sa_ptr, u_ptr, mc_ptr, sc_ptr, mt_ptr, st_ptr, ut_ptr,
    M, V, DS, DT, DR,
    s_hsm, s_hsd, s_wsv, s_wsd, s_htm, s_htd, s_wtv, s_wtd, s_hrm, s_hrd, s_wrv, s_wrd,
    inv_temp, inv_temp_t, inv_temp_r, cap_s, cap_t, cap_r, lam, slice_len, M_BUCKET,
    HAS_REF: tl.constexpr, TEACHER_KL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_BIAS_R: tl.constexpr,
    SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr, SOFTCAP_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    vocab_slice = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ma = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    mc = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    mt = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    sa = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    st = tl.zeros((BLOCK_M,), dtype=tl.float32)
    u = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ut = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_start = vocab_slice * slice_len
    v_end = tl.minimum(v_start + slice_len, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols[None, :] < V
        a = logits_tile(
            hs_ptr, ws_ptr, bs_ptr, rows, cols, M, V, DS, s_hsm, s_hsd, s_wsv, s_wsd,
            inv_temp, HAS_BIAS_S, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        a = capped(a, cols, V, cap_s, SOFTCAP_S)
        zt, c = target_tile(
            ht_ptr, wt_ptr, bt_ptr, hr_ptr, wr_ptr, br_ptr, rows, cols, M, V, DT, DR,
            s_htm, s_htd, s_wtv, s_wtd, s_hrm, s_hrd, s_wrv, s_wrd, inv_temp_t, inv_temp_r, cap_t, cap_r, lam,
            HAS_REF, HAS_BIAS_T, HAS_BIAS_R, DOT_PRECISION, SOFTCAP_T, SOFTCAP_R, BLOCK_M, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        ma_new = tl.maximum(ma, tl.max(a, axis=1))
        alpha = tl.exp(ma - ma_new)
        e = tl.exp(a - ma_new[:, None])  # 0 past V
        u = alpha * u + tl.sum(e * tl.where(col_ok, a - c, 0.0), axis=1)
        if TEACHER_KL:
            ut = alpha * ut + tl.sum(e * tl.where(col_ok, a - zt, 0.0), axis=1)
            mt, st = lse_update(zt, mt, st)
        sa = alpha * sa + tl.sum(e, axis=1)
        ma = ma_new
        mc, sc = lse_update(c, mc, sc)
    out = vocab_slice * M + rows
    tl.store(ma_ptr + out, ma, mask=row_ok)
    tl.store(sa_ptr + out, sa, mask=row_ok)
    tl.store(u_ptr + out, u, mask=row_ok)
    tl.store(mc_ptr + out, mc, mask=row_ok)
    tl.store(sc_ptr + out, sc, mask=row_ok)
    if TEACHER_KL:
        tl.store(mt_ptr + out, mt, mask=row_ok)
        tl.store(st_ptr + out, st, mask=row_ok)
        tl.store(ut_ptr + out, ut, mask=row_ok)


@triton.jit
def dense_kl_grad_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, hr_ptr, wr_ptr, br_ptr,
    lse_a_ptr, lse_c_ptr, kl_ptr, g_ptr, dz_ptr,
    M, V, DS, DT, DR,
    s_hsm, s_hsd, s_wsv, s_wsd, s_htm, s_htd, s_wtv, s_wtd, s_hrm, s_hrd, s_wrv, s_wrd, stride_dzm,
    inv_temp, inv_temp_t, inv_temp_r, cap_s, cap_t, cap_r, lam, M_BUCKET,
    HAS_REF: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS_S: tl.constexpr, HAS_BIAS_T: tl.constexpr, HAS_BIAS_R: tl.constexpr,
    SOFTCAP_S: tl.constexpr, SOFTCAP_T: tl.constexpr, SOFTCAP_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dZ = g p_s (log p_s - log q - KL), g already divided by the student's tau (inv_temp; the
    teacher's and reference's logits at their own, inv_temp_t and inv_temp_r), times
    1 - (a / cap_s)^2 for a soft-capped student."""
    pid_m, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(V, BLOCK_V), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < M
    col_ok = cols[None, :] < V
    a = logits_tile(
        hs_ptr, ws_ptr, bs_ptr, rows, cols, M, V, DS, s_hsm, s_hsd, s_wsv, s_wsd,
        inv_temp, HAS_BIAS_S, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
    )  # fmt: skip
    a = capped(a, cols, V, cap_s, SOFTCAP_S)
    _, c = target_tile(
        ht_ptr, wt_ptr, bt_ptr, hr_ptr, wr_ptr, br_ptr, rows, cols, M, V, DT, DR,
        s_htm, s_htd, s_wtv, s_wtd, s_hrm, s_hrd, s_wrv, s_wrd, inv_temp_t, inv_temp_r, cap_t, cap_r, lam,
        HAS_REF, HAS_BIAS_T, HAS_BIAS_R, DOT_PRECISION, SOFTCAP_T, SOFTCAP_R, BLOCK_M, BLOCK_V, BLOCK_D,
    )  # fmt: skip
    lse_a = tl.load(lse_a_ptr + rows, mask=row_ok, other=0.0)
    lse_c = tl.load(lse_c_ptr + rows, mask=row_ok, other=0.0)
    kl = tl.load(kl_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    log_p = a - lse_a[:, None]
    log_q = c - lse_c[:, None]
    dz = g[:, None] * tl.exp(log_p) * tl.where(col_ok, log_p - log_q - kl[:, None], 0.0)
    if SOFTCAP_S:
        dz = dz * cap_grad(a, cols, V, cap_s)
    dz_ptrs = dz_ptr + rows[:, None].to(tl.int64) * stride_dzm + cols[None, :]
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok)


_prune = make_pruner("BLOCK_M", "BLOCK_V", "BLOCK_D", "hs_ptr")
dense_kl_partials_kernel_tuned = autotuned(
    dense_kl_partials_kernel, DENSE_CONFIGS, ["M_BUCKET", "V", "DS", "DT", "DR", "slice_len"], _prune
)
dense_kl_grad_kernel_tuned = autotuned(  # keyed on the slice width, as logits_grad_kernel_tuned
    dense_kl_grad_kernel, DENSE_CONFIGS, ["M_BUCKET", "stride_dzm", "DS", "DT", "DR"], _prune
)


def _head_args(heads):
    """Pointers (a head's hidden states stand in for a missing bias), dims and strides of the
    three heads, and their HAS_BIAS_* flags; the teacher stands in for a missing ref."""
    student, teacher, ref = heads
    flags = {
        f"HAS_BIAS_{k}": hd is not None and hd[2] is not None for k, hd in zip("STR", heads, strict=True)
    }
    ref = ref if ref is not None else teacher
    ptrs = [t for h, w, b in (student, teacher, ref) for t in (h, w, h if b is None else b)]
    dims, strides = [], []
    for h, w, _ in (student, teacher, ref):
        d, *st = lm_head_args(h, w)
        dims.append(d)
        strides += st
    return ptrs, dims, strides, flags


def _cap_args(caps) -> tuple[list[float], dict]:
    """The three caps as kernel scalars (1.0 standing in for None) and their SOFTCAP_* flags."""
    return [c or 1.0 for c in caps], {f"SOFTCAP_{k}": c is not None for k, c in zip("STR", caps, strict=True)}


def forward(
    student, teacher, ref, lam, inv_temps, with_teacher_kl, workspace_bytes, merge=merge_dense_kl_partials,
    caps=NO_CAPS,
):  # fmt: skip
    """Same contract as dense_kl_torch.forward."""
    M, V = student[0].shape[0], student[1].shape[0]
    n_slices, slice_len = vocab_slices(M, V, student[0].device)
    new = lambda: torch.empty(n_slices, M, dtype=torch.float32, device=student[0].device)
    ma, sa, u, mc, sc = new(), new(), new(), new(), new()
    mt, st, ut = (new(), new(), new()) if with_teacher_kl else (ma, sa, u)  # placeholders when unused
    ptrs, dims, strides, bias_flags = _head_args((student, teacher, ref))
    cap_values, cap_flags = _cap_args(caps)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n_slices)
    launch(
        dense_kl_partials_kernel,
        dense_kl_partials_kernel_tuned,
        grid,
        INTERPRET_CONFIG,
        *ptrs, ma, sa, u, mc, sc, mt, st, ut, M, V, *dims, *strides,
        *inv_temps, *cap_values, float(lam), slice_len, token_bucket(M),
        HAS_REF=ref is not None and lam != 1.0,
        TEACHER_KL=with_teacher_kl,
        DOT_PRECISION=DOT_PRECISION[student[0].dtype],
        **bias_flags,
        **cap_flags,
    )  # fmt: skip
    return merge((ma, sa, u), (mc, sc), (mt, st, ut) if with_teacher_kl else None)


def backward(
    student, teacher, ref, lam, inv_temps, lse_a, lse_c, kl, grad_kl, needs, workspace_bytes, dh_dtype=None,
    caps=NO_CAPS,
):  # fmt: skip
    """Same contract as dense_kl_torch.backward."""
    hs, ws, _ = student
    cap_values, cap_flags = _cap_args(caps)
    g = grad_kl.float() * inv_temps[0]

    def scale():
        # dZ_v = g p_v (log p_v - log q_v - KL) with t_v = p_v log(p_v / q_v) >= p_v - q_v >= -q_v
        # and sum_v t_v = KL, so -1 <= t_v <= KL + 1: |dZ_v| <= |g| (2 KL + 1), for any q
        bound = (g.abs() * (2.0 * kl.float().clamp_min(0.0) + 1.0)).amax() if g.numel() else g.new_zeros(())
        return fp16_dz_scale(bound)

    (g,), unscale = scaled_for_fp16_dz(hs.dtype, scale, g)

    def write_logit_grads(rows, cols, dz):  # the three heads' columns `cols`: a vocabulary of their own
        ptrs, dims, strides, bias_flags = _head_args(head_tiles((student, teacher, ref), rows, cols))
        M, V = dz.shape
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(V, meta["BLOCK_V"]),)
        launch(
            dense_kl_grad_kernel,
            dense_kl_grad_kernel_tuned,
            grid,
            INTERPRET_CONFIG,
            *ptrs, lse_a[rows], lse_c[rows], kl[rows], g[rows], dz,
            M, V, *dims, *strides, dz.stride(0), *inv_temps, *cap_values, float(lam), token_bucket(M),
            HAS_REF=ref is not None and lam != 1.0,
            DOT_PRECISION=DOT_PRECISION[hs.dtype],
            GROUP_M=GROUP_M,
            **bias_flags,
            **cap_flags,
        )  # fmt: skip
        return dz

    dh, dw, db = grads_from_logit_grads(
        hs, ws, needs, workspace_bytes, write_logit_grads, unscale=unscale, dh_dtype=dh_dtype
    )
    return dh, dw, None if db is None else db.to(student[2].dtype)
