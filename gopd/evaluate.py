"""Evaluation with a verifiable reward (gopd.verifiers): avg@k and pass@k over k samples
per prompt, overall and per domain."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig

from gopd.config import TrainConfig
from gopd.data import Example, load_examples, write_jsonl
from gopd.distributed import SINGLE, DistContext, close_distributed, init_distributed
from gopd.fsdp import release
from gopd.models import (
    Models,
    context_length,
    frozen_on_device,
    load_model,
    load_tokenizer,
    resolve_device,
    servable_shapes,
)
from gopd.rollout import HFRolloutEngine, RolloutEngine, VLLMRolloutEngine, load_vllm
from gopd.verifiers import CallCases, Verifier, extract_answer

logger = logging.getLogger("gopd")


def evaluate(engine: RolloutEngine, tokenizer, examples: list[Example], k: int, temperature: float,
             batch_prompts: int = 64, ctx: DistContext = SINGLE, verifier: Verifier | None = None,
             top_p: float | None = None, samples: list[dict] | None = None) -> dict[str, float]:  # fmt: skip
    """avg@k: the mean over prompts of the fraction of k samples that are right; pass@k: the
    fraction of prompts with at least one right sample. With several domains among the
    examples, also avg@k/<domain> and pass@k/<domain> over each domain's prompts (a merged
    student against each domain's teacher). Under data parallelism each rank samples its
    share of the prompts and the figures are over all of them. `verifier`: math answers by
    default (gopd.verifiers). `samples`: a list to which every sample's record (sample_records)
    is appended, all ranks' on rank 0 (every rank must pass one)."""
    verifier = verifier or Verifier()
    domains = sorted({ex.domain for ex in examples})
    right = {d: 0.0 for d in domains}  # per domain: sum over prompts of the fraction right
    passed = {d: 0.0 for d in domains}
    length_sum = 0.0
    mine = ctx.shard(examples)
    mine_samples: list[dict] = []
    if engine.max_rows:  # one sampler call per generate, as the unscored one below (ranks in step)
        batch_prompts = max(1, min(batch_prompts, engine.max_rows // k))
    calls = -(-len(mine) // batch_prompts)
    if engine.in_step:  # every rank samples as often as the busiest (gopd.fsdp)
        calls = int(ctx.max([float(calls)])[0])
    for start in range(0, calls * batch_prompts, batch_prompts):
        chunk = mine[start : start + batch_prompts]
        if not chunk:  # this rank is done: one prompt more, unscored, keeps it in step
            engine.generate(examples[:1], samples=k, temperature=temperature, top_p=top_p)
            continue
        rollouts = engine.generate(chunk, samples=k, temperature=temperature, top_p=top_p)
        # Only each response's own tokens: a placeholder id in the padding would decode as
        # whatever token has that id (Qwen's id 0 is "!") and end up in the answer.
        texts = [
            tokenizer.decode(row[valid], skip_special_tokens=True)
            for row, valid in zip(rollouts.responses, rollouts.response_mask, strict=True)
        ]
        length_sum += float(rollouts.response_mask.sum())
        ok = verifier.check(texts, rollouts.examples)
        if samples is not None:
            mine_samples += sample_records(rollouts, texts, ok, engine.eos_ids, k)
        for i, ex in enumerate(chunk):
            fraction = sum(ok[i * k : (i + 1) * k]) / k
            right[ex.domain] += fraction
            passed[ex.domain] += fraction > 0
    sums = ctx.sum([right[d] for d in domains] + [passed[d] for d in domains] + [length_sum])
    if samples is not None:  # rank 0 gets them all, the others nothing more
        samples += [record for part in ctx.gather_to_main(mine_samples) or [] for record in part]
    right = dict(zip(domains, sums[: len(domains)], strict=True))
    passed = dict(zip(domains, sums[len(domains) : -1], strict=True))
    n = len(examples)
    result = {
        f"avg@{k}": sum(right.values()) / n,
        f"pass@{k}": sum(passed.values()) / n,
        "response_length": sums[-1] / (n * k),
        "prompts": n,
    }
    if len(domains) > 1:
        counts = {d: sum(ex.domain == d for ex in examples) for d in domains}
        for d in domains:
            result |= {f"avg@{k}/{d}": right[d] / counts[d], f"pass@{k}/{d}": passed[d] / counts[d]}
    return result


def sample_records(rollouts, texts: list[str], right: list[bool], eos_ids: list[int], k: int) -> list[dict]:
    """One record per sample, as `gopd eval --samples-out` and eval_log_samples write them: its
    prompt, domain and number among the prompt's k, the response, whether it is right, its
    length in tokens and whether max_new_tokens cut it (no EOS), the reference answer and the
    final answer read from the response (math records) or the kind of tests (code)."""
    lengths = rollouts.response_mask.sum(-1).tolist()
    cut = rollouts.cut(eos_ids).tolist()
    records = []
    for i, (ex, text) in enumerate(zip(rollouts.examples, texts, strict=True)):
        record = {"prompt": ex.prompt, "domain": ex.domain, "sample": i % k, "response": text,
                  "right": right[i], "tokens": int(lengths[i]), "cut": bool(cut[i])}  # fmt: skip
        if ex.tests is None:
            record |= {"reference": ex.answer, "answer": extract_answer(text)}
        elif isinstance(ex.tests, str):
            record["tests"] = "asserts"
        else:
            record["tests"] = "calls" if isinstance(ex.tests, CallCases) else "stdin"
        records.append(record)
    return records


def evaluate_configured(engine: RolloutEngine, tokenizer, examples: list[Example], cfg: TrainConfig,
                        ctx: DistContext = SINGLE, samples_to: str | Path | None = None
                        ) -> dict[str, float]:  # fmt: skip
    """evaluate() with the run's evaluation settings: k = cfg.eval_samples, cfg.eval_sampling,
    cfg's verifier. The student's evaluations, the teachers' and a checkpoint's all go through it.
    `samples_to`: a .jsonl file that rank 0 writes every sample's record to (sample_records)."""
    temperature, top_p = cfg.eval_sampling
    samples = [] if samples_to else None
    result = evaluate(engine, tokenizer, examples, cfg.eval_samples, temperature, ctx=ctx,
                      verifier=Verifier.from_config(cfg), top_p=top_p, samples=samples)  # fmt: skip
    if samples_to and ctx.is_main:
        write_jsonl(samples_to, samples)
    return result


def evaluate_teachers(models: Models, examples: list[Example], cfg: TrainConfig, ctx: DistContext = SINGLE,
                      engine: RolloutEngine | None = None, samples_dir: Path | None = None
                      ) -> dict[str, dict[str, float]]:  # fmt: skip
    """{domain: its teacher's evaluate() figures} on `examples`, sampled as the student's evaluation
    is (cfg.eval_samples, cfg.eval_sampling, the verifier), on a fork of torch's random streams
    (the run's own sampling is then that of a run without it).

    `engine`: the run's. When it is vLLM, a teacher of the student's architecture and shapes (the
    same-size and merging settings) samples there: its weights are loaded into vLLM's copy for
    its evaluation, the student's after (vLLM's own random stream moves on). Any other teacher
    samples with transformers generate, said in a log line. `samples_dir`: where each teacher's
    samples go (teacher_<domain>.jsonl), when given."""

    def run(engine: RolloutEngine, domain: str) -> dict[str, float]:
        samples_to = samples_dir / f"teacher_{domain}.jsonl" if samples_dir else None
        return evaluate_configured(engine, models.tokenizer, examples, cfg, ctx, samples_to)

    vllm = isinstance(engine, VLLMRolloutEngine)
    student_shapes = servable_shapes(models.student) if vllm else None
    devices = [models.device] if models.device.type == "cuda" else []
    out = {}
    with torch.random.fork_rng(devices=devices):
        for domain, teacher in models.teachers.items():
            if vllm and servable_shapes(teacher) == student_shapes:
                engine.update_weights(teacher)  # copied from where it is (offload_frozen: the CPU)
                try:
                    out[domain] = run(engine, domain)
                finally:
                    engine.update_weights(models.student)
                continue
            if vllm:
                logger.info("eval_teachers: teacher %s is not shaped as the student, so it samples with "
                            "transformers generate, not vLLM", domain)  # fmt: skip
            with frozen_on_device(models, domain):
                out[domain] = run(HFRolloutEngine(teacher, models.tokenizer, cfg), domain)
                release(teacher)
    return out


def evaluate_checkpoint(path: str, cfg: TrainConfig, samples_to: str | None = None) -> dict[str, float]:
    """avg@k / pass@k of a saved model on cfg.eval_data: k = cfg.eval_samples, at most
    cfg.eval_max_prompts prompts; fields, chat template, lengths, sampling (cfg.eval_sampling),
    dtype, device and seed from cfg too. Under torchrun the ranks share the prompts
    (gopd.distributed). With cfg.rollout_engine 'vllm' vLLM samples from the checkpoint it
    loads itself, and no transformers copy of the model is made. `samples_to`: a .jsonl file for
    every sample's record (sample_records)."""
    if cfg.rollout_engine == "vllm" and (Path(path) / "adapter_config.json").exists():
        raise ValueError(f"{path}: a LoRA checkpoint, which vLLM does not load as a model: `gopd export` it, "
                         "then evaluate the merged model")  # fmt: skip
    ctx, device = init_distributed(cfg.device)
    try:
        tokenizer = load_tokenizer(path)
        if cfg.rollout_engine == "vllm":
            saved = replace(cfg, student=path)
            engine = VLLMRolloutEngine(load_vllm(saved, ctx), tokenizer, saved)
            limit = AutoConfig.from_pretrained(path)
        else:
            model = load_model(path, getattr(torch, cfg.dtype), resolve_device(device), trainable=False)
            engine, limit = HFRolloutEngine(model, tokenizer, cfg), model
        examples = load_examples(cfg.eval_data, cfg, tokenizer, context_length(limit), for_eval=True)
        examples = examples[: cfg.eval_max_prompts]
        torch.manual_seed(cfg.seed + ctx.rank)  # each rank its own samples
        return evaluate_configured(engine, tokenizer, examples, cfg, ctx, samples_to)
    finally:
        close_distributed(ctx)
