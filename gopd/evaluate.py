"""Evaluation with a verifiable reward: exact match of the final answer, avg@k over k samples."""

from __future__ import annotations

import re

import torch

from gopd.config import TrainConfig
from gopd.data import Example, load_examples
from gopd.distributed import SINGLE, DistContext, close_distributed, init_distributed
from gopd.models import context_length, load_model, load_tokenizer, resolve_device
from gopd.rollout import HFRolloutEngine, RolloutEngine

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer of a response: the last \\boxed{...}, else what follows the last
    '####', else the last number; None when there is none."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip() or None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def is_correct(response: str, answer: str) -> bool:
    got = extract_answer(response)
    return got is not None and got == answer.strip()


def evaluate(engine: RolloutEngine, tokenizer, examples: list[Example], k: int, temperature: float,
             batch_prompts: int = 64, ctx: DistContext = SINGLE) -> dict[str, float]:  # fmt: skip
    """avg@k: the mean over prompts of the fraction of k samples whose answer is right;
    pass@k: the fraction of prompts with at least one right sample. Under data parallelism
    each rank samples its share of the prompts and the figures are over all of them."""
    right_sum = passed = length_sum = 0.0
    mine = ctx.shard(examples)
    calls = -(-len(mine) // batch_prompts)
    if engine.in_step:  # every rank samples as often as the busiest (gopd.fsdp)
        calls = int(ctx.max([float(calls)])[0])
    for start in range(0, calls * batch_prompts, batch_prompts):
        chunk = mine[start : start + batch_prompts]
        if not chunk:  # this rank is done: one prompt more, unscored, keeps it in step
            engine.generate(examples[:1], samples=k, temperature=temperature)
            continue
        rollouts = engine.generate(chunk, samples=k, temperature=temperature)
        # Only each response's own tokens: a placeholder id in the padding would decode as
        # whatever token has that id (Qwen's id 0 is "!") and end up in the answer.
        texts = [
            tokenizer.decode(row[valid], skip_special_tokens=True)
            for row, valid in zip(rollouts.responses, rollouts.response_mask, strict=True)
        ]
        length_sum += float(rollouts.response_mask.sum())
        for i, ex in enumerate(chunk):
            right = sum(is_correct(texts[i * k + j], ex.answer) for j in range(k)) / k
            right_sum, passed = right_sum + right, passed + (right > 0)
    right_sum, passed, length_sum = ctx.sum([right_sum, passed, length_sum])
    n = len(examples)
    return {
        f"avg@{k}": right_sum / n,
        f"pass@{k}": passed / n,
        "response_length": length_sum / (n * k),
        "prompts": n,
    }


def evaluate_checkpoint(
    path: str,
    cfg: TrainConfig,
    k: int,
    *,
    max_prompts: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """avg@k / pass@k of a saved model on cfg.eval_data (fields, chat template, lengths and
    temperature from cfg). Under torchrun the ranks share the prompts (gopd.distributed)."""
    ctx, device = init_distributed(device)
    try:
        tokenizer = load_tokenizer(path)
        model = load_model(path, getattr(torch, dtype), resolve_device(device), trainable=False)
        examples = load_examples(cfg.eval_data, cfg, tokenizer, context_length(model), need_answers=True)
        examples = examples[:max_prompts]
        torch.manual_seed(seed + ctx.rank)  # each rank its own samples
        engine = HFRolloutEngine(model, tokenizer, cfg)
        return evaluate(engine, tokenizer, examples, k, cfg.temperature, ctx=ctx)
    finally:
        close_distributed(ctx)
