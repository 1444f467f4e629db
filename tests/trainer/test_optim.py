"""MasterWeightAdamW: a half-precision student's updates are kept in float32, a float16
one's loss dynamically scaled (gopd/optim.py)."""

from __future__ import annotations

import json

import pytest
import torch

from gopd.optim import LossScale, MasterWeightAdamW, ScaledAdamW
from gopd.trainer import train
from tests.trainer.conftest import base_config
from tests.trainer.test_end_to_end import changed, check_resume_continues_the_run, weights


def bf16_param(*values: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.bfloat16))


def descend(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        param.sum().backward()  # gradient 1 everywhere: AdamW moves each weight by ~lr a step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_small_updates_accumulate_in_the_masters():
    """lr 1e-5 against a bf16 step of 2^-8 at 1.0: plain AdamW on bf16 never moves the weight;
    the master moves 1e-5 a step, and the bf16 weight follows once the master has moved
    past half a rounding step."""
    plain, mixed = bf16_param(1.0, 0.5), bf16_param(1.0, 0.5)
    plain_opt = torch.optim.AdamW([plain], lr=1e-5, weight_decay=0.0)
    mixed_opt = MasterWeightAdamW([mixed], lr=1e-5, weight_decay=0.0)
    descend(plain, plain_opt, 300)
    descend(mixed, mixed_opt, 300)
    assert plain.tolist() == [1.0, 0.5]  # every update rounded away
    master = mixed_opt.masters[0]
    # 300 steps of lr each, to the float32 rounding of 300 additions
    torch.testing.assert_close(master, torch.tensor([1.0, 0.5]) - 300e-5, rtol=0, atol=1e-5)
    assert torch.equal(mixed, master.bfloat16())  # the weight is the master, rounded
    assert mixed.tolist() != [1.0, 0.5]


def test_micro_batch_gradients_add_up_in_float32():
    param = bf16_param(0.0, 0.0, 0.0)
    opt = MasterWeightAdamW([param], lr=1e-3)
    parts = [torch.tensor([1.0, 3.0, -2.0]), torch.tensor([2.0**-10, 1.0, 0.5])]
    for g in parts:
        (param * g.bfloat16()).sum().backward()
    assert param.grad is None  # moved into the master at once
    # in bf16, 1 + 2^-10 would round back to 1
    assert opt.masters[0].grad.tolist() == [1.0 + 2.0**-10, 4.0, -1.5]
    assert opt.masters[0].grad.dtype == torch.float32


def test_state_dict_restores_the_masters_not_their_rounding():
    a = bf16_param(1.0, -0.25)
    opt_a = MasterWeightAdamW([a], lr=1e-4)
    descend(a, opt_a, 5)
    state = opt_a.state_dict()
    b = bf16_param(1.0, -0.25)  # as a resumed run: the weights come back from a bf16 checkpoint
    opt_b = MasterWeightAdamW([b], lr=1e-4)
    opt_b.load_state_dict(state)
    assert torch.equal(opt_b.masters[0], opt_a.masters[0]) and torch.equal(b, a)
    descend(a, opt_a, 3)
    descend(b, opt_b, 3)
    assert torch.equal(opt_b.masters[0], opt_a.masters[0])
    with pytest.raises(ValueError, match="master_weights"):
        opt_b.load_state_dict(torch.optim.AdamW([bf16_param(1.0, 2.0)]).state_dict())


def test_bf16_training_updates_every_weight_and_resumes_exactly(tiny, tmp_path):
    """The official lr 1e-5 on a bf16 student: every trained weight's float32 master moves (the
    bf16 weights alone kept 15 % of their updates), and a resumed run continues the same."""

    check_resume_continues_the_run(tiny, tmp_path, dtype="bfloat16", lr=1e-5)
    start = weights(tiny["student"])
    step4 = tmp_path / "full" / "checkpoints" / "step_0000004"
    masters = torch.load(step4 / "trainer_state.pt", weights_only=False)["optimizer"]["master_weights"]
    initial = _params(start)
    moved = sum(int((m != w.float()).sum()) for m, w in zip(masters, initial, strict=True))
    assert moved == sum(w.numel() for w in initial)
    assert weights(step4)["model.norm.weight"].dtype == torch.bfloat16


def _params(state: dict) -> list[torch.Tensor]:
    """The state dict's tensors in model.parameters() order (tied lm_head left out)."""
    return [v for k, v in state.items() if k != "lm_head.weight"]


def test_gradient_checkpointing_feeds_the_masters_the_same_gradients(tiny, tmp_path):
    """The post-accumulate hooks see the same gradients under checkpointing's recomputed backward."""

    def masters(checkpointing: bool) -> list[torch.Tensor]:
        run = tmp_path / f"ckpt_{checkpointing}"
        train(base_config(tiny, tmp_path, dtype="bfloat16", steps=2, gradient_checkpointing=checkpointing,
                          output_dir=str(run)))  # fmt: skip
        state = torch.load(run / "checkpoints" / "step_0000002" / "trainer_state.pt", weights_only=False)
        return state["optimizer"]["master_weights"]

    plain, checkpointed = masters(False), masters(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed, strict=True))
    assert not torch.equal(plain[0], weights(tiny["student"])["model.embed_tokens.weight"].float())


