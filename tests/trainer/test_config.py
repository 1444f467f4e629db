"""Config: YAML + overrides, and clear errors for settings that cannot work."""

from __future__ import annotations

import argparse

import pytest
import yaml

import gopd.config as config_module
from gopd.cli import _parse_value
from gopd.config import TrainConfig, load_config
from tests.trainer.conftest import base_config


def test_yaml_and_overrides(tiny, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"student": str(tiny["student"]), "teachers": str(tiny["teacher"]),
                                    "train_data": str(tiny["train"]), "lam": 1.5}))  # fmt: skip
    cfg = load_config(str(path), {"lam": 2.0, "clip_ratio": [0.2, 0.28]})
    assert cfg.lam == 2.0 and cfg.clip_ratio == [0.2, 0.28]
    assert cfg.teacher_map == {"default": str(tiny["teacher"])}


def test_exponent_floats_are_floats_in_files_and_flags(tiny, tmp_path):
    # plain YAML 1.1 (yaml.safe_load) reads 1e-5 as the string '1e-5', and lr then failed its check
    path = tmp_path / "cfg.yaml"
    path.write_text(f"student: {tiny['student']}\nteachers: {tiny['teacher']}\ntrain_data: {tiny['train']}\n"
                    "lr: 1e-5\nweight_decay: 1E-2\nclip_ratio: [0.2, 2.8e-1]\nseed: 7\n")  # fmt: skip
    cfg = load_config(str(path), {"warmup_steps": _parse_value("10")})
    assert (cfg.lr, cfg.weight_decay, cfg.clip_ratio, cfg.seed, cfg.warmup_steps) == (
        1e-5,
        0.01,
        [0.2, 0.28],
        7,
        10,
    )
    assert (
        _parse_value("-3e+2") == -300.0 and _parse_value("1e-5x") == "1e-5x" and _parse_value("null") is None
    )
    # a template holds braces: quoted it is a string; unquoted, a clear error saying how to quote it
    assert _parse_value("'{prompt} Put it in \\boxed{}.'") == "{prompt} Put it in \\boxed{}."
    with pytest.raises(argparse.ArgumentTypeError, match="goes in single quotes"):
        _parse_value("{prompt} Put it in \\boxed{}.")


def test_official_defaults():
    cfg = TrainConfig()
    assert (cfg.lam, cfg.temperature, cfg.top_p, cfg.lr, cfg.is_cap, cfg.loss_agg) == (
        1.25, 1.0, 1.0, 1e-5, 5.0, "token-mean"
    )  # fmt: skip
    assert cfg.samples_per_prompt == 1 and cfg.reference == "student"


