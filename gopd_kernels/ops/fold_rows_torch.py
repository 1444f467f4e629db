"""The row work of the folded losses in PyTorch (any device): see fold_rows_triton for the math.

Same contract as fold_rows_triton: tile(flat, rows, V) -> a chunk's [rows, V] tile,
log_softmax(z, y, cap, entropy) -> (s, state), then
logit_grads(z, y, state, c, dtype, cap) -> dz; lse(z, scratch) and dense_kl(...) for the dense
fold. Both consume z in logit_grads. Here they work in place on the fp32 tiles (after
log_softmax, z holds exp(z - max), unless capped, and state is its row sums; lse leaves
exp(z - max) in scratch; dense_kl overwrites all its tiles), and dz is cast to `dtype`, the GEMM
operand's (matmul_torch.tile_dtype: fp32 for fp16, scaled into fp16 at the GEMM), at the end.
"""

from __future__ import annotations

import torch

from gopd_kernels.ops.dense_kl_torch import _lse_partials
from gopd_kernels.ops.linear_logsoftmax_torch import cap_grad
from gopd_kernels.ops.matmul_torch import tile_dtype
from gopd_kernels.ops.vocab_partials import merge_vocab_partials

# Soft-capped logits: the gradient's 1 - (z / cap)^2 needs each logit z beside exp(z - m).
# logit_grads and dense_kl then take the exponentials a column block at a time through a
# scratch of 1 / CAP_BLOCKS of a tile (the SCRATCH_TILES the folds budget), rather than hold a
# second tile (which halved the chunk) or read z back from exp(z - m) by a log pass: measured
# on the AMD VM (gopd_loss, N = 2048, D = 1024, V = 151936, fp32), that log took 0.95 s and
# the halved chunk's GEMMs 0.9 s more of a 12.1 s step (under the profiler). The entropy needs
# exp(z - m) beside z - m likewise, and takes the same scratch.
CAP_BLOCKS = 8
SCRATCH_TILES = 1 / CAP_BLOCKS


def tile(flat: torch.Tensor, rows: int, vocab: int) -> torch.Tensor:
    """A chunk's [rows, V] logit tile over the first rows * V elements of `flat`. Column-major on
    CPUs: the logits GEMM writes a [V, rows] block faster (AMD VM, D = 1024, V = 151936, 256
    rows: 1.3-1.9 s against 2.0-2.3 s per 512 rows; gopd_dense_loss at lam = 1.25, N = 512:
    9.0-9.9 s against 10.3-11.0 s a step), and the row work and the gradient GEMMs take it as
    fast. Row-major elsewhere (not measured on a GPU)."""
    if flat.device.type == "cpu":
        return flat[: rows * vocab].view(vocab, rows).T
    return flat[: rows * vocab].view(rows, vocab)


def log_softmax(
    z: torch.Tensor, targets: torch.Tensor, cap: float | None = None, entropy: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple]:
    """(s, state): state = (sum exp(z - m), m, z_y) per row; z then holds exp(z - m), or, for
    soft-capped logits (cap), z itself (logit_grads reads both). entropy: a [rows] buffer
    given to receive each row's entropy H = lse - E_p[z] (of the capped logits when capped)."""
    z_y = z.gather(1, targets[:, None]).squeeze(1)
    m = z.amax(dim=1)
    if cap is None and entropy is None:  # in place, no blocks: the tile now holds exp(z - m)
        sum_e = z.sub_(m[:, None]).exp_().sum(dim=1)
    elif cap is None:  # the same, a block at a time: each e = exp(z - m) dotted with z - m first
        sum_e, centred = _exp_in_place(z.sub_(m[:, None]), _block_scratch(z))
        entropy.copy_(_entropy(m, sum_e, centred, z_y))
    else:  # z stays (logit_grads reads it): e from _exp_blocks, sum e z less m sum e (|z| <= cap / tau)
        sums = [(e.sum(dim=1), None if entropy is None else _row_dot(e, z[:, cols]))
                for cols, e in _exp_blocks(z, m, _block_scratch(z))]  # fmt: skip
        sum_e = sum(s for s, _ in sums)
        if entropy is not None:
            entropy.copy_(_entropy(m, sum_e, sum(t for _, t in sums) - m * sum_e, z_y))
    return z_y - m - sum_e.log(), (sum_e, m, z_y)


def _entropy(m: torch.Tensor, sum_e: torch.Tensor, centred: torch.Tensor, z_y: torch.Tensor) -> torch.Tensor:
    """H = lse - E_p[z] per row from the row's partials, m, S = sum e and sum e (z - m): those of
    one vocabulary slice, merged as every other path merges them (vocab_partials)."""
    return merge_vocab_partials(m[None], sum_e[None], centred[None], z_y[None])[2]


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a_v b_v per row, with no [rows, V] product held."""
    return torch.einsum("rv,rv->r", a, b)


def _exp_in_place(u: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u = z - m -> exp(u), in place a column block at a time through `scratch`; returns
    (sum e, sum e u) per row. log_softmax of a [512, 151936] fp32 tile so (AMD VM): 0.23-0.24 s,
    against 0.10-0.12 s in place without the entropy and 0.27 s through _exp_blocks."""
    width = scratch.shape[1]
    sum_e, centred = torch.zeros(2, u.shape[0], dtype=u.dtype, device=u.device)
    for c0 in range(0, u.shape[1], width):
        block = u[:, c0 : c0 + width]
        e = torch.exp(block, out=scratch[:, : block.shape[1]])
        sum_e += e.sum(dim=1)
        centred += _row_dot(block, e)
        block.copy_(e)
    return sum_e, centred


