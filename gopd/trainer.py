"""The G-OPD loop: prompts -> student rollouts -> teacher / reference scoring -> update.

for step in 1 .. steps:
    rollouts = engine.generate(sampler.next_batch(prompts_per_step))   # rollout.py (this rank's share)
    scores   = score_rollouts(models, rollouts)                        # scoring.py
    updates  = update_step(models, rollouts, scores, ...)              # update.py (one, or a few
                                                                       #   over mini-batches)
    log / evaluate / checkpoint                                        # logs, evaluate, checkpoint

Under torchrun each rank runs this loop on its share of every batch (gopd.distributed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from gopd.checkpoint import (
    BEST_FILE,
    checkpoint_dir,
    load_optimizer_state,
    load_trainer_state,
    optimizer_shard_file,
    prune_checkpoints,
    record_best,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
    staging_dir,
    start_checkpoint,
)
from gopd.config import TrainConfig, to_dict
from gopd.data import load_examples, make_sampler
from gopd.distributed import (
    DistContext,
    check_replicas_agree,
    close_distributed,
    init_distributed,
)
from gopd.evaluate import evaluate_configured, evaluate_teachers
from gopd.fsdp import full_weights, is_sharded, load_shard_state, shard_frozen, shard_state, shard_student
from gopd.logs import MetricsLogger, NoMetrics
from gopd.models import context_length, is_lora, load_models, load_student_weights, resolve_device
from gopd.rollout import make_engine
from gopd.scoring import score_rollouts
from gopd.update import make_optimizer, make_scheduler, update_step
from gopd_kernels.backend import resolve_backend

logger = logging.getLogger("gopd")
MAX_BAD_STEPS = 3


def planned_steps(cfg: TrainConfig, n_prompts: int) -> int:
    return cfg.steps if cfg.steps is not None else math.ceil(n_prompts * cfg.epochs / cfg.prompts_per_step)


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Run (or resume) a G-OPD training; returns a summary with the evaluations and last loss.

    Launched by torchrun, each process is one data-parallel rank (gopd.distributed)."""
    cfg.validate()
    ctx, device = init_distributed(cfg.device)
    try:
        check_data_parallel(cfg, ctx)
        # the kernels' backend on this device now, not after the models load and the first
        # rollouts: a ValueError (triton on a CPU or an old GPU), or the fallback's log line
        resolve_backend(cfg.kernel_backend, resolve_device(device))
        if ctx.is_main:  # the settings as given (each rank's device is derived from them)
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            Path(cfg.output_dir, "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return _train(dataclasses.replace(cfg, device=device), resume, ctx)
    finally:
        close_distributed(ctx)


def check_data_parallel(cfg: TrainConfig, ctx: DistContext) -> None:
    """ValueError for settings that cannot run on ctx.world_size ranks."""
    if not ctx.enabled:
        for name in ("shard_optimizer", "fsdp", "shard_frozen"):
            if getattr(cfg, name):
                raise ValueError(f"{name}: needs several data-parallel ranks (launch with torchrun)")
        return
    for name in ("prompts_per_step", "mini_batch_prompts"):
        prompts = getattr(cfg, name)
        if prompts is not None and prompts % ctx.world_size:
            raise ValueError(
                f"{name}: {prompts} prompts cannot be shared evenly by {ctx.world_size} ranks; make it a "
                "multiple of the world size"
            )


def _train(cfg: TrainConfig, resume: str | None, ctx: DistContext) -> dict:
    torch.manual_seed(cfg.seed)  # the same on every rank: what loading draws (LoRA's initial A)
    random.seed(cfg.seed)
    models = load_models(cfg)
    if ctx.enabled:  # then each rank samples its own rollouts
        torch.manual_seed(cfg.seed * 1_009 + ctx.rank + 1)
        random.seed(cfg.seed * 1_009 + ctx.rank + 1)
    tokenizer, ctx_len = models.tokenizer, context_length(models.student)
    train_examples = load_examples(cfg.train_data, cfg, tokenizer, ctx_len)
    eval_examples = []
    if cfg.eval_data:
        eval_examples = load_examples(cfg.eval_data, cfg, tokenizer, ctx_len, for_eval=True)[
            : cfg.eval_max_prompts
        ]
    sampler = make_sampler(train_examples, cfg)  # one data order on every rank
    steps = planned_steps(cfg, len(train_examples))
    path = state = None
    if resume:
        path = resolve_resume(resume, cfg.output_dir)
        state = load_trainer_state(path)
        if bool(state.get("fsdp")) != cfg.fsdp:
            raise ValueError(f"resume: {path} was saved with fsdp {bool(state.get('fsdp'))}; resume it with "
                             f"the same (fsdp is {cfg.fsdp})")  # fmt: skip
        load_student_weights(models.student, path)
    check_replicas_agree(ctx, models.student)  # every rank starts from the same student
    if cfg.fsdp:
        shard_student(models.student, ctx, getattr(torch, cfg.dtype))
    if cfg.shard_frozen:
        for model in models.frozen():
            shard_frozen(model, ctx)
        logger.info("shard_frozen: %d teacher / reference models sharded over %d ranks",
                    len(models.frozen()), ctx.world_size)  # fmt: skip
    optimizer = make_optimizer(models.student, cfg, ctx)
    scheduler = make_scheduler(optimizer, cfg, steps * cfg.updates_per_step)  # it counts optimizer updates
    start = 0
    if resume:
        saved = load_optimizer_state(path, state, ctx.rank)
        if cfg.fsdp:  # this rank's float32 weight shards, then its optimizer state
            load_shard_state(models.student, optimizer, saved)
        else:
            optimizer.load_state_dict(saved)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        restore_rng(state, ctx, cfg.seed)
        start = state["step"]
        logger.info("resumed from %s at step %d", path, start)
    engine = make_engine(cfg, models.student, tokenizer, ctx)
    if len(engine.eos_ids) > 1:
        logger.info("responses end at the first of the EOS ids %s (the tokenizer's and the checkpoint's "
                    "generation_config)", engine.eos_ids)  # fmt: skip
    log = MetricsLogger(cfg, console=tqdm.write) if ctx.is_main else NoMetrics()
    summary = {"steps": steps, "evals": {}}

    samples_dir = Path(cfg.output_dir) / "eval_samples" if cfg.eval_log_samples else None

    def run_eval(step: int) -> None:
        if eval_examples:
            samples_to = samples_dir / f"step_{step:07d}.jsonl" if samples_dir else None
            result = evaluate_configured(engine, tokenizer, eval_examples, cfg, ctx, samples_to)
            log.log(step, result, "eval")
            summary["evals"][step] = result

    best = state.get("best") if resume else None  # keep_best: {"step", "metric", "value"}
    metric = f"avg@{cfg.eval_samples}"

    def new_best(step: int) -> bool:
        """keep_best: whether this step's evaluation beats every earlier one after step 0."""
        nonlocal best
        result = summary["evals"].get(step)
        if not (cfg.keep_best and step > 0 and result) or (best and result[metric] <= best["value"]):
            return False
        best = {"step": step, "metric": metric, "value": result[metric]}
        return True

    if start == 0 and cfg.eval_teachers:  # the bar, on the same prompts with the same settings
        summary["teacher_evals"] = evaluate_teachers(models, eval_examples, cfg, ctx, engine, samples_dir)
        for domain, result in summary["teacher_evals"].items():
            log.log(0, result, "eval_teacher" if len(models.teachers) == 1 else f"eval_teacher/{domain}")
    if start == 0:
        run_eval(0)
    bad_steps = 0
    saved_at = start
    bar = tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc="gopd", unit="step",
               disable=None if ctx.is_main else True)  # fmt: skip  # None: off when not a terminal
    for step in bar:
        t0 = time.perf_counter()
        batch = ctx.shard(sampler.next_batch(cfg.prompts_per_step))
        rollouts = engine.generate(batch, cfg.samples_per_prompt, cfg.temperature)
        t1 = time.perf_counter()
        scores = score_rollouts(models, rollouts, cfg, ctx) if cfg.objective == "sampled" else None
        t2 = time.perf_counter()
        updates = update_step(models, rollouts, scores, optimizer, scheduler, cfg, ctx)
        t3 = time.perf_counter()
        for i, (loss, stats, stepped) in enumerate(updates):
            where = f"step {step}" + (f" (update {i + 1} of {len(updates)})" if len(updates) > 1 else "")
            if stepped:
                bad_steps = 0
            elif stats.get("overflow"):
                logger.info("%s: float16 gradients overflowed at loss scale %g: update skipped, scale halved",
                            where, stats["loss_scale"])  # fmt: skip
            else:
                bad_steps += 1
                logger.warning("%s: non-finite loss or gradient (%s), update skipped", where, loss)
                if bad_steps >= MAX_BAD_STEPS:
                    raise RuntimeError(
                        f"{MAX_BAD_STEPS} non-finite updates in a row (last at {where}): stopping"
                    )
        taken = sum(stepped for _, _, stepped in updates)
        if taken:  # the engine samples the next batch from the updated student
            engine.update_weights(models.student)
        lengths, tokens = rollout_lengths(rollouts, list(models.teachers), engine.eos_ids, ctx)
        metrics = {
            **mean_over_updates(updates), **lengths,
            "tokens_per_s": tokens / (t3 - t0),
            "time_rollout": t1 - t0, "time_scoring": t2 - t1, "time_update": t3 - t2,
            "skipped": taken < len(updates),
        }  # fmt: skip
        if len(updates) > 1:
            metrics["updates"] = taken
        log.log(step, metrics)
        summary["last_loss"] = metrics["loss"]
        last = step == steps  # its evaluation comes before its checkpoint, which keep_best may need
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            run_eval(step)
        improved = new_best(step)
        if (cfg.save_every and step % cfg.save_every == 0) or last or improved:
            checkpoint(cfg, step, models, optimizer, scheduler, sampler, ctx, best)
            saved_at = step
        if improved and ctx.is_main:
            record_best(cfg.output_dir, best | {"path": str(checkpoint_dir(cfg.output_dir, step))})
            logger.info("step %d: best %s so far (%.4f): %s", step, metric, best["value"], BEST_FILE)
    log.close()
    summary["checkpoint"] = saved_at
    return summary


