"""frozen_logprobs: teacher and reference scoring in one pass, and the advantage."""

from __future__ import annotations

import pytest
import torch

from gopd_kernels import frozen_logprobs, gopd_advantage, token_logprobs_reference
from tests.kernels.helpers import cublas_bf16_as_on_cuda

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def models(device, n=(2, 9), v=1031, dims=(24, 17), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in dims:
        h = torch.randn(*n, d, generator=g)
        w = torch.randn(v, d, generator=g) * (2.0 / d**0.5)
        b = torch.randn(v, generator=g) * 0.3
        out.append(tuple(t.to(device=device, dtype=dtype) for t in (h, w, b)))
    targets = torch.randint(0, v, n, generator=g)
    targets[0, -2:] = -100
    return out, targets.to(device)


@pytest.mark.parametrize(
    "backend, logits_gemm",
    [("torch", None), pytest.param("triton", None, marks=pytest.mark.triton),
     pytest.param("triton", "torch", marks=pytest.mark.triton)],
    ids=["torch", "triton", "triton-logits-by-torch"],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "scales, caps",
    [((1.0, 1.0), (None, None)), ((0.25, 3.0), (None, None)), ((1.0, 0.5), (3.0, None))],
    ids=["plain", "logit-scales", "teacher-soft-capped"],
)
def test_teacher_and_reference_match_reference(
    backend, logits_gemm, dtype, scales, caps, device, monkeypatch
):
    """GOPD_LOGITS_GEMM=torch: each model's tiles by torch's GEMMs, not the two-model launch.
    logit-scales: each model multiplies its logits by its own s (as Granite's do), also in the
    one launch that streams both; teacher-soft-capped: the teacher's logits soft-capped, the
    reference's scaled, in the one launch (a cap keeps them out of torch's tiles)."""
    if logits_gemm:
        from gopd_kernels.ops import linear_logsoftmax_triton

        monkeypatch.setenv("GOPD_LOGITS_GEMM", logits_gemm)
        if caps == (None, None):
            monkeypatch.setattr(linear_logsoftmax_triton, "forward_models", None)  # calling it fails
    dev = device if backend == "triton" else torch.device("cpu")
    (teacher, ref), targets = models(dev, dtype=dtype)
    student_logp = -torch.rand(targets.shape, device=dev)
    scores = frozen_logprobs(
        teacher[0], teacher[1], targets, ref[0], ref[1], teacher_bias=teacher[2], ref_bias=ref[2],
        student_logp=student_logp, lam=1.25, temperature=0.7, teacher_logit_scale=scales[0],
        ref_logit_scale=scales[1], teacher_logit_softcap=caps[0], ref_logit_softcap=caps[1], backend=backend,
    )  # fmt: skip
    to64 = lambda t: t.cpu().double()
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    outs = (scores.teacher_logp, scores.ref_logp)
    for got, (h, w, b), s, c in zip(outs, (teacher, ref), scales, caps, strict=True):
        want = token_logprobs_reference(
            to64(h), to64(w), targets.cpu(), bias=to64(b), temperature=0.7, logit_scale=s, logit_softcap=c
        )
        torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=atol)
        assert got.dtype == torch.float32 and not got.requires_grad
    adv = gopd_advantage(student_logp, scores.teacher_logp, scores.ref_logp, lam=1.25)
    valid = targets != -100
    torch.testing.assert_close(scores.advantage[valid], adv[valid])
    assert (scores.advantage[~valid] == 0).all() and (scores.teacher_logp[~valid] == 0).all()


