"""A synthetic task with verifiable answers: fixed-width addition, answer digits reversed.

"123+456=" -> "9750" (579 as 4 digits, 0579, written least significant digit first: the
order in which a left-to-right model can carry). Small models learn it in a minute on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ALPHABET = "0123456789+="


def problem(rng: random.Random, digits: int) -> tuple[str, str]:
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return f"{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}"[::-1]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_splits(out: Path, digits: int, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """train.jsonl (prompts; answers too, unused by G-OPD) and eval.jsonl, disjoint."""
    rng = random.Random(seed)
    seen, records = set(), []
    while len(records) < n_train + n_eval:
        prompt, answer = problem(rng, digits)
        if prompt not in seen:
            seen.add(prompt)
            records.append({"prompt": prompt, "answer": answer})
    return write_jsonl(out / "train.jsonl", records[:n_train]), write_jsonl(
        out / "eval.jsonl", records[n_train:]
    )