def rollout_lengths(rollouts, domains: list[str], eos_ids: list[int], ctx: DistContext) -> tuple[dict, float]:
    """Mean response length (tokens, EOS included) and the share of responses cut at
    max_new_tokens (no EOS) over every rank's rollouts, per domain too when there are several
    ("response_length/code": how a merged student's answers grow in each domain); and the
    response tokens of all ranks."""
    lengths = rollouts.response_mask.sum(-1).float()
    cut = rollouts.cut(eos_ids)
    groups = [None, *domains] if len(domains) > 1 else [None]
    sums = []
    for d in groups:
        rows = torch.tensor([d is None or ex.domain == d for ex in rollouts.examples])
        sums += [float(lengths[rows].sum()), float(cut[rows].sum()), float(rows.sum())]
    sums = ctx.sum(sums)
    out = {}
    for i, d in enumerate(groups):
        tokens, truncated, n = sums[3 * i : 3 * i + 3]
        if n:
            suffix = "" if d is None else f"/{d}"
            out |= {f"response_length{suffix}": tokens / n, f"truncated{suffix}": truncated / n}
    return out, sums[0]


def mean_over_updates(updates: list[tuple[float, dict, bool]]) -> dict:
    """One step's figures from its updates' (loss, stats, stepped): the mean of each number
    (the loss, the token-weighted stats, the gradient norm, the learning rate), whether any
    update overflowed."""
    records = [{"loss": loss, **stats} for loss, stats, _ in updates]
    keys = dict.fromkeys(k for r in records for k in r)
    out = {}
    for key in keys:
        values = [r[key] for r in records if key in r]
        out[key] = any(values) if isinstance(values[0], bool) else sum(values) / len(values)
    return out


