"""Scoring the frozen models: teacher and reference log-probs of the student's samples.

Both come from their own final hidden states and LM heads, without gradient. On the Triton
backend, bf16 heads on CUDA take their logit tiles from cuBLAS, one model after the other
(as token_logprobs; on the H100 at N = 16384, D = 4096, V = 151936: 68.5 ms for a 1.0 GiB
tile workspace, against 89.3 ms and no workspace for the fused launch below); other heads,
or GOPD_LOGITS_GEMM=triton, get one launch that streams the teacher's and the reference's
logit tiles side by side (sharing the targets and the vocabulary loop). The torch backend
runs the two chunked passes one after the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from gopd_kernels.backend import implementation, resolve_backend, workspace_bytes
from gopd_kernels.losses import check_lam, check_per_token, gopd_advantage, head_names
from gopd_kernels.ops.vocab_parallel import local_head, vocab_shard
from gopd_kernels.selection import RowSelection
from gopd_kernels.validation import (
    check_backend_dtype,
    check_lm_head,
    check_matching_head,
    check_ref_settings,
    check_targets,
    logit_cap,
    logit_temperature,
)

if TYPE_CHECKING:  # annotations only: torch.distributed is missing from some torch builds
    from torch.distributed import ProcessGroup


class FrozenScores(NamedTuple):
    teacher_logp: torch.Tensor  # [...] float32, 0.0 at ignored positions
    ref_logp: torch.Tensor | None  # [...] or None without a reference
    advantage: torch.Tensor | None  # gopd_advantage(student_logp, ...) when student_logp is given


@torch.compiler.disable  # as token_logprobs
@torch.no_grad()
def frozen_logprobs(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    *,
    teacher_bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    student_logp: torch.Tensor | None = None,
    lam: float = 1.0,
    temperature: float = 1.0,
    teacher_logit_scale: float = 1.0,
    ref_logit_scale: float = 1.0,
    teacher_logit_softcap: float | None = None,
    ref_logit_softcap: float | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    vocab_group: ProcessGroup | None = None,
) -> FrozenScores:
    """Teacher (T_t) and reference (R_t) log-probs of `targets` at temperature tau, and the
    G-OPD advantage lam (T - R) - (s - R) when ``student_logp`` (s) is given.

    Hidden sizes of teacher and reference may differ; their vocabularies must match (and
    the targets index both). Without a reference (``ref_hidden=None``) only lam == 1 can
    give an advantage (A = T - s). Never [N, V], no autograd graph.

    teacher_logit_scale, ref_logit_scale, teacher_logit_softcap, ref_logit_softcap: each model's
    logit multiplier s and soft-cap c (see token_logprobs'): its log-probs are those of
    softmax(c tanh(s (h W^T + b) / c) / tau), or of softmax(s (h W^T + b) / tau) without a cap.

    vocab_group: vocabulary-parallel heads, as in token_logprobs: the teacher's and the
    reference's weights (and biases) hold this rank's rows, shard by shard alike; every
    rank gets the whole log-probs.
    """
    check_lm_head(
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        names=("teacher_hidden", "teacher_weight", "teacher_bias"),
    )
    teacher_hidden, teacher_weight, teacher_bias, vocab_group = local_head(
        teacher_hidden, teacher_weight, teacher_bias, vocab_group, head_names("teacher")
    )
    if ref_hidden is not None:
        ref_hidden, ref_weight, ref_bias, vocab_group = local_head(
            ref_hidden, ref_weight, ref_bias, vocab_group, head_names("ref")
        )
    shard = vocab_shard(vocab_group, True, teacher_hidden, teacher_weight, teacher_bias, targets)
    vocab = teacher_weight.shape[0] if shard is None else shard.vocab
    check_targets(targets, teacher_hidden.shape[:-1], vocab, ignore_index, teacher_hidden.device)
    temperatures = [logit_temperature(temperature, teacher_logit_scale, "teacher_logit_scale")]
    caps = [logit_cap(temperature, teacher_logit_softcap, "teacher_logit_softcap")]
    ref_temperature = logit_temperature(temperature, ref_logit_scale, "ref_logit_scale")
    ref_cap = logit_cap(temperature, ref_logit_softcap, "ref_logit_softcap")
    check_ref_settings(
        ref_hidden, ref_bias=ref_bias, ref_logit_scale=ref_logit_scale, ref_logit_softcap=ref_logit_softcap
    )
    if ref_hidden is not None:
        temperatures.append(ref_temperature)
        caps.append(ref_cap)
    lam = check_lam(lam)
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("ref_hidden and ref_weight must be given together")
    models = [(teacher_hidden, teacher_weight, teacher_bias)]
    if ref_hidden is not None:
        check_lm_head(ref_hidden, ref_weight, ref_bias, names=("ref_hidden", "ref_weight", "ref_bias"))
        check_matching_head("ref", ref_hidden, ref_weight, "teacher", teacher_hidden, teacher_weight)
        models.append((ref_hidden, ref_weight, ref_bias))
    elif student_logp is not None and lam != 1.0:
        raise ValueError(f"an advantage with lam={lam} != 1 needs the reference (ref_hidden, ref_weight)")
    if student_logp is not None:
        check_per_token(student_logp, "student_logp", torch.empty(targets.shape, device=targets.device))
    backend = resolve_backend(backend, teacher_hidden.device)
    check_backend_dtype(backend, teacher_hidden.dtype, "teacher_hidden")

    rows = RowSelection(targets != ignore_index)
    y = rows.take(targets).long().contiguous()
    compact = [(rows.take(h).contiguous(), w, b) for h, w, b in models]
    logps = _score(compact, y, [1.0 / t for t in temperatures], caps, backend, shard)
    teacher_logp = rows.put(logps[0])
    ref_logp = rows.put(logps[1]) if len(logps) > 1 else None
    advantage = None
    if student_logp is not None:
        advantage = gopd_advantage(student_logp, teacher_logp, ref_logp, lam=lam)
        advantage = torch.where(targets != ignore_index, advantage, torch.zeros_like(advantage))
    return FrozenScores(teacher_logp, ref_logp, advantage)


def _score(models, targets, inv_temps, caps, backend, shard=None) -> list[torch.Tensor]:
    """Each model's log-probs of `targets` (one 1 / tau each in inv_temps, one cap / tau or None
    each in caps)."""
    if models[0][0].shape[0] == 0:
        return [models[0][0].new_zeros(0, dtype=torch.float32) for _ in models]
    impl = implementation("linear_logsoftmax", backend)
    if shard is not None:
        targets = shard.local_targets(targets)
    operands = [t for model in models for t in model]
    capped = any(cap is not None for cap in caps)
    if backend == "triton" and not impl.torch_logits(False, *operands, capped=capped):  # one launch for both
        scores = impl.forward_models(models, targets, inv_temps, False, caps)
    else:  # the torch backend, or the Triton one with cuBLAS tiles: one model after the other
        scores = [
            impl.forward(h, w, b, targets, inv_temp, False, workspace_bytes(backend, w), cap=cap)
            for (h, w, b), inv_temp, cap in zip(models, inv_temps, caps, strict=True)
        ]
    if shard is not None:  # each model's shards merged over the group
        scores = [shard.merge(targets, logp, lse, None) for logp, lse, _ in scores]
    return [logp for logp, _, _ in scores]
