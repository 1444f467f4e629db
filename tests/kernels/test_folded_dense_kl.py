"""gopd_dense_loss on the torch backend folds its gradient into the forward (FoldedDenseKL).

test_dense_kl checks it against the float64 reference in one row chunk; here: many chunks,
partial gradients, empty batches, and agreement with the unfolded path (DenseGopdKL, whose
torch backward recomputes the tiles like the Triton kernels do).
"""

from __future__ import annotations

import pytest
import torch

from gopd_kernels import gopd_dense_loss
from gopd_kernels.losses import aggregate_token_losses
from gopd_kernels.ops.dense_kl import DenseGopdKL
from tests.kernels.helpers import rel_err
from tests.kernels.test_dense_kl import compare, heads


@pytest.fixture
def tiny_chunks(monkeypatch):
    """A workspace of 6 fp32 rows of V=211: chunks of 3 rows (2 when the teacher's KL takes
    a third tile), the last one short."""
    monkeypatch.setenv("GOPD_WORKSPACE_MB", str(6 * 211 * 4 / 2**20))


@pytest.mark.parametrize("lam", [1.0, 1.25])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_many_chunks_match_reference(tiny_chunks, lam, loss_agg):
    compare("torch", "cpu", lam, loss_agg=loss_agg, temperature=0.7)


def test_kl_teacher_stat_over_many_chunks(tiny_chunks):
    student, teacher, ref = heads(seed=3)
    hs = student[0].clone().requires_grad_()
    _, folded = gopd_dense_loss(hs, student[1], *teacher, *ref, lam=1.5)
    with torch.no_grad():  # the streaming forward, no fold
        _, plain = gopd_dense_loss(*student, *teacher, *ref, lam=1.5)
    for key in ("kl", "kl_teacher"):
        torch.testing.assert_close(folded[key], plain[key])
    assert folded["kl_teacher"] != folded["kl"]


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_folded_equals_unfolded(tiny_chunks, lam):
    """Same loss and gradients as DenseGopdKL's recomputing backward + the loss in PyTorch."""
    student, teacher, ref = heads(n=(2, 7), seed=4)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    hs, ws = (t.clone().requires_grad_() for t in student)
    loss, _ = gopd_dense_loss(hs, ws, *teacher, *ref, lam=lam, temperature=1.3, mask=mask, backend="torch")
    (loss * 0.3).backward()

    hs2, ws2 = (t.clone().requires_grad_() for t in student)
    use_ref = lam != 1.0
    kl, _ = DenseGopdKL.apply(
        hs2[mask], ws2, teacher[0][mask], teacher[1],
        ref[0][mask] if use_ref else None, ref[1] if use_ref else None,
        lam, 1.3, use_ref, "torch",
    )  # fmt: skip
    unfolded = aggregate_token_losses(kl, mask[mask])
    (unfolded * 0.3).backward()
    torch.testing.assert_close(loss, unfolded)
    assert rel_err(hs.grad, hs2.grad) < 1e-5 and rel_err(ws.grad, ws2.grad) < 1e-5


@pytest.mark.parametrize("grad_of", ["hidden", "weight"])
def test_gradient_of_one_input_only(tiny_chunks, grad_of):
    student, teacher, ref = heads(seed=5)
    full_h, full_w = (t.clone().requires_grad_() for t in student)
    gopd_dense_loss(full_h, full_w, *teacher, *ref, lam=1.25)[0].backward()
    h = student[0].clone().requires_grad_(grad_of == "hidden")
    w = student[1].clone().requires_grad_(grad_of == "weight")
    gopd_dense_loss(h, w, *teacher, *ref, lam=1.25)[0].backward()
    got, want, other = (h.grad, full_h.grad, w.grad) if grad_of == "hidden" else (w.grad, full_w.grad, h.grad)
    torch.testing.assert_close(got, want)
    assert other is None


def test_empty_mask_gives_zero_loss_and_gradients():
    student, teacher, ref = heads()
    hs, ws = (t.clone().requires_grad_() for t in student)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    loss, stats = gopd_dense_loss(hs, ws, *teacher, *ref, lam=1.25, mask=mask, backend="torch")
    loss.backward()
    assert loss.item() == 0 and stats["num_tokens"] == 0
    assert not hs.grad.any() and not ws.grad.any()


def test_upstream_gradient_scales_the_saved_gradients():
    student, teacher, _ = heads(seed=6)
    grads = []
    for scale in (1.0, -2.5):
        hs, ws = (t.clone().requires_grad_() for t in student)
        (gopd_dense_loss(hs, ws, *teacher, backend="torch")[0] * scale).backward()
        grads.append((hs.grad, ws.grad))
    for unit, scaled in zip(*grads, strict=True):
        torch.testing.assert_close(scaled, -2.5 * unit)
