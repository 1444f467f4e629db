"""gopd_dense_loss (full-vocabulary G-OPD) against the materialising float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from gopd_kernels import gopd_dense_loss
from gopd_kernels.reference import gopd_dense_loss_reference, linear_log_softmax_reference
from tests.kernels.helpers import FP16_DZ_ROW_REL, GRAD_REL, GRAD_ROW_REL, VALUE_ATOL, rel_err, row_rel_err

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def heads(n=(3, 5), v=211, dims=(16, 24, 20), device="cpu", seed=0, dtype=torch.float32):
    """Student, teacher, reference heads with different hidden sizes and one vocabulary."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in dims:
        h = torch.randn(*n, d, generator=g)
        w = torch.randn(v, d, generator=g) * (2.0 / d**0.5)
        out.append((h.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)))
    return out


def run(fn, student, teacher, ref, dtype, scale, **kw):
    hs = student[0].detach().to(dtype, copy=True).requires_grad_()
    ws = student[1].detach().to(dtype, copy=True).requires_grad_()
    to = lambda t: None if t is None else t.to(dtype)
    out = fn(hs, ws, to(teacher[0]), to(teacher[1]), *(to(x) for x in (ref or (None, None))), **kw)
    (out[0] * scale).backward()
    return out, hs.grad, ws.grad


