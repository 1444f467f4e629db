"""Dense (full-vocabulary) G-OPD in plain PyTorch: the chunked twin of dense_kl_triton.

At every position the loss is KL(p_s || q) with q proportional to p_T^lam p_R^(1 - lam),
all at temperature tau. With a = z_s / tau and c = (lam z_T + (1 - lam) z_R) / tau (the
teacher's and reference's own normalisers fold into q's; each model's 1 / tau is its own
entry of inv_temps, s_k / tau for a model that multiplies its logits by s_k):

    KL = E_ps[a - c] - lse(a) + lse(c)
    dKL/da_v = p_s,v ((a_v - lse(a)) - (c_v - lse(c)) - KL)

Only the student gets gradients. Tiles of a, c (and the teacher's own logits when the
KL to the teacher is asked for) stream over the vocabulary as in linear_logsoftmax_torch.
A head is (hidden [M, D_k], weight [V, D_k], bias [V] | None); D may differ between the
three models.

With gradients, gopd_dense_loss runs folded_dense_kl_torch on this backend instead (the
logits once, not twice); the backward here stays the twin of the Triton kernels' and is
checked against that folded path in the tests.
"""

from __future__ import annotations

import torch

from gopd_kernels.ops.dense_kl import NO_CAPS, Caps, InvTemps, head_tiles
from gopd_kernels.ops.linear_logsoftmax_torch import (
    TileWorkspace,
    _chunks,
    accumulate_head_grads,
    cap_grad,
    logits_tile,
    tile_shape,
)
from gopd_kernels.ops.matmul_torch import compute_dtype, mm_add, mm_into, operand
from gopd_kernels.ops.vocab_partials import merge_dense_kl_partials

Head = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _target_tile(
    out, teacher: Head, ref: Head | None, lam: float, inv_temps: InvTemps, caps: Caps = NO_CAPS, scratch=None
) -> torch.Tensor:
    """out <- c = (lam z_T + (1 - lam) z_R) / tau; heads already sliced to the tile, their
    biases already divided by tau (scaled_heads). A soft-capped teacher's or reference's tile
    is capped before it is weighted (caps; the reference's through `scratch`, a tile-sized
    buffer)."""
    ht, wt, bt = teacher
    lam_t = lam if ref is not None else 1.0
    if caps[1] is None:
        mm_into(out, ht, wt.T, alpha=lam_t * inv_temps[1])
        if bt is not None:
            out.add_(bt, alpha=lam_t)
    else:
        logits_tile(out, ht, wt, inv_temps[1], bt, cap=caps[1]).mul_(lam_t)
    if ref is not None and lam != 1.0:
        add_ref_logits(out, ref, lam, inv_temps[2], caps[2], scratch)
    return out


def add_ref_logits(
    out: torch.Tensor, ref: Head, lam: float, inv_temp: float, cap: float | None = None, scratch=None
) -> torch.Tensor:
    """out += (1 - lam) z_R / tau, the reference's share of c (its bias already divided by tau);
    a soft-capped reference's tile is capped in `scratch` first."""
    if cap is not None:
        return out.add_(logits_tile(scratch, ref[0], ref[1], inv_temp, ref[2], cap=cap), alpha=1.0 - lam)
    mm_add(out, ref[0], ref[1].T, alpha=(1.0 - lam) * inv_temp)
    if ref[2] is not None:
        out.add_(ref[2], alpha=1.0 - lam)
    return out


def scaled_heads(heads, inv_temps: InvTemps, acc: torch.dtype) -> list[Head | None]:
    """Each head with its hidden states as a GEMM operand and its bias in acc, divided by its tau."""
    scale = lambda b, inv_temp: None if b is None else b.to(acc) * inv_temp  # noqa: E731
    return [
        None if hd is None else (operand(hd[0]), hd[1], scale(hd[2], inv_temp))
        for hd, inv_temp in zip(heads, inv_temps, strict=True)
    ]


