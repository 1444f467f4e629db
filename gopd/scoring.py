"""Scoring stage: teacher (per domain) and reference log-probs of the sampled tokens.

No gradient, micro-batched (gopd.batching); each frozen model gives its final hidden states at the
response positions and gopd_kernels.frozen_logprobs streams the teacher's and the
reference's heads together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gopd.batching import micro_batch, micro_batches
from gopd.config import TrainConfig
from gopd.models import Models, final_hidden, frozen_on_device, head_bias, head_weight
from gopd.rollout import IGNORE, Rollouts
from gopd_kernels import frozen_logprobs


@dataclass
class Scores:
    teacher_logp: torch.Tensor  # [B, R] T_t of each row's own (domain) teacher
    ref_logp: torch.Tensor | None  # [B, R] R_t, None when the reference is not needed


def response_hidden(model, rollouts: Rollouts) -> torch.Tensor:
    """[B, R, D]: the hidden state at position t predicts token t + 1, so the response tokens
    (positions P .. P+R-1) are predicted from positions P-1 .. P+R-2."""
    hidden = final_hidden(model, rollouts.sequences, rollouts.attention_mask)
    return hidden[:, rollouts.prompt_len - 1 : -1]


def rows_by_domain(rollouts: Rollouts, domains) -> dict[str, list[int]]:
    rows = {d: [] for d in domains}
    for i, ex in enumerate(rollouts.examples):
        rows[ex.domain].append(i)
    return {d: r for d, r in rows.items() if r}


@torch.no_grad()
def score_rollouts(models: Models, rollouts: Rollouts, cfg: TrainConfig) -> Scores:
    B, R = rollouts.response_mask.shape
    teacher_logp = torch.zeros(B, R)
    ref_logp = torch.zeros(B, R) if models.reference is not None else None
    for domain, rows in rows_by_domain(rollouts, models.teachers).items():
        # with offload_frozen: on the device once per domain, not once per micro-batch
        with frozen_on_device(models, domain) as (teacher, ref):
            for chunk in micro_batches(rollouts, rows, cfg.micro_batch_size, cfg.micro_batch_tokens):
                part, idx = micro_batch(rollouts, chunk)
                t_hidden = response_hidden(teacher, part)
                r_hidden = None if ref is None else response_hidden(ref, part)
                out = frozen_logprobs(
                    t_hidden, head_weight(teacher), part.targets.to(t_hidden.device),
                    r_hidden, None if ref is None else head_weight(ref),
                    teacher_bias=head_bias(teacher), ref_bias=None if ref is None else head_bias(ref),
                    temperature=cfg.temperature, ignore_index=IGNORE, backend=cfg.kernel_backend,
                )  # fmt: skip
                teacher_logp[idx, : part.width] = out.teacher_logp.float().cpu()
                if ref_logp is not None:
                    ref_logp[idx, : part.width] = out.ref_logp.float().cpu()
    return Scores(teacher_logp, ref_logp)
