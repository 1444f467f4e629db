"""The torch backend never materialises [N, V]: peak memory of a fresh process stays bounded.

Measured as peak RSS of a child process above its own baseline taken after the inputs
exist (ru_maxrss), for forward + backward, against the size the logits alone would take.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
