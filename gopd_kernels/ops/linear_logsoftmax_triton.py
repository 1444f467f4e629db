"""Triton kernels for token log-probs through a linear layer, streamed over the vocabulary.

Forward (`vocab_partials_kernel`): a program owns BLOCK_M token rows and one slice of the
vocabulary; it walks the slice in BLOCK_V tiles, each tile z = (H W^T + b) / tau built
with tl.dot over D in BLOCK_D steps (fp32 accumulator), and keeps an online log-sum-exp
(m, s), the entropy sum t and the target logit. Slices run in parallel programs so that
small token counts still fill the GPU; their partials are merged by `merge_vocab_partials`.

Backward (`logits_grad_kernel` + two GEMMs, grads_from_logit_grads): for a tile of rows by
a vocabulary slice, each (row tile, vocab tile) program recomputes z and writes dL/dz_raw
(see linear_logsoftmax_torch) into a workspace in the input dtype (fp16 inputs: times a
power of two, logit_grad_scale, which the GEMMs take back out; unscaled, small gradients
would underflow); then dW[slice] = dZ^T @ H and dH += dZ @ W[slice]
run on tensor cores with fp32 accumulators (`matmul_triton`). The workspace is no larger
than the weight: memory stays O(N*D + V*D).

GOPD_LOGITS_GEMM=torch (the default for bf16 heads where torch has cuBLAS's bf16 GEMM with an
fp32 result: backend.py) builds the same tiles another way, for logp without the entropy:
torch's GEMMs (cuBLAS on CUDA: bf16 operands, fp32 results) write fp32 logit tiles of the
backward's shape into the workspace, and fold_rows_triton's row passes read them: each
tile's log-sum-exp in the forward (merged over the slices), dL/dz written over the tile in
the backward. One more write and read of the fp32 tile per GEMM, against GEMMs at cuBLAS's
rate instead of the fused kernels' (their epilogue, exp and the online softmax, shares the
SMs with the tensor cores).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gopd_kernels.backend import backward_gemm, dw_sum, logits_gemm, warn_once
from gopd_kernels.ops import fold_rows_triton
from gopd_kernels.ops.linear_logsoftmax_torch import logits_tile as torch_logits_tile
from gopd_kernels.ops.matmul_torch import cublas_bf16, fp16_dz_scale, operand
from gopd_kernels.ops.matmul_triton import gradient_gemm, matmul
from gopd_kernels.ops.triton_common import (
    DOT_PRECISION,
    autotuned,
    config,
    dot_acc,
    grouped_tile,
    launch,
    make_pruner,
    soft_cap,
    soft_cap_slope,
    token_bucket,
)
from gopd_kernels.ops.vocab_partials import merge_vocab_partials

# (BLOCK_M rows) x (BLOCK_V vocab) logit tiles, BLOCK_D deep. The online softmax holds
# the fp32 tile and its exponentials at once, so a tile over 64 fp32 values per thread
# (128 x 128 on 4 warps) spills registers; `python -m gopd_kernels.aot` reports spills
# per config, and every hot path keeps at least one spill-free config on sm_80 and sm_90 (the
# 3xTF32 fp32 ones need the narrow 64-deep-or-less tiles at the end), in bf16 on sm_89,
# sm_100 and sm_120, and in two stages on AMD's gfx90a, gfx942 and gfx950 in every dtype.
TILE_CONFIGS = [
    config(8, 3, BLOCK_M=128, BLOCK_V=256, BLOCK_D=64),  # the backward's widest; forward spills
    config(8, 3, BLOCK_M=128, BLOCK_V=128, BLOCK_D=64),
    config(8, 3, BLOCK_M=64, BLOCK_V=256, BLOCK_D=64),
    config(8, 3, BLOCK_M=128, BLOCK_V=64, BLOCK_D=64),
    config(8, 4, BLOCK_M=128, BLOCK_V=128, BLOCK_D=32),
    config(8, 3, BLOCK_M=128, BLOCK_V=64, BLOCK_D=32),
    config(4, 4, BLOCK_M=64, BLOCK_V=64, BLOCK_D=32),
    config(8, 3, BLOCK_M=128, BLOCK_V=64, BLOCK_D=16),  # fp32 teacher + reference on sm_80
]
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_V=128, BLOCK_D=32)
SLICE_ALIGN = 512  # vocabulary slices are multiples of every BLOCK_V above
GROUP_M = 8


@triton.jit
def logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    M,
    V,
    D,
    stride_hm,
    stride_hd,
    stride_wv,
    stride_wd,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """z[rows, cols] = (H[rows] . W[cols] + b[cols]) * inv_temp in fp32; -inf past V."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_hm + offs_d[None, :] * stride_hd
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wv + offs_d[None, :] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        h = tl.load(h_ptrs, mask=(rows[:, None] < M) & d_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=(cols[:, None] < V) & d_ok[None, :], other=0.0)
        acc = dot_acc(h, tl.trans(w), acc, DOT_PRECISION)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    # Columns past V must weigh nothing in the softmax: -inf, never 0 (verl #2899).
    return tl.where(cols[None, :] < V, acc * inv_temp, float("-inf"))


