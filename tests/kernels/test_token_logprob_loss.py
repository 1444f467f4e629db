"""token_logprob_loss: any per-token loss of the sampled tokens' log-probs, folded or not,
against a float64 reference (materialised logits, the same loss_fn, autograd)."""

from __future__ import annotations

import pytest
import torch

from gopd_kernels import gopd_loss, token_logprob_loss
from gopd_kernels import losses as losses_module
from gopd_kernels.losses import LOSS_AGGS, aggregate_token_losses, gopd_advantage
from gopd_kernels.reference import token_logprobs_reference
from tests.kernels.helpers import rel_err
from tests.kernels.test_losses import BACKENDS, batch


def clipped_surrogate(s, advantages, old, low=0.2, high=0.28):
    """A DAPO-style clipped surrogate with the caller's advantages (per token)."""
    ratio = torch.exp(s - old.to(s.dtype))
    adv = advantages.to(s.dtype)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - low, 1 + high))


def weighted_nll(s, weights):
    return -weights.to(s.dtype) * s


def reference(data, loss_fn, per_token, bias=None, loss_agg="token-mean", num_tokens=None, **kw):
    """float64: materialised logits, loss_fn on every position (masked out after), autograd."""
    to64 = lambda t: None if t is None else t.detach().cpu().double().requires_grad_()
    h, w, b = to64(data["hidden"]), to64(data["weight"]), to64(bias)
    targets = data["targets"].cpu()
    s = token_logprobs_reference(h, w, targets, bias=b, **kw)
    per = [None if t is None else t.cpu().double() for t in per_token]
    loss = aggregate_token_losses(loss_fn(s, *per), targets != -100, loss_agg, num_tokens)
    loss.backward()
    return loss.detach(), s.detach(), h.grad, w.grad, None if b is None else b.grad


def ours(data, loss_fn, per_token, bias=None, trained=("hidden", "weight", "bias"), **kw):
    leaf = lambda t, name: None if t is None else t.detach().clone().requires_grad_(name in trained)
    h, w, b = leaf(data["hidden"], "hidden"), leaf(data["weight"], "weight"), leaf(bias, "bias")
    loss, logp, *entropy = token_logprob_loss(h, w, data["targets"], loss_fn, per_token, bias=b, **kw)
    assert not logp.requires_grad and logp.shape == data["targets"].shape
    loss.backward()
    return loss.detach(), logp, h.grad, w.grad, None if b is None else b.grad, *entropy


def assert_matches(got, want, trained=("hidden", "weight", "bias")):
    torch.testing.assert_close(got[0].double().cpu(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1].double().cpu(), want[1], atol=1e-5, rtol=1e-5)
    for name, g, w in zip(("hidden", "weight", "bias"), got[2:], want[2:], strict=True):
        if name not in trained or w is None:
            assert g is None
        else:
            assert rel_err(g.cpu(), w) <= 1e-4, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fold", [None, True, False])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_clipped_surrogate_matches_reference(backend, fold, loss_agg, tiny_chunks, device):
    dev = device if backend == "triton" else torch.device("cpu")
    data = batch(b=3, t=7, d=17, v=211, device=dev, seed=11)
    advantages = torch.randn(3, 7, generator=torch.Generator().manual_seed(3)).to(dev)
    bias = (torch.randn(211, generator=torch.Generator().manual_seed(4)) * 0.5).to(dev)
    per_token = (advantages, data["old"])
    kw = dict(temperature=0.8, logit_scale=1.5)
    got = ours(data, clipped_surrogate, per_token, bias, backend=backend, fold=fold, loss_agg=loss_agg, **kw)
    assert_matches(got, reference(data, clipped_surrogate, per_token, bias, loss_agg=loss_agg, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trained", [("hidden",), ("weight",), ("bias",)], ids=lambda t: t[0])
def test_one_input_trained_soft_capped(backend, trained, device):
    """A frozen head (dH only) takes token_logprobs' frozen-head fold; a head alone, or its bias
    alone, the loss's fold; a soft-capped head (c = 3) throughout; num_tokens of a larger batch."""
    dev = device if backend == "triton" else torch.device("cpu")
    data = batch(b=2, t=9, d=16, v=97, device=dev, seed=12)
    bias = (torch.randn(97, generator=torch.Generator().manual_seed(5)) * 0.5).to(dev)
    weights = torch.rand(2, 9, generator=torch.Generator().manual_seed(6)).to(dev)
    kw = dict(logit_softcap=3.0, num_tokens=40)
    got = ours(data, weighted_nll, [weights], bias, trained=trained, backend=backend, **kw)
    assert_matches(got, reference(data, weighted_nll, [weights], bias, **kw), trained)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fold", [True, False])
def test_odd_shapes(backend, fold, device):
    """One token, a prime vocabulary, hidden states that are a strided view, 1-D targets, and
    no per-token inputs at all (loss_fn of the log-probs alone)."""
    dev = device if backend == "triton" else torch.device("cpu")
    g = torch.Generator().manual_seed(13)
    for n in (1, 5):
        hidden = torch.randn(17, n, generator=g).to(dev).T  # [n, 17], not contiguous for n > 1
        data = dict(hidden=hidden, weight=(torch.randn(127, 17, generator=g) * 0.4).to(dev),
                    targets=torch.randint(0, 127, (n,), generator=g).to(dev))  # fmt: skip
        entropy_like = lambda s: -torch.exp(s) * s
        got = ours(data, entropy_like, (), backend=backend, fold=fold)
        assert_matches(got, reference(data, entropy_like, ()))


def test_loss_fn_sees_valid_tokens_only(tiny_chunks):
    """Ignored positions never reach loss_fn (per-token inputs may hold NaN there), folded or
    not, and each call gets 1-D log-probs with its inputs at the same tokens."""
    data = batch(b=3, t=7, d=16, v=211, seed=14)
    valid = data["targets"] != -100
    advantages = torch.where(valid, torch.randn(3, 7), torch.nan)
    for fold in (True, False):
        seen = []

        def loss_fn(s, adv, seen=seen):
            assert s.dim() == 1 and adv.shape == s.shape and not adv.isnan().any()
            seen.append(s.shape[0])
            return -adv * s

        loss, logp = ours(data, loss_fn, [advantages], backend="torch", fold=fold)[:2]
        assert loss.isfinite() and (logp[~valid] == 0).all()
        assert sum(seen[2:]) == int(valid.sum())  # after the probe's two calls


def test_gopd_loss_is_this_op_with_the_gopd_surrogate():
    """The generic op reproduces gopd_loss (ExOPD, off-policy, clipped) from a user-written loss_fn."""
    data = batch(b=2, t=8, d=16, v=211, seed=15)
    kw = dict(lam=1.25, old_logp=data["old"], clip_ratio=(0.2, 0.28))

    def gopd_surrogate(s, teacher, ref, old):
        adv = gopd_advantage(old, teacher, ref, lam=1.25)
        ratio = torch.exp(s - old)
        return torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))

    for fold in (True, False):
        h1, h2 = (data["hidden"].clone().requires_grad_() for _ in range(2))
        w1, w2 = (data["weight"].clone().requires_grad_() for _ in range(2))
        want, _ = gopd_loss(
            h1, w1, data["targets"], data["teacher"], data["ref"], backend="torch", fold=fold, **kw
        )
        per_token = (data["teacher"], data["ref"], data["old"])
        got, _ = token_logprob_loss(
            h2, w2, data["targets"], gopd_surrogate, per_token, backend="torch", fold=fold
        )
        (want + got).backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(h2.grad, h1.grad)
        torch.testing.assert_close(w2.grad, w1.grad)


