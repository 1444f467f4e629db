"""G-OPD objectives: the per-token advantage, the policy-gradient loss, the dense loss.

Symbols as in the project's method notes: s_t student log-prob (with gradient), o_t the
student's log-prob before the update, r_t the rollout engine's, T_t teacher, R_t reference,
lam the reward scale (1 = OPD, > 1 = ExOPD reward extrapolation), tau the temperature.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from numbers import Real
from typing import TYPE_CHECKING

import torch

from gopd_kernels.backend import implementation, info_once, resolve_backend
from gopd_kernels.functional import token_logprobs
from gopd_kernels.ops.dense_kl import DenseGopdKL
from gopd_kernels.ops.folded_dense_kl_torch import DENSE_FOLD_ROWS, FoldedDenseKL
from gopd_kernels.ops.folded_loss_torch import FOLD_ROWS, FoldedTokenLoss, fold_workspace_bytes, row_tiles
from gopd_kernels.ops.matmul_torch import cublas_half
from gopd_kernels.ops.token_logprobs import head_requires_grad
from gopd_kernels.ops.vocab_parallel import local_head, vocab_shard
from gopd_kernels.selection import RowSelection
from gopd_kernels.validation import (
    check_backend_dtype,
    check_choice,
    check_flag,
    check_lm_head,
    check_matching_head,
    check_ref_settings,
    check_token_inputs,
    logit_cap,
    logit_temperature,
)

if TYPE_CHECKING:  # annotations only: torch.distributed is missing from some torch builds
    from torch.distributed import ProcessGroup

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
# loss_fn(s [n], *per_token [n] | None) -> [n] per-token losses (token_logprob_loss)
TokenLossFn = Callable[..., torch.Tensor]


def check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, Real) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    return float(lam)


def check_per_token(t: torch.Tensor | None, name: str, like: torch.Tensor, floating: bool = True) -> None:
    """A tensor (a float one unless not `floating`) with the shape and device of `like` (None passes)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or (floating and not t.dtype.is_floating_point):
        kind = "a floating-point tensor" if floating else "a tensor or None"
        raise ValueError(f"{name} must be {kind}, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} must equal {tuple(like.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} ({t.device}) must be on {like.device}")


def _check_num_tokens(num_tokens, loss_agg: str):
    if num_tokens is None:
        return None
    if loss_agg != "token-mean":
        raise ValueError(f"num_tokens applies to loss_agg='token-mean' only, got loss_agg={loss_agg!r}")
    value = (
        float(num_tokens) if isinstance(num_tokens, torch.Tensor) and num_tokens.numel() == 1 else num_tokens
    )
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"num_tokens must be a number > 0 (the whole batch's valid tokens), got {num_tokens!r}"
        )
    return float(value)


def gopd_advantage(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    *,
    lam: float = 1.0,
) -> torch.Tensor:
    """A_t = lam (T_t - R_t) - (s_t - R_t), elementwise, float32 (float64 stays float64).

    ``ref_logp`` may be None only when lam == 1 (OPD: A = T - s, the reference cancels).
    """
    lam = check_lam(lam)
    if not isinstance(student_logp, torch.Tensor):
        raise ValueError(f"student_logp must be a tensor, got {type(student_logp).__name__}")
    check_per_token(student_logp, "student_logp", student_logp)
    check_per_token(teacher_logp, "teacher_logp", student_logp)
    check_per_token(ref_logp, "ref_logp", student_logp)
    dtype = torch.promote_types(torch.promote_types(student_logp.dtype, teacher_logp.dtype), torch.float32)
    s, t = student_logp.to(dtype), teacher_logp.to(dtype)
    if ref_logp is None:
        if lam != 1.0:
            raise ValueError(f"ref_logp is required when lam != 1 (got lam={lam}); only OPD (lam=1) drops it")
        return t - s
    r = ref_logp.to(dtype)
    return lam * (t - r) - (s - r)


def aggregate_token_losses(
    per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean", num_tokens: float | None = None
) -> torch.Tensor:
    """Reduce per-token losses [..] over valid positions (mask) to a scalar.

    token-mean: sum(l m) / (num_tokens or sum(m)); with num_tokens = the valid tokens of the
    whole batch, the micro-batches of a gradient-accumulation step add up to its token mean.
    seq-mean-token-mean / seq-mean-token-sum ([B, T] inputs): per sequence the mean / sum
    over its valid tokens, then the mean over sequences that have any.
    """
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))  # NaN at padding stays out
    return (masked * token_loss_weights(mask, loss_agg, num_tokens).to(masked.dtype)).sum()


