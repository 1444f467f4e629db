"""The chunked twin of the Triton kernels, in plain PyTorch (any device, CPUs included).

Logits z = (h W^T + b) / tau are only ever built one [row chunk, vocab chunk] tile at a
time, in float32, inside a fixed workspace budget; the loop runs vocabulary chunks outside
and row chunks inside so that each slice of W is read (and upcast, where the GEMMs need
it: matmul_torch) once.

Forward: per-slice log-softmax partials (see vocab_partials) merged into logp, lse and
entropy. Backward: each tile is recomputed and turned into dL/dz,

    dL/dz_v = g_l (1[v = y] - p_v) + g_H p_v (E_p[z] - z_v)
            = g_l 1[v = y] - p_v (g_l + g_H (H + z_v - lse))

(g_l, g_H: upstream gradients of logp and entropy, per token), from which dH, dW and db
follow by two GEMMs and a column sum. dW of a vocabulary chunk is complete once its row
chunks are done, so it is written once, in float32.

A soft-capped head (Gemma 2's final_logit_softcapping c) has logits a = cap tanh(z / cap),
cap = c / tau: the tiles are capped where they are built, and the backward's dL/da times
da/dz = 1 - (a / cap)^2, read off the capped tile itself, is dL/dz.

Frozen head (only dH wanted, no entropy): dL/dh = g_l / tau (W_y - E_p[W]), and the
forward can accumulate E_p[W] = sum_v p_v W_v with one more GEMM per tile (an online
softmax over vocabulary chunks, rescaled as the running row maximum moves;
frozen_head_forward). The backward is then a scaling, with no GEMM: 2 GEMMs in all, as
autograd through materialised logits (forward, dH), where recomputing takes 3.
"""

from __future__ import annotations

import torch

from gopd_kernels.ops.matmul_torch import compute_dtype, mm_add, mm_into, operand, scaled_operand
from gopd_kernels.ops.vocab_partials import merge_vocab_partials

ROWS_PER_TILE = 4096  # rows of a tile when the budget allows; more rows, fewer re-reads of W
LIVE_TILES = 2  # tile-sized tensors alive at once (logits and their exp / probabilities)


