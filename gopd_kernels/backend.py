"""Which implementation runs an op, and how much scratch memory it may use.

``"triton"``: the Triton kernels, on CUDA tensors, or on CPU tensors when the Triton
interpreter is on (``TRITON_INTERPRET=1`` set before ``triton`` is imported).
``"torch"``: the same chunked algorithm in plain PyTorch, on any device.
``"auto"``: Triton for CUDA tensors when Triton imports and the GPU is an Ampere or newer
(compute capability >= 8.0), or, under ROCm's torch, an AMD Instinct the kernels are compiled
and checked for (AMD_TRITON_ARCHS: MI210 / MI250X, MI300X / MI325X, MI350X / MI355X); the
torch twin otherwise. When it has to fall back on a CUDA tensor it says so in a log line, once.

Why not older GPUs (T4, V100): compiled ahead of time for sm_75 (Triton 3.9, as
gopd_kernels.aot does for sm_80/sm_90), no kernel gets a tensor-core instruction (bf16,
fp16 or fp32 operands; nor, in the PTX of the three checked, for sm_70); on sm_75 the
kernels spill thousands of registers (the backward
GEMM ~2000 to ~7000 per config), and a backward GEMM whose dZ operand is bf16 against an fp16
head (the dZ over cuBLAS tiles, which fp16 heads get when GOPD_LOGITS_GEMM=torch asks; the
dense losses' until their fp16 dZ was scaled) fails in ptxas (bf16 conversions need sm_80).
The torch twin runs there on cuBLAS.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import torch

from gopd_kernels.validation import check_choice

logger = logging.getLogger("gopd_kernels")

BACKENDS = ("auto", "triton", "torch")

# Scratch for a tile of logits (or of their gradients). The torch twin streams
# [token chunk, vocab chunk] fp32 tiles; 64 MiB keeps CPU caches and peak memory small.
# The Triton backward writes [tokens, vocabulary slice] gradient tiles that two GEMMs then
# read; it may use as much as the LM-head weight itself (memory stays O(V*D)), because each
# slice costs one read-modify-write of an fp32 dH and fewer, larger slices amortise it.
# GOPD_WORKSPACE_MB overrides both.
TORCH_WORKSPACE_BYTES = 64 << 20
TRITON_MIN_WORKSPACE_BYTES = 64 << 20

# Who runs the Triton backward's two gradient GEMMs (dH += dZ W, dW = dZ^T H), whose
# operands are plain tensors: "triton" (matmul_triton's kernel, any dtypes, 3xTF32 for fp32)
# or "torch" (torch.mm / addmm: cuBLAS on CUDA, for operands of one dtype).
BACKWARD_GEMMS = ("triton", "torch")

# Who builds the Triton backend's token_logprobs logit tiles (its forward and its backward's
# recompute): "triton" (the fused kernels, vocab_partials_kernel and logits_grad_kernel, which
# never write an fp32 tile) or "torch" (torch's GEMMs, cuBLAS on CUDA, into fp32 tiles inside
# the workspace, then fold_rows_triton's row passes over them).
LOGITS_GEMMS = ("triton", "torch")

# Both default to "torch" for bf16 heads where torch has cuBLAS's bf16 GEMM with an fp32
# result (matmul_torch.cublas_bf16), else "triton" (fp32 heads: 3xTF32 against cuBLAS's plain
# fp32 at 51 TFLOP/s). Measured on an H100 (token_logprobs forward + backward, N = 16384,
# D = 4096, V = 151936, bf16, 2026-11-27): both "torch" 127.3 ms / 2892 MiB; cuBLAS gradient
# GEMMs with the fused logit kernels 141.6 ms / 3000 MiB; both "triton" 149.5 ms / 2523 MiB.
# GOPD_BACKWARD_GEMM and GOPD_LOGITS_GEMM override the defaults ("triton": the leanest).


# How a bf16 dW is carried across row chunks, where the rows do not fit one (the folded
# losses' chunks; the recomputing backward's beyond its workspace): "float32", an fp32
# [V, D] buffer that torch's GEMMs add to and that is rounded into dW at the end, or "pair",
# dW itself plus a bf16 remainder [V, D], kept by the Triton matmul's epilogue
# (matmul_triton: ~16 significant bits of each partial sum to fp32's 24, before the one
# rounding to bf16's 8). While summing, both hold 4 bytes an element beside nothing else
# ("pair": dW and its remainder); "float32" then holds dW beside its buffer while rounding
# (6), which "pair" never does. So "pair" lowers a peak only where that step set it (1.2 GB
# at D = 4096, V = 151936), for the dW GEMM on Triton instead of cuBLAS. "auto" (the
# default) is "float32", except that a fold whose chunks' dZ together weigh no more keeps
# them and forms dW in one GEMM at the end (folded_loss_torch.HeadGrad: N <= 2D on the GPU
# path); "float32" asks for the sum there too, to compare. Other heads keep their own way:
# fp32 heads sum into dW, fp16 heads in fp32 (an fp16 remainder would underflow).
DW_SUMS = ("auto", "float32", "pair")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


MIN_TRITON_CAPABILITY = (8, 0)
# AMD GPUs (by gfx name) that gopd_kernels.aot compiles every kernel for: CDNA2 (MI210, MI250X),
# CDNA3 (MI300X, MI325X), CDNA4 (MI350X, MI355X). Others (RDNA's wave32 parts, MI100) run the
# torch twin on hipBLAS.
AMD_TRITON_ARCHS = ("gfx90a", "gfx942", "gfx950")


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    return tuple(torch.cuda.get_device_capability(device))


def amd_arch(device: torch.device) -> str | None:
    """The gfx name of a "cuda" device under ROCm's torch (e.g. "gfx942"), None under CUDA's."""
    if torch.version.hip is None:
        return None
    return torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]


def _triton_unsupported(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run well on this CUDA (or ROCm) device, or None."""
    arch = amd_arch(device)
    if arch is not None:
        if arch in AMD_TRITON_ARCHS:
            return None
        return (
            f"{torch.cuda.get_device_name(device)} ({arch}) is not among the AMD GPUs the Triton kernels "
            f"are compiled and checked for ({', '.join(AMD_TRITON_ARCHS)})"
        )
    cap = cuda_capability(device)
    if cap >= MIN_TRITON_CAPABILITY:
        return None
    return (
        f"{torch.cuda.get_device_name(device)} has compute capability {cap[0]}.{cap[1]}, and the Triton "
        "kernels need 8.0 or newer (Ampere, Hopper, ...): older GPUs get no tensor-core path from Triton, "
        "and a bf16 dZ against an fp16 head does not compile there"
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``; ValueError if impossible."""
    check_choice(backend, BACKENDS, "backend")
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_importable():
            raise ValueError("backend='triton' needs the triton package, which is not importable here")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device.type}); on a CPU set TRITON_INTERPRET=1 "
                "before triton is imported to run the kernels through the interpreter"
            )
        why = _triton_unsupported(device) if device.type == "cuda" else None
        if why:
            raise ValueError(f"backend='triton': {why}; use backend='torch' (or 'auto') there")
        return "triton"
    if device.type == "cuda":
        if not triton_importable():
            warn_once("backend='auto': triton is not importable, running the (slower) torch backend on CUDA")
            return "torch"
        why = _triton_unsupported(device)
        if why is None:
            return "triton"
        warn_once(
            f"backend='auto': {why}; running the torch backend instead (cuBLAS / hipBLAS GEMMs, on fp16 "
            "tensor cores for fp16 heads, with scaled gradient tiles)"
        )
    return "torch"


def workspace_bytes(backend: str, weight: torch.Tensor, default: int | None = None) -> int:
    """Tile workspace budget: GOPD_WORKSPACE_MB when set, else `default` or the backend's."""
    override = os.environ.get("GOPD_WORKSPACE_MB")
    if override:
        try:
            mb = float(override)
        except ValueError:
            raise ValueError(f"GOPD_WORKSPACE_MB must be a number of MiB, got {override!r}") from None
        if mb <= 0:
            raise ValueError(f"GOPD_WORKSPACE_MB must be > 0, got {override!r}")
        return int(mb * (1 << 20))
    if default is not None:
        return default
    if backend == "torch":
        return TORCH_WORKSPACE_BYTES
    return max(TRITON_MIN_WORKSPACE_BYTES, weight.numel() * weight.element_size())


def backward_gemm(cublas_bf16: bool = False) -> str:
    """The backward GEMMs' runner, "triton" or "torch": GOPD_BACKWARD_GEMM, else "torch" for
    operands that matmul_torch.cublas_bf16 accepts (the caller's answer), else "triton"."""
    return _env_choice("GOPD_BACKWARD_GEMM", BACKWARD_GEMMS, "torch" if cublas_bf16 else "triton")


def logits_gemm(cublas_bf16: bool = False) -> str:
    """Who builds the logit tiles of token_logprobs and frozen_logprobs on the Triton backend:
    GOPD_LOGITS_GEMM, else as backward_gemm."""
    return _env_choice("GOPD_LOGITS_GEMM", LOGITS_GEMMS, "torch" if cublas_bf16 else "triton")


def dw_sum(weight: torch.Tensor) -> str:
    """How a bf16 head's dW is summed across row chunks (DW_SUMS): GOPD_DW_SUM, else "auto".
    "pair" asked for a head of another dtype says once that it keeps its own way."""
    choice = _env_choice("GOPD_DW_SUM", DW_SUMS, "auto")
    if choice == "pair" and weight.dtype != torch.bfloat16:
        warn_once(
            f"GOPD_DW_SUM=pair applies to bf16 heads; this {weight.dtype} head's dW is summed "
            f"{'in itself' if weight.dtype == torch.float32 else 'in float32'}"
        )
        return "float32"
    return choice


def _env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    return check_choice(os.environ.get(name, default), choices, name)


@functools.cache
def warn_once(message: str) -> None:
    logger.warning(message)


@functools.cache
def info_once(message: str) -> None:
    logger.info(message)


def implementation(op: str, backend: str) -> ModuleType:
    """The module with forward()/backward() of `op` for a resolved backend: ops/{op}_{backend}.py.

    Imported on first use, so that the torch backend never imports triton.
    """
    return importlib.import_module(f"gopd_kernels.ops.{op}_{backend}")
