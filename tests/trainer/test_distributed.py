"""Data parallelism (gopd.distributed): 2 CPU ranks over gloo give the single process's step.

The multi-rank tests start real processes: `torch.multiprocessing.spawn` for the update and
the collectives, torchrun (`python -m torch.distributed.run`) for the CLI end to end.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from gopd import distributed
from gopd.checkpoint import export_merged, load_optimizer_state
from gopd.distributed import (
    DistContext,
    _buckets,
    all_reduce_grads,
    check_replicas_agree,
    close_distributed,
    env_world,
    init_distributed,
    rank_device,
)
from gopd.fsdp import full_weights, shard_student
from gopd.models import load_models
from gopd.optim import GradSlot, MasterWeightAdamW, partition
from gopd.scoring import Scores, score_rollouts
from gopd.trainer import check_data_parallel, restore_rng, train
from gopd.update import make_optimizer, make_scheduler, policy_update, update_step
from tests.trainer.conftest import base_config
from tests.trainer.test_end_to_end import train_losses
from tests.trainer.test_stages import rollouts_for

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)  # two ranks on two cores
    ctx, _ = init_distributed("cpu")
    try:
        torch.save(fn(ctx, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        close_distributed(ctx)


def run_ranks(tmp_path, fn, *args) -> list:
    """fn(ctx, *args) on each of WORLD spawned ranks; their return values, by rank."""
    out = tmp_path / "ranks"
    out.mkdir(exist_ok=True)
    mp.spawn(_rank_main, args=(_free_port(), str(out), fn, args), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# -- one update step: the ranks' shares against the whole batch in one process -------------

CASES = {
    "sampled, token-mean": dict(),
    "sampled, seq-mean-token-sum, bf16 student": dict(loss_agg="seq-mean-token-sum", dtype="bfloat16"),
    "dense, seq-mean-token-mean": dict(objective="dense", is_cap=None, loss_agg="seq-mean-token-mean"),
}
if importlib.util.find_spec("peft"):  # a LoRA student, the reference its adapter-free self
    CASES["sampled, lam 1.25, LoRA"] = dict(lora_rank=4, lam=1.25)
# The ranks' micro-batches hold other rows than the single process's, and a bf16 student's
# gradient is rounded to bf16 per micro-batch (2^-8 relative) before the float32 sums.
STATS_RTOL = {"sampled, seq-mean-token-sum, bf16 student": 2e-3}


def one_update(ctx: DistContext, tiny, tmp_path, overrides: dict):
    """One AdamW step on ctx's share of 8 prompts x 2 samples: (loss, stats, weights, masters)."""
    cfg = base_config(tiny, tmp_path, micro_batch_size=3, **overrides)
    models = load_models(cfg)
    rollouts = rollouts_for(cfg, models)  # the same 16 rows on every rank (seeded)
    scores = score_rollouts(models, rollouts, cfg) if cfg.objective == "sampled" else None
    rows = ctx.shard(list(range(len(rollouts.examples))))
    mine = rollouts.select(rows)
    if scores is not None:
        scores = Scores(scores.teacher_logp[rows], None if scores.ref_logp is None else scores.ref_logp[rows])
    optimizer = make_optimizer(models.student, cfg, ctx)
    loss, stats, stepped = policy_update(
        models, mine, scores, optimizer, make_scheduler(optimizer, cfg, 3), cfg, ctx
    )
    assert stepped
    weights = {k: v.clone() for k, v in models.student.state_dict().items()}
    masters = [m.detach().clone() for m in getattr(optimizer, "masters", [])]
    return loss, stats, weights, masters


def _update_cases(ctx, tiny, tmp_path):
    runs = {name: one_update(ctx, tiny, tmp_path / f"rank{ctx.rank}", o) for name, o in CASES.items()}
    for name in SHARDED:
        runs[name + ", sharded"] = one_update(ctx, tiny, tmp_path / f"rank{ctx.rank}", CASES[name] | SHARD)
    return runs


SHARD = dict(shard_optimizer=True)
SHARDED = ("sampled, token-mean", "sampled, seq-mean-token-sum, bf16 student")


