"""gopd_kernels: fused, memory-safe ops for Generalized On-Policy Distillation.

Per-token log-probs of sampled tokens straight from final hidden states and the LM-head
weight, never materialising the [tokens, vocab] logits; Triton kernels on GPUs and a
chunked PyTorch twin everywhere else.
"""

from gopd_kernels.functional import token_logprobs
from gopd_kernels.reference import token_logprobs_reference

__all__ = ["token_logprobs", "token_logprobs_reference"]
