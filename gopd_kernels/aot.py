"""Compile every Triton kernel ahead of time for sm_80 (A100) and sm_90 (H100), no GPU needed,
the paths training runs for sm_100 (B200) and sm_120 (RTX 5090) in bf16, and for AMD's gfx942
(MI300X, MI325X) in bf16 and fp32.

For each kernel, input dtype, target and launch config that the runtime pruning can pick,
this reports the shared memory the compiled kernel uses, the tensor-core instructions in
its PTX (``mma.sync`` on sm_80/86/89/120, ``wgmma`` on sm_90, ``tcgen05.mma`` on sm_100) and,
read off the machine code (SASS) with cuobjdump, its registers per thread, register spills
and tensor-core instructions (HMMA / HGMMA / UTCHMMA: counted in the first config of each
kernel variant and target, and in every config that spills; ``--sass-listing all`` counts
them in every config, for ~0.25 s each). For AMD targets the ISA listing is
the machine code: its MFMA instructions, vector registers, spilled ones and scratch bytes.
The interpreter accepts code that the GPU compiler rejects (small or non-power-of-two dots,
mixed dtypes), so this is the proof that the kernels build for real GPUs.

The further targets differ from those two where a kernel can break: 99 KiB of shared memory
per block on sm_120 (and on sm_86 / sm_89: A10G, RTX 3090, L4, RTX 4090), so the pruning keeps
other configs there; Blackwell's tensor-core instructions on sm_100; on AMD, 64 KiB of LDS
(160 KiB on gfx950), two-stage configs (triton_common.amd_configs), and fp32 dots in fp32
MFMA where NVIDIA's take 3xTF32, which Triton's HIP backend does not have. For sm_100 and
sm_120 the default run compiles the paths training runs in bf16 (a third of the compiles of
every variant there), for gfx942 those paths in bf16 and fp32; ``--targets`` compiles every
variant (86, 89, gfx90a: MI210 / MI250X, gfx950: MI350X / MI355X are compiled only so).

Each kernel is compiled as the JIT would specialise it at the GPU benchmark's shape
(LAUNCH_SHAPE: contiguous tensors, D = 4096, V = 151936, an odd token count): integer
arguments equal to 1 become constants and multiples of 16 carry a divisibility hint, as
do the (aligned) pointers. Without those hints loads cannot be vectorised and every
element needs its own 64-bit address: the registers then spill where the real launch
does not, and the report would describe a kernel that never runs.

    python -m gopd_kernels.aot                      # a table; exit status 1 if anything fails
    python -m gopd_kernels.aot --targets 86,100     # every variant for these targets instead
    python -m gopd_kernels.aot --targets gfx90a,gfx942,gfx950
    python -m gopd_kernels.aot --sass-listing all   # every config's SASS read, not the first's
    python -m gopd_kernels.aot --reuse-record R --write-record R   # R: tests/kernels/aot_record.json

The record keeps each compiled config's figures under Triton's cache key of its compile (see
job_key); a run that reuses it compiles only the configs whose keys it lacks, and CHECKED of
the recorded ones again, which must match: the test suite's way to this check in seconds.

Must run without TRITON_INTERPRET=1 (the interpreter replaces @triton.jit functions).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

from gopd_kernels.backend import AMD_TRITON_ARCHS as AMD_TARGETS

# A target is a compute capability (int) for NVIDIA, a gfx name (str) for AMD: AMD_TARGETS are
# CDNA2 (MI210 / MI250X), CDNA3 (MI300X / MI325X), CDNA4 (MI350X / MI355X), through Triton's HIP
# backend (wavefronts of 64).
TARGETS = (80, 90)  # every kernel variant
HOT_TARGETS = (100, 120)  # the hot bf16 variants (module doc)
AMD_HOT_TARGETS = ("gfx942",)  # the hot bf16 and fp32 variants (module doc)
# sm_75 (Turing: T4) is compiled only to show why the backend keeps Triton off it
# (backend.MIN_TRITON_CAPABILITY): its mma.sync would be the pattern sm_80's is.
MMA_SYNC = r"\bmma\.sync\.aligned\.\S+"
MFMA = r"\bv_mfma_\w+"  # AMD's matrix-core instructions, read off the ISA listing (no PTX stage)
MMA_PATTERN = {
    **dict.fromkeys((75, 80, 86, 89, 120), MMA_SYNC),
    90: r"\bwgmma\.mma_async\.\S+",
    100: r"\btcgen05\.mma\.\S+",
    **dict.fromkeys(AMD_TARGETS, MFMA),
}
SASS_MMA_NAME = {
    **dict.fromkeys((80, 86, 89, 120), "HMMA"),
    90: "HGMMA",
    100: "UTCHMMA",
    **dict.fromkeys(AMD_TARGETS, "MFMA"),
}
SASS_MMA = {t: rf"\b{name}\b" for t, name in SASS_MMA_NAME.items() if t not in AMD_TARGETS}  # amd_usage: MFMA
TRITON_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
HALF = ("bfloat16", "float16")

TOKENS, HIDDEN, VOCAB = 16383, 4096, 151936  # LAUNCH_SHAPE: token counts are arbitrary
# The backward's dZ tiles at LAUNCH_SHAPE with a workspace of the head's size: all rows by
# 30464 vocabulary columns (linear_logsoftmax_triton.backward_tiles). Like VOCAB, a multiple
# of 16: the logit-gradient kernels, which see a slice as their vocabulary, compile the same.
SLICE = 30464
FOLD_CHUNK = 2048  # the folds' rows per chunk on the Triton backend (folded_loss_torch.FOLD_ROWS)
LAUNCH_INTS = {  # representative integer arguments by name; matmul layouts give their own
    "M": TOKENS,
    "V": VOCAB,
    "slice_len": 4 * 512,  # a multiple of SLICE_ALIGN
    "stride_dzm": SLICE,  # the [rows, slice] logit-gradient tile
}


def launch_int(name: str, overrides: dict) -> int:
    """The value an integer kernel argument takes at LAUNCH_SHAPE."""
    if name in overrides:
        return overrides[name]
    if name.endswith("_BUCKET"):  # token_bucket of the dimension it keys
        return 1 << (launch_int(name.removesuffix("_BUCKET"), overrides) - 1).bit_length()
    if name in LAUNCH_INTS:
        return LAUNCH_INTS[name]
    if re.fullmatch(r"D\w*", name):  # hidden sizes: D, D2, DS, DT, DR
        return HIDDEN
    if re.fullmatch(r"(stride|s)_\w*d", name):  # along D in a contiguous [rows, D] tensor
        return 1
    if re.fullmatch(r"(stride|s)_\w*[mv]", name):  # to the next row of H or W
        return HIDDEN
    raise KeyError(f"no representative launch value for integer argument {name!r}")


def int_specialization(value: int) -> tuple[str, bool]:
    """(signature type, divisible by 16) as Triton's JIT specialises an int; 1 is a constant."""
    if value == 1:
        return "constexpr", False
    return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0