def token_loss_weights(mask: torch.Tensor, loss_agg: str, num_tokens: float | None = None) -> torch.Tensor:
    """Weights a_t with aggregate_token_losses(l) = sum_t a_t l_t (0 at masked-out positions)."""
    check_choice(loss_agg, LOSS_AGGS, "loss_agg")
    num_tokens = _check_num_tokens(num_tokens, loss_agg)
    m = mask.to(torch.float64)  # exact counts; callers cast
    if loss_agg == "token-mean":
        return m / (num_tokens if num_tokens is not None else m.sum().clamp_min(1))
    if mask.dim() != 2:
        raise ValueError(f"loss_agg={loss_agg!r} needs [B, T] inputs, got shape {tuple(mask.shape)}")
    tokens = m.sum(dim=-1, keepdim=True)
    sequences = (tokens > 0).sum().clamp_min(1)
    if loss_agg == "seq-mean-token-mean":
        return m / tokens.clamp_min(1) / sequences
    return m / sequences


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp_min(1)).detach()


@torch.compiler.disable  # as token_logprobs
def token_logprob_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: TokenLossFn,
    per_token: Sequence[torch.Tensor | None] = (),
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    loss_agg: str = "token-mean",
    num_tokens: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    fold: bool | None = None,
    vocab_group: ProcessGroup | None = None,
    reduce_hidden_grad: bool = True,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Any per-token loss of the sampled tokens' log-probs, fused from the hidden states, its
    gradient folded into the forward as gopd_loss's is.

        s_t  = log softmax(s (h W^T + b) / tau)[y_t]          (as token_logprobs; never [N, V])
        l_t  = loss_fn(s, *per_token)_t                         (l_t from s_t and per_token[.][t])
        loss = aggregate(l, valid = targets != ignore_index, loss_agg, num_tokens)

    loss_fn takes the valid tokens' log-probs, 1-D float32 (float64 for float64 inputs,
    differentiable), and the per_token tensors at the same tokens (each given with targets'
    shape, or None, passed on as None), and returns one loss per token: a PPO / GRPO / DAPO
    clipped surrogate with your own advantages, CISPO, a weighted NLL. When folded it gets a
    chunk of rows at a time, so a token's loss may depend on its own log-prob and inputs
    only (a sequence-level ratio such as GSPO's needs token_logprobs and autograd): a probe
    on synthetic log-probs checks this, and the shape, before any kernel runs.

    Folded, each chunk's dL/ds comes from autograd on loss_fn as soon as its log-softmax is
    known: 3 GEMMs and one fp32 [rows, V] chunk, instead of token_logprobs' recomputing
    backward (4 GEMMs) under a loss written on its output. fold, the backends and the
    defaults are gopd_loss's (see there): a trained head folds on the torch backend and, for
    bf16 and fp16 heads, on Triton; a frozen one takes token_logprobs' frozen-head fold; a
    vocabulary-parallel one recomputes. bias, temperature, logit_scale, logit_softcap,
    ignore_index, vocab_group and reduce_hidden_grad are token_logprobs'; loss_agg and
    num_tokens aggregate_token_losses'.

    return_entropy: also return each token's entropy H_t of softmax(z_t / tau), detached (to
    watch for entropy collapse; not a loss term): from the fold's own read of each chunk's
    logits (with the torch rows, a few more passes over it), or token_logprobs' when unfolded.
    With it a frozen head folds here rather than in token_logprobs' frozen-head fold, which
    has no entropy (both 2 GEMMs).

    Returns ``(loss, logp)``, or ``(loss, logp, entropy)`` with return_entropy: the 0-d loss,
    differentiable w.r.t. hidden, weight and bias (gradients in their dtypes, accumulated in
    fp32), and the log-probs (and entropies) with targets' shape, detached, 0 at ignored
    positions.
    """
    loss, logp, entropy = _token_loss(
        "token_logprob_loss", hidden, weight, targets, loss_fn, per_token, bias=bias, temperature=temperature,
        logit_scale=logit_scale, logit_softcap=logit_softcap, loss_agg=loss_agg, num_tokens=num_tokens,
        ignore_index=ignore_index, backend=backend, fold=fold, vocab_group=vocab_group,
        reduce_hidden_grad=reduce_hidden_grad, return_entropy=return_entropy, probe=True,
    )  # fmt: skip
    return (loss, logp, entropy) if return_entropy else (loss, logp)


def _token_loss(
    op: str, hidden, weight, targets, loss_fn, per_token, *, bias, temperature, logit_scale, logit_softcap,
    loss_agg, num_tokens, ignore_index, backend, fold, vocab_group, reduce_hidden_grad, return_entropy,
    probe=False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """token_logprob_loss's (loss, detached logp, detached entropy or None) for `op` (the name its
    log lines and errors give), with `probe` its check of loss_fn (gopd_loss's own needs none)."""
    cap = logit_cap(temperature, logit_softcap)  # c / tau, the fold's; token_logprobs takes c itself
    hidden, weight, bias, vocab_group = local_head(hidden, weight, bias, vocab_group)
    # every check before any kernel runs; a vocabulary-parallel head's ids, of the whole
    # vocabulary, are held to it in token_logprobs (its one path)
    vocab = weight.shape[0] if vocab_group is None else sys.maxsize
    temperature_over_scale = check_token_inputs(
        hidden, weight, bias, targets, ignore_index, temperature, vocab, logit_scale
    )
    check_choice(loss_agg, LOSS_AGGS, "loss_agg")
    _check_num_tokens(num_tokens, loss_agg)
    check_flag(return_entropy, "return_entropy")
    if probe:
        _check_per_token_inputs(per_token, targets)
    mask = targets != ignore_index
    weights_all = token_loss_weights(mask, loss_agg, num_tokens)  # [B, T] checks before any kernel
    rows = RowSelection(mask)
    inputs = [None if t is None else rows.take(t) for t in per_token]
    if probe:  # check_token_loss, on this selection
        _probe_token_loss(loss_fn, inputs, hidden.dtype, hidden.device)
    # Unless fold=True, a frozen head (dH only) takes token_logprobs' frozen-head fold instead: also
    # 2 GEMMs, and on the torch backend in tiles instead of full-vocabulary rows. Measured (Intel VM,
    # N = 4096, D = 1024, V = 151936, fp32, 2 runs each): 9.1-9.5 s and 85 MiB against this fold's
    # 10.2-11.7 s and 314 MiB.
    fold_on = _fold_backend(
        fold, backend, hidden, weight, _policy_folds_by_default(hidden, weight, bias, return_entropy), bias,
        op=op, unfoldable=None if vocab_group is None else "vocab_group",
    )  # fmt: skip
    if fold_on == "triton" and fold is None:
        info_once(
            f"{op}: the gradient is folded into the forward ({weight.dtype} head, Triton backend): "
            "on an H100 (bf16) 1.4x faster than recomputing the logits, for about twice the memory; "
            "fold=False is the leanest"
        )
    if fold_on:
        check_backend_dtype(fold_on, hidden.dtype)
        rows_impl = implementation("fold_rows", fold_on)
        # by default FOLD_ROWS rows a chunk, with room for the row work's scratch (a soft cap, the
        # entropy) on top: not a chunk of fewer rows, which costs a pass of the fp32 dW more
        live = row_tiles(rows_impl, 1, cap is not None, return_entropy)
        loss, s, entropy = FoldedTokenLoss.apply(
            rows.take(hidden).contiguous(), weight, bias, rows.take(targets).long().contiguous(),
            1.0 / temperature_over_scale, _chunk_loss(loss_fn, inputs, rows.take(weights_all)),
            fold_workspace_bytes(weight, live, FOLD_ROWS[fold_on]), rows_impl, cap, return_entropy,
        )  # fmt: skip
        return loss, rows.put(s), None if entropy is None else rows.put(entropy)
    out = token_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, logit_scale=logit_scale,
        logit_softcap=logit_softcap, ignore_index=ignore_index, return_entropy=return_entropy,
        backend=backend, fold=fold, vocab_group=vocab_group, reduce_hidden_grad=reduce_hidden_grad,
    )  # fmt: skip
    logp, entropy = out if return_entropy else (out, None)
    s = rows.take(logp)
    loss = (_per_token_losses(loss_fn, s, inputs) * rows.take(weights_all).to(s.dtype)).sum()
    return loss, logp.detach(), None if entropy is None else entropy.detach()


