"""Compile every Triton kernel ahead of time for sm_80 (A100) and sm_90 (H100), no GPU needed.

For each kernel, input dtype, target and launch config that the runtime pruning can pick,
this reports the shared memory the compiled kernel uses and the tensor-core instructions
in its PTX (``mma.sync`` on sm_80, ``wgmma`` on sm_90). The interpreter accepts code that
the GPU compiler rejects (small or non-power-of-two dots, mixed dtypes), so this is the
proof that the kernels build for real GPUs.

    python -m gopd_kernels.aot            # a table; exit status 1 if anything fails

Must run without TRITON_INTERPRET=1 (the interpreter replaces @triton.jit functions).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

TARGETS = (80, 90)
MMA_PATTERN = {80: r"\bmma\.sync\.aligned\.\S+", 90: r"\bwgmma\.mma_async\.\S+"}
TRITON_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class KernelVariant:
    """One kernel with concrete argument types; `pointers` maps *_ptr args to dtypes."""

    module: str
    kernel: str
    configs: str  # name of the module's config list
    tile: tuple[str, str, str]  # (A rows, B rows, depth) config keys, for shared-memory pruning
    operand_dtype: str  # what the pruning sees as the element type of the streamed tiles
    pointers: dict
    constexprs: dict
    floats: tuple[str, ...] = ()


def kernel_variants() -> list[KernelVariant]:
    lls = "gopd_kernels.ops.linear_logsoftmax_triton"
    mm = "gopd_kernels.ops.matmul_triton"
    dense = "gopd_kernels.ops.dense_kl_triton"
    tile = ("BLOCK_M", "BLOCK_V", "BLOCK_D")
    out = []
    for dt in ("bfloat16", "float16", "float32"):
        x = TRITON_DTYPE[dt]
        prec = "tf32x3" if dt == "float32" else "ieee"
        common = dict(HAS_BIAS=True, WITH_ENTROPY=True, DOT_PRECISION=prec)
        out.append(KernelVariant(
            lls, "vocab_partials_kernel", "TILE_CONFIGS", tile, dt,
            {"h_ptr": x, "w_ptr": x, "b_ptr": x, "h2_ptr": x, "w2_ptr": x, "b2_ptr": x, "y_ptr": "i64",
             "m_ptr": "fp32", "s_ptr": "fp32", "t_ptr": "fp32", "zy_ptr": "fp32"},
            dict(common, HAS_BIAS2=True, TWO_MODELS=True), floats=("inv_temp",),
        ))  # fmt: skip
        dz = "fp32" if dt == "float32" else "bf16"
        out.append(KernelVariant(
            lls, "logits_grad_kernel", "TILE_CONFIGS", tile, dt,
            {"h_ptr": x, "w_ptr": x, "b_ptr": x, "y_ptr": "i64", "lse_ptr": "fp32", "ent_ptr": "fp32",
             "gl_ptr": "fp32", "ge_ptr": "fp32", "dz_ptr": dz},
            dict(common, GROUP_M=8), floats=("inv_temp",),
        ))  # fmt: skip
        heads = {f"{p}_ptr": x for p in ("hs", "ws", "ht", "wt", "hr", "wr")}
        out.append(KernelVariant(
            dense, "dense_kl_partials_kernel", "DENSE_CONFIGS", tile, dt,
            heads | {f"{p}_ptr": "fp32" for p in ("ma", "sa", "u", "mc", "sc", "mt", "st", "ut")},
            dict(HAS_REF=True, TEACHER_KL=True, DOT_PRECISION=prec), floats=("inv_temp", "lam"),
        ))  # fmt: skip
        out.append(KernelVariant(
            dense, "dense_kl_grad_kernel", "DENSE_CONFIGS", tile, dt,
            heads | {f"{p}_ptr": "fp32" for p in ("lse_a", "lse_c", "kl", "g")} | {"dz_ptr": dz},
            dict(HAS_REF=True, DOT_PRECISION=prec, GROUP_M=8), floats=("inv_temp", "lam"),
        ))  # fmt: skip
    # Backward GEMMs: dH = dZ @ W (out in the hidden dtype), dW += dZ^T @ H (fp32 buffer).
    for a, b, c, prec in (("bf16", "bf16", "fp32", "ieee"), ("bf16", "fp16", "fp16", "ieee"),
                          ("fp32", "fp32", "fp32", "tf32x3")):  # fmt: skip
        dt = {"bf16": "bfloat16", "fp32": "float32"}[a]
        out.append(KernelVariant(
            mm, "matmul_kernel", "CONFIGS", ("BLOCK_M", "BLOCK_N", "BLOCK_K"), dt,
            {"a_ptr": a, "b_ptr": b, "c_ptr": c},
            dict(ACCUMULATE=True, DOT_PRECISION=prec, GROUP_M=8),
        ))  # fmt: skip
    return out


def compile_variant(variant: KernelVariant, target: int, config_index: int) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(variant.module)
    kernel = getattr(module, variant.kernel)
    cfg = getattr(module, variant.configs)[config_index]
    constexprs = {**variant.constexprs, **cfg.kwargs}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in variant.pointers:
            signature[name] = "*" + variant.pointers[name]
        elif name in variant.floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", target, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    mma = sorted(set(re.findall(MMA_PATTERN[target], compiled.asm["ptx"])))
    return {"shared": compiled.metadata.shared, "mma": mma}


@dataclass
class AotResult:
    kernel: str
    operand_dtype: str
    pointers: str
    target: int
    config: str
    shared: int
    shared_limit: int
    mma: list
    ok: bool
    error: str = ""


def jobs():
    """(variant, target, config index, limit) for every config the runtime pruning may pick."""
    import importlib

    import torch

    from gopd_kernels.ops.triton_common import SHARED_MEMORY_LIMIT, fitting_configs

    for variant in kernel_variants():
        configs = getattr(importlib.import_module(variant.module), variant.configs)
        elem = getattr(torch, variant.operand_dtype).itemsize
        for target in TARGETS:
            limit = SHARED_MEMORY_LIMIT[target]
            kept = fitting_configs(configs, *variant.tile, elem, limit)
            for cfg in kept or configs[-1:]:
                yield variant, target, configs.index(cfg), limit


def _run(job) -> AotResult:
    variant, target, index, limit = job
    import importlib

    cfg = getattr(importlib.import_module(variant.module), variant.configs)[index]
    desc = f"{dict(cfg.kwargs)} warps={cfg.num_warps} stages={cfg.num_stages}"
    pointers = ",".join(f"{k}:{v}" for k, v in variant.pointers.items())
    try:
        r = compile_variant(variant, target, index)
    except Exception as exc:  # a compile failure is a result to report, not a crash
        msg = f"{type(exc).__name__}: {str(exc)[:300]}"
        return AotResult(
            variant.kernel, variant.operand_dtype, pointers, target, desc, -1, limit, [], False, msg
        )
    ok = r["shared"] <= limit and bool(r["mma"])
    return AotResult(
        variant.kernel, variant.operand_dtype, pointers, target, desc, r["shared"], limit, r["mma"], ok
    )


def jit_kernels() -> list[str]:
    """Every @triton.jit function named *_kernel in the ops modules: all must have variants."""
    import importlib
    import pkgutil

    import triton

    import gopd_kernels.ops as ops

    names = []
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"gopd_kernels.ops.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, triton.JITFunction) and name.endswith("_kernel"):
                names.append(name)
    return sorted(set(names))


def check_all(workers: int = 2) -> list[AotResult]:
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("gopd_kernels.aot must run without TRITON_INTERPRET=1")
    todo = list(jobs())
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_run, todo))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    args = parser.parse_args(argv)
    results = check_all(args.workers)
    uncovered = sorted(set(jit_kernels()) - {v.kernel for v in kernel_variants()})
    if args.json:
        print(json.dumps({"results": [asdict(r) for r in results], "uncovered": uncovered}))
    else:
        for r in results:
            mark = "ok  " if r.ok else "FAIL"
            mma = r.mma[0] if r.mma else "no tensor-core MMA"
            print(f"{mark} sm_{r.target} {r.kernel:22s} {r.operand_dtype:8s} {r.shared / 1024:6.1f}/"
                  f"{r.shared_limit / 1024:.0f} KiB  {mma:40s} {r.config} {r.error}")  # fmt: skip
        if uncovered:
            print(f"FAIL kernels without an AOT variant: {uncovered}")
    return 0 if all(r.ok for r in results) and not uncovered else 1


if __name__ == "__main__":
    sys.exit(main())
