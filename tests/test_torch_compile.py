"""The public ops inside a torch.compile'd function: one graph break each, eager results."""

from __future__ import annotations

import torch

from gopd_kernels import frozen_logprobs, gopd_dense_loss, gopd_loss, token_logprobs


def test_compiled_callers_run_the_ops_as_they_are_with_one_graph_break_each():
    torch.manual_seed(0)
    n, d, v = 24, 16, 97
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    t_h, t_w = torch.randn(n, d), torch.randn(v, d)
    y = torch.randint(0, v, (n,))
    y[5] = -100

    def step(h, w):
        scores = frozen_logprobs(t_h, t_w, y, h.detach(), w.detach())
        logp = token_logprobs(h, w, y)
        loss, _ = gopd_loss(h, w, y, scores.teacher_logp, scores.ref_logp, lam=1.25)
        dense, _ = gopd_dense_loss(h, w, t_h, t_w, lam=1.0, mask=y != -100)
        return (logp * torch.linspace(0, 1, n)).sum() + loss + dense

    def grads(fn):
        h.grad = w.grad = None
        out = fn(h, w)
        out.backward()
        return out.detach(), h.grad.clone(), w.grad.clone()

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = grads(torch.compile(step, backend="eager"))
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert sum(breaks.values()) == 4 and all("torch.compiler.disable" in k for k in breaks), breaks
    for got, want in zip(compiled, grads(step), strict=True):
        torch.testing.assert_close(got, want)