def tile_shape(
    rows: int, vocab: int, workspace_bytes: int, dtype: torch.dtype, live: int = LIVE_TILES
) -> tuple[int, int]:
    """(row chunk, vocab chunk) such that `live` tiles fit in workspace_bytes."""
    budget_elems = max(1, workspace_bytes // (live * compute_dtype(dtype).itemsize))
    row_chunk = max(1, min(rows, ROWS_PER_TILE, budget_elems))
    vocab_chunk = max(1, min(vocab, budget_elems // row_chunk))
    row_chunk = max(1, min(rows, budget_elems // vocab_chunk))
    return row_chunk, vocab_chunk


class TileWorkspace:
    """LIVE_TILES reusable tile buffers, allocated once per call: fresh 32 MB tensors per
    tile would be page-faulted in anew every time (glibc hands large blocks back to the OS)."""

    def __init__(
        self,
        row_chunk: int,
        vocab_chunk: int,
        dtype: torch.dtype,
        device: torch.device,
        live: int = LIVE_TILES,
    ):
        self.buf = torch.empty(live, row_chunk * vocab_chunk, dtype=dtype, device=device)

    def tile(self, k: int, rows: int, cols: int) -> torch.Tensor:
        return self.buf[k, : rows * cols].view(rows, cols)

    def tiles(self, rows: int, cols: int) -> list[torch.Tensor]:
        return [self.tile(k, rows, cols) for k in range(self.buf.shape[0])]


def logits_tile(
    out: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    inv_temp: float,
    col_bias: torch.Tensor | None,
    row_shift: torch.Tensor | None = None,
    cap: float | None = None,
) -> torch.Tensor:
    """out <- (h @ w.T) * inv_temp + col_bias, soft-capped (cap tanh(. / cap)) when cap is
    given, minus row_shift[:, None]."""
    mm_into(out, h, w.T, alpha=inv_temp)
    if col_bias is not None:
        out.add_(col_bias)
    if cap is not None:
        soft_cap_(out, cap)
    if row_shift is not None:
        out.sub_(row_shift[:, None])
    return out


def soft_cap_(z: torch.Tensor, cap: float) -> torch.Tensor:
    """z <- cap tanh(z / cap), in place: a soft-capped head's logits from its raw ones."""
    return z.div_(cap).tanh_().mul_(cap)


def cap_grad(capped: torch.Tensor, cap: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """d capped / d raw = 1 - (capped / cap)^2 of soft-capped logits (a tile, or one per row),
    into `out` when given (capped itself: in place)."""
    return torch.div(capped, cap, out=out).square_().neg_().add_(1.0)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _targets_in(targets: torch.Tensor, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose target lies in vocabulary chunk [c0, c1), and the target's column in it."""
    rows = ((targets >= c0) & (targets < c1)).nonzero().squeeze(1)
    return rows, targets[rows] - c0


def accumulate_head_grads(dz, h, w, dh, dw, rows: tuple[int, int], cols: tuple[int, int], db=None) -> None:
    """From one tile's dL/dz: dh[rows] += dz @ w; dw[cols] = dz^T @ h on the first row chunk,
    += after (each vocabulary chunk's dW is complete after its row chunks, written in place);
    db[cols] += the column sums of dz, taken before dz becomes a GEMM operand (scaled_operand:
    w's dtype, scaled for fp16, the scale taken out by the GEMMs' alpha)."""
    (r0, r1), (c0, c1) = rows, cols
    if db is not None:
        db[c0:c1] += dz.sum(dim=0)
    dz, alpha = scaled_operand(dz, w)
    if dh is not None:
        mm_add(dh[r0:r1], dz, w, alpha)
    if dw is not None:
        (mm_into if r0 == 0 else mm_add)(dw[c0:c1], dz.T, h, alpha)


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temp: float,
    with_entropy: bool,
    workspace_bytes: int,
    expected_weight: torch.Tensor | None = None,
    cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """hidden [M, D], weight [V, D], targets [M] int64 in [0, V) -> (logp, lse, entropy|None).

    expected_weight: an optional [M, D] float32 buffer, filled with E_p[W] (frozen-head backward;
    for a soft-capped head E_p[f' W], f' = 1 - (a / cap)^2 per column). cap: a soft-capped head's
    cap / tau (module doc).
    """
    rows, vocab = hidden.shape[0], weight.shape[0]
    live = LIVE_TILES + (cap is not None and expected_weight is not None)  # and f'
    row_chunk, vocab_chunk = tile_shape(rows, vocab, workspace_bytes, hidden.dtype, live)
    n_slices = -(-vocab // vocab_chunk)
    acc = compute_dtype(hidden.dtype)
    h = operand(hidden)
    m = torch.empty(n_slices, rows, dtype=acc, device=hidden.device)
    s = torch.empty_like(m)
    t = torch.empty_like(m) if with_entropy else None
    zy = torch.zeros_like(m)
    ew = expected_weight  # sum_v exp(z_v - m[k]) W_v over the slices so far; m[k] only grows
    if ew is not None:
        ew.zero_()
    ws = TileWorkspace(row_chunk, vocab_chunk, acc, hidden.device, live)
    for k, (c0, c1) in enumerate(_chunks(vocab, vocab_chunk)):
        w = operand(weight[c0:c1])
        b = bias[c0:c1].to(acc) * inv_temp if bias is not None else None
        for r0, r1 in _chunks(rows, row_chunk):
            z = logits_tile(ws.tile(0, r1 - r0, c1 - c0), h[r0:r1], w, inv_temp, b, cap=cap)
            da_dz = None if live == LIVE_TILES else cap_grad(z, cap, ws.tile(2, r1 - r0, c1 - c0))
            sel, col = _targets_in(targets[r0:r1], c0, c1)
            zy[k, r0 + sel] = z[sel, col]
            m_k = z.amax(dim=1)
            if ew is not None and k > 0:  # shift by the running max: the sums stay valid partials
                m_k = torch.maximum(m_k, m[k - 1, r0:r1])
                ew[r0:r1].mul_(torch.exp(m[k - 1, r0:r1] - m_k)[:, None])
            u = z.sub_(m_k[:, None])
            e = torch.exp(u, out=ws.tile(1, r1 - r0, c1 - c0))
            m[k, r0:r1] = m_k
            s[k, r0:r1] = e.sum(dim=1)
            if ew is not None:
                e_op, alpha = scaled_operand(e if da_dz is None else e.mul_(da_dz), w)
                mm_add(ew[r0:r1], e_op, w, alpha)
            if t is not None:
                t[k, r0:r1] = e.mul_(u).sum(dim=1)
    logp, lse, entropy = merge_vocab_partials(m, s, t, zy)
    if ew is not None:
        ew.mul_(torch.exp(m[-1] - lse)[:, None])  # / sum_v exp(z_v - m[-1]), the rows' max
    return logp, lse, entropy


def frozen_head_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temp: float,
    workspace_bytes: int,
    cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [M], lse [M], x = dlogp/dh = (W_y - E_p[W]) / tau [M, D]) for a frozen head (see
    the module doc): the backward is dh = g_l x, no logits, no GEMM. A soft-capped head's
    (cap): x = (f'_y W_y - E_p[f' W]) / tau, f' = 1 - (a / cap)^2 of its capped logits a."""
    x = torch.empty(hidden.shape, dtype=compute_dtype(hidden.dtype), device=hidden.device)
    logp, lse, _ = forward(hidden, weight, bias, targets, inv_temp, False, workspace_bytes, x, cap=cap)
    w_y = weight[targets].to(x.dtype)
    if cap is not None:  # the target's capped logit: logp + lse
        w_y.mul_(cap_grad((logp + lse).to(x.dtype), cap)[:, None])
    return logp, lse, x.sub_(w_y).mul_(-inv_temp)


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temp: float,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
    workspace_bytes: int,
    dh_dtype: torch.dtype | None = None,
    cap: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dhidden, dweight, dbias) for per-token upstream grad_logp / grad_entropy [M];
    dhidden in dh_dtype when given (a vocabulary-parallel head sums it over ranks in fp32),
    else in hidden's dtype. cap: a soft-capped head's cap / tau."""
    need_dh, need_dw, need_db = needs
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    live = LIVE_TILES if cap is None else LIVE_TILES + 1  # and da/dz
    row_chunk, vocab_chunk = tile_shape(rows, vocab, workspace_bytes, hidden.dtype, live)
    acc = compute_dtype(hidden.dtype)
    h = operand(hidden)
    # dz/d(raw logits) = dz/dz_scaled * inv_temp: fold it into the per-token upstream grads.
    g_l = grad_logp.to(acc) * inv_temp
    g_e = grad_entropy.to(acc) * inv_temp if grad_entropy is not None else None
    like = dict(dtype=acc, device=hidden.device)
    dh = torch.zeros(rows, dim, **like) if need_dh else None
    dw = torch.empty(vocab, dim, **like) if need_dw else None
    db = torch.zeros(vocab, **like) if need_db else None
    ws = TileWorkspace(row_chunk, vocab_chunk, acc, hidden.device, live)
    for c0, c1 in _chunks(vocab, vocab_chunk):
        w = operand(weight[c0:c1])
        b = bias[c0:c1].to(acc) * inv_temp if bias is not None else None
        for r0, r1 in _chunks(rows, row_chunk):
            u = logits_tile(ws.tile(0, r1 - r0, c1 - c0), h[r0:r1], w, inv_temp, b, cap=cap)
            da_dz = None if cap is None else cap_grad(u, cap, ws.tile(2, r1 - r0, c1 - c0))
            u.sub_(lse[r0:r1, None])  # log p
            if g_e is None:
                dz = u.exp_().mul_(-g_l[r0:r1, None])
            else:
                p = torch.exp(u, out=ws.tile(1, r1 - r0, c1 - c0))
                dz = u.add_(entropy[r0:r1, None]).mul_(g_e[r0:r1, None]).add_(g_l[r0:r1, None]).mul_(p).neg_()
            sel, col = _targets_in(targets[r0:r1], c0, c1)
            dz[sel, col] += g_l[r0 + sel]
            if da_dz is not None:
                dz.mul_(da_dz)
            accumulate_head_grads(dz, h[r0:r1], w, dh, dw, (r0, r1), (c0, c1), db)
    cast = lambda x, dtype: None if x is None else x.to(dtype)
    return (
        cast(dh, dh_dtype or hidden.dtype),
        cast(dw, weight.dtype),
        cast(db, weight.dtype),
    )
