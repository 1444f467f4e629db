"""Hugging Face causal LMs into the fused ops: final hidden states and the LM head, never logits.

The usual way to score a sequence,

    logits = model(input_ids, attention_mask=mask).logits               # [B, T, V]
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None])

holds the [B, T, V] logits (and their float32 copy and gradient). sequence_logprobs gives
the same log-probs from the decoder's hidden states and the head's weight through
token_logprobs, for any transformers model whose logits are its head applied to its final
hidden states, times a scale (Granite's logits_scaling, Cohere's logit_scale) and soft-capped
(Gemma 2's final_logit_softcapping) at most, which head_logits reads; it refuses the others,
once per model. sequence_loss gives a per-token loss of those log-probs through
token_logprob_loss (its gradient folded into the forward). transformers itself is not
imported: models are read through their own attributes.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch

from gopd_kernels.functional import token_logprobs
from gopd_kernels.losses import TokenLossFn, check_token_loss, token_logprob_loss
from gopd_kernels.ops.vocab_parallel import local_rows, vocab_shard

IGNORE = -100
# config attributes by which transformers models transform their logits (read off transformers
# 5.24's modeling code): a soft-cap, c tanh(z / c) (Gemma 2 / 3n, Mistral Large 4, nanochat), and
# multipliers, whose direction head_logits reads off the model's own forward, since the names do
# not fix it: Granite divides by logits_scaling, HyperCLOVAX multiplies by it; Cohere multiplies
# by logit_scale, Falcon-H1 by lm_head_multiplier.
LOGIT_SOFTCAPS = ("final_logit_softcapping",)
LOGIT_SCALES = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier_scale")


class HeadLogits(NamedTuple):
    """How a model's logits follow from its LM head's output z = h W^T + b: s z, or soft-capped,
    c tanh(s z / c); the fused ops' logit_scale and logit_softcap."""

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        z = z * self.scale
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap

    def kwargs(self, prefix: str = "") -> dict:
        """The ops' keyword arguments: logit_scale and logit_softcap, each after `prefix`
        ("teacher_", "ref_": frozen_logprobs')."""
        return {f"{prefix}logit_scale": self.scale, f"{prefix}logit_softcap": self.softcap}


_HEAD_LOGITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # head_logits' answers


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