def checkpoint(cfg: TrainConfig, step: int, models, optimizer, scheduler, sampler, ctx: DistContext,
               best: dict | None = None) -> None:  # fmt: skip
    """Rank 0 writes the checkpoint, with every rank's RNG state (and, when the optimizer is
    sharded, every rank writes its shard of it; under fsdp with its weight shards); the
    others wait for it. Replicated students are first checked to be identical (they must be:
    see gopd.distributed); a sharded one is gathered whole for the Hugging Face files."""
    fsdp = is_sharded(models.student)
    only = ".lora_" if is_lora(models.student) else None  # a LoRA checkpoint's files: its adapters
    weights = full_weights(models.student, getattr(torch, cfg.dtype), ctx, only) if fsdp else None  # gathers
    if not fsdp:
        check_replicas_agree(ctx, models.student)
    rngs = ctx.gather_objects(rng_state())
    sharded = fsdp or getattr(optimizer, "sharded", False)
    tmp = start_checkpoint(cfg.output_dir, step) if ctx.is_main else staging_dir(cfg.output_dir, step)
    ctx.barrier()
    if sharded:
        mine = shard_state(models.student, optimizer) if fsdp else optimizer.state_dict()
        torch.save(mine, tmp / optimizer_shard_file(ctx.rank))
    ctx.barrier()
    if ctx.is_main:
        state = {
            "step": step,
            "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": rngs[0],
        }
        state |= {"optimizer_shards": ctx.world_size} if sharded else {"optimizer": optimizer.state_dict()}
        state |= {"rng_ranks": rngs} if ctx.enabled else {}
        state |= {"fsdp": True} if fsdp else {}
        state |= {"best": best} if best else {}  # keep_best's bar, for a resumed run
        save_checkpoint(tmp, models.student, models.tokenizer, state, weights)
        if cfg.keep_checkpoints:
            spare = checkpoint_dir(cfg.output_dir, best["step"]) if best else None
            for path in prune_checkpoints(cfg.output_dir, cfg.keep_checkpoints, spare):
                logger.info("removed %s (keep_checkpoints: %d)", path, cfg.keep_checkpoints)
    ctx.barrier()


def restore_rng(state: dict, ctx: DistContext, seed: int) -> None:
    """Each rank resumes its own RNG stream when the checkpoint has one per rank for this many
    ranks; otherwise the streams restart from the seed and the step (said in a log line)."""
    if not ctx.enabled and "rng_ranks" not in state:
        set_rng_state(state["rng"])
        return
    ranks = state.get("rng_ranks") or [state["rng"]]
    if len(ranks) == ctx.world_size:
        set_rng_state(ranks[ctx.rank])
        return
    logger.warning(
        "resuming on %d ranks a run saved on %d: the random streams restart from the seed, step and rank, so "
        "the rollouts will not be those of an uninterrupted run", ctx.world_size, len(ranks),
    )  # fmt: skip
    seed = (seed * 1_000_003 + state["step"]) * 1_009 + ctx.rank
    torch.manual_seed(seed)
    random.seed(seed)
