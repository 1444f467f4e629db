"""gopd_loss on the torch backend folds its gradient into the forward (FoldedTokenLoss).

test_losses checks it against the float64 reference in one row chunk; here: many chunks,
partial gradients, empty batches, and agreement with the unfolded path (token_logprobs).
"""

from __future__ import annotations

import pytest
import torch

from gopd_kernels import gopd_dense_loss, gopd_loss, token_logprobs
from gopd_kernels import losses as losses_module
from gopd_kernels.losses import LOSS_AGGS, aggregate_token_losses, gopd_advantage
from gopd_kernels.ops import fold_rows_torch, fold_rows_triton, linear_logsoftmax_torch
from gopd_kernels.reference import gopd_loss_reference
from tests.kernels.helpers import cublas_half_as_on_cuda, make_inputs, rel_err
from tests.kernels.test_losses import batch, compare, run_loss


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


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_all_positions_ignored_gives_zero_loss_and_gradients(loss_agg):
    data = batch(b=2, t=4, d=16, v=97)
    targets = torch.full_like(data["targets"], -100)
    h = data["hidden"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    args = (h, w, targets, data["teacher"], data["ref"])
    loss, stats = gopd_loss(*args, lam=1.25, loss_agg=loss_agg, backend="torch")
    loss.backward()
    assert loss.item() == 0 and stats["num_tokens"] == 0
    assert not h.grad.any() and not w.grad.any()
    assert gopd_loss_reference(*args, lam=1.25, loss_agg=loss_agg).item() == 0  # 0, not 0 / 0


@pytest.mark.parametrize("first_with_grad", [1, None])
def test_chunks_without_a_gradient_leave_dw_to_the_others_or_zero(first_with_grad):
    """dW is written by the first chunk with a gradient, not zero-filled first: chunks whose
    loss does not depend on s (here the first one, or all) must not leave it uninitialised."""
    from gopd_kernels.ops import fold_rows_torch
    from gopd_kernels.ops.folded_loss_torch import FoldedTokenLoss
    from gopd_kernels.reference import token_logprobs_reference

    torch.manual_seed(8)
    h0, w0 = torch.randn(7, 16), torch.randn(211, 16) / 4
    y, row_w = torch.randint(0, 211, (7,)), torch.rand(7)
    grad_from = 7 if first_with_grad is None else 3 * first_with_grad  # chunks of 3 rows

    def token_loss(s, r0, r1):
        return (s * row_w[r0:r1]).sum() if r0 >= grad_from else torch.zeros(())

    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss, *_ = FoldedTokenLoss.apply(h, w, None, y, 1.0, token_loss, 3 * 211 * 4, fold_rows_torch)
    loss.backward()
    h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    s = token_logprobs_reference(h2, w2, y)
    (s[grad_from:] * row_w[grad_from:]).sum().backward()
    torch.testing.assert_close(loss, (s[grad_from:] * row_w[grad_from:]).sum().detach())
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)  # all zeros when no chunk has a gradient


def test_no_grad_takes_the_plain_forward():
    data = batch(b=2, t=6, d=16, v=97)
    with torch.no_grad():
        loss, _ = gopd_loss(data["hidden"], data["weight"], data["targets"], data["teacher"], data["ref"],
                            lam=1.25, backend="torch")  # fmt: skip
    h = data["hidden"].clone().requires_grad_()
    folded, _ = gopd_loss(h, data["weight"], data["targets"], data["teacher"], data["ref"], lam=1.25)
    torch.testing.assert_close(loss, folded.detach())


def test_frozen_head_takes_the_frozen_head_path_not_the_fold(tiny_chunks, monkeypatch):
    """Only dH wanted: token_logprobs keeps dlogp/dh from its forward (tiles, 2 GEMMs) and the
    backward scales it; the loss's fold (full-vocabulary rows, also 2 GEMMs) is not used. dH
    against the float64 reference, off-policy with clipping, IS and a temperature."""

    class NoFold:
        def apply(*args):
            raise AssertionError("a frozen head must not take the fold")

    gathers = []
    frozen_forward = linear_logsoftmax_torch.frozen_head_forward
    monkeypatch.setattr(losses_module, "FoldedTokenLoss", NoFold)
    monkeypatch.setattr(linear_logsoftmax_torch, "frozen_head_forward",
                        lambda *a: gathers.append(1) or frozen_forward(*a))  # fmt: skip
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