def test_two_ranks_take_the_single_process_step(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(str(tiny["student"])).state_dict()
    ranks = run_ranks(tmp_path, _update_cases, tiny, tmp_path)
    for name, overrides in CASES.items():
        single_loss, single_stats, single_w, single_m = one_update(
            distributed.SINGLE, tiny, tmp_path, overrides
        )
        (loss0, stats0, w0, m0), (loss1, stats1, w1, _m1) = ranks[0][name], ranks[1][name]
        # every rank ends the step with the same student, to the bit
        assert loss0 == loss1 and stats0 == stats1, name
        assert all(torch.equal(w0[k], w1[k]) for k in w0), name
        # and it is the single process's step, up to the order of the float sums
        assert loss0 == pytest.approx(single_loss, rel=1e-5), name
        for key, value in single_stats.items():
            assert stats0[key] == pytest.approx(value, rel=STATS_RTOL.get(name, 1e-4), abs=1e-6), (name, key)
        if single_m:
            # bf16 student: the float32 masters. AdamW's first step is about lr * sign(g), so an
            # element whose gradient is ~0 may step the other way (2 lr apart) after the bf16
            # rounding above; the loss and grad_norm checks above hold the gradient's scale.
            diff = torch.cat([(a - b).abs().flatten() for a, b in zip(m0, single_m, strict=True)])
            assert float(diff.max()) <= 2.01e-3 and float((diff > 1e-6).float().mean()) < 0.01, name
        else:
            for k in single_w:
                torch.testing.assert_close(w0[k], single_w[k], rtol=1e-5, atol=1e-6)
            moved = [k for k in single_w if k in before and not torch.equal(single_w[k], before[k])]
            moved += [k for k in single_w if "lora_B" in k and single_w[k].any()]  # LoRA's B starts at 0
            assert moved, name
    for name in SHARDED:  # the sharded optimizer takes the unsharded ranks' step, to the bit
        for rank in ranks:
            (loss, stats, w, _), (loss_s, stats_s, w_s, _) = rank[name], rank[name + ", sharded"]
            assert loss == loss_s and stats == stats_s, name
            assert all(torch.equal(w[k], w_s[k]) for k in w), name
        owned = [len(rank[name + ", sharded"][3]) for rank in ranks]  # masters held, per rank
        assert all(n > 0 for n in owned) and sum(owned) == len(before) - 1  # lm_head is tied: one tensor


def mini_batch_updates(ctx: DistContext, tiny, tmp_path, fsdp: bool = False):
    """Two mini-batches of 4 prompts, twice over, on ctx's share of 8 prompts x 2 samples (as
    the trainer shares them: by prompt, each prompt's samples together), the student sharded
    if asked: (losses, the student's weights; with fsdp on rank 0 only)."""
    cfg = base_config(tiny, tmp_path, prompts_per_step=8, mini_batch_prompts=4, update_epochs=2, lr=0.05,
                      micro_batch_size=3)  # fmt: skip
    models = load_models(cfg)
    rollouts = rollouts_for(cfg, models)  # the same 16 rows on every rank, prompt-major
    rows = [2 * p + s for p in ctx.shard(list(range(8))) for s in range(2)]
    mine = rollouts.select(rows)
    if fsdp:
        shard_student(models.student, ctx, torch.float32)
    scores = score_rollouts(models, mine, cfg, ctx)
    optimizer = make_optimizer(models.student, cfg, ctx)
    updates = update_step(models, mine, scores, optimizer, make_scheduler(optimizer, cfg, 4), cfg, ctx)
    assert len(updates) == 4 and all(stepped for _, _, stepped in updates)
    if fsdp:
        weights = full_weights(models.student, torch.float32, ctx)
    else:
        weights = {k: v.clone() for k, v in models.student.state_dict().items()}
    return [loss for loss, _, _ in updates], weights


def _mini_batch_cases(ctx, tiny, tmp_path):
    return [mini_batch_updates(ctx, tiny, tmp_path / f"rank{ctx.rank}", fsdp) for fsdp in (False, True)]


def test_two_ranks_take_the_single_process_mini_batch_updates(tiny, tmp_path):
    """Each rank's i-th slice of its share is its part of the global i-th mini-batch, and o
    comes from each rank's own rows: four off-policy updates, as in one process, with the
    student replicated or sharded (fsdp)."""
    ranks = run_ranks(tmp_path, _mini_batch_cases, tiny, tmp_path)
    single_losses, single_w = mini_batch_updates(distributed.SINGLE, tiny, tmp_path)
    (losses0, w0), (losses1, w1) = ranks[0][0], ranks[1][0]
    assert losses0 == losses1 and all(torch.equal(w0[k], w1[k]) for k in w0)
    (sharded_losses, sharded_w), (sharded_losses1, nothing) = ranks[0][1], ranks[1][1]
    assert sharded_losses == sharded_losses1 and nothing is None
    for losses, weights in ((losses0, w0), (sharded_losses, sharded_w)):
        assert losses == pytest.approx(single_losses, rel=1e-4)
        for k in single_w:
            torch.testing.assert_close(weights[k], single_w[k], rtol=1e-4, atol=1e-5)


# -- the collectives ---------------------------------------------------------------------------


def _grads_on_some_ranks(ctx, bucket_bytes):
    """p0 has a gradient on every rank, p1 on rank 1 only, p2 on none; p3 is bf16 (own bucket)."""
    distributed.BUCKET_BYTES = bucket_bytes
    params = [torch.zeros(3), torch.zeros(2, 2), torch.zeros(4), torch.zeros(5, dtype=torch.bfloat16)]
    params[0].grad = torch.full((3,), float(ctx.rank + 1))
    if ctx.rank == 1:
        params[1].grad = torch.ones(2, 2)
    params[3].grad = torch.full((5,), 0.5 * (ctx.rank + 1), dtype=torch.bfloat16)
    all_reduce_grads(ctx, params)
    return [p.grad for p in params]


@pytest.mark.parametrize("bucket_bytes", [1 << 20, 8])
def test_gradients_are_summed_and_missing_ones_stay_missing(tmp_path, bucket_bytes):
    for grads in run_ranks(tmp_path, _grads_on_some_ranks, bucket_bytes):
        assert torch.equal(grads[0], torch.full((3,), 3.0))
        assert torch.equal(grads[1], torch.ones(2, 2))  # zeros where rank 0 had none
        assert grads[2] is None  # no rank differentiated it: still None, as in one process
        assert torch.equal(grads[3], torch.full((5,), 1.5, dtype=torch.bfloat16))


def test_buckets_keep_dtypes_apart_and_respect_the_size():
    a, b, c = torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.float64)
    assert [len(x) for x in _buckets([a, b, c], 32)] == [2, 1]
    assert [len(x) for x in _buckets([a, b, c], 16)] == [1, 1, 1]


