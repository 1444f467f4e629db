"""Models (tokenizer checks, hidden states with left padding) and rollouts (masks, engine log-probs)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch

from gopd.data import load_examples
from gopd.models import check_same_tokenizer, final_hidden, head_weight, load_model, load_tokenizer
from gopd.rollout import HFRolloutEngine, left_pad, response_mask, stop_ids
from gopd.scoring import response_hidden
from gopd_kernels import token_logprobs
from tests.trainer.conftest import base_config, give_heads_a_bias, make_model_dir, transformed_model_dir


def test_tokenizer_mismatch_is_refused(tiny, tmp_path):
    student = load_tokenizer(str(tiny["student"]))
    check_same_tokenizer(student, load_tokenizer(str(tiny["teacher"])), "s", "t")  # same: fine
    other = load_tokenizer(str(make_model_dir(tmp_path / "other", seed=0, alphabet="9876543210+=")))
    with pytest.raises(ValueError, match="tokens map to different ids"):
        check_same_tokenizer(student, other, "s", "other")
    eos = load_tokenizer(str(tiny["teacher"]))
    eos.eos_token = "<unk>"
    with pytest.raises(ValueError, match="eos_token_id"):
        check_same_tokenizer(student, eos, "s", "t")


def test_training_refuses_a_teacher_with_another_tokenizer(tiny, tmp_path):
    from gopd.models import load_models

    other = make_model_dir(tmp_path / "other", seed=0, alphabet="9876543210+=")
    with pytest.raises(ValueError, match="does not match the student's"):
        load_models(base_config(tiny, tmp_path, teachers=str(other)))


def test_a_cap_the_forward_does_not_apply_is_refused(tiny, tmp_path):
    """A Qwen3 whose config names a soft-cap its forward ignores (its logits, below 1, bent 8 %)."""
    model = load_model(str(tiny["student"]), torch.float32, torch.device("cpu"), trainable=False)
    model.config.final_logit_softcapping = 0.5
    model.save_pretrained(tmp_path / "capped")
    with pytest.raises(
        ValueError, match=r"capped: .* soft-capped at 0\.5 \(off by .*final_logit_softcapping"
    ):
        load_model(str(tmp_path / "capped"), torch.float32, torch.device("cpu"), trainable=False)


@pytest.mark.parametrize(
    "family, value, transform, said",
    [("granite", 4.0, (0.25, None), "0.25 x its LM head's output; scored so"),
     ("gemma2", 8.0, (1.0, 8.0), "1 x its LM head's output, soft-capped at 8; scored so")],
)  # fmt: skip
def test_load_model_takes_transformed_logits_and_says_so(tmp_path, caplog, family, value, transform, said):
    """Granite divides its logits by logits_scaling, Gemma 2 soft-caps them: found and logged
    (gopd_kernels.hf's tests: the forward decides; the stages' tests: scored and trained so)."""
    from gopd.models import logits_of

    path = transformed_model_dir(tmp_path / family, family, 0, value)
    with caplog.at_level(logging.INFO, logger="gopd"):
        model = load_model(path, torch.float32, torch.device("cpu"), trainable=False)
    assert logits_of(model) == transform
    assert f"{family}: its logits are {said}" in caplog.text


def test_a_plain_bf16_model_passes_the_logits_check(tiny):
    """Its forward's bf16 logits and the head's agree within the check's tolerance (no error)."""
    model = load_model(str(tiny["student"]), torch.bfloat16, torch.device("cpu"), trainable=False)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("objective", ["sampled", "dense"])
def test_heads_with_a_bias_load_for_both_objectives(tiny, tmp_path, monkeypatch, objective):
    """gopd_loss, gopd_dense_loss and the scoring ops all take a head bias (Phi-style heads):
    nothing is refused, and the biases stay on the loaded models."""
    import gopd.models

    give_heads_a_bias(monkeypatch, student=True, frozen=True)
    cfg = base_config(
        tiny, tmp_path, objective=objective, is_cap=None, lam=1.25, reference=str(tiny["reference"])
    )
    models = gopd.models.load_models(cfg)
    for model in (models.student, models.teachers["default"], models.reference):
        assert gopd.models.head_bias(model) is not None


