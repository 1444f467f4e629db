"""Verifiers: is a sampled response right? What evaluation counts for avg@k and pass@k.

- A reference answer (math): the response's final answer, the last \\boxed{...} (braces
  balanced, so \\boxed{\\frac{1}{2}} is read whole; none when it never closes), else what
  follows the last '####', else its last number; compared with the reference either as
  strings (`answer_match: exact`) or after normalising the LaTeX both are written in
  (`math`, the default): spacing, \\left / \\right, \\dfrac, \\text{...}, degrees, thousands
  separators, a leading "x =", and numbers compared as exact fractions (0.5 = 1/2 =
  \\frac{1}{2}, 033 = 33), with no algebra: 2\\sqrt{2} and \\sqrt{8} differ. `symbolic`
  accepts what `math` accepts and, failing that, parses both into SymPy with Hugging Face's
  Math-Verify and asks whether they are equal: 2\\sqrt{2} = \\sqrt{8}, (x+1)^2 = x^2+2x+1,
  intervals and sets, numbers to 6 decimals.
- Python tests (code): the response's last fenced code block (its whole text when it has
  none) runs in a fresh interpreter in an empty temporary directory with a wall-clock limit
  and limits on memory, file size and CPU time. With asserts (HumanEval, MBPP) it runs once,
  followed by them. With (input, output) cases (LiveCodeBench's stdin tests) it runs once per
  case, the input as its stdin, and must print the expected lines (compared as LiveCodeBench
  compares them). With CallCases (LiveCodeBench's functional tests) it runs once, and a
  harness calls its function with each case's arguments; the return values are compared here.
  Stdin and call programs start with LiveCodeBench's standard imports (CONTEST_PRELUDE). An
  assert or call run passes only when it exits with status 0 and a random mark, printed after
  its last check, comes out: code that exits early with status 0 does not pass. This is
  isolation from accidents, not a security sandbox: the code runs as this user on this
  machine, so it runs only with `allow_code_execution: true`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from gopd.config import ANSWER_MATCHES, SYMBOLIC_NEEDS

log = logging.getLogger(__name__)

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_LANGUAGES = ("", "python", "python3", "py")


# -- answers -------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} or \\fbox{...} (nested braces balanced), or of
    "\\boxed 5"; None when there is none or its braces never close."""
    start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start + len(command) :]
    body = rest.lstrip()
    if not body.startswith("{"):  # "\boxed 5": up to the next space or '$'
        return (re.split(r"[\s$]", body, maxsplit=1)[0] or None) if rest[:1].isspace() else None
    depth = 0
    for i, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return body[1:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """A response's final answer: the last \\boxed{...}, else what follows the last '####',
    else the last number; None when there is none, or when the last box never closes (a
    response cut at the length cap has no final answer)."""
    if any(c in text for c in _BOX_COMMANDS):
        return last_boxed(text)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip() or None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\displaystyle", "\\$", "$", "\\%", "%",
         "^\\circ", "^{\\circ}", "\\circ", "°")  # fmt: skip
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")  # \frac12
_SQRT_SHORT = re.compile(r"\\sqrt(\d+)")  # \sqrt2
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_LHS = re.compile(r"^[a-zA-Z]\w*=(?!=)")  # "x=5", "k_1=3"
_FRAC = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")