def _lse_partials(z: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum exp(z - max)) per row; scratch is left holding exp(z - max)."""
    m = z.amax(dim=1)
    return m, torch.sub(z, m[:, None], out=scratch).exp_().sum(dim=1)


def forward(
    student: Head,
    teacher: Head,
    ref: Head | None,
    lam: float,
    inv_temps: InvTemps,
    with_teacher_kl: bool,
    workspace_bytes: int,
    merge=merge_dense_kl_partials,
    caps: Caps = NO_CAPS,
):
    """-> (kl, lse_a, lse_c, kl_to_teacher | None), each [M], from the vocabulary slices'
    partials by `merge` (a vocabulary-parallel head's merges over its ranks too). caps: the
    three heads' soft-caps / tau (None: not capped)."""
    rows, vocab = student[0].shape[0], student[1].shape[0]
    acc = compute_dtype(student[0].dtype)
    live = 4 if with_teacher_kl else 3
    row_chunk, vocab_chunk = tile_shape(rows, vocab, workspace_bytes, student[0].dtype, live)
    heads = scaled_heads((student, teacher, ref), inv_temps, acc)
    n_slices = -(-vocab // vocab_chunk)
    new = lambda: torch.empty(n_slices, rows, dtype=acc, device=student[0].device)
    ma, sa, u, mc, sc = new(), new(), new(), new(), new()
    mt, st, ut = (new(), new(), new()) if with_teacher_kl else (None, None, None)
    buf = TileWorkspace(row_chunk, vocab_chunk, acc, student[0].device, live=live)
    for k, (c0, c1) in enumerate(_chunks(vocab, vocab_chunk)):
        for r0, r1 in _chunks(rows, row_chunk):
            (hs, ws, bs), tch, rf = head_tiles(heads, slice(r0, r1), slice(c0, c1), operand)
            tiles = buf.tiles(r1 - r0, c1 - c0)
            a = logits_tile(tiles[0], hs, ws, inv_temps[0], bs, cap=caps[0])
            if with_teacher_kl:  # the teacher's own logits first, then c from them
                zt = _target_tile(tiles[3], tch, None, 1.0, inv_temps, caps)
                mt[k, r0:r1], st[k, r0:r1] = _lse_partials(zt, tiles[2])
                c = torch.mul(zt, lam, out=tiles[1])
                if lam != 1.0:
                    add_ref_logits(c, rf, lam, inv_temps[2], caps[2], tiles[2])
            else:
                c = _target_tile(tiles[1], tch, rf, lam, inv_temps, caps, tiles[2])
            mc[k, r0:r1], sc[k, r0:r1] = _lse_partials(c, tiles[2])
            ma[k, r0:r1], sa[k, r0:r1] = _lse_partials(a, tiles[2])
            e = tiles[2]  # exp(a - m_a), left there by the last _lse_partials
            u[k, r0:r1] = torch.sub(a, c, out=c).mul_(e).sum(dim=1)
            if with_teacher_kl:
                ut[k, r0:r1] = torch.sub(a, zt, out=zt).mul_(e).sum(dim=1)
    return merge((ma, sa, u), (mc, sc), (mt, st, ut) if with_teacher_kl else None)


def backward(
    student: Head,
    teacher: Head,
    ref: Head | None,
    lam: float,
    inv_temps: InvTemps,
    lse_a: torch.Tensor,
    lse_c: torch.Tensor,
    kl: torch.Tensor,
    grad_kl: torch.Tensor,
    needs: tuple[bool, bool, bool],
    workspace_bytes: int,
    dh_dtype: torch.dtype | None = None,
    caps: Caps = NO_CAPS,
):
    """Gradients (d student hidden, d student weight, d student bias) for a per-position
    upstream grad_kl; d student hidden in dh_dtype when given (as linear_logsoftmax_torch's).
    A soft-capped student's dL/da is taken through its cap: times 1 - (a / cap)^2."""
    need_dh, need_dw, need_db = needs
    rows, dim = student[0].shape
    vocab = student[1].shape[0]
    acc = compute_dtype(student[0].dtype)
    live = 3 if caps[0] is None else 4  # and da/dz
    row_chunk, vocab_chunk = tile_shape(rows, vocab, workspace_bytes, student[0].dtype, live)
    heads = scaled_heads((student, teacher, ref), inv_temps, acc)
    g = grad_kl.to(acc) * inv_temps[0]  # d/d(raw logits) = d/da / tau
    like = dict(dtype=acc, device=student[0].device)
    dh = torch.zeros(rows, dim, **like) if need_dh else None
    dw = torch.empty(vocab, dim, **like) if need_dw else None
    db = torch.zeros(vocab, **like) if need_db else None
    buf = TileWorkspace(row_chunk, vocab_chunk, acc, student[0].device, live=live)
    for c0, c1 in _chunks(vocab, vocab_chunk):
        for r0, r1 in _chunks(rows, row_chunk):
            (hs, ws, bs), tch, rf = head_tiles(heads, slice(r0, r1), slice(c0, c1), operand)
            tiles = buf.tiles(r1 - r0, c1 - c0)
            log_p = logits_tile(tiles[0], hs, ws, inv_temps[0], bs, cap=caps[0])
            da_dz = None if caps[0] is None else cap_grad(log_p, caps[0], tiles[3])
            log_p.sub_(lse_a[r0:r1, None])
            log_q = _target_tile(tiles[1], tch, rf, lam, inv_temps, caps, tiles[2]).sub_(lse_c[r0:r1, None])
            p = torch.exp(log_p, out=tiles[2])
            dz = log_p.sub_(log_q).sub_(kl[r0:r1, None]).mul_(p).mul_(g[r0:r1, None])
            if da_dz is not None:
                dz.mul_(da_dz)
            accumulate_head_grads(dz, hs, ws, dh, dw, (r0, r1), (c0, c1), db)
    cast = lambda grad, dtype: None if grad is None else grad.to(dtype)  # noqa: E731
    return cast(dh, dh_dtype or student[0].dtype), cast(dw, student[1].dtype), cast(db, student[1].dtype)
