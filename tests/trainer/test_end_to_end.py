"""A few real G-OPD steps of tiny models on the CPU: single teacher, two domain teachers, a
separate reference, the dense objective; checkpoints and exact resume; the CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from gopd import distributed
from gopd.checkpoint import checkpoint_dir, latest_checkpoint
from gopd.data import Example
from gopd.rollout import Rollouts
from gopd.trainer import rollout_lengths, train
from tests.trainer.conftest import base_config


def weights(path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(str(path)).state_dict().items()}


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def train_losses(cfg) -> list[float]:
    records = [json.loads(x) for x in open(cfg.output_dir + "/metrics.jsonl")]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.parametrize(
    "setting",
    ["single-teacher", "two-domain-teachers", "separate-reference", "dense"],
)
def test_training_runs_and_changes_only_the_student(tiny, tmp_path, setting):
    overrides = {
        "single-teacher": dict(eval_data=str(tiny["eval"]), eval_every=2, eval_samples=2),
        "two-domain-teachers": dict(
            teachers={"math": str(tiny["teacher"]), "code": str(tiny["teacher_b"])},
            train_data=str(tiny["train_domains"]),
            eval_data=str(tiny["train_domains"]),
            eval_samples=1,
            eval_max_prompts=6,
        ),  # fmt: skip
        "separate-reference": dict(reference=str(tiny["reference"]), lam=1.25),
        "dense": dict(objective="dense", is_cap=None, lam=1.25, loss_agg="seq-mean-token-mean"),
    }[setting]
    cfg = base_config(tiny, tmp_path, **overrides)
    frozen = {name: weights(tiny[name]) for name in ("student", "teacher", "teacher_b", "reference")}
    summary = train(cfg)
    losses = train_losses(cfg)
    assert len(losses) == 3 and all(map(lambda x: x == x and abs(x) < 1e6, losses))
    final = latest_checkpoint(cfg.output_dir)
    assert final.name == "step_0000003"
    assert changed(frozen["student"], weights(final))
    for name in ("student", "teacher", "teacher_b", "reference"):  # the inputs on disk are untouched
        assert not changed(frozen[name], weights(tiny[name]))
    if setting == "single-teacher":
        assert set(summary["evals"]) == {0, 2, 3} and 0 <= summary["evals"][3]["avg@2"] <= 1
    if setting == "two-domain-teachers":  # figures per domain: the merged student against each teacher
        final_eval = summary["evals"][3]
        assert {"avg@1/math", "avg@1/code", "pass@1/math", "pass@1/code"} <= set(final_eval)
        overall = (final_eval["avg@1/math"] + final_eval["avg@1/code"]) / 2  # 3 prompts each
        assert final_eval["avg@1"] == pytest.approx(overall)
    records = [json.loads(x) for x in open(cfg.output_dir + "/metrics.jsonl")]
    train_rec = [r for r in records if r["kind"] == "train"][0]
    for key in ("loss", "response_length", "truncated", "tokens_per_s", "time_rollout", "time_scoring",
                "time_update"):  # fmt: skip
        assert key in train_rec
    per_domain = {"reward/math", "reverse_kl/code", "response_length/math", "truncated/code"}
    assert (per_domain <= set(train_rec)) == (setting == "two-domain-teachers")  # each domain's figures
    assert ("reverse_kl" in train_rec) == (setting != "dense") and ("kl" in train_rec) == (setting == "dense")


def test_teachers_in_memory_are_frozen(tiny, tmp_path):
    """The frozen models get no gradients and keep their weights during training."""
    from gopd import trainer

    seen = {}
    original = trainer.load_models

    def spy(cfg):
        models = original(cfg)
        seen["models"] = models
        seen["before"] = [p.detach().clone() for m in models.frozen() for p in m.parameters()]
        return models

    trainer.load_models = spy
    try:
        train(base_config(tiny, tmp_path, lam=1.25, reference=str(tiny["reference"])))
    finally:
        trainer.load_models = original
    params = [p for m in seen["models"].frozen() for p in m.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in params)
    assert all(torch.equal(a, b) for a, b in zip(seen["before"], params, strict=True))


def check_resume_continues_the_run(tiny, tmp_path, **overrides) -> None:
    """Trains run "full" for 4 steps, and run "cut" for 2, then resumed to 4 (checkpoints every
    2 steps): the resumed steps' losses must equal the uninterrupted run's."""

    def config(run: str, steps: int):
        return base_config(
            tiny, tmp_path, steps=steps, save_every=2, output_dir=str(tmp_path / run), **overrides
        )

    full = config("full", 4)
    train(full)
    train(config("cut", 2))
    interrupted = config("cut", 4)
    train(interrupted, resume="latest")
    a, b = train_losses(full), train_losses(interrupted)
    assert len(a) == 4 and len(b) == 4
    assert b[2:] == pytest.approx(a[2:], rel=1e-6, abs=1e-7)


def test_resume_gives_the_same_next_step_loss(tiny, tmp_path):
    check_resume_continues_the_run(tiny, tmp_path)


def test_rollout_lengths_per_domain_and_the_share_cut_at_the_cap():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 6, eos, pad], [5, 6, 7, 8], [5, eos, pad, pad], [7, 7, 7, 7]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    examples = [Example([1], d, None, "") for d in ("math", "math", "code", "code")]
    ro = Rollouts(torch.cat([torch.ones(4, 1, dtype=torch.long), responses], 1),
                  torch.cat([torch.ones(4, 1, dtype=torch.long), mask.long()], 1), 1, mask, torch.zeros(4, 4),
                  examples)  # fmt: skip
    out, tokens = rollout_lengths(ro, ["math", "code"], eos, distributed.SINGLE)
    assert tokens == 13 and out == {
        "response_length": 13 / 4, "truncated": 0.5,
        "response_length/math": 3.5, "truncated/math": 0.5,
        "response_length/code": 3.0, "truncated/code": 0.5,
    }  # fmt: skip
    out, _ = rollout_lengths(ro, ["default"], eos, distributed.SINGLE)  # one teacher: no domains
    assert out == {"response_length": 13 / 4, "truncated": 0.5}


def test_several_updates_per_step_train_and_resume_exactly(tiny, tmp_path):
    """Two mini-batches of 3 prompts, twice over: 4 updates a step, resumed exactly; the
    learning-rate schedule counts updates."""
    several = dict(mini_batch_prompts=3, update_epochs=2)
    check_resume_continues_the_run(tiny, tmp_path, **several)
    steps = [r for r in map(json.loads, open(tmp_path / "full" / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["updates"] for r in steps] == [4] * 4 and all("clip_frac" in r for r in steps)
    cfg = base_config(tiny, tmp_path, output_dir=str(tmp_path / "linear"), lr_schedule="linear", **several)
    train(cfg)
    steps = [r for r in map(json.loads, open(tmp_path / "linear" / "metrics.jsonl")) if r["kind"] == "train"]
    # a linear decay over 3 steps x 4 updates: step 3's updates 9-12 run at lr x (4, 3, 2, 1) / 12
    assert steps[-1]["lr"] == pytest.approx(1e-3 * 10 / 48)


def test_domain_weights_train_and_resume_exactly(tiny, tmp_path):
    """Each step's prompts 5 math to 1 code; the sampler's state is part of the checkpoint."""
    teachers = {"math": str(tiny["teacher"]), "code": str(tiny["teacher_b"])}
    check_resume_continues_the_run(tiny, tmp_path, teachers=teachers, train_data=str(tiny["train_domains"]),
                                   domain_weights={"math": 5, "code": 1})  # fmt: skip
    steps = [r for r in map(json.loads, open(tmp_path / "full" / "metrics.jsonl")) if r["kind"] == "train"]
    assert all("reward/math" in r and "reward/code" in r for r in steps)


def test_keep_checkpoints_removes_the_oldest_and_resume_still_works(tiny, tmp_path):
    cfg = base_config(tiny, tmp_path, steps=4, save_every=1, keep_checkpoints=2)
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_0000003",
        "step_0000004",
    ]
    longer = base_config(tiny, tmp_path, steps=5, save_every=1, keep_checkpoints=2)
    train(longer, resume="latest")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step_0000004",
        "step_0000005",
    ]
    assert len(train_losses(longer)) == 5  # 4, then the fifth after resuming


def test_resume_without_checkpoint_is_an_error(tiny, tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(base_config(tiny, tmp_path), resume="latest")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gopd", *args], capture_output=True, text=True, timeout=300)


def test_cli_help_describes_every_option():
    from gopd.cli import build_parser
    from gopd.config import TrainConfig

    out = run_cli("train", "--help").stdout
    for field in TrainConfig.__dataclass_fields__:
        assert f"--{field.replace('_', '-')}" in out
    assert "reward scale lambda" in out
    for command in ("eval", "demo"):
        assert run_cli(command, "--help").returncode == 0
    assert build_parser().prog == "gopd"


def test_cli_demo_passes_its_options_to_the_demo(monkeypatch):
    """gopd demo --lam 1 1.25 --weak-teacher (--merge): each option reaches run_demo (run_merge_demo)."""
    import gopd.demo
    import gopd.demo.merge
    from gopd.cli import main

    calls, threads = [], []
    for module, name in ((gopd.demo, "run_demo"), (gopd.demo.merge, "run_merge_demo")):
        monkeypatch.setattr(module, name, lambda out, **kw: calls.append((out, kw)))
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # this process's own stay as they are
    assert main(["demo", "--lam", "1", "1.25", "--weak-teacher", "--seed", "3", "--distill-steps", "7"]) == 0
    assert main(["demo", "--merge", "--threads", "1"]) == 0
    (out, kw), (merge_out, merge_kw) = calls
    want = dict(seed=3, distill_steps=7, quick=False, device="cpu", lams=[1.0, 1.25], weak_teacher=True)
    assert out == "runs/demo" and kw == want
    assert merge_out == "runs/demo_merge" and merge_kw["lams"] is None and merge_kw["weak_teacher"] is False
    assert threads == [2, 1]  # 2 by default: the README's figures' count, whatever the machine's
    assert main(["demo", "--threads", "0"]) == 2 and len(calls) == 2


def test_cli_bad_config_exits_with_a_clear_error(tiny, tmp_path):
    proc = run_cli("train", "--student", str(tiny["student"]), "--teachers", str(tiny["teacher"]),
                   "--train-data", str(tiny["train"]), "--lam", "-1", "--objective", "reverse")  # fmt: skip
    assert proc.returncode == 2
    assert "lam: must be a finite number >= 0" in proc.stderr and "objective" in proc.stderr


def test_cli_train_and_eval(tiny, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("train", "--student", str(tiny["student"]), "--teachers", str(tiny["teacher"]),
                   "--train-data", str(tiny["train"]), "--steps", "2", "--prompts-per-step", "4",
                   "--max-new-tokens", "4", "--max-prompt-tokens", "16", "--output-dir", str(out),
                   "--device", "cpu", "--loggers", "[jsonl]")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = latest_checkpoint(str(out))
    proc = run_cli("eval", "--model", str(ckpt), "--data", str(tiny["eval"]), "--k", "2",
                   "--max-new-tokens", "4", "--device", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "avg@2:" in proc.stdout and "pass@2:" in proc.stdout
    # code prompts: their tests run only when allowed; figures per domain
    mixed = tmp_path / "mixed.jsonl"
    code = {"prompt": "12+34=", "tests": "assert add(12, 34) == 46", "domain": "code"}
    mixed.write_text(tiny["eval"].read_text() + json.dumps(code) + "\n")
    args = ("eval", "--model", str(ckpt), "--data", str(mixed), "--k", "2", "--max-new-tokens", "4",
            "--device", "cpu")  # fmt: skip
    proc = run_cli(*args)
    assert proc.returncode == 2 and "set allow_code_execution: true" in proc.stderr, proc.stderr[-2000:]
    proc = run_cli(*args, "--allow-code-execution", "--code-timeout", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "avg@2/code: 0.0" in proc.stdout and "avg@2/default:" in proc.stdout  # digits are no program


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="checks the error without vLLM")
def test_cli_eval_with_the_vllm_engine_names_what_it_needs(tiny):
    proc = run_cli("eval", "--model", str(tiny["student"]), "--data", str(tiny["eval"]), "--engine", "vllm",
                   "--device", "cpu")  # fmt: skip
    assert proc.returncode == 2 and "rollout_engine='vllm' needs vLLM" in proc.stderr, proc.stderr[-2000:]


def test_cli_greedy_evaluation_takes_one_sample(tiny, tmp_path):
    args = ("eval", "--model", str(tiny["student"]), "--data", str(tiny["eval"]), "--temperature", "0",
            "--max-new-tokens", "4", "--device", "cpu")  # fmt: skip
    proc = run_cli(*args, "--k", "2")
    assert proc.returncode == 2 and "eval_samples: must be 1 at eval_temperature 0" in proc.stderr
    proc = run_cli(*args, "--k", "1", "--samples-out", str(tmp_path / "greedy.jsonl"))
    assert proc.returncode == 0 and "avg@1:" in proc.stdout, proc.stderr[-2000:]
    samples = [json.loads(line) for line in open(tmp_path / "greedy.jsonl")]
    assert len(samples) == 8 and f"avg@1: {sum(r['right'] for r in samples) / 8}" in proc.stdout
    # greedy: three prompts per generate call give the same answers as all of them at once
    chunked = run_cli(*args, "--k", "1", "--generate-batch-size", "3")
    assert chunked.returncode == 0 and chunked.stdout == proc.stdout, chunked.stderr[-2000:]


def test_eval_teachers_logs_each_teacher_and_leaves_the_students_run_as_it_was(tiny, tmp_path):
    teachers = {"math": str(tiny["teacher"]), "code": str(tiny["teacher_b"])}
    data = str(tiny["train_domains"])
    cfg = base_config(tiny, tmp_path, teachers=teachers, train_data=data, eval_data=data, eval_max_prompts=6,
                      eval_samples=2, steps=2)  # fmt: skip
    plain = train(cfg)
    with_teachers = dataclasses.replace(cfg, eval_teachers=True, output_dir=str(tmp_path / "with_teachers"),
                                        eval_log_samples=True)  # fmt: skip
    summary = train(with_teachers)
    assert set(summary["teacher_evals"]) == {"math", "code"} and "teacher_evals" not in plain
    assert summary["evals"] == plain["evals"] and train_losses(with_teachers) == train_losses(cfg)
    records = [json.loads(line) for line in open(Path(with_teachers.output_dir, "metrics.jsonl"))]
    for domain, result in summary["teacher_evals"].items():
        (logged,) = [r for r in records if r["kind"] == f"eval_teacher/{domain}"]
        assert logged["step"] == 0 and {k: logged[k] for k in result} == result
    # eval_log_samples: each evaluation's samples, the teachers' too, agreeing with its figures
    written = Path(with_teachers.output_dir, "eval_samples")
    files = {"step_0000000": summary["evals"][0], "step_0000002": summary["evals"][2]}
    files |= {f"teacher_{d}": result for d, result in summary["teacher_evals"].items()}
    assert sorted(p.stem for p in written.iterdir()) == sorted(files)
    for name, result in files.items():
        samples = [json.loads(line) for line in open(written / f"{name}.jsonl")]
        assert len(samples) == 6 * 2
        assert sum(r["right"] for r in samples) / 12 == pytest.approx(result["avg@2"])


def test_keep_best_keeps_the_checkpoint_of_the_best_evaluation(tiny, tmp_path, monkeypatch):
    """Scripted avg@2 per evaluation (the tiny models answer nothing right): a checkpoint at
    each new best after step 0, best.json naming it, keep_checkpoints sparing it; resumed, the
    run keeps the bar it had (0.45 at step 5 is no best after 0.5)."""
    import gopd.trainer
    from gopd.checkpoint import best_checkpoint, complete_checkpoints, load_trainer_state

    scripted = iter([0.1, 0.2, 0.5, 0.3, 0.4, 0.45, 0.55])  # steps 0 to 4, then 5 and 6 resumed
    scripted_eval = lambda *a, **k: {"avg@2": next(scripted), "prompts": 8}  # noqa: E731
    monkeypatch.setattr(gopd.trainer, "evaluate_configured", scripted_eval)
    cfg = base_config(tiny, tmp_path, eval_data=str(tiny["eval"]), eval_every=1, eval_samples=2, steps=4,
                      keep_best=True, keep_checkpoints=1)  # fmt: skip
    train(cfg)
    best = best_checkpoint(cfg.output_dir)
    path = str(checkpoint_dir(cfg.output_dir, 2))
    assert best == {"step": 2, "metric": "avg@2", "value": 0.5, "path": path}
    kept = complete_checkpoints(cfg.output_dir)  # written at 1 (a best), 2 (a best) and 4 (the last)
    assert [p.name for p in kept] == ["step_0000002", "step_0000004"]
    assert load_trainer_state(kept[-1])["best"] == {k: best[k] for k in ("step", "metric", "value")}
    train(dataclasses.replace(cfg, steps=6), resume="latest")
    assert best_checkpoint(cfg.output_dir)["step"] == 6
    assert [p.name for p in complete_checkpoints(cfg.output_dir)] == ["step_0000006"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_demo_on_an_unusable_device_fails_before_the_sft(tmp_path):
    for device, message in (("cuda", "CUDA is not available"), ("tpu:0", "not a device")):
        proc = run_cli("demo", "--quick", "--device", device, "--out", str(tmp_path / "demo"))
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "demo").exists()  # nothing was built


def test_demo_quick_runs(tmp_path):
    from gopd.demo import run_demo

    result = run_demo(tmp_path / "demo", quick=True)
    assert set(result["avg"]) == {"teacher", "student before", "student after"} and result["lams"] == [1.25]
    assert all(0 <= v <= 1 for v in result["avg"].values())
    assert (tmp_path / "demo" / "gopd" / "metrics.jsonl").exists()


def test_demo_runs_each_lam_from_the_same_student(tmp_path, monkeypatch):
    """--lam 1 1.25: one G-OPD run per lam, each from the same student with the same seed, in a
    folder of its own; lam is the only setting that differs between them."""
    import gopd.demo
    from gopd.demo import run_demo

    configs = []
    real_train = gopd.demo.train
    monkeypatch.setattr(gopd.demo, "train", lambda cfg: configs.append(cfg) or real_train(cfg))
    result = run_demo(tmp_path / "demo", quick=True, lams=[1, 1.25])
    assert result["lams"] == [1.0, 1.25]
    after = ["student after, lam 1", "student after, lam 1.25"]
    assert list(result["avg"]) == ["teacher", "student before", *after]
    assert [c.lam for c in configs] == [1.0, 1.25]
    assert [Path(c.output_dir).name for c in configs] == ["gopd_lam1", "gopd_lam1.25"]
    same = lambda c: dataclasses.replace(c, lam=0, output_dir="")  # noqa: E731
    assert same(configs[0]) == same(configs[1])
    # step 1: the same samples, scored by the same models; the reference is the student as it
    # starts, so R = o there and the advantage is lam * (T - o) = -lam * reverse_kl
    firsts = []
    for cfg in configs:
        assert yaml.safe_load(Path(cfg.output_dir, "config.yaml").read_text())["lam"] == cfg.lam
        log = [json.loads(line) for line in Path(cfg.output_dir, "metrics.jsonl").read_text().splitlines()]
        firsts.append(next(r for r in log if r["kind"] == "train" and r["step"] == 1))
    assert firsts[0]["reverse_kl"] == pytest.approx(firsts[1]["reverse_kl"], rel=1e-6)
    for cfg, first in zip(configs, firsts, strict=True):
        assert first["advantage"] == pytest.approx(-cfg.lam * first["reverse_kl"], rel=1e-4)


def test_the_demo_teachers_stop_rule():
    """TeacherStop: 200 steps after greedy accuracy first reaches 0.97 (a dip after does not
    reset it); weak: at the first check that reaches 0.8. `stopped` tells a cap that came first."""
    from gopd.demo import TeacherStop

    checks = [(10, 0.5), (20, 0.85), (30, 0.97), (40, 0.9), (220, 0.99), (230, 1.0)]
    strong, weak = TeacherStop(), TeacherStop(weak=True)
    assert [strong(step, acc) for step, acc in checks[:-1]] == [False] * 5 and not strong.stopped
    assert strong.cap_note("teacher", 220) == ["teacher: the 220-step cap came before its rule "
                                               "(97% greedy, then 200 steps more)"]  # fmt: skip
    assert strong(*checks[-1]) and strong.stopped and strong.describe() == "97% greedy, then 200 steps more"
    assert strong.cap_note("teacher", 230) == []
    assert [weak(step, acc) for step, acc in checks[:2]] == [False, True] and weak.describe() == "80% greedy"


@pytest.mark.parametrize("lams", [[], [1.25, 1.25], [-1.0], [float("nan")]])
def test_demo_refuses_bad_lams_before_any_training(tmp_path, lams):
    from gopd.demo import run_demo

    with pytest.raises(ValueError, match="lam: one or more distinct finite numbers >= 0"):
        run_demo(tmp_path / "demo", quick=True, lams=lams)
    assert not (tmp_path / "demo").exists()


def test_merge_demo_quick_runs(tmp_path):
    from gopd.demo.merge import TASKS, run_merge_demo

    result = run_merge_demo(tmp_path / "merge", quick=True, lams=[1, 1.25])
    rows = ("teacher add", "teacher sub", "student before", "student after, lam 1", "student after, lam 1.25")
    assert set(result["avg"]) == set(rows)
    for row in rows:  # each domain's figure and the overall one, the mean of the two (as many prompts each)
        figures = result["avg"][row]
        assert set(figures) == {*TASKS, "both"} and all(0 <= v <= 1 for v in figures.values())
        assert figures["both"] == pytest.approx((figures["add"] + figures["sub"]) / 2)


def test_an_unusable_kernel_backend_fails_before_the_models_load(tiny, tmp_path, monkeypatch):
    """kernel_backend is resolved on the run's device first (here triton on a CPU without the
    interpreter), not at the first scoring after the loads and rollouts."""
    from gopd import trainer

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(trainer, "load_models", lambda cfg: pytest.fail("the models were loaded"))
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        train(base_config(tiny, tmp_path, kernel_backend="triton", device="cpu"))