def test_loss_scale_halves_on_overflow_and_doubles_after_a_clean_interval(monkeypatch):
    monkeypatch.setattr(LossScale, "GROWTH_INTERVAL", 3)
    scale = LossScale()
    scale.update(overflow=True)
    assert scale.scale == LossScale.INIT / 2
    for _ in range(2):
        scale.update(overflow=False)
    assert scale.scale == LossScale.INIT / 2
    scale.update(overflow=False)
    assert scale.scale == LossScale.INIT and scale.good_steps == 0
    for _ in range(40):
        scale.update(overflow=True)
    assert scale.scale == 1.0  # never below 1
    restored = LossScale()
    restored.load_state_dict(scale.state_dict())
    assert restored.state_dict() == {"scale": 1.0, "good_steps": 0}


def test_float16_gradients_are_unscaled_unless_they_overflowed():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float16))
    opt = MasterWeightAdamW([param], lr=1e-3)
    assert opt.loss_scale is not None and MasterWeightAdamW([bf16_param(1.0)]).loss_scale is None
    g = torch.tensor([2e-8, 1e-3])  # 2e-8 flushes to zero in float16 unless scaled
    assert g.half()[0] == 0
    (param * (g * opt.loss_scale.scale).half()).sum().backward()  # d/dparam: the scaled g
    assert opt.unscale_grads()
    torch.testing.assert_close(opt.masters[0].grad, g, rtol=1e-3, atol=0)
    opt.zero_grad(set_to_none=True)
    (param * torch.tensor([7e4, 1.0]).half()).sum().backward()  # 7e4 overflows float16 to inf
    assert not opt.unscale_grads() and torch.isinf(opt.masters[0].grad[0])
    assert opt.masters[0].grad[1] == 1.0  # nothing divided
    assert "loss_scale" in opt.state_dict()
    with pytest.raises(ValueError, match="loss scaling"):
        MasterWeightAdamW([bf16_param(1.0, -2.0)]).load_state_dict(opt.state_dict())


def test_float16_training_rides_out_overflows_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """From a scale far too large, the first steps overflow: each is skipped with the scale
    halved, without stopping the run (three bad steps would); then the student trains, and a
    resumed run continues from the saved scale."""
    monkeypatch.setattr(LossScale, "INIT", 2.0**20)  # this model's backward overflows above 2^15
    cfg = base_config(tiny, tmp_path, dtype="float16", steps=10, output_dir=str(tmp_path / "fp16"))
    train(cfg)
    records = [json.loads(x) for x in open(cfg.output_dir + "/metrics.jsonl")]
    steps = [r for r in records if r["kind"] == "train"]
    overflowed = [r["overflow"] for r in steps]
    first_clean = overflowed.index(False)
    assert 2 < first_clean < 10 and not any(overflowed[first_clean:])
    assert [r["loss_scale"] for r in steps[: first_clean + 1]] == [
        2.0**20 / 2**i for i in range(first_clean + 1)
    ]
    assert changed(weights(tiny["student"]), weights(tmp_path / "fp16" / "checkpoints" / "step_0000010"))
    # resumed after overflowed steps: the next steps run at the saved scale, not at INIT
    monkeypatch.setattr(LossScale, "INIT", 2.0**19)
    check_resume_continues_the_run(tiny, tmp_path, dtype="float16", lr=1e-4)

    def scales(run: str) -> list[float]:
        records = [json.loads(x) for x in open(tmp_path / run / "metrics.jsonl")]
        return [r["loss_scale"] for r in records if r["kind"] == "train"]

    full, resumed = scales("full"), scales("cut")
    assert full[0] == 2.0**19 and full[2] < 2.0**19  # steps 1-2 overflowed at least once
    assert resumed[-2:] == full[2:]


def test_scaled_adamw_state_keeps_its_loss_scale_and_refuses_a_state_without_one():
    """FSDP's float16 optimizer: its loss scale travels with its state; a state saved without
    one (another dtype's run) is a clear error, as MasterWeightAdamW's is."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = ScaledAdamW([w], agree=bool, lr=0.1)
    opt.loss_scale.scale, opt.loss_scale.good_steps = 512.0, 7
    state = opt.state_dict()
    again = ScaledAdamW([torch.nn.Parameter(torch.ones(3))], agree=bool, lr=0.1)
    again.load_state_dict(state)
    assert (again.loss_scale.scale, again.loss_scale.good_steps) == (512.0, 7)
    plain = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1).state_dict()
    with pytest.raises(ValueError, match="loss scaling"):
        again.load_state_dict(plain)
