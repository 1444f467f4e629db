"""gopd prepare: LiveCodeBench's, HumanEval's and MBPP's files as eval records whose tests the
verifier runs."""

from __future__ import annotations

import base64
import gzip
import json
import pickle
import zlib

import pytest

from gopd.cli import main
from gopd.data import load_examples, read_records
from gopd.models import load_tokenizer
from gopd.prepare import humaneval_record, livecodebench_record, mbpp_record
from gopd.verifiers import CallCases, Verifier, run_python_tests
from tests.trainer.conftest import base_config


def _packed(cases: list[dict]) -> str:
    """How LiveCodeBench stores private tests: JSON text, pickled, zlib-compressed, base64."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def _case(given: str, expected: str, kind: str) -> dict:
    return {"input": given, "output": expected, "testtype": kind}


CALL_ROW = {
    "question_id": "3000", "question_content": "Return the sum of a and b.",
    "contest_date": "2024-09-01T00:00:00",
    "starter_code": "class Solution:\n    def add(self, a: int, b: int) -> int:\n        ",
    "public_test_cases": json.dumps([_case("1\n2", "3", "functional")]),
    "private_test_cases": _packed([_case("-5\n5", "0", "functional"), _case("10\n20", "30", "functional")]),
    "metadata": json.dumps({"func_name": "add"}), "difficulty": "medium",
}  # fmt: skip
STDIN_ROW = {
    "question_id": "abc300_a", "question_content": "Print a + b.", "contest_date": "2024-03-02T00:00:00",
    "starter_code": "", "public_test_cases": json.dumps([_case("1 2\n", "3\n", "stdin")]),
    "private_test_cases": json.dumps([_case("4 5\n", "9\n", "stdin")]), "metadata": "{}",
    "difficulty": "easy",
}  # fmt: skip


def test_livecodebench_files_become_records_the_verifier_runs(tiny, tmp_path, capsys):
    source, out = tmp_path / "test6.jsonl", tmp_path / "lcb.jsonl"
    source.write_text(json.dumps(CALL_ROW) + "\n" + json.dumps(STDIN_ROW) + "\n")
    assert main(["prepare", "livecodebench", "--input", str(source), "--output", str(out)]) == 0
    assert (
        "2 problems (1 stdin, 1 functional), dated 2024-03-02 to 2024-09-01, 5 test cases"
        in capsys.readouterr().out
    )
    cfg = base_config(tiny, tmp_path, eval_data=str(out), allow_code_execution=True, max_prompt_tokens=1024)
    call, stdin = load_examples(str(out), cfg, load_tokenizer(str(tiny["student"])), 4096, for_eval=True)
    assert call.tests == CallCases("add", (("1\n2", "3"), ("-5\n5", "0"), ("10\n20", "30")))
    assert stdin.tests == [("1 2\n", "3\n"), ("4 5\n", "9\n")] and stdin.domain == "code"
    assert "class Solution:" in call.prompt and "standard input" in stdin.prompt
    by_difficulty = base_config(tiny, tmp_path, eval_data=str(out), allow_code_execution=True,
                                max_prompt_tokens=1024, domain_field="difficulty")  # fmt: skip
    tok = load_tokenizer(str(tiny["student"]))
    assert [ex.domain for ex in load_examples(str(out), by_difficulty, tok, 4096, for_eval=True)] == [
        "medium",
        "easy",
    ]  # figures per difficulty
    right = ["```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```",
             "```python\na, b = map(int, input().split())\nprint(a + b)\n```"]  # fmt: skip
    wrong = [right[0].replace("a + b", "a - b"), right[1].replace("a + b", "a * b")]
    verifier = Verifier(allow_code_execution=True)
    assert verifier.check(right, [call, stdin]) == [True, True]
    assert verifier.check(wrong, [call, stdin]) == [False, False]  # 1 * 2 != 3; -5 - 5 != 0


def test_dates_and_public_only_pick_what_is_written(tmp_path, capsys):
    source, out = tmp_path / "test.jsonl", tmp_path / "lcb.jsonl"
    source.write_text(json.dumps(CALL_ROW) + "\n" + json.dumps(STDIN_ROW) + "\n")
    args = ["prepare", "livecodebench", "--input", str(source), "--output", str(out)]
    assert main([*args, "--start-date", "2024-08-01", "--public-only"]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (
        record["tests"] == {"inputs": ["1\n2"], "outputs": ["3"], "fn_name": "add"} and record["id"] == "3000"
    )
    assert main([*args, "--end-date", "2024-03-02"]) == 0  # inclusive
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["abc300_a"]
    assert main([*args, "--start-date", "2025-01-01"]) == 2
    assert main([*args, "--start-date", "2024/08/01"]) == 2
    err = capsys.readouterr().err
    assert "no problem of" in err and "--start-date must be YYYY-MM-DD, got '2024/08/01'" in err


class _Shell:  # what a hostile file could pickle: a call made while loading
    def __reduce__(self):
        return (print, ("ran on load",))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(private_test_cases=base64.b64encode(zlib.compress(pickle.dumps(_Shell()))).decode()),
         "its tests .* do not read: the private tests may hold only text, not builtins.print"),
        (dict(metadata="{}"), "functional tests, but its metadata names no func_name"),
        (dict(public_test_cases=json.dumps([_case("1", "1", "stdin")])),
         r"needs cases of one kind, .* \['functional', 'stdin'\]"),
        (dict(public_test_cases="[1,"), "its tests or metadata do not read"),
    ],
)  # fmt: skip
def test_a_problem_that_does_not_read_is_an_error_naming_it(change, match, capsys):
    with pytest.raises(ValueError, match=f"problem 3000: {match}"):
        livecodebench_record({**CALL_ROW, **change})
    assert "ran on load" not in capsys.readouterr().out


# HumanEval's layout (OpenAI's file, EvalPlus' OriginFmt): the signature and docstring, the
# function's name, and a check(candidate) of asserts. A problem written here, not copied.
HUMANEVAL_ROW = {
    "task_id": "HumanEval/999", "entry_point": "clamp",
    "prompt": "from typing import List\n\n\ndef clamp(xs: List[int], low: int, high: int) -> List[int]:\n"
              '    """Each of xs limited to [low, high].\n    >>> clamp([0, 5, 9], 1, 8)\n'
              '    [1, 5, 8]\n    """\n',
    "canonical_solution": "    return [min(max(x, low), high) for x in xs]\n",
    "test": "\n\ndef check(candidate):\n    assert candidate([0, 5, 9], 1, 8) == [1, 5, 8]\n"
            "    assert candidate([], 0, 1) == []\n    assert candidate([-3], -2, 2) == [-2]\n",
}  # fmt: skip
# MBPP's layout (sanitized-mbpp.json; MBPP+ adds `test`, a program checking more inputs)
MBPP_ROW = {
    "task_id": 9999, "prompt": "Write a function to return the larger of two numbers.",
    "code": "def larger(a, b):\n    return a if a > b else b", "test_imports": ["import math"],
    "test_list": ["assert larger(1, 2) == 2", "assert larger(5, 3) == 5"],
}  # fmt: skip


