"""Tiny models, tokenizers and data files for the trainer tests (built in code, no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gopd.demo.task import ALPHABET, problem
from gopd.demo.tiny import build_model, build_tokenizer, save


def make_model_dir(path: Path, seed: int, hidden: int = 32, alphabet: str = ALPHABET) -> Path:
    tokenizer = build_tokenizer(alphabet)
    return save(build_model(tokenizer, hidden=hidden, layers=1, heads=2, seed=seed), tokenizer, path)


def write_data(path: Path, n: int, seed: int, domains: tuple[str, ...] = ()) -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        prompt, answer = problem(rng, 2)
        record = {"prompt": prompt, "answer": answer}
        if domains:
            record["domain"] = domains[i % len(domains)]
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """student, two teachers (one of another hidden size), a separate reference, and data."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "student": make_model_dir(root / "student", seed=0),
        "teacher": make_model_dir(root / "teacher", seed=1, hidden=48),
        "teacher_b": make_model_dir(root / "teacher_b", seed=2),
        "reference": make_model_dir(root / "reference", seed=3),
        "train": write_data(root / "train.jsonl", 40, seed=0),
        "eval": write_data(root / "eval.jsonl", 8, seed=1),
        "train_domains": write_data(root / "train_domains.jsonl", 40, seed=2, domains=("math", "code")),
        "root": root,
    }


def give_heads_a_bias(monkeypatch, student: bool, frozen: bool) -> None:
    """gopd.models.load_model gives the student's and/or the frozen models' LM head a random
    bias (Phi-style heads; the tiny Qwen3s have none): a fresh untied Linear, its weight copied."""
    import torch

    import gopd.models

    load = gopd.models.load_model

    def with_bias(path, dtype, device, trainable, attn_implementation=None):
        model = load(path, dtype, device, trainable, attn_implementation)
        if student if trainable else frozen:
            head = model.get_output_embeddings()
            biased = torch.nn.Linear(head.in_features, head.out_features, bias=True).to(head.weight)
            with torch.no_grad():
                biased.weight.copy_(head.weight)
                biased.bias.copy_(torch.randn(head.out_features, generator=torch.Generator().manual_seed(5)))
            biased.requires_grad_(trainable)
            model.lm_head = biased
        return model

    monkeypatch.setattr(gopd.models, "load_model", with_bias)


def transformed_model_dir(path: Path, family: str, seed: int, value: float) -> str:
    """A tiny model with the tiny models' tokenizer whose forward transforms its logits: a
    Granite that divides them by logits_scaling = value (its logit scale: 1 / value), or a
    Gemma 2 that soft-caps them at final_logit_softcapping = value, its head scaled up so that
    its largest logits reach about 5, which caps of 5 to 12 bend (by 24 % to 3 %)."""
    import torch
    import transformers

    tokenizer = build_tokenizer(ALPHABET)
    name = {"granite": "Granite", "gemma2": "Gemma2"}[family]
    extra = (
        {"logits_scaling": value}
        if family == "granite"
        else {"final_logit_softcapping": value, "head_dim": 16}
    )
    config = getattr(transformers, f"{name}Config")(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = getattr(transformers, f"{name}ForCausalLM")(config)
    if family == "gemma2":
        with torch.no_grad():
            model.lm_head.weight.mul_(10.0)  # tied: the embeddings too (Gemma scales them by sqrt(D))
    return str(save(model, tokenizer, path))


def base_config(tiny: dict, tmp_path: Path, **overrides):
    from gopd.config import TrainConfig

    values = dict(
        student=str(tiny["student"]), teachers=str(tiny["teacher"]), train_data=str(tiny["train"]),
        max_prompt_tokens=16, max_new_tokens=4, prompts_per_step=6, samples_per_prompt=2, micro_batch_size=5,
        lr=1e-3, steps=3, output_dir=str(tmp_path / "run"), loggers=["jsonl"], device="cpu",
        kernel_backend="torch",
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values).validate()
