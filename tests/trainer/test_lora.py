"""LoRA students (peft): only the adapters train, the reference is the student with its
adapters off (no copy), checkpoints hold the adapters and resume exactly."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from gopd.checkpoint import latest_checkpoint
from gopd.models import AdapterFree, final_hidden, head_weight, load_models
from gopd.rollout import VLLM_MULTIPROCESSING, VLLMRolloutEngine
from gopd.scoring import score_rollouts
from gopd.trainer import train
from gopd.update import make_optimizer, make_scheduler, policy_update
from gopd_kernels import token_logprobs
from tests.trainer.conftest import base_config
from tests.trainer.test_end_to_end import changed, check_resume_continues_the_run, weights
from tests.trainer.test_stages import rollouts_for

pytest.importorskip("peft")
LORA = dict(lora_rank=4, lr=1e-2)


def reference_logp(model, rollouts) -> torch.Tensor:
    """log-probs of the sampled tokens under `model` (a model, or the AdapterFree view)."""
    with torch.no_grad():
        hidden = final_hidden(model, rollouts.sequences, rollouts.attention_mask)[
            :, rollouts.prompt_len - 1 : -1
        ]
        return token_logprobs(
            hidden, head_weight(model), rollouts.targets, ignore_index=-100, backend="torch"
        )


def test_only_adapters_train_and_the_reference_stays_the_initial_student(tiny, tmp_path, caplog):
    cfg = base_config(tiny, tmp_path, lam=1.25, **LORA)
    with caplog.at_level(logging.INFO, logger="gopd"):
        models = load_models(cfg)
    assert isinstance(models.reference, AdapterFree) and models.frozen() == [models.teachers["default"]]
    assert "no copy loaded" in caplog.text and "LoRA rank 4" in caplog.text
    trained = {n for n, p in models.student.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    base = AutoModelForCausalLM.from_pretrained(str(tiny["student"]))
    rollouts = rollouts_for(cfg, models)
    optimizer = make_optimizer(models.student, cfg)
    for _ in range(2):
        scores = score_rollouts(models, rollouts, cfg)
        _, _, stepped = policy_update(
            models, rollouts, scores, optimizer, make_scheduler(optimizer, cfg, 3), cfg
        )
        assert stepped
    # the adapted student has moved; with its adapters off it is the initial student, exactly
    initial = reference_logp(base, rollouts)
    assert not torch.allclose(reference_logp(models.student, rollouts), initial)
    torch.testing.assert_close(reference_logp(models.reference, rollouts), initial, rtol=0, atol=0)
    torch.testing.assert_close(
        scores.ref_logp[rollouts.response_mask], initial[rollouts.response_mask].float()
    )


def test_lora_training_saves_adapters_that_load_and_resume_exactly(tiny, tmp_path):
    cfg = base_config(tiny, tmp_path, **LORA)
    train(cfg)
    ckpt = latest_checkpoint(cfg.output_dir)
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(ckpt))  # transformers applies the adapter
    lora_b = [v for k, v in loaded.state_dict().items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # trained (peft starts B at 0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny["student"]))
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        assert not torch.allclose(loaded(ids).logits, base(ids).logits)
    assert not changed(weights(tiny["student"]), base.state_dict())  # the base on disk is untouched
    check_resume_continues_the_run(tiny, tmp_path / "resume", **LORA)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(lora_alpha=8.0), "lora_alpha: applies only with lora_rank > 0"),
        (dict(lora_target_modules=["q_proj"]), "lora_target_modules: applies only with lora_rank > 0"),
        (dict(lora_rank=4, lora_target_modules=["q_proj", "lm_head"]), "the LM head cannot take an adapter"),
        (dict(lora_rank=4, lora_target_modules="q_proj"), "must be 'all-linear' or a list"),
        (dict(lora_rank=-1), "lora_rank: must be an int >= 0"),
        (dict(lora_rank=4, lora_dropout=1.0), "lora_dropout"),
    ],
)
def test_bad_lora_settings_name_themselves(tiny, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        base_config(tiny, tmp_path, **overrides)


def test_lora_without_peft_is_an_error_naming_the_extra(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(ValueError, match=r"lora_rank > 0 needs peft: pip install 'gopd\[lora\]'"):
        load_models(base_config(tiny, tmp_path, **LORA))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_steps_are_the_same_under_gradient_checkpointing(tiny, tmp_path, dtype):
    """One SGD step (lr 1: the adapters move by their gradient) with and without checkpointing."""
    moved = []
    for checkpointing in (False, True):
        cfg = base_config(tiny, tmp_path, dtype=dtype, gradient_checkpointing=checkpointing, grad_clip=None,
                          **LORA)  # fmt: skip
        torch.manual_seed(0)  # peft draws A from the global generator
        models = load_models(cfg)
        with torch.no_grad():  # peft starts B at 0, which gives A no gradient: give B values
            for name, p in models.student.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        rollouts = rollouts_for(cfg, models)
        scores = score_rollouts(models, rollouts, cfg)
        sgd = torch.optim.SGD([p for p in models.student.parameters() if p.requires_grad], lr=1.0)
        assert policy_update(models, rollouts, scores, sgd, make_scheduler(sgd, cfg, 3), cfg)[2]
        moved.append({n: p.detach().clone() for n, p in models.student.named_parameters() if p.requires_grad})
    assert moved[0].keys() == moved[1].keys() and any("lora_A" in n for n in moved[0])
    for name in moved[0]:
        torch.testing.assert_close(moved[1][name], moved[0][name], rtol=1e-5, atol=1e-6)


def test_tied_embeddings_take_no_adapter(tiny, tmp_path):
    with pytest.raises(ValueError, match="the input embeddings are tied to the LM head"):
        load_models(base_config(tiny, tmp_path, lora_rank=4, lora_target_modules=["q_proj", "embed_tokens"]))


def test_vllm_gets_the_merged_weights_under_the_base_names(tiny, tmp_path, monkeypatch):
    from tests.trainer import fake_vllm

    fake_vllm.install(monkeypatch)
    monkeypatch.setenv(VLLM_MULTIPROCESSING, "0")
    cfg = base_config(tiny, tmp_path, **LORA)
    models = load_models(cfg)
    with torch.no_grad():  # adapters that do something
        for name, p in models.student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in models.student.state_dict().items()}
    llm = fake_vllm.LLM(str(tiny["student"]), dtype="float32")
    VLLMRolloutEngine(llm, models.tokenizer, cfg, models.student)  # pushes the weights at the start
    assert llm.events[0][0] == "load_weights" and not any("lora" in n for n in llm.events[0][1])
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        torch.testing.assert_close(llm.hf(ids).logits, models.student(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(
            llm.hf(ids).logits, AutoModelForCausalLM.from_pretrained(str(tiny["student"]))(ids).logits
        )
    assert all(
        torch.equal(v, before[k]) for k, v in models.student.state_dict().items()
    )  # merged out of place


def test_dense_objective_trains_the_adapters_against_the_adapter_free_reference(tiny, tmp_path):
    cfg = base_config(tiny, tmp_path, objective="dense", is_cap=None, lam=1.25, grad_clip=None, **LORA)
    torch.manual_seed(0)
    models = load_models(cfg)
    assert isinstance(models.reference, AdapterFree)
    rollouts = rollouts_for(cfg, models)
    before = {n: p.detach().clone() for n, p in models.student.named_parameters()}
    optimizer = make_optimizer(models.student, cfg)
    scheduler = make_scheduler(optimizer, cfg, 3)
    _, stats, stepped = policy_update(models, rollouts, None, optimizer, scheduler, cfg)
    assert stepped and stats["grad_norm"] > 0
    # the gradient reaches the adapters only: B moves (A has none while B is 0), the base stays
    moved = {n for n, p in models.student.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_B" in n for n in moved)


def export(checkpoint, out) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gopd", "export", "--checkpoint", str(checkpoint), "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_export_writes_a_standalone_model_with_the_adapters_merged(tiny, tmp_path):
    cfg = base_config(tiny, tmp_path, **LORA)
    train(cfg)
    ckpt = latest_checkpoint(cfg.output_dir)
    proc = export(ckpt, tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in k for k in merged.state_dict())
    adapted = AutoModelForCausalLM.from_pretrained(str(ckpt))
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
    proc = export(tiny["student"], tmp_path / "x")  # a whole model: nothing to merge
    assert proc.returncode == 2 and "holds no LoRA adapter" in proc.stderr