@triton.jit
def capped(z, cols, V, cap, SOFTCAP: tl.constexpr):
    """A logit tile as softmax reads it: z, or for a soft-capped head cap tanh(z / cap) (cap and z
    both already / tau), columns past V still -inf."""
    if SOFTCAP:
        z = tl.where(cols[None, :] < V, soft_cap(z, cap), float("-inf"))
    return z


@triton.jit
def cap_grad(z, cols, V, cap):
    """d capped / d raw from the capped tile z itself: 1 - (z / cap)^2 (0 past V)."""
    return tl.where(cols[None, :] < V, soft_cap_slope(z, cap), 0.0)


@triton.jit
def online_softmax_update(z, cols, y, V, m, s, t, zy, WITH_ENTROPY: tl.constexpr):
    """Fold one [BLOCK_M, BLOCK_V] logit tile into the running (m, s, t, zy) of its rows."""
    zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile holds a column < V
    alpha = tl.exp(m - m_new)
    u = z - m_new[:, None]
    e = tl.exp(u)
    if WITH_ENTROPY:  # t = sum e^(z-m) (z-m), rescaled when m moves
        moved = tl.where(s > 0, m - m_new, 0.0) * s  # first tile: m = -inf, s = 0
        t = alpha * (t + moved) + tl.sum(e * tl.where(cols[None, :] < V, u, 0.0), axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, t, zy


@triton.jit
def vocab_partials_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    h2_ptr,
    w2_ptr,
    b2_ptr,
    y_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    zy_ptr,
    M,
    V,
    D,
    D2,
    stride_hm,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_h2m,
    stride_h2d,
    stride_w2v,
    stride_w2d,
    inv_temp,
    inv_temp2,
    cap,
    cap2,
    slice_len,
    M_BUCKET,  # token_bucket(M): the autotuning key, not read
    HAS_BIAS: tl.constexpr,
    HAS_BIAS2: tl.constexpr,
    TWO_MODELS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SOFTCAP2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partials [model, slice, row] for one model, or two (teacher and reference) sharing
    targets and V, whose tiles are streamed side by side in the same program (each at its own
    1 / tau: inv_temp, inv_temp2, which differ where the models scale their logits apart; and
    soft-capped at its own cap / tau where SOFTCAP, SOFTCAP2)."""
    pid_m = tl.program_id(0)
    vocab_slice = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m2 = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zy2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_start = vocab_slice * slice_len
    v_end = tl.minimum(v_start + slice_len, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, M, V, D, stride_hm, stride_hd, stride_wv, stride_wd,
            inv_temp, HAS_BIAS, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        z = capped(z, cols, V, cap, SOFTCAP)
        m, s, t, zy = online_softmax_update(z, cols, y, V, m, s, t, zy, WITH_ENTROPY)
        if TWO_MODELS:
            z2 = logits_tile(
                h2_ptr, w2_ptr, b2_ptr, rows, cols, M, V, D2, stride_h2m, stride_h2d, stride_w2v, stride_w2d,
                inv_temp2, HAS_BIAS2, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
            )  # fmt: skip
            z2 = capped(z2, cols, V, cap2, SOFTCAP2)
            m2, s2, t2, zy2 = online_softmax_update(z2, cols, y, V, m2, s2, t2, zy2, WITH_ENTROPY)
    out = vocab_slice * M + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zy_ptr + out, zy, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_ok)
    if TWO_MODELS:
        out2 = out + tl.num_programs(1) * M
        tl.store(m_ptr + out2, m2, mask=row_ok)
        tl.store(s_ptr + out2, s2, mask=row_ok)
        tl.store(zy_ptr + out2, zy2, mask=row_ok)
        if WITH_ENTROPY:
            tl.store(t_ptr + out2, t2, mask=row_ok)


@triton.jit
def logits_grad_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    lse_ptr,
    ent_ptr,
    gl_ptr,
    ge_ptr,
    dz_ptr,
    M,
    V,
    D,
    stride_hm,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_dzm,
    inv_temp,
    cap,
    M_BUCKET,  # token_bucket(M): the autotuning key, not read
    HAS_BIAS: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dZ[rows, cols] = (g_l 1[col = y] - p (g_l + g_H (H + z - lse))) (1 - (z / cap)^2), g
    already / tau; the last factor only for a soft-capped head, whose z is cap tanh(raw / cap)."""
    pid_m, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(V, BLOCK_V), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < M
    z = logits_tile(
        h_ptr, w_ptr, b_ptr, rows, cols, M, V, D, stride_hm, stride_hd, stride_wv, stride_wd,
        inv_temp, HAS_BIAS, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
    )  # fmt: skip
    z = capped(z, cols, V, cap, SOFTCAP)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_l = tl.load(gl_ptr + rows, mask=row_ok, other=0.0)
    u = z - lse[:, None]  # log p; -inf past V
    p = tl.exp(u)
    if WITH_ENTROPY:
        g_e = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        coef = g_l[:, None] + g_e[:, None] * (ent[:, None] + tl.where(cols[None, :] < V, u, 0.0))
    else:
        coef = g_l[:, None]
    dz = tl.where(cols[None, :] == y[:, None], g_l[:, None], 0.0) - p * coef
    if SOFTCAP:
        dz = dz * cap_grad(z, cols, V, cap)
    dz_ptrs = dz_ptr + rows[:, None].to(tl.int64) * stride_dzm + cols[None, :]
    tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < V))


