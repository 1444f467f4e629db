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
