"""Bad input raises ValueError naming the argument, before any kernel runs."""

from __future__ import annotations

import math

import pytest
import torch

from gopd_kernels import token_logprobs

N, D, V = 6, 8, 13


def good():
    return dict(
        hidden=torch.randn(N, D),
        weight=torch.randn(V, D),
        targets=torch.randint(0, V, (N,)),
        bias=torch.randn(V),
    )


def call(**overrides):
    args = good()
    args.update(overrides)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    return token_logprobs(hidden, weight, targets, **args)


BAD = {
    "hidden-D-mismatch": (dict(hidden=torch.randn(N, D + 1)), "hidden"),
    "weight-1d": (dict(weight=torch.randn(V * D)), "weight"),
    "weight-3d": (dict(weight=torch.randn(1, V, D)), "weight"),
    "weight-empty-vocab": (
        dict(weight=torch.randn(0, D), bias=None, targets=torch.full((N,), -100)),
        "weight",
    ),
    "hidden-0d": (dict(hidden=torch.tensor(1.0)), "hidden"),
    "dtype-mismatch": (dict(hidden=torch.randn(N, D).bfloat16()), "hidden"),
    "bias-dtype": (dict(bias=torch.randn(V).half()), "bias"),
    "bias-shape": (dict(bias=torch.randn(V + 1)), "bias"),
    "bias-not-tensor": (dict(bias=[0.0] * V), "bias"),
    "int-hidden": (dict(hidden=torch.ones(N, D, dtype=torch.int32)), "hidden"),
    "float8-weight": (dict(weight=torch.randn(V, D).to(torch.float8_e4m3fn)), "weight"),
    "hidden-not-tensor": (dict(hidden=[[0.0] * D] * N), "hidden"),
    "targets-float": (dict(targets=torch.zeros(N)), "targets"),
    "targets-bool": (dict(targets=torch.zeros(N, dtype=torch.bool)), "targets"),
    "targets-shape": (dict(targets=torch.zeros(N + 1, dtype=torch.long)), "targets"),
    "targets-too-large": (dict(targets=torch.full((N,), V)), "targets"),
    "targets-negative": (dict(targets=torch.full((N,), -1)), "targets"),
    "targets-not-tensor": (dict(targets=[0] * N), "targets"),
    "temperature-zero": (dict(temperature=0.0), "temperature"),
    "temperature-negative": (dict(temperature=-1.0), "temperature"),
    "temperature-nan": (dict(temperature=math.nan), "temperature"),
    "temperature-inf": (dict(temperature=math.inf), "temperature"),
    "temperature-str": (dict(temperature="1.0"), "temperature"),
    "temperature-bool": (dict(temperature=True), "temperature"),
    "logit-softcap-zero": (dict(logit_softcap=0.0), "logit_softcap"),
    "logit-softcap-inf": (dict(logit_softcap=math.inf), "logit_softcap"),
    "logit-softcap-str": (dict(logit_softcap="30"), "logit_softcap"),
    "logit-scale-zero": (dict(logit_scale=0.0), "logit_scale"),
    "logit-scale-negative": (dict(logit_scale=-0.25), "logit_scale"),
    "logit-scale-nan": (dict(logit_scale=math.nan), "logit_scale"),
    "logit-scale-bool": (dict(logit_scale=True), "logit_scale"),
    "logit-scale-tensor": (dict(logit_scale=torch.tensor(0.5)), "logit_scale"),
    "tau-over-scale-underflows": (dict(temperature=1e-300, logit_scale=1e300), "temperature / logit_scale"),
    "ignore-index-float": (dict(ignore_index=-100.0), "ignore_index"),
    "return-entropy-str": (dict(return_entropy="yes"), "return_entropy"),
    "backend-unknown": (dict(backend="cuda"), "backend"),
    "float64-triton": (
        dict(
            hidden=torch.randn(N, D).double(), weight=torch.randn(V, D).double(), bias=None, backend="triton"
        ),
        "float64",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_raises_value_error_naming_argument(case):
    overrides, name = BAD[case]
    with pytest.raises(ValueError, match=name):
        call(**overrides)


def test_ignore_index_may_sit_outside_the_vocabulary():
    targets = torch.randint(0, V, (N,))
    targets[0] = -100
    out = call(targets=targets)
    assert out[0] == 0 and torch.isfinite(out).all()


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        call(backend="triton")


def test_bad_workspace_setting_is_refused(monkeypatch):
    monkeypatch.setenv("GOPD_WORKSPACE_MB", "lots")
    with pytest.raises(ValueError, match="GOPD_WORKSPACE_MB"):
        call(backend="torch")
