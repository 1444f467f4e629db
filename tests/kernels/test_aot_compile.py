"""Every Triton kernel compiles for sm_80 and sm_90, uses tensor-core MMA and fits shared memory.

Runs `python -m gopd_kernels.aot` in a child process without TRITON_INTERPRET (which
would replace the kernels by interpreted functions), at every launch config the runtime
pruning can pick for each dtype and target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

pytestmark = [pytest.mark.aot, pytest.mark.slow]


@pytest.fixture(scope="module")
def aot_report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "gopd_kernels.aot", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.stdout, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_has_an_aot_variant(aot_report):
    assert aot_report["uncovered"] == []


def test_all_configs_compile_with_tensor_cores_within_shared_memory(aot_report):
    results = aot_report["results"]
    assert results
    failures = [r for r in results if not r["ok"]]
    assert not failures, failures
    for r in results:
        assert r["shared"] <= r["shared_limit"]
        assert any(("wgmma" if r["target"] == 90 else "mma.sync") in m for m in r["mma"]), r


def test_each_kernel_dtype_and_target_has_configs(aot_report):
    per = Counter((r["kernel"], r["operand_dtype"], r["target"]) for r in aot_report["results"])
    kernels = {k for k, _, _ in per}
    tile_kernels = (
        "vocab_partials_kernel",
        "logits_grad_kernel",
        "dense_kl_partials_kernel",
        "dense_kl_grad_kernel",
    )
    assert {*tile_kernels, "matmul_kernel"} <= kernels
    for kernel in tile_kernels:
        for dtype in ("bfloat16", "float16", "float32"):
            for target in (80, 90):
                assert per[(kernel, dtype, target)] >= 1, (kernel, dtype, target)
