"""Argument checks shared by the public ops.

Every check raises ``ValueError`` naming the offending argument, before any kernel runs:
a kernel that reads out of range or silently mixes dtypes gives garbage, not an error.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 runs on the torch backend only: for gradcheck and for debugging, not for speed.
TORCH_ONLY_DTYPES = (torch.float64,)


def check_temperature(temperature: float, name: str = "temperature") -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise ValueError(f"{name} must be a real number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {temperature}")
    return temperature


def logit_temperature(temperature: float, logit_scale: float = 1.0, scale_name: str = "logit_scale") -> float:
    """tau / s, the one divisor of a head's raw logits h W^T + b in softmax(s (h W^T + b) / tau):
    the sampling temperature tau and the model's own logit multiplier s (Granite's
    1 / logits_scaling, Cohere's logit_scale; gopd_kernels.hf.head_logits), both checked."""
    effective = check_temperature(temperature) / check_temperature(logit_scale, scale_name)
    if not math.isfinite(effective) or effective <= 0:
        raise ValueError(
            f"temperature / {scale_name} must be finite and > 0, got {temperature} / {logit_scale}"
        )
    return effective


def logit_cap(temperature: float, softcap: float | None, name: str = "logit_softcap") -> float | None:
    """c / tau, a soft-capped head's cap in the units of its tempered logits (softmax reads
    (c / tau) tanh(s (h W^T + b) / c)), or None for a head with no cap (softcap None)."""
    if softcap is None:
        return None
    cap = check_temperature(softcap, name) / check_temperature(temperature)
    if not math.isfinite(cap) or cap <= 0:
        raise ValueError(f"{name} / temperature must be finite and > 0, got {softcap} / {temperature}")
    return cap


def check_ref_settings(ref_hidden: torch.Tensor | None, **settings) -> None:
    """Where there is no reference (ref_hidden None), a ValueError naming the first of its
    settings given anyway (a bias; a logit scale other than 1; a soft-cap): never ignored."""
    if ref_hidden is not None:
        return
    for name, value in settings.items():
        if value is None or (name.endswith("_logit_scale") and value == 1.0):
            continue
        given = name if isinstance(value, torch.Tensor) else f"{name}={value}"
        raise ValueError(f"{given} is given without ref_hidden / ref_weight")


def check_lm_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    names: tuple[str, str, str] = ("hidden", "weight", "bias"),
) -> None:
    """hidden [..., D], weight [V, D], bias [V] or None: one float dtype, one device."""
    h_name, w_name, b_name = names
    for name, t in ((h_name, hidden), (w_name, weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES + TORCH_ONLY_DTYPES:
            raise ValueError(
                f"{name} must be float32, bfloat16 or float16 (float64: torch backend), got {t.dtype}"
            )
    if weight.dim() != 2:
        raise ValueError(f"{w_name} must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError(f"{h_name} must have a last dimension D, got a 0-d tensor")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{h_name} last dimension ({hidden.shape[-1]}) must equal {w_name}.shape[1] ({weight.shape[1]})"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} has an empty vocabulary (V = 0)")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{h_name} ({hidden.dtype}) and {w_name} ({weight.dtype}) must share one dtype")
    if hidden.device != weight.device:
        raise ValueError(f"{h_name} ({hidden.device}) and {w_name} ({weight.device}) must be on one device")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"{b_name} must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{b_name} must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"{b_name} ({bias.dtype}) and {w_name} ({weight.dtype}) must share one dtype")
        if bias.device != weight.device:
            raise ValueError(f"{b_name} ({bias.device}) and {w_name} ({weight.device}) must be on one device")


def check_matching_head(
    name: str, hidden: torch.Tensor, weight: torch.Tensor, like: str, like_hidden: torch.Tensor, like_weight
) -> None:
    """A second model (name) scored at the positions of a first (like): the same leading shape,
    vocabulary, dtype and device; the hidden size D may differ."""
    if hidden.shape[:-1] != like_hidden.shape[:-1]:
        raise ValueError(
            f"{name}_hidden leading shape {tuple(hidden.shape[:-1])} must equal the {like}'s "
            f"{tuple(like_hidden.shape[:-1])}"
        )
    if weight.shape[0] != like_weight.shape[0]:
        raise ValueError(
            f"{name}_weight has V={weight.shape[0]}, the {like}'s has V={like_weight.shape[0]}: "
            "vocabularies must match"
        )
    if hidden.dtype != like_hidden.dtype:
        raise ValueError(
            f"{name}_hidden is {hidden.dtype}, the {like}'s is {like_hidden.dtype}: use one dtype"
        )
    if hidden.device != like_hidden.device:
        raise ValueError(f"{name}_hidden is on {hidden.device}, the {like}'s on {like_hidden.device}")


def check_targets(
    targets: torch.Tensor,
    lead_shape: torch.Size,
    vocab_size: int,
    ignore_index: int,
    device: torch.device,
    name: str = "targets",
) -> None:
    """Integer ids with the leading shape of hidden, each in [0, V) or equal to ignore_index."""
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {targets.dtype}")
    if targets.shape != lead_shape:
        raise ValueError(
            f"{name} shape {tuple(targets.shape)} must equal the leading shape of hidden {tuple(lead_shape)}"
        )
    if targets.device != device:
        raise ValueError(f"{name} ({targets.device}) must be on the device of hidden ({device})")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if targets.numel() == 0:
        return
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(out_of_range.any()):  # one device sync; a bad id would read outside the weight
        bad = targets[out_of_range][0].item()
        raise ValueError(
            f"{name} holds id {bad} outside [0, {vocab_size}) that is not ignore_index ({ignore_index})"
        )


def check_choice(value: str, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_flag(value: bool, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_backend_dtype(backend: str, dtype: torch.dtype, name: str = "hidden") -> None:
    """float64 has no Triton kernels (no float64 tensor cores); say so rather than cast."""
    if backend == "triton" and dtype in TORCH_ONLY_DTYPES:
        raise ValueError(f"{name} is {dtype}, which only backend='torch' supports")


def check_token_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    temperature: float,
    vocab_size: int | None = None,
    logit_scale: float = 1.0,
) -> float:
    """The checks of every op on sampled tokens: the LM head, the targets, tau and the logit
    scale s (returned as tau / s, logit_temperature). vocab_size: the whole vocabulary where
    weight holds a shard of it."""
    check_lm_head(hidden, weight, bias)
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    check_targets(targets, hidden.shape[:-1], vocab, ignore_index, hidden.device)
    return logit_temperature(temperature, logit_scale)
