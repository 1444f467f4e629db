"""What a bug report needs: versions, devices, and what gopd_kernels chooses on each device.

    gopd env                                  # or: python -m gopd_kernels.environment

For each CUDA device (AMD's too, under ROCm's torch): its compute capability or gfx name and
its memory, the backend ``"auto"`` picks there
(and why not Triton, where it does not), the shared memory a block may use against the launch
configs the autotuner's pruning keeps for bf16 (triton_common.make_pruner), whether
gopd_kernels.aot compiles for its target in the test suite, and how the torch backend's bf16
and fp16 GEMMs run. Then the GOPD_* and TRITON_* settings in force, each checked as the ops
check it: a bad value shows its error here instead of at the first step. Nothing is compiled.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import torch

from gopd_kernels import backend
from gopd_kernels.ops import matmul_torch

PACKAGES = ("gopd", "torch", "triton", "transformers", "peft", "vllm", "liger-kernel", "cut-cross-entropy")
SETTINGS = (
    "GOPD_WORKSPACE_MB",
    "GOPD_LOGITS_GEMM",
    "GOPD_BACKWARD_GEMM",
    "GOPD_DW_SUM",
    "TRITON_INTERPRET",
    "TRITON_CACHE_DIR",
    "CUDA_VISIBLE_DEVICES",
)
CONFIG_FAMILIES = {  # the kernels whose config lists the report counts
    "token tiles": "vocab_partials_kernel",
    "dense tiles": "dense_kl_partials_kernel",
    "GEMMs": "matmul_kernel",
}
GEMM_MODES = {
    "addmm": "16-bit operands, fp32 results accumulated in place",
    "mm": "16-bit operands, fp32 results added (one more pass)",
    None: "upcast to fp32 GEMMs",
}


def package_versions() -> dict[str, str | None]:
    """Installed version of each package gopd uses (None: not installed); nothing imported."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def setting_lines() -> list[str]:
    """Each setting's value, and whether the ops accept it (the error they would raise if not)."""
    checks = {  # what reads each GOPD_* variable, called as the ops call it
        "GOPD_WORKSPACE_MB": lambda: backend.workspace_bytes("torch", torch.empty(0)),
        "GOPD_LOGITS_GEMM": backend.logits_gemm,
        "GOPD_BACKWARD_GEMM": backend.backward_gemm,
        "GOPD_DW_SUM": lambda: backend.dw_sum(torch.empty(0, dtype=torch.bfloat16)),
    }
    lines, unset = [], []
    for name in SETTINGS:
        value = os.environ.get(name)
        if value is None:
            unset.append(name)
            continue
        try:
            if name in checks:
                checks[name]()
            lines.append(f"  {name}={value}")
        except ValueError as exc:
            lines.append(f"  {name}={value}: INVALID, the ops will raise: {exc}")
    return lines + ([f"  unset: {', '.join(unset)}"] if unset else [])


def device_target(device: torch.device) -> int | str:
    """gopd_kernels.aot's name for a device's target: its gfx name on AMD, else 10 major + minor."""
    capability = backend.cuda_capability(device)
    return backend.amd_arch(device) or capability[0] * 10 + capability[1]


def aot_coverage(target: int | str) -> str:
    """What gopd_kernels.aot's test run compiles for this target."""
    from gopd_kernels import aot

    name = aot.target_name(target)
    if target in aot.TARGETS:
        return f"{name}: every kernel compiled ahead of time by the test suite"
    if target in aot.HOT_TARGETS:
        return f"{name}: the bf16 training paths compiled ahead of time by the test suite"
    if target in aot.AMD_HOT_TARGETS:
        return f"{name}: the training paths (bf16, fp32) compiled ahead of time by the test suite"
    if target in aot.SASS_MMA_NAME:
        return f"{name}: not in the test suite (python -m gopd_kernels.aot --targets {target} checks it)"
    return f"{name}: never compiled ahead of time by gopd_kernels.aot"


def pruned_config_counts(shared_limit: int, target: int | str | None = None) -> str:
    """How many of each kernel family's launch configs the pruning keeps for a bf16 model on a
    GPU (of `target`, where it matters: AMD's) whose blocks may use `shared_limit` bytes."""
    from gopd_kernels import aot

    counts, variants = [], aot.kernel_variants()
    for family, kernel in CONFIG_FAMILIES.items():
        variant = next(v for v in variants if v.kernel == kernel and aot.is_hot(v))
        kept = aot.pruned_configs(variant, shared_limit, target)
        counts.append(f"{family} {len(kept)}/{len(aot.module_configs(variant, target))}")
    return ", ".join(counts)


def cuda_device_lines(index: int) -> list[str]:
    device = torch.device("cuda", index)
    props = torch.cuda.get_device_properties(index)
    capability, target = backend.cuda_capability(device), device_target(device)
    kind = target if isinstance(target, str) else f"compute capability {capability[0]}.{capability[1]}"
    lines = [
        f"cuda:{index}: {torch.cuda.get_device_name(index)}, {kind}, {props.total_memory / 2**30:.1f} GiB"
    ]
    chosen = backend.resolve_backend("auto", device)
    if chosen == "triton":
        from gopd_kernels.ops.triton_common import device_shared_limit

        shared = device_shared_limit(index)  # what the autotuner's pruning reads
        lines.append(f"  backend auto: triton; {aot_coverage(target)}")
        lines.append(
            f"  shared memory per block {shared // 1024} KiB; launch configs kept for bf16: "
            f"{pruned_config_counts(shared, target)}"
        )
    else:
        why = backend._triton_unsupported(device) if backend.triton_importable() else "triton not importable"
        lines.append(f"  backend auto: torch ({why})")
    for dtype in (torch.bfloat16, torch.float16):
        mode = matmul_torch.half_gemm_mode(device, dtype)
        lines.append(f"  torch backend {str(dtype).removeprefix('torch.')} GEMMs: {GEMM_MODES[mode]}")
    return lines


def report() -> str:
    """The whole report, as printed by `gopd env`."""
    versions = package_versions()
    precision = torch.get_float32_matmul_precision()
    lines = [
        f"python {platform.python_version()} ({sys.executable}), {platform.platform()}",
        ", ".join(f"{name} {version or '(not installed)'}" for name, version in versions.items()),
        f"torch CUDA build: {torch.version.cuda or 'none'}"
        + (f", ROCm (HIP) build: {torch.version.hip}" if torch.version.hip else "")
        + f"; CPU threads: {torch.get_num_threads()} of "
        f"{os.cpu_count()}; float32 matmul precision: {precision}"
        + (
            ""
            if precision == "highest"
            else " (torch's fp32 GEMMs, gopd's torch ones included, run as TF32 on Ampere and newer)"
        ),
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            lines += cuda_device_lines(index)
    else:
        triton = (
            "through the interpreter" if backend.interpreter_enabled() else "off (TRITON_INTERPRET is not 1)"
        )
        lines.append(f"no CUDA device: backend auto runs the torch twin; Triton kernels {triton}")
    lines.append("settings:")
    lines += setting_lines()
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
