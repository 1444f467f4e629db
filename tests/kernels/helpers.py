"""Shared test helpers: seeded inputs, float64 references, error measures."""

from __future__ import annotations

import importlib
import os
import pkgutil

import torch

from gopd_kernels import token_logprobs_reference
from gopd_kernels.reference import rel_err, row_rel_err  # noqa: F401  (the tests' error measures)

# Value and gradient tolerances per input dtype (gradients: max error / max |reference|).
VALUE_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-10}
GRAD_REL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}
# The worst row's relative error of a gradient (reference.row_rel_err), per input dtype: what the GEMMs'
# 16-bit dZ operand and the rounded output cost passes (measured at token_logprobs' test shapes
# and two seeds: bf16 2.8e-3 on the torch backend's fp32 dZ, 1.08e-2 on Triton's bf16 dZ; fp16
# 3.4e-4 and 5.7e-4 on Triton's scaled fp16 dZ, a bf16 dZ still where fp16 heads take cuBLAS
# tiles when asked: linear_logsoftmax_triton.logit_grad_dtype); logits rounded to bf16 before the
# softmax do not (the naive reference in bf16: its dW 5e-2 to 0.34 where V > 5). The error set
# against the largest entry (GRAD_REL) lets both pass. FP16_DZ_ROW_REL: the scaled fp16 dZ's
# bound (token_logprobs' and the dense losses' backwards).
GRAD_ROW_REL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 1.5e-2, torch.float64: 1e-10}
FP16_DZ_ROW_REL = 2e-3


def make_inputs(n, d, v, dtype=torch.float32, device="cpu", bias=True, ignore_frac=0.0, seed=0, scale=1.0):
    """Hidden states and an LM head whose logits have a realistic spread (std ~ 2 * scale)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g) * scale
    weight = torch.randn(v, d, generator=g) * (2.0 / d**0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_frac:
        targets[torch.rand(n, generator=g) < ignore_frac] = -100
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return to(hidden), to(weight), to(b), targets.to(device)


def run_with_grads(fn, hidden, weight, bias, upstream):
    """Call fn(h, w, b) -> output(s); backprop sum(out_i * upstream_i); return (outs, grads)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * g.to(o.device)).sum() for o, g in zip(outs, upstream, strict=True))
    loss.backward()
    return outs, [None if t is None else t.grad for t in leaves]


def reference_with_grads(hidden, weight, bias, targets, upstream, **kw):
    """The float64 reference on the same (already rounded) values, with its gradients."""
    to64 = lambda t: None if t is None else t.detach().cpu().double()
    fn = lambda h, w, b: token_logprobs_reference(h, w, targets.cpu(), bias=b, **kw)
    return run_with_grads(fn, to64(hidden), to64(weight), to64(bias), upstream)


def autotuned_kernels() -> dict:
    """Every triton.autotune wrapper in gopd_kernels' Triton modules, by name."""
    from triton.runtime.autotuner import Autotuner

    from gopd_kernels import ops

    found = {}
    for info in pkgutil.iter_modules(ops.__path__):
        if info.name.endswith("_triton"):
            module = importlib.import_module(f"gopd_kernels.ops.{info.name}")
            found.update({name: obj for name, obj in vars(module).items() if isinstance(obj, Autotuner)})
    return found


def profiled_peak_bytes(fn) -> int:
    """Peak bytes of CPU tensors alive at once while fn() runs, above what lived before: the
    profiler's allocation timeline (torch.profiler's memory profile), so a test can check on a
    CPU which buffers a kernel's host code keeps alive together, as a GPU's peak would show."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action  # private: the timeline export's own

    options = dict(profile_memory=True, record_shapes=True, with_stack=True)  # what the timeline needs
    with profile(activities=[ProfilerActivity.CPU], **options) as p:
        fn()
    live = peak = 0
    for _, action, _, size in p._memory_profile().timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def cublas_half_as_on_cuda(*tensors) -> bool:
    """matmul_torch.cublas_half as a CUDA device answers it (one half dtype throughout), for
    tests of the Triton backend's fold defaults on a CPU, whose torch may lack those GEMMs."""
    dtypes = {t.dtype for t in tensors if t is not None}
    return len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16}


def cublas_bf16_as_on_cuda(*tensors) -> bool:
    """matmul_torch.cublas_bf16 as a CUDA device answers it (bf16 throughout), for tests of
    the Triton backend's defaults on a CPU, whose torch may lack the bf16 GEMM."""
    return all(t.dtype == torch.bfloat16 for t in tensors if t is not None)


def _gloo_rank(rank: int, world: int, out_dir: str, fn, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share the machine's cores
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # as torchrun's
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # no rank closes its connections while another still reads from them
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(out_dir, world: int, fn, *args) -> list:
    """fn(rank, world, *args) on `world` spawned CPU processes in one gloo group; their return
    values, by rank (fn: a module-level function; its result saved with torch.save)."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_rank, args=(world, str(out_dir), fn, args), nprocs=world, join=True)
    return [torch.load(f"{out_dir}/rank{r}.pt", weights_only=False) for r in range(world)]


def fresh_device_caches(monkeypatch) -> None:
    """triton_common's per-device figures (shared memory, stages kept in registers) are cached per
    device index: give a test with a fake device empty caches of its own, restored after it."""
    import functools

    from gopd_kernels.ops import triton_common

    for cached in (triton_common.device_shared_limit, triton_common.device_stages_in_registers):
        monkeypatch.setattr(triton_common, cached.__name__, functools.cache(cached.__wrapped__))