@torch.compiler.disable  # as token_logprobs
def gopd_loss(
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
    backend: str = "auto",
    fold: bool | None = None,
    vocab_group: ProcessGroup | None = None,
    reduce_hidden_grad: bool = True,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The G-OPD policy-gradient loss on sampled tokens, fused from the student's hidden states.

        s_t   = log softmax(s (h W^T + b) / tau)[y_t]  (token_logprobs: never [N, V]; b: bias,
                                                   s: logit_scale, the model's logit multiplier)
        o_t   = old_logp, or s_t detached (on-policy)
        A_t   = lam (T_t - R_t) - (o_t - R_t)          (detached)
        rho_t = exp(s_t - o_t)
        l_t   = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_ratio[0], 1 + clip_ratio[1]))
        l_t  *= min(exp(o_t - r_t), is_cap)            (when is_cap is set; needs rollout_logp)
        loss  = aggregate(l, valid = targets != ignore_index, loss_agg, num_tokens)

    On-policy (old_logp None) rho = 1 exactly: the loss is -mean(A) and its gradient
    -mean(A grad s), REINFORCE with a per-token advantage, as in the official runs.

    fold: compute the gradient in the forward, one row chunk at a time (FoldedTokenLoss: the
    chunk's fp32 logits once, 3 GEMMs), instead of recomputing the logits in the backward
    (4 GEMMs, no [rows, V] chunk held, about half the memory). None: fold where measured
    faster, when the head is trained: the torch backend, and the Triton backend for bf16 and
    fp16 heads (1.4x faster for about twice the memory on an H100, bf16); True / False force it.
    A frozen head (dH only) with fold=None or False goes through token_logprobs with the same
    fold setting: its frozen-head fold is the other way to need 2 GEMMs (see token_logprobs).

    logit_scale, logit_softcap: the student's logit multiplier and soft-cap, as in token_logprobs.
    A soft-capped head folds as any other (each chunk's logits capped in place, dz taken on to
    the raw ones in the row work; a frozen one through token_logprobs' frozen-head fold).

    vocab_group, reduce_hidden_grad: a vocabulary-parallel head, as in token_logprobs (weight
    and bias this rank's rows; everything per token the same on every rank, and so the loss).
    The loss's own fold does not apply (its dZ needs whole rows): fold=True is an error, and a
    trained head recomputes; a frozen head still takes token_logprobs' frozen-head fold.

    return_entropy: stats["entropy"], the student's mean entropy over the valid tokens (as
    token_logprob_loss's return_entropy: a statistic, from the same read of the logits).

    Returns ``(loss, stats)``; stats holds detached 0-d tensors (no device sync): the mean
    advantage, the reverse-KL estimate mean(s - T), the reward mean(T - R) (with a
    reference), the clip fraction, the importance weight's mean and max (with is_cap), the
    rollout mismatch mean(o - r) (with rollout_logp), the entropy (with return_entropy), and
    the valid-token count.
    """
    lam = check_lam(lam)
    check_per_token(
        teacher_logp, "teacher_logp", targets if isinstance(targets, torch.Tensor) else teacher_logp
    )
    for name, t in (("ref_logp", ref_logp), ("old_logp", old_logp), ("rollout_logp", rollout_logp)):
        check_per_token(t, name, teacher_logp)
    if ref_logp is None and lam != 1.0:
        raise ValueError(f"ref_logp is required when lam != 1 (got lam={lam}); only OPD (lam=1) drops it")
    clip_low, clip_high = _check_clip_ratio(clip_ratio)
    if is_cap is not None:
        if (
            isinstance(is_cap, bool)
            or not isinstance(is_cap, Real)
            or not math.isfinite(is_cap)
            or is_cap <= 0
        ):
            raise ValueError(f"is_cap must be a finite number > 0 or None, got {is_cap!r}")
        if rollout_logp is None:
            raise ValueError(
                "is_cap is set but rollout_logp is None: the truncated IS weight needs rollout_logp"
            )
    terms = lambda s, teacher, ref, old, rollout: _policy_terms(
        s, teacher, ref, old, rollout, lam, (clip_low, clip_high), is_cap
    )
    per_token_inputs = (teacher_logp, ref_logp, old_logp, rollout_logp)
    loss, s, entropy = _token_loss(
        "gopd_loss", hidden, weight, targets, lambda *a: terms(*a)[0], per_token_inputs, bias=bias,
        temperature=temperature, logit_scale=logit_scale, logit_softcap=logit_softcap, loss_agg=loss_agg,
        num_tokens=num_tokens, ignore_index=ignore_index, backend=backend, fold=fold, vocab_group=vocab_group,
        reduce_hidden_grad=reduce_hidden_grad, return_entropy=return_entropy,
    )  # fmt: skip
    _, adv, clipped, is_weight = terms(s, *per_token_inputs)
    mask = targets != ignore_index
    stats = {
        "advantage": _masked_mean(adv, mask),
        "reverse_kl": _masked_mean(s.detach() - teacher_logp.to(s.dtype), mask),
        "clip_frac": _masked_mean(clipped.to(s.dtype), mask),
        "num_tokens": mask.sum().detach(),
    }
    if ref_logp is not None:
        stats["reward"] = _masked_mean((teacher_logp - ref_logp).to(s.dtype), mask)
    if rollout_logp is not None:
        o = s.detach() if old_logp is None else old_logp.to(s.dtype)
        stats["rollout_mismatch"] = _masked_mean(o - rollout_logp.to(s.dtype), mask)
    if entropy is not None:
        stats["entropy"] = _masked_mean(entropy, mask)
    if is_weight is not None:
        stats["is_weight_mean"] = _masked_mean(is_weight, mask)
        stats["is_weight_max"] = torch.where(mask, is_weight, torch.zeros_like(is_weight)).max().detach()
    return loss, stats


def _policy_terms(s, teacher, ref, old, rollout, lam, clip_ratio, is_cap):
    """(l_t, A_t, clipped_t, IS weight_t | None) of gopd_loss's docstring, from s_t."""
    o = s.detach() if old is None else old.to(s.dtype)
    adv = gopd_advantage(o, teacher, ref, lam=lam).to(s.dtype).detach()
    ratio = torch.exp(s - o)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_ratio[0], 1.0 + clip_ratio[1])
    per_token = torch.maximum(unclipped, clipped)
    is_weight = None
    if is_cap is not None:
        is_weight = torch.exp(o - rollout.to(s.dtype)).clamp(max=float(is_cap)).detach()
        per_token = per_token * is_weight
    return per_token, adv, clipped > unclipped, is_weight


UNFOLDABLE = {  # heads whose losses never fold, and why
    "vocab_group": "a vocabulary-parallel head (vocab_group): the folded gradient needs whole rows",
}


def _fold_backend(
    fold: bool | None, backend: str, hidden, weight, folds_by_default, bias=None, op="", unfoldable=None
) -> str | None:
    """The backend ("torch" or "triton") that computes a loss with its gradient folded into the
    forward, or None to run it unfolded (streaming forward, recomputing backward).

    Folding computes the logits once instead of twice, for a [rows, V] fp32 chunk held.
    fold=True folds on either backend, fold=False never, and nothing folds when no gradient
    is wanted; fold=None asks folds_by_default(resolved backend), each loss's measured rule.
    unfoldable: a key of UNFOLDABLE for a head that never folds (a vocabulary-parallel one, whose
    fold's dZ would need whole rows): fold=True is then an error, and where
    fold=None would have folded a log line says so. op: the loss's name, for both."""
    if fold is not None and not isinstance(fold, bool):
        raise ValueError(f"fold must be True, False or None, got {fold!r}")
    if unfoldable and fold:
        raise ValueError(f"{op}: fold=True does not apply to {UNFOLDABLE[unfoldable]}")
    resolved = resolve_backend(backend, hidden.device)
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_requires_grad(weight, bias))
    if not wants_grad or fold is False or (fold is None and not folds_by_default(resolved)):
        return None
    if unfoldable:
        info_once(f"{op}: the backward recomputes the logits of {UNFOLDABLE[unfoldable]}")
        return None
    return resolved


def _policy_folds_by_default(hidden, weight, bias=None, with_entropy: bool = False):
    """gopd_loss with fold=None folds a trained head (a frozen one takes token_logprobs'
    frozen-head fold, leaner on CPUs, measured above; with_entropy, which that fold does not
    give, it folds here by the same rule: also 2 GEMMs, not the recomputing 3): always on the
    torch backend; on the Triton
    backend for bf16 and fp16 heads where torch has their GEMM with an fp32 result (cuBLAS),
    the fold's 3 GEMMs. Measured on an H100 (N = 16384, D = 4096, V = 151936, bf16): 104.0 ms
    and 5132 MiB against the recomputing backward's 145.8 ms and 2523 MiB (2026-11-27; the
    5132 MiB held the logits tile through dW's cast, since fixed). fp16 is predicted, not yet
    measured: cuBLAS's fp16 rate there (650-693 TFLOP/s against bf16's 702-760) and one pass
    to scale each chunk's fp32 dz into fp16, against the recomputing fused kernels' 153 ms for
    token_logprobs. fp32 heads keep the recomputing backward (its 3xTF32 GEMMs against
    cuBLAS's plain fp32)."""

    def folds(backend: str) -> bool:
        frozen_with_entropy = with_entropy and hidden.requires_grad
        return (head_requires_grad(weight, bias) or frozen_with_entropy) and (
            backend == "torch" or cublas_half(hidden, weight, bias)
        )

    return folds


def _dense_folds_by_default(*heads: torch.Tensor | None):
    """gopd_dense_loss with fold=None folds on the torch backend (at lam = 1: 4 GEMMs, not 6;
    measured on CPUs) and on the Triton backend when every head has one half dtype with its
    cuBLAS GEMM (fp16 predicted as gopd_loss's, not yet measured). Measured on an H100
    (N = 4096, D = 4096, V = 151936, bf16, 2026-11-27): lam = 1,
    39.7 ms / 4846 MiB folded against 92.5 ms / 2407 MiB recomputing (Liger's JSD 42.1 ms /
    2705 MiB); lam = 1.25, 47.7 ms against 133.2 ms. The 4846 MiB held the tiles through dW's
    cast, since fixed (predicted ~3630 MiB)."""

    def folds(backend: str) -> bool:
        return backend == "torch" or cublas_half(*heads)

    return folds


def _chunk_loss(loss_fn: TokenLossFn, inputs: list, weights: torch.Tensor):
    """FoldedTokenLoss's token_loss: rows r0:r1's part of the aggregated loss from their log-probs."""

    def chunk_loss(s: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        per_token = _per_token_losses(loss_fn, s, [None if t is None else t[r0:r1] for t in inputs])
        return (per_token * weights[r0:r1].to(s.dtype)).sum()

    return chunk_loss


def _per_token_losses(loss_fn: TokenLossFn, s: torch.Tensor, inputs: list) -> torch.Tensor:
    """loss_fn(s, *inputs), checked to be one loss per log-prob (a shape error, no device sync)."""
    out = loss_fn(s, *inputs)
    if not isinstance(out, torch.Tensor) or out.shape != s.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"loss_fn must return one loss per log-prob, shape {tuple(s.shape)}; got {got}")
    return out


PROBE_TOKENS = 8


def check_token_loss(
    loss_fn: TokenLossFn,
    per_token: Sequence[torch.Tensor | None],
    targets: torch.Tensor,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float32,
) -> None:
    """token_logprob_loss's checks of loss_fn and per_token, which need no kernel: per_token a
    sequence of tensors (or None) of targets' shape (_check_per_token_inputs); loss_fn one loss
    per log-prob, and a token's loss unmoved when the other tokens are dropped
    (_probe_token_loss, on the first valid tokens' inputs)."""
    _check_per_token_inputs(per_token, targets)
    rows = RowSelection(targets != ignore_index)
    _probe_token_loss(
        loss_fn, [None if t is None else rows.take(t) for t in per_token], dtype, targets.device
    )


def _check_per_token_inputs(per_token: Sequence[torch.Tensor | None], targets: torch.Tensor) -> None:
    if isinstance(per_token, torch.Tensor) or not isinstance(per_token, Sequence):
        raise ValueError(
            f"per_token must be a list or tuple of tensors (or None), got {type(per_token).__name__}"
        )
    for i, t in enumerate(per_token):
        check_per_token(t, f"per_token[{i}]", targets, floating=False)


def _probe_token_loss(loss_fn: TokenLossFn, inputs: list, dtype: torch.dtype, device) -> None:
    """loss_fn gives one loss per log-prob, and a token's loss does not move when the other
    tokens are dropped (the fold hands it a chunk of rows at a time, so a loss that mixes
    tokens, e.g. a sequence mean, would come out silently wrong). Probed on synthetic log-probs
    (of `dtype`'s compute dtype) with `inputs`, the valid tokens' per-token inputs (one device
    sync); a check, not a proof."""
    if not callable(loss_fn):
        raise ValueError(
            f"loss_fn must be callable (log-probs, *per_token) -> per-token losses, got {loss_fn!r}"
        )
    count = min([PROBE_TOKENS] + [t.shape[0] for t in inputs if t is not None])
    acc = torch.promote_types(dtype, torch.float32)
    s = -torch.linspace(0.05, 4.0, PROBE_TOKENS, dtype=acc, device=device)[:count]
    cut = lambda n: [None if t is None else t[:n] for t in inputs]
    with torch.no_grad():
        full = _per_token_losses(loss_fn, s, cut(count))
        half = count // 2
        if half and not torch.allclose(
            _per_token_losses(loss_fn, s[:half], cut(half)), full[:half], rtol=1e-5, atol=1e-6, equal_nan=True
        ):
            raise ValueError(
                "loss_fn must give each token a loss of its own log-prob and per_token inputs only: "
                "its losses moved when other tokens were left out (a sequence or batch statistic of "
                "the log-probs?); compute such a loss from token_logprobs instead"
            )


def _check_clip_ratio(clip_ratio) -> tuple[float, float]:
    pair = (
        (clip_ratio, clip_ratio)
        if isinstance(clip_ratio, Real) and not isinstance(clip_ratio, bool)
        else clip_ratio
    )
    try:
        low, high = (float(x) for x in pair)
    except (TypeError, ValueError):
        raise ValueError(f"clip_ratio must be a pair (low, high) of numbers, got {clip_ratio!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or not 0 <= low < 1 or high < 0:
        raise ValueError(f"clip_ratio must satisfy 0 <= low < 1 and high >= 0, got {clip_ratio!r}")
    return low, high


def head_names(model: str) -> tuple[str, str, str]:
    return f"{model}_hidden", f"{model}_weight", f"{model}_bias"


@torch.compiler.disable  # as token_logprobs
def gopd_dense_loss(
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
    teacher_kl: bool = True,
    backend: str = "auto",
    fold: bool | None = None,
    vocab_group: ProcessGroup | None = None,
    reduce_hidden_grad: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dense G-OPD: KL(p_s || q) over the whole vocabulary at every valid position.

    q is proportional to p_T^lam p_R^(1 - lam), all three at temperature tau: the
    expectation over the vocabulary of the G-OPD per-token reward, lam log p_T +
    (1 - lam) log p_R - log p_s, is -KL(p_s || q) + log Z. With lam == 1, q = p_T and the
    reference is not needed (nor computed, when given). The models' logit tiles stream side
    by side and [N, V] is never built: over vocabulary slices with a recomputing backward
    (fold=False), or in chunks of rows over the whole vocabulary with the gradient folded
    into the forward (FoldedDenseKL, fold=True: 4 GEMMs at lam = 1 instead of 6, for the
    chunk's fp32 tiles). fold=None folds on the torch backend, and on the Triton backend for
    bf16 heads (2.3-2.8x faster on an H100, _dense_folds_by_default). Gradients flow to the
    student's hidden states and head (its bias too) only. Each model's logits are
    s (h W^T + b) / tau with its own bias b when given (Phi-style heads) and its own logit
    multiplier s (``student_logit_scale``, ``teacher_logit_scale``, ``ref_logit_scale``: see
    token_logprobs' logit_scale; 1 for most models), soft-capped where a ``*_logit_softcap`` c is
    given, c tanh(s (h W^T + b) / c) (Gemma 2's), folded or not.

    Hidden sizes may differ between the models; V must be the same. Returns
    ``(loss, stats)`` with stats "kl" (mean KL(p_s || q)), "kl_teacher" (mean KL(p_s || p_T)),
    and "num_tokens". At lam != 1 the KL to the teacher is a statistic of its own: a third
    logit tile per chunk and a few passes over it (8-15% of the folded torch path's time,
    measured at N = 1024, V = 151936 on a 2-core CPU); ``teacher_kl=False`` skips it
    and leaves "kl_teacher" out of the stats. At lam = 1 it is "kl" itself, at no cost.

    vocab_group, reduce_hidden_grad: vocabulary-parallel heads, as in token_logprobs: the three
    weights (and biases) hold this rank's rows, shard by shard alike; hidden states and mask
    the same on every rank. Each rank's slices combine into one set of partials, one
    all_gather merges the ranks', and dH is summed over the group. Never folded.
    """
    lam = check_lam(lam)
    transforms = (("student", student_logit_scale, student_logit_softcap),
                  ("teacher", teacher_logit_scale, teacher_logit_softcap),
                  ("ref", ref_logit_scale, ref_logit_softcap))  # fmt: skip
    inv_temps = tuple(1.0 / logit_temperature(temperature, s, f"{m}_logit_scale") for m, s, _ in transforms)
    caps = tuple(logit_cap(temperature, c, f"{m}_logit_softcap") for m, _, c in transforms)
    student_hidden, student_weight, student_bias, vocab_group = local_head(
        student_hidden, student_weight, student_bias, vocab_group, head_names("student")
    )
    teacher_hidden, teacher_weight, teacher_bias, vocab_group = local_head(
        teacher_hidden, teacher_weight, teacher_bias, vocab_group, head_names("teacher")
    )
    if ref_hidden is not None:
        ref_hidden, ref_weight, ref_bias, vocab_group = local_head(
            ref_hidden, ref_weight, ref_bias, vocab_group, head_names("ref")
        )
    check_lm_head(student_hidden, student_weight, student_bias, names=head_names("student"))
    check_lm_head(teacher_hidden, teacher_weight, teacher_bias, names=head_names("teacher"))
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together")
    if ref_hidden is None and lam != 1.0:
        raise ValueError(f"ref_hidden / ref_weight are required when lam != 1 (got lam={lam})")
    if ref_hidden is not None:
        check_lm_head(ref_hidden, ref_weight, ref_bias, names=head_names("ref"))
    check_ref_settings(
        ref_hidden, ref_bias=ref_bias, ref_logit_scale=ref_logit_scale, ref_logit_softcap=ref_logit_softcap
    )
    lead = student_hidden.shape[:-1]
    for name, h, w in (("teacher", teacher_hidden, teacher_weight), ("ref", ref_hidden, ref_weight)):
        if h is not None:
            check_matching_head(name, h, w, "student", student_hidden, student_weight)
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=student_hidden.device)
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != lead:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(lead)}, got {getattr(mask, 'shape', mask)!r}"
        )
    check_choice(loss_agg, LOSS_AGGS, "loss_agg")
    _check_num_tokens(num_tokens, loss_agg)
    check_flag(teacher_kl, "teacher_kl")
    backend = resolve_backend(backend, student_hidden.device)
    check_backend_dtype(backend, student_hidden.dtype, "student_hidden")

    use_ref = ref_hidden is not None and lam != 1.0  # lam == 1: q = p_T, the reference cancels
    with_teacher_kl = use_ref and teacher_kl  # at lam == 1 it is kl itself
    rows = RowSelection(mask)
    take = lambda h: rows.take(h).contiguous()
    frozen = lambda t: None if t is None else t.detach()  # noqa: E731
    heads = (
        take(student_hidden), student_weight, student_bias,
        take(teacher_hidden).detach(), teacher_weight.detach(), frozen(teacher_bias),
        take(ref_hidden).detach() if use_ref else None, ref_weight.detach() if use_ref else None,
        frozen(ref_bias) if use_ref else None,
    )  # fmt: skip
    folds_by_default = _dense_folds_by_default(*heads)
    shard = vocab_shard(
        vocab_group, reduce_hidden_grad, student_hidden, student_weight, student_bias, mask, "mask"
    )
    fold_on = _fold_backend(
        fold, backend, student_hidden, student_weight, folds_by_default, student_bias,
        op="gopd_dense_loss", unfoldable=None if shard is None else "vocab_group",
    )  # fmt: skip
    if fold_on:
        weights = rows.take(token_loss_weights(mask, loss_agg, num_tokens))
        # budget for 2 tiles of DENSE_FOLD_ROWS rows; 3 tiles (the teacher KL) take fewer rows
        ws_bytes = fold_workspace_bytes(student_weight, live=2, rows=DENSE_FOLD_ROWS[fold_on])
        rows_impl = implementation("fold_rows", fold_on)
        loss, kl, kl_teacher = FoldedDenseKL.apply(
            *heads, lam, inv_temps, weights, with_teacher_kl, ws_bytes, rows_impl, caps
        )
        kl = rows.put(kl)
    else:
        kl, kl_teacher = DenseGopdKL.apply(*heads, lam, inv_temps, with_teacher_kl, backend, shard, caps)
        kl = rows.put(kl)
        loss = aggregate_token_losses(kl, mask, loss_agg, num_tokens)
    stats = {"kl": _masked_mean(kl, mask), "num_tokens": mask.sum().detach()}
    if not use_ref:
        stats["kl_teacher"] = stats["kl"]
    elif kl_teacher is not None:
        stats["kl_teacher"] = _masked_mean(rows.put(kl_teacher), mask)
    return loss, stats
