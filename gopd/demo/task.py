"""Synthetic tasks with verifiable answers: fixed-width addition, answer digits reversed; and,
for the merging demo, subtraction written the same way.

"123+456=" -> "9750" (579 as 4 digits, 0579, written least significant digit first: the
order in which a left-to-right model can carry). Small models learn it in a minute on a CPU.
"456-123=" -> "3330" (333 as 0333, reversed; the larger number first, so never negative).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from gopd.data import write_jsonl

ALPHABET = "0123456789+="
MERGE_ALPHABET = ALPHABET + "-"  # its own tokenizer: the addition demo's stays as it was


def problem(rng: random.Random, digits: int) -> tuple[str, str]:
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return f"{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}"[::-1]


def subtraction(rng: random.Random, digits: int) -> tuple[str, str]:
    a, b = sorted((rng.randrange(10**digits), rng.randrange(10**digits)), reverse=True)
    return f"{a:0{digits}d}-{b:0{digits}d}=", f"{a - b:0{digits + 1}d}"[::-1]


def make_splits(out: Path, digits: int, n_train: int, n_eval: int, seed: int,
                tasks: dict[str, Callable] | None = None) -> tuple[Path, Path]:  # fmt: skip
    """train.jsonl (prompts; answers too, unused by G-OPD) and eval.jsonl, disjoint. With
    several `tasks` ({domain: problem maker}) the records take turns and name their domain."""
    tasks = tasks or {"default": problem}
    domains = list(tasks)
    rng = random.Random(seed)
    seen, records = set(), []
    while len(records) < n_train + n_eval:
        domain = domains[len(records) % len(domains)]
        prompt, answer = tasks[domain](rng, digits)
        if prompt not in seen:
            seen.add(prompt)
            records.append(
                {"prompt": prompt, "answer": answer} | ({"domain": domain} if len(tasks) > 1 else {})
            )
    return write_jsonl(out / "train.jsonl", records[:n_train]), write_jsonl(
        out / "eval.jsonl", records[n_train:]
    )