@dataclass(frozen=True)
class KernelVariant:
    """One kernel with concrete argument types; `pointers` maps *_ptr args to dtypes."""

    module: str
    kernel: str
    configs: str  # name of the module's config list
    tile: tuple[str, str, str] | None  # (A rows, B rows, depth) config keys, for shared-memory pruning
    operand_dtype: str  # what the pruning sees as the element type of the streamed tiles
    pointers: dict
    constexprs: dict
    floats: tuple[str, ...] = ()
    ints: tuple[tuple[str, int], ...] = ()  # launch values that differ from LAUNCH_INTS
    # A path training runs (not only every feature switched on, to prove it builds): it
    # must keep a config without register spills.
    hot: bool = False
    # A GEMM kernel must compile to tensor-core instructions; the row passes have no dot.
    needs_mma: bool = True
    layout: str = ""  # which of a GEMM's launches (shapes and strides) `ints` describe

    @property
    def features(self) -> str:
        flags = (
            "TWO_MODELS",
            "WITH_ENTROPY",
            "HAS_BIAS",
            "HAS_BIAS_S",
            "HAS_REF",
            "TEACHER_KL",
            "SOFTCAP",
            "ACCUMULATE",
            "SCALED",
            "PAIR",
        )
        on = [f for f in flags if self.constexprs.get(f)]
        return ",".join(on + ([self.layout] if self.layout else [])) or "-"


LLS = "gopd_kernels.ops.linear_logsoftmax_triton"
DENSE = "gopd_kernels.ops.dense_kl_triton"
TILE = ("BLOCK_M", "BLOCK_V", "BLOCK_D")


def _precision(dt: str) -> str:
    """DOT_PRECISION on NVIDIA targets (compile_variant swaps in AMD's)."""
    from gopd_kernels.ops.triton_common import FP32_DOT_PRECISION

    return FP32_DOT_PRECISION["cuda"] if dt == "float32" else "ieee"


def _logit_grad_dtype(dt: str, scaled: bool = True) -> str:
    """The dtype (torch's name) of the dZ workspace the runtime writes for a `dt` model
    (linear_logsoftmax_triton.logit_grad_dtype: scaled in the Triton kernels' backwards, not
    over cuBLAS tiles)."""
    import torch

    from gopd_kernels.ops.linear_logsoftmax_triton import logit_grad_dtype

    return str(logit_grad_dtype(getattr(torch, dt), scaled=scaled)).removeprefix("torch.")


def _forward(dt: str, hot: bool, **switches) -> KernelVariant:
    x = TRITON_DTYPE[dt]
    return KernelVariant(
        LLS, "vocab_partials_kernel", "TILE_CONFIGS", TILE, dt,
        {"h_ptr": x, "w_ptr": x, "b_ptr": x, "h2_ptr": x, "w2_ptr": x, "b2_ptr": x, "y_ptr": "i64",
         "m_ptr": "fp32", "s_ptr": "fp32", "t_ptr": "fp32", "zy_ptr": "fp32"},
        dict(switches, DOT_PRECISION=_precision(dt)), floats=("inv_temp", "inv_temp2", "cap", "cap2"),
        hot=hot,
    )  # fmt: skip


def _logits_grad(dt: str, hot: bool, **switches) -> KernelVariant:
    x = TRITON_DTYPE[dt]
    return KernelVariant(
        LLS, "logits_grad_kernel", "TILE_CONFIGS", TILE, dt,
        {"h_ptr": x, "w_ptr": x, "b_ptr": x, "y_ptr": "i64", "lse_ptr": "fp32", "ent_ptr": "fp32",
         "gl_ptr": "fp32", "ge_ptr": "fp32", "dz_ptr": TRITON_DTYPE[_logit_grad_dtype(dt)]},
        dict(switches, GROUP_M=8, DOT_PRECISION=_precision(dt)), floats=("inv_temp", "cap"), hot=hot,
    )  # fmt: skip


