"""Update stage: the G-OPD loss over micro-batches, one optimizer step.

The normalisation is global: with token-mean every micro-batch divides by the valid tokens
of the whole step (num_tokens), with the sequence-mean modes each micro-batch's mean is
weighted by its share of the step's sequences; so accumulation gives exactly the loss of
the whole batch at once (TRL #4719).
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch.distributed.tensor import DTensor

from gopd.batching import micro_batch, step_plan
from gopd.config import TrainConfig
from gopd.distributed import SINGLE, DistContext, all_reduce_grads, broadcast_from_owners
from gopd.fsdp import is_sharded, release
from gopd.models import Models, frozen_on_device, head_bias, head_weight, logits_of
from gopd.optim import LossScale, MasterWeightAdamW, ScaledAdamW, partition
from gopd.rollout import IGNORE, Rollouts
from gopd.scoring import Scores, response_hidden, student_logprobs
from gopd_kernels import gopd_dense_loss, gopd_loss

logger = logging.getLogger("gopd")
MEAN_STATS = ("advantage", "reverse_kl", "reward", "clip_frac", "is_weight_mean", "rollout_mismatch", "kl",
              "kl_teacher", "entropy")  # fmt: skip
MAX_STATS = ("is_weight_max",)


class StatsAccumulator:
    """Token-weighted means of the per-micro-batch stats, maxima where a max was asked for;
    overall and, for the `domains` given (a multi-teacher run's), per domain ("reward/math")."""

    def __init__(self, domains: list[str] | tuple = ()):
        self.groups: list[str | None] = [None, *domains]  # None: over all tokens
        self.sums: dict[tuple, float] = {}  # keyed by (stat, group)
        self.tokens: dict[tuple, float] = {}
        self.maxima: dict[tuple, float] = {}

    def add(self, stats: dict[str, torch.Tensor], domain: str | None = None) -> None:
        n = float(stats["num_tokens"])
        for group in [None] + ([domain] if domain in self.groups[1:] else []):
            for key, value in stats.items():
                slot = (key, group)
                if key in MEAN_STATS:
                    self.sums[slot] = self.sums.get(slot, 0.0) + float(value) * n
                    self.tokens[slot] = self.tokens.get(slot, 0.0) + n
                elif key in MAX_STATS:
                    self.maxima[slot] = max(self.maxima.get(slot, -math.inf), float(value))

    def all_reduce(self, ctx: DistContext) -> None:
        """Combine the ranks' accumulators (sums add up, maxima take the max), every slot in
        one order on every rank, whichever domains a rank saw."""
        if not ctx.enabled:
            return
        means = [(k, g) for g in self.groups for k in MEAN_STATS]
        both = ctx.sum([self.sums.get(s, 0.0) for s in means] + [self.tokens.get(s, 0.0) for s in means])
        self.sums = dict(zip(means, both[: len(means)], strict=True))
        self.tokens = dict(zip(means, both[len(means) :], strict=True))
        peaks = [(k, g) for g in self.groups for k in MAX_STATS]
        maxima = ctx.max([self.maxima.get(s, -math.inf) for s in peaks])
        self.maxima = {s: v for s, v in zip(peaks, maxima, strict=True) if v > -math.inf}

    def result(self) -> dict[str, float]:
        name = lambda key, group: key if group is None else f"{key}/{group}"  # noqa: E731
        out = {name(*s): self.sums[s] / self.tokens[s] for s in self.sums if self.tokens[s] > 0}
        return out | {name(*s): v for s, v in self.maxima.items()}


def _part_weight(cfg: TrainConfig, part: Rollouts, total_seqs: int) -> float:
    """Scale of a micro-batch's loss: 1 for token-mean (num_tokens does it), else its share of sequences."""
    if cfg.loss_agg == "token-mean":
        return 1.0
    return float(part.response_mask.any(-1).sum()) / max(total_seqs, 1)


def _sampled_loss(models, part, scores, idx, cfg, num_tokens):
    student = models.student
    hidden = response_hidden(student, part, cfg.pack_sequences)
    dev = hidden.device
    cols = slice(0, part.width)  # the micro-batch is trimmed (gopd.batching), the scores are not
    here = lambda t: None if t is None else t[idx, cols].to(dev)  # noqa: E731  (this micro-batch's rows)
    return gopd_loss(
        hidden, head_weight(student), part.targets.to(dev), here(scores.teacher_logp), here(scores.ref_logp),
        bias=head_bias(student), lam=cfg.lam, temperature=cfg.temperature, **logits_of(student).kwargs(),
        old_logp=here(scores.old_logp),
        rollout_logp=part.rollout_logp.to(dev),
        clip_ratio=tuple(cfg.clip_ratio), is_cap=cfg.is_cap, loss_agg=cfg.loss_agg,
        num_tokens=num_tokens, ignore_index=IGNORE, backend=cfg.kernel_backend, fold=cfg.loss_fold,
        return_entropy=True,  # from the loss's own read of the logits: ~3 % of a CPU fold, ~0 on Triton's
    )  # fmt: skip


def _dense_loss(models, part, teacher, ref, cfg, num_tokens):
    packed = cfg.pack_sequences
    hidden = response_hidden(models.student, part, packed)
    with torch.no_grad():
        t_hidden = response_hidden(teacher, part, packed)
        r_hidden = None if ref is None else response_hidden(ref, part, packed)
    return gopd_dense_loss(
        hidden, head_weight(models.student), t_hidden, head_weight(teacher),
        r_hidden, None if ref is None else head_weight(ref),
        student_bias=head_bias(models.student), teacher_bias=head_bias(teacher),
        ref_bias=None if ref is None else head_bias(ref),
        lam=cfg.lam, temperature=cfg.temperature, **logits_of(models.student).kwargs("student_"),
        **logits_of(teacher).kwargs("teacher_"), **({} if ref is None else logits_of(ref).kwargs("ref_")),
        mask=part.response_mask.to(hidden.device),
        loss_agg=cfg.loss_agg, num_tokens=num_tokens, backend=cfg.kernel_backend, fold=cfg.loss_fold,
    )  # fmt: skip


def update_step(
    models: Models,
    rollouts: Rollouts,
    scores: Scores | None,
    optimizer,
    scheduler,
    cfg: TrainConfig,
    ctx: DistContext = SINGLE,
) -> list[tuple[float, dict, bool]]:
    """The step's optimizer updates: policy_update over each mini-batch of cfg.mini_batch_prompts
    prompts (this rank's rows of them), cfg.update_epochs times over; [(loss, stats, stepped)]
    per update. With one update (the default) it is on-policy, o = s detached. With several,
    every one after the first is off-policy: the sampled loss then takes o from the student
    before the first update (student_logprobs, one more forward over the step), so the PPO
    ratio exp(s - o) and its clipping act. The dense loss needs no o: each update is the
    KL at the rollouts' prefixes under the student as it is then."""
    # this rank's share of each mini-batch: the rows are prompt-major and each rank holds every
    # W-th prompt (DistContext.shard), so its i-th slice is its part of the global i-th mini-batch
    prompts = (cfg.mini_batch_prompts or cfg.prompts_per_step) // ctx.world_size
    size, rows = prompts * cfg.samples_per_prompt, list(range(len(rollouts.examples)))
    groups = [rows[i : i + size] for i in range(0, len(rows), size)] * cfg.update_epochs
    if len(groups) > 1 and scores is not None:
        scores = replace(scores, old_logp=student_logprobs(models, rollouts, cfg, ctx))
    updates = []
    for group in groups:
        mine, my_scores = rollouts, scores
        if len(group) < len(rows):  # a mini-batch: its rows (the whole step needs no copy)
            mine, my_scores = rollouts.select(group), None if scores is None else scores.select(group)
        updates.append(policy_update(models, mine, my_scores, optimizer, scheduler, cfg, ctx))
    return updates


def policy_update(
    models: Models,
    rollouts: Rollouts,
    scores: Scores | None,
    optimizer,
    scheduler,
    cfg: TrainConfig,
    ctx: DistContext = SINGLE,
):
    """One optimizer step over the step's rollouts. Returns (loss, stats, stepped: bool).

    Under data parallelism (gopd.distributed) `rollouts` are this rank's share: the
    normalisers, the loss, the stats and the gradients are summed over the ranks.
    """
    mask = rollouts.response_mask
    total_tokens, total_seqs = (int(x) for x in ctx.sum([float(mask.sum()), float(mask.any(-1).sum())]))
    num_tokens = max(total_tokens, 1) if cfg.loss_agg == "token-mean" else None
    # a multi-teacher run: each domain's stats as well, so each micro-batch holds one domain
    domains = list(models.teachers)
    by_domain = len(domains) > 1
    acc = StatsAccumulator(domains if by_domain else ())
    loss_total = 0.0
    scaler = getattr(optimizer, "loss_scale", None)  # a float16 student's (gopd.optim)
    scale = scaler.scale if scaler else 1.0
    sharded = is_sharded(models.student)
    dense = cfg.objective == "dense"  # it needs each row's own teacher during the update
    in_step = sharded or (dense and models.frozen_sharded)
    limits = (cfg.micro_batch_size, cfg.micro_batch_tokens)
    plan = step_plan(rollouts, domains if dense or by_domain else None, *limits, ctx=ctx, in_step=in_step,
                     packed=cfg.pack_sequences)  # fmt: skip
    for domain, chunks in plan:
        # with offload_frozen, the domain's teacher (and the reference) come to the device once
        # for all its micro-batches, not once per micro-batch
        frozen = frozen_on_device(models, domain) if dense else nullcontext((None, None))
        with frozen as (teacher, ref):
            for chunk, counts in chunks:  # counts: False for step_plan's repeats, which only keep step
                part, idx = micro_batch(rollouts, chunk)
                if cfg.objective == "sampled":
                    loss, stats = _sampled_loss(models, part, scores, idx, cfg, num_tokens)
                else:
                    loss, stats = _dense_loss(models, part, teacher, ref, cfg, num_tokens)
                weighted = loss * (_part_weight(cfg, part, total_seqs) if counts else 0.0)
                (weighted * scale).backward()
                release(teacher, ref)  # sharded ones: their gathered head, kept through the backward
                if counts:
                    loss_total += float(weighted.detach())
                    acc.add(stats, domain)
    slots = gradient_slots(optimizer)
    if not sharded:  # FSDP has reduce-scattered (summed) them in the backward
        all_reduce_grads(ctx, slots)
    (loss_total,) = ctx.sum([loss_total])
    acc.all_reduce(ctx)
    if scaler and math.isfinite(loss_total):
        overflow = not optimizer.unscale_grads()
        if overflow and scale > 1.0:  # skipped, not a bad step: the next runs at half the scale
            scaler.update(overflow=True)
            optimizer.zero_grad(set_to_none=True)
            return loss_total, acc.result() | {"loss_scale": scale, "overflow": True}, False
        if not overflow:
            scaler.update(overflow=False)
        # an overflow at scale 1 is no overflow: the non-finite check below skips and counts it
    grad_norm = clip_gradients(slots, cfg.grad_clip)
    stats = acc.result() | {"grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
    if scaler:
        stats |= {"loss_scale": scale, "overflow": False}
    if not (math.isfinite(loss_total) and math.isfinite(float(grad_norm))):
        optimizer.zero_grad(set_to_none=True)
        return loss_total, stats, False
    optimizer.step()
    if getattr(optimizer, "sharded", False):  # each rank stepped its own share of the weights
        broadcast_from_owners(ctx, optimizer.model_params, optimizer.owners)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, stats, True


def gradient_slots(optimizer) -> list:
    """What holds each trained weight's gradient as `.grad`: the parameters of a plain
    optimizer, MasterWeightAdamW's slots (float32 masters, or GradSlots where sharded)."""
    if isinstance(optimizer, MasterWeightAdamW):
        return optimizer.slots
    return [p for group in optimizer.param_groups for p in group["params"]]


def clip_gradients(slots: list, max_norm: float | None) -> torch.Tensor:
    """The gradients' global 2-norm; scaled to max_norm when above it (as clip_grad_norm_)."""
    grads = [s.grad for s in slots if s.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):  # FSDP's shards: the norm over all of them
        norm = norm.full_tensor()
    if max_norm:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.device))
    return norm


