"""Verifiers: final answers extracted and matched; code run against its tests, within limits."""

from __future__ import annotations

import logging
import sys
import threading
import time

import pytest

from gopd import verifiers
from gopd.config import _installed
from gopd.data import Example
from gopd.verifiers import (
    CallCases,
    Verifier,
    answers_match,
    as_number,
    extract_answer,
    extract_code,
    is_correct,
    normalize_math,
    run_call_tests,
    run_io_tests,
    run_python_tests,
    same_output,
)


@pytest.mark.parametrize(
    "text,answer",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{x+1}", "x+1"),
        ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),  # nested braces: read whole, not the last number
        ("\\boxed{\\sqrt{\\frac{a}{b}}+1} done", "\\sqrt{\\frac{a}{b}}+1"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5$ or so", "5"),
        ("\\boxed {6}", "6"),
        ("first \\boxed{3}, then cut off: \\boxed{\\frac{1}{", None),  # the final answer never closed
        ("reasoning... #### 17", "17"),
        ("3 apples and 4 pears: 7", "7"),
        ("-3.5 degrees", "-3.5"),
        ("no digits here", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "got,reference",
    [
        ("\\frac12", "0.5"),
        ("\\dfrac{3}{4}", "3/4"),
        ("-\\frac{1}{2}", "-0.5"),
        ("033", "33"),  # AIME writes 3 digits
        ("1,000", "1000"),
        ("x = 5", "5"),
        ("90^\\circ", "90"),
        ("50\\%", "50"),
        ("\\text{(B)}", "(B)"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("2\\sqrt2", "2\\sqrt{2}"),
        ("5.", "5"),
        ("\\$12", "12"),
    ],
)
def test_math_answers_that_match(got, reference):
    assert answers_match(got, reference) and answers_match(reference, got)


@pytest.mark.parametrize(
    "got,reference",
    [
        ("0.33", "1/3"),  # exact numbers: no rounding
        ("2\\sqrt{2}", "\\sqrt{8}"),  # no symbolic algebra (said in the module doc)
        ("(1,2)", "(2,1)"),
        ("12", "1,2"),  # not a thousands separator: a pair
        ("1/0", "0"),
        ("", "0"),
        ("x = 5", "x = 6"),
    ],
)
def test_math_answers_that_differ(got, reference):
    assert not answers_match(got, reference)


symbolic = pytest.mark.skipif(not _installed("math_verify"), reason="answer_match symbolic needs math-verify")


@symbolic
@pytest.mark.parametrize(
    "got,reference",
    [
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("\\frac{9}{2}\\sqrt{3}", "\\frac{9\\sqrt{3}}{2}"),  # HMMT writes answers like this
        ("x^2+2x+1", "(x+1)^2"),
        ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
        ("\\pi/4", "\\frac{\\pi}{4}"),
        ("(1,2]", "\\left(1, 2\\right]"),
        ("\\{2,1\\}", "\\{1,2\\}"),
        ("0.333333", "\\frac13"),  # numbers to 6 decimals
        ("\\text{(B)}", "(B)"),  # what math accepts, symbolic accepts
        ("x = 5", "5"),
    ],
)
def test_symbolic_answers_that_match(got, reference):
    assert answers_match(got, reference, "symbolic")


@symbolic
@pytest.mark.parametrize(
    "got,reference",
    [
        ("0.33", "1/3"),
        ("(1,2)", "(2,1)"),
        ("(1,2)", "(1,2]"),
        ("-\\infty", "\\infty"),
        ("x = 5", "x = 6"),
        ("1/0", "0"),
        ("", "0"),
        ("\\frac{9}{2}", "\\frac{9\\sqrt{3}}{2}"),
    ],
)
def test_symbolic_answers_that_differ(got, reference):
    assert not answers_match(got, reference, "symbolic")


@symbolic
def test_symbolic_matching_is_bounded_in_time(monkeypatch):
    """A comparison SymPy cannot finish (a sum of 10^9 terms) is wrong after the time limit,
    not a hung evaluation."""
    monkeypatch.setattr(verifiers, "SYMBOLIC_TIMEOUT", 1)
    start = time.monotonic()
    assert not answers_match("\\sum_{k=1}^{10^{9}} k^{k}", "1", "symbolic")
    assert time.monotonic() - start < 4


@symbolic
def test_symbolic_matching_off_the_main_thread_says_it_has_no_time_limit(monkeypatch, caplog):
    """Math-Verify's time limits use SIGALRM, which a worker thread may not set: there it runs
    without them (and says so once) instead of failing."""
    monkeypatch.setattr(verifiers._symbolic_timeout, "said", False, raising=False)
    results = []
    with caplog.at_level(logging.WARNING, logger="gopd.verifiers"):
        for _ in range(2):  # "2/2.0" is no exact number: SymPy decides
            worker = threading.Thread(target=lambda: results.append(answers_match("1", "2/2.0", "symbolic")))
            worker.start()
            worker.join()
    assert results == [True, True]
    assert caplog.text.count("without its 5 s time limits") == 1


def test_symbolic_matching_without_math_verify_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify raises ImportError
    verifiers._parse_symbolic.cache_clear()
    with pytest.raises(ValueError, match=r"answer_match 'symbolic' needs math-verify: .* 'gopd\[math\]'"):
        answers_match("2\\sqrt2", "\\sqrt{8}", "symbolic")
    verifiers._parse_symbolic.cache_clear()


def test_exact_matching_keeps_every_character():
    assert is_correct("0579", "0579", match="exact") and not is_correct("579", "0579", match="exact")
    assert is_correct("579", "0579") and not is_correct("", "1")  # math: the same number
    with pytest.raises(ValueError, match="match must be one of"):
        answers_match("1", "1", match="sympy")


def test_normalised_forms():
    assert normalize_math(" \\left[ 1 , 2 \\right]. ") == "[1,2]"
    assert normalize_math("k_1 = \\tfrac{1}{3}") == "\\frac{1}{3}"
    assert as_number("\\frac{6}{4}") == as_number("1.5") == as_number("3/2")
    assert as_number("\\frac{x}{2}") is None and as_number("1e3") is None


@pytest.mark.parametrize(
    "text,code",
    [
        ("Here:\n```python\ndef f():\n    return 1\n```\nThen ```\nprint(2)\n```", "print(2)\n"),
        ("```py\nx = 1\n```\n```bash\nls\n```", "x = 1\n"),  # the last Python block, not the shell's
        ("```python\ndef g(): pass", "def g(): pass"),  # cut at the length cap: to the end
        ("def h(): pass", "def h(): pass"),  # no fence: the whole response
    ],
)
def test_extract_code(text, code):
    assert extract_code(text) == code


def test_code_passes_or_fails_by_its_exit_status():
    assert run_python_tests("def f(x):\n    return x + 1", "assert f(1) == 2")
    assert not run_python_tests("def f(x):\n    return x", "assert f(1) == 2")
    assert not run_python_tests("def f(x) return x", "assert f(1) == 2")  # syntax error
    assert not run_python_tests("import sys\nsys.exit(3)", "")
    # a response that leaves with status 0 before the asserts run has not passed them
    assert not run_python_tests("import sys\nsys.exit(0)", "assert False")
    assert not run_python_tests("import os\nos._exit(0)", "assert False")
    assert run_python_tests("import sys\nsys.stdout = None\nprint = None", "assert True")  # its stdout aside
    # its working directory is its own, empty and writable
    listing = "import os\nassert os.listdir() == ['x.txt']"
    assert run_python_tests("open('x.txt', 'w').write('ok')", listing)


def test_stdin_cases_feed_the_program_and_check_every_output():
    code = "a, b = map(int, input().split())\nprint(a + b)"
    cases = [("1 2\n", "3\n"), ("10 -4", "6  \n\n")]  # trailing spaces and blank lines aside
    assert run_io_tests(code, cases)
    assert not run_io_tests(code, [*cases, ("2 2\n", "5\n")])  # one wrong case fails it
    assert not run_io_tests("print(3)\nraise SystemExit(1)", [("1 2", "3")])  # right output, failed exit
    assert not run_io_tests("while True:\n    pass", [("", "")], timeout=1.0)
    assert not run_io_tests("print('x' * (4 << 20))", [("", "x")], file_bytes=1 << 20)  # 4 MiB > 1 MiB
    ex = Example([1], "code", None, "q", cases)
    assert Verifier(allow_code_execution=True).check([f"```python\n{code}\n```"], [ex]) == [True]


def test_stdin_output_is_compared_as_livecodebench_compares_it():
    assert same_output("  3 \n\n", "3") and same_output("\n1 2\n3\n", "1 2\n3")  # outer blanks aside
    assert same_output("1.0 2.50", "1 2.5") and same_output("-0", "0")  # numbers as decimals
    assert not same_output("1 2", "1\n2") and not same_output("1 2", "1  2 3")
    assert not same_output("0.3333333", "0.3333334") and not same_output("yes", "YES")
    assert not same_output("50000000000000001", "50000000000000000")  # exact, not float-close


def test_stdin_programs_get_the_contest_prelude():
    """LiveCodeBench's grader runs solutions with the standard modules imported; so does ours."""
    code = "n = int(input())\nprint(Counter('abca')['a'] + gcd(n, 6), heappop([n]))"
    assert run_io_tests(code, [("4\n", "4 4")])
    assert run_io_tests("print(pow(2, 10, 1000))", [("", "24")])  # builtins' pow, not math's


CALLS = CallCases("twoSum", (("[2, 7, 11]\n9", "[0, 1]"), ("[3, 3]\n6", "[0, 1]")))
TWO_SUM = """
class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
"""


def test_call_cases_call_the_solution_method_with_each_cases_arguments():
    assert run_call_tests(TWO_SUM, CALLS)  # List without an import: the prelude has typing's
    pair = TWO_SUM.replace("return [seen[target - x], i]", "return seen[target - x], i")
    assert pair != TWO_SUM and run_call_tests(pair, CALLS)  # a tuple counts as its list
    function = "def twoSum(nums, target):\n    print('debug', nums)\n    return [0, 1]"
    assert run_call_tests(function, CALLS)  # a module function; its own prints aside
    assert not run_call_tests("def twoSum(nums, target):\n    return {0, 1}", CALLS)  # a set is no list
    odd = "import array\ndef twoSum(nums, target):\n    return array.array('i', [0, 1])"
    assert not run_call_tests(odd, CALLS)  # nor an array (JSON cannot write it: its repr)
    scalars = "import numpy\ndef twoSum(nums, target):\n    return [numpy.int64(0), numpy.int64(1)]"
    assert run_call_tests(scalars, CALLS)  # numpy's scalars equal their numbers
    assert not run_call_tests(TWO_SUM.replace("i]", "i + 1]"), CALLS)
    assert not run_call_tests("def twoSum(nums, target):\n    return [0, 1] if target == 9 else None", CALLS)
    assert not run_call_tests("def twoSum(nums, target):\n    raise KeyError(target)", CALLS)
    assert not run_call_tests("def other(nums, target):\n    return [0, 1]", CALLS)  # no such function
    assert not run_call_tests("import os\nos._exit(0)", CALLS)
    ex = Example([1], "code", None, "q", CALLS)
    assert Verifier(allow_code_execution=True).check([f"```python\n{TWO_SUM}\n```"], [ex]) == [True]


def test_a_call_past_its_time_is_stopped():
    started = time.perf_counter()
    slow = "def twoSum(nums, target):\n    while True:\n        pass"
    assert not run_call_tests(slow, CALLS, timeout=1.0)
    assert time.perf_counter() - started < 2.9  # the case's own alarm, not the 3 s backstop


def test_call_cases_are_checked_when_made():
    with pytest.raises(ValueError, match="fn_name must be a Python name"):
        CallCases("two sum", CALLS.cases)
    with pytest.raises(ValueError, match="case 0: arguments .* must parse as JSON"):
        CallCases("f", (("[1,", "1"),))
    with pytest.raises(ValueError, match="cases: none given"):
        CallCases("f", ())


def test_code_is_stopped_at_its_limits(tmp_path):
    started = time.perf_counter()
    assert not run_python_tests("while True:\n    pass", "", timeout=1.0)
    assert time.perf_counter() - started < 10
    assert not run_python_tests("x = bytearray(8 << 30)", "", memory_bytes=1 << 30)  # 8 GiB > 1 GiB
    assert not run_python_tests("open('big', 'wb').write(b'0' * (2 << 20))", "", file_bytes=1 << 20)
    # what the code starts dies with it: a child that would write a file after 2 s never does
    marker = tmp_path / "child_was_here"
    child = f"import time; time.sleep(2); open({str(marker)!r}, 'w')"
    spawn = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\n"
    assert run_python_tests(spawn, "")
    time.sleep(3)
    assert not marker.exists()


def test_verifier_checks_answers_and_runs_tests_only_when_allowed():
    examples = [Example([1], "math", "\\frac{1}{2}", "p"), Example([1], "code", None, "q", "assert f() == 1")]
    texts = ["\\boxed{0.5}", "```python\ndef f():\n    return 1\n```"]
    assert Verifier(allow_code_execution=True, code_workers=2).check(texts, examples) == [True, True]
    assert Verifier("exact", allow_code_execution=True).check(texts, examples) == [False, True]
    with pytest.raises(ValueError, match="allow_code_execution"):
        Verifier().check(texts, examples)
    assert Verifier().check(texts[:1], examples[:1]) == [True]  # no tests: nothing runs