def normalize_math(answer: str) -> str:
    """The answer with presentation removed: spacing commands and spaces, \\left / \\right,
    dollars, percent and degree signs, \\text{...} kept as its text, \\dfrac / \\tfrac as
    \\frac, \\frac12 as \\frac{1}{2}, a thousands separator, a trailing period, a leading
    "x =" (one name on the left)."""
    s = answer.strip().rstrip(".").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _TEXT.sub(r"\1", s)
    for token in _DROP:
        s = s.replace(token, "")
    s = re.sub(r"\s+", "", s)
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = _LHS.sub("", s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s.rstrip(".")


def as_number(answer: str) -> Fraction | None:
    """A normalised answer's exact value when it is an integer, a decimal, a/b or
    \\frac{a}{b} (signs allowed); None otherwise."""
    frac = _FRAC.match(answer)
    if frac:
        sign, num, den = frac.groups()
        return None if int(den) == 0 else Fraction(int(num), int(den)) * (-1 if sign else 1)
    if _NUMBER.fullmatch(answer) is None:
        return None
    if "/" in answer:
        num, den = answer.split("/")
        return None if int(den) == 0 else Fraction(num) / int(den)
    return Fraction(answer)


# Math-Verify bounds each parse and comparison with SIGALRM, which only the main thread may set.
SYMBOLIC_TIMEOUT = 5  # seconds


def _symbolic_timeout() -> int | None:
    if threading.current_thread() is threading.main_thread():
        return SYMBOLIC_TIMEOUT
    if not getattr(_symbolic_timeout, "said", False):
        _symbolic_timeout.said = True
        log.warning("answer_match 'symbolic' off the main thread: Math-Verify runs without its "
                    "%d s time limits there (they need SIGALRM)", SYMBOLIC_TIMEOUT)  # fmt: skip
    return None


@functools.lru_cache(maxsize=4096)  # a reference is parsed once, not once per sample
def _parse_symbolic(answer: str, timeout: int | None) -> tuple:
    try:
        from math_verify import parse
    except ImportError as exc:
        raise ValueError(f"answer_match 'symbolic' {SYMBOLIC_NEEDS}") from exc
    return tuple(parse(f"${answer}$", parsing_timeout=timeout))


def symbolically_equal(got: str, reference: str) -> bool:
    """Whether Math-Verify reads the two answers (LaTeX or plain) as the same SymPy object:
    equal after simplification, the same interval, set, equation or matrix, or numbers equal
    to 6 decimals. False when either does not parse or a step takes over SYMBOLIC_TIMEOUT."""
    timeout = _symbolic_timeout()
    gold, pred = _parse_symbolic(reference, timeout), _parse_symbolic(got, timeout)
    if not (gold and pred):
        return False
    from math_verify import verify  # importable: _parse_symbolic got this far

    return verify(list(gold), list(pred), timeout_seconds=timeout)


def answers_match(got: str, reference: str, match: str = "math") -> bool:
    """Whether an extracted answer is the reference: the same string (exact); the same
    normalised string or exact number (math); that, or equal in SymPy (symbolic)."""
    if match not in ANSWER_MATCHES:
        raise ValueError(f"match must be one of {ANSWER_MATCHES}, got {match!r}")
    if match == "exact":
        return got.strip() == reference.strip()
    a, b = normalize_math(got), normalize_math(reference)
    x, y = as_number(a), as_number(b)
    if a == b or (x is not None and x == y):
        return True
    return match == "symbolic" and symbolically_equal(got, reference)


def is_correct(response: str, answer: str, match: str = "math") -> bool:
    got = extract_answer(response)
    return got is not None and answers_match(got, answer, match)


# -- code ----------------------------------------------------------------------------------


def extract_code(text: str) -> str:
    """The last fenced code block in Python (or of no stated language), to the end of the
    text when its closing fence never came (a response cut at the length cap); the whole
    text when there is none."""
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in _CODE_LANGUAGES]
    return blocks[-1] if blocks else text


# Runs first in the child: its own limits, inherited by whatever it starts. RLIMIT_AS bounds
# memory (address space); RLIMIT_CPU backs up the wall-clock kill; no core files. A limit the
# system does not let a process set (macOS refuses some) is left as it is.
_PROLOGUE = """\
import resource as _r
for _k, _v in (("RLIMIT_AS", {memory}), ("RLIMIT_FSIZE", {file_size}), ("RLIMIT_CPU", {cpu}),
               ("RLIMIT_CORE", 0)):
    try:
        _r.setrlimit(getattr(_r, _k), (_v, _v))
    except (AttributeError, ValueError, OSError):
        pass
del _r, _k, _v
"""


def _run(program: Path, stdin: str, timeout: float) -> tuple[int | None, str]:
    """Run `program` with this Python in isolated mode (-I: no user site, no PYTHON*
    variables), in an empty working directory of its own, `stdin` as its input: (its exit
    status, None past `timeout`; what it printed). Its whole process group is killed at the end."""
    root = program.parent
    work = root / "work"
    work.mkdir(exist_ok=True)
    (root / "stdin.txt").write_text(stdin)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "OMP_NUM_THREADS": "1"}
    with open(root / "stdin.txt") as given, open(root / "stdout.txt", "w") as printed:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", str(program)], cwd=work, env=env, stdin=given, stdout=printed,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        # A timer kills it at the limit while wait() blocks: wait(timeout=) polls with sleeps
        # growing to 50 ms, which would add up to 30 ms to a 35 ms run.
        expired = threading.Event()
        timer = threading.Timer(timeout, lambda: (expired.set(), _kill_group(proc.pid)))
        timer.start()
        try:
            status = proc.wait()
        finally:
            timer.cancel()
            _kill_group(proc.pid)  # what it started, too (it leads its own session)
    return (None if expired.is_set() else status), (root / "stdout.txt").read_text(errors="replace")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _program(root: str, source: str, cpu_seconds: float, memory_bytes: int, file_bytes: int) -> Path:
    program = Path(root) / "program.py"
    limits = _PROLOGUE.format(memory=memory_bytes, file_size=file_bytes, cpu=int(cpu_seconds) + 1)
    program.write_text(f"{limits}\n{source}\n")
    return program


