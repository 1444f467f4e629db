"""FSDP (gopd.fsdp): 2 CPU ranks over gloo, the student or the frozen models sharded, give the
single process's step.

The end-to-end run through torchrun (train, save, resume exactly) is in test_distributed.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from gopd import distributed
from gopd.batching import step_plan
from gopd.checkpoint import save_checkpoint, start_checkpoint
from gopd.distributed import DistContext
from gopd.fsdp import full_weights, is_sharded, load_shard_state, shard_frozen, shard_state, shard_student
from gopd.models import load_models, servable_weights
from gopd.scoring import score_rollouts
from gopd.trainer import check_data_parallel
from gopd.update import make_optimizer, make_scheduler, policy_update
from tests.trainer.conftest import base_config, write_data
from tests.trainer.test_distributed import run_ranks
from tests.trainer.test_stages import rollouts_for

TWO_TEACHERS = dict(teachers="two", train_data="domains")  # resolved in step(): tiny's paths
# name: (settings, fsdp: the student sharded)
CASES = {
    "sampled, token-mean": (dict(), True),
    "sampled, bf16": (dict(dtype="bfloat16", loss_agg="seq-mean-token-sum"), True),
    # from 2^10: the default 2^16 overflows this model's fp16 backward (its first step skipped)
    "sampled, fp16 (loss scaling)": (dict(dtype="float16", loss_scale=2.0**10), True),
    "sampled, gradient checkpointing, frozen head": (
        dict(gradient_checkpointing=True, freeze_lm_head=True),
        True,
    ),
    "dense, two domain teachers": (
        TWO_TEACHERS
        | dict(objective="dense", is_cap=None, loss_agg="seq-mean-token-mean", micro_batch_size=2),
        True,
    ),
    # the teachers and a separate reference sharded, the student replicated; then all sharded
    "sampled, shard_frozen, two teachers and a reference": (
        TWO_TEACHERS | dict(shard_frozen=True, lam=1.25, reference="separate", micro_batch_size=2),
        False,
    ),
    "dense, shard_frozen and fsdp": (
        TWO_TEACHERS | dict(objective="dense", is_cap=None, shard_frozen=True, lam=1.25, micro_batch_size=2),
        True,
    ),
}
if importlib.util.find_spec("peft"):  # LoRA: the adapters sharded with their layers, the base frozen
    # the reference is the student with its adapters off: reading it takes the ranks in step
    CASES["sampled, LoRA, lam 1.25"] = (dict(lora_rank=4, lam=1.25), True)
    CASES["dense, LoRA, bf16, gradient checkpointing"] = (
        dict(
            lora_rank=4,
            lam=1.25,
            objective="dense",
            is_cap=None,
            dtype="bfloat16",
            gradient_checkpointing=True,
        ),
        True,
    )


def step(ctx: DistContext, tiny, tmp_path, overrides: dict, fsdp: bool):
    """One AdamW step on ctx's share of 8 prompts x 2 samples, scored by this rank: (loss, stats,
    full weights, real micro-batches of this rank, its checkpoint's directory, its scores, its
    rows, a LoRA student's merged weights; full weights and checkpoint on rank 0)."""
    overrides = dict(overrides)
    loss_scale = overrides.pop("loss_scale", None)
    if overrides.pop("teachers", None):
        overrides["teachers"] = {"math": str(tiny["teacher"]), "code": str(tiny["teacher_b"])}
        overrides["train_data"] = str(tiny["train_domains"])
    if overrides.get("reference") == "separate":
        overrides["reference"] = str(tiny["reference"])
    if not ctx.enabled:  # the single process: nothing to shard
        overrides.pop("shard_frozen", None)
    sharded = fsdp and ctx.enabled  # as the trainer loads it: float32, on the CPU, then sharded
    cfg = base_config(tiny, tmp_path, **({"micro_batch_size": 3, "fsdp": sharded} | overrides))
    torch.manual_seed(cfg.seed)  # as the trainer does: every rank draws the same initial adapters
    models = load_models(cfg)
    if cfg.lora_rank:  # adapters that already do something, so the reference differs from the student
        with torch.no_grad():
            for name, p in models.student.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
                if "lora_" in name:  # the same start whether drawn in float32 (fsdp) or in dtype
                    p.copy_(p.to(getattr(torch, cfg.dtype)).to(p.dtype))
    rollouts = rollouts_for(cfg, models)  # the same 16 rows on every rank (seeded)
    # uneven shares (6 and 10 rows): other numbers of micro-batches on the two ranks
    everything = list(range(len(rollouts.examples)))
    rows = everything if not ctx.enabled else everything[:6] if ctx.rank == 0 else everything[6:]
    mine = rollouts.select(rows)
    if fsdp and ctx.enabled:
        shard_student(models.student, ctx, getattr(torch, cfg.dtype))
    if cfg.shard_frozen:
        for model in models.frozen():
            shard_frozen(model, ctx)
    scores = score_rollouts(models, mine, cfg, ctx) if cfg.objective == "sampled" else None
    optimizer = make_optimizer(models.student, cfg, ctx)
    if loss_scale:
        optimizer.loss_scale.scale = loss_scale
    domains = list(models.teachers) if cfg.objective == "dense" else None
    real = sum(c for _, chunks in step_plan(mine, domains, cfg.micro_batch_size) for _, c in chunks)
    loss, stats, stepped = policy_update(
        models, mine, scores, optimizer, make_scheduler(optimizer, cfg, 3), cfg, ctx
    )
    assert stepped and is_sharded(models.student) == (fsdp and ctx.enabled)
    assert all(is_sharded(m) == cfg.shard_frozen for m in models.frozen())
    if is_sharded(models.student):
        weights = full_weights(models.student, torch.float32, ctx)
        # the checkpoint's files, gathered as the trainer gathers them: a LoRA student's adapters
        files = full_weights(models.student, torch.float32, ctx, ".lora_" if cfg.lora_rank else None)
    else:
        weights = {k: v.float().clone() for k, v in models.student.state_dict().items()}
        files = None
    # what each rank's vLLM engine would load: a LoRA student merged (a sharded one gathered)
    served = {k: v.float().clone() for k, v in servable_weights(models.student)} if cfg.lora_rank else None
    saved = None
    if ctx.is_main:  # the Hugging Face files, as the trainer writes them
        tmp = start_checkpoint(str(tmp_path / "ckpt"), 1)
        saved = save_checkpoint(tmp, models.student, models.tokenizer, {}, files)
    return loss, stats, weights, real, saved, scores, rows, served