_prune = make_pruner("BLOCK_M", "BLOCK_V", "BLOCK_D", "h_ptr")
vocab_partials_kernel_tuned = autotuned(
    vocab_partials_kernel, TILE_CONFIGS, ["M_BUCKET", "V", "D", "slice_len"], _prune
)
# Keyed on dZ's row stride, the backward's slice width, not on V: the last vocabulary slice
# is narrower than the others, and keyed on its own width it would be tuned again.
logits_grad_kernel_tuned = autotuned(
    logits_grad_kernel, TILE_CONFIGS, ["M_BUCKET", "stride_dzm", "D"], _prune
)


def vocab_slices(rows: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(number of slices, slice length): enough programs for ~2 waves over the SMs.

    Sized for token_bucket(rows), so that the slice length (an autotuning key) takes one
    value per bucket."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    row_blocks = triton.cdiv(token_bucket(rows), 128)
    wanted = max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(vocab, SLICE_ALIGN)))
    slice_len = triton.cdiv(triton.cdiv(vocab, wanted), SLICE_ALIGN) * SLICE_ALIGN
    return triton.cdiv(vocab, slice_len), slice_len


def lm_head_args(hidden: torch.Tensor, weight: torch.Tensor) -> tuple:
    return (hidden.shape[1], hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))


LinearModel = tuple  # (hidden [M, D], weight [V, D], bias [V] | None)