def _diverged_replicas(ctx, tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny["student"]))
    check_replicas_agree(ctx, model)  # loaded from one checkpoint: they agree
    if ctx.rank == 1:
        with torch.no_grad():
            model.model.norm.weight[0] += 1e-6
    try:
        check_replicas_agree(ctx, model)
    except RuntimeError as e:
        return str(e)
    return None


def test_diverged_replicas_are_an_error_on_every_rank(tiny, tmp_path):
    for message in run_ranks(tmp_path, _diverged_replicas, tiny):
        assert message is not None and "rank 1" in message and "model.norm.weight" in message


def _train_with_fake_vllm(ctx, tiny, tmp_path, overrides=None):
    """A 3-step run on this rank with the vLLM stand-in as the engine: (losses, the engine's
    events, its final weights)."""
    from gopd import rollout
    from tests.trainer import fake_vllm

    llms = []

    def load(cfg, ctx):
        llms.append(fake_vllm.LLM(cfg.student, dtype=cfg.dtype))
        return llms[-1]

    with pytest.MonkeyPatch.context() as patch:
        fake_vllm.install(patch)
        patch.setenv(rollout.VLLM_MULTIPROCESSING, "0")  # as load_vllm sets it
        patch.setattr(rollout, "load_vllm", load)
        cfg = base_config(tiny, tmp_path, rollout_engine="vllm", output_dir=str(tmp_path / "vllm-run"),
                          **(overrides or {}))  # fmt: skip
        train(cfg)
    engine_weights = {k: v.clone() for k, v in llms[0].hf.state_dict().items()}
    return train_losses(cfg) if ctx.is_main else None, [e[0] for e in llms[0].events], engine_weights


