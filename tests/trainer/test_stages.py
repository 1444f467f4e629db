"""Scoring (per-domain teachers, the student's own log-probs) and the update (exact
accumulation over micro-batches; several updates over mini-batches)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from gopd.data import PromptSampler, load_examples
from gopd.models import head_bias, head_weight, load_models, logits_of
from gopd.rollout import IGNORE, make_engine
from gopd.scoring import response_hidden, score_rollouts, student_logprobs
from gopd.update import make_optimizer, make_scheduler, policy_update, update_step
from gopd_kernels import frozen_logprobs, token_logprobs
from gopd_kernels.hf import mask_position_ids
from gopd_kernels.reference import policy_loss_reference
from tests.trainer.conftest import base_config, give_heads_a_bias, transformed_model_dir


def rollouts_for(cfg, models, n=8):
    examples = load_examples(cfg.train_data, cfg, models.tokenizer, 64)
    torch.manual_seed(0)
    return make_engine(cfg, models.student, models.tokenizer).generate(
        PromptSampler(examples, 0).next_batch(n), 2, 1.0
    )


def test_each_row_is_scored_by_its_domain_teacher(tiny, tmp_path):
    teachers = {"math": str(tiny["teacher"]), "code": str(tiny["teacher_b"])}
    cfg = base_config(
        tiny, tmp_path, teachers=teachers, train_data=str(tiny["train_domains"]), micro_batch_size=3
    )
    models = load_models(cfg)
    ro = rollouts_for(cfg, models)
    scores = score_rollouts(models, ro, cfg)
    assert {e.domain for e in ro.examples} == {"math", "code"}
    for i, ex in enumerate(ro.examples):
        teacher, ref = models.teachers[ex.domain], models.reference
        one = ro.select([i])
        with torch.no_grad():
            want = frozen_logprobs(response_hidden(teacher, one), head_weight(teacher), one.targets,
                                   response_hidden(ref, one), head_weight(ref), backend="torch")  # fmt: skip
        torch.testing.assert_close(scores.teacher_logp[i], want.teacher_logp[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores.ref_logp[i], want.ref_logp[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective", ["sampled", "dense"])
def test_offloaded_models_move_once_per_domain_not_per_micro_batch(tiny, tmp_path, objective):
    """offload_frozen: each domain's teacher and the reference come to the device once per
    stage (scoring, or the dense update), whatever the number of micro-batches."""
    teachers = {"math": str(tiny["teacher"]), "code": str(tiny["teacher_b"])}
    cfg = base_config(tiny, tmp_path, teachers=teachers, train_data=str(tiny["train_domains"]),
                      micro_batch_size=2, offload_frozen=True, objective=objective,
                      is_cap=5.0 if objective == "sampled" else None)  # fmt: skip
    models = load_models(cfg)
    ro = rollouts_for(cfg, models)  # 16 rows: 4 micro-batches per domain
    moves = []
    for name, m in [*models.teachers.items(), ("reference", models.reference)]:
        to = m.to
        m.to = lambda *a, _to=to, _name=name, **k: moves.append((_name, str(a[0]))) or _to(*a, **k)
    if objective == "sampled":
        scores = score_rollouts(models, ro, cfg)
        assert scores.teacher_logp.abs().sum() > 0
    else:
        opt = make_optimizer(models.student, cfg)
        policy_update(models, ro, None, opt, make_scheduler(opt, cfg, 1), cfg)
    per_domain = lambda d: [(d, "cpu"), ("reference", "cpu")] * 2  # there and back (device: cpu)
    assert sorted(moves) == sorted(per_domain("math") + per_domain("code"))


def test_lam_one_loads_no_reference(tiny, tmp_path):
    models = load_models(base_config(tiny, tmp_path, lam=1.0))
    assert models.reference is None


@pytest.mark.parametrize("objective", ["sampled", "dense"])
def test_a_multi_teacher_update_reports_each_domains_stats(tiny, tmp_path, objective):
    """reward/math, reverse_kl/code, ...: each domain's token-weighted means, which combine,
    weighted by the domains' tokens, into the overall figure; maxima per domain too."""
    teachers = {"math": str(tiny["teacher"]), "code": str(tiny["teacher_b"])}
    cfg = base_config(tiny, tmp_path, teachers=teachers, train_data=str(tiny["train_domains"]),
                      micro_batch_size=3, objective=objective,
                      is_cap=None if objective == "dense" else 5.0)  # fmt: skip
    models = load_models(cfg)
    ro = rollouts_for(cfg, models)
    scores = score_rollouts(models, ro, cfg) if objective == "sampled" else None
    opt = make_optimizer(models.student, cfg)
    _, stats, stepped = policy_update(models, ro, scores, opt, make_scheduler(opt, cfg, 3), cfg)
    assert stepped
    tokens = {d: float(ro.response_mask[[e.domain == d for e in ro.examples]].sum()) for d in teachers}
    names = ("reward", "reverse_kl", "advantage") if objective == "sampled" else ("kl", "kl_teacher")
    for name in names:
        combined = sum(stats[f"{name}/{d}"] * tokens[d] for d in teachers) / sum(tokens.values())
        assert stats[name] == pytest.approx(combined, rel=1e-5, abs=1e-7), name
    assert stats[f"{names[0]}/math"] != stats[f"{names[0]}/code"]  # two teachers, two figures
    if objective == "sampled":
        assert stats["is_weight_max"] == max(stats["is_weight_max/math"], stats["is_weight_max/code"])


