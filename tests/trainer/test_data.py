"""Prompt loading (JSONL, Parquet, chat template, domains, length checks) and the sampler."""

from __future__ import annotations

import json

import pytest

from gopd.data import DomainMixSampler, Example, PromptSampler, load_examples
from gopd.models import load_tokenizer
from gopd.verifiers import CallCases
from tests.trainer.conftest import base_config


def test_jsonl_and_parquet_give_the_same_examples(tiny, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in tiny["train"].read_text().splitlines()]
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    cfg = base_config(tiny, tmp_path)
    tok = load_tokenizer(str(tiny["student"]))
    a = load_examples(str(tiny["train"]), cfg, tok, 64)
    b = load_examples(str(parquet), cfg, tok, 64)
    assert [e.prompt_ids for e in a] == [e.prompt_ids for e in b] and len(a) == 40
    assert a[0].prompt_ids[0] == tok.bos_token_id and a[0].answer == records[0]["answer"]


def test_chat_template_is_applied_when_present(tiny, tmp_path):
    tok = load_tokenizer(str(tiny["student"]))
    tok.chat_template = (
        "{% for m in messages %}=={{ m['content'] }}{% endfor %}{% if add_generation_prompt %}+{% endif %}"
    )
    cfg = base_config(tiny, tmp_path)
    with_template = load_examples(str(tiny["train"]), cfg, tok, 64)[0]
    cfg.chat_template = False
    plain = load_examples(str(tiny["train"]), cfg, tok, 64)[0]
    assert tok.decode(with_template.prompt_ids) == "==" + plain.prompt + "+"
    assert with_template.prompt_ids != plain.prompt_ids


def test_chat_template_kwargs_reach_the_template(tiny, tmp_path):
    """Qwen3's template appends an empty think block when enable_thinking is false."""
    tok = load_tokenizer(str(tiny["student"]))
    tok.chat_template = (
        "{% for m in messages %}=={{ m['content'] }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}+{% endif %}"
    )
    cfg = base_config(tiny, tmp_path, chat_template_kwargs={"enable_thinking": False})
    non_thinking = load_examples(str(tiny["train"]), cfg, tok, 64)[0]
    assert tok.decode(non_thinking.prompt_ids) == "==" + non_thinking.prompt + "+"
    cfg.chat_template_kwargs = {}
    assert (
        tok.decode(load_examples(str(tiny["train"]), cfg, tok, 64)[0].prompt_ids)
        == "==" + non_thinking.prompt
    )
    with pytest.raises(ValueError, match="chat_template_kwargs: applies only with chat_template: true"):
        base_config(tiny, tmp_path, chat_template=False, chat_template_kwargs={"enable_thinking": False})
    with pytest.raises(ValueError, match="chat_template_kwargs: must be a mapping"):
        base_config(tiny, tmp_path, chat_template_kwargs=["enable_thinking"])


def test_domains_pick_teachers_and_unknown_domain_is_an_error(tiny, tmp_path):
    teachers = {"math": str(tiny["teacher"]), "code": str(tiny["teacher_b"])}
    cfg = base_config(tiny, tmp_path, teachers=teachers, train_data=str(tiny["train_domains"]))
    tok = load_tokenizer(str(tiny["student"]))
    examples = load_examples(cfg.train_data, cfg, tok, 64)
    assert {e.domain for e in examples} == {"math", "code"}
    cfg.teachers = {"math": str(tiny["teacher"]), "physics": str(tiny["teacher_b"])}
    with pytest.raises(ValueError, match="domain 'code' has no teacher"):
        load_examples(cfg.train_data, cfg, tok, 64)


def test_too_long_prompts_are_errors(tiny, tmp_path):
    tok = load_tokenizer(str(tiny["student"]))
    cfg = base_config(tiny, tmp_path, max_prompt_tokens=4)
    with pytest.raises(ValueError, match="record 0: prompt has 7 tokens > max_prompt_tokens=4"):
        load_examples(cfg.train_data, cfg, tok, 64)
    cfg = base_config(tiny, tmp_path, max_new_tokens=60)
    with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens"):
        load_examples(cfg.train_data, cfg, tok, 64)


