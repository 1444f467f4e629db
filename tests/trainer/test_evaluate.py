"""avg@k / pass@k over a rollout engine's samples, overall and per domain."""

from __future__ import annotations

import json
import string
from dataclasses import replace

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gopd.data import Example
from gopd.evaluate import evaluate, evaluate_configured
from gopd.rollout import Rollouts
from gopd.verifiers import Verifier
from tests.trainer.conftest import base_config


class ScriptedEngine:
    """Returns fixed responses: prompt i's samples are responses[i]."""

    in_step = False
    max_rows = None

    def __init__(self, tokenizer, responses, cut: tuple[str, ...] = ()):
        """`cut`: responses that end without EOS, as one cut at max_new_tokens."""
        self.tokenizer, self.responses, self.cut = tokenizer, responses, cut
        self.eos_ids = [tokenizer.eos_token_id]

    def generate(self, examples, samples, temperature, top_p=None):
        self.sampling = (temperature, top_p)
        texts = [r for i in range(len(examples)) for r in self.responses[i][:samples]]
        ids = [
            self.tokenizer(t, add_special_tokens=False)["input_ids"]
            + ([] if t in self.cut else [self.tokenizer.eos_token_id])
            for t in texts
        ]
        width = max(map(len, ids))
        resp = torch.tensor([x + [self.tokenizer.pad_token_id] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], dtype=torch.bool)
        prompt = torch.zeros(len(texts), 1, dtype=torch.long)
        rows = [ex for ex in examples for _ in range(samples)]
        return Rollouts(torch.cat([prompt, resp], 1), torch.cat([torch.ones_like(prompt), mask.long()], 1), 1,
                        mask, torch.zeros(mask.shape), rows)  # fmt: skip


def test_avg_and_pass_at_k(tiny):
    from gopd.models import load_tokenizer

    tok = load_tokenizer(str(tiny["student"]))
    examples = [Example([3], "default", "12", "a"), Example([3], "default", "7", "b")]
    engine = ScriptedEngine(tok, [["12", "13", "12", "1"], ["8", "9", "6", "5"]])
    result = evaluate(engine, tok, examples, k=4, temperature=1.0)
    assert result["avg@4"] == pytest.approx((2 / 4 + 0) / 2) and result["pass@4"] == 0.5


