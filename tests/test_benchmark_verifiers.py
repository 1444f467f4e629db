"""benchmarks.verifiers: its answers are what it says they are, and every program passes."""

from __future__ import annotations

import pytest

from benchmarks import verifiers as bench
from gopd.config import _installed
from gopd.verifiers import answers_match, extract_answer


@pytest.mark.skipif(not _installed("math_verify"), reason="answer_match symbolic needs math-verify")
def test_each_matcher_counts_what_the_answers_are():
    """A quarter of the responses are the reference as written, a quarter the same value in
    another form (symbolic alone accepts them), half wrong; every program is right."""
    texts, examples = bench.answer_examples(64)
    assert len(set(texts)) == 64  # no response repeats (the parse cache would hide the cost)
    for i, (text, ex) in enumerate(zip(texts, examples, strict=True)):
        got, form = extract_answer(text), (i // len(bench.ANSWERS)) % 4
        assert answers_match(got, ex.answer, "symbolic") == (form < 2), (got, ex.answer)
        assert answers_match(got, ex.answer, "math") == (form == 0), (got, ex.answer)
    rows = {(r["check"], r["workers"]): r["right"] for r in bench.measure(16, 2)}
    assert rows[("answer_match exact", 1)] == rows[("answer_match math", 1)] == 4
    assert rows[("answer_match symbolic", 1)] == 8
    assert all(rows[(f"code, {kind}", w)] == 2 for kind in ("asserts", "stdin", "calls") for w in (1, 4))