def test_eval_data_needs_answers(tiny, tmp_path):
    path = tmp_path / "no_answers.jsonl"
    path.write_text(json.dumps({"prompt": "12+34="}) + "\n")
    cfg = base_config(tiny, tmp_path)
    with pytest.raises(ValueError, match="no field 'answer'"):
        load_examples(str(path), cfg, load_tokenizer(str(tiny["student"])), 64, for_eval=True)


def test_eval_records_with_tests_need_code_execution_allowed(tiny, tmp_path):
    """Code prompts carry tests instead of an answer; they are refused before anything is sampled
    unless allow_code_execution is set. An eval record's domain labels its figures, teacher or not."""
    path = tmp_path / "code.jsonl"
    stdin_case = {"input": "3 4\n", "output": "7\n", "testtype": "stdin"}  # LiveCodeBench's stdin kind
    records = [{"prompt": "12+34=", "tests": ["assert f(1) == 2", "assert f(2) == 3"], "domain": "code"},
               {"prompt": "1+2=", "answer": "3", "domain": "math"},
               {"prompt": "3+4=", "tests": [stdin_case]}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = load_tokenizer(str(tiny["student"]))
    with pytest.raises(ValueError, match="record 0: has tests .* set allow_code_execution: true"):
        load_examples(str(path), base_config(tiny, tmp_path), tok, 64, for_eval=True)
    allowed = base_config(tiny, tmp_path, allow_code_execution=True, eval_data=str(path))
    code, math, stdin = load_examples(str(path), allowed, tok, 64, for_eval=True)
    assert code.tests == "assert f(1) == 2\nassert f(2) == 3" and code.answer is None
    assert code.domain == "code" and stdin.domain == "default"
    assert math.tests is None and math.answer == "3" and math.domain == "math"
    assert stdin.tests == [("3 4\n", "7\n")]
    functional = {"input": "[1]", "output": "1", "testtype": "functional"}  # no function name: refused
    for tests in (3, [functional]):
        path.write_text(json.dumps({"prompt": "1+2=", "tests": tests}) + "\n")
        with pytest.raises(ValueError, match="'tests' \\(tests_field\\) must be a string of asserts, a list"):
            load_examples(str(path), allowed, tok, 64, for_eval=True)


def test_input_output_tests_are_stdin_cases_or_calls(tiny, tmp_path):
    """APPS's and LiveCodeBench's {"inputs", "outputs", "fn_name"}: stdin cases without a function
    name, CallCases with one; a malformed one is an error naming its record before anything runs."""
    path = tmp_path / "code.jsonl"
    calls = {"inputs": ["[1, 2]\n3", "[]\n0"], "outputs": ["[0, 1]", "[]"], "fn_name": "twoSum"}
    stdin = {"inputs": ["1 2\n"], "outputs": ["3\n"]}
    path.write_text("".join(json.dumps({"prompt": "p", "tests": t}) + "\n" for t in (calls, stdin)))
    tok = load_tokenizer(str(tiny["student"]))
    allowed = base_config(tiny, tmp_path, allow_code_execution=True, eval_data=str(path))
    call, io = load_examples(str(path), allowed, tok, 64, for_eval=True)
    assert call.tests == CallCases("twoSum", (("[1, 2]\n3", "[0, 1]"), ("[]\n0", "[]")))
    assert call.tests.arguments() == [[[1, 2], 3], [[], 0]] and call.tests.expected() == [[0, 1], []]
    assert io.tests == [("1 2\n", "3\n")]
    for bad, match in [
        ({**calls, "outputs": ["[0, 1]"]}, "2 inputs but 1 outputs"),
        ({**calls, "inputs": [[1, 2], 3]}, "'inputs' and 'outputs' must be lists of strings"),
        ({**calls, "fn_name": "two sum"}, "fn_name must be a Python name"),
        ({**calls, "outputs": ["[0, 1]", "nope"]}, "case 1: arguments .* must parse as JSON"),
        ({**calls, "fn": "f"}, r"unknown keys \['fn'\]"),
    ]:
        path.write_text(json.dumps({"prompt": "p", "tests": bad}) + "\n")
        with pytest.raises(ValueError, match=f"record 0: 'tests' \\(tests_field\\): {match}"):
            load_examples(str(path), allowed, tok, 64, for_eval=True)


def test_sampler_is_deterministic_and_resumable(tiny, tmp_path):
    cfg = base_config(tiny, tmp_path)
    examples = load_examples(cfg.train_data, cfg, load_tokenizer(str(tiny["student"])), 64)
    a = PromptSampler(examples, seed=3)
    first = [e.prompt for e in a.next_batch(30)]
    state = a.state_dict()
    rest = [e.prompt for e in a.next_batch(30)]  # crosses into epoch 1
    b = PromptSampler(examples, seed=3)
    b.load_state_dict(state)
    assert [e.prompt for e in b.next_batch(30)] == rest
    assert sorted(first + rest[:10]) == sorted(e.prompt for e in examples)  # epoch 0 covers every prompt once
    assert [e.prompt for e in PromptSampler(examples, seed=4).next_batch(30)] != first


def test_domain_weights_fix_each_batchs_mix_and_resume_exactly():
    examples = [Example([i], "math", None, f"m{i}") for i in range(10)]
    examples += [Example([i], "code", None, f"c{i}") for i in range(5)]
    sampler = DomainMixSampler(examples, seed=1, weights={"math": 1, "code": 3})
    assert sampler.counts(8) == {"math": 2, "code": 6} and sampler.counts(5) == {"math": 1, "code": 4}
    batches = [sampler.next_batch(8) for _ in range(5)]
    assert all(sum(ex.domain == "code" for ex in b) == 6 for b in batches)
    assert [ex.domain for ex in batches[0]] != sorted(ex.domain for ex in batches[0])  # mixed, not in blocks
    codes = [ex.prompt for b in batches for ex in b if ex.domain == "code"]
    assert sorted(codes[:5]) == [f"c{i}" for i in range(5)]  # each domain: its own shuffled passes
    maths = [ex.prompt for b in batches for ex in b if ex.domain == "math"]
    assert sorted(maths) == sorted(f"m{i}" for i in range(10))  # 5 x 2: one pass over the 10
    state = sampler.state_dict()
    later = [sampler.next_batch(8) for _ in range(3)]
    again = DomainMixSampler(examples, seed=1, weights={"math": 1, "code": 3})
    again.load_state_dict(state)
    assert [[ex.prompt for ex in b] for b in later] == [
        [ex.prompt for ex in again.next_batch(8)] for _ in range(3)
    ]
    with pytest.raises(ValueError, match="resume with the same domain_weights"):
        PromptSampler(examples, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="checkpoint's sampler drew from the domains"):
        DomainMixSampler(examples, 1, {"math": 1, "code": 0}).load_state_dict(state)
    with pytest.raises(ValueError, match="domain_weights: domain 'proofs' has no prompts"):
        DomainMixSampler(examples, 1, {"math": 1, "proofs": 1})


def test_prompt_template_puts_each_prompt_in_its_domains_text(tiny, tmp_path):
    """A plain replacement of {prompt}: the template's other braces (\\boxed{}) stay as written."""
    path = tmp_path / "eval.jsonl"
    records = [
        {"prompt": "1+2=", "answer": "3", "domain": "math"},
        {"prompt": "f?", "answer": "4", "domain": "code"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = load_tokenizer(str(tiny["student"]))
    box = "{prompt} Put the answer in \\boxed{}."
    cfg = base_config(tiny, tmp_path, prompt_template=box, max_prompt_tokens=64)
    math, code = load_examples(str(path), cfg, tok, 256, for_eval=True)
    assert (
        math.prompt == "1+2= Put the answer in \\boxed{}."
        and code.prompt == "f? Put the answer in \\boxed{}."
    )
    plain = load_examples(
        str(path), base_config(tiny, tmp_path, max_prompt_tokens=64), tok, 256, for_eval=True
    )[0]
    assert plain.prompt == "1+2=" and len(math.prompt_ids) > len(plain.prompt_ids)
    per_domain = base_config(tiny, tmp_path, prompt_template={"math": box, "code": "Code: {prompt}"},
                             max_prompt_tokens=64)  # fmt: skip
    math, code = load_examples(str(path), per_domain, tok, 256, for_eval=True)
    assert math.prompt.endswith("\\boxed{}.") and code.prompt == "Code: f?"
    only_math = base_config(tiny, tmp_path, prompt_template={"math": box}, max_prompt_tokens=64)
    with pytest.raises(
        ValueError, match=r"record 1: domain 'code' has no prompt_template \(it has \['math'\]\)"
    ):
        load_examples(str(path), only_math, tok, 256, for_eval=True)
