"""Scoring stage: teacher (per domain) and reference log-probs of the sampled tokens, and
the student's own when a step takes several updates.

No gradient, micro-batched (gopd.batching); each frozen model gives its final hidden states at the
response positions and gopd_kernels.frozen_logprobs streams the teacher's and the
reference's heads together.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from gopd.batching import micro_batch, step_plan
from gopd.config import TrainConfig
from gopd.distributed import SINGLE, DistContext
from gopd.fsdp import is_sharded, release
from gopd.models import Models, final_hidden, frozen_on_device, head_bias, head_weight, logits_of
from gopd.packing import packed_response_hidden
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


def response_hidden(model, rollouts: Rollouts, packed: bool = False) -> torch.Tensor:
    """[B, R, D]: the hidden state at position t predicts token t + 1, so the response tokens
    (positions P .. P+R-1) are predicted from positions P-1 .. P+R-2. packed: from one row of
    the rows' real tokens (gopd.packing; zeros where a row has no response token)."""
    if packed:
        return packed_response_hidden(model, rollouts)
    hidden = final_hidden(model, rollouts.sequences, rollouts.attention_mask)
    return hidden[:, rollouts.prompt_len - 1 : -1]


def _per_token(rollouts: Rollouts, cfg: TrainConfig, ctx: DistContext, domains: list | None, in_step: bool,
               models_for, score, outs: list[torch.Tensor | None]) -> None:  # fmt: skip
    """Runs score(part, *models) over the step's micro-batches (step_plan) and writes the
    [b, width] results it returns into `outs`, [B, R] tensors (a None there is skipped).
    models_for(domain) is a context manager giving the models a domain's micro-batches need."""
    limits = (cfg.micro_batch_size, cfg.micro_batch_tokens)
    plan = step_plan(rollouts, domains, *limits, ctx=ctx, in_step=in_step, packed=cfg.pack_sequences)
    for domain, chunks in plan:
        with models_for(domain) as held:
            for chunk, counts in chunks:
                part, idx = micro_batch(rollouts, chunk)
                values = score(part, *held)
                release(*held)  # sharded ones: the head gathered for this micro-batch
                if not counts:  # a repeat that only kept the ranks in step
                    continue
                for out, value in zip(outs, values, strict=True):
                    if out is not None:
                        out[idx, : part.width] = value.float().cpu()


@torch.no_grad()
def score_rollouts(models: Models, rollouts: Rollouts, cfg: TrainConfig, ctx: DistContext = SINGLE) -> Scores:
    def score(part: Rollouts, teacher, ref) -> tuple:
        t_hidden = response_hidden(teacher, part, cfg.pack_sequences)
        r_hidden = None if ref is None else response_hidden(ref, part, cfg.pack_sequences)
        out = frozen_logprobs(
            t_hidden, head_weight(teacher), part.targets.to(t_hidden.device),
            r_hidden, None if ref is None else head_weight(ref),
            teacher_bias=head_bias(teacher), ref_bias=None if ref is None else head_bias(ref),
            temperature=cfg.temperature, **logits_of(teacher).kwargs("teacher_"),
            **({} if ref is None else logits_of(ref).kwargs("ref_")), ignore_index=IGNORE,
            backend=cfg.kernel_backend,
        )  # fmt: skip
        return out.teacher_logp, out.ref_logp

    # with offload_frozen: each domain's teacher (and the reference) on the device once for all
    # its micro-batches, not once per micro-batch; in_step: see step_plan
    shape = rollouts.response_mask.shape
    scores = Scores(torch.zeros(shape), None if models.reference is None else torch.zeros(shape))
    on_device = lambda domain: frozen_on_device(models, domain)  # noqa: E731
    outs = [scores.teacher_logp, scores.ref_logp]
    _per_token(rollouts, cfg, ctx, list(models.teachers), models.frozen_sharded, on_device, score, outs)
    return scores


@torch.no_grad()
def student_logprobs(
    models: Models, rollouts: Rollouts, cfg: TrainConfig, ctx: DistContext = SINGLE
) -> torch.Tensor:
    """[B, R] o_t: the student's log-probs of its sampled tokens, before the step's first update.
    Only a step of several updates needs them (TrainConfig.updates_per_step): the later ones
    are off-policy, and o gives their advantage, PPO ratio and importance weight."""
    student = models.student

    def score(part: Rollouts, model) -> tuple:
        hidden = response_hidden(model, part, cfg.pack_sequences)
        targets = part.targets.to(hidden.device)
        return (token_logprobs(hidden, head_weight(model), targets, bias=head_bias(model),
                               temperature=cfg.temperature, **logits_of(model).kwargs(),
                               ignore_index=IGNORE, backend=cfg.kernel_backend),)  # fmt: skip

    old_logp = torch.zeros(rollouts.response_mask.shape)
    held = lambda _: nullcontext((student,))  # noqa: E731
    _per_token(rollouts, cfg, ctx, None, is_sharded(student), held, score, [old_logp])
    return old_logp
