"""benchmarks.stages: each stage of the Triton token_logprobs is checked against torch before
it is timed (through the interpreter without a GPU), and a wrong stage stops the run."""

from __future__ import annotations

import pytest
import torch

from benchmarks import stages


@pytest.mark.triton
def test_every_stage_runs_checked_and_adds_up_to_the_chunks(device, monkeypatch):
    monkeypatch.setenv("GOPD_WORKSPACE_MB", str(130 * 211 * 2 / 2**20))  # 130 rows of bf16 dZ: 3 chunks
    rows, info = stages.measure(300, 32, 211, torch.bfloat16, device)
    assert info == {"chunks": 3, "rows": 128}  # 130 rounded down to whole 128-row tiles
    assert [r["stage"] for r in rows] == ["forward", "logit grad (chunk)", "dH (chunk)", "dW += (chunk)",
                                          "fwd + bwd (autograd)"]  # fmt: skip
    assert all(r["ms"] > 0 for r in rows) and rows[-1]["cublas_ms"] is None
    assert rows[1]["flops"] == 2 * 128 * 32 * 211 and rows[-1]["flops"] == 8 * 300 * 32 * 211
    assert "3 x (logit grad + dH + dW)" in stages.table(rows, info["chunks"], None)


@pytest.mark.triton
def test_a_wrong_stage_fails_its_check(device, monkeypatch):
    real = stages.tri.logit_grads

    def off_by_a_bit(*args):
        real(*args)
        args[-1].mul_(1.1)  # dz

    monkeypatch.setattr(stages.tri, "logit_grads", off_by_a_bit)
    with pytest.raises(AssertionError, match="stage logit grad"):
        stages.measure(67, 32, 97, torch.float32, device)