def _nonce() -> str:
    """A mark the harness prints only after the last check: the code cannot know it, so a
    response that exits early with status 0 (sys.exit(0), os._exit(0)) does not pass."""
    return f"gopd-{secrets.token_hex(16)}:"


def _print_raw(expression: str) -> str:
    # straight to file descriptor 1, past whatever the code did to sys.stdout or print
    return f'__import__("os").write(1, ({expression} + "\\n").encode())'


def run_python_tests(
    code: str, tests: str, timeout: float = 10.0, memory_bytes: int = 4 << 30, file_bytes: int = 16 << 20
) -> bool:
    """Whether `code` followed by `tests` (asserts) runs to their end and exits with status 0
    within `timeout` seconds, run as _run runs it, with no input."""
    nonce = _nonce()
    with tempfile.TemporaryDirectory(prefix="gopd-code-") as tmp:
        source = f"{code}\n\n{tests}\n\n{_print_raw(repr(nonce))}"
        status, printed = _run(_program(tmp, source, timeout, memory_bytes, file_bytes), "", timeout)
        return status == 0 and nonce in printed


# What LiveCodeBench's grader gives stdin and call-based programs before their code: the
# standard modules a contest solution uses unimported (List, Counter, heapq, gcd, ...), star
# imports first, builtins back on top (math's pow is not the builtin), then the modules
# themselves, and deep recursion allowed.
_CONTEST_MODULES = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math",
                    "random", "statistics", "itertools", "functools", "operator", "io", "sys", "json",
                    "typing")  # fmt: skip
CONTEST_PRELUDE = "\n".join(
    [f"from {m} import *" for m in _CONTEST_MODULES] + ["from builtins import *"]
    + [f"import {m}" for m in _CONTEST_MODULES] + ["sys.setrecursionlimit(50000)"]
)  # fmt: skip


def _lines(text: str) -> list[str]:
    """Output as LiveCodeBench compares it: leading and trailing blank lines and each line's
    outer spaces aside."""
    return [line.strip() for line in text.strip().split("\n")]


def _same_line(got: str, expected: str) -> bool:
    """Equal, or the same numbers token by token (1.0 = 1, 2.50 = 2.5; as decimals, exact)."""
    if got == expected:
        return True
    try:
        return [Decimal(t) for t in got.split()] == [Decimal(t) for t in expected.split()]
    except InvalidOperation:
        return False


def same_output(printed: str, expected: str) -> bool:
    """Whether a stdin program printed the expected output: as many lines, each equal (outer
    spaces aside) or equal as numbers, token by token."""
    got, want = _lines(printed), _lines(expected)
    return len(got) == len(want) and all(_same_line(g, w) for g, w in zip(got, want, strict=True))


def run_io_tests(
    code: str, cases: list[tuple[str, str]], timeout: float = 10.0, memory_bytes: int = 4 << 30,
    file_bytes: int = 16 << 20,
) -> bool:  # fmt: skip
    """Whether `code` (after CONTEST_PRELUDE), run as _run runs it once per (input, expected
    output) case, exits with status 0 and prints the expected output (same_output) for every
    case, each within `timeout` seconds; stops at the first failure."""
    with tempfile.TemporaryDirectory(prefix="gopd-code-") as tmp:
        program = _program(tmp, f"{CONTEST_PRELUDE}\n{code}", timeout, memory_bytes, file_bytes)
        for given, expected in cases:
            status, printed = _run(program, given, timeout)
            if status != 0 or not same_output(printed, expected):
                return False
    return True


@dataclass(frozen=True)
class CallCases:
    """Call-based tests (LiveCodeBench's "functional" ones, LeetCode's style): the function
    `fn_name` (a method of `Solution` when the code defines that class) is called with each
    case's arguments and must return its expected value. Each case is (arguments, expected),
    as LiveCodeBench writes them: one JSON value per argument, a line each; the expected
    return value as JSON."""

    fn_name: str
    cases: tuple[tuple[str, str], ...]

    def __post_init__(self):
        if not self.fn_name.isidentifier():
            raise ValueError(f"fn_name must be a Python name, got {self.fn_name!r}")
        if not self.cases:
            raise ValueError("cases: none given")
        parsed = []
        for i, (args, expected) in enumerate(self.cases):
            try:
                parsed.append(([json.loads(line) for line in args.split("\n")], json.loads(expected)))
            except (json.JSONDecodeError, AttributeError, TypeError) as exc:
                raise ValueError(f"case {i}: arguments (JSON lines) and expected value (JSON) must "
                                 f"parse as JSON: {exc}") from exc  # fmt: skip
        # parsed once here, not again for each response checked against them (not a field:
        # equality and hashing stay those of the JSON text)
        object.__setattr__(self, "_parsed", tuple(parsed))

    def arguments(self) -> list[list]:
        return [args for args, _ in self._parsed]

    def expected(self) -> list:
        return [expected for _, expected in self._parsed]


