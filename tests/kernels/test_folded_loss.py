"""gopd_loss on the torch backend folds its gradient into the forward (FoldedTokenLoss).

test_losses checks it against the float64 reference in one row chunk; here: many chunks,
partial gradients, empty batches, and agreement with the unfolded path (token_logprobs).
"""

from __future__ import annotations

import pytest
import torch

from gopd_kernels import gopd_loss, token_logprobs
from gopd_kernels import losses as losses_module
from gopd_kernels.losses import aggregate_token_losses, gopd_advantage
from gopd_kernels.ops import linear_logsoftmax_torch
from gopd_kernels.reference import gopd_loss_reference
from tests.kernels.helpers import rel_err
from tests.kernels.test_losses import batch, compare


@pytest.fixture
def tiny_chunks(monkeypatch):
    """A workspace of 3 rows of V=211 fp32 logits: many chunks, the last one short."""
    monkeypatch.setenv("GOPD_WORKSPACE_MB", str(3 * 211 * 4 / 2**20))


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_many_chunks_match_reference(tiny_chunks, loss_agg):
    data = batch(b=3, t=8, d=17, v=211, seed=5)
    data["ref_used"] = data["ref"]
    compare(
        data, "torch", lam=1.25, temperature=0.8, old_logp=data["old"], rollout_logp=data["rollout"],
        clip_ratio=(0.2, 0.28), is_cap=1.5, loss_agg=loss_agg,
    )  # fmt: skip


def test_folded_equals_unfolded_on_policy(tiny_chunks):
    """Same loss and gradients as token_logprobs (recomputing backward) + the loss in PyTorch."""
    data = batch(b=2, t=11, d=16, v=211, seed=6)
    h = data["hidden"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    loss, _ = gopd_loss(h, w, data["targets"], data["teacher"], data["ref"], lam=1.5, backend="torch")
    (loss * 0.3).backward()
    h2 = data["hidden"].clone().requires_grad_()
    w2 = data["weight"].clone().requires_grad_()
    s = token_logprobs(h2, w2, data["targets"], backend="torch")
    mask = data["targets"] != -100
    adv = gopd_advantage(s.detach(), data["teacher"], data["ref"], lam=1.5)
    unfolded = aggregate_token_losses(-adv * torch.exp(s - s.detach()), mask)
    (unfolded * 0.3).backward()
    torch.testing.assert_close(loss, unfolded)
    assert rel_err(h.grad, h2.grad) < 1e-5 and rel_err(w.grad, w2.grad) < 1e-5


@pytest.mark.parametrize("grad_of", ["hidden", "weight"])
def test_gradient_of_one_input_only(tiny_chunks, grad_of):
    data = batch(b=2, t=5, d=16, v=211, seed=7)
    full_h = data["hidden"].clone().requires_grad_()
    full_w = data["weight"].clone().requires_grad_()
    gopd_loss(full_h, full_w, data["targets"], data["teacher"], data["ref"], lam=1.25)[0].backward()
    h = data["hidden"].clone().requires_grad_(grad_of == "hidden")
    w = data["weight"].clone().requires_grad_(grad_of == "weight")
    gopd_loss(h, w, data["targets"], data["teacher"], data["ref"], lam=1.25)[0].backward()
    got, want, other = (h.grad, full_h.grad, w.grad) if grad_of == "hidden" else (w.grad, full_w.grad, h.grad)
    torch.testing.assert_close(got, want)
    assert other is None


def test_all_positions_ignored_gives_zero_loss_and_gradients():
    data = batch(b=2, t=4, d=16, v=97)
    targets = torch.full_like(data["targets"], -100)
    h = data["hidden"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    loss, stats = gopd_loss(h, w, targets, data["teacher"], data["ref"], lam=1.25, backend="torch")
    loss.backward()
    assert loss.item() == 0 and stats["num_tokens"] == 0
    assert not h.grad.any() and not w.grad.any()


def test_no_grad_takes_the_plain_forward():
    data = batch(b=2, t=6, d=16, v=97)
    with torch.no_grad():
        loss, _ = gopd_loss(data["hidden"], data["weight"], data["targets"], data["teacher"], data["ref"],
                            lam=1.25, backend="torch")  # fmt: skip
    h = data["hidden"].clone().requires_grad_()
    folded, _ = gopd_loss(h, data["weight"], data["targets"], data["teacher"], data["ref"], lam=1.25)
    torch.testing.assert_close(loss, folded.detach())


def test_frozen_head_takes_the_frozen_head_path_not_the_fold(tiny_chunks, monkeypatch):
    """Only dH wanted: token_logprobs keeps E_p[W] from its forward (tiles, 2 GEMMs) and the
    backward is a gather; the fold (full-vocabulary rows, also 2 GEMMs) is not used. dH
    against the float64 reference, off-policy with clipping, IS and a temperature."""

    def no_fold(*args):
        raise AssertionError("a frozen head must not take the fold")

    gathers = []
    frozen_grad = linear_logsoftmax_torch.hidden_grad_frozen_head
    monkeypatch.setattr(losses_module, "_folded_policy_loss", no_fold)
    monkeypatch.setattr(linear_logsoftmax_torch, "hidden_grad_frozen_head",
                        lambda *a: gathers.append(1) or frozen_grad(*a))  # fmt: skip
    data = batch(b=2, t=9, d=17, v=211, seed=8)
    kw = dict(lam=1.25, temperature=0.7, old_logp=data["old"], rollout_logp=data["rollout"], is_cap=2.0)
    h = data["hidden"].clone().requires_grad_()
    loss, _ = gopd_loss(
        h, data["weight"], data["targets"], data["teacher"], data["ref"], backend="torch", **kw
    )
    (loss * 1.7).backward()
    h64 = data["hidden"].double().requires_grad_()
    want = gopd_loss_reference(
        h64, data["weight"].double(), data["targets"], data["teacher"], data["ref"], **kw
    )
    (want * 1.7).backward()
    assert gathers == [1]
    torch.testing.assert_close(loss.double(), want.detach(), atol=1e-5, rtol=1e-5)
    assert rel_err(h.grad, h64.grad) <= 1e-4