def compare(backend, device, lam, *, dtype=torch.float32, temperature=0.8, mask=True, loss_agg="token-mean",
            use_ref=True, n=(3, 5), v=211, dims=(16, 24, 20), fold=None, logit_scales=None,
            logit_softcaps=None, teacher_kl=True):  # fmt: skip
    student, teacher, ref = heads(n, v, dims, device=device, dtype=dtype)
    m = None
    if mask:
        m = torch.ones(n, dtype=torch.bool)
        m[0, -2:] = False
        m = m.to(device)
    kw = dict(lam=lam, temperature=temperature, mask=m, loss_agg=loss_agg)
    if logit_scales is not None:
        names = ("student_logit_scale", "teacher_logit_scale", "ref_logit_scale")
        kw.update(zip(names, logit_scales, strict=True))
    if logit_softcaps is not None:
        names = ("student_logit_softcap", "teacher_logit_softcap", "ref_logit_softcap")
        kw.update(zip(names, logit_softcaps, strict=True))
    ref = ref if use_ref else None
    ours = lambda *a, **k: gopd_dense_loss(*a, backend=backend, fold=fold, teacher_kl=teacher_kl, **k)  # noqa: E731
    (loss, stats), dh, dw = run(ours, student, teacher, ref, dtype, 1.3, **kw)
    cpu64 = lambda hd: None if hd is None else tuple(t.cpu().double() for t in hd)
    kw["mask"] = None if m is None else m.cpu()
    (ref_loss, ref_kl), ref_dh, ref_dw = run(gopd_dense_loss_reference, cpu64(student), cpu64(teacher),
                                             cpu64(ref), torch.float64, 1.3, **kw)  # fmt: skip
    atol = 10 * VALUE_ATOL[dtype]
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=atol, rtol=atol)
    assert rel_err(dh, ref_dh) <= GRAD_REL[dtype] and rel_err(dw, ref_dw) <= GRAD_REL[dtype]
    worst_rows = (
        row_rel_err(dh.reshape(-1, dh.shape[-1]), ref_dh.reshape(-1, dh.shape[-1])),
        row_rel_err(dw, ref_dw),
    )
    assert max(worst_rows) <= GRAD_ROW_REL[dtype], worst_rows
    valid = torch.ones(n, dtype=torch.bool) if m is None else m.cpu()
    torch.testing.assert_close(stats["kl"].double().cpu(), ref_kl[valid].mean(), atol=atol, rtol=atol)
    return stats, (student, teacher, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("lam", [1.0, 1.25])
@pytest.mark.parametrize("biased", ["all", "student", "frozen"])
def test_head_biases_match_reference(backend, fold, lam, biased, device):
    """Heads with a bias (Phi-style): each model's logits are (h W^T + b) / tau. The loss, the
    KL to the teacher (a third tile at lam != 1), and the student's dH, dW and db against
    float64, folded and recomputing, on odd shapes."""
    dev = device if backend == "triton" else torch.device("cpu")
    student, teacher, ref = heads(n=(2, 7), v=97, dims=(17, 16, 33), device=dev, seed=9)
    g = torch.Generator().manual_seed(9)
    bias = lambda on: (torch.randn(97, generator=g) * 0.7).to(dev) if on else None  # noqa: E731
    b_s, b_t, b_r = bias(biased != "frozen"), bias(biased != "student"), bias(biased != "student")
    mask = torch.ones(2, 7, dtype=torch.bool, device=dev)
    mask[1, 5:] = False
    kw = dict(lam=lam, temperature=1.3, mask=mask)
    got, want = {}, {}
    for out, dtype in ((got, None), (want, torch.float64)):

        def on(t, dtype=dtype):  # the reference's float64 CPU copies; ours as given
            return None if t is None else t.cpu().to(dtype) if dtype else t

        hs, ws = (on(t).detach().clone().requires_grad_() for t in student)
        bs = None if b_s is None else on(b_s).detach().clone().requires_grad_()
        args = (hs, ws, *map(on, teacher), *map(on, ref))
        biases = dict(student_bias=bs, teacher_bias=on(b_t), ref_bias=on(b_r))
        kw_here = kw | {"mask": mask.cpu() if dtype else mask}
        if dtype:
            loss, kl = gopd_dense_loss_reference(*args, **biases, **kw_here)
        else:
            loss, stats = gopd_dense_loss(*args, **biases, **kw_here, backend=backend, fold=fold)
            out["kl_teacher"] = stats["kl_teacher"]
        (loss * 1.7).backward()
        out.update(loss=loss.detach(), dh=hs.grad, dw=ws.grad, db=None if bs is None else bs.grad)
    if lam != 1.0:  # KL(p_s || p_T) with the teacher's bias, the reference's log-softmax apart
        on64 = lambda t: None if t is None else t.cpu().double()  # noqa: E731
        log_ps = linear_log_softmax_reference(*map(on64, student), on64(b_s), 1.3)
        log_pt = linear_log_softmax_reference(*map(on64, teacher), on64(b_t), 1.3)
        kl_t = (log_ps.exp() * (log_ps - log_pt)).sum(-1)[mask.cpu()].mean()
        torch.testing.assert_close(got["kl_teacher"].double().cpu(), kl_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["loss"].double().cpu(), want["loss"], atol=1e-5, rtol=1e-5)
    for key in ("dh", "dw", "db"):
        assert (got[key] is None) == (want[key] is None), key
        if want[key] is not None:
            assert rel_err(got[key], want[key]) <= 1e-4, key


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 1.25, 2.0])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_torch_backend_matches_reference(lam, loss_agg):
    compare("torch", "cpu", lam, loss_agg=loss_agg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.5, 1.25])
def test_backends_match_reference_odd_shapes(backend, lam, device):
    dev = device if backend == "triton" else torch.device("cpu")
    compare(backend, dev, lam, n=(1, 7), v=97, dims=(17, 16, 33), temperature=1.4)


CAPS = {  # soft-caps (student, teacher, reference) and whether the KL to the teacher is reported
    "scaled": (None, True), "capped-student-and-teacher": ((3.0, 2.5, None), True),
    "capped-teacher-and-ref": ((None, 2.5, 4.0), True), "all-capped": ((3.0, 2.5, 4.0), True),
    "capped-ref-no-teacher-kl": ((None, None, 4.0), False),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "recomputed"])
