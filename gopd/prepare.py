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

HumanEval(+) and MBPP(+) (`gopd prepare humaneval`, `gopd prepare mbpp`) keep their tests
as Python asserts, which the verifier runs after the response's code. HumanEval's layout
(OpenAI's HumanEval.jsonl, and EvalPlus' HumanEvalPlus-OriginFmt.jsonl.gz) gives each
problem a `prompt` (the signature and docstring), an `entry_point` and a `test` that
defines check(candidate); the record's tests are that `test` and check(entry_point).
EvalPlus' other HumanEvalPlus.jsonl keeps its extra inputs without expected outputs (its
`test` is HumanEval's original one), so it is refused rather than read as HumanEval+.
MBPP's layout (Google's sanitized-mbpp.json records, EvalPlus' MbppPlus in its
original format) gives a `prompt` (the task in words; `text` in the full layout),
`test_list` (asserts) and `test_imports` (`test_setup_code` in the full layout), and MBPP+
adds a `test` program that checks the function on every input; the prompt shows the first
assert, as MBPP's prompts do, which names the function.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
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


_WHOLE_FUNCTION = "Write the whole solution, with the imports it needs, in one ```python code block."

# Known faults in published tests, mended as their authors' own evaluator checks: in EvalPlus'
# HumanEvalPlus-OriginFmt, HumanEval/32 (find_zero) unpacks the root it returns as if it were the
# coefficients, so no solution passes (measured: the canonical one fails); EvalPlus' evaluator
# checks the polynomial at the returned root, as HumanEval's own test does (|poly(xs, x)| small).
_TEST_REPAIRS = {"assert _poly(*candidate(*inp), inp) <= ": "assert abs(_poly(*inp, candidate(*inp))) <= "}


def humaneval_record(row: dict) -> dict:
    """One HumanEval(+) problem as a gopd eval record (see the module docstring)."""
    where = f"task {row.get('task_id', '?')}"
    if "plus_input" in row:
        raise ValueError(f"{where}: this is EvalPlus' HumanEvalPlus.jsonl, whose `test` holds HumanEval's "
                         "original tests only (its plus inputs have no expected outputs there); use "
                         "HumanEvalPlus-OriginFmt.jsonl.gz, whose `test` checks every input")  # fmt: skip
    missing = [k for k in ("prompt", "entry_point", "test") if not row.get(k)]
    if missing:
        raise ValueError(f"{where}: no {', '.join(missing)}; HumanEval's layout: prompt, entry_point, test")
    if "def check(" not in row["test"]:
        raise ValueError(f"{where}: its test defines no check(candidate)")
    prompt = f"Complete this Python function:\n```python\n{row['prompt'].strip()}\n```\n\n{_WHOLE_FUNCTION}"
    test, repaired = row["test"], []
    for broken, mended in _TEST_REPAIRS.items():
        if broken in test:
            test = test.replace(broken, mended)
            repaired.append(f"{broken.strip()} -> {mended.strip()}")
    record = {"prompt": prompt, "tests": f"{test}\n\ncheck({row['entry_point']})\n", "domain": "code",
              "id": row.get("task_id")}  # fmt: skip
    return record | ({"repaired": "; ".join(repaired)} if repaired else {})


def mbpp_record(row: dict) -> dict:
    """One MBPP(+) problem as a gopd eval record (see the module docstring)."""
    where = f"task {row.get('task_id', '?')}"
    if "plus_input" in row:
        raise ValueError(
            f"{where}: this is EvalPlus' compact MbppPlus layout, whose plus inputs have no expected "
            "outputs; use MBPP+ in its original format (a `test` program each)"
        )
    task, asserts = row.get("prompt") or row.get("text"), row.get("test_list")
    if not task or not asserts or not isinstance(asserts, list):
        raise ValueError(f"{where}: needs `prompt` (or `text`) and a list `test_list`, as MBPP's layout has")
    # what runs before the asserts: the sanitized layout's imports, the full layout's setup code
    setup = "\n".join([*(row.get("test_imports") or []), row.get("test_setup_code") or ""]).strip()
    tests = _called(row["test"], row.get("entry_point"), where) if row.get("test") else "\n".join(asserts)
    example = f"Your code should pass this test:\n```python\n{asserts[0]}\n```"
    prompt = f"{task.strip()}\n{example}\n\n{_WHOLE_FUNCTION}"
    return {"prompt": prompt, "tests": f"{setup}\n{tests}\n" if setup else f"{tests}\n", "domain": "code",
            "id": row.get("task_id")}  # fmt: skip


def _called(test: str, entry_point: str | None, where: str) -> str:
    """A `test` program that runs its checks: as it is (MBPP+'s checks every input at its top
    level), or, where it only defines check() as some MBPP copies do, followed by the call,
    which would otherwise never run and pass every response."""
    if not re.search(r"^def check\(", test, re.MULTILINE) or re.search(r"^check\(", test, re.MULTILINE):
        return test  # no check() to call, or one it calls itself
    if re.search(r"^def check\(\s*\)", test, re.MULTILINE):
        return f"{test}\n\ncheck()"
    if not entry_point:
        raise ValueError(f"{where}: its test defines check(candidate), and the row names no entry_point")
    return f"{test}\n\ncheck({entry_point})"


def assert_records(paths: Iterable[str], benchmark: str) -> list[dict]:
    """Every problem of `paths` (HumanEval's or MBPP's layout, by `benchmark`) as a record."""
    make = {"humaneval": humaneval_record, "mbpp": mbpp_record}[benchmark]
    return [make(row) for path in paths for row in read_records(path)]
