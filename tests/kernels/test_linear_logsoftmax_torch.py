"""The chunked torch twin: gradcheck in float64, tiling rules, the workspace bound."""

from __future__ import annotations

import pytest
import torch

from gopd_kernels import token_logprobs
from gopd_kernels.ops.linear_logsoftmax_torch import LIVE_TILES, tile_shape


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("scale, softcap", [(1.0, None), (0.7, 1.5)], ids=["plain", "scaled-and-soft-capped"])
def test_gradcheck_float64(entropy, scale, softcap, monkeypatch):
    monkeypatch.setenv("GOPD_WORKSPACE_MB", str(2 * 3 * 4 * 8 / 2**20))  # tiles of 3 x 4: many chunks
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([0, 10, -100, 3, 7])

    def fn(h, w, b):
        out = token_logprobs(h, w, targets, bias=b, temperature=0.6, logit_scale=scale, logit_softcap=softcap,
                             return_entropy=entropy, backend="torch")  # fmt: skip
        return out if entropy else (out,)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "rows,vocab,workspace",
    [
        (1, 151936, 64 << 20),
        (4096, 151936, 64 << 20),
        (100_000, 50, 64 << 20),
        (7, 5, 8),
        (5000, 97, 1 << 20),
    ],
)
def test_tile_shape_respects_budget(rows, vocab, workspace):
    r, v = tile_shape(rows, vocab, workspace, torch.float32)
    assert 1 <= r <= rows and 1 <= v <= vocab
    assert r * v * 4 * LIVE_TILES <= max(workspace, 4 * LIVE_TILES)


def test_float64_stays_float64():
    h = torch.randn(3, 4, dtype=torch.float64)
    w = torch.randn(7, 4, dtype=torch.float64)
    out = token_logprobs(h, w, torch.tensor([1, 2, 3]), backend="torch")
    assert out.dtype == torch.float64