def _dense_heads(dt: str) -> dict:
    return {f"{p}_ptr": TRITON_DTYPE[dt] for p in ("hs", "ws", "bs", "ht", "wt", "bt", "hr", "wr", "br")}


def _dense_head_flags(on: bool) -> dict:
    """The three heads' HAS_BIAS_* (Phi-style heads) and SOFTCAP_* (Gemma 2's): the hot paths
    have neither; one variant has both, proof that that code builds."""
    return {f"{flag}_{k}": on for flag in ("HAS_BIAS", "SOFTCAP") for k in "STR"}


def _dense_partials(dt: str, biases: bool = False, **switches) -> KernelVariant:
    return KernelVariant(
        DENSE, "dense_kl_partials_kernel", "DENSE_CONFIGS", TILE, dt,
        _dense_heads(dt) | {f"{p}_ptr": "fp32" for p in ("ma", "sa", "u", "mc", "sc", "mt", "st", "ut")},
        dict(switches, DOT_PRECISION=_precision(dt)) | _dense_head_flags(biases),
        floats=("inv_temp", "inv_temp_t", "inv_temp_r", "cap_s", "cap_t", "cap_r", "lam"),
        hot=not biases,
    )  # fmt: skip


def _dense_grad(dt: str, biases: bool = False) -> KernelVariant:
    return KernelVariant(
        DENSE, "dense_kl_grad_kernel", "DENSE_CONFIGS", TILE, dt,
        _dense_heads(dt) | {f"{p}_ptr": "fp32" for p in ("lse_a", "lse_c", "kl", "g")}
        | {"dz_ptr": TRITON_DTYPE[_logit_grad_dtype(dt)]},
        dict(HAS_REF=True, GROUP_M=8, DOT_PRECISION=_precision(dt)) | _dense_head_flags(biases),
        floats=("inv_temp", "inv_temp_t", "inv_temp_r", "cap_s", "cap_t", "cap_r", "lam"), hot=not biases,
    )  # fmt: skip


