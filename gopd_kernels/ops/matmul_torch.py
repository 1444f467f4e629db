"""The torch backend's GEMMs: float32 results, operands in bf16 or fp16 where the device allows it.

Where torch runs bf16 x bf16 -> float32 and fp16 x fp16 -> float32 GEMMs (``out_dtype=
torch.float32``: cuBLAS, torch >= 2.8; fp16 on every CUDA GPU, a T4's and a V100's tensor
cores included), half-precision inputs go to them as they are: tensor cores with fp32
accumulation, the arithmetic of the Triton kernels' ``tl.dot``, and no fp32 copy of the LM
head. Gradient tiles dL/dz and probability tiles, computed in fp32, become the other
operand of their GEMM in its dtype (scaled_operand): rounded to bf16 as the Triton backward
stores them, or, for fp16, written times a power of two from the tile's largest entry and
multiplied back by its inverse in the GEMM, as the Triton kernels' fp16 dZ is (unscaled, a
token mean's small gradients flush to zero in fp16). dH and dW are accumulated in fp32, in
place by ``torch.addmm(..., out_dtype=...)`` where this torch takes a float32 accumulator
(else through a temporary).

Elsewhere operands are upcast to float32 first (float64 stays float64): on CPUs, whose
torch (2.13) has no such GEMM and a bf16 result would round every logit to 3 significant
digits. A one-off probe per device and dtype (bf16_gemm_mode, fp16_gemm_mode) decides, and
says in a log line when inputs are upcast on a GPU, or bf16 ones on any device, or when
they accumulate through a temporary.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger("gopd_kernels")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of tiles and accumulators: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """half @ half -> a new float32 tensor (cuBLAS, fp32 accumulation)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _addmm_fp32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float) -> None:
    """out (float32) <- beta * out + alpha * (half a @ half b), in one cuBLAS call."""
    torch.addmm(out, a, b, out_dtype=torch.float32, beta=beta, alpha=alpha, out=out)


_ONE = 1 + 2**-7  # exact in bf16 and fp16; 16 ONE^2 = 16 + 2^-2 + 2^-10: exact in fp32, not in a half


def _probe(device: torch.device, fused: bool, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None if the `dtype` GEMM with a float32 result works exactly on `device`, else why not."""
    try:
        a = torch.full((16, 16), _ONE, dtype=dtype, device=device)
        if fused:  # accumulating into a float32 tensor in place, and scaling
            got = torch.full((16, 16), 0.5, dtype=torch.float32, device=device)
            _addmm_fp32_(got, a, a, beta=1.0, alpha=2.0)
            want = 0.5 + 32 * _ONE**2
        else:
            got, want = _mm_fp32_out(a, a), 16 * _ONE**2
        if got.dtype == torch.float32 and bool((got == want).all()):
            return None
        return f"got {got.dtype} {got.flatten()[0].item()} for {want}"
    except (RuntimeError, TypeError) as e:  # no out_dtype kernel (NotImplementedError), or no argument
        return str(e).splitlines()[0][:120]


def _gemm_mode(device: torch.device, dtype: torch.dtype, say_upcast: bool) -> str | None:
    """bf16_gemm_mode's and fp16_gemm_mode's answer for `dtype` (see there)."""
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    if _probe(device, fused=True, dtype=dtype) is None:
        return "addmm"
    why = _probe(device, fused=False, dtype=dtype)
    if why is None:
        logger.warning(
            "torch GEMMs on %s: this torch (%s) cannot accumulate %s GEMMs into float32 in place; "
            "each accumulation takes a float32 temporary and one more pass", device, torch.__version__, name,
        )  # fmt: skip
        return "mm"
    if say_upcast:
        logger.warning(
            "torch GEMMs on %s: this torch (%s) has no %s GEMM with a float32 result (%s); the torch "
            "backend upcasts %s inputs to float32 GEMMs, which are slower%s", device, torch.__version__, name,
            why, name, ", and the Triton backend keeps its own GEMMs where cuBLAS's are its default (the "
            "losses' folds, token_logprobs' tiles)" if dtype == torch.bfloat16 else "",
        )  # fmt: skip
    return None


@functools.cache
def bf16_gemm_mode(device: torch.device) -> str | None:
    """How bf16 operands reach the GEMMs on `device`: "addmm" (float32 results accumulated in
    place, CUDA with a recent torch), "mm" (float32 results, then added: one more pass over the
    accumulator), or None (upcast to float32 GEMMs). Probed once per device; said in a log
    line where it is not "addmm"."""
    return _gemm_mode(device, torch.bfloat16, say_upcast=True)


@functools.cache
def fp16_gemm_mode(device: torch.device) -> str | None:
    """bf16_gemm_mode for fp16 operands. A CPU's upcast goes unsaid (CPUs have no fp16 GEMM to
    forgo); a GPU's is said (a T4's or a V100's fp16 tensor cores forgone)."""
    return _gemm_mode(device, torch.float16, say_upcast=device.type != "cpu")


def half_gemm_mode(device: torch.device, dtype: torch.dtype) -> str | None:
    """bf16_gemm_mode or fp16_gemm_mode by dtype; None for any other dtype (its own GEMMs)."""
    if dtype == torch.bfloat16:
        return bf16_gemm_mode(device)
    return fp16_gemm_mode(device) if dtype == torch.float16 else None


