"""token_logprobs with a frozen head: each row's gradient direction, from full-vocabulary rows.

When only the hidden states want a gradient (a frozen LM head, LoRA) and no entropy is
returned, the gradient of s_t = log softmax(z_t)[y_t], z_t = (h_t W^T + b) / tau, is

    ds_t/dh_t = (W_y - E_p[W]) / tau = sum_v (1[v = y_t] - p_tv) / tau W_v      (x_t, [D])

and does not depend on the upstream gradient g_t: the backward is dh_t = g_t x_t, a
scaling with no logits and no GEMM. Each chunk of rows takes its fp32 logits (one GEMM),
the row passes of a fold_rows module (log-softmax, then dz = c (1[v = y] - p) with
c = 1 / tau, in the GEMM operand's dtype), and x = dz W (a second GEMM): 2 GEMMs of 2NDV
FLOP in all, as autograd through materialised logits does (forward and dH), where the
recomputing backward takes 3.

This is the GPU's way (cuBLAS GEMMs and fold_rows_triton's two fused passes, as in
gopd_loss's fold). The torch backend computes the same x in tiles instead, with an online
E_p[W] over vocabulary chunks (linear_logsoftmax_torch.frozen_head_forward), leaner and
faster on CPUs: at N = 2048, D = 1024, V = 151936, fp32 (Intel VM, 3 calls each) this
module with fold_rows_torch took 3.73-3.80 s, the tiles 3.05-3.22 s (the recomputing
backward 4.64-4.78 s).
"""

from __future__ import annotations

import torch

from gopd_kernels.ops.folded_loss_torch import fold_rows, logit_chunks, row_tiles
from gopd_kernels.ops.matmul_torch import compute_dtype, mm_into, operand, scaled_operand


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temp: float,
    ws_bytes: int,
    rows_impl,
    cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [M, D], weight [V, D], bias [V] | None, targets [M] valid ids ->
    (s [M], lse [M], x = ds/dh [M, D]), in the compute dtype; rows_impl: fold_rows_torch or
    _triton. cap: a soft-capped head's cap / tau (each chunk capped in place; the row work's
    dz taken on to the raw logits, so x = (f'_y W_y - E_p[f' W]) / tau)."""
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    acc = compute_dtype(hidden.dtype)
    h, w = operand(hidden), operand(weight)
    b = None if bias is None else bias.to(acc) * inv_temp
    chunk = fold_rows(ws_bytes, rows, vocab, acc, row_tiles(rows_impl, 1, cap is not None))
    buf = torch.empty(min(chunk, rows) * vocab, dtype=acc, device=hidden.device)
    s = torch.empty(rows, dtype=acc, device=hidden.device)
    lse = torch.empty_like(s)
    x = torch.empty(rows, dim, dtype=acc, device=hidden.device)
    for r0, r1, y, z in logit_chunks(h, w, b, targets, inv_temp, chunk, buf, rows_impl, cap):
        lse[r0:r1] = z.gather(1, y[:, None]).squeeze(1)  # z_y, before the row pass may overwrite z
        s[r0:r1], state = rows_impl.log_softmax(z, y, cap)
        lse[r0:r1] -= s[r0:r1]  # z_y - s
        c = torch.full((r1 - r0,), inv_temp, dtype=acc, device=hidden.device)
        dz = rows_impl.logit_grads(z, y, state, c, w.dtype, cap)  # (1[v = y] - p) / tau, a GEMM operand
        dz, alpha = scaled_operand(dz, w)  # fp16: scaled (fp32 from the torch rows)
        mm_into(x[r0:r1], dz, w, alpha)
        del dz  # a view of the chunk (Triton rows) or a bf16 copy (torch rows): gone before the next
    return s, lse, x