def _answer(code: str) -> str:
    return f"Here it is:\n```python\n{code}\n```"


def test_humaneval_files_become_records_the_verifier_runs(tiny, tmp_path, capsys):
    source, out = tmp_path / "HumanEvalPlus-OriginFmt.jsonl.gz", tmp_path / "he.jsonl"
    with gzip.open(source, "wt") as f:  # EvalPlus publishes gzipped JSON lines
        f.write(json.dumps(HUMANEVAL_ROW) + "\n")
    assert main(["prepare", "humaneval", "--input", str(source), "--output", str(out)]) == 0
    assert "1 problems, each with its asserts" in capsys.readouterr().out
    cfg = base_config(tiny, tmp_path, eval_data=str(out), allow_code_execution=True, max_prompt_tokens=1024)
    (example,) = load_examples(str(out), cfg, load_tokenizer(str(tiny["student"])), 4096, for_eval=True)
    assert HUMANEVAL_ROW["prompt"].strip() in example.prompt and example.domain == "code"
    whole = HUMANEVAL_ROW["prompt"] + HUMANEVAL_ROW["canonical_solution"]
    off_by_one = whole.replace("min(max(x, low), high)", "min(max(x, low), high - 1)")
    no_import = whole.replace("from typing import List\n", "")  # the annotations need it
    verifier = Verifier(allow_code_execution=True)
    assert verifier.check([_answer(whole), _answer(off_by_one), _answer(no_import)], [example] * 3) == [
        True, False, False]  # fmt: skip


def test_humaneval_plus_without_expected_outputs_is_refused():
    """EvalPlus' HumanEvalPlus.jsonl keeps the extra inputs without their outputs; read as
    HumanEval it would silently be the original tests only."""
    row = {**HUMANEVAL_ROW, "plus_input": [[[1], 0, 0]], "base_input": [[[0, 5, 9], 1, 8]]}
    with pytest.raises(ValueError, match="HumanEval/999: this is EvalPlus' HumanEvalPlus.jsonl.*OriginFmt"):
        humaneval_record(row)
    with pytest.raises(ValueError, match="task HumanEval/999: its test defines no check"):
        humaneval_record({**HUMANEVAL_ROW, "test": "assert True"})
    with pytest.raises(ValueError, match="task HumanEval/999: no entry_point"):
        humaneval_record({k: v for k, v in HUMANEVAL_ROW.items() if k != "entry_point"})