def forward_models(models: list[LinearModel], targets, inv_temps: list[float], with_entropy, caps=None):
    """(logp, lse, entropy|None) of one model, or of two sharing targets, in one launch; each
    model's logits times its own entry of inv_temps, and soft-capped at its entry of caps
    (cap / tau; None: not capped)."""
    caps = caps or [None] * len(models)
    if len(models) not in (1, 2) or len(inv_temps) != len(models):
        raise ValueError(f"forward_models takes one or two models, a 1 / tau each: {len(models)} {inv_temps}")
    (h, w, b), (h2, w2, b2) = models[0], models[-1]
    M, V = h.shape[0], w.shape[0]
    n_slices, slice_len = vocab_slices(M, V, h.device)
    m = torch.empty(len(models), n_slices, M, dtype=torch.float32, device=h.device)
    s, zy = torch.empty_like(m), torch.empty_like(m)
    t = torch.empty_like(m) if with_entropy else None
    d, *strides = lm_head_args(h, w)
    d2, *strides2 = lm_head_args(h2, w2)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n_slices)
    launch(
        vocab_partials_kernel,
        vocab_partials_kernel_tuned,
        grid,
        INTERPRET_CONFIG,
        h, w, h if b is None else b, h2, w2, h2 if b2 is None else b2, targets,
        m, s, m if t is None else t, zy, M, V, d, d2, *strides, *strides2,
        inv_temps[0], inv_temps[-1], caps[0] or 1.0, caps[-1] or 1.0, slice_len, token_bucket(M),
        HAS_BIAS=b is not None,
        HAS_BIAS2=b2 is not None,
        TWO_MODELS=len(models) == 2,
        WITH_ENTROPY=with_entropy,
        SOFTCAP=caps[0] is not None,
        SOFTCAP2=caps[-1] is not None,
        DOT_PRECISION=DOT_PRECISION[h.dtype],
    )  # fmt: skip
    return [merge_vocab_partials(m[k], s[k], None if t is None else t[k], zy[k]) for k in range(len(models))]


def forward(hidden, weight, bias, targets, inv_temp, with_entropy, workspace_bytes, cap=None):
    """Same contract as linear_logsoftmax_torch.forward; the fused kernels need no workspace."""
    if torch_logits(with_entropy, hidden, weight, bias, capped=cap is not None):
        return _forward_torch_logits(hidden, weight, bias, targets, inv_temp, workspace_bytes)
    return forward_models([(hidden, weight, bias)], targets, [inv_temp], with_entropy, [cap])[0]


def torch_logits(with_entropy: bool, *operands: torch.Tensor | None, capped: bool = False) -> bool:
    """Whether token_logprobs' tiles come from torch's GEMMs (module doc): GOPD_LOGITS_GEMM,
    else for operands that cublas_bf16 accepts (backend.logits_gemm; none given: the fused
    kernels). Not with the entropy or a soft-capped head (`capped`), which only the fused
    kernels take: said once in a log line, where GOPD_LOGITS_GEMM=torch asked for those
    tiles, or where they were the default (bf16 on cuBLAS) and a soft-cap keeps them out."""
    by_default = not with_entropy and bool(operands) and cublas_bf16(*operands)
    if logits_gemm(by_default) != "torch":
        return False
    if with_entropy or capped:
        who = "token_logprobs with the entropy" if with_entropy else "a soft-capped head's log-probs"
        warn_once(f"{who} runs the fused Triton kernels, not cuBLAS logit tiles (GOPD_LOGITS_GEMM)")
        return False
    return True


def _torch_logits(tile, hidden, weight, bias, rows, cols, inv_temp):
    """tile (fp32) <- (H[rows] W[cols]^T + b[cols]) / tau by torch's GEMM (module doc)."""
    b = None if bias is None else bias[cols].float() * inv_temp
    return torch_logits_tile(tile, operand(hidden[rows]), operand(weight[cols]), inv_temp, b)


def _logit_tiles(hidden, weight, bias, inv_temp, workspace_bytes):
    """Yield (rows, cols, z): the fp32 logit tiles of _torch_logits in the backward's shape
    (backward_tiles), one buffer reused."""
    M, D = hidden.shape
    V = weight.shape[0]
    row_chunk, cols = backward_tiles(M, V, D, torch.float32, workspace_bytes)
    buf = torch.empty(row_chunk * cols, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, M, row_chunk):
        rows = slice(r0, min(r0 + row_chunk, M))
        for v0 in range(0, V, cols):
            c = slice(v0, min(v0 + cols, V))
            z = buf[: (rows.stop - r0) * (c.stop - v0)].view(rows.stop - r0, c.stop - v0)
            yield rows, c, _torch_logits(z, hidden, weight, bias, rows, c, inv_temp)


