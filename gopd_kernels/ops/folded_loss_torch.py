"""A scalar loss of the sampled tokens' log-probs, its gradient folded into the forward.

For L = sum_t l_t(s_t) with s_t = log softmax(z_t)[y_t], the gradient on the logits is

    dL/dz_tv = c_t (1[v = y_t] - p_tv),    c_t = dL/ds_t,

and c_t is known as soon as row t's log-softmax is. So each chunk of rows takes one pass:
its [rows, V] logits once, their log-softmax, c from the loss, dL/dz in place, then
dH = dz W and dW += dz^T H. That is three GEMMs of 2NDV FLOP, as materialising autograd
does, where token_logprobs needs four: its backward learns the upstream gradient only
later and must recompute the logits. The backward here scales the saved dH, dW by the
scalar upstream gradient.

Costs: dH and dW are held from the forward to the backward (they are what the backward
returns); dW is read and written once per row chunk, in fp32, so a chunk needs hundreds of
rows to keep that traffic small next to its GEMMs, hence its own default budget (FOLD_ROWS
rows). Rows that fit one chunk write a bf16 dW directly, where the row module has a GEMM
that rounds its fp32 sum once (fold_rows_triton's): no fp32 [V, D] at all. With that GEMM, a
bf16 head over few rows (N <= 2D) keeps each chunk's dz instead and forms dW in one GEMM at
the end (HeadGrad): no larger than the fp32 sum, without its traffic.
GEMM operands are the inputs upcast to fp32 (one copy of W for the whole pass), or bf16 as
they are on CUDA (matmul_torch); dH and dW are accumulated in fp32 and rounded once.

The other GEMMs are torch's (cuBLAS on CUDA) on either backend; the row work between them
(log-softmax, dL/dz) is fold_rows_torch's in-place torch ops, or fold_rows_triton's two
fused passes on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gopd_kernels.backend import dw_sum, warn_once, workspace_bytes
from gopd_kernels.ops.linear_logsoftmax_torch import soft_cap_
from gopd_kernels.ops.matmul_torch import compute_dtype, mm_add, mm_into, operand, scaled_operand, tile_dtype

# Rows per chunk unless GOPD_WORKSPACE_MB says otherwise, by who does the row work. torch
# (CPUs): 512 (measured: 110 rows gain nothing). triton (GPUs): more rows, fewer passes of
# the fp32 dW over HBM (one read and write per chunk, 5 GB at V = 151936, D = 4096).
# Measured there (H100, N = 16384, bf16): 2070 rows 105.6 ms / 5146 MiB, 4140 rows
# 101.1 ms / 6346 MiB; 2048 keeps the leaner of the two.
FOLD_ROWS = {"torch": 512, "triton": 2048}

# token_loss(s, r0, r1) -> 0-d loss of rows r0:r1 given their log-probs s (differentiable in s)
TokenLoss = Callable[[torch.Tensor, int, int], torch.Tensor]


def fold_workspace_bytes(weight: torch.Tensor, live: float = 1, rows: int = FOLD_ROWS["torch"]) -> int:
    """Budget for `live` fp32 [rows, V] tiles, unless GOPD_WORKSPACE_MB says otherwise."""
    return workspace_bytes("torch", weight, default=int(live * rows * weight.shape[0] * 4))


def fold_rows(ws_bytes: int, rows: int, vocab: int, acc: torch.dtype, live: float = 1) -> int:
    """Rows per chunk (1 to `rows`) such that `live` full-vocabulary tiles fit in ws_bytes."""
    return max(1, min(rows, int(ws_bytes // (live * vocab * acc.itemsize))))


def row_tiles(rows_impl, live: int = 1, capped: bool = False, with_entropy: bool = False) -> float:
    """Full-vocabulary tiles a chunk holds: `live` logit tiles, and the scratch (a fraction of a
    tile) that the row work takes for a soft-capped tile or the entropy (rows_impl.SCRATCH_TILES)."""
    return live + (rows_impl.SCRATCH_TILES if capped or with_entropy else 0)


def logit_chunks(
    h, w, b, targets, inv_temp: float, chunk: int, buf: torch.Tensor, rows_impl, cap: float | None = None
):
    """Yield (r0, r1, y, z) per chunk of rows: z = (h W^T + b) / tau for rows r0:r1, their
    fp32 logits over the whole vocabulary, written into buf in rows_impl's tile layout (b
    already divided by tau); soft-capped, cap tanh(z / cap), when cap (cap / tau) is given."""
    rows, vocab = h.shape[0], w.shape[0]
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        z = mm_into(rows_impl.tile(buf, r1 - r0, vocab), h[r0:r1], w.T, alpha=inv_temp)
        if b is not None:
            z.add_(b)
        if cap is not None:
            soft_cap_(z, cap)
        yield r0, r1, targets[r0:r1], z


class HeadGrad:
    """A fold's dW = sum over row chunks of dz^T h (h: every row's GEMM operand), kept one way
    of four, by what it holds besides dW:

    - direct (nothing): the rows are one chunk, and rows_impl has a GEMM that rounds its fp32
      sum once into a bf16 dW (fold_rows_triton.gemm_rounded).
    - stored dz ([N, V] in dz's dtype: bf16 on GPUs): each chunk's dz is kept, and dW is one
      GEMM over all rows at the end (gemm_rounded: fp32 accumulation, one rounding).
      GOPD_DW_SUM=auto (the default), where rows_impl has that GEMM and the store holds no
      more than the fp32 sum below (N x 2 <= D x 4 bytes for a bf16 dz: N <= 2D): it also
      spares that sum's read and write of [V, D] fp32 per chunk, and its rounding step. Not
      on the torch rows, which have no rounding GEMM: there it measured as a trade (AMD VM,
      dense fold, bf16 head, N = 512, D = 1024, V = 151936, an fp32 store and fp32 blocks of
      dW, benchmarks.stages --sweep GOPD_DW_SUM in one process: 1859 MiB and 4.73-4.81 s
      stored, 2093 MiB and 4.55-4.58 s summed; 11 % less memory for 4-6 % more time).
    - pair (a bf16 remainder [V, D]): GOPD_DW_SUM=pair (backend.dw_sum), where rows_impl has
      the Triton matmul that keeps it (fold_rows_triton.gemm_pair): 4 bytes an element
      instead of fp32's 4 and its rounded copy's 2.
    - fp32 sum (acc [V, D]; GOPD_DW_SUM=float32, or auto where no store): added to by each
      chunk's GEMM, rounded into dW at the end; the first chunk's GEMM writes it (a zero fill
      first is one more pass over an fp32 [V, D], 2 % of gopd_dense_loss at N = 512,
      D = 1024, V = 151936 on the Intel VM).

    fp32 heads sum into dW itself (acc is their dtype)."""

    def __init__(
        self,
        weight: torch.Tensor,
        h: torch.Tensor,
        w_dtype: torch.dtype,
        acc: torch.dtype,
        chunk: int,
        rows_impl,
    ):
        rows, vocab = h.shape[0], weight.shape[0]
        one_chunk = chunk >= rows
        mode = dw_sum(weight) if not one_chunk else "float32"  # dw_sum: "pair" only for bf16 heads
        pair = mode == "pair"
        if pair and not hasattr(rows_impl, "gemm_pair"):
            warn_once("GOPD_DW_SUM=pair needs the Triton matmul; the torch backend's folds sum dW in float32")
            pair = False
        # bf16 only: an fp16 dz comes scaled, its alpha taken out by torch's GEMMs (add)
        rounds = weight.dtype == torch.bfloat16 and hasattr(rows_impl, "gemm_rounded")
        dz_dtype = tile_dtype(w_dtype)  # what rows_impl writes dz in: bf16 (GPUs), fp32 (CPU upcast)
        store = mode == "auto" and rounds and rows * dz_dtype.itemsize <= h.shape[1] * 4
        own = rounds and (one_chunk or pair or store)  # dW written in its own dtype
        self.dw = torch.empty(weight.shape, dtype=weight.dtype if own else acc, device=weight.device)
        self.lo = torch.empty_like(self.dw) if pair else None
        self.store = torch.empty(rows, vocab, dtype=dz_dtype, device=weight.device) if store else None
        self.filled: list[tuple[int, int]] = []
        self.h, self.rows_impl, self.written = h, rows_impl, False

    def add(self, dz: torch.Tensor, rows: tuple[int, int], alpha: float = 1.0) -> None:
        """dW += alpha dz^T h[rows] (alpha: scaled_operand's; 1 wherever the Triton GEMMs run
        and for a stored dz)."""
        r0, r1 = rows
        if self.store is not None:
            self.store[r0:r1] = dz
            self.filled.append(rows)
        elif self.lo is not None:
            self.rows_impl.gemm_pair(dz.T, self.h[r0:r1], self.dw, self.lo, accumulate=self.written)
        elif self.dw.dtype not in (torch.float32, torch.float64):  # one chunk, direct
            self.rows_impl.gemm_rounded(dz.T, self.h[r0:r1], self.dw)
        else:
            (mm_add if self.written else mm_into)(self.dw, dz.T, self.h[r0:r1], alpha)
        self.written = True

    def result(self) -> torch.Tensor:
        """dW; zeros when no chunk had a gradient. A pair's remainder is dropped: dW is its sum
        rounded."""
        self.lo = None
        if not self.written:
            return self.dw.zero_()
        if self.store is not None:
            self._from_store()
        return self.dw

    def _from_store(self) -> None:
        store, self.store = self.store, None
        unfilled = torch.ones(store.shape[0], dtype=torch.bool)
        for r0, r1 in self.filled:
            unfilled[r0:r1] = False
        if unfilled.any():  # chunks whose loss did not depend on their log-probs
            store[unfilled.to(store.device)] = 0
        self.rows_impl.gemm_rounded(store.T, self.h, self.dw)


class HiddenGrad:
    """A fold's dH: each chunk's rows are complete in its one GEMM (dz spans the vocabulary),
    so they are rounded into dH's own dtype at once, through an fp32 [chunk, D] scratch where
    the GEMM's dtype differs: never an fp32 [N, D] beside the result (2 GB at N = 131072,
    D = 4096, bf16). The same rounding as a cast at the end: bit-identical."""

    def __init__(self, hidden: torch.Tensor, acc: torch.dtype, chunk: int):
        rows, dim = hidden.shape
        # zeros: the rows of chunks without a gradient
        self.dh = torch.zeros(rows, dim, dtype=hidden.dtype, device=hidden.device)
        own = hidden.dtype == acc
        self.scratch = None if own else torch.empty(min(chunk, rows), dim, dtype=acc, device=hidden.device)

    def write(self, r0: int, r1: int, dz: torch.Tensor, w: torch.Tensor, alpha: float = 1.0) -> None:
        if self.scratch is None:
            mm_into(self.dh[r0:r1], dz, w, alpha)
        else:
            self.dh[r0:r1] = mm_into(self.scratch[: r1 - r0], dz, w, alpha)


def add_chunk_grads(dz, h, w, rows: tuple[int, int], dh: HiddenGrad | None, dw: HeadGrad | None, db) -> None:
    """One chunk's dL/dz (a GEMM operand, or fp32 for an fp16 one) for rows r0:r1 into a fold's
    gradients: dH[rows] = dz W, dW += dz^T H[rows], db += the column sums of dz (fp32)."""
    r0, r1 = rows
    if db is not None:
        db.add_(dz.sum(dim=0, dtype=db.dtype))
    dz, alpha = scaled_operand(dz, w)  # an fp16 operand's scale, taken out by the GEMMs
    if dh is not None:
        dh.write(r0, r1, dz, w, alpha)
    if dw is not None:
        dw.add(dz, rows, alpha)


def save_folded_grads(ctx, *grads: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
    """Keep a folded loss's gradients, each given as (gradient, its input), in the inputs'
    dtypes for its backward, in the inputs' order: dH is already (HiddenGrad); dW's cast, an
    fp32 and a bf16 [V, D] at once, can be the fold's peak (HeadGrad's pair has none)."""
    ctx.save_for_backward(*(None if g is None else g.to(like.dtype) for g, like in grads))


def scale_saved_grads(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The backward of a folded loss: its saved gradients times the scalar upstream gradient."""
    unit = bool(grad_loss == 1)  # the usual case: no pass over dW
    return tuple(None if g is None else g if unit else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)