def _configs(model) -> list:
    """The model's config, and its text model's where that is another (vision-language models)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    return [c for c in (config, None if text is config else text) if c is not None]


def _positive(config, attr: str, name: str) -> float | None:
    """config.attr as a float > 0, None where unset (or 1 for a multiplier); a ValueError else."""
    value = getattr(config, attr, None)
    if value is None or (value == 1 and attr in LOGIT_SCALES):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{name}: config.{attr}={value!r} is not a finite number > 0")
    return float(value)


def head_logits(model, name: str = "model", tokens: int = 4) -> HeadLogits:
    """How the model's logits follow from its LM head applied to final_hidden_states: a
    multiplier s (1 for most models; Granite's 1 / logits_scaling, Cohere's logit_scale) and a
    soft-cap c (Gemma 2's final_logit_softcapping), for the fused ops' logit_scale and
    logit_softcap. A ValueError for any other transform (a multiplier in a remote model's code,
    a decoder whose output is not what its head reads).

    The cap is the config's; the candidate multipliers are 1 and, for each the config names, its
    value and its inverse (the names do not say which way it applies). The model's own forward
    on a few tokens decides: its logits must be within a rounding or two of its dtype of a
    candidate's (relative to the largest logit), and the scale fitted over all of them against
    the candidate's within 1e-3 of 1 (1e-5 in fp32). Checked once per model object."""
    key = transformers_model(model)
    if key in _HEAD_LOGITS:
        return _HEAD_LOGITS[key]
    configs = _configs(model)
    named = {a: v for c in configs for a in LOGIT_SCALES if (v := _positive(c, a, name)) is not None}
    caps = {a: v for c in configs for a in LOGIT_SOFTCAPS if (v := _positive(c, a, name)) is not None}
    softcap = next(iter(caps.values()), None)
    head = key.get_output_embeddings()
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
    largest = logits.abs().max().clamp_min(tiny)
    scales = {1.0} | {v for value in named.values() for v in (value, 1.0 / value)}
    off = lambda c: float((logits - c.apply(ours)).abs().max() / largest)  # noqa: E731
    found = min((HeadLogits(s, softcap) for s in sorted(scales)), key=off)
    predicted = found.apply(ours)
    # A multiplier near 1 (in code) hides in one logit's rounding, not in the scale fitted over
    # all of them (least squares), whose rounding noise averages out.
    fitted = float((logits * predicted).sum() / (predicted * predicted).sum().clamp_min(tiny))
    err = off(found)
    fp32 = head.weight.dtype == torch.float32
    if err > (1e-4 if fp32 else 1e-2) or abs(fitted - 1) > (1e-5 if fp32 else 1e-3):  # 16-bit: 4e-3
        how = f" times {found.scale:.6g}" if found.scale != 1 else ""
        how += f", soft-capped at {softcap:.6g}" if softcap is not None else ""
        names = "".join(f"; config.{attr}={value}" for attr, value in (named | caps).items())
        raise ValueError(
            f"{name}: the model's logits are not its LM head applied to its final hidden states{how} "
            f"(off by {err:.2g} of the largest logit, a fitted scale of {fitted * found.scale:.6g}, on "
            f"{tokens} tokens{names}): its forward transforms them, which gopd's fused ops, reading "
            "the head's weight, would miss"
        )
    _HEAD_LOGITS[key] = found
    return found


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
    targets = _next_targets(input_ids, attention_mask)
    hidden, head, transform = _final_hidden(model, input_ids, attention_mask)
    return token_logprobs(
        hidden, head.weight, targets, bias=head.bias, temperature=temperature, **transform.kwargs(),
        ignore_index=IGNORE, return_entropy=return_entropy, backend=backend,
    )  # fmt: skip


def sequence_loss(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    loss_fn: TokenLossFn,
    per_token: Sequence[torch.Tensor | None] = (),
    *,
    loss_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    num_tokens: float | None = None,
    backend: str = "auto",
    fold: bool | None = None,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, ...]:
    """token_logprob_loss of a transformers model's next tokens: loss_fn(s, *per_token) per
    predicted token input_ids[:, t + 1], aggregated over those where attention_mask[:, 1:] and
    loss_mask (a [B, T - 1] bool: the response tokens, say) are both set, without the [B, T, V]
    logits, its gradient folded as token_logprob_loss's (the model's parameters get it).
    per_token tensors are [B, T - 1], aligned with the predicted tokens; loss_agg and
    num_tokens, temperature, backend, fold and return_entropy as token_logprob_loss's. Returns
    (loss, logp), or (loss, logp, entropy) with return_entropy: logp (and entropy) [B, T - 1]
    detached, 0 where a token does not count."""
    targets = _next_targets(input_ids, attention_mask, loss_mask)
    dtype = transformers_model(model).get_output_embeddings().weight.dtype
    check_token_loss(loss_fn, per_token, targets, IGNORE, dtype)  # before the model runs
    hidden, head, transform = _final_hidden(model, input_ids, attention_mask)
    return token_logprob_loss(
        hidden, head.weight, targets, loss_fn, per_token, bias=head.bias, temperature=temperature,
        **transform.kwargs(), loss_agg=loss_agg, num_tokens=num_tokens, ignore_index=IGNORE, backend=backend,
        fold=fold, return_entropy=return_entropy,
    )  # fmt: skip


def _next_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """input_ids[:, 1:], the tokens each position predicts, IGNORE where attention_mask[:, 1:]
    is 0 or loss_mask ([B, T - 1]) is False; the inputs checked first."""
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
    targets = input_ids[:, 1:].long()
    if loss_mask is not None:
        if not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != targets.shape:
            got = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask).__name__
            raise ValueError(
                f"loss_mask must be a tensor of shape {tuple(targets.shape)} (B, T - 1), got {got}"
            )
        targets = targets.masked_fill(~loss_mask.to(device=targets.device, dtype=torch.bool), IGNORE)
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE)
    return targets


def _final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """(hidden states [B, T - 1, D] that predict input_ids[:, 1:], the LM head, head_logits)."""
    transform = head_logits(model)
    head = transformers_model(model).get_output_embeddings()
    return final_hidden_states(model, input_ids, attention_mask)[:, :-1], head, transform
