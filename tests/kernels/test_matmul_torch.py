"""The torch backend's GEMM operands (matmul_torch): bf16 and fp16 with float32 results
where torch has such GEMMs (CUDA), upcast elsewhere.

This CPU's torch has none, so the native path runs here with the GEMM emulated exactly as
cuBLAS computes it: half-precision operands, products and sums in fp32 (bf16 x bf16 and
fp16 x fp16 are exact in fp32).
"""

from __future__ import annotations

import logging

import pytest
import torch

from gopd_kernels import frozen_logprobs, gopd_dense_loss, gopd_loss, token_logprobs, token_logprobs_reference
from gopd_kernels.ops import matmul_torch
from gopd_kernels.reference import gopd_dense_loss_reference, gopd_loss_reference
from tests.kernels.helpers import FP16_DZ_ROW_REL, GRAD_REL, VALUE_ATOL, make_inputs, rel_err, row_rel_err
from tests.kernels.test_dense_kl import compare as compare_dense
from tests.kernels.test_dense_kl import heads
from tests.kernels.test_losses import batch, run_loss
from tests.kernels.test_token_logprobs import SHAPES, check_against_reference

CPU = torch.device("cpu")


def emulated_mm(a, b):
    """What cuBLAS computes for bf16 (or fp16) operands and a float32 result."""
    return torch.mm(a.float(), b.float())


def emulated_addmm(out, a, b, beta, alpha):
    out.addmm_(a.float(), b.float(), beta=beta, alpha=alpha)


@pytest.fixture
def fresh_probe():
    matmul_torch.bf16_gemm_mode.cache_clear()
    matmul_torch.fp16_gemm_mode.cache_clear()
    yield
    matmul_torch.bf16_gemm_mode.cache_clear()  # the next test probes the real torch again
    matmul_torch.fp16_gemm_mode.cache_clear()


def test_cublas_bf16_wants_bf16_throughout_and_the_gemm(monkeypatch):
    """The Triton backend's defaults hand GEMMs to torch only for bf16 operands throughout
    (None skipped: an absent reference) on a device with the bf16 -> fp32 GEMM."""
    b16, f32 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)
    monkeypatch.setattr(matmul_torch, "bf16_gemm_mode", lambda device: "addmm")
    assert matmul_torch.cublas_bf16(b16, b16, None)
    assert not matmul_torch.cublas_bf16(b16, f32)
    assert not matmul_torch.cublas_bf16(b16.half(), b16.half())
    monkeypatch.setattr(matmul_torch, "bf16_gemm_mode", lambda device: None)
    assert not matmul_torch.cublas_bf16(b16, b16)


def no_fused_accumulate(out, a, b, beta, alpha):
    raise RuntimeError("self and mat2 must have the same dtype")  # an older torch's addmm(out_dtype)


@pytest.fixture(params=["addmm", "mm"])
def native_gemms(request, monkeypatch, fresh_probe):
    """bf16 x bf16 and fp16 x fp16 -> fp32 GEMMs on the CPU, emulated, with ("addmm") or
    without ("mm") the in-place float32 accumulation; records the operands' dtypes."""
    seen = []

    def mm(a, b):
        seen.append((a.dtype, b.dtype))
        return emulated_mm(a, b)

    def addmm(out, a, b, beta, alpha):
        seen.append((a.dtype, b.dtype))
        emulated_addmm(out, a, b, beta, alpha)

    monkeypatch.setattr(matmul_torch, "_mm_fp32_out", mm)
    monkeypatch.setattr(
        matmul_torch, "_addmm_fp32_", addmm if request.param == "addmm" else no_fused_accumulate
    )
    assert matmul_torch.bf16_gemm_mode(CPU) == matmul_torch.fp16_gemm_mode(CPU) == request.param
    seen.clear()  # the probes' own GEMMs
    return seen


def test_cpu_torch_has_no_fp32_result_gemm_and_says_so(fresh_probe, caplog):
    with caplog.at_level(logging.WARNING, logger="gopd_kernels"):
        assert matmul_torch.bf16_gemm_mode(CPU) is None
    assert "no bf16 GEMM with a float32 result" in caplog.text and "upcast" in caplog.text
    assert matmul_torch.operand(torch.ones(2, 2, dtype=torch.bfloat16)).dtype == torch.float32
    assert matmul_torch.operand(torch.ones(2, 2, dtype=torch.float64)).dtype == torch.float64