class FoldedTokenLoss(torch.autograd.Function):
    """(hidden [M, D], weight [V, D], bias [V] | None, targets [M] valid ids, inv_temp, token_loss)
    -> (loss, logp [M], entropy [M] | None).

    logp is returned detached (for statistics), and with with_entropy the entropy of each
    row's softmax, from the log-softmax's read of its logits (detached: a statistic, not a
    loss term); the loss is differentiable w.r.t. hidden, weight and bias (db = the column
    sums of dL/dz, in fp32 across the chunks). cap: a soft-capped head's cap / tau: each
    chunk's logits are capped in place, and dz taken on to the raw ones by the row work
    (rows_impl.SCRATCH_TILES more tiles for it, as for the entropy: the torch rows' block scratch).
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, inv_temp: float, token_loss: TokenLoss, ws_bytes: int, rows_impl,
        cap=None, with_entropy: bool = False,
    ):  # fmt: skip
        """rows_impl: the module doing each chunk's row work (fold_rows_torch or fold_rows_triton)."""
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        rows, dim = hidden.shape
        vocab = weight.shape[0]
        acc = compute_dtype(hidden.dtype)
        h, w = operand(hidden), operand(weight)
        b = None if bias is None else bias.to(acc) * inv_temp
        chunk = fold_rows(ws_bytes, rows, vocab, acc, row_tiles(rows_impl, 1, cap is not None, with_entropy))
        dh = HiddenGrad(hidden, acc, chunk) if need_dh else None
        dw = HeadGrad(weight, h, w.dtype, acc, chunk, rows_impl) if need_dw else None
        db = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_db else None
        logp = torch.empty(rows, dtype=acc, device=hidden.device)
        entropy = torch.empty_like(logp) if with_entropy else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)

        def fold_chunks() -> None:
            # A function so that the logits tile and every view of it die with its frame, before
            # dH and dW are cast below: a view left in a local kept the tile (1.2 GB at the H100
            # headline shape) alive through the cast.
            buf = torch.empty(chunk * vocab, dtype=acc, device=hidden.device)
            for r0, r1, y, z in logit_chunks(h, w, b, targets, inv_temp, chunk, buf, rows_impl, cap):
                s, state = rows_impl.log_softmax(z, y, cap, None if entropy is None else entropy[r0:r1])
                logp[r0:r1] = s
                with torch.enable_grad():
                    s_leaf = s.detach().requires_grad_(need_dh or need_dw or need_db)
                    part = token_loss(s_leaf, r0, r1)
                loss.add_(part.detach().to(acc))
                if not part.requires_grad:  # no gradient wanted, or this chunk's loss does not depend on s
                    continue
                (c,) = torch.autograd.grad(part, s_leaf)
                c = c * inv_temp  # through z = raw logits * inv_temp
                # c (1[v = y] - p), a GEMM operand
                dz = rows_impl.logit_grads(z, y, state, c.to(acc), w.dtype, cap)
                add_chunk_grads(dz, h, w, (r0, r1), dh, dw, db)
                del dz  # a view of the chunk (Triton rows) or a bf16 copy (torch rows): gone before the next

        fold_chunks()
        dh = None if dh is None else dh.dh  # its fp32 scratch gone before dW's cast
        save_folded_grads(ctx, (dh, hidden), (None if dw is None else dw.result(), weight), (db, bias))
        ctx.mark_non_differentiable(*(t for t in (logp, entropy) if t is not None))
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        return *scale_saved_grads(ctx, grad_loss), None, None, None, None, None, None, None