@pytest.mark.parametrize("caps", CAPS, ids=list(CAPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_model_transforms_its_own_logits(backend, fold, caps, dtype, device):
    """Three logit multipliers (as Granite's 1 / logits_scaling, per model), and soft-caps (as
    Gemma 2's) on some of the heads, against logits of spread ~2, folded and recomputed: the
    student's in its gradient too, the teacher's and the reference's in q and in the KL to the
    teacher (a capped reference's tile built in scratch both with and without it)."""
    dev = device if backend == "triton" else torch.device("cpu")
    softcaps, teacher_kl = CAPS[caps]
    stats, _ = compare(backend, dev, 1.25, dtype=dtype, n=(2, 7), v=97, dims=(17, 16, 33), temperature=0.9,
                       fold=fold, logit_scales=(0.5, 2.0, 0.25), logit_softcaps=softcaps,
                       teacher_kl=teacher_kl)  # fmt: skip
    assert ("kl_teacher" in stats) == teacher_kl


@pytest.mark.triton
@pytest.mark.parametrize("workspace_mb", ["0.05", "0.005"], ids=["vocab-slices", "row-chunks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_backward_tiles_change_nothing(workspace_mb, dtype, device, monkeypatch):
    """158 tokens: in slices of the vocabulary, or in 2 row chunks (the fp32 dH of all rows
    outgrows 5 KiB) by slices; the three heads are sliced together. fold=False: the tiles of
    the recomputing backward (bf16 heads fold by default on a GPU)."""
    monkeypatch.setenv("GOPD_WORKSPACE_MB", workspace_mb)
    compare("triton", device, 1.25, dtype=dtype, n=(4, 40), v=211, fold=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision(backend, device):
    dev = device if backend == "triton" else torch.device("cpu")
    compare(backend, dev, 1.25, dtype=torch.bfloat16, n=(2, 4), v=97)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lam_one_is_reverse_kl_to_teacher_and_ignores_reference(backend, device):
    dev = device if backend == "triton" else torch.device("cpu")
    student, teacher, ref = heads(device=dev)
    with_ref, dh_a, dw_a = run(lambda *a, **k: gopd_dense_loss(*a, backend=backend, **k),
                               student, teacher, ref, torch.float32, 1.0, lam=1.0)  # fmt: skip
    no_ref, dh_b, dw_b = run(lambda *a, **k: gopd_dense_loss(*a, backend=backend, **k),
                             student, teacher, None, torch.float32, 1.0, lam=1.0)  # fmt: skip
    torch.testing.assert_close(with_ref[0], no_ref[0])
    torch.testing.assert_close(dh_a, dh_b)
    torch.testing.assert_close(dw_a, dw_b)
    # Against KL(p_s || p_T) written out over the full vocabulary:
    log_ps = linear_log_softmax_reference(*(t.cpu().double() for t in student))
    log_pt = linear_log_softmax_reference(*(t.cpu().double() for t in teacher))
    kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()
    torch.testing.assert_close(no_ref[0].double().cpu(), kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_ref[1]["kl_teacher"], no_ref[1]["kl"])


def test_kl_teacher_stat_with_reference():
    stats, (student, teacher, _) = compare("torch", "cpu", 1.25, mask=False, temperature=0.8)
    log_ps = linear_log_softmax_reference(*(t.double() for t in student), temperature=0.8)
    log_pt = linear_log_softmax_reference(*(t.double() for t in teacher), temperature=0.8)
    kl_t = (log_ps.exp() * (log_ps - log_pt)).sum(-1).mean()
    torch.testing.assert_close(stats["kl_teacher"].double(), kl_t, atol=1e-5, rtol=1e-5)
    assert stats["kl_teacher"] != stats["kl"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grads", [True, False], ids=["with-grad", "no-grad"])
def test_without_teacher_kl_the_loss_and_gradients_do_not_change(backend, device, grads):
    student, teacher, ref = heads(device=device if backend == "triton" else "cpu", seed=4)
    runs = []
    for teacher_kl in (True, False):
        hs, ws = (t.clone().requires_grad_(grads) for t in student)
        with torch.set_grad_enabled(grads):
            loss, stats = gopd_dense_loss(
                hs, ws, *teacher, *ref, lam=1.25, teacher_kl=teacher_kl, backend=backend
            )
        if grads:
            loss.backward()
        runs.append((loss.detach(), stats, hs.grad, ws.grad))
    (loss_a, stats_a, dh_a, dw_a), (loss_b, stats_b, dh_b, dw_b) = runs
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(stats_a["kl"], stats_b["kl"])
    assert "kl_teacher" in stats_a and "kl_teacher" not in stats_b
    if grads:
        torch.testing.assert_close(dh_a, dh_b)
        torch.testing.assert_close(dw_a, dw_b)
    # at lam = 1 the KL to the teacher is the loss's own KL, reported either way
    _, stats = gopd_dense_loss(*student, *teacher, lam=1.0, teacher_kl=False, backend="torch")
    torch.testing.assert_close(stats["kl_teacher"], stats["kl"])


def test_num_tokens_and_empty_mask():
    student, teacher, ref = heads()
    mask = torch.zeros(3, 5, dtype=torch.bool)
    loss, stats = gopd_dense_loss(*student, *teacher, *ref, lam=1.25, mask=mask)
    assert loss.item() == 0 and stats["num_tokens"] == 0
    mask[1, 2] = True
    full, _ = gopd_dense_loss(*student, *teacher, *ref, lam=1.25, mask=mask)
    scaled, _ = gopd_dense_loss(*student, *teacher, *ref, lam=1.25, mask=mask, num_tokens=4)
    torch.testing.assert_close(scaled, full / 4)


def test_only_the_student_gets_gradients():
    student, teacher, ref = heads()
    hs, ht, wr = (t.clone().requires_grad_() for t in (student[0], teacher[0], ref[1]))
    loss, _ = gopd_dense_loss(hs, student[1], ht, teacher[1], ref[0], wr, lam=1.25)
    loss.backward()
    assert hs.grad is not None and hs.grad.abs().sum() > 0
    assert ht.grad is None and wr.grad is None


BAD = {
    "vocab-mismatch": (lambda s, t, r: (s, (t[0], t[1][:-1]), r, {}), "vocabularies must match"),
    "lead-mismatch": (lambda s, t, r: (s, (t[0][:2], t[1]), r, {}), "leading shape"),
    "dtype-mismatch": (lambda s, t, r: (s, (t[0].double(), t[1].double()), r, {}), "one dtype"),
    "ref-missing": (lambda s, t, r: (s, t, None, {"lam": 1.25}), "required when lam != 1"),
    "ref-half": (lambda s, t, r: (s, t, (r[0], None), {}), "together"),
    "lam-negative": (lambda s, t, r: (s, t, r, {"lam": -0.5}), "lam"),
    "mask-shape": (lambda s, t, r: (s, t, r, {"mask": torch.ones(3, 4, dtype=torch.bool)}), "mask"),
    "mask-float": (lambda s, t, r: (s, t, r, {"mask": torch.ones(3, 5)}), "mask"),
    "temperature": (lambda s, t, r: (s, t, r, {"temperature": -1.0}), "temperature"),
    "loss-agg": (lambda s, t, r: (s, t, r, {"loss_agg": "mean"}), "loss_agg"),
    "student-weight-1d": (lambda s, t, r: ((s[0], s[1][:, 0]), t, r, {}), "student_weight"),
    "teacher-kl-not-bool": (lambda s, t, r: (s, t, r, {"teacher_kl": 1}), "teacher_kl"),
    "student-bias-shape": (lambda s, t, r: (s, t, r, {"student_bias": torch.zeros(210)}), "student_bias"),
    "teacher-bias-dtype": (
        lambda s, t, r: (s, t, r, {"teacher_bias": torch.zeros(211).double()}),
        "teacher_bias",
    ),
    "ref-bias-alone": (lambda s, t, r: (s, t, None, {"ref_bias": torch.zeros(211)}), "ref_bias"),
    "ref-scale-alone": (lambda s, t, r: (s, t, None, {"ref_logit_scale": 0.5}), "ref_logit_scale=0.5 is"),
    "student-scale-zero": (lambda s, t, r: (s, t, r, {"student_logit_scale": 0.0}), "student_logit_scale"),
    "teacher-scale-nan": (lambda s, t, r: (s, t, r, {"teacher_logit_scale": math.nan}), "teacher_logit_"),
    "ref-scale-bool": (lambda s, t, r: (s, t, r, {"ref_logit_scale": True}), "ref_logit_scale"),
    "ref-cap-alone": (lambda s, t, r: (s, t, None, {"ref_logit_softcap": 30.0}), "ref_logit_softcap=30.0 is"),
    "teacher-cap-zero": (lambda s, t, r: (s, t, r, {"teacher_logit_softcap": 0.0}), "teacher_logit_softcap"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_inputs(case):
    make, match = BAD[case]
    student, teacher, ref, kw = make(*heads())
    ref = ref or (None, None)
    with pytest.raises(ValueError, match=match):
        gopd_dense_loss(*student, *teacher, *ref, **kw)


@pytest.mark.triton
@pytest.mark.parametrize(
    "lam, scale", [(1.0, 1.0), (1.25, 1.0), (1.25, 1e-3)], ids=["lam1", "exopd", "exopd-small"]
)
def test_fp16_gradients_keep_fp16_precision(lam, scale, device):
    """An fp16 student's dZ is fp16 times a power of two bounded by |g| (2 KL + 1): every row
    of dH and dW within a few fp16 roundings of float64 (a bf16 dZ gave 7e-3 to 1.1e-2 here)."""
    student, teacher, ref = heads((2, 8), 32003, (32, 48, 40), device=device, seed=3, dtype=torch.float16)
    kw = dict(lam=lam, temperature=1.0)
    _, dh, dw = run(lambda *a, **k: gopd_dense_loss(*a, backend="triton", fold=False, **k), student, teacher,
                    ref, torch.float16, scale, **kw)  # fmt: skip
    cpu64 = lambda hd: tuple(t.cpu().double() for t in hd)  # noqa: E731
    _, want_dh, want_dw = run(gopd_dense_loss_reference, cpu64(student), cpu64(teacher), cpu64(ref),
                              torch.float64, scale, **kw)  # fmt: skip
    assert dh.dtype == dw.dtype == torch.float16
    for got, want in ((dh.reshape(-1, 32), want_dh.reshape(-1, 32)), (dw, want_dw)):
        assert torch.isfinite(got).all()
        assert row_rel_err(got, want) <= FP16_DZ_ROW_REL, row_rel_err(got, want)


@pytest.mark.parametrize("seed", range(4))
def test_dz_bound_holds_for_any_target_distribution(seed):
    """The bound the fp16 scale rests on: |p_v (log p_v - log q_v - KL(p || q))| <= 2 KL + 1,
    for peaked, flat and nearly disjoint p and q (float64)."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.tensor([0.1, 1.0, 5.0, 30.0], dtype=torch.float64)[:, None, None]
    log_p = torch.log_softmax(torch.randn(4, 64, 1000, generator=g, dtype=torch.float64) * spread, -1)
    log_q = torch.log_softmax(torch.randn(4, 64, 1000, generator=g, dtype=torch.float64) * spread.flip(0), -1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1, keepdim=True)
    dz = p * (log_p - log_q - kl)
    assert (dz.abs() <= 2 * kl + 1).all()
    # half of p on a token q gives e^-40: |dz| reaches a quarter of the bound there (10.0 of 39.6)
    log_q = torch.log_softmax(torch.cat([torch.tensor([-40.0]), torch.zeros(999)]).double(), -1)
    p = torch.cat([torch.tensor([0.5]), torch.full((999,), 0.5 / 999)]).double()
    kl = (p * (p.log() - log_q)).sum()
    assert (p * (p.log() - log_q - kl)).abs().max() > 0.25 * (2 * kl + 1)