def test_left_padding_does_not_change_hidden_states(tiny):
    model = load_model(str(tiny["student"]), torch.float32, torch.device("cpu"), trainable=False)
    seqs = [[3, 5, 6, 14, 7], [3, 9, 15]]
    ids, mask = left_pad(seqs, pad_id=0)
    padded = final_hidden(model, ids, mask)
    for row, seq in enumerate(seqs):
        alone = final_hidden(model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
        torch.testing.assert_close(padded[row, -len(seq) :], alone[0], atol=1e-5, rtol=1e-5)


def test_response_mask_stops_after_first_eos():
    responses = torch.tensor([[5, 1, 0, 0], [5, 6, 7, 8], [1, 5, 1, 0]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(response_mask(responses, 1), expected)
    either = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)  # 6 or 1 ends it
    assert torch.equal(response_mask(responses, [6, 1]), either)


def second_eos_student(tiny):
    """The student with a checkpoint's second EOS (as Qwen3's <|endoftext|> beside <|im_end|>):
    a digit, which many responses hold. (model, tokenizer, that id)"""
    tok = load_tokenizer(str(tiny["student"]))
    second = tok.convert_tokens_to_ids("1")
    model = load_model(str(tiny["student"]), torch.float32, torch.device("cpu"), trainable=True)
    model.generation_config.eos_token_id = [tok.eos_token_id, second]
    return model, tok, second


def test_responses_end_at_any_eos_the_checkpoint_lists(tiny, tmp_path):
    """Sampling stops at the checkpoint's second EOS, and the response ends with it."""
    model, tok, second = second_eos_student(tiny)
    cfg = base_config(tiny, tmp_path, max_new_tokens=8)
    assert stop_ids(model.generation_config, tok) == [tok.eos_token_id, second]
    torch.manual_seed(0)
    hf = HFRolloutEngine(model, tok, cfg).generate(load_examples(cfg.train_data, cfg, tok, 64)[:8], 2, 1.0)
    ended = 0
    for row, valid in zip(hf.responses, hf.response_mask, strict=True):
        n = int(valid.sum())
        stops = [i for i, t in enumerate(row.tolist()) if t in (tok.eos_token_id, second)]
        assert n == (stops[0] + 1 if stops else len(row))  # up to and including the first stop
        assert (row[n:] == tok.pad_token_id).all()  # and nothing sampled after it
        ended += bool(stops) and row[stops[0]] == second
    assert ended > 0  # the second EOS did end some responses


@pytest.mark.parametrize("temperature,generate_batch_size", [(1.0, None), (0.7, None), (1.0, 4)])
def test_engine_logprobs_match_the_students_at_the_sampling_temperature(tiny, tmp_path, temperature,
                                                                        generate_batch_size):  # fmt: skip
    """r_t recorded during generate equals s_t recomputed from hidden states at tau; with
    generate_batch_size 4, on the 15 rows of 4 generate calls put side by side."""
    cfg = base_config(tiny, tmp_path, temperature=temperature, generate_batch_size=generate_batch_size)
    tok = load_tokenizer(str(tiny["student"]))
    model = load_model(str(tiny["student"]), torch.float32, torch.device("cpu"), trainable=True)
    examples = load_examples(cfg.train_data, cfg, tok, 64)[:5]
    torch.manual_seed(0)
    ro = HFRolloutEngine(model, tok, cfg).generate(examples, samples=3, temperature=temperature)
    assert ro.sequences.shape[0] == 15 and ro.responses.shape[1] <= cfg.max_new_tokens
    assert [e.prompt for e in ro.examples] == [e.prompt for e in examples for _ in range(3)]
    with torch.no_grad():
        s = token_logprobs(
            response_hidden(model, ro), head_weight(model), ro.targets, temperature=temperature
        )
    torch.testing.assert_close(ro.rollout_logp, s * ro.response_mask, atol=1e-5, rtol=1e-5)
    assert (ro.rollout_logp[~ro.response_mask] == 0).all()
    assert model.training  # generate() left the student in train mode


def test_temperature_zero_is_greedy(tiny, tmp_path):
    """Evaluation's greedy decoding: the argmax path, the same every time."""
    cfg = base_config(tiny, tmp_path)
    tok = load_tokenizer(str(tiny["student"]))
    model = load_model(str(tiny["student"]), torch.float32, torch.device("cpu"), trainable=False)
    examples = load_examples(cfg.train_data, cfg, tok, 64)[:4]
    engine = HFRolloutEngine(model, tok, cfg)
    first = engine.generate(examples, samples=2, temperature=0.0, top_p=0.5)
    assert torch.equal(first.sequences, engine.generate(examples, samples=2, temperature=0.0).sequences)
    ids, mask = left_pad([ex.prompt_ids for ex in examples for _ in range(2)], tok.pad_token_id)
    plain = dict(do_sample=False, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                 eos_token_id=tok.eos_token_id)  # fmt: skip
    argmax = model.generate(input_ids=ids, attention_mask=mask, **plain)
    assert torch.equal(first.sequences[:, : argmax.shape[1]], argmax)
    # generate_batch_size: 3 calls of 3, 3 and 2 rows, put side by side, are the one call's rows
    chunked = HFRolloutEngine(model, tok, replace(cfg, generate_batch_size=3))
    calls = []
    real = chunked._generate
    chunked._generate = lambda rows, *a: calls.append(len(rows)) or real(rows, *a)
    parts = chunked.generate(examples, samples=2, temperature=0.0)
    assert calls == [3, 3, 2] and parts.prompt_len == first.prompt_len
    for name in ("sequences", "attention_mask", "response_mask"):
        assert torch.equal(getattr(parts, name), getattr(first, name)), name
    torch.testing.assert_close(parts.rollout_logp, first.rollout_logp, atol=1e-5, rtol=1e-5)


def test_the_checkpoints_generation_config_does_not_reach_the_rollouts(tiny, tmp_path):
    """generate() fills what the engine leaves unset from model.generation_config. A
    checkpoint's repetition penalty would change the distribution before the recorder, min_p
    would truncate it after, num_beams would beam-search: none of them may act."""
    cfg = base_config(tiny, tmp_path, max_new_tokens=8)
    tok = load_tokenizer(str(tiny["student"]))
    model = load_model(str(tiny["student"]), torch.float32, torch.device("cpu"), trainable=True)
    checkpoint_defaults = model.generation_config
    for name, value in dict(repetition_penalty=3.0, min_p=0.5, num_beams=2, no_repeat_ngram_size=1).items():
        setattr(checkpoint_defaults, name, value)
    examples = load_examples(cfg.train_data, cfg, tok, 64)[:8]
    torch.manual_seed(0)
    ro = HFRolloutEngine(model, tok, cfg).generate(examples, samples=4, temperature=1.0)
    with torch.no_grad():
        logits = response_hidden(model, ro) @ head_weight(model).T
    logp = torch.log_softmax(logits.double(), dim=-1)
    s = logp.gather(-1, ro.targets.clamp_min(0)[..., None]).squeeze(-1).float()
    torch.testing.assert_close(ro.rollout_logp, s * ro.response_mask, atol=1e-5, rtol=1e-5)
    below_min_p = (s - logp.max(-1).values.float())[ro.response_mask] < math.log(0.5)
    assert below_min_p.any()  # tokens min_p = 0.5 would have removed were sampled
    assert model.generation_config is checkpoint_defaults and checkpoint_defaults.repetition_penalty == 3.0