def kernel_variants() -> list[KernelVariant]:
    mm = "gopd_kernels.ops.matmul_triton"
    out = []
    # every feature on (a bias, the entropy, soft-capped heads): proof that all code builds
    every = dict(HAS_BIAS=True, WITH_ENTROPY=True, SOFTCAP=True)
    for dt in ("bfloat16", "float16", "float32"):
        out += [
            _forward(dt, False, **every, HAS_BIAS2=True, TWO_MODELS=True, SOFTCAP2=True),
            _logits_grad(dt, False, **every),
            _dense_partials(dt, HAS_REF=True, TEACHER_KL=True),  # ExOPD's, hot as it is
            _dense_grad(dt),
        ]
    out += [  # every head with a bias and a soft-cap: proof that it builds (bf16; fp16, fp32 share its code)
        _dense_partials("bfloat16", biases=True, HAS_REF=True, TEACHER_KL=True),
        _dense_grad("bfloat16", biases=True),
    ]
    # The paths training runs, for the spill check: the student's forward and backward
    # (no bias, no entropy), teacher + reference scoring, the dense loss at lam = 1 (the
    # all-features variants above are ExOPD's). fp16 compiles to the same code as bf16.
    plain = dict(HAS_BIAS=False, WITH_ENTROPY=False, SOFTCAP=False)
    for dt in ("bfloat16", "float32"):
        out += [
            _forward(dt, True, **plain, HAS_BIAS2=False, TWO_MODELS=False, SOFTCAP2=False),
            _forward(dt, True, **plain, HAS_BIAS2=False, TWO_MODELS=True, SOFTCAP2=False),
            _logits_grad(dt, True, **plain),
            _dense_partials(dt, HAS_REF=False, TEACHER_KL=False),
        ]
    # Backward GEMMs, per dZ tile [rows, slice] (all rows at the launch shape): dH += dZ @ W,
    # summed over the slices in fp32; dW[slice] = dZ^T @ H over all rows, in the weight's
    # dtype. dZ as _logit_grad_dtype: bf16 for bf16 models, fp32 for fp32 ones, fp16 with its
    # scale (SCALED) for fp16 ones, and bf16 against an fp16 head over cuBLAS tiles (asked for).
    layouts = {
        "dH": dict(M=TOKENS, N=HIDDEN, K=SLICE, stride_am=SLICE, stride_ak=1,
                   stride_bk=HIDDEN, stride_bn=1, stride_cm=HIDDEN, stride_cn=1),
        "dW": dict(M=SLICE, N=HIDDEN, K=TOKENS, stride_am=1, stride_ak=SLICE,
                   stride_bk=HIDDEN, stride_bn=1, stride_cm=HIDDEN, stride_cn=1),
    }  # fmt: skip
    # the (model dtype, dZ dtype) pairs the runtime forms: the kernels' scaled dZ, cuBLAS tiles' not
    pairs = dict.fromkeys(
        (dt, _logit_grad_dtype(dt, scaled)) for dt in TRITON_DTYPE for scaled in (True, False)
    )
    for dt, dz in pairs:
        model, a = TRITON_DTYPE[dt], TRITON_DTYPE[dz]
        for layout in ("dH", "dW"):
            c = "fp32" if layout == "dH" else model
            out.append(KernelVariant(
                mm, "matmul_kernel", "CONFIGS", ("BLOCK_M", "BLOCK_N", "BLOCK_K"), dz,
                {"a_ptr": a, "b_ptr": model, "c_ptr": c, "lo_ptr": c, "alpha_ptr": "fp32"},
                dict(ACCUMULATE=layout == "dH", SCALED=a == "fp16", PAIR=False, DOT_PRECISION=_precision(dt),
                     GROUP_M=8),
                ints=tuple(layouts[layout].items()), hot=True, layout=layout,
            ))  # fmt: skip
    # The folds' dW over a chunk of FOLD_ROWS rows, bf16: dz^T with dz written over the chunk's
    # fp32 logits (a row stride of 2V bf16 elements, fold_rows_triton); one chunk rounds its fp32
    # sum once into dW, several carry it as dW and a bf16 remainder (GOPD_DW_SUM=pair).
    fold_dw = dict(M=VOCAB, N=HIDDEN, K=FOLD_CHUNK, stride_am=1, stride_ak=2 * VOCAB,
                   stride_bk=HIDDEN, stride_bn=1, stride_cm=HIDDEN, stride_cn=1)  # fmt: skip
    for pair in (False, True):
        out.append(KernelVariant(
            mm, "matmul_kernel", "CONFIGS", ("BLOCK_M", "BLOCK_N", "BLOCK_K"), "bfloat16",
            {"a_ptr": "bf16", "b_ptr": "bf16", "c_ptr": "bf16", "lo_ptr": "bf16", "alpha_ptr": "fp32"},
            dict(ACCUMULATE=pair, SCALED=False, PAIR=pair, DOT_PRECISION="ieee", GROUP_M=8),
            ints=tuple(fold_dw.items()), hot=True, layout="fold dW",
        ))  # fmt: skip
    # The folded losses' row passes over a chunk's fp32 logits [rows, V] (fold_rows_triton);
    # dz in the GEMM operand's dtype.
    rows = "gopd_kernels.ops.fold_rows_triton"
    row_ints = (("V", VOCAB), ("stride_zm", VOCAB), ("stride_dzm", VOCAB))
    row = lambda kernel, pointers, floats=(), **constexprs: KernelVariant(
        rows, kernel, "CONFIGS", None, "float32", pointers, constexprs, floats=floats, ints=row_ints,
        hot=True, needs_mma=False,
    )  # fmt: skip
    f32 = lambda *names: {f"{n}_ptr": "fp32" for n in names}
    # the sampled fold's log-softmax, with and without the entropy; the dense fold's lse (y_ptr unused: lse)
    for target, entropy in ((True, False), (True, True), (False, False)):
        y = {"y_ptr": "i64" if target else "fp32"}
        out.append(row("row_log_softmax_kernel", f32("z", "s", "lse", "h") | y, HAS_TARGET=target,
                       WITH_ENTROPY=entropy))  # fmt: skip
    out.append(row("row_dense_kl_kernel", f32("a", "c", "t", "lse_c", "lse_t", "kl", "kl_t", "lse_a", "u"),
                   WITH_TEACHER=True))  # fmt: skip
    for dz, softcap in (("bf16", False), ("bf16", True), ("fp32", False)):  # a soft-capped head's too
        out.append(row("row_logit_grads_kernel", f32("z", "lse", "c") | {"y_ptr": "i64", "dz_ptr": dz},
                       floats=("cap",), SOFTCAP=softcap))  # fmt: skip
    for dz, softcap in (("bf16", False), ("bf16", True), ("fp32", False)):
        out.append(row("row_dense_grads_kernel", f32("a", "c", "lse_a", "u", "coef") | {"dz_ptr": dz},
                       floats=("cap",), SOFTCAP=softcap))  # fmt: skip
    return out