@pytest.mark.parametrize("objective", ["sampled", "dense"])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_add_up_to_the_whole_batch(tiny, tmp_path, objective, loss_agg):
    grads, losses = [], []
    for micro in (16, 3):  # one micro-batch vs six uneven ones
        cfg = base_config(tiny, tmp_path, micro_batch_size=micro, loss_agg=loss_agg, objective=objective,
                          is_cap=None if objective == "dense" else 5.0, grad_clip=None)  # fmt: skip
        models = load_models(cfg)
        ro = rollouts_for(cfg, models)
        scores = score_rollouts(models, ro, cfg) if objective == "sampled" else None
        sgd = torch.optim.SGD(models.student.parameters(), lr=0.0)  # look at the gradients only
        loss, stats, stepped = policy_update(models, ro, scores, sgd, make_scheduler(sgd, cfg, 3), cfg)
        assert stepped and stats["grad_norm"] > 0
        losses.append(loss)
        grads.append(stats["grad_norm"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0] == pytest.approx(grads[1], rel=1e-4)


def test_student_logprobs_are_the_students_own(tiny, tmp_path):
    """o_t against a float64 log-softmax of the student's materialised logits."""
    cfg = base_config(tiny, tmp_path, micro_batch_size=3, temperature=0.7)
    models = load_models(cfg)
    ro = rollouts_for(cfg, models)
    old = student_logprobs(models, ro, cfg)
    with torch.no_grad():
        logits = response_hidden(models.student, ro).double() @ head_weight(models.student).double().T
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, ro.responses[..., None]).squeeze(-1)
    valid = ro.response_mask
    torch.testing.assert_close(old[valid].double(), expected[valid], rtol=1e-5, atol=1e-5)
    assert not old[~valid].any()