def make_optimizer(model, cfg: TrainConfig, ctx: DistContext = SINGLE) -> torch.optim.AdamW:
    """AdamW over the trainable weights; on float32 master copies when they are bf16 / fp16,
    or when the optimizer is sharded over the ranks (cfg.shard_optimizer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    if is_sharded(model):  # float32 shards, cast to dtype only for the compute (gopd.fsdp)
        if cfg.dtype != "float16":
            return torch.optim.AdamW(params, **kwargs)
        logger.info("float16 compute under fsdp: dynamic loss scaling (from %g)", LossScale.INIT)
        everywhere = lambda finite: not ctx.max([float(not finite)])[0]  # noqa: E731
        return ScaledAdamW(params, agree=everywhere, **kwargs)
    if any(p.dtype == torch.float16 for p in params):
        logger.info("float16 student: dynamic loss scaling (from %g)", LossScale.INIT)
    if cfg.shard_optimizer and ctx.enabled:
        owners = partition([p.numel() for p in params], ctx.world_size)
        mine = sum(p.numel() for p, o in zip(params, owners, strict=True) if o == ctx.rank) / 1e6
        total = sum(p.numel() for p in params) / 1e6
        logger.info("sharded optimizer: each rank keeps the float32 masters and AdamW moments of its share "
                    "of the weights (rank 0: %.2fM of %.2fM)", mine, total)  # fmt: skip
        return MasterWeightAdamW(params, owners=owners, rank=ctx.rank, **kwargs)
    if all(p.dtype == torch.float32 for p in params):
        return torch.optim.AdamW(params, **kwargs)
    logger.info("half-precision student: AdamW steps float32 master copies of its weights")
    return MasterWeightAdamW(params, **kwargs)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