def _sharded_cases(ctx, tiny, tmp_path):
    return {
        name: step(ctx, tiny, tmp_path / f"rank{ctx.rank}" / str(i), o, fsdp)
        for i, (name, (o, fsdp)) in enumerate(CASES.items())
    }


def test_two_sharded_ranks_take_the_single_process_step(tiny, tmp_path):
    ranks = run_ranks(tmp_path, _sharded_cases, tiny, tmp_path)
    for name, (overrides, fsdp) in CASES.items():
        single = step(distributed.SINGLE, tiny, tmp_path / "single" / name, overrides, False)
        single_loss, single_stats, single_w, _, _, single_scores, _, single_served = single
        (loss0, stats0, w0, real0, saved, *_), (loss1, stats1, w1, real1, *_) = ranks[0][name], ranks[1][name]
        assert (w1 is None) == fsdp and saved is not None  # a sharded student: gathered on rank 0 alone
        assert loss0 == loss1 and stats0 == stats1, name  # the combined loss and stats, on every rank
        bf16 = "bf16" in name or "fp16" in name
        # bf16 (fp16): the single process's float32 masters start from the checkpoint's rounding,
        # fsdp's from the float32 file; both compute in bf16 (fp16)
        rtol = 2e-2 if bf16 else 1e-5
        if bf16 and "LoRA" in name:  # the adapters compute in bf16 under fsdp, in float32 replicated
            rtol = 5e-2  # (peft's upcast), and this loss is a small difference of log-probs
        assert loss0 == pytest.approx(single_loss, rel=rtol), name
        assert stats0["grad_norm"] == pytest.approx(single_stats["grad_norm"], rel=rtol), name
        assert set(w0) == set(single_w), (name, set(single_w) ^ set(w0))
        for k, v in single_w.items():
            torch.testing.assert_close(w0[k], v, rtol=rtol, atol=2.1e-3 if bf16 else 1e-6, msg=f"{name}: {k}")
        if "LoRA" in name:  # its files hold the adapters alone; every rank serves the same merged model
            from peft import load_peft_weights

            for k, v in load_peft_weights(str(saved)).items():
                assert torch.equal(v.float(), w0[k.replace(".weight", ".default.weight")]), (name, k)
            served0, served1 = ranks[0][name][7], ranks[1][name][7]
            assert set(served0) == set(single_served) and not any("lora" in k for k in served0)
            for k, v in single_served.items():
                assert torch.equal(served0[k], served1[k]), (name, k)
                torch.testing.assert_close(served0[k], v, rtol=rtol, atol=2.1e-3 if bf16 else 1e-6)
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(saved).state_dict()
            for k, v in reloaded.items():  # the tied head included
                assert torch.equal(v.float(), w0[k]), (name, k)
        assert real0 < real1, name  # so rank 0 ran repeats (weight 0, outputs dropped) to keep in step
        if single_scores is not None:  # each rank scored its own rows, as the single process did
            for scores, rows in (ranks[0][name][5:7], ranks[1][name][5:7]):
                torch.testing.assert_close(
                    scores.teacher_logp, single_scores.teacher_logp[rows], atol=1e-5, rtol=1e-5
                )
                if single_scores.ref_logp is not None:
                    torch.testing.assert_close(
                        scores.ref_logp, single_scores.ref_logp[rows], atol=1e-5, rtol=1e-5
                    )