def test_mbpp_and_mbpp_plus_records_run_their_asserts(tmp_path, capsys):
    check = ("inputs = [[1, 2], [5, 3], [4, 4], [-1, -2]]\nresults = [2, 5, 4, -1]\n"
             "for inp, exp in zip(inputs, results):\n    assert larger(*inp) == exp\n")  # fmt: skip
    plus = {**MBPP_ROW, "test": check}
    source, out = tmp_path / "sanitized-mbpp.json", tmp_path / "mbpp.jsonl"
    source.write_text(json.dumps([MBPP_ROW, plus]))  # MBPP's own file is one JSON list
    assert main(["prepare", "mbpp", "--input", str(source), "--output", str(out)]) == 0
    base, extended = (json.loads(line) for line in out.read_text().splitlines())
    assert "assert larger(1, 2) == 2" in base["prompt"] and base["tests"].startswith("import math\n")
    assert "inputs = " in extended["tests"] and "assert larger(5, 3)" not in extended["tests"]
    right, wrong = MBPP_ROW["code"], "def larger(a, b):\n    return max(abs(a), abs(b))"  # wrong below 0
    outcome = lambda code, tests: run_python_tests(code, tests)  # noqa: E731
    assert outcome(right, base["tests"]) and outcome(right, extended["tests"])
    assert outcome(wrong, base["tests"]) and not outcome(wrong, extended["tests"])  # only MBPP+ catches it
    with pytest.raises(ValueError, match="task 9999: needs `prompt`"):
        mbpp_record({**MBPP_ROW, "test_list": []})
    with pytest.raises(ValueError, match="task 9999: this is EvalPlus' compact MbppPlus layout"):
        mbpp_record({**MBPP_ROW, "plus_input": [[1, 1]], "base_input": [[1, 2]]})
    source.write_text(json.dumps(MBPP_ROW))  # one record, not a list of them
    with pytest.raises(ValueError, match="sanitized-mbpp.json: expected a JSON list of records, got dict"):
        read_records(str(source))


def test_mbpp_layouts_run_their_setup_and_a_check_they_only_define(tmp_path):
    """The full MBPP layout (`text`, `test_setup_code`) and copies whose `test` only defines
    check(): its call is added, else every response would pass a test that never runs."""
    wrong = "def larger(a, b):\n    return a"
    full = {"task_id": 1, "text": "Return the larger number.", "test_setup_code": "LIMIT = 5",
            "test_list": ["assert larger(1, LIMIT) == 5"]}  # fmt: skip
    assert run_python_tests(MBPP_ROW["code"], mbpp_record(full)["tests"])
    assert not run_python_tests(wrong, mbpp_record(full)["tests"])
    defines_only = {**MBPP_ROW, "test": "def check():\n    assert larger(1, 2) == 2\n"}
    takes_candidate = {**MBPP_ROW, "test": "def check(candidate):\n    assert candidate(1, 2) == 2\n",
                       "entry_point": "larger"}  # fmt: skip
    for row in (defines_only, takes_candidate):
        assert not run_python_tests(wrong, mbpp_record(row)["tests"])
        assert run_python_tests(MBPP_ROW["code"], mbpp_record(row)["tests"])
    calls_itself = {**MBPP_ROW, "test": defines_only["test"] + "\ncheck()\n"}
    assert mbpp_record(calls_itself)["tests"].count("check()") == 2  # its definition and its one call
    with pytest.raises(
        ValueError, match="task 9999: its test defines check.candidate., and the row names no entry_point"
    ):
        mbpp_record({**takes_candidate, "entry_point": None})


def test_livecodebench_settings_are_refused_for_the_assert_benchmarks(tmp_path, capsys):
    source = tmp_path / "mbpp.jsonl"
    source.write_text(json.dumps(MBPP_ROW) + "\n")
    args = ["prepare", "mbpp", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]
    assert main([*args, "--start-date", "2024-01-01", "--public-only"]) == 2
    assert "--start-date, --public-only: for livecodebench only; mbpp has no dates" in (
        capsys.readouterr().err
    )


def test_a_known_fault_in_a_published_test_is_mended_and_said(tmp_path, capsys):
    """EvalPlus' OriginFmt check of find_zero unpacks the returned root as the coefficients:
    every solution failed it (its canonical one too, measured on the real file). The record
    checks the polynomial at the root instead, as EvalPlus' evaluator does, and says so."""
    test = ("import math\n\ndef _poly(xs, x):\n"
            "    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n\n"
            "def check(candidate):\n    inputs = [[[-6, 11, -6, 1]], [[2, -1]]]\n"
            "    for inp in inputs:\n        assert _poly(*candidate(*inp), inp) <= 0.0001\n")  # fmt: skip
    prompt = 'def find_zero(xs: list) -> float:\n    """A root of the polynomial xs."""\n'
    row = {"task_id": "HumanEval/32", "entry_point": "find_zero", "test": test, "prompt": prompt}
    source, out = tmp_path / "he.jsonl", tmp_path / "o.jsonl"
    source.write_text(json.dumps(row) + "\n")
    assert main(["prepare", "humaneval", "--input", str(source), "--output", str(out)]) == 0
    assert "HumanEval/32: its published test mended" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    bisect = ("def find_zero(xs):\n    f = lambda x: sum(c * x**i for i, c in enumerate(xs))\n"
              "    lo, hi = -100.0, 100.0\n    for _ in range(200):\n        mid = (lo + hi) / 2\n"
              "        lo, hi = (mid, hi) if f(lo) * f(mid) > 0 else (lo, mid)\n    return lo\n")  # fmt: skip
    assert run_python_tests(bisect, record["tests"])
    assert not run_python_tests(bisect, row["test"] + "\ncheck(find_zero)")  # as published
    assert not run_python_tests("def find_zero(xs):\n    return 0.5\n", record["tests"])  # not a root