def cublas_half(*tensors: torch.Tensor | None) -> bool:
    """One half dtype throughout (bf16 or fp16; None skipped) on a device where torch has its
    GEMM with an fp32 result: where the Triton backend's losses fold by default (cuBLAS GEMMs,
    fp16's dz scaled at them as on the torch backend)."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    same = all(t.dtype == dtype for t in present)
    return same and half_gemm_mode(present[0].device, dtype) is not None


def cublas_bf16(*tensors: torch.Tensor | None) -> bool:
    """cublas_half for bf16 only: where token_logprobs' logit tiles and gradient GEMMs go to
    torch by default (their dZ over cuBLAS tiles has no fp16 scale)."""
    present = [t for t in tensors if t is not None]
    return present[0].dtype == torch.bfloat16 and cublas_half(*present)


def operand(t: torch.Tensor) -> torch.Tensor:
    """An input (hidden states, a weight slice) as a GEMM operand: bf16 and fp16 kept where
    native GEMMs run (see the module doc), else upcast to the compute dtype."""
    if half_gemm_mode(t.device, t.dtype) is not None:
        return t
    return t.to(compute_dtype(t.dtype))


FP16_DZ_TOP = 2.0**13  # the largest |entry| an fp16 GEMM operand tile is scaled to: 8x below fp16's max


def fp16_dz_scale(bound: torch.Tensor) -> torch.Tensor:
    """s, a power of two (a float32 scalar on the tensor's device: no host sync), with which an
    fp16 tile (dZ, probabilities) whose entries are at most `bound` (a scalar tensor) is
    written: s times its largest possible entry is at most FP16_DZ_TOP, so that none overflows
    and the small entries of the largest rows stay clear of fp16's subnormals. A power of two
    is exact to apply and remove."""
    exponent = torch.floor(torch.log2(FP16_DZ_TOP / bound.float().clamp_min(2.0**-100)))
    return torch.exp2(exponent.clamp(-100.0, 100.0))


def tile_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a compute-dtype tile (dL/dz) is written in to multiply an operand of `dtype`:
    `dtype` itself, but fp32 for fp16, which scaled_operand scales into fp16 at the GEMM (an
    unscaled fp16 tile would flush a token mean's small gradients)."""
    return torch.float32 if dtype == torch.float16 else dtype


def scaled_operand(tile: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A compute-dtype tile (dL/dz, probabilities) as the operand that multiplies `other`, in
    other's dtype, and the alpha its GEMM takes to undo the tile's scale: 1, or for an fp16
    operand 1 / s with s from fp16_dz_scale of the tile's own largest entry (read on the host:
    one sync per tile, on the torch backend's GPUs only, whose alpha is a host number). A tile
    already in other's dtype is taken as it is."""
    if other.dtype != torch.float16 or tile.dtype == other.dtype or tile.numel() == 0:
        return tile.to(other.dtype), 1.0
    s = float(fp16_dz_scale(tile.abs().amax()))
    return (tile * s).to(torch.float16), 1.0 / s


@functools.cache
def say_tf32(device: torch.device, precision: str) -> None:
    """Say once when fp32 GEMMs on `device` run as TF32: on Ampere and newer GPUs under
    torch.set_float32_matmul_precision below "highest" (`precision`), which gopd's torch GEMMs
    follow, as every torch GEMM does. TF32 keeps 10 of fp32's 23 mantissa bits per operand,
    so an fp32 head's logits are then ~1e-3 off in relative terms."""
    from gopd_kernels.backend import cuda_capability

    if device.type == "cuda" and precision != "highest" and cuda_capability(device) >= (8, 0):
        logger.warning(
            "torch.get_float32_matmul_precision() is %r: gopd's fp32 GEMMs on torch (an fp32 head's "
            "logit tiles and gradients on %s) run as TF32, as that setting asks, ~1e-3 relative error in "
            "the logits; 'highest' gives fp32 GEMMs, and the Triton backend's own GEMMs (its default for "
            "fp32 heads) keep ~fp32 accuracy whatever the setting (3xTF32; fp32 MFMA on AMD GPUs)",
            precision,
            device,
        )


def _gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """out <- beta * out + alpha * a @ b (beta 0 or 1), out in the compute dtype; a, b operands of
    one dtype: the compute dtype itself, or bf16 or fp16 (operand())."""
    if a.dtype == out.dtype:
        if a.dtype == torch.float32:
            say_tf32(out.device, torch.get_float32_matmul_precision())
        return out.addmm_(a, b, beta=beta, alpha=alpha)  # beta = 0: the old contents are ignored
    if half_gemm_mode(out.device, a.dtype) == "addmm":
        _addmm_fp32_(out, a, b, beta=beta, alpha=alpha)
        return out
    product = _mm_fp32_out(a, b)
    return torch.mul(product, alpha, out=out) if beta == 0 else out.add_(product, alpha=alpha)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out <- alpha * a @ b."""
    return _gemm(out, a, b, beta=0.0, alpha=alpha)


def mm_add(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out += alpha * a @ b, accumulated in out's (compute) dtype."""
    return _gemm(out, a, b, beta=1.0, alpha=alpha)
