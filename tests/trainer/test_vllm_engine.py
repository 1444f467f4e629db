"""The vLLM rollout engine's glue, against a CPU stand-in for vLLM (tests/trainer/fake_vllm.py):
how it builds the LLM, the weight sync (in this process, then the prefix cache dropped), and
that its rollouts have the HF engine's layout. vLLM itself is not run here (it needs CUDA)."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import pytest
import torch

from gopd import rollout
from gopd.data import load_examples
from gopd.distributed import DistContext
from gopd.models import load_model, load_tokenizer
from gopd.rollout import VLLM_MULTIPROCESSING, HFRolloutEngine, VLLMRolloutEngine, is_stop, load_vllm
from gopd.trainer import train
from tests.trainer import fake_vllm
from tests.trainer.conftest import base_config
from tests.trainer.test_end_to_end import changed, check_resume_continues_the_run, train_losses, weights


@pytest.fixture
def fake(monkeypatch):
    fake_vllm.install(monkeypatch)
    monkeypatch.setenv(VLLM_MULTIPROCESSING, "0")  # and restored after the test
    return fake_vllm


def student(tiny):
    return load_model(str(tiny["student"]), torch.float32, torch.device("cpu"), trainable=True)


def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def test_load_vllm_without_vllm_names_the_extra(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ValueError, match=r"vllm.*pip install 'gopd\[vllm\]'"):
        load_vllm(base_config(tiny, tmp_path, rollout_engine="vllm"))


@pytest.mark.parametrize("share,sleep", [(None, False), (0.25, True)])
def test_load_vllm_runs_the_engine_in_process_with_the_configs_settings(tiny, tmp_path, fake, monkeypatch,
                                                                        caplog, share, sleep):  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(VLLM_MULTIPROCESSING, "1")
    cfg = base_config(
        tiny, tmp_path, rollout_engine="vllm", vllm_gpu_memory_utilization=share, vllm_sleep=sleep
    )
    with caplog.at_level(logging.WARNING, logger="gopd"):
        llm = load_vllm(cfg)
    assert llm.multiprocessing == "0"
    assert f"{VLLM_MULTIPROCESSING}=1 overridden to 0" in caplog.text  # the user's setting, said
    assert llm.engine_args == dict(
        dtype="float32", seed=0, gpu_memory_utilization=share or 0.4, max_model_len=16 + 4,
        enable_prefix_caching=True, logprobs_mode="processed_logprobs", enable_sleep_mode=sleep,
    )  # fmt: skip


def test_vllm_stops_at_every_eos_the_checkpoint_lists(tiny, tmp_path, fake):
    from tests.trainer.test_models_and_rollout import second_eos_student

    model, tok, second = second_eos_student(tiny)
    cfg = base_config(tiny, tmp_path, max_new_tokens=8)
    engine = VLLMRolloutEngine(fake.LLM(str(tiny["student"]), dtype="float32"), tok, cfg, model)
    assert engine.eos_ids == [tok.eos_token_id, second]  # sent as the request's stop_token_ids
    ro = engine.generate(load_examples(cfg.train_data, cfg, tok, 64)[:8], samples=2, temperature=1.0)
    last = ro.responses.gather(1, ro.response_mask.sum(-1, keepdim=True) - 1).squeeze(1)
    finished = is_stop(ro.responses, engine.eos_ids).any(-1)
    assert torch.equal(is_stop(last, engine.eos_ids), finished) and (last == second).any()


def test_evaluating_a_checkpoint_with_vllm_loads_no_transformers_copy(tiny, tmp_path, fake, monkeypatch):
    """gopd eval --engine vllm: vLLM samples from the checkpoint as it loaded it. The stand-in
    samples as transformers does, so the figures are the HF engine's, to the last digit."""
    import gopd.evaluate
    from gopd.evaluate import evaluate_checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = base_config(tiny, tmp_path, eval_data=str(tiny["eval"]))
    hf = evaluate_checkpoint(str(tiny["student"]), replace(cfg, eval_samples=2, seed=3))

    def no_copy(*args, **kwargs):
        raise AssertionError("the vLLM path loaded the model with transformers")

    monkeypatch.setattr(gopd.evaluate, "load_model", no_copy)
    with_vllm = replace(cfg, rollout_engine="vllm")
    assert evaluate_checkpoint(str(tiny["student"]), replace(with_vllm, eval_samples=2, seed=3)) == hf
    with pytest.raises(ValueError, match="vllm_sleep: sleep level 2 discards"):
        evaluate_checkpoint(str(tiny["student"]), replace(with_vllm, vllm_sleep=True))
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="a LoRA checkpoint, which vLLM does not load"):
        evaluate_checkpoint(str(lora), with_vllm)


