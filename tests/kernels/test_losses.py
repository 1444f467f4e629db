"""gopd_advantage, aggregate_token_losses and gopd_loss against naive float64 references."""

from __future__ import annotations

import pytest
import torch

from gopd_kernels import aggregate_token_losses, gopd_advantage, gopd_loss, token_logprobs
from gopd_kernels.reference import gopd_loss_reference, token_logprobs_reference
from tests.kernels.helpers import rel_err

LAMS = [0.0, 0.5, 1.0, 1.25, 2.0]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def batch(b=3, t=7, d=16, v=97, device="cpu", seed=0, ignore=True):
    """A [B, T] batch with per-token teacher/ref/old/rollout log-probs; old far from the
    current policy so that clipping acts, rollout near old so IS weights vary around 1."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.4
    targets = torch.randint(0, v, (b, t), generator=g)
    if ignore:
        targets[0, -3:] = -100  # padding at the end of a sequence
        targets[-1, :2] = -100  # prompt positions
    s = token_logprobs_reference(hidden.double(), weight.double(), targets).float()
    teacher = s + torch.randn(b, t, generator=g) * 0.5
    ref = s + torch.randn(b, t, generator=g) * 0.3
    old = s + torch.randn(b, t, generator=g) * 0.4
    rollout = old + torch.randn(b, t, generator=g) * 0.5
    to = lambda x: x.to(device)
    return dict(hidden=to(hidden), weight=to(weight), targets=to(targets), teacher=to(teacher), ref=to(ref),
                old=to(old), rollout=to(rollout))  # fmt: skip


def run_loss(fn, data, dtype=torch.float32, scale=1.0, **kw):
    h = data["hidden"].detach().to(dtype, copy=True).requires_grad_()
    w = data["weight"].detach().to(dtype, copy=True).requires_grad_()
    out = fn(h, w, data["targets"], data["teacher"], data.get("ref_used"), **kw)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad, (out[1] if isinstance(out, tuple) else None)


def compare(data, backend, scale=1.7, **kw):
    ours = run_loss(lambda *a, **k: gopd_loss(*a, backend=backend, **k), data, scale=scale, **kw)
    on_cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    kw_cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    ref = run_loss(gopd_loss_reference, on_cpu, dtype=torch.float64, scale=scale, **kw_cpu)
    torch.testing.assert_close(ours[0].double().cpu(), ref[0], atol=1e-5, rtol=1e-5)
    assert rel_err(ours[1], ref[1]) <= 1e-4 and rel_err(ours[2], ref[2]) <= 1e-4
    return ours


# -- gopd_advantage -------------------------------------------------------------------


@pytest.mark.parametrize("lam", LAMS)
def test_advantage_formula(lam):
    g = torch.Generator().manual_seed(1)
    s, t, r = (torch.randn(4, 5, generator=g) for _ in range(3))
    adv = gopd_advantage(s, t, r, lam=lam)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, lam * (t - r) - (s - r))
    torch.testing.assert_close(adv, (t - s) + (lam - 1) * (t - r))  # the method notes' second form


def test_advantage_without_reference_is_opd():
    s, t = torch.randn(6), torch.randn(6)
    torch.testing.assert_close(gopd_advantage(s, t), t - s)
    with pytest.raises(ValueError, match="ref_logp is required"):
        gopd_advantage(s, t, lam=1.25)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lam=-0.1), "lam"),
        (dict(lam=float("nan")), "lam"),
        (dict(lam=float("inf")), "lam"),
        (dict(lam="1"), "lam"),
        (dict(teacher_logp=torch.randn(5)), "teacher_logp"),
        (dict(ref_logp=torch.randn(7)), "ref_logp"),
        (dict(teacher_logp=torch.zeros(6, dtype=torch.long)), "teacher_logp"),
    ],
)
def test_advantage_bad_inputs(kwargs, match):
    args = dict(student_logp=torch.randn(6), teacher_logp=torch.randn(6), ref_logp=torch.randn(6), lam=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gopd_advantage(args.pop("student_logp"), args.pop("teacher_logp"), args.pop("ref_logp"), **args)


# -- aggregation ----------------------------------------------------------------------


def test_aggregation_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    assert aggregate_token_losses(loss, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert aggregate_token_losses(loss, mask, "token-mean", num_tokens=7).item() == pytest.approx(1.0)
    assert aggregate_token_losses(loss, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate_token_losses(loss, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)


def test_aggregation_keeps_nan_at_padding_out():
    loss = torch.tensor([1.0, float("nan")], requires_grad=True)
    out = aggregate_token_losses(loss, torch.tensor([True, False]))
    out.backward()
    assert out.item() == 1.0 and torch.isfinite(loss.grad).all()


# -- gopd_loss ------------------------------------------------------------------------


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_off_policy_with_clipping_and_is_matches_reference(lam, loss_agg):
    data = batch()
    data["ref_used"] = data["ref"]
    _, _, _, stats = compare(
        data, "torch", lam=lam, temperature=0.7, old_logp=data["old"], rollout_logp=data["rollout"],
        clip_ratio=(0.2, 0.28), is_cap=1.5, loss_agg=loss_agg,
    )  # fmt: skip
    assert 0 < stats["clip_frac"] < 1  # clipping really acts in this batch
    assert stats["is_weight_max"] == pytest.approx(1.5)  # and the cap too
    assert stats["num_tokens"] == (data["targets"] != -100).sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_is_reinforce_with_per_token_advantage(backend, device):
    """o = s.detach(): rho = 1, loss = -mean(A), grad = -mean(A grad s)."""
    dev = device if backend == "triton" else torch.device("cpu")
    data = batch(device=dev)
    data["ref_used"] = data["ref"]
    loss, dh, dw, stats = run_loss(
        lambda *a, **k: gopd_loss(*a, backend=backend, **k), data, lam=1.25, temperature=0.9
    )
    mask = data["targets"] != -100
    s = token_logprobs(data["hidden"], data["weight"], data["targets"], temperature=0.9, backend=backend)
    adv = gopd_advantage(s, data["teacher"], data["ref"], lam=1.25)
    torch.testing.assert_close(loss, -(adv * mask).sum() / mask.sum())
    torch.testing.assert_close(stats["advantage"], (adv * mask).sum() / mask.sum())
    assert stats["clip_frac"] == 0
    h = data["hidden"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    s = token_logprobs(h, w, data["targets"], temperature=0.9, backend=backend)
    s.backward(-(adv * mask) / mask.sum())
    torch.testing.assert_close(dh, h.grad)
    torch.testing.assert_close(dw, w.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_on_both_backends(backend, device):
    dev = device if backend == "triton" else torch.device("cpu")
    data = batch(b=2, t=9, d=17, v=211, device=dev, seed=4)
    data["ref_used"] = data["ref"]
    compare(
        data,
        backend,
        lam=1.25,
        temperature=1.3,
        old_logp=data["old"],
        rollout_logp=data["rollout"],
        is_cap=5.0,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "fold, trained, softcap",  # fold=True needs a gradient on the head
    [(fold, trained, softcap) for fold in (True, False, None) for trained in ("head", "bias", "none")
     for softcap in (None, 3.0) if not (fold and trained == "none")],
)  # fmt: skip
def test_head_bias_matches_reference(backend, fold, trained, softcap, device):
    """An LM head with a bias (Phi-style) and a logit multiplier (logit_scale, as Granite's):
    folded, recomputed, and with the head frozen (the frozen-head fold), the bias alone trained,
    every gradient against float64, off-policy with clipping and IS weights so that dL/ds
    varies per token. softcap: a soft-capped head (Gemma 2's), folded (trained) or recomputed
    (frozen) too."""
    dev = device if backend == "triton" else torch.device("cpu")
    data = batch(b=2, t=9, d=17, v=211, device=dev, seed=6)
    bias = (torch.randn(211, generator=torch.Generator().manual_seed(6)) * 0.8).to(dev)
    kw = dict(lam=1.25, temperature=1.3, logit_scale=0.5, logit_softcap=softcap, old_logp=data["old"],
              rollout_logp=data["rollout"], is_cap=5.0)  # fmt: skip
    grads = {}
    for name, fn, dtype in (("ours", lambda *a, **k: gopd_loss(*a, backend=backend, fold=fold, **k), None),
                            ("reference", gopd_loss_reference, torch.float64)):  # fmt: skip

        def on(t, dtype=dtype):  # the reference's float64 CPU copies; ours as given
            return t.cpu().to(dtype) if dtype else t

        h = on(data["hidden"]).detach().clone().requires_grad_()
        w = on(data["weight"]).detach().clone().requires_grad_(trained == "head")
        b = on(bias).detach().clone().requires_grad_(trained in ("head", "bias"))
        per = {k: on(v) if dtype else v for k, v in kw.items() if isinstance(v, torch.Tensor)}
        out = fn(h, w, on(data["targets"]), on(data["teacher"]), on(data["ref"]), bias=b, **(kw | per))
        loss = out[0] if isinstance(out, tuple) else out
        (loss * 1.7).backward()
        grads[name] = (loss.detach(), h.grad, w.grad, b.grad)
    ours, want = grads["ours"], grads["reference"]
    torch.testing.assert_close(ours[0].double().cpu(), want[0], atol=1e-5, rtol=1e-5)
    for got, exp in zip(ours[1:], want[1:], strict=True):
        assert (got is None) == (exp is None)
        if exp is not None:
            assert rel_err(got, exp) <= 1e-4


def test_lam_one_makes_reference_irrelevant():
    data = batch()
    results = []
    for ref in (None, data["ref"], data["ref"] + 3.0):
        data["ref_used"] = ref
        results.append(run_loss(gopd_loss, data, lam=1.0, old_logp=data["old"]))
    for other in results[1:]:
        for a, b in zip(results[0][:3], other[:3], strict=True):
            torch.testing.assert_close(a, b)


def test_num_tokens_makes_micro_batches_add_up():
    data = batch(b=4, t=6)
    data["ref_used"] = data["ref"]
    whole = run_loss(gopd_loss, data, lam=1.25)
    total = int((data["targets"] != -100).sum())
    parts = []
    for rows in (slice(0, 1), slice(1, 4)):  # uneven token counts per micro-batch
        part = {k: v[rows] if k != "weight" else v for k, v in data.items()}
        parts.append(run_loss(gopd_loss, part, lam=1.25, num_tokens=total))
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole[0])
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), whole[1])
    torch.testing.assert_close(parts[0][2] + parts[1][2], whole[2])


def test_stats_values():
    data = batch()
    data["ref_used"] = data["ref"]
    _, _, _, stats = run_loss(gopd_loss, data, lam=1.25, old_logp=data["old"], rollout_logp=data["rollout"])
    mask = data["targets"] != -100
    s = token_logprobs_reference(data["hidden"], data["weight"], data["targets"])
    mean = lambda x: (x * mask).sum() / mask.sum()
    torch.testing.assert_close(stats["reverse_kl"], mean(s - data["teacher"]))
    torch.testing.assert_close(stats["reward"], mean(data["teacher"] - data["ref"]))
    torch.testing.assert_close(stats["rollout_mismatch"], mean(data["old"] - data["rollout"]))
    assert "is_weight_mean" not in stats  # no is_cap: no importance weighting, none reported
    assert all(not v.requires_grad for v in stats.values())


BAD_LOSS = {
    "lam-negative": (dict(lam=-1.0), "lam"),
    "ref-missing": (dict(ref_logp=None, lam=1.25), "ref_logp is required"),
    "teacher-shape": (dict(teacher_logp=torch.zeros(3, 6)), "teacher_logp"),
    "old-shape": (dict(old_logp=torch.zeros(3)), "old_logp"),
    "rollout-int": (dict(rollout_logp=torch.zeros(3, 7, dtype=torch.long)), "rollout_logp"),
    "is-cap-without-rollout": (dict(is_cap=5.0), "rollout_logp"),
    "is-cap-zero": (dict(is_cap=0.0, rollout_logp=torch.zeros(3, 7)), "is_cap"),
    "clip-low-one": (dict(clip_ratio=(1.0, 0.2)), "clip_ratio"),
    "clip-negative": (dict(clip_ratio=(0.2, -0.1)), "clip_ratio"),
    "clip-three": (dict(clip_ratio=(0.1, 0.2, 0.3)), "clip_ratio"),
    "loss-agg-unknown": (dict(loss_agg="sum"), "loss_agg"),
    "num-tokens-seq-mode": (dict(loss_agg="seq-mean-token-sum", num_tokens=10), "num_tokens"),
    "num-tokens-zero": (dict(num_tokens=0), "num_tokens"),
    "temperature-zero": (dict(temperature=0.0), "temperature"),
    "logit-scale-negative": (dict(logit_scale=-2.0), "logit_scale"),
    "logit-softcap-negative": (dict(logit_softcap=-30.0), "logit_softcap"),
    "targets-out-of-range": (dict(targets=torch.full((3, 7), 97)), "targets"),
    "bias-shape": (dict(bias=torch.zeros(96)), "bias"),
    "bias-dtype": (dict(bias=torch.zeros(97, dtype=torch.float64)), "bias"),
}


@pytest.mark.parametrize("case", BAD_LOSS, ids=list(BAD_LOSS))
def test_gopd_loss_bad_inputs(case):
    data = batch()
    args = dict(hidden=data["hidden"], weight=data["weight"], targets=data["targets"],
                teacher_logp=data["teacher"], ref_logp=data["ref"])  # fmt: skip
    overrides, match = BAD_LOSS[case]
    args.update(overrides)
    with pytest.raises(ValueError, match=match):
        gopd_loss(
            args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("teacher_logp"), **args
        )


def test_seq_modes_need_two_dims():
    data = batch()
    flat = {k: v.reshape(-1, *v.shape[2:]) if k != "weight" else v for k, v in data.items()}
    with pytest.raises(ValueError, match="B, T"):
        gopd_loss(
            flat["hidden"], flat["weight"], flat["targets"], flat["teacher"], loss_agg="seq-mean-token-mean"
        )