def char_tokenizer(chars: str) -> PreTrainedTokenizerFast:
    """One token per character (newlines too), the first of `chars` with id 0."""
    vocab = {c: i for i, c in enumerate([*dict.fromkeys(chars), "<pad>", "<eos>"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def test_figures_per_domain_and_code_by_its_tests():
    """A merged student's figures: one domain's answers, another's code; the overall figures
    are over all prompts."""
    tok = char_tokenizer(string.printable)
    tests = "assert add(2, 3) == 5"
    examples = [
        Example([3], "math", "1/2", "a"),
        Example([3], "math", "7", "b"),
        Example([3], "code", None, "c", tests),
    ]
    good, bad = "def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b"
    responses = [["0.5", "\\boxed{\\frac{1}{2}}"], ["8", "9"], [f"```python\n{good}\n```", bad]]
    engine = ScriptedEngine(tok, responses)
    verifier = Verifier(allow_code_execution=True)
    result = evaluate(engine, tok, examples, k=2, temperature=1.0, verifier=verifier)
    assert result["avg@2/math"] == pytest.approx((1 + 0) / 2) and result["pass@2/math"] == 0.5
    assert result["avg@2/code"] == 0.5 and result["pass@2/code"] == 1.0
    assert result["avg@2"] == pytest.approx((1 + 0 + 0.5) / 3) and result["pass@2"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="allow_code_execution"):
        evaluate(engine, tok, examples, k=2, temperature=1.0)
    exact = evaluate(engine, tok, examples[:1], k=2, temperature=1.0, verifier=Verifier("exact"))
    assert exact["avg@2"] == 0 and "avg@2/math" not in exact  # one domain: no per-domain keys


def test_every_sample_is_written_with_what_it_was_judged_on(tiny, tmp_path):
    """gopd eval --samples-out / eval_log_samples: one record per sample, the figures' own."""
    tok = char_tokenizer(string.printable)
    examples = [
        Example([3], "math", "1/2", "half?"),
        Example([3], "code", None, "add?", "assert add(2, 3) == 5"),
    ]
    good, bad = "def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b"
    unclosed = "\\boxed{\\frac{1"  # cut at the cap: no EOS, no answer
    engine = ScriptedEngine(tok, [["\\boxed{0.5}", unclosed], [good, bad]], cut=(unclosed,))
    cfg = base_config(tiny, tmp_path, eval_data=str(tiny["eval"]), eval_samples=2, allow_code_execution=True)
    out = tmp_path / "samples" / "eval.jsonl"
    result = evaluate_configured(engine, tok, examples, cfg, samples_to=out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["sample"], r["right"]) for r in records] == [
        ("half?", 0, True),
        ("half?", 1, False),
        ("add?", 0, True),
        ("add?", 1, False),
    ]
    assert sum(r["right"] for r in records) / 4 == result["avg@2"]
    half, cut = records[0], records[1]
    assert half["reference"] == "1/2" and half["answer"] == "0.5" and not half["cut"] and half["tokens"] == 12
    assert cut["answer"] is None and cut["cut"] and cut["tokens"] == len(unclosed)
    assert records[2]["tests"] == "asserts" and "answer" not in records[2] and records[3]["domain"] == "code"


def test_evaluation_samples_at_its_own_settings(tiny, tmp_path):
    own = dict(eval_data=str(tiny["eval"]), eval_temperature=0.6, eval_top_p=0.95)
    assert base_config(tiny, tmp_path, temperature=1.0, top_p=1.0, **own).eval_sampling == (0.6, 0.95)
    assert base_config(tiny, tmp_path).eval_sampling == (1.0, 1.0)
    tok = char_tokenizer("0123456789")
    engine = ScriptedEngine(tok, [["1"]])
    evaluate(engine, tok, [Example([3], "default", "1", "a")], k=1, temperature=0.6, top_p=0.95)
    assert engine.sampling == (0.6, 0.95)


def test_padding_never_reaches_the_answer():
    """A tokenizer whose id 0 is an ordinary character (as Qwen's "!"): the shorter response
    of a batch must decode without its padding."""
    tok = char_tokenizer("7#1234 ")
    examples = [Example([3], "default", "12", "a")]
    engine = ScriptedEngine(tok, [["#### 12", "#### 1234"]])
    assert evaluate(engine, tok, examples, k=2, temperature=1.0)["avg@2"] == 0.5


class InStepEngine(ScriptedEngine):
    """As a sharded student's engine: every rank must call it as often (it counts the calls)."""

    in_step = True
    calls = 0

    def generate(self, examples, samples, temperature, top_p=None):
        self.calls += 1
        return super().generate(examples, samples, temperature, top_p)


def _evaluate_on_a_rank(ctx, tiny):
    from gopd.models import load_tokenizer

    tok = load_tokenizer(str(tiny["student"]))
    examples = [Example([3], "default", answer, "") for answer in ("12", "7", "12")]  # rank 0: 2, rank 1: 1
    engine = InStepEngine(tok, [["12", "12"]])  # every prompt's samples say 12
    out = [(evaluate(engine, tok, examples, k=2, temperature=1.0, batch_prompts=1, ctx=ctx), engine.calls)]
    # an engine sampling at most 2 rows at once (generate_batch_size): 1 prompt of k = 2 a call
    engine = InStepEngine(tok, [["12", "12"]])
    engine.max_rows = 2
    return out + [(evaluate(engine, tok, examples, k=2, temperature=1.0, ctx=ctx), engine.calls)]


def test_a_rank_out_of_prompts_keeps_sampling_in_step_with_the_others(tiny, tmp_path):
    from tests.trainer.test_distributed import run_ranks

    for result, calls in [run for rank in run_ranks(tmp_path, _evaluate_on_a_rank, tiny) for run in rank]:
        assert calls == 2  # rank 1's second call: one prompt more, unscored
        assert (
            result["prompts"] == 3
            and result["avg@2"] == pytest.approx(2 / 3)
            and result["pass@2"] == pytest.approx(2 / 3)
        )


def test_each_teacher_is_evaluated_as_its_checkpoint_would_be(tiny, tmp_path):
    """evaluate_teachers (the trainer's eval_teachers), greedy, with two teachers told apart by
    their answers' length: each teacher's figures are those of `gopd eval` on its folder to the
    last digit. Sampled, it leaves the random streams where they were."""
    from transformers import AutoModelForCausalLM

    from gopd.data import load_examples
    from gopd.evaluate import evaluate_checkpoint, evaluate_teachers
    from gopd.models import load_models, load_tokenizer

    # the tiny teacher answers "=" greedily at every step; this copy of it puts EOS where "=" is
    # (the head is tied to the embeddings: EOS never occurs in a prompt), so it stops at once
    quick = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    tok = load_tokenizer(str(tiny["teacher"]))
    with torch.no_grad():
        head = quick.get_output_embeddings().weight
        head[tok.eos_token_id] = 10 * head[tok.convert_tokens_to_ids("=")]
    quick.save_pretrained(tmp_path / "quick")
    tok.save_pretrained(tmp_path / "quick")
    teachers = {"math": str(tiny["teacher"]), "code": str(tmp_path / "quick")}
    cfg = base_config(tiny, tmp_path, teachers=teachers, train_data=str(tiny["train_domains"]),
                      eval_data=str(tiny["train_domains"]), max_new_tokens=6, eval_temperature=0.0,
                      eval_samples=1, eval_max_prompts=12)  # fmt: skip
    models = load_models(cfg)
    examples = load_examples(cfg.eval_data, cfg, tok, 64, for_eval=True)[: cfg.eval_max_prompts]
    got = evaluate_teachers(models, examples, cfg)
    assert list(got) == ["math", "code"]
    assert got["math"]["response_length"] == 6 and got["code"]["response_length"] == 1  # EOS counts
    for domain, path in teachers.items():
        assert got[domain] == evaluate_checkpoint(path, cfg), domain
    state = torch.get_rng_state()
    evaluate_teachers(models, examples[:4], replace(cfg, eval_temperature=None, eval_samples=2))
    assert torch.equal(torch.get_rng_state(), state)