def test_unknown_key_is_an_error(tiny):
    with pytest.raises(ValueError, match="unknown config keys: \\['lambda'\\]"):
        load_config(None, {"student": str(tiny["student"]), "lambda": 1.25})


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(student="/no/such/model"), "student: path '/no/such/model' does not exist"),
        (dict(teachers={"math": "/no/teacher"}), "teachers.math"),
        (dict(reference="/no/ref"), "reference"),
        (dict(lam=-0.5), "lam"),
        (dict(objective="forward-kl"), "objective"),
        (dict(temperature=0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(loss_agg="sum"), "loss_agg"),
        (dict(clip_ratio=[1.0, 0.2]), "clip_ratio"),
        (dict(is_cap=0), "is_cap"),
        (dict(objective="dense"), "is_cap: applies to objective 'sampled' only"),
        (dict(loss_fold="yes"), "loss_fold: must be true, false or null"),
        (dict(train_data="/no/data.jsonl"), "train_data"),
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(mini_batch_prompts=4), r"mini_batch_prompts: .* dividing prompts_per_step \(6\)"),
        (dict(mini_batch_prompts=0), "mini_batch_prompts"),
        (dict(update_epochs=0), "update_epochs: must be an int >= 1"),
        (dict(keep_checkpoints=0), "keep_checkpoints: must be null or an int >= 1"),
        (dict(keep_checkpoints=True), "keep_checkpoints: must be null or an int >= 1, got True"),  # not 1
        (dict(steps=True), "steps: must be null or an int >= 1, got True"),
        (dict(prompts_per_step=True), "prompts_per_step: must be an int >= 1, got True"),
        (dict(seed=False), "seed: must be an int >= 0, got False"),
        (dict(micro_batch_tokens=True), "micro_batch_tokens: must be null or an int >="),
        (dict(eval_max_prompts=0), "eval_max_prompts: must be null or an int >= 1, got 0"),
        (dict(prompt_template="Answer: "), "prompt_template: must be null, a text holding {prompt} once"),
        (dict(prompt_template="{prompt} {prompt}"), "prompt_template: must be null, a text holding"),
        (dict(prompt_template={"prompt": None}), "prompt_template: .* quote it"),  # what {prompt} reads as
        (dict(micro_batch_tokens=19), r"micro_batch_tokens: .* \(20\), the longest row"),  # 16 + 4
        (dict(micro_batch_tokens=2.5e4), "micro_batch_tokens"),
        (dict(lr_schedule="step"), "lr_schedule"),
        (dict(eval_every=5), "eval_every: needs eval_data"),
        (dict(answer_match="sympy"), "answer_match"),
        (dict(domain_weights={"default": 1.0}), "domain_weights: must map each teacher's domain"),
        (dict(eval_temperature=-0.1), "eval_temperature"),
        (dict(eval_temperature=0.0, eval_samples=4), "eval_samples: must be 1 at eval_temperature 0"),
        (dict(eval_top_p=0.0), "eval_top_p"),
        (dict(eval_temperature=0.6), "eval_temperature: needs eval_data"),
        (dict(allow_code_execution=True), "allow_code_execution: needs eval_data"),
        (dict(allow_code_execution="yes"), "allow_code_execution: must be true or false"),
        (dict(fsdp="on"), "fsdp: must be true or false, got 'on'"),
        (dict(pack_sequences="yes"), "pack_sequences: must be true or false, got 'yes'"),
        (dict(attn_implementation=""), "attn_implementation: must be null or a name"),
        (dict(attn_implementation=2), "attn_implementation: must be null or a name"),
        (dict(fsdp=True, pack_sequences=True), "pack_sequences: is not supported with fsdp yet"),
        (dict(gradient_checkpointing=1), "gradient_checkpointing: must be true or false"),
        (dict(loss_fold="auto"), "loss_fold: must be true or false or null"),
        (dict(eval_teachers=True), "eval_teachers: needs eval_data"),
        (dict(keep_best=True), "keep_best: needs eval_data"),
        (dict(generate_batch_size=0), "generate_batch_size: must be null or an int >= 1"),
        (dict(generate_batch_size=True), "generate_batch_size: must be null or an int >= 1"),
        (dict(code_timeout=0), "code_timeout: must be > 0"),
        (dict(code_workers=0), "code_workers: must be an int >= 1"),
        (dict(dtype="fp8"), "dtype"),
        (dict(rollout_engine="sglang"), "rollout_engine"),
        (dict(loggers=["jsonl", "mlflow"]), "loggers"),
        (dict(device="tpu"), "device"),
    ],
)
def test_bad_settings_name_themselves(tiny, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        base_config(tiny, tmp_path, **overrides)


def test_symbolic_answers_need_math_verify_before_anything_loads(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "_installed", lambda module: module != "math_verify")
    with pytest.raises(ValueError, match=r"answer_match: 'symbolic' needs math-verify: .* 'gopd\[math\]'"):
        base_config(tiny, tmp_path, answer_match="symbolic")


def test_domain_weights_name_every_teachers_domain(tiny, tmp_path):
    two = dict(teachers={"math": str(tiny["teacher"]), "code": str(tiny["teacher_b"])},
               train_data=str(tiny["train_domains"]))  # fmt: skip
    assert base_config(tiny, tmp_path, **two, domain_weights={"math": 3, "code": 1}).domain_weights
    with pytest.raises(ValueError, match="domain_weights: must map each teacher's domain"):
        base_config(tiny, tmp_path, **two, domain_weights={"math": 1})
    with pytest.raises(ValueError, match="domain_weights: weights must be numbers >= 0, not all 0"):
        base_config(tiny, tmp_path, **two, domain_weights={"math": -1, "code": 1})