@pytest.mark.parametrize("objective", ["sampled", "dense"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_a_biased_student_head_is_scored_and_trained_with_its_bias(
    tiny, tmp_path, monkeypatch, objective, backend
):
    """Phi-style heads (the student's, the teacher's and the reference's have a bias), ExOPD:
    the student's o_t against its own materialised logits, bias included, and two updates per
    batch (the second off-policy, so that the sampled loss reads o_t) move the bias."""
    give_heads_a_bias(monkeypatch, student=True, frozen=True)
    cfg = base_config(tiny, tmp_path, objective=objective, temperature=0.7, prompts_per_step=8,
                      mini_batch_prompts=4, lr=0.05, lam=1.25, reference=str(tiny["reference"]),
                      is_cap=5.0 if objective == "sampled" else None, kernel_backend=backend)  # fmt: skip
    models = load_models(cfg)
    head = models.student.lm_head
    ro = rollouts_for(cfg, models)
    old = student_logprobs(models, ro, cfg)
    with torch.no_grad():
        logits = response_hidden(models.student, ro).double() @ head.weight.double().T + head.bias.double()
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, ro.responses[..., None]).squeeze(-1)
    valid = ro.response_mask
    torch.testing.assert_close(old[valid].double(), expected[valid], rtol=1e-5, atol=1e-5)
    bias_before = head.bias.detach().clone()
    opt = make_optimizer(models.student, cfg)
    scores = score_rollouts(models, ro, cfg) if objective == "sampled" else None
    updates = update_step(models, ro, scores, opt, make_scheduler(opt, cfg, 3), cfg)
    assert len(updates) == 2 and all(stepped and math.isfinite(loss) for loss, _, stepped in updates)
    assert not torch.equal(head.bias.detach(), bias_before)


def _updates(tiny, tmp_path, monkeypatch, objective="sampled", **overrides):
    """update_step on 8 prompts x 2 samples, with student_logprobs' calls recorded: the
    student's weights when it ran, and what it returned."""
    import gopd.update

    calls = []

    def recorded(models, rollouts, cfg, ctx):
        weights = [p.detach().clone() for p in models.student.parameters()]
        calls.append((weights, student_logprobs(models, rollouts, cfg, ctx)))
        return calls[-1][1]

    monkeypatch.setattr(gopd.update, "student_logprobs", recorded)
    cfg = base_config(tiny, tmp_path, prompts_per_step=8, objective=objective, lr=0.05,
                      is_cap=None if objective == "dense" else 5.0, **overrides)  # fmt: skip
    models = load_models(cfg)
    initial = [p.detach().clone() for p in models.student.parameters()]
    ro = rollouts_for(cfg, models)
    scores = score_rollouts(models, ro, cfg) if objective == "sampled" else None
    opt = make_optimizer(models.student, cfg)
    scheduler = make_scheduler(opt, cfg, 3 * cfg.updates_per_step)
    return update_step(models, ro, scores, opt, scheduler, cfg), calls, initial, (ro, scores, scheduler)


def test_one_update_per_batch_is_on_policy(tiny, tmp_path, monkeypatch):
    updates, calls, _, (_, _, scheduler) = _updates(tiny, tmp_path, monkeypatch)
    assert len(updates) == 1 and updates[0][2] and not calls  # no extra forward for o
    assert scheduler.last_epoch == 1 and updates[0][1]["clip_frac"] == 0


def test_an_update_logs_the_students_entropy_over_the_response_tokens(tiny, tmp_path, monkeypatch):
    """The logged entropy is the student's, before the update, over the sampled tokens: as
    token_logprobs gives it from the same student (loaded afresh, as it was)."""
    updates, _, _, (ro, _, _) = _updates(tiny, tmp_path, monkeypatch)
    cfg = base_config(tiny, tmp_path, prompts_per_step=8, lr=0.05)
    student = load_models(cfg).student
    with torch.no_grad():
        hidden = response_hidden(student, ro)
        _, entropy = token_logprobs(
            hidden, head_weight(student), ro.targets, bias=head_bias(student), temperature=cfg.temperature,
            **logits_of(student).kwargs(), ignore_index=IGNORE, return_entropy=True,
        )  # fmt: skip
    want = float(entropy[ro.targets != IGNORE].mean())
    assert want > 0.1 and updates[0][1]["entropy"] == pytest.approx(want, rel=1e-4)


def test_mini_batches_and_epochs_each_take_an_update_off_policy_after_the_first(tiny, tmp_path, monkeypatch):
    updates, calls, initial, (ro, scores, scheduler) = _updates(
        tiny, tmp_path, monkeypatch, mini_batch_prompts=4, update_epochs=2
    )
    assert len(updates) == 4 and all(stepped for _, _, stepped in updates) and scheduler.last_epoch == 4
    # o: computed once, from the student before its first update
    ((weights, old),) = calls
    assert all(torch.equal(a, b) for a, b in zip(weights, initial, strict=True))
    # the first update is the on-policy update of the first mini-batch (prompts 0-3: rows 0-7)
    cfg = base_config(tiny, tmp_path, prompts_per_step=4, lr=0.05)
    models = load_models(cfg)
    opt = make_optimizer(models.student, cfg)
    first = ro.select(list(range(8)))
    loss, stats, _ = policy_update(
        models, first, scores.select(list(range(8))), opt, make_scheduler(opt, cfg, 3), cfg
    )
    assert updates[0][0] == pytest.approx(loss, rel=1e-5)
    assert updates[0][1]["grad_norm"] == pytest.approx(stats["grad_norm"], rel=1e-4)
    assert updates[0][1]["clip_frac"] == 0  # s = o before any update
    # the later ones see the moved student through the PPO ratio against o, and clip
    assert max(u[1]["clip_frac"] for u in updates[1:]) > 0


def test_dense_updates_need_no_old_logprobs(tiny, tmp_path, monkeypatch):
    updates, calls, _, _ = _updates(tiny, tmp_path, monkeypatch, "dense", mini_batch_prompts=4)
    assert len(updates) == 2 and all(stepped for _, _, stepped in updates) and not calls


@pytest.mark.parametrize("objective", ["sampled", "dense"])
def test_freeze_lm_head_fixes_the_tied_head_and_trains_the_rest(tiny, tmp_path, objective, caplog):
    grad_norms = []
    for checkpointing in (False, True):
        cfg = base_config(tiny, tmp_path, freeze_lm_head=True, gradient_checkpointing=checkpointing,
                          objective=objective, is_cap=None if objective == "dense" else 5.0)  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gopd"):
            models = load_models(cfg)
        assert "tied to the input embeddings" in caplog.text  # the tiny Qwen3 ties them, as small Qwen3s do
        student = models.student
        layers = [m for m in student.modules() if getattr(m, "gradient_checkpointing", False)]
        assert bool(layers) == checkpointing
        # non-reentrant, whatever this transformers release defaults to
        assert all(m._gradient_checkpointing_func.keywords == {"use_reentrant": False} for m in layers)
        head = head_weight(student).detach().clone()
        trainable = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        optimizer = make_optimizer(student, cfg)
        assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(
            p.numel() for p in trainable.values()
        )
        ro = rollouts_for(cfg, models)
        scores = score_rollouts(models, ro, cfg) if objective == "sampled" else None
        scheduler = make_scheduler(optimizer, cfg, 3)
        _, stats, stepped = policy_update(models, ro, scores, optimizer, scheduler, cfg)
        assert stepped
        grad_norms.append(stats["grad_norm"])
        assert torch.equal(head_weight(student), head)
        # every other tensor moved: with reentrant checkpointing, nothing trainable before the
        # layers and no input-grad hook, they would get no gradient and stay where they were
        params = dict(student.named_parameters())
        moved = [n for n in trainable if not torch.equal(params[n], trainable[n])]
        assert moved == list(trainable) and len(moved) > 1
    assert grad_norms[1] == pytest.approx(grad_norms[0], rel=1e-5)  # checkpointing changes no gradient


def test_non_finite_loss_skips_the_step(tiny, tmp_path):
    cfg = base_config(tiny, tmp_path)
    models = load_models(cfg)
    ro = rollouts_for(cfg, models)
    scores = score_rollouts(models, ro, cfg)
    scores.teacher_logp[0, 0] = float("nan")
    before = [p.detach().clone() for p in models.student.parameters()]
    opt = make_optimizer(models.student, cfg)
    loss, _, stepped = policy_update(models, ro, scores, opt, make_scheduler(opt, cfg, 3), cfg)
    assert not stepped and loss != loss  # NaN
    assert all(torch.equal(a, b) for a, b in zip(before, models.student.parameters(), strict=True))


@pytest.mark.parametrize("objective", ["sampled", "dense"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_loss_fold_reaches_the_loss_and_both_paths_agree(tiny, tmp_path, objective, backend, monkeypatch):
    """loss_fold true / false: the update folds the gradient or recomputes the logits (seen by
    a spy on the two folded Functions), to the same loss and gradient norm."""
    from gopd_kernels import losses

    folded = []
    for fn in (losses.FoldedTokenLoss, losses.FoldedDenseKL):
        monkeypatch.setattr(fn, "apply", lambda *a, real=fn.apply: folded.append(1) or real(*a))
    out = {}
    for fold in (True, False):
        folded.clear()
        cfg = base_config(tiny, tmp_path, objective=objective, is_cap=None if objective == "dense" else 5.0,
                          kernel_backend=backend, loss_fold=fold, grad_clip=None)  # fmt: skip
        models = load_models(cfg)
        ro = rollouts_for(cfg, models)
        scores = score_rollouts(models, ro, cfg) if objective == "sampled" else None
        sgd = torch.optim.SGD(models.student.parameters(), lr=0.0)
        loss, stats, _ = policy_update(models, ro, scores, sgd, make_scheduler(sgd, cfg, 3), cfg)
        assert bool(folded) == fold
        out[fold] = (loss, stats["grad_norm"])
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-5)
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-4)


def own_log_softmax(model, ro, temperature: float) -> torch.Tensor:
    """[B, R, V] float64: the model's own logits (its forward, scale included) at the response
    positions, log-softmaxed at the temperature; with the graph to its parameters."""
    mask = ro.attention_mask
    logits = model(input_ids=ro.sequences, attention_mask=mask, position_ids=mask_position_ids(mask)).logits
    return torch.log_softmax(logits[:, ro.prompt_len - 1 : -1].double() / temperature, -1)


@pytest.mark.parametrize(
    "family, objective",
    [("granite", "sampled"), ("granite", "dense"), ("gemma2", "sampled"), ("gemma2", "dense")],
)
def test_transformed_logits_are_scored_and_trained_as_the_models_forward_gives_them(
    tiny, tmp_path, family, objective
):
    """Student, teacher and reference with three logit transforms each (Granites: logits_scaling
    4, 8, 2; Gemma 2s: soft-caps 8, 5, 12, their largest logits about 5, which the caps bend): the
    scores, the loss and the gradient's norm as the models' materialised logits give them (no
    IS weight: these rollouts were sampled at another temperature)."""
    root = tmp_path / family
    roles = (("student", 0, 4.0), ("teachers", 1, 8.0), ("reference", 2, 2.0))
    if family == "gemma2":
        roles = (("student", 0, 8.0), ("teachers", 1, 5.0), ("reference", 2, 12.0))
    paths = {role: transformed_model_dir(root / role, family, seed, value) for role, seed, value in roles}
    cfg = base_config(tiny, tmp_path, **paths, lam=1.25, temperature=0.7, objective=objective, grad_clip=None,
                      is_cap=None)  # fmt: skip
    models = load_models(cfg)
    teacher, ref = models.teachers["default"], models.reference
    transforms = [logits_of(m) for m in (models.student, teacher, ref)]
    if family == "granite":
        assert transforms == [(0.25, None), (0.125, None), (0.5, None)]
    else:
        assert transforms == [(1.0, 8.0), (1.0, 5.0), (1.0, 12.0)]
    ro = rollouts_for(cfg, models)
    valid = ro.response_mask
    at_targets = lambda logp: logp.gather(-1, ro.responses[..., None]).squeeze(-1)  # noqa: E731
    with torch.no_grad():
        log_pt, log_pr = own_log_softmax(teacher, ro, 0.7), own_log_softmax(ref, ro, 0.7)
    models.student.zero_grad()
    log_ps = own_log_softmax(models.student, ro, 0.7)
    if objective == "sampled":
        scores = score_rollouts(models, ro, cfg)
        for got, want in ((scores.teacher_logp, at_targets(log_pt)), (scores.ref_logp, at_targets(log_pr))):
            torch.testing.assert_close(got[valid].double(), want[valid], rtol=1e-5, atol=1e-5)
        s, t, r = (torch.where(valid, at_targets(logp), 0.0) for logp in (log_ps, log_pt, log_pr))
        want_loss = policy_loss_reference(s, ro.targets, t, r, lam=1.25)
    else:
        scores = None
        log_q = torch.log_softmax(1.25 * log_pt - 0.25 * log_pr, -1)
        kl = (log_ps.exp() * (log_ps - log_q)).sum(-1)
        want_loss = kl[valid].mean()
    want_loss.backward()
    want_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in models.student.parameters()))
    models.student.zero_grad()
    sgd = torch.optim.SGD(models.student.parameters(), lr=0.0)
    loss, stats, stepped = policy_update(models, ro, scores, sgd, make_scheduler(sgd, cfg, 3), cfg)
    assert stepped
    if objective == "dense":  # the sampled loss on-policy is -mean(A), whatever the student's scale
        assert loss == pytest.approx(want_loss.item(), abs=1e-7)  # fp32 sums: KL ~ 2e-3 of lse ~ 3
    assert stats["grad_norm"] == pytest.approx(float(want_norm), rel=1e-4)