def test_folds_by_default_where_gopd_loss_does(monkeypatch):
    """A trained head folds on the torch backend; no gradient wanted, no fold."""
    calls = []
    real = losses_module.FoldedTokenLoss

    class Spy:
        @staticmethod
        def apply(*args):
            calls.append(1)
            return real.apply(*args)

    monkeypatch.setattr(losses_module, "FoldedTokenLoss", Spy)
    data = batch(b=2, t=5, d=16, v=97, seed=16)
    ours(data, weighted_nll, [torch.ones(2, 5)], backend="torch")
    assert calls == [1]
    with torch.no_grad():
        token_logprob_loss(data["hidden"], data["weight"], data["targets"], weighted_nll, [torch.ones(2, 5)])
    assert calls == [1]


BAD = {
    "not callable": (dict(loss_fn="grpo"), "loss_fn must be callable"),
    "a scalar": (dict(loss_fn=lambda s: s.mean()), "loss_fn must return one loss per log-prob"),
    "a list": (dict(loss_fn=lambda s: [s]), "loss_fn must return one loss per log-prob"),
    "mixes tokens": (dict(loss_fn=lambda s: s - s.mean()), "losses moved when other tokens were left out"),
    "per_token a tensor": (dict(per_token=torch.ones(2, 5)), "per_token must be a list or tuple"),
    "per_token shape": (dict(per_token=[torch.ones(2, 4)]), r"per_token\[0\] shape"),
    "per_token item": (dict(per_token=[[1.0] * 5] * 2), r"per_token\[0\] must be a tensor or None"),
    "loss_agg": (dict(loss_agg="mean"), "loss_agg must be one of"),
    "num_tokens": (dict(num_tokens=0), "num_tokens must be a number > 0"),
    "temperature": (dict(temperature=0.0), "temperature"),
    "targets": (dict(targets=torch.full((2, 5), 97)), "outside"),
    "return_entropy": (dict(return_entropy=1), "return_entropy must be a bool"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
@pytest.mark.parametrize("fold", [True, False])
def test_bad_inputs_fail_before_any_kernel(case, fold, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the check")

    monkeypatch.setattr(losses_module, "token_logprobs", no_kernel)
    monkeypatch.setattr(losses_module.FoldedTokenLoss, "apply", no_kernel)
    data = batch(b=2, t=5, d=16, v=97, seed=17)
    args = dict(targets=data["targets"], loss_fn=lambda s, w: -w * s, per_token=[torch.ones(2, 5)])
    change, match = BAD[case]
    args |= change
    if "loss_fn" in change and "per_token" not in change:
        args["per_token"] = ()
    h = data["hidden"].clone().requires_grad_()
    kw = {k: v for k, v in args.items() if k not in ("targets", "loss_fn", "per_token")}
    with pytest.raises(ValueError, match=match):
        token_logprob_loss(
            h, data["weight"], args["targets"], args["loss_fn"], args["per_token"], fold=fold, **kw
        )


# -- return_entropy: each token's entropy, detached, from the fold's own read of the logits --


def with_entropy(data, loss_fn, per_token, bias=None, **kw):
    """ours(...) with and without return_entropy: (the first's results, its entropy, the
    second's results); the entropy checked detached, 0 where a token is ignored."""
    got, without = (
        ours(data, loss_fn, per_token, bias, return_entropy=True, **kw),
        ours(data, loss_fn, per_token, bias, **kw),
    )
    assert len(got) == 6 and len(without) == 5  # (loss, logp, entropy) and (loss, logp), with 3 gradients
    entropy = got[5]
    assert not entropy.requires_grad and entropy.shape == data["targets"].shape
    assert (entropy[data["targets"] == -100] == 0).all()
    return got[:5], entropy, without


def reference_entropy(data, bias=None, **kw):
    h, w = data["hidden"].detach().cpu().double(), data["weight"].detach().cpu().double()
    b = None if bias is None else bias.detach().cpu().double()
    return token_logprobs_reference(h, w, data["targets"].cpu(), bias=b, return_entropy=True, **kw)[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fold", [None, True, False])
@pytest.mark.parametrize("cap", [None, 3.0], ids=["plain", "soft-capped"])
def test_entropy_matches_reference_and_changes_nothing_else(backend, fold, cap, tiny_chunks, device):
    """Folded (in many chunks) or not, soft-capped or not, with a bias, a temperature and a
    logit scale: the entropy of softmax(z / tau) against float64, and the loss, log-probs
    and gradients as without it."""
    dev = device if backend == "triton" else torch.device("cpu")
    data = batch(b=3, t=7, d=17, v=211, device=dev, seed=21)
    advantages = torch.randn(3, 7, generator=torch.Generator().manual_seed(22)).to(dev)
    bias = (torch.randn(211, generator=torch.Generator().manual_seed(23)) * 0.5).to(dev)
    kw = dict(temperature=0.8, logit_scale=1.5, logit_softcap=cap)
    per_token = (advantages, data["old"])
    got, entropy, without = with_entropy(data, clipped_surrogate, per_token, bias, backend=backend, fold=fold,
                                         **kw)  # fmt: skip
    want = reference_entropy(data, bias, **kw)
    assert want[data["targets"] != -100].min() > 1.0  # far from 0: a wrong entropy shows
    torch.testing.assert_close(entropy.double().cpu(), want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, without, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_with_a_frozen_head_folds_the_loss(backend, device, monkeypatch):
    """token_logprobs' frozen-head fold has no entropy: with return_entropy a frozen head folds
    the loss instead (also 2 GEMMs), where the other would have run; the gradient as the
    reference's."""
    dev = device if backend == "triton" else torch.device("cpu")
    dtype = torch.float32 if backend == "torch" else torch.bfloat16  # Triton's frozen fold: half heads
    data = batch(b=2, t=9, d=16, v=97, device=dev, seed=24)
    data = dict(data, hidden=data["hidden"].to(dtype), weight=data["weight"].to(dtype))

    def unfolded(*args, **kwargs):
        raise AssertionError("the frozen head went through token_logprobs")

    monkeypatch.setattr(losses_module, "token_logprobs", unfolded)
    monkeypatch.setattr(losses_module, "cublas_half", lambda *ts: True)  # as on a GPU (CPU torch has none)
    weights = torch.rand(2, 9, generator=torch.Generator().manual_seed(25)).to(dev)
    h = data["hidden"].clone().requires_grad_()
    loss, _, entropy = token_logprob_loss(
        h, data["weight"], data["targets"], weighted_nll, [weights], backend=backend, return_entropy=True
    )
    loss.backward()
    want = reference(data, weighted_nll, [weights])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(entropy.double().cpu(), reference_entropy(data), atol=tol, rtol=tol)
    assert rel_err(h.grad.double().cpu(), want[2]) <= (1e-4 if dtype == torch.float32 else 2e-2)


def test_gopd_loss_reports_the_mean_entropy(tiny_chunks):
    data = batch(b=3, t=7, d=16, v=211, seed=26)
    valid = data["targets"] != -100
    want = reference_entropy(data)[valid].mean()
    for fold in (True, False):
        h = data["hidden"].clone().requires_grad_()
        _, stats = gopd_loss(h, data["weight"], data["targets"], data["teacher"], backend="torch", fold=fold,
                             return_entropy=True)  # fmt: skip
        torch.testing.assert_close(stats["entropy"].double(), want, atol=1e-5, rtol=1e-5)
        _, stats = gopd_loss(h, data["weight"], data["targets"], data["teacher"], backend="torch", fold=fold)
        assert "entropy" not in stats
