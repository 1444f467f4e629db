"""Public ops: thin checks and reshaping around the autograd functions in ``ops/``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gopd_kernels.backend import resolve_backend
from gopd_kernels.ops.token_logprobs import LinearTokenLogprobs, folds_frozen_head
from gopd_kernels.ops.vocab_parallel import local_head, vocab_shard
from gopd_kernels.selection import RowSelection
from gopd_kernels.validation import check_backend_dtype, check_flag, check_token_inputs, logit_cap

if TYPE_CHECKING:  # annotations only: torch.distributed is missing from some torch builds
    from torch.distributed import ProcessGroup


# torch.compile runs the op as it is, one graph break: tracing into its checks, row selection
# and kernel launches would break the graph at each data-dependent step, each with a warning
@torch.compiler.disable
def token_logprobs(
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
    backend: str = "auto",
    fold: bool | None = None,
    vocab_group: ProcessGroup | None = None,
    reduce_hidden_grad: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token, straight from hidden states and the LM head.

    Computes ``log_softmax(logit_scale * (hidden @ weight.T + bias) / temperature)[..., targets]`` without
    ever holding the [tokens, V] logits: extra memory is O(N*D + V*D) plus a bounded tile
    workspace, in the forward and in the backward.

    Args:
        hidden: [..., D] final hidden states (float32, bfloat16 or float16).
        weight: [V, D] LM-head weight, same dtype as ``hidden``.
        targets: [...] integer token ids, the leading shape of ``hidden``; each in [0, V)
            or equal to ``ignore_index``.
        bias: optional [V] LM-head bias, same dtype.
        temperature: tau > 0; the distribution is softmax(logits / tau), as in sampling.
        logit_scale: s > 0, a multiplier the model applies to its head's output before
            sampling (Granite divides by ``logits_scaling``, Cohere multiplies by
            ``logit_scale``): logits = s (h W^T + b). gopd_kernels.hf.head_logits reads a
            transformers model's, checked against its forward.
        logit_softcap: c > 0 for a model that soft-caps its logits, c tanh(s (h W^T + b) / c)
            (Gemma 2's ``final_logit_softcapping``), before the temperature; None: no cap. A
            soft-capped frozen head folds too: x = (f'_y W_y - E_p[f' W]) / tau,
            f' = 1 - (a / cap)^2 of the capped logits a.
        ignore_index: positions with this target get log-prob 0.0 (and entropy 0.0), no
            gradient, and no compute (they are removed before the kernels run).
        return_entropy: also return the entropy of softmax(logits / tau) per position.
        backend: "triton", "torch" or "auto" (see ``gopd_kernels.backend``).
        fold: for a frozen head only (``hidden`` requires grad; ``weight`` and ``bias`` do
            not; no entropy): compute each log-prob's gradient w.r.t. its hidden state,
            (W_y - E_p[W]) / tau, in the forward, so that the backward is a scaling with no
            GEMM (2 GEMMs in all, as through materialised logits, instead of 3), for an
            [N, D] float32 kept until the backward. The torch backend does it in tiles, the
            Triton backend over row chunks of full-vocabulary fp32 logits (cuBLAS GEMMs,
            fused row passes, as gopd_loss's fold). None: fold on the torch backend, and on
            Triton for bf16 heads; True: fold (an error for a head that is trained, or with
            the entropy); False: never.
        vocab_group: a vocabulary-parallel (tensor-parallel) head: ``weight`` and ``bias`` hold
            this rank's rows of the whole head (rank r of the group rows [start_r, start_r + V_r),
            in rank order; shards may differ in size), while ``hidden`` and ``targets`` (ids of
            the whole vocabulary) are the same on every rank. Each rank streams its own rows,
            one all_gather of (lse, z_y, entropy) per token merges them, and every rank gets the
            whole log-probs and entropies. dW and db are the rank's own rows; dH is summed over
            the group (in fp32 for 16-bit inputs). Every rank must make the same call. A
            frozen head folds as on one device, each rank over its rows, the ranks' dlogp/dh
            summed in the forward.
        reduce_hidden_grad: with ``vocab_group``, False returns the rank's own term of dH
            instead of the sum, for callers whose autograd sums it (sequence parallelism's
            reduce-scatter after gathering the hidden states).

    ``weight`` and ``bias`` may be DTensors whose rows are sharded over one mesh dimension
    (``Shard(0)``, as torch's ColwiseParallel leaves an LM head): the head is then
    vocabulary-parallel over that dimension's group, without ``vocab_group``; ``hidden`` may
    be a replicated DTensor. Gradients come back as the same DTensors' local shards.

    Returns:
        float32 log-probs [...] (float64 for float64 inputs, torch backend only); with
        ``return_entropy``, ``(logp, entropy)``. Both are differentiable w.r.t. hidden,
        weight and bias for any per-token upstream gradient; gradients come back in the
        inputs' dtype, accumulated in float32.
    """
    hidden, weight, bias, vocab_group = local_head(hidden, weight, bias, vocab_group)
    shard = vocab_shard(vocab_group, reduce_hidden_grad, hidden, weight, bias, targets)
    vocab = weight.shape[0] if shard is None else shard.vocab
    cap = logit_cap(temperature, logit_softcap)
    temperature = check_token_inputs(
        hidden, weight, bias, targets, ignore_index, temperature, vocab, logit_scale
    )  # tau / s from here on
    check_flag(return_entropy, "return_entropy")
    backend = resolve_backend(backend, hidden.device)
    check_backend_dtype(backend, hidden.dtype)
    fold = folds_frozen_head(fold, backend, hidden, weight, bias, return_entropy)

    rows = RowSelection(targets != ignore_index)
    logp, entropy = LinearTokenLogprobs.apply(
        rows.take(hidden).contiguous(),
        weight,
        bias,
        rows.take(targets).long().contiguous(),
        temperature,
        return_entropy,
        backend,
        fold,
        shard,
        cap,
    )
    if return_entropy:
        return rows.put(logp), rows.put(entropy)
    return rows.put(logp)