def test_sharding_needs_ranks_and_refuses_what_it_does_not_combine_with(tiny, tmp_path):
    with pytest.raises(ValueError, match="fsdp: needs several data-parallel ranks"):
        check_data_parallel(base_config(tiny, tmp_path, fsdp=True), distributed.SINGLE)
    with pytest.raises(ValueError, match="shard_frozen: needs several data-parallel ranks"):
        check_data_parallel(base_config(tiny, tmp_path, shard_frozen=True), distributed.SINGLE)
    with pytest.raises(ValueError, match="offload_frozen: does not combine with shard_frozen"):
        base_config(tiny, tmp_path, shard_frozen=True, offload_frozen=True)
    for overrides, match in [
        (dict(shard_optimizer=True), "shard_optimizer: fsdp shards it already"),
    ]:
        with pytest.raises(ValueError, match=match):
            base_config(tiny, tmp_path, fsdp=True, **overrides)


def _lora_bf16_steps(ctx: DistContext, tiny, tmp_path):
    lora = dict(lora_rank=4, lam=1.25, dtype="bfloat16")
    return step(ctx, tiny, tmp_path / f"rank{ctx.rank}", lora, True)[:2]


def test_a_bf16_lora_student_steps_when_its_reference_is_read_first(tiny, tmp_path):
    """The sampled loss scores the reference (the student with its adapters off) before the
    student's first forward with gradients. peft switches the adapters' requires_grad off while
    they are off, and FSDP2 fixes its gradient reduce dtype at a group's first forward: the
    step then failed, bf16 gradients meeting float32 shards (gopd.models.adapters_off)."""
    (loss0, stats0), (loss1, stats1) = run_ranks(tmp_path, _lora_bf16_steps, tiny, tmp_path)
    assert loss0 == loss1 and stats0 == stats1
    assert math.isfinite(stats0["grad_norm"]) and stats0["grad_norm"] > 0


def _overflowing_fp16_step(ctx: DistContext, tiny, tmp_path):
    """One fp16 step whose loss scale (2^60, against fp16's largest 65504) overflows the backward."""
    cfg = base_config(tiny, tmp_path / f"rank{ctx.rank}", dtype="float16", micro_batch_size=3, fsdp=True)
    torch.manual_seed(cfg.seed)
    models = load_models(cfg)
    rollouts = rollouts_for(cfg, models)
    mine = rollouts.select(list(range(len(rollouts.examples)))[ctx.rank :: ctx.world_size])
    shard_student(models.student, ctx, torch.float16)
    scores = score_rollouts(models, mine, cfg, ctx)
    optimizer = make_optimizer(models.student, cfg, ctx)
    optimizer.loss_scale.scale = 2.0**60
    before = full_weights(models.student, torch.float32, ctx)
    _, stats, stepped = policy_update(
        models, mine, scores, optimizer, make_scheduler(optimizer, cfg, 3), cfg, ctx
    )
    after = full_weights(models.student, torch.float32, ctx)
    unchanged = None if before is None else all(torch.equal(before[k], after[k]) for k in before)
    return stepped, stats["overflow"], optimizer.loss_scale.scale, unchanged