VLLM_RUNS = {"replicated": {}, "fsdp": {"fsdp": True}}
if importlib.util.find_spec("peft"):  # the adapters merged into what each engine loads
    VLLM_RUNS["fsdp, LoRA"] = {"fsdp": True, "lora_rank": 4, "lam": 1.25}
    # bf16: the reference is the first to run the student (gopd.models.adapters_off)
    VLLM_RUNS["fsdp, LoRA, bf16"] = {"fsdp": True, "lora_rank": 4, "lam": 1.25, "dtype": "bfloat16"}


@pytest.mark.parametrize("run", VLLM_RUNS)
def test_each_rank_samples_from_its_own_vllm_engine_kept_in_sync(tiny, tmp_path, run):
    ranks = run_ranks(tmp_path, _train_with_fake_vllm, tiny, tmp_path, VLLM_RUNS[run])
    assert len(ranks[0][0]) == 3  # and the replicas were checked equal at the start and the end
    for _, events, _ in ranks:  # each rank's engine: the student pushed at the start and after each update
        assert events.count("generate") == 3 and events.count("load_weights") == 4
    # every engine holds the final student (a sharded one gathered whole): the saved checkpoint
    # (a LoRA one with its adapters merged, as gopd export writes it)
    from transformers import AutoModelForCausalLM

    saved = tmp_path / "vllm-run" / "checkpoints" / "step_0000003"
    if "lora_rank" in VLLM_RUNS[run]:
        saved = export_merged(str(saved), str(tmp_path / "merged"))
    final = AutoModelForCausalLM.from_pretrained(str(saved))
    for _, _, weights in ranks:
        for k, v in final.state_dict().items():
            if "dtype" in VLLM_RUNS[run]:  # the engine merged float32 adapters, export their bf16 files:
                # a bf16 rounding step apart at most
                torch.testing.assert_close(weights[k].float(), v.float(), rtol=2**-7, atol=1e-4)
            else:
                assert torch.equal(weights[k], v), k


# -- settings and environment ------------------------------------------------------------------


def test_partition_balances_the_ranks_and_is_deterministic():
    numels = [100, 10, 60, 50, 5, 5]
    owners = partition(numels, 2)
    assert owners == partition(numels, 2) == [0, 0, 1, 1, 0, 1]
    load = [sum(n for n, o in zip(numels, owners, strict=True) if o == r) for r in range(2)]
    assert load == [115, 115]
    assert partition([7], 3) == [0]  # ranks may own nothing


def test_sharded_optimizer_keeps_masters_of_its_share_and_gradients_of_all():
    params = [torch.nn.Parameter(torch.full((n,), 1.0, dtype=torch.bfloat16)) for n in (4, 3, 2)]
    opt = MasterWeightAdamW(params, owners=[1, 0, 1], rank=1, lr=0.1)
    assert opt.sharded and [m.numel() for m in opt.masters] == [4, 2]
    sum(p.float().sum() for p in params).backward()
    assert all(p.grad is None for p in params)  # moved into the float32 slots
    assert [s.grad.tolist() for s in opt.slots] == [[1.0] * 4, [1.0] * 3, [1.0] * 2]
    assert isinstance(opt.slots[1], GradSlot) and opt.slots[1].grad.dtype == torch.float32
    opt.step()
    assert params[1].tolist() == [1.0] * 3  # rank 0's to step (and broadcast)
    assert params[0].float().lt(1.0).all() and params[2].float().lt(1.0).all()
    opt.zero_grad()
    assert all(s.grad is None for s in opt.slots)
    other = MasterWeightAdamW(
        [torch.nn.Parameter(p.detach().clone()) for p in params], owners=[0, 1, 1], rank=1
    )
    with pytest.raises(ValueError, match="sharded over other ranks"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="owners: 2 ranks for 3 parameters"):
        MasterWeightAdamW(params, owners=[0, 1], rank=0)


