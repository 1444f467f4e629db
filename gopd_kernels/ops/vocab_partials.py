"""Merging log-softmax statistics computed over separate slices of the vocabulary.

Both backends stream the vocabulary in slices (the Triton kernels run slices in parallel
programs, the torch twin in a loop) and leave, for every slice k and token row, with the
slice's logits z = (h . W_v + b_v) / tau:

    m_k  = max_v z_v
    s_k  = sum_v exp(z_v - m_k)
    t_k  = sum_v exp(z_v - m_k) * (z_v - m_k)       (only for the entropy)
    zy_k = z_y if the target y lies in the slice, else 0

Shifting by m_k keeps every term in [0, 1] and t_k small, so the entropy below does not
subtract two large numbers (lse - E[z]) the way the textbook form does. Expectations of
other per-column quantities f_v under p (the dense loss) merge the same way:
u_k = sum_v exp(z_v - m_k) f_v.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class MergedLse(NamedTuple):
    lse: torch.Tensor  # M + log S
    log_sum: torch.Tensor  # log S, kept apart: lse - M would lose digits when M is large
    weights: torch.Tensor  # [slices, rows] a_k / S
    shift: torch.Tensor  # [slices, rows] m_k - M


def merge_logsumexp(m: torch.Tensor, s: torch.Tensor) -> MergedLse:
    """[slices, rows] (m, s) -> the row's log-sum-exp and each slice's weight in expectations.

    With M = max_k m_k, a_k = exp(m_k - M) and S = sum_k a_k s_k: lse = M + log S, and a
    slice's sum of exp(z - m_k) f_v enters an expectation under p with weight a_k / S.
    """
    m_max = m.amax(dim=0)
    shift = m - m_max
    scale = shift.exp()
    s_total = (scale * s).sum(dim=0)
    log_sum = s_total.log()
    return MergedLse(m_max + log_sum, log_sum, scale / s_total, shift)


def merge_expectation(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """E_p[f] from per-slice sums u_k = sum_v exp(z_v - m_k) f_v and merge_logsumexp weights."""
    return (weights * u).sum(dim=0)


def merge_vocab_partials(
    m: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None, zy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[slices, rows] partials -> (logp, lse, entropy) per row, float32.

    lse     = M + log S
    logp    = z_y - lse                (clamped to <= 0 against rounding)
    entropy = lse - E_p[z] = log S - E_p[z - M],  E_p[z - M] = sum_k a_k (t_k + (m_k - M) s_k) / S
    """
    merged = merge_logsumexp(m, s)
    logp = (zy.sum(dim=0) - merged.lse).clamp_(max=0.0)
    entropy = None
    if t is not None:
        centred = merge_expectation(merged.weights, t + merged.shift * s)
        entropy = (merged.log_sum - centred).clamp_(min=0.0)
    return logp, merged.lse, entropy


def combine_slices(m: torch.Tensor, s: torch.Tensor, *sums: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[slices, rows] (m, s, u...) -> [1, rows] partials of the slices together, exactly: with
    M = max_k m_k, s = sum_k exp(m_k - M) s_k and each u = sum_k exp(m_k - M) u_k (every u_k
    shifted by the m_k given). A rank's slices before the ranks are merged; ranks may hold
    different numbers of slices."""
    m_max = m.amax(dim=0, keepdim=True)
    scale = (m - m_max).exp()
    return m_max, *((scale * x).sum(dim=0, keepdim=True) for x in (s, *sums))


def merge_vocab_shards(
    lse: torch.Tensor, zy: torch.Tensor, entropy: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[shards, rows] statistics of whole vocabulary shards -> (logp, lse, entropy|None) per row.

    Shard r's own log-softmax gives lse_r, H_r (the entropy of its softmax) and zy_r (z_y if
    y lies in r, else 0). With weights w_r = exp(lse_r - lse), the shard's share of p:

        lse     = log sum_r exp lse_r
        logp    = sum_r zy_r - lse                       (clamped to <= 0)
        entropy = sum_r w_r (H_r - log w_r)              (a mixture's entropy; >= 0)

    The vocabulary-parallel heads' merge (ops/vocab_parallel.py); no large terms cancel.
    """
    merged = merge_logsumexp(lse, torch.ones_like(lse))
    logp = (zy.sum(dim=0) - merged.lse).clamp_(max=0.0)
    merged_entropy = None
    if entropy is not None:
        log_w = merged.shift - merged.log_sum
        merged_entropy = merge_expectation(merged.weights, entropy - log_w).clamp_(min=0.0)
    return logp, merged.lse, merged_entropy


def merge_dense_kl_partials(
    student: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    target: tuple[torch.Tensor, torch.Tensor],
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dense G-OPD statistics per row from [slices, rows] partials.

    student = (m_a, s_a, u) with u_k = sum_v exp(a_v - m_k) (a_v - c_v): a the student's
    logits, c = lam z_T + (1 - lam) z_R the unnormalised log of the target q; target =
    (m_c, s_c); teacher (optional) = (m_T, s_T, u_T) with u_T using a_v - z_T,v instead.

        KL(p_s || q) = E_ps[a - c] - lse_a + lse_c          (clamped to >= 0)

    Returns (kl, lse_a, lse_c, kl_to_teacher | None).
    """
    m_a, s_a, u = student
    merged = merge_logsumexp(m_a, s_a)
    lse_c = merge_logsumexp(*target).lse
    kl = (merge_expectation(merged.weights, u) - merged.lse + lse_c).clamp_(min=0.0)
    kl_teacher = None
    if teacher is not None:
        m_t, s_t, u_t = teacher
        lse_t = merge_logsumexp(m_t, s_t).lse
        kl_teacher = (merge_expectation(merged.weights, u_t) - merged.lse + lse_t).clamp_(min=0.0)
    return kl, merged.lse, lse_c, kl_teacher
