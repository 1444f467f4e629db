"""The row work of the folded losses on the GPU: memory-bound passes over a chunk's logits.

A folded loss (folded_loss_torch) forms each row chunk's fp32 logits z [rows, V] with one
GEMM, then needs, per row t with target y_t,

    s_t   = z_ty - lse_t,      lse_t = log sum_v exp(z_tv)            (row_log_softmax)
    H_t   = lse_t - sum_v p_tv z_tv   (entropy, when asked; the same read)
    dz_tv = c_t (1[v = y_t] - exp(z_tv - lse_t))                      (row_logit_grads)

with c_t = dL/ds_t from the loss. In PyTorch that is some ten passes over the fp32 tile
(max, shift, exp, sum, scale, scatter, cast); here it is one read for the log-sum-exp
(an online maximum per lane) and one read plus a bf16 write for dz, which the two
gradient GEMMs then take as their operand. One program per row; no tensor cores.

dz is written over z (over a in the dense fold), which the fold no longer needs: row t's
dz takes the first bytes of row t's fp32 logits (a row stride of 2V bf16 elements), so no
second [rows, V] buffer is allocated (0.6 GB at 2048 rows of V = 151936). Going left to
right, the block of dz stored at step k covers fp32 columns below (k + 1) BLOCK_V / 2, all
read by step k; a barrier between each step's read and its store keeps a warp from
overwriting columns that another warp of the program has not read yet.

The dense fold (folded_dense_kl_torch; the symbols of dense_kl_torch: a = z_s / tau,
c = (lam z_T + (1 - lam) z_R) / tau) needs lse(c) (and lse(z_T) for the KL to the
teacher), then per row, from one read of a and c (row_dense_kl),

    u_t = E_ps[a - c]_t,   KL_t = u_t - lse(a)_t + lse(c)_t,

and from another (row_dense_grads) dz_tv = coef_t p_s,tv (a_tv - c_tv - u_t).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gopd_kernels.backend import interpreter_enabled
from gopd_kernels.ops.matmul_torch import tile_dtype
from gopd_kernels.ops.matmul_triton import matmul
from gopd_kernels.ops.triton_common import LAUNCH_OPTIONS, soft_cap_slope

# logit_grads and dense_kl over soft-capped logits (da/dz), and the entropy: in the same passes, no
# more memory
SCRATCH_TILES = 0
# One config, not tuned: columns per step (8 KB of fp32 per row and step) over 8 warps.
CONFIGS = [triton.Config({"BLOCK_V": 2048}, num_warps=8)]


@triton.jit
def _row_stats(z_row, V, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """(lse, H) of one fp32 row: log sum_v exp(z_v) by an online maximum per lane, then across
    lanes; with WITH_ENTROPY its softmax's entropy H = log S - E_p[z - m] the same way, from
    t = sum e (z - m) per lane, rescaled as m moves (vocab_partials' form; else H = 0)."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane running maximum
    acc = tl.zeros([BLOCK_V], tl.float32)  # per-lane sum of exp(z - m)
    t = tl.zeros([BLOCK_V], tl.float32)  # per-lane sum of exp(z - m) (z - m)
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(z_row + v0 + cols, mask=v0 + cols < V, other=float("-inf"))
        m_new = tl.maximum(m, z)
        seen = m_new > float("-inf")  # a lane past V so far: nothing to rescale (avoids inf - inf)
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        if WITH_ENTROPY:  # e (z - m) is 0 where e is (past V: 0 * inf)
            shift = tl.where(acc > 0, m - m_new, 0.0) * acc
            t = tl.where(seen, alpha * (t + shift) + tl.where(e > 0, e * (z - m_new), 0.0), 0.0)
        acc = tl.where(seen, acc * alpha + e, 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    a = tl.exp(m - m_row)  # 0 for lanes never past V
    sum_e = tl.sum(acc * a, axis=0)
    lse = m_row + tl.log(sum_e)
    entropy = 0.0
    if WITH_ENTROPY:
        centred = tl.sum(a * (t + tl.where(acc > 0, m - m_row, 0.0) * acc), axis=0) / sum_e
        entropy = tl.maximum(tl.log(sum_e) - centred, 0.0)
    return lse, entropy


@triton.jit
def row_log_softmax_kernel(
    z_ptr, y_ptr, s_ptr, lse_ptr, h_ptr, V, stride_zm, HAS_TARGET: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_zm
    lse, entropy = _row_stats(z_row, V, WITH_ENTROPY, BLOCK_V)
    tl.store(lse_ptr + row, lse)
    if HAS_TARGET:
        tl.store(s_ptr + row, tl.load(z_row + tl.load(y_ptr + row)) - lse)
    if WITH_ENTROPY:
        tl.store(h_ptr + row, entropy)


@triton.jit
def row_logit_grads_kernel(
    z_ptr, y_ptr, lse_ptr, c_ptr, dz_ptr, V, stride_zm, stride_dzm, cap, SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """dz = c (1[v = y] - exp(z - lse)), over z's own row (dz_ptr: z_ptr; module doc); for
    soft-capped logits z = cap tanh(raw / cap) (SOFTCAP), times dz/draw = 1 - (z / cap)^2."""
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_zm
    dz_row = dz_ptr + row.to(tl.int64) * stride_dzm
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    c = tl.load(c_ptr + row)
    y = tl.load(y_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + cols
        z = tl.load(z_row + v, mask=v < V, other=float("-inf"))
        dz = tl.where(v == y, c, 0.0) - c * tl.exp(z - lse)
        if SOFTCAP:
            dz = dz * soft_cap_slope(z, cap)
        tl.debug_barrier()  # every warp has read this block before any overwrites it
        tl.store(dz_row + v, dz.to(dz_ptr.dtype.element_ty), mask=v < V)


@triton.jit
def row_dense_kl_kernel(
    a_ptr,
    c_ptr,
    t_ptr,
    lse_c_ptr,
    lse_t_ptr,
    kl_ptr,
    kl_t_ptr,
    lse_a_ptr,
    u_ptr,
    V,
    stride_zm,
    WITH_TEACHER: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One read of a row's a, c (and z_T): lse(a), u = E_ps[a - c], KL = u - lse(a) + lse(c)
    (and the same against z_T), as sums of exp(a - m) weights rescaled as the maximum m moves."""
    row = tl.program_id(0)
    off = row.to(tl.int64) * stride_zm
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)  # sum exp(a - m)
    u = tl.zeros([BLOCK_V], tl.float32)  # sum exp(a - m) (a - c)
    u_t = tl.zeros([BLOCK_V], tl.float32)  # sum exp(a - m) (a - z_T)
    for v0 in range(0, V, BLOCK_V):
        ok = v0 + cols < V
        a = tl.load(a_ptr + off + v0 + cols, mask=ok, other=float("-inf"))
        c = tl.load(c_ptr + off + v0 + cols, mask=ok, other=0.0)
        m_new = tl.maximum(m, a)
        scale = tl.where(m_new > float("-inf"), tl.exp(m - m_new), 0.0)  # lanes past V: nothing yet
        e = tl.where(ok, tl.exp(a - m_new), 0.0)
        s = s * scale + e
        u = u * scale + tl.where(ok, e * (a - c), 0.0)
        if WITH_TEACHER:
            t = tl.load(t_ptr + off + v0 + cols, mask=ok, other=0.0)
            u_t = u_t * scale + tl.where(ok, e * (a - t), 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    w = tl.exp(m - m_row)  # each lane's sums to the row's maximum
    s_row = tl.sum(s * w, axis=0)
    lse_a = m_row + tl.log(s_row)
    u_row = tl.sum(u * w, axis=0) / s_row
    tl.store(lse_a_ptr + row, lse_a)
    tl.store(u_ptr + row, u_row)
    tl.store(kl_ptr + row, tl.maximum(u_row - lse_a + tl.load(lse_c_ptr + row), 0.0))
    if WITH_TEACHER:
        u_t_row = tl.sum(u_t * w, axis=0) / s_row
        tl.store(kl_t_ptr + row, tl.maximum(u_t_row - lse_a + tl.load(lse_t_ptr + row), 0.0))


@triton.jit
def row_dense_grads_kernel(
    a_ptr, c_ptr, lse_a_ptr, u_ptr, coef_ptr, dz_ptr, V, stride_zm, stride_dzm, cap, SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """dz = coef p_s (a - c - u), p_s = exp(a - lse(a)): the dense loss's gradient on a,
    written over a's own row as row_logit_grads_kernel's over z; times 1 - (a / cap)^2 for a
    soft-capped student (SOFTCAP)."""
    row = tl.program_id(0)
    off = row.to(tl.int64) * stride_zm
    dz_row = dz_ptr + row.to(tl.int64) * stride_dzm
    cols = tl.arange(0, BLOCK_V)
    lse_a = tl.load(lse_a_ptr + row)
    u = tl.load(u_ptr + row)
    coef = tl.load(coef_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        ok = v0 + cols < V
        a = tl.load(a_ptr + off + v0 + cols, mask=ok, other=0.0)
        c = tl.load(c_ptr + off + v0 + cols, mask=ok, other=0.0)
        dz = coef * tl.exp(a - lse_a) * (a - c - u)
        if SOFTCAP:
            dz = dz * soft_cap_slope(a, cap)
        tl.debug_barrier()  # every warp has read this block of a before any overwrites it
        tl.store(dz_row + v0 + cols, dz.to(dz_ptr.dtype.element_ty), mask=ok)


def _launch_config(vocab: int) -> dict:
    cfg = CONFIGS[0]
    block = cfg.kwargs["BLOCK_V"]
    if interpreter_enabled():  # numpy per step: a narrow block for small test vocabularies
        block = min(block, triton.next_power_of_2(vocab))
    return dict(BLOCK_V=block, num_warps=cfg.num_warps, **LAUNCH_OPTIONS)


def _written_over(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, V] view of `dtype` over fp32 z's memory: row t in the first bytes of z's row t
    (a row stride of z's row in `dtype` elements; module doc)."""
    return z.view(dtype)[:, : z.shape[1]]


def tile(flat: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    """A chunk's [rows, V] logit tile over the first rows * V elements of `flat`: row-major, the
    kernels' unit column stride."""
    return flat[: rows * vocab].view(rows, vocab)


def _log_softmax(
    z: torch.Tensor, targets: torch.Tensor | None, entropy: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, vocab = z.shape
    lse = torch.empty(rows, dtype=torch.float32, device=z.device)
    s = torch.empty_like(lse) if targets is not None else lse
    if rows:
        row_log_softmax_kernel[(rows,)](
            z, lse if targets is None else targets, s, lse, lse if entropy is None else entropy, vocab,
            z.stride(0), HAS_TARGET=targets is not None, WITH_ENTROPY=entropy is not None,
            **_launch_config(vocab),
        )  # fmt: skip
    return s, lse


def log_softmax(
    z: torch.Tensor, targets: torch.Tensor, cap: float | None = None, entropy: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, lse) [rows] of fp32 logits z [rows, V] (unit column stride), targets [rows] in [0, V).
    z is left as it is, capped or not (cap: the contract's; logit_grads is what reads it).
    entropy: a [rows] fp32 buffer given to receive each row's entropy H = lse - E_p[z], from
    the same read of z."""
    return _log_softmax(z, targets, entropy)


def lse(z: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """log sum_v exp(z_v) [rows] of fp32 logits z [rows, V]; z is left as it is (no scratch)."""
    return _log_softmax(z, None)[1]


def logit_grads(
    z: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    c: torch.Tensor,
    dtype: torch.dtype,
    cap: float | None = None,
) -> torch.Tensor:
    """dz [rows, V] in matmul_torch.tile_dtype(dtype) (fp32 or bf16; fp32 for an fp16 operand,
    scaled at the GEMM) <- c (1[v = y] - exp(z - lse)); c [rows] fp32,
    z fp32 with a unit column stride. Written over z, which is consumed (module doc): dz is
    a view of z's memory, row t in the first bytes of z's row t. cap: z holds soft-capped
    logits, cap tanh(raw / cap), and dz is taken on to the raw ones (times 1 - (z / cap)^2)."""
    rows, vocab = z.shape
    dz = _written_over(z, tile_dtype(dtype))
    if rows:
        row_logit_grads_kernel[(rows,)](
            z, targets, lse, c, dz, vocab, z.stride(0), dz.stride(0), cap or 1.0, SOFTCAP=cap is not None,
            **_launch_config(vocab),
        )  # fmt: skip
    return dz


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
    """The dense fold's rows: (KL(p_s || q), KL(p_s || p_T) when z_t is given, and, when coef
    [rows] is, dz in tile_dtype(dtype) = coef p_s (a - c - E_ps[a - c])) from fp32 tiles a, c, z_t
    [rows, V] (unit column strides) and the log-sum-exps of c and z_t. dz is written over a
    (consumed, as z in logit_grads); c and z_t are left as they are. cap: a holds a soft-capped
    student's logits, and dz is taken on to the raw ones (as logit_grads')."""
    rows, vocab = a.shape
    f32 = dict(dtype=torch.float32, device=a.device)
    kl, lse_a, u = (torch.empty(rows, **f32) for _ in range(3))
    kl_t = torch.empty(rows, **f32) if z_t is not None else None
    if rows:
        row_dense_kl_kernel[(rows,)](
            a, c, a if z_t is None else z_t, lse_c, lse_c if lse_t is None else lse_t, kl,
            kl if kl_t is None else kl_t, lse_a, u, vocab, a.stride(0),
            WITH_TEACHER=z_t is not None, **_launch_config(vocab),
        )  # fmt: skip
    if coef is None:
        return kl, kl_t, None
    dz = _written_over(a, tile_dtype(dtype))
    if rows:
        row_dense_grads_kernel[(rows,)](
            a, c, lse_a, u, coef, dz, vocab, a.stride(0), dz.stride(0), cap or 1.0, SOFTCAP=cap is not None,
            **_launch_config(vocab),
        )  # fmt: skip
    return kl, kl_t, dz


def gemm_rounded(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out <- a @ b, accumulated in fp32 and rounded once into out's dtype (the Triton matmul:
    cuBLAS's bf16 results may reduce in bf16). The fold's dW when its rows are one chunk."""
    return matmul(a, b, out)


def gemm_pair(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, lo: torch.Tensor, accumulate: bool
) -> None:
    """(out, lo) (+)= a @ b, the sum carried as bf16 value and remainder (matmul_triton's
    pair): the fold's dW over several row chunks with GOPD_DW_SUM=pair."""
    matmul(a, b, out, accumulate, lo=lo)
