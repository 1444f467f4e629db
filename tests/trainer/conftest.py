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