def _fold_outputs(op: str, data: dict) -> list[torch.Tensor]:
    """A torch-backend fold's loss, a statistic and gradients, float64, in many chunks."""
    h = data["hidden"].double().requires_grad_()
    w = data["weight"].double().requires_grad_()
    if op == "dense":
        kw = dict(lam=1.25, temperature=0.8, mask=data["targets"] != -100, fold=True, teacher_kl=True)
        t_hidden, t_weight = data["t_hidden"], data["t_weight"]
        loss, stats = gopd_dense_loss(h, w, t_hidden, t_weight, t_hidden.flip(0), t_weight.flip(0),
                                      backend="torch", **kw)  # fmt: skip
        stat = stats["kl_teacher"]  # the third tile's
    else:
        kw = dict(lam=1.25, temperature=0.8, backend="torch", fold=True, return_entropy=op != "plain")
        if op == "capped":
            kw["logit_softcap"] = 3.0
        loss, stats = gopd_loss(h, w, data["targets"], data["teacher"], data["ref"], **kw)
        stat = stats.get("entropy", stats["reward"])
    (loss * 0.7).backward()
    return [loss, stat, h.grad, w.grad]


@pytest.mark.parametrize("op", ["plain", "entropy", "capped", "dense"])
def test_the_torch_rows_tile_layouts_agree(op, tiny_chunks, monkeypatch):
    """fold_rows_torch.tile: column-major tiles on CPUs, row-major elsewhere. The folds (the
    loss's, with the entropy, soft-capped with it, the dense one's with its three tiles) give
    the same results in either layout."""
    data = batch(b=2, t=9, d=17, v=211, seed=9)
    g = torch.Generator().manual_seed(9)
    data["t_hidden"] = torch.randn(2, 9, 13, generator=g, dtype=torch.float64)
    data["t_weight"] = torch.randn(211, 13, generator=g, dtype=torch.float64)
    assert fold_rows_torch.tile(torch.empty(12), 3, 4).stride() == (1, 3)  # column-major here
    column_major = _fold_outputs(op, data)
    monkeypatch.setattr(fold_rows_torch, "tile", fold_rows_triton.tile)  # row-major
    for got, want in zip(column_major, _fold_outputs(op, data), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# -- the fold on the Triton backend: torch's GEMMs, fold_rows_triton's row passes ----------


@pytest.mark.triton
@pytest.mark.parametrize("v", [1, 97, 211, 2053], ids=lambda v: f"V{v}")  # one column, primes
@pytest.mark.parametrize("cap", [None, 40.0], ids=["plain", "soft-capped"])
def test_row_passes_match_torch(v, cap, device, narrow_row_blocks):
    """fold_rows_triton against fold_rows_torch's in-place ops, on rows whose logits span
    ~100 nats and climb along the row (the running maximum moves from block to block), and
    targets at both ends of the vocabulary; dz in bf16 and fp32, written over z's rows. Soft-
    capped: the same logits through 40 tanh(z / 40), dz taken on to the raw logits. The
    entropy, when asked, from the same pass, against the float64 softmax's; asking for it
    changes nothing else."""

    g = torch.Generator().manual_seed(v)
    z = (torch.randn(5, v, generator=g) * 30 + torch.linspace(0, 60, v)).double()
    z[1] += 1000.0  # large logits: the log-sum-exp must shift by the maximum
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    y = torch.randint(0, v, (5,), generator=g)
    y[0], y[-1] = 0, v - 1
    c = torch.randn(5, generator=g).double()
    e = z.clone()
    want_s, state = fold_rows_torch.log_softmax(e, y, cap)
    want_dz = fold_rows_torch.logit_grads(e, y, state, c, torch.float64, cap)
    p = torch.softmax(z, 1)  # the same by autograd's own algebra
    by_hand = c[:, None] * (torch.nn.functional.one_hot(y, v) - p)
    if cap is not None:
        by_hand = by_hand * (1 - (z / cap) ** 2)
    torch.testing.assert_close(want_dz, by_hand, atol=1e-12, rtol=1e-9)
    want_h = -(p * torch.log_softmax(z, 1)).sum(1)
    e, h = z.clone(), torch.full((5,), torch.nan, dtype=torch.float64)
    s_h, state_h = fold_rows_torch.log_softmax(e, y, cap, entropy=h)
    torch.testing.assert_close(h, want_h, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(s_h, want_s, atol=1e-12, rtol=0)
    torch.testing.assert_close(fold_rows_torch.logit_grads(e, y, state_h, c, torch.float64, cap), want_dz,
                               atol=1e-12, rtol=1e-9)  # fmt: skip
    zf = z.float().to(device)
    s, lse = fold_rows_triton.log_softmax(zf, y.to(device), cap)
    torch.testing.assert_close(s.double().cpu(), want_s, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(lse.double().cpu(), torch.logsumexp(z, 1), atol=1e-4, rtol=1e-6)
    h = torch.full((5,), torch.nan, device=device)
    s_h, lse_h = fold_rows_triton.log_softmax(zf, y.to(device), cap, entropy=h)
    assert torch.equal(s_h, s) and torch.equal(lse_h, lse)
    torch.testing.assert_close(h.double().cpu(), want_h, atol=1e-4, rtol=1e-5)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):  # fp32 z near 1000: ulp 6e-5
        z_consumed = zf.clone()
        dz = fold_rows_triton.logit_grads(z_consumed, y.to(device), lse, c.float().to(device), dtype, cap)
        assert dz.dtype == dtype and dz.shape == (5, v)
        assert dz.data_ptr() == z_consumed.data_ptr()  # no second [rows, V] buffer
        torch.testing.assert_close(dz.double().cpu(), want_dz, atol=tol * c.abs().max().item(), rtol=0)


@pytest.mark.triton
@pytest.mark.parametrize("pad", [0, 5], ids=["packed_rows", "padded_rows"])
def test_logit_grads_over_z_with_the_default_block(pad, device):
    """The shipped 2048-column block over 8 warps (on a GPU, the warps the barrier orders),
    3 blocks a row: dz written over z's rows, packed or with a longer row stride, matches
    the materialised formula in bf16."""
    from gopd_kernels.ops import fold_rows_triton

    v = 4099
    g = torch.Generator().manual_seed(11)
    z = (torch.randn(7, v, generator=g) * 4).to(device)
    y = torch.randint(0, v, (7,), generator=g).to(device)
    c = torch.randn(7, generator=g).to(device)
    lse = torch.logsumexp(z, 1)
    want = c[:, None] * (torch.nn.functional.one_hot(y, v) - torch.softmax(z, 1))
    z_in = torch.full((7, v + pad), float("nan"), device=device)[:, :v]
    z_in.copy_(z)
    dz = fold_rows_triton.logit_grads(z_in, y, lse, c, torch.bfloat16)
    assert dz.data_ptr() == z_in.data_ptr() and dz.stride() == (2 * (v + pad), 1)
    torch.testing.assert_close(dz.float(), want, atol=1e-2 * c.abs().max().item(), rtol=0)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_fold_matches_reference_in_many_chunks(tiny_chunks, dtype, device):
    """gopd_loss(backend='triton', fold=True): the off-policy, clipped, IS-capped loss and its
    gradients against the float64 reference, in chunks of 3 rows (the last one short)."""
    data = batch(b=3, t=8, d=17, v=211, seed=8, device=device)
    data["ref_used"] = data["ref"]
    kw = dict(lam=1.25, temperature=0.8, old_logp=data["old"], rollout_logp=data["rollout"],
              clip_ratio=(0.2, 0.28), is_cap=1.5)  # fmt: skip
    folded = run_loss(lambda *a, **k: gopd_loss(*a, backend="triton", fold=True, **k), data, dtype, **kw)
    if dtype == torch.float32:  # against float64
        on_cpu = {k: v.cpu() for k, v in data.items()}
        kw_cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        want = run_loss(gopd_loss_reference, on_cpu, torch.float64, **kw_cpu)
        tol = 1e-4
    else:  # bf16 has no float64 twin: against the recomputing Triton path on the same inputs
        want = run_loss(lambda *a, **k: gopd_loss(*a, backend="triton", fold=False, **k), data, dtype, **kw)
        tol = 2e-2
    torch.testing.assert_close(folded[0].double().cpu(), want[0].double().cpu(), atol=1e-4, rtol=1e-4)
    for got, ref in zip(folded[1:3], want[1:3], strict=True):
        assert got.dtype == dtype and rel_err(got, ref) < tol, rel_err(got, ref)


def test_fold_setting_is_checked_and_obeyed(monkeypatch):
    data = batch(b=2, t=4, d=16, v=97)
    h = data["hidden"].clone().requires_grad_()
    with pytest.raises(ValueError, match="fold"):
        gopd_loss(h, data["weight"], data["targets"], data["teacher"], data["ref"], lam=1.25, fold="yes")
    calls = []
    monkeypatch.setattr(losses_module.FoldedTokenLoss, "apply", lambda *a: calls.append(a) or 1 / 0)
    w = data["weight"].clone().requires_grad_()
    gopd_loss(h, w, data["targets"], data["teacher"], data["ref"], lam=1.25, backend="torch", fold=False)
    assert not calls  # fold=False: the recomputing path even where the torch backend would fold
    with pytest.raises(ZeroDivisionError):
        gopd_loss(h, data["weight"], data["targets"], data["teacher"], data["ref"], lam=1.25, fold=True)
    assert calls  # fold=True: folds a frozen head too


def test_frozen_head_fold_setting_reaches_token_logprobs(monkeypatch):
    """A frozen head: fold=None takes token_logprobs' frozen-head fold (no recomputing backward),
    fold=False its recomputing backward; both give the same dH."""
    recomputed = []
    real_backward = linear_logsoftmax_torch.backward
    monkeypatch.setattr(linear_logsoftmax_torch, "backward",
                        lambda *a, **kw: recomputed.append(1) or real_backward(*a, **kw))  # fmt: skip
    data = batch(b=2, t=6, d=16, v=97, seed=4)
    grads = {}
    for fold in (None, False):
        h = data["hidden"].clone().requires_grad_()
        loss, _ = gopd_loss(h, data["weight"], data["targets"], data["teacher"], data["ref"], lam=1.25,
                            backend="torch", fold=fold)  # fmt: skip
        loss.backward()
        grads[fold] = (h.grad, len(recomputed))
    assert grads[None][1] == 0 and grads[False][1] == 1
    assert rel_err(grads[None][0], grads[False][0]) < 1e-5


def test_fold_default_follows_the_measurements(monkeypatch):
    """fold=None: the torch backend folds a trained head; the Triton backend folds bf16 heads
    where torch has a bf16 GEMM with an fp32 result (cuBLAS), and never fp32 heads."""

    def policy(fold, backend, hidden, weight):
        rule = losses_module._policy_folds_by_default(hidden, weight)
        return losses_module._fold_backend(fold, backend, hidden, weight, rule)

    h32 = torch.randn(3, 8, requires_grad=True)
    w32 = torch.randn(11, 8, requires_grad=True)
    h16, w16 = (t.detach().bfloat16().requires_grad_() for t in (h32, w32))
    assert policy(None, "torch", h32, w32) == "torch"
    assert policy(None, "torch", h32, w32.detach()) is None  # frozen head
    assert policy(True, "torch", h32, w32.detach()) == "torch"
    assert policy(False, "torch", h32, w32) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton backend on CPU tensors
    monkeypatch.setattr(losses_module, "cublas_half", cublas_half_as_on_cuda)
    assert policy(None, "triton", h16, w16) == "triton"
    assert policy(None, "triton", h16.half(), w16.half()) == "triton"  # fp16: cuBLAS's fp16 GEMMs
    assert policy(None, "triton", h16, w16.half()) is None  # mixed: no one GEMM for both
    assert policy(None, "triton", h32, w32) is None  # fp32: the recomputing backward
    assert policy(True, "triton", h32, w32) == "triton"
    monkeypatch.setattr(losses_module, "cublas_half", lambda *ts: False)
    assert policy(None, "triton", h16, w16) is None  # no cuBLAS bf16 -> fp32 GEMM here
    with torch.no_grad():
        assert policy(True, "torch", h32, w32) is None  # no gradient wanted: nothing to fold


@pytest.mark.triton
def test_triton_fold_writes_a_bf16_dw_without_an_fp32_one_unless_it_sums(device, monkeypatch):
    """All rows in one chunk: dW goes straight to bf16 through the once-rounding Triton GEMM
    (no fp32 [V, D]). Several chunks of few rows (N x 2 <= D x 4): their dz is kept and dW is
    the same GEMM over all of them at the end. Several chunks of many rows: an fp32 sum.
    The three agree to within bf16 rounding."""
    from gopd_kernels.ops import fold_rows_triton, folded_loss_torch

    fp32_dw, direct = [], []
    real_mm_add, real_gemm = folded_loss_torch.mm_add, fold_rows_triton.gemm_rounded
    monkeypatch.setattr(
        folded_loss_torch, "mm_add", lambda out, *a: fp32_dw.append(out.shape) or real_mm_add(out, *a)
    )
    monkeypatch.setattr(
        fold_rows_triton, "gemm_rounded", lambda a, b, out: direct.append(out.dtype) or real_gemm(a, b, out)
    )
    kw = dict(lam=1.25, temperature=0.9)
    for d in (32, 4):  # 16 rows: D = 32 stores dz, D = 4 sums in fp32
        data = batch(b=2, t=8, d=d, v=211, seed=9, device=device)
        data["ref_used"] = data["ref"]
        run = lambda data=data: run_loss(lambda *a, **k: gopd_loss(*a, backend="triton", fold=True, **k),
                                         data, torch.bfloat16, **kw)  # fmt: skip
        fp32_dw.clear(), direct.clear()
        monkeypatch.delenv("GOPD_WORKSPACE_MB", raising=False)
        one_chunk = run()
        assert direct == [torch.bfloat16] and not fp32_dw
        monkeypatch.setenv("GOPD_WORKSPACE_MB", str(3 * 211 * 4 / 2**20))  # 3-row chunks
        chunks = run()
        if d == 32:
            assert not fp32_dw and direct == [torch.bfloat16] * 2
        else:
            assert len(fp32_dw) > 1 and len(direct) == 1
        torch.testing.assert_close(one_chunk[0], chunks[0], atol=1e-5, rtol=1e-5)
        assert rel_err(one_chunk[1], chunks[1]) < 1e-2 and rel_err(one_chunk[2], chunks[2]) < 1e-2


@pytest.mark.triton
def test_default_fold_on_triton_says_so_once(device, monkeypatch, caplog):
    """The Triton backend's default fold (bf16) holds more memory than the recomputing path:
    an info line says so, once."""
    import logging

    from gopd_kernels.backend import info_once

    monkeypatch.setattr(losses_module, "cublas_half", cublas_half_as_on_cuda)  # as on CUDA
    info_once.cache_clear()
    data = batch(b=2, t=4, d=16, v=97, device=device)
    h, w = (data[k].bfloat16().requires_grad_() for k in ("hidden", "weight"))
    with caplog.at_level(logging.INFO, logger="gopd_kernels"):
        for _ in range(2):
            gopd_loss(h, w, data["targets"], data["teacher"], data["ref"], lam=1.25, backend="triton")
    assert caplog.text.count("gradient is folded into the forward") == 1


@pytest.mark.triton
@pytest.mark.parametrize("op", ["gopd_loss", "gopd_dense_loss"])
def test_triton_fold_sums_dw_as_a_bf16_pair_when_asked(op, tiny_chunks, device, monkeypatch):
    """GOPD_DW_SUM=pair: over several row chunks, the folds carry dW as itself plus a bf16
    remainder (one pair GEMM per chunk, no fp32 [V, D] buffer), and the bf16 dW they return
    is within one rounding of the exact sum of the chunks' products."""
    from gopd_kernels import gopd_dense_loss
    from gopd_kernels.ops import fold_rows_triton, folded_loss_torch
    from tests.kernels.test_linear_logsoftmax_triton import pair_error_bound, within_one_bf16_rounding

    monkeypatch.setenv("GOPD_DW_SUM", "pair")
    n, d, v = 16, 12, 211  # 3-row chunks of 211 fp32 logits (tiny_chunks): 6 chunks, the last short
    hidden, weight, _, targets = make_inputs(n, d, v, torch.bfloat16, device, bias=False, seed=3)
    t_hidden, t_weight, _, _ = make_inputs(n, d, v, torch.bfloat16, device, bias=False, seed=4)
    products, fp32_dw = [], []
    real_pair = fold_rows_triton.gemm_pair

    def pair(a, b, out, lo, accumulate):
        products.append((a.cpu().double(), b.cpu().double()))
        assert out.dtype == lo.dtype == torch.bfloat16 and accumulate == (len(products) > 1)
        real_pair(a, b, out, lo, accumulate)

    monkeypatch.setattr(fold_rows_triton, "gemm_pair", pair)
    monkeypatch.setattr(folded_loss_torch, "mm_add", lambda *a: fp32_dw.append(a) or 1 / 0)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    if op == "gopd_loss":
        logp_t = torch.randn(n, device=device)
        loss, _ = gopd_loss(h, w, targets, logp_t, logp_t - 0.3, lam=1.25, backend="triton", fold=True)
    else:
        loss, _ = gopd_dense_loss(h, w, t_hidden, t_weight, teacher_kl=False, backend="triton", fold=True)
    loss.backward()
    chunks = -(-n // (3 if op == "gopd_loss" else 1))  # the dense fold's 2 tiles: 1-row chunks
    assert len(products) == chunks and not fp32_dw
    exact = sum(a @ b for a, b in products)
    magnitude = sum(a.abs() @ b.abs() for a, b in products)
    assert w.grad.dtype == torch.bfloat16
    assert within_one_bf16_rounding(w.grad.cpu(), exact, fp32_sum=pair_error_bound(chunks, magnitude))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dw_sum", ["auto", "float32", "pair"])
def test_head_grad_buffers_by_dw_sum(dtype, dw_sum, monkeypatch, caplog):
    """What a fold's dW holds over several chunks of many rows (bytes an element beside dW's
    own 2): bf16 heads 4 in fp32 (and dW's rounded copy at the end) or, with pair, 2 (the
    remainder, dropped with the result); fp16 heads always fp32 and fp32 heads dW itself, a log
    line saying so when pair was asked for. The torch backend's folds have no pair GEMM, and
    say so."""
    import logging

    from gopd_kernels.backend import warn_once
    from gopd_kernels.ops import fold_rows_torch, fold_rows_triton
    from gopd_kernels.ops.folded_loss_torch import HeadGrad

    monkeypatch.setenv("GOPD_DW_SUM", dw_sum)
    warn_once.cache_clear()
    weight, h = torch.zeros(7, 3, dtype=dtype), torch.zeros(40, 3, dtype=dtype)  # N > 2D: no store
    operand = torch.float32 if dtype == torch.float32 else dtype  # as on a GPU
    with caplog.at_level(logging.WARNING, logger="gopd_kernels"):
        grad = HeadGrad(weight, h, operand, torch.float32, 8, fold_rows_triton)
        one_chunk = HeadGrad(weight, h, operand, torch.float32, 40, fold_rows_triton)
        on_torch = HeadGrad(weight, h, torch.float32, torch.float32, 8, fold_rows_torch)
    pair = dw_sum == "pair" and dtype == torch.bfloat16
    assert grad.dw.dtype == (dtype if pair or dtype == torch.float32 else torch.float32)
    assert (grad.lo is not None) == pair and (not pair or grad.lo.dtype == torch.bfloat16)
    # one chunk: nothing to sum; a bf16 dW straight from the rounding GEMM, an fp16 one through
    # fp32 (its dz comes scaled, and torch's GEMMs take the scale back out)
    assert one_chunk.lo is None and one_chunk.dw.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    assert on_torch.lo is None and on_torch.dw.dtype == torch.float32
    assert grad.store is one_chunk.store is on_torch.store is None
    grad.result()
    assert grad.lo is None  # freed with the result
    said = " ".join(r.getMessage() for r in caplog.records)
    assert ("applies to bf16 heads" in said) == (dw_sum == "pair" and dtype != torch.bfloat16)
    assert ("torch backend's folds sum dW in float32" in said) == pair
    with pytest.raises(ValueError, match="GOPD_DW_SUM"):
        monkeypatch.setenv("GOPD_DW_SUM", "fp64")
        HeadGrad(weight, h, operand, torch.float32, 8, fold_rows_triton)


@pytest.mark.triton
def test_head_grad_stores_dz_where_that_holds_no_more_than_the_sum(monkeypatch):
    """Few rows: with GOPD_DW_SUM=auto (the default) a bf16 head's chunks keep their dz ([N, V]
    in its GEMM dtype) in place of the fp32 sum ([V, D] beside dW, 4 bytes an element) while
    that holds no more, where the rows have the rounding Triton GEMM: N x 2 <= D x 4 for a bf16
    dz (GPUs), N x 4 <= D x 4 for the fp32 dz of the CPU's upcast operands. Never on the torch
    rows, nor with float32 or pair asked for (to compare), nor for fp16 heads (a dz scaled per
    chunk) or fp32 heads. Rows of chunks that never came (a loss that does not depend on them)
    count as zeros."""
    from gopd_kernels.ops import fold_rows_torch, fold_rows_triton
    from gopd_kernels.ops.folded_loss_torch import HeadGrad
    from tests.kernels.test_linear_logsoftmax_triton import within_one_bf16_rounding

    d, v = 8, 11
    weight = torch.zeros(v, d, dtype=torch.bfloat16)
    for operand in (torch.bfloat16, torch.float32):
        most = d * 4 // operand.itemsize
        for n in (most, most + 1):
            h = torch.zeros(n, d, dtype=operand)
            grad = HeadGrad(weight, h, operand, torch.float32, 1, fold_rows_triton)
            assert (grad.store is not None) == (n <= most), (operand, n)
            if n <= most:
                assert grad.store.shape == (n, v) and grad.store.dtype == operand
                assert grad.dw.dtype == torch.bfloat16 and grad.lo is None
            assert HeadGrad(weight, h, operand, torch.float32, 1, fold_rows_torch).store is None
            for asked in ("float32", "pair"):
                monkeypatch.setenv("GOPD_DW_SUM", asked)
                assert HeadGrad(weight, h, operand, torch.float32, 1, fold_rows_triton).store is None
            monkeypatch.delenv("GOPD_DW_SUM")
    for dtype in (torch.float16, torch.float32):
        half_weight, h = torch.zeros(v, d, dtype=dtype), torch.zeros(2, d, dtype=dtype)
        assert HeadGrad(half_weight, h, dtype, torch.float32, 1, fold_rows_triton).store is None
    h = torch.randn(3, d)
    grad = HeadGrad(weight, h, torch.float32, torch.float32, 1, fold_rows_triton)
    dz = torch.randn(3, v)
    grad.store.fill_(float("nan"))  # what torch.empty may hold
    grad.add(dz[0:1], (0, 1))
    grad.add(dz[2:3], (2, 3))
    exact = dz[[0, 2]].double().T @ h[[0, 2]].double()
    assert within_one_bf16_rounding(grad.result(), exact)


@pytest.mark.triton
@pytest.mark.parametrize("op", ["gopd_loss", "gopd_dense_loss"])
def test_stored_dz_gives_dw_within_one_rounding(op, tiny_chunks, device, monkeypatch):
    """A bf16 fold over several chunks of few rows keeps their dz and takes dW in one GEMM at
    the end (no fp32 [V, D] sum): within one bf16 rounding of the exact product of the dz it
    kept; and close to the recomputing backward's."""
    from gopd_kernels import gopd_dense_loss
    from gopd_kernels.ops import folded_loss_torch
    from tests.kernels.test_linear_logsoftmax_triton import within_one_bf16_rounding

    n, d, v = 8, 16, 211  # 3-row chunks (tiny_chunks; 1-row for the dense fold's 2 tiles)
    hidden, weight, _, targets = make_inputs(n, d, v, torch.bfloat16, device, bias=False, seed=3)
    t_hidden, t_weight, _, _ = make_inputs(n, d, v, torch.bfloat16, device, bias=False, seed=4)
    logp_t = torch.randn(n, device=device)

    def run(fold=True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if op == "gopd_loss":
            loss, _ = gopd_loss(h, w, targets, logp_t, logp_t - 0.3, lam=1.25, backend="triton", fold=fold)
        else:
            loss, _ = gopd_dense_loss(h, w, t_hidden, t_weight, teacher_kl=False, backend="triton", fold=fold)
        loss.backward()
        return w.grad

    stores = []
    real_from_store = folded_loss_torch.HeadGrad._from_store

    def from_store(self):
        stores.append((self.store.cpu().double(), self.h.cpu().double(), self.filled))
        real_from_store(self)

    monkeypatch.setattr(folded_loss_torch.HeadGrad, "_from_store", from_store)
    monkeypatch.setattr(folded_loss_torch, "mm_add", lambda *a: 1 / 0)  # no fp32 sum across chunks
    dw = run()
    assert len(stores) == 1 and dw.dtype == torch.bfloat16
    store, h, filled = stores[0]
    assert sorted(filled) == [(r, min(r + 3, n)) for r in range(0, n, 3)] or op == "gopd_dense_loss"
    assert within_one_bf16_rounding(dw.cpu(), store.T @ h)
    monkeypatch.undo()  # the recomputing backward (no fold) gives the same dW to bf16's precision
    monkeypatch.setenv("GOPD_WORKSPACE_MB", str(3 * 211 * 4 / 2**20))
    assert rel_err(dw.float(), run(fold=False).float()) < 1e-2