def test_under_torchrun_each_rank_runs_its_own_engine_with_its_own_seed(tiny, tmp_path, fake, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    llm = load_vllm(
        base_config(tiny, tmp_path, rollout_engine="vllm", seed=5), DistContext(rank=1, world_size=2)
    )
    assert llm.engine_args["distributed_executor_backend"] == "external_launcher"
    assert llm.engine_args["seed"] == 6


def test_vllm_settings_are_checked(tiny, tmp_path):
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization: applies to rollout_engine 'vllm'"):
        base_config(tiny, tmp_path, vllm_gpu_memory_utilization=0.5)
    with pytest.raises(ValueError, match="vllm_sleep: applies to rollout_engine 'vllm' only"):
        base_config(tiny, tmp_path, vllm_sleep=True)
    with pytest.raises(ValueError, match=r"vllm_gpu_memory_utilization: must be in \(0, 1\)"):
        base_config(tiny, tmp_path, rollout_engine="vllm", vllm_gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="generate_batch_size: applies to transformers generate"):
        base_config(tiny, tmp_path, rollout_engine="vllm", generate_batch_size=8)
    # under vLLM it reaches eval_teachers' teachers of another shape than the student's
    base_config(tiny, tmp_path, rollout_engine="vllm", generate_batch_size=8, eval_teachers=True,
                eval_data=str(tiny["eval"]))  # fmt: skip


def test_engine_starts_from_the_live_student_and_resyncs_after_each_update(tiny, tmp_path, fake):
    cfg = base_config(tiny, tmp_path, rollout_engine="vllm")
    model = student(tiny)
    perturb(model, seed=1)  # e.g. resumed: no longer the checkpoint vLLM loaded
    llm = fake.LLM(str(tiny["student"]), dtype="float32")
    engine = VLLMRolloutEngine(llm, load_tokenizer(str(tiny["student"])), cfg, model)
    names = list(model.state_dict())
    assert llm.events == [("load_weights", names), ("reset_prefix_cache",)]
    assert fake.weights_fingerprint(llm.hf) == fake.weights_fingerprint(model)

    perturb(model, seed=2)  # an update
    engine.update_weights(model)
    assert llm.events[2:] == [("load_weights", names), ("reset_prefix_cache",)]
    assert fake.weights_fingerprint(llm.hf) == fake.weights_fingerprint(model)


def test_engine_refuses_a_model_in_another_process(tiny, tmp_path, fake, monkeypatch):
    monkeypatch.setenv(VLLM_MULTIPROCESSING, "1")
    llm = fake.LLM(str(tiny["student"]), dtype="float32")
    cfg = base_config(tiny, tmp_path, rollout_engine="vllm")
    with pytest.raises(RuntimeError, match=f"{VLLM_MULTIPROCESSING} must be 0"):
        VLLMRolloutEngine(llm, load_tokenizer(str(tiny["student"])), cfg, student(tiny))


def test_vllm_rollouts_have_the_hf_engines_layout(tiny, tmp_path, fake):
    """Same weights, same seed: the completions vLLM returns (ragged, up to EOS) become the same
    padded rollouts, masks and r_t as the HF engine's."""
    cfg = base_config(tiny, tmp_path, rollout_engine="vllm", max_new_tokens=8, temperature=1.3)
    tok = load_tokenizer(str(tiny["student"]))
    model = student(tiny)
    examples = load_examples(cfg.train_data, cfg, tok, 64)[:6]
    engine = VLLMRolloutEngine(fake.LLM(str(tiny["student"]), dtype="float32"), tok, cfg, model)
    torch.manual_seed(0)
    got = engine.generate(examples, samples=3, temperature=cfg.temperature)
    torch.manual_seed(0)
    want = HFRolloutEngine(model, tok, cfg).generate(examples, samples=3, temperature=cfg.temperature)
    lengths = got.response_mask.sum(1)
    assert lengths.min() < lengths.max() == cfg.max_new_tokens  # some rows stopped at EOS: ragged
    for name in ("sequences", "attention_mask", "response_mask", "rollout_logp"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.prompt_len == want.prompt_len and got.examples == want.examples


def test_training_with_vllm_samples_every_batch_from_the_current_student(tiny, tmp_path, fake, monkeypatch):
    """Each generate sees the weights of the student it trains, a resumed run included: the
    resumed run's next-step losses equal an uninterrupted run's."""
    llms = []

    def fake_load_vllm(cfg, ctx=None):
        llms.append(fake.LLM(cfg.student, dtype=cfg.dtype))
        return llms[-1]

    monkeypatch.setattr(rollout, "load_vllm", fake_load_vllm)

    check_resume_continues_the_run(tiny, tmp_path, rollout_engine="vllm")
    events = llms[0].events  # the uninterrupted run's engine
    generates = [i for i, e in enumerate(events) if e[0] == "generate"]
    assert len(generates) == 4
    for i in generates[1:]:  # the update before it was pushed, then the stale KV dropped
        assert [e[0] for e in events[i - 2 : i]] == ["load_weights", "reset_prefix_cache"]
    trained = weights(tmp_path / "full" / "checkpoints" / "step_0000004")
    assert torch.equal(llms[0].hf.state_dict()["model.norm.weight"], trained["model.norm.weight"])


def test_a_sleeping_engine_wakes_weights_first_and_samples_the_current_student(tiny, tmp_path, fake):
    """Asleep (level 2), vLLM has no weights: an update is kept, not pushed, and the next
    generate wakes the weights, loads the student into them, then wakes the KV cache."""
    cfg = base_config(tiny, tmp_path, rollout_engine="vllm", vllm_sleep=True, max_new_tokens=8)
    tok = load_tokenizer(str(tiny["student"]))
    model = student(tiny)
    examples = load_examples(cfg.train_data, cfg, tok, 64)[:4]
    llm = fake.LLM(str(tiny["student"]), dtype="float32", enable_sleep_mode=True)
    engine = VLLMRolloutEngine(llm, tok, cfg, model)
    engine.generate(examples, samples=2, temperature=1.0)
    assert [e[0] for e in llm.events] == ["load_weights", "reset_prefix_cache", "generate", "sleep"]
    assert llm.events[-1] == ("sleep", 2) and engine.asleep

    perturb(model, seed=3)  # an update while vLLM sleeps: nothing to copy into yet
    engine.update_weights(model)
    assert len(llm.events) == 4
    torch.manual_seed(0)
    got = engine.generate(examples, samples=2, temperature=1.0)
    assert llm.events[4:] == [("wake_up", ["weights"]), ("load_weights", list(model.state_dict())),
                              ("wake_up", ["kv_cache"]), ("reset_prefix_cache",),
                              ("generate", fake.weights_fingerprint(model)), ("sleep", 2)]  # fmt: skip
    torch.manual_seed(0)
    want = HFRolloutEngine(model, tok, cfg).generate(examples, samples=2, temperature=1.0)
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.rollout_logp, want.rollout_logp)


def test_training_with_a_sleeping_vllm_matches_an_awake_one(tiny, tmp_path, fake, monkeypatch):
    """Same run with and without vllm_sleep: same losses and weights; every generate of the
    sleeping run is followed by a sleep, so scoring and the update run with vLLM asleep."""
    llms = []

    def fake_load_vllm(cfg, ctx=None):
        llms.append(fake.LLM(cfg.student, dtype=cfg.dtype, enable_sleep_mode=cfg.vllm_sleep))
        return llms[-1]

    monkeypatch.setattr(rollout, "load_vllm", fake_load_vllm)
    runs = {}
    for sleep in (False, True):
        cfg = base_config(tiny, tmp_path, rollout_engine="vllm", vllm_sleep=sleep, save_every=3,
                          output_dir=str(tmp_path / f"sleep-{sleep}"))  # fmt: skip
        train(cfg)
        runs[sleep] = (
            train_losses(cfg),
            weights(tmp_path / f"sleep-{sleep}" / "checkpoints" / "step_0000003"),
        )
    assert runs[True][0] == runs[False][0] and not changed(runs[True][1], runs[False][1])
    kinds = [e[0] for e in llms[1].events]
    generates = [i for i, k in enumerate(kinds) if k == "generate"]
    assert len(generates) == 3 and all(kinds[i + 1] == "sleep" for i in generates)
    assert "sleep" not in kinds[: generates[0]]


@pytest.mark.parametrize("sleep", [False, True])
def test_eval_teachers_samples_a_teacher_shaped_as_the_student_in_vllm(tiny, tmp_path, fake, caplog, sleep):
    """The run's vLLM engine evaluates a teacher with the student's shapes (its weights loaded,
    then the student's again, awake or asleep); one of another size samples with transformers,
    said in a log line. Greedy: the figures are those of transformers for both."""
    from gopd.evaluate import evaluate_teachers
    from gopd.models import load_models

    data = str(tiny["train_domains"])
    teachers = {"math": str(tiny["teacher_b"]), "code": str(tiny["teacher"])}  # "teacher": hidden 48
    cfg = base_config(
        tiny, tmp_path, teachers=teachers, train_data=data, eval_data=data, rollout_engine="vllm",
        vllm_sleep=sleep, eval_temperature=0.0, eval_samples=1,
    )  # fmt: skip
    models = load_models(cfg)
    llm = fake.LLM(str(tiny["student"]), dtype="float32", enable_sleep_mode=sleep)
    engine = VLLMRolloutEngine(llm, models.tokenizer, cfg, models.student)
    examples = load_examples(data, cfg, models.tokenizer, 64, for_eval=True)[:8]
    with caplog.at_level(logging.INFO, logger="gopd"):
        got = evaluate_teachers(models, examples, cfg, engine=engine)
    engine.generate(examples[:2], samples=1, temperature=1.0)  # the run's next rollouts
    sampled_by = [event[1] for event in llm.events if event[0] == "generate"]
    by = [fake.weights_fingerprint(m) for m in (models.teachers["math"], models.student)]
    assert sampled_by == by and engine.student is models.student
    assert "teacher code is not shaped as the student" in caplog.text and "teacher math" not in caplog.text
    assert got == evaluate_teachers(models, examples, cfg)  # every teacher with transformers
