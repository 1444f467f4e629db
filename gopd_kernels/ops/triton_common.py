"""Pieces shared by the Triton kernels: tile ordering, launch configs, config pruning.

Configs are listed once per kernel family; on a GPU the autotuner picks among those that
fit the device's shared memory for the input dtype, under the interpreter one small config
runs (the interpreter cannot time kernels, and small tiles keep it fast). On AMD GPUs (ROCm's
torch) every config runs in two pipeline stages (amd_configs). The AOT test compiles every
(config, dtype, sm_80/sm_90) combination that this pruning can let through, and the hot
paths' for sm_100, sm_120 and AMD's gfx942 (gopd_kernels.aot).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gopd_kernels.backend import amd_arch, interpreter_enabled, warn_once

# ROCm's torch: "cuda" devices are AMD GPUs, and Triton compiles for them through its HIP backend
ON_HIP = torch.version.hip is not None

# Bytes of shared memory a block may use (opt-in maximum) by compute capability: A100 163 KiB;
# H100 and B200 227 KiB; 99 KiB on sm_86 (A10G, A40, RTX 3090), sm_89 (L4, L40S, RTX 4090) and
# sm_120 (RTX 5090, RTX PRO 6000). The runtime reads the device's own; these serve the AOT check.
# AMD Instinct (by gfx name): 64 KiB of LDS per workgroup on CDNA2/3 (MI250X, MI300X), 160 KiB
# on CDNA4 (MI355X).
SHARED_MEMORY_LIMIT = {
    80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376,
    "gfx90a": 65536, "gfx942": 65536, "gfx950": 163840,
}  # fmt: skip

# Every launch and the AOT check compile with FP fusion (a * b + c as one FMA, and ptxas's
# --fmad) named, not left to Triton's default: on by default up to Triton 3.9, off from 3.10
# (its warning says so at each process's first compile when TRITON_DEFAULT_FP_FUSION is unset).
# On: what every measurement of these kernels ran, and one rounding per FMA instead of two.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

# fp32 inputs take 3xTF32 on NVIDIA tensor cores (~fp32 accuracy, not plain TF32). AMD's matrix
# cores multiply fp32 natively (v_mfma_*_f32), and Triton's HIP backend has no tf32x3.
FP32_DOT_PRECISION = {"cuda": "tf32x3", "hip": "ieee"}
DOT_PRECISION = {
    torch.float32: FP32_DOT_PRECISION["hip" if ON_HIP else "cuda"],
    torch.bfloat16: "ieee",
    torch.float16: "ieee",
}


def token_bucket(n: int) -> int:
    """What the autotuner keys on for a token count: the next power of two.

    Token counts change every step (rollouts differ in length). Keyed on the raw count,
    the autotuner would time every config again at each new count, a stall of a second or
    more per step that never ends (xformers #1037, flash-linear-attention #1147). The
    kernels take the bucket as an argument they never read, only for the key."""
    return triton.next_power_of_2(max(1, n))


def config(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# Pipeline stages whose operand tiles wait in registers instead of shared memory (LDS): one on
# CDNA2/3, whose Triton pipeliner keeps stages - 1 tiles in LDS; none on NVIDIA GPUs and CDNA4
# (gfx950), which keep `stages` (what gopd_kernels.aot's compiles measure).
STAGES_IN_REGISTERS = {"gfx90a": 1, "gfx942": 1}
AMD_STAGES = 2


def amd_configs(configs: list) -> list:
    """A family's configs as they run on AMD GPUs: the same tiles and warps in AMD_STAGES
    pipeline stages, as the HIP configs of Triton's own matmul tutorial take. The NVIDIA lists'
    3 and 4 stages would keep only the narrowest tiles within MI300X's 64 KiB of LDS."""
    out = {}
    for c in configs:
        out.setdefault(
            (tuple(sorted(c.kwargs.items())), c.num_warps), config(c.num_warps, AMD_STAGES, **c.kwargs)
        )
    return list(out.values())


def estimated_shared_bytes(
    cfg: triton.Config, a_rows: str, b_rows: str, k: str, elem_bytes: int, stages_in_registers: int = 0
) -> int:
    """Pipelined operand tiles: (stages - stages_in_registers) x (A tile + B tile)."""
    kw = cfg.kwargs
    return max(1, cfg.num_stages - stages_in_registers) * (kw[a_rows] + kw[b_rows]) * kw[k] * elem_bytes


def fitting_configs(configs, a_rows, b_rows, k, elem_bytes, limit, stages_in_registers: int = 0):
    """The configs whose pipelined tiles fit `limit` bytes (with 10% headroom for the epilogue)."""
    return [
        c
        for c in configs
        if estimated_shared_bytes(c, a_rows, b_rows, k, elem_bytes, stages_in_registers) * 1.1 <= limit
    ]


@functools.cache
def device_shared_limit(device_index: int) -> int:
    device = torch.device("cuda", device_index)
    arch = amd_arch(device)
    if arch is not None:  # not the opt-in figure, which ROCm's torch need not report: the gfx name's LDS
        return SHARED_MEMORY_LIMIT[arch]
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", SHARED_MEMORY_LIMIT[80])


@functools.cache
def device_stages_in_registers(device_index: int) -> int:
    return STAGES_IN_REGISTERS.get(amd_arch(torch.device("cuda", device_index)), 0)


def make_pruner(a_rows: str, b_rows: str, k: str, elem_arg: str):
    """early_config_prune for triton.autotune: drop configs too big for this device and dtype."""

    def prune(configs, named_args, **_):
        t = named_args[elem_arg]
        elem = 2 if t.dtype in (torch.bfloat16, torch.float16) else 4
        index = t.device.index or 0
        limit = device_shared_limit(index)
        kept = fitting_configs(configs, a_rows, b_rows, k, elem, limit, device_stages_in_registers(index))
        if not kept:  # no GPU gopd_kernels.aot checks gets here: say so, and try the last config
            warn_once(
                f"no Triton launch config fits {limit // 1024} KiB of shared memory per block by its "
                f"estimate ({t.dtype} operands, {configs[-1]}); trying that last one"
            )
        return kept or configs[-1:]

    return prune


def autotuned(kernel, configs: list, key: list[str], prune, **kwargs):
    """`kernel` under triton.autotune, its picks kept on disk in Triton's cache (keyed by the
    Triton version, the GPU target, the kernel's source, the configs and the tuning key):
    a new process, a resumed run or the next benchmark does not time every config again,
    a stall of seconds per kernel and token bucket (measured on an H100: 5-12 s at
    N = 16384). To tune afresh, empty TRITON_CACHE_DIR (default ~/.triton/cache). Where it is
    unset, torch.compile sets it to inductor's directory for the rest of its process: picks
    made after a torch.compile land there, unseen by processes without one."""
    prune_by = {"early_config_prune": prune}
    configs = amd_configs(configs) if ON_HIP else configs
    return triton.autotune(configs, key=key, prune_configs_by=prune_by, cache_results=True, **kwargs)(kernel)


def launch(kernel, tuned, grid, interpret_config: dict, *args, **kwargs) -> None:
    """Run the autotuned kernel on a GPU, the raw one with a fixed small config when interpreting."""
    if interpreter_enabled():
        kernel[grid](*args, **kwargs, **interpret_config)
    else:
        tuned[grid](*args, **kwargs, **LAUNCH_OPTIONS)


# The interpreter keeps bf16 tensors as raw uint16 and its tl.dot would multiply the bit
# patterns; there, and only there, bf16 tiles are upcast before the dot. Compiled kernels
# never see this branch.
_INTERPRETED = tl.constexpr(interpreter_enabled())


@triton.jit
def dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b on tensor cores (fp32 accumulator)."""
    if _INTERPRETED:
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Map a 1-D program id to a (row tile, column tile) in groups of GROUP_M row tiles,
    so that programs running together share column tiles in L2."""
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def soft_cap(x, cap):
    """cap tanh(x / cap): a soft-capped head's logits. By exp, which the interpreter runs too
    (libdevice's tanh it does not): (1 - e^-2|t|) / (1 + e^-2|t|), and below |t| = 1/8, where
    that cancels, tanh's odd series to t^7 (5e-7 relative at most on either side)."""
    t = x / cap
    a = tl.abs(t)
    e = tl.exp(-2.0 * a)
    t2 = t * t
    series = a * (1.0 + t2 * (-1.0 / 3.0 + t2 * (2.0 / 15.0 + t2 * (-17.0 / 315.0))))
    th = tl.where(a < 0.125, series, (1.0 - e) / (1.0 + e))
    return cap * tl.where(t < 0, -th, th)


@triton.jit
def soft_cap_slope(capped, cap):
    """d capped / d raw = 1 - (capped / cap)^2, read off soft-capped logits themselves."""
    return 1.0 - (capped / cap) * (capped / cap)