@pytest.mark.triton
@pytest.mark.parametrize(
    "dtype, logits_gemm, per_model",
    [(torch.bfloat16, None, True), (torch.float32, None, False), (torch.bfloat16, "triton", False)],
    ids=["bf16", "fp32", "bf16-fused-asked"],
)  # fmt: skip
def test_default_tiles_follow_the_measurement(dtype, logits_gemm, per_model, device, monkeypatch):
    """Unset, GOPD_LOGITS_GEMM gives bf16 heads on a cuBLAS device one model after the other with
    cuBLAS tiles (H100: 68.5 against 89.3 ms for the two-model launch); fp32 heads, and
    GOPD_LOGITS_GEMM=triton, keep the two-model launch. The scores match the reference either way."""
    from gopd_kernels.ops import linear_logsoftmax_triton as tri

    calls = {"two-model launch": 0, "cuBLAS tiles": 0}

    def spy(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    monkeypatch.setattr(tri, "cublas_bf16", cublas_bf16_as_on_cuda)
    monkeypatch.setattr(tri, "forward_models", spy("two-model launch", tri.forward_models))
    monkeypatch.setattr(tri, "_forward_torch_logits", spy("cuBLAS tiles", tri._forward_torch_logits))
    if logits_gemm:
        monkeypatch.setenv("GOPD_LOGITS_GEMM", logits_gemm)
    else:
        monkeypatch.delenv("GOPD_LOGITS_GEMM", raising=False)
    (teacher, ref), targets = models(device, dtype=dtype)
    scores = frozen_logprobs(teacher[0], teacher[1], targets, ref[0], ref[1], teacher_bias=teacher[2],
                             ref_bias=ref[2], backend="triton")  # fmt: skip
    assert calls == ({"two-model launch": 0, "cuBLAS tiles": 2} if per_model else
                     {"two-model launch": 1, "cuBLAS tiles": 0})  # fmt: skip
    to64 = lambda t: t.cpu().double()
    for got, (h, w, b) in ((scores.teacher_logp, teacher), (scores.ref_logp, ref)):
        want = token_logprobs_reference(to64(h), to64(w), targets.cpu(), bias=to64(b))
        atol = 1e-5 if dtype == torch.float32 else 1e-3
        torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_only(backend, device):
    dev = device if backend == "triton" else torch.device("cpu")
    (teacher, _), targets = models(dev, v=97)
    s = -torch.rand(targets.shape, device=dev)
    scores = frozen_logprobs(teacher[0], teacher[1], targets, student_logp=s, backend=backend)
    assert scores.ref_logp is None
    valid = targets != -100
    torch.testing.assert_close(scores.advantage[valid], (scores.teacher_logp - s)[valid])


def test_no_graph_even_when_inputs_require_grad():
    (teacher, ref), targets = models("cpu", v=97)
    h = teacher[0].clone().requires_grad_()
    scores = frozen_logprobs(h, teacher[1], targets, ref[0], ref[1])
    assert not scores.teacher_logp.requires_grad and not scores.ref_logp.requires_grad


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t, r, y: (t, (r[0], r[1][:-1], None), y, {}), "V="),
        (lambda t, r, y: (t, (r[0][:1], r[1], None), y, {}), "leading shape"),
        (lambda t, r, y: (t, (r[0].double(), r[1].double(), None), y, {}), "dtype"),
        (lambda t, r, y: (t, None, y, {"student_logp": torch.zeros(y.shape), "lam": 1.25}), "reference"),
        (lambda t, r, y: (t, r, y, {"student_logp": torch.zeros(3)}), "student_logp"),
        (lambda t, r, y: (t, r, torch.full(y.shape, 5000), {}), "targets"),
        (lambda t, r, y: (t, r, y, {"lam": -1.0}), "lam"),
        (lambda t, r, y: (t, None, y, {"ref_bias": r[2]}), "ref_bias is given without ref_hidden"),
        (lambda t, r, y: (t, None, y, {"ref_logit_scale": 0.5}), "ref_logit_scale=0.5 is given without"),
        (lambda t, r, y: (t, None, y, {"ref_logit_softcap": 30.0}), "ref_logit_softcap=30.0 is given"),
    ],
)
def test_bad_inputs(change, match):
    (teacher, ref), targets = models("cpu", v=97)
    teacher, ref, targets, kw = change(teacher, ref, targets)
    rh, rw = (None, None) if ref is None else ref[:2]
    with pytest.raises(ValueError, match=match):
        frozen_logprobs(teacher[0], teacher[1], targets, rh, rw, **kw)