def compile_inputs(variant: KernelVariant, target: int | str, config_index: int) -> tuple:
    """(source, GPU target, options) of one config's compile, as the JIT would specialise it."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gopd_kernels.ops.triton_common import FP32_DOT_PRECISION, LAUNCH_OPTIONS

    kernel = getattr(importlib.import_module(variant.module), variant.kernel)
    amd = target in AMD_TARGETS
    cfg = module_configs(variant, target)[config_index]
    constexprs = {**variant.constexprs, **cfg.kwargs}
    if amd and constexprs.get("DOT_PRECISION") == FP32_DOT_PRECISION["cuda"]:
        constexprs["DOT_PRECISION"] = FP32_DOT_PRECISION["hip"]  # what the runtime launches on ROCm
    signature, divisible = {}, []
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in variant.pointers:
            signature[name] = "*" + variant.pointers[name]
            divisible.append(name)  # torch allocations (and our row-chunk views) are 16-byte aligned
        elif name in variant.floats:
            signature[name] = "fp32"
        else:
            value = launch_int(name, dict(variant.ints))
            signature[name], div16 = int_specialization(value)
            if signature[name] == "constexpr":
                constexprs[name] = value
            elif div16:
                divisible.append(name)
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    gpu = GPUTarget("hip", target, 64) if amd else GPUTarget("cuda", target, 32)
    return src, gpu, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **LAUNCH_OPTIONS}


def compile_variant(variant: KernelVariant, target: int | str, config_index: int, sass: str = "full") -> dict:
    """Shared memory and PTX tensor-core instructions of one compiled config, and what
    sass_usage reads off its machine code: `sass` "full" (the whole listing), "usage" (the
    listing only where the frame shows spills) or "none"."""
    import triton

    src, gpu, options = compile_inputs(variant, target, config_index)
    compiled = triton.compile(src, target=gpu, options=options)
    if target in AMD_TARGETS:  # the ISA listing is the machine code: MFMA, registers and spills
        isa = compiled.asm["amdgcn"]
        return {
            "shared": compiled.metadata.shared,
            "mma": sorted(set(re.findall(MMA_PATTERN[target], isa))),
            **amd_usage(isa),
        }
    mma = sorted(set(re.findall(MMA_PATTERN[target], compiled.asm["ptx"])))
    usage = {} if sass == "none" else sass_usage(compiled.asm["cubin"], target, listing=sass == "full")
    return {"shared": compiled.metadata.shared, "mma": mma, **usage}


def _cuda_tool(name: str) -> str:
    import os

    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in this triton install ({path})")
    return path


def sass_usage(cubin: bytes, target: int, listing: bool = True) -> dict:
    """What the GPU will execute, read off the cubin with cuobjdump: registers per thread,
    stack bytes, register spills (local-memory STL / LDL instructions) and tensor-core
    instructions in SASS (HGMMA is wgmma on sm_90; HMMA the sm_80 mma.sync path).

    The SASS listing is most of the cost (0.2-0.3 s a config against 1.5 ms for the resource
    usage). Without `listing` it is read only where the resource usage shows local memory,
    the one place spills can go; elsewhere they are 0 and the tensor-core count is -1 (not
    read: the PTX's MMA instructions are, and ptxas has no other lowering for them)."""
    import subprocess
    import tempfile

    def cuobjdump(flag: str) -> str:
        cmd = [_cuda_tool("cuobjdump"), flag, f.name]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res_usage = cuobjdump("-res-usage")
        if not listing and not local_memory(res_usage):
            return parse_sass_usage(res_usage, None, target)
        return parse_sass_usage(res_usage, cuobjdump("-sass"), target)


RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def _res_usage(res_usage: str) -> re.Match:
    found = RES_USAGE.search(res_usage)
    if found is None:
        raise ValueError(f"no REG:/STACK:/LOCAL: line in cuobjdump -res-usage output: {res_usage[-300:]!r}")
    return found


def local_memory(res_usage: str) -> bool:
    """Whether the kernel has a stack frame or local memory: where register spills go (STL / LDL
    address nothing else). Checked over the 542 NVIDIA configs of the default run (2026-11-28):
    a frame exactly where the SASS listing holds spills; the AOT test checks it again on
    those it reads."""
    found = _res_usage(res_usage)
    return int(found.group(2)) > 0 or int(found.group(3)) > 0


def parse_sass_usage(res_usage: str, sass: str | None, target: int) -> dict:
    """The figures of sass_usage from cuobjdump's -res-usage and -sass listings; without the
    listing (None) for a kernel with no local memory: no spills, tensor-core count not read."""
    found = _res_usage(res_usage)
    if sass is None:
        if local_memory(res_usage):
            raise ValueError("a kernel with local memory needs its SASS listing to count its spills")
        spill_stores = spill_loads = 0
        sass_mma = -1
    else:
        spill_stores = len(re.findall(r"\bSTL(?:\.\w+)*\b", sass))
        spill_loads = len(re.findall(r"\bLDL(?:\.\w+)*\b", sass))
        sass_mma = len(re.findall(SASS_MMA[target], sass))
    return {
        "registers": int(found.group(1)),
        "stack": int(found.group(2)),
        "spill_stores": spill_stores,
        "spill_loads": spill_loads,
        "sass_mma": sass_mma,
    }


def amd_usage(isa: str) -> dict:
    """sass_usage's figures for an AMD target, from the ISA listing and its code-object metadata:
    registers per lane (vector and accumulation registers), scratch bytes per lane, the vector
    registers spilled to scratch memory (scalar ones go to vector-register lanes, cheap, and
    are not counted), and the MFMA instructions."""
    fields = {}
    for name in ("TotalNumVgprs", "ScratchSize"):
        found = re.search(rf"^; {name}: (\d+)", isa, re.M)
        if found is None:
            raise ValueError(f"no '; {name}:' line in the AMD ISA listing")
        fields[name] = int(found.group(1))
    spilled = re.search(r"\.vgpr_spill_count:\s+(\d+)", isa)
    if spilled is None:
        raise ValueError("no .vgpr_spill_count in the AMD ISA listing's metadata")
    return {
        "registers": fields["TotalNumVgprs"],
        "stack": fields["ScratchSize"],
        "spill_stores": int(spilled.group(1)),
        "spill_loads": -1,
        "sass_mma": len(re.findall(MFMA, isa)),
    }


@dataclass
class AotResult:
    kernel: str
    operand_dtype: str
    features: str
    hot: bool
    pointers: str
    target: int | str
    config: str
    shared: int
    shared_limit: int
    mma: list
    ok: bool
    error: str = ""
    registers: int = -1
    stack: int = -1  # bytes of local memory (AMD: scratch) per thread
    spill_stores: int = -1  # STL instructions in SASS; on AMD, spilled vector registers
    spill_loads: int = -1  # LDL instructions in SASS; -1 on AMD (its metadata counts registers only)
    sass_mma: int = -1  # HMMA (sm_80) / HGMMA (sm_90) / ... instructions in SASS, MFMA in AMD's ISA
    needs_mma: bool = True  # False for the row passes, which have no dot
    source: str = "compiled"  # or "record" (its figures from the record), "checked" (both, compared)


def pruned_configs(variant: KernelVariant, shared_limit: int, target: int | str | None = None) -> list:
    """The configs the runtime pruning (triton_common.make_pruner) keeps for `variant` on a GPU
    (of `target`, where it matters: AMD's) whose blocks may use `shared_limit` bytes, as indices
    into module_configs(variant, target); empty where it would fall back."""
    import torch

    from gopd_kernels.ops.triton_common import STAGES_IN_REGISTERS, fitting_configs

    configs = module_configs(variant, target)
    if variant.tile is None:
        return list(range(len(configs)))
    elem = getattr(torch, variant.operand_dtype).itemsize
    kept = fitting_configs(configs, *variant.tile, elem, shared_limit, STAGES_IN_REGISTERS.get(target, 0))
    return [configs.index(cfg) for cfg in kept]


def target_name(target: int | str) -> str:
    """sm_90 for a compute capability, the gfx name itself for AMD."""
    return target if isinstance(target, str) else f"sm_{target}"


def is_hot(variant: KernelVariant, dtypes: tuple[str, ...] = ("bfloat16",)) -> bool:
    """A path training runs, for a model of one of `dtypes`: bf16 is what HOT_TARGETS compile,
    bf16 and fp32 (whose dots are AMD's own) what AMD_HOT_TARGETS compile. fp16 heads are rare
    on those GPUs, and their kernels differ from bf16's in the operand type and the dZ scale only."""
    return variant.hot and variant.operand_dtype in dtypes and "fp16" not in variant.pointers.values()


def jobs(
    targets: tuple = TARGETS,
    hot_targets: tuple = HOT_TARGETS,
    amd_hot_targets: tuple = AMD_HOT_TARGETS,
    listing: str = "first",
):
    """(variant, target, config index, limit, sass) for every config the runtime pruning may
    pick: every variant on `targets`, the hot bf16 ones on `hot_targets`, the hot bf16 and fp32
    ones on `amd_hot_targets`. sass, compile_variant's: "full" (the SASS listing read) for the
    first config of each variant and target (`listing` "first": the proof that the machine code
    runs on the tensor cores; the others' PTX is checked) or for every config ("all"), else
    "usage"."""
    from gopd_kernels.ops.triton_common import SHARED_MEMORY_LIMIT

    for variant in kernel_variants():
        hot = (hot_targets if is_hot(variant) else ()) + (
            amd_hot_targets if is_hot(variant, ("bfloat16", "float32")) else ()
        )
        for target in targets + hot:
            limit = SHARED_MEMORY_LIMIT[target]
            fallback = len(module_configs(variant, target)) - 1
            kept = pruned_configs(variant, limit, target) or [fallback]
            for index in kept:
                yield (
                    variant,
                    target,
                    index,
                    limit,
                    "full" if listing == "all" or index == kept[0] else "usage",
                )


def _run(job) -> AotResult:
    variant, target, index, _limit, sass = job
    try:
        return job_result(job, compile_variant(variant, target, index, sass))
    except Exception as exc:  # a compile failure is a result to report, not a crash
        return job_result(job, None, f"{type(exc).__name__}: {str(exc)[:300]}")


def job_result(job, measured: dict | None, error: str = "", source: str = "compiled") -> AotResult:
    """The AotResult of a job from what compile_variant measured (None: it failed with `error`)."""
    variant, target, index, limit, _sass = job
    cfg = module_configs(variant, target)[index]
    desc = f"{dict(cfg.kwargs)} warps={cfg.num_warps} stages={cfg.num_stages}"
    pointers = ",".join(f"{k}:{v}" for k, v in variant.pointers.items())
    base = dict(
        kernel=variant.kernel, operand_dtype=variant.operand_dtype, features=variant.features,
        hot=variant.hot, pointers=pointers, target=target, config=desc, shared_limit=limit,
        needs_mma=variant.needs_mma, source=source,
    )  # fmt: skip
    if measured is None:
        return AotResult(**base, shared=-1, mma=[], ok=False, error=error)
    # sass_mma -1: the listing was not read; the PTX's MMA instructions stand for it
    tensor_cores = bool(measured["mma"]) and measured["sass_mma"] != 0
    ok = not error and measured["shared"] <= limit and (not variant.needs_mma or tensor_cores)
    return AotResult(**base, **measured, ok=ok, error=error)


FIGURES = ("shared", "mma", "registers", "stack", "spill_stores", "spill_loads", "sass_mma")


def figures(result: AotResult) -> dict:
    """What compile_variant measured for a result: what a record keeps."""
    return {k: getattr(result, k) for k in FIGURES}


# --- The record: a compile's measurements under Triton's own cache key -------------------------
# A cold compile of every job takes ~2.3 s a config on a 2-core CPU (~13 min for the 659 of the
# default run, a third of the test suite). A job whose key is in the record (a full run's, kept
# in the repository) takes the recorded figures; every other one compiles, and a sample of the
# recorded ones compiles again each run and must match them.


@functools.cache
def _reader_hash() -> str:
    """The code that turns a compile into figures: a change to it invalidates every record."""
    import hashlib
    import inspect

    parts = [inspect.getsource(f) for f in (compile_variant, sass_usage, parse_sass_usage, local_memory,
                                              _res_usage, amd_usage)]  # fmt: skip
    return hashlib.sha256(repr((parts, MMA_PATTERN, SASS_MMA)).encode()).hexdigest()


@functools.cache
def _backend(gpu):
    from triton.compiler import make_backend

    return make_backend(gpu)


def job_key(job) -> str:
    """Equal keys, equal figures: Triton's cache key of the job's compile (Triton's build, the
    kernel's source with every function it calls, its signature, constexprs and divisibility
    hints, the target with its assembler's version, the options, the environment variables
    Triton reads), how its machine code is read (sass) and the code that reads it."""
    import hashlib

    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler import get_cache_key

    variant, target, index, _limit, sass = job
    src, gpu, options = compile_inputs(variant, target, index)
    backend = _backend(gpu)
    # the options name FP fusion (LAUNCH_OPTIONS): Triton's default for it is never read
    env = {k: v for k, v in get_cache_invalidating_env_vars().items() if k != "TRITON_DEFAULT_FP_FUSION"}
    key = get_cache_key(src, backend, backend.parse_options(dict(options, **src.parse_options())), env)
    return hashlib.sha256(f"{key}-{sass}-{_reader_hash()}".encode()).hexdigest()[:32]


def reuse_plan(keys: list[str], record: dict, checked: int) -> tuple[list[int], list[int]]:
    """(jobs to compile, recorded jobs among them to check against the record) by index: every
    job not in the record, and up to `checked` of the recorded ones, evenly spread over the job
    list (which runs variant by variant, target by target), at least one if any is recorded."""
    recorded = [i for i, k in enumerate(keys) if k in record]
    sample = recorded[:: -(-len(recorded) // checked)] if recorded and checked > 0 else []
    fresh = set(range(len(keys))) - set(recorded)
    return sorted(fresh | set(sample)), sample


def read_record(path: str) -> dict:
    """{job key: measured figures} from a record file; {} where there is none."""
    import os

    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["results"]


def write_record(path: str, todo: list, results: list[AotResult]) -> None:
    """Keep the figures of every job that compiled, under its key, one job a line."""
    import triton

    rows = {job_key(job): figures(r) for job, r in zip(todo, results, strict=True) if not r.error}
    about = json.dumps({"written_by": "gopd_kernels.aot --write-record", "triton": triton.__version__})
    lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(rows.items()))
    with open(path, "w") as f:
        f.write(f'{about[:-1]},\n"results": {{\n{lines}\n}}}}\n')


def hot_paths_that_spill(results: list[AotResult], dtypes: tuple[str, ...] = HALF) -> list[str]:
    """Hot (kernel, features, dtype, target) whose every compiled config spills registers.

    Required empty for half precision, what training runs. fp32 goes through 3xTF32,
    which holds each operand twice; some of its paths spill in every config that fits,
    and the table says which (`note:` lines)."""
    best: dict[str, int] = {}
    for r in results:
        if r.hot and r.operand_dtype in dtypes:
            key = f"{r.kernel} [{r.features}] {r.operand_dtype} {target_name(r.target)}"
            best[key] = min(best.get(key, 1 << 30), r.spill_stores if r.spill_stores >= 0 else 1 << 30)
    return sorted(k for k, spills in best.items() if spills > 0)


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


def turing_evidence() -> dict:
    """Why the backend keeps Triton off GPUs older than Ampere, compiled for sm_75 (T4): the
    PTX tensor-core instructions of the backward GEMM with fp16 operands (the one type
    Turing's tensor cores and Triton's sm_80 path share), and whether the backward GEMM of a
    bf16 dZ against an fp16 head (the dZ over cuBLAS tiles) builds at all."""
    import dataclasses

    variants = [v for v in kernel_variants() if v.kernel == "matmul_kernel" and v.pointers["b_ptr"] == "fp16"]
    mm = next(v for v in variants if v.pointers["a_ptr"] == "bf16")  # a bf16 dZ (cuBLAS tiles')
    fp16 = dataclasses.replace(mm, pointers=mm.pointers | {"a_ptr": "fp16", "c_ptr": "fp32"})
    narrowest = -1 % len(module_configs(mm))
    out = {"fp16_mma": compile_variant(fp16, 75, narrowest, sass="none")["mma"]}
    try:
        compile_variant(mm, 75, narrowest, sass="none")
        out["bf16_dz_fp16_head_backward"] = "ok"
    except Exception as exc:  # the point is which error: ptxas's first line says it
        first = re.search(r"\.ptx, line \d+; error\s*:\s*(.+)", str(exc))
        why = first.group(1) if first else str(exc)[:300]
        out["bf16_dz_fp16_head_backward"] = f"{type(exc).__name__}: {why}"
    return out


def module_configs(variant: KernelVariant, target: int | str | None = None) -> list:
    """The launch configs of `variant`'s family as the autotuner sees them on `target`: on AMD
    ones triton_common.amd_configs (the row passes launch their one config as it is)."""
    import importlib

    from gopd_kernels.ops.triton_common import amd_configs

    configs = getattr(importlib.import_module(variant.module), variant.configs)
    return amd_configs(configs) if target in AMD_TARGETS and variant.tile is not None else configs


def todo_jobs(targets: tuple | None = None, listing: str = "first") -> list:
    """jobs() of the default run, or of every variant on `targets`."""
    return list(jobs(listing=listing) if targets is None else jobs(targets, (), (), listing))


CHECKED = 12  # recorded jobs compiled again each run that reuses a record


def check_all(
    workers: int = 2,
    targets: tuple | None = None,
    listing: str = "first",
    record: dict | None = None,
    checked: int = CHECKED,
) -> list[AotResult]:
    """Compile todo_jobs(targets, listing) in `workers` processes. With a `record` (read_record),
    a job under a recorded key takes the recorded figures instead, but for `checked` of them,
    compiled again: one whose figures differ from the record's fails."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("gopd_kernels.aot must run without TRITON_INTERPRET=1")
    todo = todo_jobs(targets, listing)
    keys = [job_key(job) for job in todo] if record else []
    to_compile, to_check = reuse_plan(keys, record, checked) if record else (range(len(todo)), [])
    with ProcessPoolExecutor(max_workers=workers) as pool:
        compiled = dict(zip(to_compile, pool.map(_run, [todo[i] for i in to_compile]), strict=True))
    for i in to_check:
        r, want = compiled[i], record[keys[i]]
        r.source = "checked"
        if not r.error and figures(r) != want:
            r.ok, r.error = False, f"compiled to {figures(r)} where the record says {want}"
    return [compiled[i] if i in compiled else job_result(job, record[keys[i]], source="record")
            for i, job in enumerate(todo)]  # fmt: skip


def _targets(text: str) -> tuple[int | str, ...]:
    targets = tuple(int(t) if t.isdigit() else t for t in text.split(","))
    if not text or any(t not in SASS_MMA_NAME for t in targets):
        known = ", ".join(map(str, SASS_MMA_NAME))
        raise argparse.ArgumentTypeError(f"--targets takes some of {known}, got {text!r}")
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--turing", action="store_true", help="print turing_evidence() as JSON and stop")
    parser.add_argument(
        "--sass-listing",
        choices=("first", "all"),
        default="first",
        help="NVIDIA targets: read the SASS listing of the first config of each kernel variant (and "
        "of every config with spills to count), or of every config (~0.25 s more each)",
    )
    parser.add_argument(
        "--targets",
        type=_targets,
        help="comma-separated compute capabilities and AMD gfx names "
        f"({', '.join(map(str, SASS_MMA_NAME))}): every variant for these instead of the default run",
    )
    parser.add_argument(
        "--reuse-record",
        metavar="PATH",
        help="take the figures of the jobs recorded in PATH (--write-record's) instead of compiling "
        "them, but for --check of them, compiled again and compared; compile the others",
    )
    parser.add_argument(
        "--check", type=int, default=CHECKED, help=f"recorded jobs compiled again (default {CHECKED})"
    )
    parser.add_argument(
        "--write-record",
        metavar="PATH",
        help="write every compiled job's figures under its key to PATH (with --reuse-record PATH: "
        "compiles only the jobs whose kernels or configs changed)",
    )
    args = parser.parse_args(argv)
    if args.turing:
        print(json.dumps(turing_evidence()))
        return 0
    record = read_record(args.reuse_record) if args.reuse_record else None
    results = check_all(args.workers, args.targets, args.sass_listing, record, args.check)
    if args.write_record:
        write_record(args.write_record, todo_jobs(args.targets, args.sass_listing), results)
    uncovered = sorted(set(jit_kernels()) - {v.kernel for v in kernel_variants()})
    spilling = hot_paths_that_spill(results)
    sources = Counter(r.source for r in results)
    if args.reuse_record:
        print(f"{sources['record']} of {len(results)} jobs' figures from {args.reuse_record}, "
              f"{sources['checked']} of those compiled again to check them", file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps({"results": [asdict(r) for r in results], "uncovered": uncovered}))
    else:
        for r in results:
            mark = "ok  " if r.ok else "FAIL"
            mma = f"{SASS_MMA_NAME[r.target]} x{r.sass_mma}" if r.sass_mma > 0 else "no tensor-core MMA"
            if r.sass_mma == -1 and r.mma:  # the listing not read: the PTX's instruction
                mma = "PTX " + r.mma[0].split(".")[0]
            mma = mma if r.needs_mma else "(no dot)"
            print(f"{mark} {target_name(r.target):6s} {r.kernel:24s} {r.operand_dtype:8s} {r.features:32s} "
                  f"{'hot' if r.hot else '   '} {r.shared / 1024:6.1f}/{r.shared_limit / 1024:.0f} KiB "
                  f"reg {r.registers:3d} spill {r.spill_stores:4d}/{r.spill_loads:<4d} {mma:10s} "
                  f"{r.config} {r.error}")  # fmt: skip
        for path in hot_paths_that_spill(results, ("float32",)):
            print(f"note: no spill-free config for {path}")
        for path in spilling:
            print(f"FAIL no spill-free config for {path}")
        if uncovered:
            print(f"FAIL kernels without an AOT variant: {uncovered}")
    return 0 if all(r.ok for r in results) and not uncovered and not spilling else 1


if __name__ == "__main__":
    sys.exit(main())
