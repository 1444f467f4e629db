"""gopd_kernels: fused, memory-safe ops for Generalized On-Policy Distillation.

Per-token log-probs of sampled tokens straight from final hidden states and the LM-head
weight, never materialising the [tokens, vocab] logits; Triton kernels on GPUs and a
chunked PyTorch twin everywhere else.
"""

from gopd_kernels.functional import token_logprobs
from gopd_kernels.hf import sequence_logprobs
from gopd_kernels.losses import (
    aggregate_token_losses,
    gopd_advantage,
    gopd_dense_loss,
    gopd_loss,
    token_logprob_loss,
)
from gopd_kernels.reference import token_logprobs_reference
from gopd_kernels.scoring import FrozenScores, frozen_logprobs

__all__ = [
    "FrozenScores",
    "aggregate_token_losses",
    "frozen_logprobs",
    "gopd_advantage",
    "gopd_dense_loss",
    "gopd_loss",
    "sequence_logprobs",
    "token_logprob_loss",
    "token_logprobs",
    "token_logprobs_reference",
]
