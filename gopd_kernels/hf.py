"""Hugging Face causal LMs into the fused ops: final hidden states and the LM head, never logits.

The usual way to score a sequence,

    logits = model(input_ids, attention_mask=mask).logits               # [B, T, V]
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None])

holds the [B, T, V] logits (and their float32 copy and gradient). sequence_logprobs gives
the same log-probs from the decoder's hidden states and the head's weight through
token_logprobs, for any transformers model whose logits are its head applied to its final
hidden states: check_head_reads_hidden refuses the others (soft-capped or scaled logits),
once per model. transformers itself is not imported: models are read through their own
attributes.
"""

from __future__ import annotations

import weakref

import torch

from gopd_kernels.functional import token_logprobs
from gopd_kernels.ops.vocab_parallel import local_rows, vocab_shard

IGNORE = -100
# config attributes by which transformers models transform their logits (Gemma 2 / 3, Cohere,
# Granite, Falcon-H1; read off transformers 5.24's modeling code); check_head_reads_hidden also
# compares the forward itself, for the rest (a vision-language model's text_config, remote code)
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier_scale",
)
_CHECKED: weakref.WeakSet = weakref.WeakSet()  # models check_head_reads_hidden has passed


def is_peft_model(model) -> bool:
    """A peft wrapper (LoRA) around a transformers model."""
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def transformers_model(model):
    """The transformers model itself, inside a peft wrapper if any (its LoRA layers still apply)."""
    return model.get_base_model() if is_peft_model(model) else model


def mask_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the attention mask (as generate() does), so that left padding
    does not shift the positions of the real tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def final_hidden_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden states after the decoder's last norm, [B, T, D]: what the LM head reads.

    position_ids given (and no attention_mask): packed rows, each restarting at position 0,
    which transformers keeps apart without a KV cache (gopd.packing); else positions follow
    the attention mask (all ones when None)."""
    model = transformers_model(model)
    decoder = getattr(model, model.base_model_prefix)
    if position_ids is None:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = mask_position_ids(attention_mask)
    out = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state


def check_head_reads_hidden(model, name: str = "model", tokens: int = 4) -> None:
    """ValueError unless the model's logits are its LM head applied to final_hidden_states: a
    model that soft-caps or scales them (Gemma 2's final_logit_softcapping, Granite's
    logits_scaling, code in a remote model), or whose decoder's output is not what its head
    reads, would be scored wrongly by the fused ops. First the config attributes that name such
    a transform, then the model's own forward on a few tokens against the head's: within a
    rounding or two of its dtype (relative to the largest logit), and a scale fitted over all
    those logits within 1e-3 of 1 (1e-5 in fp32). Checked once per model object."""
    if model in _CHECKED:
        return
    config = getattr(model, "config", None)
    for attr in LOGIT_TRANSFORMS:  # named first: a soft-cap barely moves small logits
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{name}: config.{attr}={value} transforms the logits; gopd's fused ops do not")
    head = transformers_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{name}: the model has no output embeddings (LM head)")
    device = head.weight.device
    ids = (torch.arange(1, tokens + 1, device=device) % head.weight.shape[0])[None]
    # a tensor-parallel model's head (DTensor rows): this rank's rows against its logits' columns
    weight, group = local_rows(head.weight, f"{name}'s LM head weight")
    bias, _ = local_rows(head.bias, f"{name}'s LM head bias")
    training = model.training
    model.eval()  # dropout would make the two forwards differ
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            logits, _ = local_rows(logits, f"{name}'s logits")  # replicated if a DTensor
            hidden = final_hidden_states(model, ids)
            ours = torch.nn.functional.linear(hidden, weight, bias)
    finally:
        model.train(training)
    if group is not None:
        shard = vocab_shard(group, True, hidden, weight, bias, ids)
        logits = logits[..., shard.start : shard.start + shard.size]
    logits, ours = logits.double(), ours.double()
    tiny = torch.finfo(torch.float32).tiny
    err = float((logits - ours).abs().max() / logits.abs().max().clamp_min(tiny))
    # A scale near 1 (a multiplier in code) hides in one logit's rounding, not in the scale
    # fitted over all of them (least squares), whose rounding noise averages out.
    scale = float((logits * ours).sum() / (ours * ours).sum().clamp_min(tiny))
    fp32 = head.weight.dtype == torch.float32
    if err > (1e-4 if fp32 else 1e-2) or abs(scale - 1) > (1e-5 if fp32 else 1e-3):  # 16-bit rounding: 4e-3
        raise ValueError(
            f"{name}: the model's logits are not its LM head applied to its final hidden states (off by "
            f"{err:.2g} of the largest logit, a fitted scale of {scale:.6g}, on {tokens} tokens): its "
            "forward transforms them (a scale, a softcap), which gopd's fused ops, reading the head's "
            "weight, would miss"
        )
    _CHECKED.add(model)


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(input_ids[:, t + 1] | input_ids[:, : t + 1]) for t < T - 1, [B, T - 1] float32:
    log_softmax(model(input_ids).logits[:, :-1] / temperature) at the next tokens, without the
    [B, T, V] logits; differentiable w.r.t. the model's parameters (a LoRA model's adapters
    included). 0.0 where attention_mask[:, 1:] is 0 (padding, left or right). With
    return_entropy, also the entropy of each of those next-token distributions (0 at padding).
    temperature and backend as token_logprobs'."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor [batch, tokens], got {got}")
    if input_ids.shape[1] < 2:
        raise ValueError(
            f"input_ids must hold at least 2 tokens per row (one to predict), got {input_ids.shape[1]}"
        )
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
    ):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
        raise ValueError(
            f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {got}"
        )
    check_head_reads_hidden(model)
    head = transformers_model(model).get_output_embeddings()
    hidden = final_hidden_states(model, input_ids, attention_mask)[:, :-1]
    targets = input_ids[:, 1:].long()
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE)
    return token_logprobs(
        hidden, head.weight, targets, bias=head.bias, temperature=temperature, ignore_index=IGNORE,
        return_entropy=return_entropy, backend=backend,
    )  # fmt: skip
