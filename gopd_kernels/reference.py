"""Naive, materialising references: the [N, V] logits in full, then log_softmax.

They define what the fused ops compute. Tests run them in float64 on the same (rounded)
inputs; benchmarks time them as the "naive PyTorch" baseline a user would write. The two
error measures at the end are how tests and benchmarks alike compare a result with them.
"""

from __future__ import annotations

import torch


def linear_log_softmax_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
) -> torch.Tensor:
    """log_softmax(z / temperature) over the last dim, [..., V], z = logit_scale * (hidden @
    weight.T + bias), or c tanh(z / c) with c = logit_softcap.

    The logits are computed in the inputs' dtype and normalised in float32 (float64 stays
    float64), as a Hugging Face model followed by ``logits.float()`` would do; the scale and
    the cap are applied to them first, as such a model's forward does (Granite's
    1 / logits_scaling, Gemma 2's final_logit_softcapping).
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if logit_softcap is not None:
        logits = torch.tanh(logits / logit_softcap) * logit_softcap
    if logits.dtype != torch.float64:
        logits = logits.float()
    if temperature != 1.0:  # no extra [N, V] copy when it would change nothing
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``gopd_kernels.token_logprobs``, by materialising the logits."""
    logp_all = linear_log_softmax_reference(hidden, weight, bias, temperature, logit_scale, logit_softcap)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, torch.where(valid, entropy, torch.zeros_like(entropy))


def gopd_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_logp: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    lam: float = 1.0,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    old_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    clip_ratio: tuple[float, float] = (0.2, 0.2),
    is_cap: float | None = None,
    loss_agg: str = "token-mean",
    num_tokens: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """gopd_loss written out naively (materialised logits, explicit per-sequence loops)."""
    s = token_logprobs_reference(
        hidden, weight, targets, bias=bias, temperature=temperature, logit_scale=logit_scale,
        logit_softcap=logit_softcap, ignore_index=ignore_index,
    )  # fmt: skip
    return policy_loss_reference(
        s, targets, teacher_logp, ref_logp, lam=lam, old_logp=old_logp, rollout_logp=rollout_logp,
        clip_ratio=clip_ratio, is_cap=is_cap, loss_agg=loss_agg, num_tokens=num_tokens,
        ignore_index=ignore_index,
    )  # fmt: skip


def policy_loss_reference(
    s: torch.Tensor,
    targets: torch.Tensor,
    teacher_logp: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    *,
    lam: float = 1.0,
    old_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    clip_ratio: tuple[float, float] = (0.2, 0.2),
    is_cap: float | None = None,
    loss_agg: str = "token-mean",
    num_tokens: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """gopd_loss_reference from the student's log-probs s (with their graph) instead of its head:
    for log-probs that come from elsewhere, e.g. a whole model's logits."""
    valid = targets != ignore_index
    o = s.detach() if old_logp is None else old_logp.to(s.dtype)
    teacher = teacher_logp.to(s.dtype)
    ref = teacher * 0 if ref_logp is None else ref_logp.to(s.dtype)  # lam must be 1 without a reference
    adv = (lam * (teacher - ref) - (o - ref)).detach()
    ratio = torch.exp(s - o)
    low, high = clip_ratio
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - low, 1 + high))
    if is_cap is not None:
        loss = loss * torch.clamp(torch.exp(o - rollout_logp.to(s.dtype)), max=is_cap).detach()
    return _aggregate_reference(loss, valid, loss_agg, num_tokens)


def _aggregate_reference(loss, valid, loss_agg, num_tokens):
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if loss_agg == "token-mean":
        # no valid token (a micro-batch of padding): 0, as the ops give, not 0 / 0
        return loss.sum() / (num_tokens if num_tokens is not None else valid.sum().clamp_min(1))
    per_seq = []
    for b in range(loss.shape[0]):
        n = int(valid[b].sum())
        if n:
            total = loss[b].sum()
            per_seq.append(total / n if loss_agg == "seq-mean-token-mean" else total)
    return torch.stack(per_seq).mean() if per_seq else loss.sum() * 0


def gopd_dense_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    lam: float = 1.0,
    temperature: float = 1.0,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    ref_logit_scale: float = 1.0,
    student_logit_softcap: float | None = None,
    teacher_logit_softcap: float | None = None,
    ref_logit_softcap: float | None = None,
    mask: torch.Tensor | None = None,
    loss_agg: str = "token-mean",
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-position KL(p_s || q)) with the three [N, V] log-softmaxes materialised."""
    log_ps = linear_log_softmax_reference(
        student_hidden, student_weight, student_bias, temperature, student_logit_scale, student_logit_softcap
    )
    log_pt = linear_log_softmax_reference(
        teacher_hidden, teacher_weight, teacher_bias, temperature, teacher_logit_scale, teacher_logit_softcap
    ).detach()
    if ref_hidden is None:
        log_q = log_pt
    else:
        log_pr = linear_log_softmax_reference(
            ref_hidden, ref_weight, ref_bias, temperature, ref_logit_scale, ref_logit_softcap
        )
        log_pr = log_pr.detach()
        log_q = torch.log_softmax(lam * log_pt + (1 - lam) * log_pr, dim=-1)
    kl = (log_ps.exp() * (log_ps - log_q)).sum(-1)
    valid = torch.ones(kl.shape, dtype=torch.bool, device=kl.device) if mask is None else mask
    return _aggregate_reference(kl, valid, loss_agg, num_tokens), kl


def _floor(actual: torch.Tensor, entries: int) -> float:
    """The smallest size a reference of `entries` entries is measured against: the smallest
    normal number of actual's dtype per entry. Below it (fp16's subnormals) an entry keeps only
    absolute precision; and a nonzero result against an all-zero reference comes out enormous,
    not as a division by zero."""
    return torch.finfo(actual.dtype).tiny * entries**0.5


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 on the CPU (0 for empty tensors),
    with one temporary the size of `actual` (a dW at D = 4096 is 5 GB in float64)."""
    if not expected.numel():
        return 0.0
    diff = actual.to("cpu", torch.float64, copy=True).sub_(expected.to("cpu", torch.float64))
    max_abs = lambda t: float(torch.linalg.vector_norm(t, float("inf")))  # no |t| temporary
    return max_abs(diff) / max(max_abs(expected), _floor(actual, 1))


def row_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max over rows r of |actual_r - expected_r| / |expected_r| (L2 norms along the last
    dimension; a 0-D or 1-D tensor is one row), in float64 on the CPU (0 for empty tensors).

    For gradients: each token's dH row and each vocabulary row of dW against its own size,
    where rel_err sets every error against the largest entry of all, which the sampled
    tokens' rows of dW hold (it hides an error spread over the rest)."""
    if not expected.numel():
        return 0.0
    a = actual.to("cpu", torch.float64, copy=True)
    e = expected.to("cpu", torch.float64)
    if a.ndim < 2:
        a, e = a.reshape(1, -1), e.reshape(1, -1)
    diff = torch.linalg.vector_norm(a.sub_(e), dim=-1)
    size = torch.linalg.vector_norm(e, dim=-1).clamp_min(_floor(actual, e.shape[-1]))
    return float((diff / size).max())
