"""Scoring stage: teacher (per domain) and reference log-probs of the sampled tokens, and
the student's own when a step takes several updates.

No gradient, micro-batched (gopd.batching); each frozen model gives its final hidden states at the
response positions and gopd_kernels.frozen_logprobs streams the teacher's and the
reference's heads together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gopd.batching import micro_batch, step_plan
from gopd.config import TrainConfig
from gopd.distributed import SINGLE, DistContext
from gopd.fsdp import is_sharded, release
from gopd.models import Models, final_hidden, frozen_on_device, head_bias, head_weight
from gopd.rollout import IGNORE, Rollouts
from gopd_kernels import frozen_logprobs, token_logprobs


@dataclass
class Scores:
    teacher_logp: torch.Tensor  # [B, R] T_t of each row's own (domain) teacher
    ref_logp: torch.Tensor | None  # [B, R] R_t, None when the reference is not needed
    old_logp: torch.Tensor | None = None  # [B, R] o_t, the student's before the step's updates (off-policy)

    def select(self, rows: list[int]) -> Scores:
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Scores(pick(self.teacher_logp), pick(self.ref_logp), pick(self.old_logp))


def response_hidden(model, rollouts: Rollouts) -> torch.Tensor:
    """[B, R, D]: the hidden state at position t predicts token t + 1, so the response tokens
    (positions P .. P+R-1) are predicted from positions P-1 .. P+R-2."""
    hidden = final_hidden(model, rollouts.sequences, rollouts.attention_mask)
    return hidden[:, rollouts.prompt_len - 1 : -1]


@torch.no_grad()
def score_rollouts(models: Models, rollouts: Rollouts, cfg: TrainConfig, ctx: DistContext = SINGLE) -> Scores:
    B, R = rollouts.response_mask.shape
    teacher_logp = torch.zeros(B, R)
    ref_logp = torch.zeros(B, R) if models.reference is not None else None
    in_step = models.frozen_sharded  # see step_plan
    limits = (cfg.micro_batch_size, cfg.micro_batch_tokens)
    for domain, chunks in step_plan(rollouts, list(models.teachers), *limits, ctx=ctx, in_step=in_step):
        # with offload_frozen: on the device once per domain, not once per micro-batch
        with frozen_on_device(models, domain) as (teacher, ref):
            for chunk, counts in chunks:
                part, idx = micro_batch(rollouts, chunk)
                t_hidden = response_hidden(teacher, part)
                r_hidden = None if ref is None else response_hidden(ref, part)
                out = frozen_logprobs(
                    t_hidden, head_weight(teacher), part.targets.to(t_hidden.device),
                    r_hidden, None if ref is None else head_weight(ref),
                    teacher_bias=head_bias(teacher), ref_bias=None if ref is None else head_bias(ref),
                    temperature=cfg.temperature, ignore_index=IGNORE, backend=cfg.kernel_backend,
                )  # fmt: skip
                release(teacher, ref)
                if not counts:  # a repeat that only kept the ranks in step
                    continue
                teacher_logp[idx, : part.width] = out.teacher_logp.float().cpu()
                if ref_logp is not None:
                    ref_logp[idx, : part.width] = out.ref_logp.float().cpu()
    return Scores(teacher_logp, ref_logp)


@torch.no_grad()
def student_logprobs(
    models: Models, rollouts: Rollouts, cfg: TrainConfig, ctx: DistContext = SINGLE
) -> torch.Tensor:
    """[B, R] o_t: the student's log-probs of its sampled tokens, before the step's first update.
    Only a step of several updates needs them (TrainConfig.updates_per_step): the later ones
    are off-policy, and o gives their advantage, PPO ratio and importance weight."""
    student = models.student
    old_logp = torch.zeros(rollouts.response_mask.shape)
    limits = (cfg.micro_batch_size, cfg.micro_batch_tokens)
    for _, chunks in step_plan(rollouts, None, *limits, ctx=ctx, in_step=is_sharded(student)):
        for chunk, counts in chunks:
            part, idx = micro_batch(rollouts, chunk)
            hidden = response_hidden(student, part)
            logp = token_logprobs(
                hidden, head_weight(student), part.targets.to(hidden.device), temperature=cfg.temperature,
                ignore_index=IGNORE, backend=cfg.kernel_backend,
            )  # fmt: skip
            release(student)
            if counts:
                old_logp[idx, : part.width] = logp.float().cpu()
    return old_logp
