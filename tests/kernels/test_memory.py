"""The torch backend never materialises [N, V]: peak memory of a fresh process stays bounded;
the folds free their tiles before casting their gradients.

Measured as peak RSS of a child process above its own baseline taken after the inputs
exist (ru_maxrss), for forward + backward, against the size the logits alone would take.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.kernels.helpers import make_inputs, profiled_peak_bytes

pytestmark = pytest.mark.slow

CHILD = r"""
import json, resource, sys, torch
from gopd_kernels import token_logprobs
n, d, v, ws_mb = map(float, sys.argv[1:])
n, d, v = int(n), int(d), int(v)
torch.manual_seed(0)
h = torch.randn(n, d, requires_grad=True)
w = (torch.randn(v, d) * 0.05).requires_grad_()
y = torch.randint(0, v, (n,))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
logp, ent = token_logprobs(h, w, y, return_entropy=True, backend="torch")
(logp.sum() + ent.sum()).backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_bytes": (peak - base) * 1024}))
"""


def test_peak_memory_is_independent_of_logits_size():
    n, d, v, ws_mb = 4096, 128, 32003, 64
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), str(d), str(v), str(ws_mb)],
        capture_output=True, text=True, timeout=600, env={"GOPD_WORKSPACE_MB": str(ws_mb), "PATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    extra = json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]
    logits_bytes = n * v * 4
    # Allowed: the workspace, dW and dH (O(V*D + N*D)), small per-token stats, allocator slack.
    bound = ws_mb * 2**20 + 3 * (v * d + n * d) * 4 + 32 * 2**20
    assert extra <= bound, (extra / 2**20, bound / 2**20)
    assert extra < logits_bytes / 2, (extra / 2**20, logits_bytes / 2**20)


FOLD_N, FOLD_D, FOLD_V = 512, 256, 4099  # D > chunk rows: casting dW (V x D) outweighs a tile


def _folded_bf16_peak(loss_fn, live_tiles: int, rows: int, models: int, monkeypatch) -> tuple[int, int, int]:
    """(profiled peak, bytes that must coexist when dH and dW are cast, one chunk's tiles) for
    loss_fn(h, w, teacher_h, teacher_w).backward() with bf16 student and teacher, torch backend
    (models: how many models' operands the fold upcasts to fp32)."""
    monkeypatch.setenv("GOPD_WORKSPACE_MB", str(live_tiles * rows * FOLD_V * 4 / 2**20))
    n, d, v = FOLD_N, FOLD_D, FOLD_V
    hidden, weight, _, _ = make_inputs(n, d, v, torch.bfloat16, bias=False)
    teacher_h, teacher_w, _, _ = make_inputs(n, d, v, torch.bfloat16, bias=False, seed=1)

    def step():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss_fn(h, w, teacher_h, teacher_w).backward()

    step()  # warm: lazy module state out of the measurement
    peak = profiled_peak_bytes(step)
    student = (n * d + v * d) * 2  # the clones above
    # at dW's cast: the fp32 operands (upcast on CPUs), fp32 dW and its bf16 copy, the bf16 dH
    at_cast = student + models * (n * d + v * d) * 4 + v * d * (4 + 2) + n * d * 2
    return peak, at_cast, live_tiles * rows * v * 4


@pytest.mark.parametrize("op", ["gopd_loss", "gopd_dense_loss"])
def test_fold_frees_its_tiles_before_casting_the_grads(op, monkeypatch):
    """A bf16 head's fold casts its fp32 dH and dW once, after the last chunk: the logits
    tiles, and the fp32 dH, must be gone by dW's cast. A view of the tiles left in a local once
    kept them through it, 1.2 GB of the peak at the H100 headline shape (N = 16384,
    V = 151936); the fp32 dH is 0.25 GB there."""
    import gopd_kernels as gk

    pytest.importorskip("torch.profiler._memory_profiler", reason="torch's private allocation timeline")
    targets, logp_t, logp_ref = torch.arange(FOLD_N) % FOLD_V, torch.randn(FOLD_N), torch.randn(FOLD_N)

    def policy(h, w, _th, _tw):
        return gk.gopd_loss(h, w, targets, logp_t, logp_ref, lam=1.25, backend="torch", fold=True)[0]

    def dense(h, w, th, tw):
        return gk.gopd_dense_loss(h, w, th, tw, teacher_kl=False, backend="torch", fold=True)[0]

    # gopd_loss: one fp32 tile of 64 rows; dense: two of 32 (student's, target's), and the
    # teacher's operands upcast beside the student's
    fn, live, rows, models = (policy, 1, 64, 1) if op == "gopd_loss" else (dense, 2, 32, 2)
    peak, at_cast, tiles = _folded_bf16_peak(fn, live, rows, models, monkeypatch)
    assert peak >= at_cast, (peak, at_cast)  # the profile sees the buffers the bound counts
    fp32_dh = FOLD_N * FOLD_D * 4
    assert peak < at_cast + min(tiles, fp32_dh) / 2, (
        (peak - at_cast) / 2**20,
        tiles / 2**20,
        fp32_dh / 2**20,
    )


@pytest.mark.parametrize("op", ["gopd_loss", "gopd_dense_loss"])
def test_fold_rounds_dh_per_chunk_without_an_fp32_copy(op, monkeypatch):
    """Many tokens, a small head: dH [N, D] outweighs everything else. The folds write each
    chunk's dH rows in bf16 through a [chunk, D] fp32 scratch; an fp32 [N, D] dH (cast at the
    end, so 6 bytes an element at once) would put the peak above the bound."""
    import gopd_kernels as gk

    pytest.importorskip("torch.profiler._memory_profiler", reason="torch's private allocation timeline")
    n, d, v, rows = 4096, 64, 257, 64
    live = 1 if op == "gopd_loss" else 2
    monkeypatch.setenv("GOPD_WORKSPACE_MB", str(live * rows * v * 4 / 2**20))
    hidden, weight, _, targets = make_inputs(n, d, v, torch.bfloat16, bias=False)
    t_hidden, t_weight, _, _ = make_inputs(n, d, v, torch.bfloat16, bias=False, seed=1)
    logp_t = torch.randn(n)

    def step():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        kw = dict(backend="torch", fold=True)
        if op == "gopd_loss":
            loss, _ = gk.gopd_loss(h, w, targets, logp_t, logp_t - 0.5, lam=1.25, **kw)
        else:
            loss, _ = gk.gopd_dense_loss(h, w, t_hidden, t_weight, teacher_kl=False, **kw)
        loss.backward()

    step()  # warm: lazy module state out of the measurement
    peak = profiled_peak_bytes(step)
    models = 1 if op == "gopd_loss" else 2
    # the clones, the fp32 operands (upcast on CPUs), dH in bf16, dW's fp32 sum and bf16 copy,
    # a chunk's tiles and scratch; the per-token vectors (a few fp32 [N] each, 16 KiB)
    held = (n * d + v * d) * 2 + models * (n * d + v * d) * 4 + n * d * 2 + v * d * 6
    bound = held + live * rows * v * 4 + rows * d * 4 + 32 * n * 4
    assert peak <= bound < peak + n * d * 2, (peak / 2**10, bound / 2**10)  # fp32 dH: 4 more bytes


@pytest.mark.parametrize("trained_head", [True, False], ids=["trained-head", "frozen-head"])
@pytest.mark.parametrize("op", ["gopd_loss", "gopd_dense_loss"])
def test_soft_capped_fold_stays_in_its_workspace(op, trained_head, monkeypatch):
    """A soft-capped head's fold (torch rows) reads each logit and its exponential together,
    the latter a column block at a time through a scratch that the chunk's rows make room for
    (fold_rows_torch.SCRATCH_TILES), as does gopd_loss's entropy (return_entropy): under one
    workspace, capped, with the entropy and plain peak alike, where a scratch left out of the
    budget would add 1 / CAP_BLOCKS of a tile (here 32 KiB)."""
    import gopd_kernels as gk
    from gopd_kernels.ops import fold_rows_torch

    pytest.importorskip("torch.profiler._memory_profiler", reason="torch's private allocation timeline")
    n, d, v, rows = 256, 32, 2053, 32
    tile, live = rows * v * 4, 1 if op == "gopd_loss" else 2  # the dense fold: a's tile and the target's
    monkeypatch.setenv("GOPD_WORKSPACE_MB", str(live * tile / 2**20))
    hidden, weight, _, targets = make_inputs(n, d, v, bias=False)
    t_hidden, t_weight, _, _ = make_inputs(n, d, v, bias=False, seed=1)
    logp_t = torch.randn(n)

    def step(cap, entropy):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trained_head)
        if op == "gopd_loss":
            loss, _ = gk.gopd_loss(h, w, targets, logp_t, logit_softcap=cap, backend="torch", fold=True,
                                   return_entropy=entropy)  # fmt: skip
        else:
            loss, _ = gk.gopd_dense_loss(h, w, t_hidden, t_weight, student_logit_softcap=cap,
                                         teacher_kl=False, backend="torch", fold=True)  # fmt: skip
        loss.backward()

    peaks = {}
    cases = [(None, False), (30.0, False)] + ([(None, True), (30.0, True)] if op == "gopd_loss" else [])
    for case in cases:
        step(*case)  # warm
        peaks[case] = profiled_peak_bytes(lambda case=case: step(*case))
    scratch = tile / fold_rows_torch.CAP_BLOCKS
    for case in cases[1:]:
        assert peaks[case] < peaks[(None, False)] + scratch / 2, {k: p / 2**10 for k, p in peaks.items()}