def test_probe_refuses_a_gemm_that_rounds_its_result(monkeypatch, fresh_probe, caplog):
    monkeypatch.setattr(matmul_torch, "_mm_fp32_out", lambda a, b: torch.mm(a, b).float())
    ignores_beta = lambda out, a, b, beta, alpha: out.copy_(emulated_mm(a, b)).mul_(alpha)
    monkeypatch.setattr(matmul_torch, "_addmm_fp32_", ignores_beta)
    with caplog.at_level(logging.WARNING, logger="gopd_kernels"):
        assert matmul_torch.bf16_gemm_mode(CPU) is None  # the fused one drops beta, the plain one rounds
    assert "16.25 for 16.2509765625" in caplog.text


def test_probe_says_when_accumulation_takes_a_temporary(monkeypatch, fresh_probe, caplog):
    monkeypatch.setattr(matmul_torch, "_mm_fp32_out", emulated_mm)
    monkeypatch.setattr(matmul_torch, "_addmm_fp32_", no_fused_accumulate)
    with caplog.at_level(logging.WARNING, logger="gopd_kernels"):
        assert matmul_torch.bf16_gemm_mode(CPU) == "mm"
    assert "cannot accumulate bf16 GEMMs into float32 in place" in caplog.text


def test_half_precision_stays_where_native(native_gemms):
    for dtype in (torch.bfloat16, torch.float16):
        assert matmul_torch.operand(torch.ones(2, 2, dtype=dtype)).dtype == dtype
    assert matmul_torch.operand(torch.ones(2, 2)).dtype == torch.float32


def test_fp16_upcast_is_said_once_on_a_gpu_only(monkeypatch, fresh_probe, caplog):
    """Where torch has no fp16 GEMM with a float32 result, fp16 operands take float32 GEMMs. On
    a GPU (a T4's, a V100's) that forgoes its fp16 tensor cores, and a log line says so, once;
    a CPU has none to forgo, and this CPU's torch has no such GEMM."""
    on_gpu = torch.device("meta")  # stands for a CUDA device whose torch lacks the GEMM
    monkeypatch.setattr(matmul_torch, "_probe", lambda device, fused, dtype: "no out_dtype kernel")
    with caplog.at_level(logging.WARNING, logger="gopd_kernels"):
        assert matmul_torch.operand(torch.ones(2, 2, dtype=torch.float16)).dtype == torch.float32
        assert "fp16" not in caplog.text
        for _ in range(3):
            half = torch.ones(2, 2, dtype=torch.float16, device=on_gpu)
            assert matmul_torch.operand(half).dtype == torch.float32
    assert caplog.text.count("torch GEMMs on meta") == 1
    said = "has no fp16 GEMM with a float32 result (no out_dtype kernel); the torch backend upcasts"
    assert said in caplog.text


def test_tf32_fp32_gemms_are_said_once_on_ampere_and_newer(monkeypatch, caplog):
    """torch.set_float32_matmul_precision("high") makes torch's fp32 GEMMs TF32 on Ampere and
    newer GPUs, gopd's torch GEMMs included: said once per device and setting, never on a CPU,
    a T4 or under "highest"; and every fp32 GEMM asks."""
    from gopd_kernels import backend

    gpu = torch.device("cuda", 0)
    capability = {"cap": (8, 9)}
    monkeypatch.setattr(backend, "cuda_capability", lambda device: capability["cap"])
    matmul_torch.say_tf32.cache_clear()
    with caplog.at_level(logging.WARNING, logger="gopd_kernels"):
        for device, precision in ((gpu, "highest"), (torch.device("cpu"), "high")):
            matmul_torch.say_tf32(device, precision)
        capability["cap"] = (7, 5)  # a T4: no TF32
        matmul_torch.say_tf32(gpu, "medium")
        assert caplog.text == ""
        capability["cap"] = (9, 0)
        for _ in range(3):
            matmul_torch.say_tf32(gpu, "high")
    assert caplog.text.count("torch.get_float32_matmul_precision() is 'high'") == 1
    assert "run as TF32" in caplog.text and "cuda:0" in caplog.text
    asked = []
    monkeypatch.setattr(matmul_torch, "say_tf32", lambda device, precision: asked.append((device, precision)))
    out, a = torch.empty(3, 4), torch.ones(3, 5)
    matmul_torch.mm_into(out, a, torch.ones(5, 4))
    matmul_torch.mm_add(out, a, torch.ones(5, 4))
    matmul_torch.mm_into(out.double(), a.double(), torch.ones(5, 4, dtype=torch.float64))  # not fp32
    assert asked == [(out.device, torch.get_float32_matmul_precision())] * 2


