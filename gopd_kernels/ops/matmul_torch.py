"""The torch backend's GEMMs: float32 results, operands in bf16 where the device allows it.

Where torch runs bf16 x bf16 -> float32 GEMMs (``torch.mm(..., out_dtype=torch.float32)``:
cuBLAS, torch >= 2.8), bf16 inputs go to them as they are: tensor cores with fp32
accumulation, the arithmetic of the Triton kernels' ``tl.dot``, and no fp32 copy of the LM
head. Gradient tiles dL/dz, computed in fp32, are rounded to bf16 for the two gradient
GEMMs (as the Triton backward stores them); dH and dW are accumulated in fp32.

Elsewhere operands are upcast to float32 first (float64 stays float64): on CPUs, whose
torch (2.13) has no such GEMM and a bf16 result would round every logit to 3 significant
digits; for fp16 inputs, whose dL/dz would underflow in fp16. A one-off probe per device
decides, and says in a log line when bf16 inputs are upcast.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger("gopd_kernels")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of tiles and accumulators: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 @ bf16 -> float32 (cuBLAS, fp32 accumulation)."""
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def _probe_bf16_gemm(device: torch.device) -> bool:
    """Whether this torch runs bf16 x bf16 -> float32 GEMMs on `device`; logs why not."""
    want = 16 * (1 + 2**-7) ** 2  # 16 + 2^-2 + 2^-10: exact in fp32, not in a bf16 result
    try:
        a = torch.full((16, 16), 1 + 2**-7, dtype=torch.bfloat16, device=device)
        got = _mm_fp32_out(a, a)
        exact = got.dtype == torch.float32 and bool((got == want).all())
        why = None if exact else f"got {got.dtype} {got.flatten()[0].item()} for {want}"
    except (RuntimeError, TypeError) as e:  # no out_dtype kernel (NotImplementedError), or no argument
        why = str(e).splitlines()[0][:120]
    if why is not None:
        logger.warning(
            "backend='torch' on %s: this torch (%s) has no bf16 GEMM with a float32 result (%s); "
            "bf16 inputs are upcast to float32 GEMMs, which are slower",
            device, torch.__version__, why,
        )  # fmt: skip
    return why is None


@functools.cache
def native_bf16_gemm(device: torch.device) -> bool:
    """Whether bf16 operands go to the GEMMs as they are on `device` (CUDA, torch >= 2.8)."""
    return _probe_bf16_gemm(device)


def operand(t: torch.Tensor) -> torch.Tensor:
    """An input (hidden states, a weight slice) as a GEMM operand: bf16 kept where native
    GEMMs run (see the module doc), else upcast to the compute dtype."""
    if t.dtype == torch.bfloat16 and native_bf16_gemm(t.device):
        return t
    return t.to(compute_dtype(t.dtype))


def like_operand(tile: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """A float32 tile (dL/dz, probabilities) in the dtype of the operand it multiplies."""
    return tile.to(other.dtype)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out <- alpha * a @ b, out in the compute dtype; a, b operands of one dtype."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b, beta=0, alpha=alpha)  # beta = 0: the old contents are ignored
    _mm_fp32_out(a, b, out=out)
    return out.mul_(alpha) if alpha != 1.0 else out


def mm_add(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """out += alpha * a @ b, accumulated in out's (compute) dtype."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b, alpha=alpha)
    return out.add_(_mm_fp32_out(a, b), alpha=alpha)
