"""Public benchmarks' files as gopd eval records (`gopd prepare livecodebench`).

LiveCodeBench (code_generation_lite: test.jsonl ... test6.jsonl, one problem a line) keeps
its tests in two fields: `public_test_cases`, JSON text, and `private_test_cases`, JSON text
either as it is or pickled, zlib-compressed and base64-encoded. Each case is {"input",
"output", "testtype"}: "stdin" (a program reading its input) or "functional" (a call of the
function that `metadata`'s "func_name" names, LeetCode's style). A record here is

    {"prompt": ..., "tests": {"inputs": [...], "outputs": [...], "fn_name": ...},
     "domain": "code", "id": ..., "date": ..., "difficulty": ...}

the `tests` form gopd.data reads (fn_name only for functional problems). The private cases
are unpickled with every class refused: a string is all they may hold, so a file that
carries anything else is an error rather than code run on load.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from collections.abc import Iterable

from gopd.data import read_records

_STDIN_TASK = "Read the input from standard input and print the answer to standard output."
_CALL_TASK = (
    "Complete this starter code; its method is called with each input and what it returns is checked:"
)


class _StringsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"the private tests may hold only text, not {module}.{name}")


def _private_cases(text: str) -> list[dict]:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    blob = _StringsOnly(io.BytesIO(zlib.decompress(base64.b64decode(text)))).load()
    if not isinstance(blob, str):
        raise ValueError(f"the private tests unpickle to {type(blob).__name__}, not JSON text")
    return json.loads(blob)


def livecodebench_prompt(question: str, starter_code: str) -> str:
    """The problem, what kind of program it wants, and where the answer goes (the verifier
    runs the response's last ```python block)."""
    task = f"{_CALL_TASK}\n```python\n{starter_code.strip()}\n```" if starter_code.strip() else _STDIN_TASK
    return f"{question.strip()}\n\n{task}\n\nWrite the whole solution in Python, in one ```python code block."


def livecodebench_record(row: dict, public_only: bool = False) -> dict:
    """One LiveCodeBench problem as a gopd eval record (see the module docstring)."""
    where = f"problem {row.get('question_id', '?')}"
    try:
        cases = json.loads(row["public_test_cases"])
        if not public_only and row.get("private_test_cases"):
            cases += _private_cases(row["private_test_cases"])
        metadata = row.get("metadata") or {}
        metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
    except (KeyError, ValueError, zlib.error, pickle.UnpicklingError, TypeError) as exc:
        raise ValueError(f"{where}: its tests or metadata do not read: {exc}") from exc
    kinds = {c.get("testtype", "stdin") for c in cases}
    if not cases or len(kinds) != 1 or not kinds <= {"stdin", "functional"}:
        raise ValueError(f"{where}: needs cases of one kind, stdin or functional; got {sorted(kinds)}")
    tests = {"inputs": [c["input"] for c in cases], "outputs": [c["output"] for c in cases]}
    if kinds == {"functional"}:
        if "func_name" not in metadata:
            raise ValueError(f"{where}: functional tests, but its metadata names no func_name")
        tests["fn_name"] = metadata["func_name"]
    return {
        "prompt": livecodebench_prompt(row["question_content"], row.get("starter_code") or ""),
        "tests": tests, "domain": "code", "id": row.get("question_id"),
        "date": str(row.get("contest_date", ""))[:10], "difficulty": row.get("difficulty"),
    }  # fmt: skip


def livecodebench_records(
    paths: Iterable[str], start_date: str | None = None, end_date: str | None = None,
    public_only: bool = False,
) -> list[dict]:  # fmt: skip
    """Every problem of `paths` whose contest date (YYYY-MM-DD) is within [start_date,
    end_date], both optional and inclusive, as LiveCodeBench's own windows are."""
    records = []
    for path in paths:
        for row in read_records(path):
            date = str(row.get("contest_date", ""))[:10]
            if (start_date and date < start_date) or (end_date and date > end_date):
                continue
            records.append(livecodebench_record(row, public_only))
    return records
