"""Naive, materialising references: the [N, V] logits in full, then log_softmax.

They define what the fused ops compute. Tests run them in float64 on the same (rounded)
inputs; benchmarks time them as the "naive PyTorch" baseline a user would write.
"""

from __future__ import annotations

import torch


def linear_log_softmax_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log_softmax((hidden @ weight.T + bias) / temperature) over the last dim, [..., V].

    The logits are computed in the inputs' dtype and normalised in float32 (float64 stays
    float64), as a Hugging Face model followed by ``logits.float()`` would do.
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
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
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``gopd_kernels.token_logprobs``, by materialising the logits."""
    logp_all = linear_log_softmax_reference(hidden, weight, bias, temperature)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, torch.where(valid, entropy, torch.zeros_like(entropy))
