"""pytest-benchmark microbenchmarks: every op x implementation of benchmarks/ops.py, a quick sweep.

    pytest benchmarks --benchmark-only                        # CPU: fp32, D=256, V=32000
    pytest benchmarks --benchmark-only -k "gopd_loss"         # one op
    pytest benchmarks --benchmark-only --benchmark-group-by=param:shape
    pytest benchmarks --benchmark-disable                     # the checks only, each case run once

Each case is first checked against the float64 naive reference (an assertion: a wrong
implementation fails rather than being timed), then timed in this process. Peak memory and
the side-by-side ratios are the report's job (python -m benchmarks.report).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import ops as bops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
# (N, D, V): small enough for a 2-core CPU; on CUDA a model-sized head
SHAPES = [(4096, 4096, 151936), (16384, 4096, 151936)] if CUDA else [(256, 256, 32000), (1024, 256, 32000)]
CASES = [(op, impl) for op, o in bops.OPS.items() for impl in o.impls]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_D{}_V{}".format(*s))
@pytest.mark.parametrize(("op_name", "impl_name"), CASES, ids=[f"{o}-{i}" for o, i in CASES])
def test_op(benchmark, op_name, impl_name, shape):
    op = bops.OPS[op_name]
    impl = op.impls[impl_name]
    why = impl.unavailable(DEVICE)
    if why:
        pytest.skip(why)
    n, d, v = shape
    small = bops.make_inputs(op, 67, d, v, DTYPE, DEVICE, seed=1)
    errors = bops.float64_errors(op, impl, small, bops.float64_reference(op, small))
    assert max(errors.values()) <= bops.tolerance(DTYPE), errors

    call = bops.with_leaves(bops.make_inputs(op, n, d, v, DTYPE, DEVICE), op)
    run = lambda: bops.run_impl(op, impl, call)
    sync = torch.cuda.synchronize if CUDA else lambda: None
    run()  # warm-up: compile, autotune, allocator
    benchmark.group = f"{op_name} N={n} D={d} V={v}"
    benchmark.extra_info["flops"] = op.flops(n, d, v)
    benchmark.pedantic(lambda: (run(), sync()), rounds=3 if CUDA else 2, warmup_rounds=0, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable: the check above, one untimed run
        benchmark.extra_info["tflops_per_s"] = op.flops(n, d, v) / benchmark.stats.stats.median / 1e12
