"""What evaluation's checks cost: final answers matched three ways, and code run against its
three kinds of tests, with one worker and with four.

    python -m benchmarks.verifiers            # writes benchmarks/results/<machine>/verifiers.json
    python -m benchmarks.verifiers --no-save

Answers: 512 responses to HMMT-style references, a quarter each written as the reference is,
right in another form (\\frac{9}{2}\\sqrt{3} for \\frac{9\\sqrt{3}}{2}), wrong numbers and
wrong expressions; each matcher's time per response and how many it counts right (exact <=
math <= symbolic). Code: 64 responses each for asserts (HumanEval's kind), stdin cases and
call cases (LiveCodeBench's two kinds, 4 cases a response); the time per response is mostly
a fresh interpreter per run (per case for stdin, one per response otherwise).
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import RESULTS_DIR, machine_description, machine_slug, markdown_table, measured_commit
from gopd import verifiers
from gopd.data import Example
from gopd.verifiers import CallCases, Verifier

# (reference, the same written another way, a wrong number, a wrong expression), each with its
# own n, so that no two responses are the same text (the symbolic matcher caches parses).
ANSWERS = [
    (
        "\\frac{{{n}\\sqrt{{3}}}}{{2}}",
        "\\frac{{{n}}}{{2}}\\sqrt{{3}}",
        "\\frac{{{n}}}{{2}}",
        "\\frac{{{n}\\sqrt{{2}}}}{{2}}",
    ),
    ("{n}\\sqrt{{2}}", "\\sqrt{{{n2}}}", "{n}.5", "{n}\\sqrt{{3}}"),
    ("(x+{n})^2", "x^2+{n2x}x+{nn}", "{nn}", "x^2+{nn}"),
    ("\\frac{{\\pi}}{{{n}}}", "\\pi/{n}", "{inv:.4f}", "\\frac{{2\\pi}}{{{n}}}"),
]
CASES = 4
ADD = "a, b = map(int, input().split())\nprint(a + b)"
ADD_CALL = "class Solution:\n    def add(self, a: int, b: int) -> int:\n        return a + b"


def answer_examples(n: int) -> tuple[list[str], list[Example]]:
    texts, examples = [], []
    for i in range(n):
        k = i // (len(ANSWERS) * 4) + 3
        # inv: 3/k, not pi/k, so the wrong number is wrong at any number of decimals
        values = dict(n=k, n2=2 * k * k, n2x=2 * k, nn=k * k, inv=3 / k)
        reference, *forms = (form.format(**values) for form in ANSWERS[i % len(ANSWERS)])
        got = [reference, *forms][(i // len(ANSWERS)) % 4]
        texts.append(f"So the answer is \\boxed{{{got}}}.")
        examples.append(Example([1], "math", reference, "p"))
    return texts, examples


def code_examples(kind: str, n: int) -> tuple[list[str], list[Example]]:
    pairs = [(i, i + 1) for i in range(CASES)]
    if kind == "asserts":
        code, tests = (
            "def add(a, b):\n    return a + b",
            "\n".join(f"assert add({a}, {b}) == {a + b}" for a, b in pairs),
        )
    elif kind == "stdin":
        code, tests = ADD, [(f"{a} {b}\n", f"{a + b}\n") for a, b in pairs]
    else:
        code, tests = ADD_CALL, CallCases("add", tuple((f"{a}\n{b}", str(a + b)) for a, b in pairs))
    return [f"```python\n{code}\n```"] * n, [Example([1], "code", None, "q", tests)] * n


def timed(verifier: Verifier, texts: list[str], examples: list[Example]) -> tuple[float, int]:
    start = time.perf_counter()
    right = verifier.check(texts, examples)
    return (time.perf_counter() - start) / len(texts) * 1e3, sum(right)


def measure(answers: int, programs: int) -> list[dict]:
    rows = []
    texts, examples = answer_examples(answers)
    for match in ("exact", "math", "symbolic"):
        timed(Verifier(match), texts[:1], examples[:1])  # imports aside
        verifiers._parse_symbolic.cache_clear()
        ms, right = timed(Verifier(match), texts, examples)
        rows.append({"check": f"answer_match {match}", "workers": 1, "ms_per_response": ms, "right": right,
                     "responses": len(texts)})  # fmt: skip
    for kind in ("asserts", "stdin", "calls"):
        texts, examples = code_examples(kind, programs)
        for workers in (1, 4):
            ms, right = timed(Verifier(allow_code_execution=True, code_workers=workers), texts, examples)
            rows.append({"check": f"code, {kind}", "workers": workers, "ms_per_response": ms, "right": right,
                         "responses": len(texts)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", type=int, default=512, help="math responses")
    p.add_argument("--programs", type=int, default=64, help="code responses per kind of tests")
    p.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    args = p.parse_args(argv)
    rows = measure(args.answers, args.programs)
    record = {"machine": machine_description(), "commit": measured_commit(), "cases_per_program": CASES,
              "rows": rows}  # fmt: skip
    cells = [[r["check"], r["workers"], f"{r['ms_per_response']:.1f}", f"{r['right']} / {r['responses']}"]
             for r in rows]  # fmt: skip
    print(markdown_table(["check", "workers", "ms / response", "counted right"], cells))
    if not args.no_save:
        folder = RESULTS_DIR / machine_slug(record["machine"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "verifiers.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