def test_a_sharded_checkpoint_needs_its_shards(tmp_path):
    with pytest.raises(ValueError, match="sharded over 4 ranks and has no shard for rank 0"):
        load_optimizer_state(tmp_path, {"optimizer_shards": 4}, rank=0)


def test_settings_that_cannot_run_on_the_ranks_are_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="shard_optimizer: needs several data-parallel ranks"):
        check_data_parallel(base_config(tiny, tmp_path, shard_optimizer=True), distributed.SINGLE)
    two = DistContext(rank=0, world_size=2)
    with pytest.raises(ValueError, match="prompts_per_step: 5 prompts cannot be shared evenly by 2 ranks"):
        check_data_parallel(base_config(tiny, tmp_path, prompts_per_step=5), two)
    check_data_parallel(base_config(tiny, tmp_path, prompts_per_step=6), two)
    with pytest.raises(ValueError, match="mini_batch_prompts: 3 prompts cannot be shared evenly by 2 ranks"):
        check_data_parallel(base_config(tiny, tmp_path, prompts_per_step=6, mini_batch_prompts=3), two)
    check_data_parallel(base_config(tiny, tmp_path, prompts_per_step=5), distributed.SINGLE)


def test_rank_devices_and_torchrun_environment(monkeypatch):
    assert rank_device("cuda:3", 3, 1) == "cuda:3"  # a single process keeps its setting
    assert rank_device("cpu", 1, 2) == "cpu"
    with pytest.raises(ValueError, match="device: 'cuda:0' would put all 2 ranks on one GPU"):
        rank_device("cuda:0", 1, 2)
    if not torch.cuda.is_available():
        assert rank_device("auto", 1, 2) == "cpu"
    else:
        assert rank_device("cuda", 1, 2) == "cuda:1"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert env_world() == (0, 1, 0)
    assert init_distributed("cpu") == (distributed.SINGLE, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        env_world()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="must be integers"):
        env_world()


def test_shard_takes_every_world_size_th_item():
    items = list(range(7))
    assert DistContext(0, 2).shard(items) == [0, 2, 4, 6]
    assert DistContext(1, 2).shard(items) == [1, 3, 5]
    assert distributed.SINGLE.shard(items) == items


def test_resume_on_another_world_size_says_so_and_reseeds(caplog):
    state = {"step": 4, "rng": {}, "rng_ranks": [{}, {}, {}]}  # saved by 3 ranks
    draws = []
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="gopd"):
            restore_rng(state, DistContext(rank=1, world_size=2), seed=0)
        draws.append(torch.rand(3))
    assert "resuming on 2 ranks a run saved on 3" in caplog.text
    assert torch.equal(draws[0], draws[1])  # deterministic


# -- end to end through torchrun ---------------------------------------------------------------


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`gopd *args` on WORLD CPU ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "gopd", *args]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def records(run_dir) -> list[dict]:
    return [json.loads(x) for x in open(run_dir / "metrics.jsonl")]


VARIANTS = {
    "replicated-optimizer": [],
    "sharded-bf16": ["--shard-optimizer", "true", "--dtype", "bfloat16"],
    "fsdp": ["--fsdp", "true"],
    "fsdp-bf16-tokens": ["--fsdp", "true", "--dtype", "bfloat16", "--micro-batch-tokens", "40"],
    "fsdp-shard-frozen": ["--fsdp", "true", "--shard-frozen", "true", "--lam", "1.25"],  # the reference too
    "fsdp-fp16": ["--fsdp", "true", "--dtype", "float16"],  # the loss scale saved and resumed too
}
if importlib.util.find_spec("peft"):  # each rank must draw the same initial adapters
    VARIANTS["lora"] = ["--lora-rank", "4", "--lam", "1.25"]
    VARIANTS["fsdp-lora"] = ["--fsdp", "true", "--lora-rank", "4", "--lam", "1.25"]  # adapters sharded