def _block_scratch(z: torch.Tensor) -> torch.Tensor:
    """[rows, ceil(V / CAP_BLOCKS)] in z's layout (tile): where _exp_blocks writes each block's
    exponentials."""
    return torch.empty_like(z[:, : -(-z.shape[1] // CAP_BLOCKS)])


def _exp_blocks(z: torch.Tensor, m: torch.Tensor, scratch: torch.Tensor):
    """(columns, exp(z[:, columns] - m)) over the column blocks of z, each exponential in
    `scratch` (_block_scratch(z); valid until the next block)."""
    width = scratch.shape[1]
    for c0 in range(0, z.shape[1], width):
        cols = slice(c0, min(c0 + width, z.shape[1]))
        yield cols, torch.sub(z[:, cols], m[:, None], out=scratch[:, : cols.stop - c0]).exp_()


def logit_grads(
    z: torch.Tensor,
    targets: torch.Tensor,
    state: tuple,
    c: torch.Tensor,
    dtype: torch.dtype,
    cap: float | None = None,
) -> torch.Tensor:
    """c (1[v = y] - p) from z = exp(z - m) (log_softmax's); for soft-capped logits (cap) times
    1 - (z / cap)^2 from z itself (log_softmax leaves it), a column block at a time."""
    sum_e, m, z_y = state
    minus_c_over_sum = (-c / sum_e)[:, None]
    if cap is None:
        dz = z.mul_(minus_c_over_sum).scatter_add_(1, targets[:, None], c[:, None])  # c (1[v = y] - p)
        return dz.to(tile_dtype(dtype))
    for cols, e in _exp_blocks(z, m, _block_scratch(z)):
        block = z[:, cols]
        cap_grad(block, cap, out=block).clamp_(min=0.0).mul_(e).mul_(minus_c_over_sum)
    target_grad = c * cap_grad(z_y, cap)
    return z.scatter_add_(1, targets[:, None], target_grad[:, None]).to(tile_dtype(dtype))


def lse(z: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    m, sum_e = _lse_partials(z, scratch)
    return m + sum_e.log()


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
    """cap: a holds a soft-capped student's logits; dz is taken on to the raw ones, times
    1 - (a / cap)^2 (_capped_dense_kl)."""
    if cap is not None and coef is not None:
        return _capped_dense_kl(a, c, z_t, lse_c, lse_t, coef, dtype, cap)
    m_a = a.amax(dim=1)
    diff = torch.sub(a, c, out=c)  # a - c
    if z_t is not None:
        torch.sub(a, z_t, out=z_t)  # a - z_T
    e = a.sub_(m_a[:, None]).exp_()  # p_s * s_a
    s_a = e.sum(dim=1)
    u_sum = diff.mul_(e).sum(dim=1)  # the tile c now holds e (a - c)
    ut_sum = None if z_t is None else z_t.mul_(e).sum(dim=1)
    u, kl, kl_t = _row_kls(m_a, s_a, u_sum, ut_sum, lse_c, lse_t)
    if coef is None:
        return kl, kl_t, None
    dz = diff.addcmul_(e, -u[:, None]).mul_((coef / s_a)[:, None])  # e (a - c - u) coef / s_a
    return kl, kl_t, dz.to(tile_dtype(dtype))


def _row_kls(m_a, s_a, u_sum, ut_sum, lse_c, lse_t):
    """(E_ps[a - c], KL(p_s || q), KL(p_s || p_T) or None) per row from the row sums of
    e = exp(a - m_a) (s_a), e (a - c) (u_sum) and e (a - z_T) (ut_sum, None: not wanted)."""
    lse_a = m_a + s_a.log()
    u = u_sum.div_(s_a)
    kl = (u - lse_a + lse_c).clamp_(min=0.0)
    kl_t = None if ut_sum is None else (ut_sum.div_(s_a) - lse_a + lse_t).clamp_(min=0.0)
    return u, kl, kl_t


def _capped_dense_kl(a, c, z_t, lse_c, lse_t, coef, dtype, cap):
    """dense_kl's rows for a soft-capped student, a kept (its 1 - (a / cap)^2 is read last):
    two passes of column blocks, each taking e = exp(a - m_a) into the block scratch, the
    first for the row sums, the second for dz (written over c)."""
    m_a, scratch = a.amax(dim=1), _block_scratch(a)  # one scratch for both passes
    s_a, u = torch.zeros_like(m_a), torch.zeros_like(m_a)
    u_t = None if z_t is None else torch.zeros_like(m_a)
    for cols, e in _exp_blocks(a, m_a, scratch):
        s_a += e.sum(dim=1)
        u += torch.sub(a[:, cols], c[:, cols], out=c[:, cols]).mul_(e).sum(dim=1)  # c now holds e (a - c)
        if z_t is not None:
            u_t += torch.sub(a[:, cols], z_t[:, cols], out=z_t[:, cols]).mul_(e).sum(dim=1)
    u, kl, kl_t = _row_kls(m_a, s_a, u, u_t, lse_c, lse_t)
    scale = (coef / s_a)[:, None]
    for cols, e in _exp_blocks(a, m_a, scratch):  # e (a - c - u) coef / s_a (1 - (a / cap)^2)
        block = a[:, cols]
        c[:, cols].addcmul_(e, -u[:, None]).mul_(scale).mul_(cap_grad(block, cap, out=block))
    return kl, kl_t, c.to(tile_dtype(dtype))
