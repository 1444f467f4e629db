"""Supervised fine-tuning for the demo's teacher and student, with the fused log-prob op."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import GenerationConfig

from gopd.models import final_hidden, head_weight
from gopd.rollout import left_pad
from gopd.verifiers import is_correct
from gopd_kernels import token_logprobs


def sft_batch(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, targets): prompt + answer + EOS, right-padded; loss on the answer."""
    seqs, targets = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + a)
        targets.append([-100] * (len(p) - 1) + a + [-100])  # target t is token t + 1
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    tgt = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
    return ids, mask, tgt


def sft(model, tokenizer, sample_pairs: Callable[[int], list[tuple[str, str]]], max_steps: int, *,
        lr: float = 1e-3, batch_size: int = 128, check_every: int = 0,
        on_check: Callable[[int], bool] | None = None) -> int:  # fmt: skip
    """Teacher-forced next-token training on fresh pairs each step. Every `check_every`
    steps on_check(step) runs and may stop training by returning True. Returns the last step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(1, max_steps + 1):
        ids, mask, targets = sft_batch(tokenizer, sample_pairs(batch_size))
        hidden = final_hidden(model, ids, mask)
        logp = token_logprobs(hidden, head_weight(model), targets)
        loss = -logp.sum() / (targets != -100).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if check_every and on_check and step % check_every == 0 and on_check(step):
            return step
    return max_steps


@torch.no_grad()
def greedy_accuracy(model, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int) -> float:
    """Exact-match accuracy of greedy answers: a cheap progress check during SFT."""
    ids, mask = left_pad([tokenizer(p)["input_ids"] for p, _ in pairs], tokenizer.pad_token_id)
    gen = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    model.train()
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return sum(is_correct(t, a, match="exact") for t, (_, a) in zip(texts, pairs, strict=True)) / len(pairs)