# A record's tests: asserts (Python source), stdin cases (input, expected output), or calls.
Tests = str | list[tuple[str, str]] | CallCases


# Appended to the code: reads the cases' arguments (a JSON list per line) from stdin and
# prints each return value as JSON after the nonce; a case past its time is a TimeoutError,
# which ends the run. A tuple counts as the list it holds (JSON makes it one).
_CALL_HARNESS = """
def __gopd_call_cases(name, limit, nonce):
    import json, os, signal, sys

    def expire(*_):
        raise TimeoutError(f"a case ran past {{limit}} s")

    signal.signal(signal.SIGALRM, expire)
    scope = globals()
    owner = scope["Solution"]() if isinstance(scope.get("Solution"), type) else None
    function = getattr(owner, name) if owner is not None else scope[name]
    for line in sys.stdin.read().splitlines():
        signal.alarm(limit)
        got = function(*json.loads(line))
        signal.alarm(0)
        # a numpy scalar as its number (it equals one there too); anything else JSON cannot
        # write, as its repr, which equals no expected value (nor does it in LiveCodeBench)
        plain = json.dumps(got, default=lambda o: o.item() if getattr(o, "shape", None) == () else repr(o))
        os.write(1, (nonce + plain + "\\n").encode())


__gopd_call_cases({name!r}, {limit}, {nonce!r})
"""


def run_call_tests(
    code: str, tests: CallCases, timeout: float = 10.0, memory_bytes: int = 4 << 30,
    file_bytes: int = 16 << 20,
) -> bool:  # fmt: skip
    """Whether `code` (after CONTEST_PRELUDE), run once as _run runs it, returns the expected
    value for every case of `tests` (compared in this process, after the child has gone), each
    call within `timeout` seconds, and exits with status 0."""
    nonce = _nonce()
    harness = _CALL_HARNESS.format(name=tests.fn_name, limit=max(1, round(timeout)), nonce=nonce)
    stdin = "".join(json.dumps(args) + "\n" for args in tests.arguments())
    whole = timeout * (len(tests.cases) + 1)  # the per-case alarms stop Python; this stops the rest
    with tempfile.TemporaryDirectory(prefix="gopd-code-") as tmp:
        program = _program(tmp, f"{CONTEST_PRELUDE}\n{code}\n{harness}", whole, memory_bytes, file_bytes)
        status, printed = _run(program, stdin, whole)
    returned = [line.split(nonce, 1)[1] for line in printed.splitlines() if nonce in line]
    if status != 0 or len(returned) != len(tests.cases):
        return False
    return all(json.loads(got) == want for got, want in zip(returned, tests.expected(), strict=True))


# -- both ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verifier:
    """Checks responses against their examples: by the reference answer, or by running the
    tests when the example has tests (several test runs at once, `code_workers`)."""

    answer_match: str = "math"
    allow_code_execution: bool = False
    code_timeout: float = 10.0
    code_workers: int = 4

    @classmethod
    def from_config(cls, cfg) -> Verifier:
        return cls(cfg.answer_match, cfg.allow_code_execution, cfg.code_timeout, cfg.code_workers)

    def run_tests(self, code: str, tests: Tests) -> bool:
        """Asserts (a string) run after the code; (input, output) cases feed it stdin; CallCases
        call its function."""
        if isinstance(tests, str):
            return run_python_tests(code, tests, self.code_timeout)
        if isinstance(tests, CallCases):
            return run_call_tests(code, tests, self.code_timeout)
        return run_io_tests(code, tests, self.code_timeout)

    def check(self, texts: Sequence[str], examples: Sequence) -> list[bool]:
        """Whether each response (texts[i], of examples[i]) is right."""
        right = [False] * len(texts)
        runs = []
        for i, (text, ex) in enumerate(zip(texts, examples, strict=True)):
            if ex.tests is not None:
                runs.append(i)
            else:
                right[i] = is_correct(text, ex.answer, self.answer_match)
        if runs and not self.allow_code_execution:
            raise ValueError(
                "allow_code_execution: examples with tests need it true (the responses run as Python)"
            )
        with ThreadPoolExecutor(max_workers=self.code_workers) as pool:  # each run is its own process
            passed = pool.map(lambda i: self.run_tests(extract_code(texts[i]), examples[i].tests), runs)
            for i, ok in zip(runs, passed, strict=True):
                right[i] = ok
        return right
