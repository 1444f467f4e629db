"""benchmarks.stages: each stage of the Triton token_logprobs is checked against torch before
it is timed (through the interpreter without a GPU), and a wrong stage stops the run."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import stages


@pytest.mark.triton
def test_every_stage_runs_checked_and_adds_up_to_the_tiles(device, monkeypatch):
    monkeypatch.setenv("GOPD_WORKSPACE_MB", str(54 * 512 * 2 / 2**20))  # 54 columns of bf16 for 512 rows
    rows, info = stages.measure(300, 32, 211, torch.bfloat16, device)
    assert info == {"tiles": 4, "rows": 300, "cols": 54}  # all rows (bucket 512), 4 vocabulary slices
    assert [r["stage"] for r in rows] == ["forward", "logit grad (tile)", "dH += (tile)", "dW (tile)",
                                          "fwd + bwd (autograd)"]  # fmt: skip
    assert all(r["ms"] > 0 for r in rows) and rows[-1]["cublas_ms"] is None
    assert rows[1]["flops"] == 2 * 300 * 32 * 54 and rows[-1]["flops"] == 8 * 300 * 32 * 211
    assert "4 x (logit grad + dH + dW)" in stages.table(rows, info["tiles"], None)


@pytest.mark.triton
def test_a_wrong_stage_fails_its_check(device, monkeypatch):
    real = stages.tri.logit_grads

    def off_by_a_bit(*args):
        real(*args)
        args[-1].mul_(1.1)  # dz

    monkeypatch.setattr(stages.tri, "logit_grads", off_by_a_bit)
    with pytest.raises(AssertionError, match="stage logit grad"):
        stages.measure(67, 32, 97, torch.float32, device)


def test_sweep_sets_each_value_compares_with_the_first_and_restores(monkeypatch):
    monkeypatch.setenv("GOPD_WORKSPACE_MB", "7")
    seen = []

    def measure(spec, names, rounds, repeats):
        mb = float(os.environ["GOPD_WORKSPACE_MB"])
        seen.append(mb)
        runs = {name: {"peak_bytes": [int(mb) << 20], "times_s": [mb / 1e3]} for name in names}
        return runs, {name: {"out": torch.full((4,), 1.0 + (mb > 1) * 0.5)} for name in names}

    monkeypatch.setattr(stages, "measure_cpu", measure)
    spec = stages.Spec("token_logprobs_fwd", 4, 8, 16, "float32")
    name, values = stages.parse_sweep("GOPD_WORKSPACE_MB=1.0,2.0")
    rows = stages.sweep(spec, ["gopd"], name, values, torch.device("cpu"))
    assert seen == [1.0, 2.0] and os.environ["GOPD_WORKSPACE_MB"] == "7"
    assert [r["vs_first"]["out"] for r in rows] == [0.0, pytest.approx(0.5)]
    assert "| 2.0 | gopd | 2.00 ms | 2 | 5e-01 |" in stages.sweep_table(rows, name)


@pytest.mark.parametrize("text", ["GOPD_WORKSPACE_MB", "GOPD_WORKSPACE_MB=", "TRITON_INTERPRET=1", "600"])
def test_a_malformed_sweep_names_the_option(text):
    with pytest.raises(ValueError, match="--sweep"):
        stages.parse_sweep(text)