@pytest.mark.parametrize("variant", VARIANTS)
def test_torchrun_trains_evaluates_saves_and_resumes_exactly(tiny, tmp_path, variant):
    extra, sharded = VARIANTS[variant], variant.startswith(("sharded", "fsdp"))
    common = extra + ["--student", str(tiny["student"]), "--teachers", str(tiny["teacher"]), "--train-data",
              str(tiny["train"]), "--eval-data", str(tiny["eval"]), "--eval-samples", "2",
              "--max-new-tokens", "4", "--max-prompt-tokens", "16", "--prompts-per-step", "4",
              "--micro-batch-size", "3", "--lr", "1e-3", "--device", "cpu", "--loggers", "[jsonl]",
              "--kernel-backend", "torch", "--steps", "4"]  # fmt: skip
    full = tmp_path / "full"
    proc = torchrun("train", *common, "--save-every", "2", "--output-dir", str(full))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data parallel: 2 ranks (gloo)" in proc.stderr
    assert proc.stdout.count("summary:") == 1  # rank 0 alone prints it
    recs = records(full)
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]  # one writer
    evals = [r for r in recs if r["kind"] == "eval"]
    assert evals and all(r["prompts"] == 8 and 0 < r["response_length"] <= 4 for r in evals)  # each once
    saved = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert saved == ["step_0000002", "step_0000004"]
    step2 = full / "checkpoints" / "step_0000002"
    state = torch.load(step2 / "trainer_state.pt", weights_only=False)
    assert len(state["rng_ranks"]) == WORLD
    shards = sorted(p.name for p in step2.glob("optimizer_rank*.pt"))
    if sharded:  # each rank's masters and moments beside the state, none inside it
        assert shards == ["optimizer_rank0.pt", "optimizer_rank1.pt"] and "optimizer" not in state
        assert ("fsdp: the student's" if variant.startswith("fsdp") else "sharded optimizer") in proc.stderr
    else:
        assert shards == [] and "optimizer" in state
    if "--shard-frozen" in extra:
        assert "shard_frozen: 2 teacher / reference models sharded over 2 ranks" in proc.stderr
    if "--lora-rank" in extra:  # the adapters' files alone, sharded or not; the base stays where it was
        files = {p.name for p in step2.iterdir()}
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files, files

    resumed = tmp_path / "resumed"
    step2 = str(full / "checkpoints" / "step_0000002")
    proc = torchrun("train", *common, "--output-dir", str(resumed), "--resume", step2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = [r for r in records(resumed) if r["kind"] == "train"]
    assert [r["step"] for r in again] == [3, 4]
    for a, b in zip(again, train_recs[2:], strict=True):  # same rollouts on each rank, same step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
        assert a["response_length"] == b["response_length"]
        assert a.get("loss_scale") == b.get("loss_scale")  # float16: the scale resumed as it was
    if "float16" in extra:
        assert all("loss_scale" in r for r in train_recs) and "dynamic loss scaling" in proc.stderr


def test_torchrun_evaluation_shares_the_prompts(tiny, tmp_path):
    samples = tmp_path / "samples.jsonl"
    proc = torchrun("eval", "--model", str(tiny["student"]), "--data", str(tiny["eval"]), "--k", "2",
                    "--max-new-tokens", "4", "--device", "cpu", "--samples-out", str(samples))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load(proc.stdout)  # one document: rank 0 alone prints
    assert result["prompts"] == 8 and 0 <= result["avg@2"] <= result["pass@2"] <= 1
    assert 0 < result["response_length"] <= 4  # each prompt sampled once, by one rank
    records = [json.loads(line) for line in samples.read_text().splitlines()]  # rank 0 writes all ranks'
    assert len(records) == 8 * 2 and len({r["prompt"] for r in records}) == 8
    assert sum(r["right"] for r in records) / 16 == pytest.approx(result["avg@2"])
