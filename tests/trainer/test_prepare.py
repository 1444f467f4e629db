"""gopd prepare livecodebench: LiveCodeBench's files as eval records whose tests the verifier runs."""

from __future__ import annotations

import base64
import json
import pickle
import zlib

import pytest

from gopd.cli import main
from gopd.data import load_examples
from gopd.models import load_tokenizer
from gopd.prepare import livecodebench_record
from gopd.verifiers import CallCases, Verifier
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
