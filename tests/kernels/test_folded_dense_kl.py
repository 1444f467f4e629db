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
from tests.kernels.helpers import cublas_half_as_on_cuda, rel_err
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
        hs2[mask], ws2, None, teacher[0][mask], teacher[1], None,
        ref[0][mask] if use_ref else None, ref[1] if use_ref else None, None,
        lam, (1 / 1.3,) * 3, use_ref, "torch",
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


# -- the dense fold on the Triton backend: torch's GEMMs, fold_rows_triton's row passes -----


@pytest.mark.triton
@pytest.mark.parametrize("v", [1, 97, 2053], ids=lambda v: f"V{v}")
@pytest.mark.parametrize("teacher", [False, True], ids=["no-teacher-kl", "teacher-kl"])
def test_dense_row_passes_match_torch(v, teacher, device, narrow_row_blocks):
    """fold_rows_triton.dense_kl and lse against fold_rows_torch's in-place ops, on rows whose
    logits span ~100 nats and climb along the row (the running maximum moves from block to
    block), one shifted by 1000."""
    from gopd_kernels.ops import fold_rows_torch, fold_rows_triton

    g = torch.Generator().manual_seed(v)
    climb = torch.linspace(0, 60, v)
    a, c, z_t = ((torch.randn(4, v, generator=g) * 20 + climb).double() for _ in range(3))
    a[1] += 1000.0
    coef = torch.randn(4, generator=g).double()
    lse_c, lse_t = torch.logsumexp(c, 1), torch.logsumexp(z_t, 1) if teacher else None
    z_t_arg = z_t.clone() if teacher else None
    want = fold_rows_torch.dense_kl(a.clone(), c.clone(), z_t_arg, lse_c, lse_t, coef, torch.float64)
    to = lambda t: t.float().to(device)
    torch.testing.assert_close(fold_rows_triton.lse(to(c)).double().cpu(), lse_c, atol=1e-4, rtol=1e-6)
    got = fold_rows_triton.dense_kl(to(a), to(c), to(z_t) if teacher else None, to(lse_c),
                                    to(lse_t) if teacher else None, to(coef), torch.float32)  # fmt: skip
    torch.testing.assert_close(got[0].double().cpu(), want[0], atol=1e-3, rtol=1e-4)
    assert (got[1] is None) == (not teacher)
    if teacher:
        torch.testing.assert_close(got[1].double().cpu(), want[1], atol=1e-3, rtol=1e-4)
    assert rel_err(got[2], want[2]) < 1e-4
    a_consumed = to(a)  # a bf16 dz is written over a's rows, as an fp32 one
    dz16 = fold_rows_triton.dense_kl(a_consumed, to(c), None, to(lse_c), None, to(coef), torch.bfloat16)[2]
    assert dz16.data_ptr() == a_consumed.data_ptr() and dz16.stride(0) == 2 * v
    want16 = fold_rows_torch.dense_kl(a.clone(), c.clone(), None, lse_c, None, coef, torch.float64)[2]
    assert rel_err(dz16, want16) < 1e-2
    assert fold_rows_triton.dense_kl(to(a), to(c), None, to(lse_c), None, None, torch.float32)[2] is None


@pytest.mark.triton
@pytest.mark.parametrize("lam", [1.0, 1.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_dense_fold_matches_in_many_chunks(tiny_chunks, lam, dtype, device):
    """gopd_dense_loss(backend='triton', fold=True) against the float64 reference (fp32) or the
    recomputing Triton path (bf16), in chunks of 3 rows (2 with the teacher's KL), with the
    teacher-KL statistic at lam != 1."""
    from tests.kernels.test_dense_kl import run

    student, teacher, ref = heads(seed=6, device=device)
    mask = torch.ones(3, 5, dtype=torch.bool, device=device)
    mask[0, -2:] = False
    ref = ref if lam != 1.0 else None
    kw = dict(lam=lam, temperature=0.8, mask=mask)
    dense = lambda fold: lambda *a, **k: gopd_dense_loss(*a, backend="triton", fold=fold, **k)
    (loss, stats), dh, dw = run(dense(True), student, teacher, ref, dtype, 1.3, **kw)
    (want_loss, want_stats), want_dh, want_dw = run(dense(False), student, teacher, ref, dtype, 1.3, **kw)
    torch.testing.assert_close(loss, want_loss, atol=1e-4, rtol=1e-4)
    for key in want_stats:
        torch.testing.assert_close(stats[key], want_stats[key], atol=1e-4, rtol=1e-4)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert dh.dtype == dw.dtype == dtype
    assert rel_err(dh, want_dh) < tol and rel_err(dw, want_dw) < tol
    if dtype == torch.float32:  # and both against float64
        compare("triton", device, lam, temperature=0.8, use_ref=ref is not None)


def test_dense_fold_setting(monkeypatch):
    student, teacher, _ = heads(seed=7)
    hs = student[0].clone().requires_grad_()
    with pytest.raises(ValueError, match="fold"):
        gopd_dense_loss(hs, student[1], *teacher, fold=1)
    calls = []
    from gopd_kernels import losses

    monkeypatch.setattr(losses.FoldedDenseKL, "apply", lambda *a: calls.append(a) or 1 / 0)
    gopd_dense_loss(hs, student[1], *teacher, backend="torch", fold=False)
    assert not calls  # fold=False: the streaming forward and recomputing backward on torch too
    with pytest.raises(ZeroDivisionError):
        gopd_dense_loss(hs, student[1], *teacher, backend="torch")
    assert calls  # the torch backend's default folds


def test_dense_fold_default_follows_the_measurements(monkeypatch):
    """fold=None: the torch backend folds; the Triton backend folds when every head is bf16
    and torch has the bf16 GEMM with an fp32 result (cuBLAS; 2.3-2.8x faster on an H100),
    and keeps the recomputing backward for fp32 heads or a bf16 teacher beside an fp32 student."""
    from gopd_kernels import losses

    def folds(backend, *heads):
        return losses._dense_folds_by_default(*heads)(backend)

    student, teacher, ref = heads(seed=7)
    b16 = lambda pair: tuple(t.bfloat16() for t in pair)
    assert folds("torch", *student, *teacher)
    monkeypatch.setattr(losses, "cublas_half", cublas_half_as_on_cuda)
    assert folds("triton", *b16(student), *b16(teacher), *b16(ref))
    assert folds("triton", *b16(student), *b16(teacher), None, None)  # lam = 1: no reference
    f16 = lambda pair: tuple(t.half() for t in pair)
    assert folds("triton", *f16(student), *f16(teacher), *f16(ref))
    assert not folds("triton", *b16(student), *f16(teacher))  # mixed halves: no one GEMM
    assert not folds("triton", *student, *teacher)  # fp32: 3xTF32 against cuBLAS's fp32
    assert not folds("triton", *student, *b16(teacher))
    monkeypatch.setattr(losses, "cublas_half", lambda *ts: False)
    assert not folds("triton", *b16(student), *b16(teacher))  # no cuBLAS bf16 -> fp32 GEMM
