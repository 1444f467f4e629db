"""Merging log-softmax statistics computed over separate slices of the vocabulary.

Both backends stream the vocabulary in slices (the Triton forward runs slices in parallel
programs, the torch twin in a loop) and leave, for every slice k and token row, with the
slice's logits z = (h . W_v + b_v) / tau:

    m_k  = max_v z_v
    s_k  = sum_v exp(z_v - m_k)
    t_k  = sum_v exp(z_v - m_k) * (z_v - m_k)       (only for the entropy)
    zy_k = z_y if the target y lies in the slice, else 0

Shifting by m_k keeps every term in [0, 1] and t_k small, so the entropy below does not
subtract two large numbers (lse - E[z]) the way the textbook form does.
"""

from __future__ import annotations

import torch


def merge_vocab_partials(
    m: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None, zy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[slices, rows] partials -> (logp, lse, entropy) per row, float32.

    With M = max_k m_k, a_k = exp(m_k - M), S = sum_k a_k s_k and
    T = sum_k a_k (t_k + (m_k - M) s_k):

        lse     = M + log S
        logp    = z_y - lse                (clamped to <= 0 against rounding)
        entropy = lse - E_p[z] = log S - T / S
    """
    m_max = m.amax(dim=0)
    shift = m - m_max
    scale = shift.exp()
    s_total = (scale * s).sum(dim=0)
    lse = m_max + s_total.log()
    logp = (zy.sum(dim=0) - lse).clamp_(max=0.0)
    entropy = None
    if t is not None:
        t_total = (scale * (t + shift * s)).sum(dim=0)
        entropy = (s_total.log() - t_total / s_total).clamp_(min=0.0)
    return logp, lse, entropy