@pytest.mark.parametrize("top", [3e-9, 1e-3, 1.0, 7e3, 6e4])
def test_scaled_operand_puts_an_fp16_tile_just_under_its_top(top):
    """An fp32 tile becomes an fp16 operand times a power of two s that lifts its largest entry
    into (FP16_DZ_TOP / 2, FP16_DZ_TOP]: exact to take back out (alpha = 1 / s), no overflow,
    and entries 2^-20 below the largest stay normal fp16 numbers. bf16 and fp32 operands take
    the tile as it is."""
    g = torch.Generator().manual_seed(0)
    tile = torch.randn(8, 301, generator=g)
    tile *= top / tile.abs().max()
    tile[0, 0] = top * 2.0**-20
    op, alpha = matmul_torch.scaled_operand(tile, torch.ones(1, dtype=torch.float16))
    s = 1 / alpha
    assert op.dtype == torch.float16 and s == 2.0 ** round(torch.log2(torch.tensor(s)).item())
    assert matmul_torch.FP16_DZ_TOP / 2 < op.float().abs().max() <= matmul_torch.FP16_DZ_TOP
    assert op[0, 0] != 0 and op[0, 0].abs() >= torch.finfo(torch.float16).tiny  # normal, not flushed
    torch.testing.assert_close(op.double() * alpha, tile.double(), rtol=2**-11, atol=0)
    for dtype in (torch.bfloat16, torch.float32):
        same, one = matmul_torch.scaled_operand(tile, torch.ones(1, dtype=dtype))
        assert same.dtype == dtype and one == 1.0 and torch.equal(same, tile.to(dtype))


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_mm_into_and_add_scale_and_accumulate_in_fp32(native_gemms, alpha):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(5, 7, generator=g).bfloat16() for _ in range(2))
    want = alpha * a.double() @ b.double().T
    out = torch.full((5, 5), float("nan"))  # mm_into ignores the old contents
    matmul_torch.mm_into(out, a, b.T, alpha=alpha)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    matmul_torch.mm_add(out, a, b.T, alpha=alpha)
    torch.testing.assert_close(out.double(), 2 * want, rtol=1e-6, atol=1e-6)
    assert set(native_gemms) == {(torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_token_logprobs_native_half_matches_reference(native_gemms, shape, dtype, monkeypatch):
    monkeypatch.setenv("GOPD_WORKSPACE_MB", "0.002")  # many row and vocabulary chunks
    check_against_reference(
        "torch", CPU, *shape, dtype, temperature=0.7, entropy=True, bias=True, ignore_frac=0.3
    )
    assert native_gemms and set(native_gemms) == {(dtype, dtype)}


def test_native_forward_keeps_fp32_logits(monkeypatch, fresh_probe):
    """bf16 operands are exact in the GEMM: the native log-probs equal the upcast path's to fp32
    rounding, where logits rounded to bf16 (|z| ~ 6 here) would be off by ~1e-2."""
    hidden, weight, bias, targets = make_inputs(33, 64, 1031, torch.bfloat16, bias=True, seed=2, scale=3.0)
    upcast = token_logprobs(hidden, weight, targets, bias=bias, backend="torch")  # this CPU: upcast
    monkeypatch.setattr(matmul_torch, "_mm_fp32_out", emulated_mm)
    monkeypatch.setattr(matmul_torch, "_addmm_fp32_", emulated_addmm)
    matmul_torch.bf16_gemm_mode.cache_clear()
    native = token_logprobs(hidden, weight, targets, bias=bias, backend="torch")
    assert (native - upcast).abs().max() <= 2e-5


@pytest.mark.parametrize(
    "backend, dtype",
    [("torch", torch.bfloat16), ("torch", torch.float16),
     pytest.param("triton", torch.bfloat16, marks=pytest.mark.triton),
     pytest.param("triton", torch.float16, marks=pytest.mark.triton)],
    ids=["torch-bf16", "torch-fp16", "triton-bf16", "triton-fp16"],
)  # fmt: skip
def test_frozen_head_native_half(native_gemms, monkeypatch, backend, dtype, device, narrow_row_blocks):
    """The frozen-head fold, by default, from half-precision operands: torch's E_p[W]
    accumulated from bf16 (or scaled fp16) probabilities and W; on Triton the full-vocabulary
    row chunks (the GEMMs emulated, the row passes Triton's; 0.002 MiB: 5 rows a chunk). Never
    the recomputing backward."""
    from tests.kernels.test_token_logprobs import _no_recompute

    _no_recompute(monkeypatch, backend)
    monkeypatch.setenv("GOPD_WORKSPACE_MB", "0.002")
    dev = device if backend == "triton" else CPU
    hidden, weight, bias, targets = make_inputs(130, 17, 97, dtype, dev, bias=True, ignore_frac=0.3)
    upstream = torch.randn(130, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = hidden.clone().requires_grad_()
    logp = token_logprobs(h, weight, targets, bias=bias, backend=backend)
    (logp.double().cpu() * upstream).sum().backward()
    h64 = hidden.cpu().double().requires_grad_()
    ref = token_logprobs_reference(h64, weight.cpu().double(), targets.cpu(), bias=bias.cpu().double())
    (ref * upstream).sum().backward()
    torch.testing.assert_close(logp.double().cpu(), ref.detach(), atol=VALUE_ATOL[dtype], rtol=1e-3)
    assert h.grad.dtype == dtype and rel_err(h.grad, h64.grad) <= GRAD_REL[dtype]
    assert set(native_gemms) == {(dtype, dtype)}


@pytest.mark.parametrize(
    "backend, chunk_rows, dtype",
    [("torch", 3, torch.bfloat16), ("torch", 3, torch.float16),
     pytest.param("triton", 3, torch.bfloat16, marks=pytest.mark.triton),
     # 24 rows: one chunk, dW straight to bf16
     pytest.param("triton", 24, torch.bfloat16, marks=pytest.mark.triton),
     # fp16: Triton's rows write an fp32 dz, scaled at the GEMMs
     pytest.param("triton", 3, torch.float16, marks=pytest.mark.triton),
     pytest.param("triton", 24, torch.float16, marks=pytest.mark.triton)],
    ids=["torch-bf16", "torch-fp16", "triton", "triton-one-chunk", "triton-fp16", "triton-fp16-one-chunk"],
)  # fmt: skip
def test_folded_gopd_loss_native_half(native_gemms, monkeypatch, backend, chunk_rows, dtype, device):
    """The fold's default where half-precision GEMMs give fp32 results: on Triton the row
    passes write a bf16 dZ over each chunk's logits, which the GEMMs then read with a row
    stride of 2V; for fp16 an fp32 dZ, scaled into fp16 for the GEMMs (on either backend).
    Only the fold runs torch's GEMMs on Triton (the recomputing path's are Triton's)."""
    monkeypatch.setenv("GOPD_WORKSPACE_MB", str(chunk_rows * 211 * 4 / 2**20))
    data = batch(b=3, t=8, d=17, v=211, seed=5)
    data["ref_used"] = data["ref"]
    if backend == "triton":
        data = {k: v.to(device) for k, v in data.items()}
    loss, dh, dw, _ = run_loss(lambda *a, **k: gopd_loss(*a, backend=backend, **k), data, dtype,
                               lam=1.25, temperature=0.8)  # fmt: skip
    data = {k: v.cpu() for k, v in data.items()}
    loss, dh, dw = loss.cpu(), dh.cpu(), dw.cpu()
    data64 = {**data, "hidden": data["hidden"].to(dtype), "weight": data["weight"].to(dtype)}
    ref_loss, ref_dh, ref_dw, _ = run_loss(
        gopd_loss_reference, data64, torch.float64, lam=1.25, temperature=0.8
    )
    torch.testing.assert_close(loss.double(), ref_loss, atol=VALUE_ATOL[dtype], rtol=1e-3)
    assert dh.dtype == dw.dtype == dtype
    assert rel_err(dh, ref_dh) <= GRAD_REL[dtype] and rel_err(dw, ref_dw) <= GRAD_REL[dtype]
    assert set(native_gemms) == {(dtype, dtype)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lam", [1.0, 1.25])
@pytest.mark.parametrize(
    "folded", [True, False, pytest.param("triton", marks=pytest.mark.triton)],
    ids=["folded", "streaming", "triton-folded"],
)  # fmt: skip
def test_dense_loss_native_half(native_gemms, monkeypatch, lam, folded, dtype, request):
    """Folded (with gradients) and the streaming forward (without); folded on the Triton
    backend too, its default for either half (the row passes Triton's, the GEMMs emulated)."""
    monkeypatch.setenv("GOPD_WORKSPACE_MB", str(6 * 211 * 4 / 2**20))
    if folded == "triton":
        compare_dense("triton", request.getfixturevalue("device"), lam, dtype=dtype)
    elif folded:
        compare_dense("torch", "cpu", lam, dtype=dtype)
    else:
        heads_half = [t for head in heads(dtype=dtype) for t in head]
        with torch.no_grad():
            _, stats = gopd_dense_loss(*heads_half, lam=lam, backend="torch")
        _, ref_kl = gopd_dense_loss_reference(*(t.double() for t in heads_half), lam=lam)
        torch.testing.assert_close(stats["kl"].double(), ref_kl.mean(), atol=1e-4, rtol=1e-4)
    assert native_gemms and set(native_gemms) == {(dtype, dtype)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_frozen_scoring_native_half(native_gemms, dtype):
    th, tw, _, y = make_inputs(41, 24, 211, dtype, bias=False, seed=1)
    rh, rw, _, _ = make_inputs(41, 16, 211, dtype, bias=False, seed=2)
    scores = frozen_logprobs(th, tw, y, rh, rw, temperature=0.9, backend="torch")
    for got, (h, w) in ((scores.teacher_logp, (th, tw)), (scores.ref_logp, (rh, rw))):
        want = token_logprobs_reference(h.double(), w.double(), y, temperature=0.9)
        torch.testing.assert_close(got.double(), want, atol=VALUE_ATOL[dtype], rtol=0)
    assert set(native_gemms) == {(dtype, dtype)}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the real half -> fp32 cuBLAS GEMMs")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_runs_native_half_gemms(fresh_probe, dtype):
    """On a GPU (torch >= 2.8) the probe finds cuBLAS's fp32-result GEMM for bf16 and fp16 (a
    T4's and a V100's path, fp16) and the ops are right with it."""
    cuda = torch.device("cuda", torch.cuda.current_device())
    assert matmul_torch.half_gemm_mode(cuda, dtype) is not None, (
        f"torch {torch.__version__}: no {dtype} mm(out_dtype=float32)"
    )
    check_against_reference(
        "torch", cuda, 130, 64, 1031, dtype, temperature=0.7, entropy=True, bias=True, ignore_frac=0.3
    )
    compare_dense("torch", "cuda", 1.25, dtype=dtype)


@pytest.mark.parametrize("op", ["token_logprobs", "gopd_loss"])
def test_fp16_operands_keep_small_gradients(native_gemms, op, monkeypatch):
    """Native fp16 GEMMs take dZ as fp16 scaled by a power of two. Upstream gradients of ~1e-4
    (a token mean over 10^4 tokens) over V = 4099 give dZ entries g p_v ~ 2e-8, under fp16's
    smallest subnormal (6e-8): unscaled, they flush to zero, and with them E_p[W] from
    dH = g (W_y - E_p[W]). The head's rows share a direction here, as real heads' do, so
    E_p[W] is no small part of dH: unscaled, dH's worst row is far off float64 (the check
    below runs both ways). Scaled, every gradient's worst row stays within the scaled fp16
    dZ's bound (FP16_DZ_ROW_REL)."""
    from gopd_kernels.ops import folded_loss_torch, linear_logsoftmax_torch

    n, d, v = 48, 32, 4099
    hidden, weight, _, targets = make_inputs(n, d, v, torch.float16, bias=False, seed=4)
    weight = weight + torch.linspace(-1.0, 1.0, d, dtype=torch.float16)  # a shared direction
    g = torch.Generator().manual_seed(5)
    upstream = torch.randn(n, generator=g, dtype=torch.float64) * 1e-4
    teacher = torch.randn(n, generator=g) - 8.0

    def grads(fn, h, w):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        fn(h, w).backward()
        return h.grad, w.grad

    if op == "token_logprobs":  # a per-token upstream gradient
        ours = lambda h, w: (token_logprobs(h, w, targets, backend="torch").double() * upstream).sum()  # noqa: E731
        ref = lambda h, w: (token_logprobs_reference(h, w, targets) * upstream).sum()  # noqa: E731
    else:  # the fold: a token mean over a large step (num_tokens) makes every dL/ds small
        kw = dict(lam=1.0, num_tokens=1e4)
        ours = lambda h, w: gopd_loss(h, w, targets, teacher, backend="torch", fold=True, **kw)[0]  # noqa: E731
        ref = lambda h, w: gopd_loss_reference(h, w, targets, teacher.double(), **kw)  # noqa: E731
    want = grads(ref, hidden.double(), weight.double())
    got = grads(ours, hidden, weight)
    assert all(t.dtype == torch.float16 for t in got)
    errors = [row_rel_err(t, r) for t, r in zip(got, want, strict=True)]
    assert max(errors) <= FP16_DZ_ROW_REL, errors
    assert set(native_gemms) == {(torch.float16, torch.float16)}
    unscaled = lambda tile, other: (tile.to(other.dtype), 1.0)  # noqa: E731
    monkeypatch.setattr(linear_logsoftmax_torch, "scaled_operand", unscaled)
    monkeypatch.setattr(folded_loss_torch, "scaled_operand", unscaled)
    flushed = grads(ours, hidden, weight)
    assert row_rel_err(flushed[0], want[0]) > 10 * FP16_DZ_ROW_REL  # the scale is what keeps them