def test_an_fp16_overflow_skips_the_step_on_every_rank(tiny, tmp_path):
    """Each rank holds other gradient shards: an overflow on any is an overflow on all."""
    (stepped0, overflow0, scale0, unchanged), (stepped1, overflow1, scale1, _) = run_ranks(
        tmp_path, _overflowing_fp16_step, tiny, tmp_path
    )
    assert not stepped0 and not stepped1 and overflow0 and overflow1
    assert scale0 == scale1 == 2.0**59 and unchanged  # halved; the weights as they were


def _teacher_evals(ctx: DistContext, tiny, tmp_path):
    from gopd.data import load_examples
    from gopd.evaluate import evaluate_teachers

    # 129 prompts: 65 on rank 0, two calls of evaluate's 64; 64 on rank 1, which must make a
    # second call too (an unscored one), or rank 0's sharded teacher would wait for it forever
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_data(tmp_path / f"eval{ctx.rank}.jsonl", 129, seed=5, domains=("math", "code"))
    cfg = base_config(tiny, tmp_path, teachers={"math": str(tiny["teacher"]), "code": str(tiny["teacher_b"])},
                      train_data=str(tiny["train_domains"]), eval_data=str(data), eval_temperature=0.0,
                      eval_samples=1, shard_frozen=ctx.enabled)  # fmt: skip
    models = load_models(cfg)
    if cfg.shard_frozen:
        for model in models.frozen():
            shard_frozen(model, ctx)
    examples = load_examples(cfg.eval_data, cfg, models.tokenizer, 64, for_eval=True)
    return evaluate_teachers(models, examples, cfg, ctx)


def test_sharded_teachers_are_evaluated_as_whole_ones(tiny, tmp_path):
    """eval_teachers under shard_frozen: each teacher generates with its weights gathered at
    every token, the ranks in step; the figures are the single process's."""
    ranks = run_ranks(tmp_path, _teacher_evals, tiny, tmp_path)
    single = _teacher_evals(distributed.SINGLE, tiny, tmp_path / "single")
    assert ranks[0] == ranks[1] == single


def _resume_states(ctx, tiny, tmp_path):
    """A sharded student with a frozen head (freeze_lm_head) loaded from a checkpoint shard of
    today's layout (trained weights only) and of the layout from before "trained_only" (every
    weight's shard): which weights each one set, and a mismatched one's error."""
    cfg = base_config(tiny, tmp_path / f"rank{ctx.rank}", fsdp=True, freeze_lm_head=True)
    models = load_models(cfg)
    student = models.student
    shard_student(student, ctx, torch.float32)
    optimizer = make_optimizer(student, cfg, ctx)
    params = list(student.parameters())
    trained = [p.requires_grad for p in params]
    out = {"trained": trained}
    new = shard_state(student, optimizer)
    assert new["trained_only"] and len(new["weights"]) == sum(trained)
    new["weights"] = [w + 1.0 for w in new["weights"]]
    before = [p.to_local().detach().clone() for p in params]
    load_shard_state(student, optimizer, new)
    out["new"] = [bool(torch.equal(p.to_local(), b + 1.0)) for p, b in zip(params, before, strict=True)]
    legacy = {"weights": [p.to_local().detach().clone() + 2.0 for p in params], "optimizer": new["optimizer"]}
    before = [p.to_local().detach().clone() for p in params]
    load_shard_state(student, optimizer, legacy)
    out["legacy"] = [bool(torch.equal(p.to_local(), b + 2.0)) for p, b in zip(params, before, strict=True)]
    try:
        load_shard_state(student, optimizer, {**legacy, "weights": legacy["weights"][:-1]})
    except ValueError as e:
        out["mismatch"] = str(e)
    return out


def test_a_checkpoint_from_before_trained_only_resumes_every_weight(tiny, tmp_path):
    """Today's shards hold the trained weights only and set those; a checkpoint written before
    "trained_only" existed holds every weight's shard (frozen ones too) and sets them all; one
    that matches neither is refused, naming the resume."""
    for out in run_ranks(tmp_path, _resume_states, tiny, tmp_path):
        assert not all(out["trained"]) and any(out["trained"])  # the frozen head is there
        assert out["new"] == out["trained"]
        assert all(out["legacy"])
        assert "resume" in out["mismatch"]