def _forward_torch_logits(hidden, weight, bias, targets, inv_temp, workspace_bytes):
    """(logp, lse, None): each tile's log-sum-exp by the row pass, merged over the slices; the
    target logit gathered from the tile that holds it (no host sync)."""
    M = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse = torch.full((M,), float("-inf"), **f32)
    z_y = torch.zeros(M, **f32)
    for rows, cols, z in _logit_tiles(hidden, weight, bias, inv_temp, workspace_bytes):
        torch.logaddexp(lse[rows], fold_rows_triton.lse(z), out=lse[rows])
        y = targets[rows] - cols.start
        inside = (y >= 0) & (y < z.shape[1])
        picked = z.gather(1, y.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
        z_y[rows] = torch.where(inside, picked, z_y[rows])
    return z_y - lse, lse, None


def logit_grad_dtype(dtype: torch.dtype, scaled: bool = False) -> torch.dtype:
    """dZ's dtype, the GEMMs' operand: fp32 for fp32 models, bf16 for bf16 ones, and for fp16
    ones fp16 where dZ is written times a power of two from fp16_dz_scale (`scaled`: the
    backwards of token_logprobs and of the dense losses), else bf16 (dZ from cuBLAS tiles,
    which GOPD_LOGITS_GEMM=torch gives fp16 heads only when asked).

    Unscaled, an fp16 dZ goes wrong: measured with the Triton interpreter (V = 151936, an
    upstream gradient of 1/4096, a token mean's, with no loss scale), it flushed the small
    entries of c (1[v = y] - p_v) and dH came out 20 % off float64 in its worst row.
    """
    if dtype == torch.float32:
        return torch.float32
    return torch.float16 if dtype == torch.float16 and scaled else torch.bfloat16


def logit_grad_scale(
    g_l: torch.Tensor, g_e: torch.Tensor | None, entropy: torch.Tensor | None
) -> torch.Tensor:
    """fp16_dz_scale for token_logprobs' dZ: |dZ_v| <= |g_l| + |g_e| (1/e + H) per row (g
    already / tau), since |1[v = y] - p_v| <= 1 and |p_v (log p_v + H)| <= 1/e + H. H is the
    row's entropy (<= ln V): that of the whole row for a vocabulary-parallel head's shard."""
    bound = g_l.abs().amax() if g_l.numel() else g_l.new_zeros(())
    if g_e is not None and g_e.numel():
        bound = bound + (g_e.abs() * (math.exp(-1) + entropy)).amax()
    return fp16_dz_scale(bound)


def scaled_for_fp16_dz(dtype: torch.dtype, scale, *grads: torch.Tensor | None):
    """(grads, unscale) for a backward whose kernels write dZ from upstream gradients: for an
    fp16 model (dZ in fp16, logit_grad_dtype(scaled=True)) the gradients times s = scale(), a
    power of two from a bound on |dZ| (logit_grad_scale, or the dense losses' own), and
    1 / s for the GEMMs to take back out; for every other dtype the gradients as they are and
    None. The one gate and multiply of token_logprobs' and the dense losses' backwards."""
    if logit_grad_dtype(dtype, scaled=True) != torch.float16:
        return grads, None
    s = scale()
    return tuple(None if g is None else g * s for g in grads), 1.0 / s


def backward_tiles(
    rows: int, vocab: int, hidden_size: int, dz_dtype: torch.dtype, workspace_bytes: int
) -> tuple[int, int]:
    """(rows per chunk, vocabulary columns per slice) of the backward's dZ tiles.

    All rows in one chunk unless an fp32 [rows, D] dH accumulator would outgrow the
    workspace; then chunks of whole 128-row tiles. The vocabulary is cut into as few slices
    as the workspace allows, of near-equal widths in whole 128 columns (no narrow last
    slice: a GEMM too thin for the tensor cores). The width is sized for
    token_bucket(rows), not rows, so that it (an autotuning key of the kernels) takes one
    value per bucket and training's changing token counts do not re-tune every step."""
    max_rows = max(128, workspace_bytes // (hidden_size * 4))
    row_chunk = rows if rows <= max_rows else max_rows - max_rows % 128
    max_cols = max(1, min(vocab, workspace_bytes // (token_bucket(row_chunk) * dz_dtype.itemsize)))
    if max_cols < 128 or max_cols == vocab:
        return row_chunk, max_cols
    slices = triton.cdiv(vocab, max_cols - max_cols % 128)  # >= 2
    width = triton.cdiv(vocab, slices)  # then up to whole 128 columns (<= max_cols)
    return row_chunk, triton.cdiv(width, 128) * 128


def grads_from_logit_grads(
    hidden, weight, needs, workspace_bytes, write_logit_grads, tile_dtype=None, unscale=None, dh_dtype=None
):
    """The backward's second half, shared by every loss over a linear head.

    The logit gradient dZ [N, V] is formed tile by tile, a tile being a chunk of rows by a
    slice of the vocabulary (backward_tiles; at N = 16384, V = 151936 and a workspace of the
    weight's size: all rows by 5 slices of 30464 columns). For each tile,
    write_logit_grads(rows, cols, tile) returns dZ, dL/d(raw logits) of those rows and
    columns: the workspace's tile (tile_dtype, default logit_grad_dtype's, scaled with unscale)
    filled, or a view of it; then

        dW[cols] = dZ^T @ H[rows]      one GEMM over all rows when they are one chunk
        dH[rows] += dZ @ W[cols]       summed over the slices in fp32 ([rows, D], small)
        db[cols] += column sums of dZ

    run as tensor-core GEMMs with fp32 accumulators. dW is never summed across chunks in
    bf16 (a known precision loss of chunked kernels); only when the rows come in several
    chunks (an fp32 dH accumulator over all of them would not fit the workspace) does an
    fp32 [V, D] buffer carry dW across them, or with GOPD_DW_SUM=pair a bf16 remainder
    beside dW (backend.DW_SUMS; the dW GEMM then is the Triton matmul's). unscale: 1 / s
    for a dZ written times s (a float32 scalar on the device, logit_grad_scale), taken out
    in the GEMMs and the bias sum. dh_dtype: dH's dtype when not hidden's (fp32 for a
    vocabulary-parallel head, which sums it over ranks before rounding).
    """
    need_dh, need_dw, need_db = needs
    M, D = hidden.shape
    V = weight.shape[0]
    dev, f32 = hidden.device, torch.float32
    tile_dtype = tile_dtype or logit_grad_dtype(hidden.dtype, scaled=unscale is not None)
    row_chunk, cols = backward_tiles(M, V, D, tile_dtype, workspace_bytes)
    tiles = torch.empty(row_chunk, cols, dtype=tile_dtype, device=dev)
    dh = torch.empty(M, D, dtype=dh_dtype or hidden.dtype, device=dev) if need_dh else None
    dw = torch.empty(V, D, dtype=weight.dtype, device=dev) if need_dw else None
    db = torch.zeros(V, dtype=f32, device=dev) if need_db else None
    # fp32 accumulators where a sum runs over tiles and the output is not fp32 itself, and
    # wherever torch's GEMMs run them (their bf16 results may reduce in bf16: gradient_gemm)
    runner = backward_gemm(cublas_bf16(hidden, weight))  # read once per backward, not per GEMM
    torch_gemms = runner == "torch"
    sums_dh = need_dh and dh.dtype != f32 and (cols < V or torch_gemms)
    sums_dw = need_dw and dw.dtype != f32 and row_chunk < M
    pair_dw = sums_dw and dw_sum(weight) == "pair"  # dW and a bf16 remainder (matmul_triton)
    dh_acc = torch.empty(row_chunk, D, dtype=f32, device=dev) if sums_dh else None
    dw_acc = torch.empty(V, D, dtype=f32, device=dev) if sums_dw and not pair_dw else None
    dw_lo = torch.empty_like(dw) if pair_dw else None
    # one slice's dW in fp32 for torch's GEMMs, rounded into dw once, in column blocks of at
    # most a quarter of the workspace: a slice of the whole vocabulary (bf16 dZ tiles at small
    # N) would hold an fp32 [V, D], 2.4 GB of the dense recompute's peak on the H100
    slice_dw = need_dw and torch_gemms and not sums_dw and dw.dtype != f32
    dw_cols = max(1, min(cols, workspace_bytes // 4 // (D * 4)))
    dw_slice = torch.empty(dw_cols, D, dtype=f32, device=dev) if slice_dw else None
    for r0 in range(0, M, row_chunk):
        r1 = min(r0 + row_chunk, M)
        for v0 in range(0, V, cols):
            v1 = min(v0 + cols, V)
            dz_t = write_logit_grads(slice(r0, r1), slice(v0, v1), tiles[: r1 - r0, : v1 - v0])
            if dh is not None:
                out = dh[r0:r1] if dh_acc is None else dh_acc[: r1 - r0]
                gradient_gemm(dz_t, weight[v0:v1], out, v0 > 0, runner, unscale)
            if dw_lo is not None:
                matmul(dz_t.T, hidden[r0:r1], dw[v0:v1], r0 > 0, unscale, lo=dw_lo[v0:v1])
            elif dw is not None and dw_slice is None:
                out = dw[v0:v1] if dw_acc is None else dw_acc[v0:v1]
                gradient_gemm(dz_t.T, hidden[r0:r1], out, r0 > 0, runner, unscale)
            elif dw is not None:  # one row chunk: no sum across chunks
                for c0 in range(0, v1 - v0, dw_cols):
                    c1 = min(c0 + dw_cols, v1 - v0)
                    out = dw_slice[: c1 - c0]
                    gradient_gemm(dz_t[:, c0:c1].T, hidden, out, False, runner, unscale)
                    dw[v0 + c0 : v0 + c1] = out
            if db is not None:
                db[v0:v1] += dz_t.sum(dim=0, dtype=f32)
        if dh_acc is not None:
            dh[r0:r1] = dh_acc[: r1 - r0]
    if dw_acc is not None:
        dw.copy_(dw_acc)
    if db is not None and unscale is not None:
        db *= unscale
    return dh, dw, db


def backward(
    hidden, weight, bias, targets, inv_temp, lse, entropy, grad_logp, grad_entropy, needs, workspace_bytes,
    dh_dtype=None, cap=None,
):  # fmt: skip
    """Same contract as linear_logsoftmax_torch.backward."""
    g_l = grad_logp.float() * inv_temp
    g_e = grad_entropy.float() * inv_temp if grad_entropy is not None else None
    tile_dtype = unscale = None  # dZ in logit_grad_dtype's dtype (scaled where unscale is set)
    # each kernel sees a vocabulary of the slice's columns: ids shift with it, and the ids
    # outside it (negative or past its end) match no column
    if entropy is None and torch_logits(False, hidden, weight, bias, capped=cap is not None):
        dz_dtype = logit_grad_dtype(hidden.dtype)  # unscaled: fp16 heads come here only if asked

        def write_logit_grads(rows, cols, tile):  # tile: fp32, torch's GEMM; dZ written over it
            z = _torch_logits(tile, hidden, weight, bias, rows, cols, inv_temp)
            return fold_rows_triton.logit_grads(z, targets[rows] - cols.start, lse[rows], g_l[rows], dz_dtype)

        tile_dtype = torch.float32
    else:
        bounded = lambda: logit_grad_scale(g_l, g_e, entropy)  # noqa: E731 (read before the rescale)
        (g_l, g_e), unscale = scaled_for_fp16_dz(hidden.dtype, bounded, g_l, g_e)

        def write_logit_grads(rows, cols, dz):
            r = lambda t: None if t is None else t[rows]
            b = None if bias is None else bias[cols]
            logit_grads(r(hidden), weight[cols], b, r(targets) - cols.start, r(lse), r(entropy), r(g_l),
                        r(g_e), inv_temp, dz, cap)  # fmt: skip
            return dz

    dh, dw, db = grads_from_logit_grads(
        hidden, weight, needs, workspace_bytes, write_logit_grads, tile_dtype, unscale, dh_dtype
    )
    return dh, dw, None if db is None else db.to(bias.dtype)


def logit_grads(hidden, weight, bias, targets, lse, entropy, g_l, g_e, inv_temp, dz, cap=None) -> None:
    """dz [M, V] <- dL/d(raw logits) of M rows, the logits recomputed tile by tile (g_l, g_e:
    the upstream gradients of logp and entropy, already / tau; g_e None without entropy; cap:
    a soft-capped head's cap / tau)."""
    M, V = hidden.shape[0], weight.shape[0]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(V, meta["BLOCK_V"]),)
    launch(
        logits_grad_kernel,
        logits_grad_kernel_tuned,
        grid,
        INTERPRET_CONFIG,
        hidden, weight, hidden if bias is None else bias, targets, lse,
        lse if entropy is None else entropy, g_l, g_l if g_e is None else g_e,
        dz, M, V, *lm_head_args(hidden, weight), dz.stride(0), inv_temp, cap or 1.0, token_bucket(M),
        HAS_BIAS=bias is not None,
        WITH_ENTROPY=g_e is not None,
        SOFTCAP=cap is not None,
        DOT_PRECISION=DOT_PRECISION[hidden.dtype],
        GROUP_M=GROUP_M,
    )  # fmt: skip
