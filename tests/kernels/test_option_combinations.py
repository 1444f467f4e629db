"""Random combinations of the ops' options, each against the float64 reference.

Every option has tests of its own; these draw many at once, as a trainer meets them: a head
with a bias, a logit scale or a soft-cap, a temperature, ignored or masked rows, [B, T]
batches, strided views (NaN in the gaps, so a wrong stride shows), both backwards, workspaces
small enough to split the vocabulary into many chunks, off-policy ratios, truncated IS, every
loss mode. Each case comes from its seed: a failure's test id reproduces it.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from gopd_kernels import frozen_logprobs, gopd_advantage, gopd_dense_loss, gopd_loss, token_logprobs
from gopd_kernels.losses import LOSS_AGGS
from gopd_kernels.reference import gopd_dense_loss_reference, gopd_loss_reference, token_logprobs_reference

# error = max |ours - reference| / max(max |reference|, FLOOR): a float32 or 16-bit gradient far
# below 1 (a saturated softmax: 1e-8 where the head's scale is 3 and tau 0.7) keeps only its
# absolute precision. The worst errors of 2,000 torch and 600 Triton (interpreter) cases, seeds
# 1000-1499 and 2000-2149: float64 5e-13; float32 1.3e-4; fp16 8.6e-4; bf16 3.8e-3 on the
# torch backend (gradients returned in bf16) and 2.6e-2 on Triton's, whose dZ is bf16: a V = 2
# head's bias gradient, sums whose terms cancel to a few % of each keep each term's rounding.
TOL = {torch.float64: 1e-9, torch.float32: 5e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}
FLOOR = {torch.float64: 0.0, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}
VOCABS = (2, 3, 11, 61, 127, 257, 383)  # primes, and a vocabulary of two
WORKSPACES_MB = (None, "0.001", "0.01", "1")  # None: the backend's default


def check(name: str, ours: torch.Tensor | None, ref: torch.Tensor | None, dtype: torch.dtype) -> None:
    if ref is None:
        return
    assert ours is not None, f"{name}: missing"
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if not ref.numel():
        return
    diff = (ours.detach().double().cpu() - ref.detach().double()).abs().max()
    err = float(diff / max(float(ref.detach().abs().max()), FLOOR[dtype], 1e-300))
    assert err <= TOL[dtype], f"{name}: {err:.2e} off float64"


class Draw:
    """The seed's choices, and the inputs built from them (contiguous, on `device`, in `dtype`)."""

    def __init__(self, seed: int, dtypes: tuple, device: torch.device, monkeypatch):
        self.r = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.dtype, self.device = self.r.choice(dtypes), device
        self.d, self.v = self.r.choice((1, 3, 8, 17, 32)), self.r.choice(VOCABS)
        n = self.r.choice((1, 2, 7, 16, 33))
        self.shape = (self.r.choice((1, 2, 3)), n) if self.r.random() < 0.4 else (n,)
        self.strided = {"hidden": self.r.random() < 0.4, "head": self.r.random() < 0.2}
        workspace = self.r.choice(WORKSPACES_MB)
        if workspace:
            monkeypatch.setenv("GOPD_WORKSPACE_MB", workspace)
        self.temperature = self.r.choice((1.0, 0.7, 1.3))
        self.fold = self.r.choice((None, True, False))

    def tensor(self, shape, std=1.0) -> torch.Tensor:
        x = torch.randn(*shape, generator=self.g, dtype=torch.float64) * std
        return x.to(self.device, self.dtype)

    def hidden(self, d: int) -> torch.Tensor:
        return self.tensor((*self.shape, d))

    def head(self, d: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self.tensor((self.v, d), 2.0 / d**0.5)
        return weight, self.tensor((self.v,), 0.5) if self.r.random() < 0.4 else None

    def targets(self) -> torch.Tensor:
        y = torch.randint(0, self.v, self.shape, generator=self.g)
        if self.r.random() < 0.5:  # some rows ignored, or all of them
            y[torch.rand(self.shape, generator=self.g) < self.r.choice((0.2, 0.6, 1.0))] = -100
        return y.to(self.device)

    def cap(self, *choices) -> float | None:
        return self.r.choice((None, None, *choices))

    def logit_scale(self) -> float:
        return self.r.choice((1.0, 1.0, 0.25, 3.0))

    def laid_out(self, x: torch.Tensor | None, kind: str) -> torch.Tensor | None:
        """x, or (when the seed says so for this kind) the same values as every other column of a
        wider tensor with NaN between: a strided view, through which x still gets its gradient."""
        if x is None or not self.strided[kind]:
            return x
        return torch.stack([x, torch.full_like(x, math.nan)], -1).flatten(-2)[..., ::2]


def leaf(t: torch.Tensor | None, grad: bool = True) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().requires_grad_(grad)


def leaf64(t: torch.Tensor | None, grad: bool = True) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu().double().requires_grad_(grad)


def check_grads(ours: list, ref: list, names: str, dtype: torch.dtype) -> None:
    for name, a, b in zip(names.split(), ours, ref, strict=True):
        if b is not None and b.requires_grad:
            check(f"d{name}", a.grad, b.grad, dtype)


def case_token_logprobs(draw: Draw, backend: str) -> None:
    hidden, (weight, bias), targets = draw.hidden(draw.d), draw.head(draw.d), draw.targets()
    kw = dict(temperature=draw.temperature, logit_scale=draw.logit_scale(), logit_softcap=draw.cap(5.0, 30.0),
              return_entropy=draw.r.random() < 0.5)  # fmt: skip
    trained_head = kw["return_entropy"] or draw.r.random() < 0.7  # else frozen, as under LoRA
    fold = None if trained_head and draw.fold else draw.fold  # fold=True takes a frozen head only
    ours = [leaf(hidden), leaf(weight, trained_head), leaf(bias, trained_head)]
    ref = [leaf64(hidden), leaf64(weight, trained_head), leaf64(bias, trained_head)]
    out = token_logprobs(draw.laid_out(ours[0], "hidden"), draw.laid_out(ours[1], "head"), targets,
                         bias=ours[2], backend=backend, fold=fold, **kw)  # fmt: skip
    want = token_logprobs_reference(ref[0], ref[1], targets.cpu(), bias=ref[2], **kw)
    out, want = (out, want) if kw["return_entropy"] else ((out,), (want,))
    for name, o, w in zip(("logp", "entropy")[: len(out)], out, want, strict=True):
        check(name, o, w, draw.dtype)
    upstream = [torch.randn(w.shape, generator=draw.g, dtype=torch.float64) for w in want]
    sum((o.double().cpu() * u).sum() for o, u in zip(out, upstream, strict=True)).backward()
    sum((w * u).sum() for w, u in zip(want, upstream, strict=True)).backward()
    check_grads(ours, ref, "hidden weight bias", draw.dtype)


def case_gopd_loss(draw: Draw, backend: str) -> None:
    hidden, (weight, bias), targets = draw.hidden(draw.d), draw.head(draw.d), draw.targets()
    kw = dict(lam=draw.r.choice((1.0, 1.25, 0.5)), temperature=draw.temperature,
              logit_scale=draw.logit_scale(), logit_softcap=draw.cap(5.0, 30.0),
              clip_ratio=(0.2, 0.28))  # fmt: skip
    head_kw = {k: kw[k] for k in ("temperature", "logit_scale", "logit_softcap")}
    s = token_logprobs_reference(leaf64(hidden, False), leaf64(weight, False), targets.cpu(),
                                 bias=leaf64(bias, False), **head_kw)  # fmt: skip
    # log-probs near the student's, so that the ratios sit around the clip range
    near = lambda std: (s + std * torch.randn(s.shape, generator=draw.g, dtype=torch.float64)).clamp(max=0)  # noqa: E731
    logps = dict(teacher=near(1.0), ref=near(0.5) if kw["lam"] != 1 or draw.r.random() < 0.5 else None)
    if draw.r.random() < 0.5:
        logps["old_logp"] = near(0.3)
    if draw.r.random() < 0.4:
        logps["rollout_logp"] = near(0.3)
        kw["is_cap"] = draw.r.choice((None, 2.0))
    kw["loss_agg"] = draw.r.choice(LOSS_AGGS) if len(draw.shape) == 2 else "token-mean"
    if kw["loss_agg"] == "token-mean" and draw.r.random() < 0.3:
        kw["num_tokens"] = float(draw.r.choice((1, 5, 100)))
    given = {k: None if t is None else t.float().to(draw.device) for k, t in logps.items()}
    given64 = {k: None if t is None else t.float().double() for k, t in logps.items()}  # the same values
    ours = [leaf(hidden), leaf(weight), leaf(bias)]
    ref = [leaf64(hidden), leaf64(weight), leaf64(bias)]
    loss, _ = gopd_loss(draw.laid_out(ours[0], "hidden"), draw.laid_out(ours[1], "head"), targets,
                        given.pop("teacher"), given.pop("ref"), bias=ours[2], backend=backend, fold=draw.fold,
                        **given, **kw)  # fmt: skip
    want = gopd_loss_reference(ref[0], ref[1], targets.cpu(), given64.pop("teacher"), given64.pop("ref"),
                               bias=ref[2], **given64, **kw)  # fmt: skip
    check("loss", loss, want, draw.dtype)
    loss.backward()
    want.backward()
    check_grads(ours, ref, "hidden weight bias", draw.dtype)


def case_gopd_dense_loss(draw: Draw, backend: str) -> None:
    lam = draw.r.choice((1.0, 1.25, 0.5))
    with_ref = lam != 1 or draw.r.random() < 0.3
    widths = dict(student=draw.d, teacher=draw.r.choice((draw.d, draw.d + 3)), ref=draw.d)  # sizes may differ
    models = ("student", "teacher", "ref") if with_ref else ("student", "teacher")
    kw = dict(lam=lam, temperature=draw.temperature,
              loss_agg=draw.r.choice(LOSS_AGGS) if len(draw.shape) == 2 else "token-mean")  # fmt: skip
    heads = {}
    for model in models:
        heads[model] = (draw.hidden(widths[model]), *draw.head(widths[model]))
        kw[f"{model}_logit_scale"] = draw.r.choice((1.0, 0.5, 2.0))
        kw[f"{model}_logit_softcap"] = draw.cap(5.0)
    mask = (torch.rand(draw.shape, generator=draw.g) < 0.7) if draw.r.random() < 0.5 else None
    th, tw, tb = heads["teacher"]
    rh, rw, rb = heads.get("ref", (None, None, None))
    ours = [leaf(t) for t in heads["student"]]
    ref = [leaf64(t) for t in heads["student"]]
    loss, _ = gopd_dense_loss(draw.laid_out(ours[0], "hidden"), draw.laid_out(ours[1], "head"),
                              draw.laid_out(th, "hidden"), tw, rh, rw, student_bias=ours[2], teacher_bias=tb,
                              ref_bias=rb, mask=None if mask is None else mask.to(draw.device),
                              backend=backend, fold=draw.fold, **kw)  # fmt: skip
    th, tw, tb, rh, rw, rb = (leaf64(t, False) for t in (th, tw, tb, rh, rw, rb))
    want, _ = gopd_dense_loss_reference(ref[0], ref[1], th, tw, rh, rw, student_bias=ref[2], teacher_bias=tb,
                                        ref_bias=rb, mask=mask, **kw)  # fmt: skip
    check("loss", loss, want, draw.dtype)
    loss.backward()
    want.backward()
    check_grads(ours, ref, "hidden weight bias", draw.dtype)


def case_frozen_logprobs(draw: Draw, backend: str) -> None:
    targets, with_ref = draw.targets(), draw.r.random() < 0.7
    models = ("teacher", "ref") if with_ref else ("teacher",)
    heads, settings = {}, {}
    for model, d, caps in zip(models, (draw.d, draw.d + 1), ((5.0,), (30.0,)), strict=False):
        heads[model] = (draw.hidden(d), *draw.head(d))
        settings[model] = dict(logit_scale=draw.logit_scale(), logit_softcap=draw.cap(*caps))
    kw = {f"{model}_{k}": x for model in models for k, x in settings[model].items()}
    lam = draw.r.choice((1.0, 1.25)) if with_ref else 1.0
    student_logp = None
    if draw.r.random() < 0.5:  # the advantage too
        student_logp = (torch.randn(draw.shape, generator=draw.g) - 3).to(draw.device)
    th, tw, tb = heads["teacher"]
    rh, rw, rb = heads.get("ref", (None, None, None))
    scores = frozen_logprobs(draw.laid_out(th, "hidden"), draw.laid_out(tw, "head"), targets,
                             draw.laid_out(rh, "hidden"), rw, teacher_bias=tb, ref_bias=rb,
                             student_logp=student_logp, lam=lam, temperature=draw.temperature,
                             backend=backend, **kw)  # fmt: skip
    want = {}
    for model in models:
        h, w, b = (leaf64(t, False) for t in heads[model])
        want[model] = token_logprobs_reference(h, w, targets.cpu(), bias=b, temperature=draw.temperature,
                                               **settings[model])  # fmt: skip
    check("teacher_logp", scores.teacher_logp, want["teacher"], draw.dtype)
    if with_ref:
        check("ref_logp", scores.ref_logp, want["ref"], draw.dtype)
    if student_logp is not None:
        keep = targets.cpu() != -100
        advantage = gopd_advantage(student_logp.cpu().double(), want["teacher"], want.get("ref"), lam=lam)
        check("advantage", scores.advantage.cpu()[keep], advantage[keep], draw.dtype)


CASES = {
    "token_logprobs": case_token_logprobs,
    "gopd_loss": case_gopd_loss,
    "gopd_dense_loss": case_gopd_dense_loss,
    "frozen_logprobs": case_frozen_logprobs,
}


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("op", CASES)
def test_torch_backend(op, seed, monkeypatch):
    draw = Draw(seed, tuple(TOL), torch.device("cpu"), monkeypatch)
    CASES[op](draw, "torch")


@pytest.mark.triton
@pytest.mark.parametrize("seed", range(100, 110))
@pytest.mark.parametrize("op", CASES)
def test_triton_backend(op, seed, device, monkeypatch):
    draw = Draw(seed, (torch.float32, torch.float16, torch.bfloat16), device, monkeypatch)  # no float64
    CASES[op](draw, "triton")
