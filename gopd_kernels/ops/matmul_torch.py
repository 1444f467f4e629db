"""The torch backend's GEMMs: float32 results, operands in bf16 where the device allows it.

Where torch runs bf16 x bf16 -> float32 GEMMs (``out_dtype=torch.float32``: cuBLAS, torch
>= 2.8), bf16 inputs go to them as they are: tensor cores with fp32 accumulation, the
arithmetic of the Triton kernels' ``tl.dot``, and no fp32 copy of the LM head. Gradient
tiles dL/dz, computed in fp32, are rounded to bf16 for the two gradient GEMMs (as the Triton
backward stores them); dH and dW are accumulated in fp32, in place by ``torch.addmm(...,
out_dtype=...)`` where this torch takes a float32 accumulator (else through a temporary).

Elsewhere operands are upcast to float32 first (float64 stays float64): on CPUs, whose
torch (2.13) has no such GEMM and a bf16 result would round every logit to 3 significant
digits; for fp16 inputs, whose dL/dz would underflow in fp16. A one-off probe per device
(bf16_gemm_mode) decides, and says in a log line when bf16 inputs are upcast or accumulate
through a temporary.
"""

from __future__ import annotations

import functools
import logging

import torch

from gopd_kernels.backend import warn_once

logger = logging.getLogger("gopd_kernels")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of tiles and accumulators: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bf16 @ bf16 -> a new float32 tensor (cuBLAS, fp32 accumulation)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _addmm_fp32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float) -> None:
    """out (float32) <- beta * out + alpha * (bf16 a @ bf16 b), in one cuBLAS call."""
    torch.addmm(out, a, b, out_dtype=torch.float32, beta=beta, alpha=alpha, out=out)


_ONE = 1 + 2**-7  # exact in bf16; 16 ONE^2 = 16 + 2^-2 + 2^-10 is exact in fp32, not in a bf16 result


def _probe(device: torch.device, fused: bool) -> str | None:
    """None if the bf16 GEMM with a float32 result works exactly on `device`, else why not."""
    try:
        a = torch.full((16, 16), _ONE, dtype=torch.bfloat16, device=device)
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


@functools.cache
def bf16_gemm_mode(device: torch.device) -> str | None:
    """How bf16 operands reach the GEMMs on `device`: "addmm" (float32 results accumulated in
    place, CUDA with a recent torch), "mm" (float32 results, then added: one more pass over the
    accumulator), or None (upcast to float32 GEMMs). Probed once per device; said in a log
    line where it is not "addmm"."""
    if _probe(device, fused=True) is None:
        return "addmm"
    why = _probe(device, fused=False)
    if why is None:
        logger.warning(
            "torch GEMMs on %s: this torch (%s) cannot accumulate bf16 GEMMs into float32 in place; "
            "each accumulation takes a float32 temporary and one more pass", device, torch.__version__,
        )  # fmt: skip
        return "mm"
    logger.warning(
        "torch GEMMs on %s: this torch (%s) has no bf16 GEMM with a float32 result (%s); the torch "
        "backend upcasts bf16 inputs to float32 GEMMs, which are slower, and the Triton backend keeps "
        "its own GEMMs where cuBLAS's are its default (the losses' folds, token_logprobs' tiles)",
        device, torch.__version__, why,
    )  # fmt: skip
    return None


def cublas_bf16(*tensors: torch.Tensor | None) -> bool:
    """bf16 operands throughout (None skipped) on a device where torch has the bf16 GEMM with
    an fp32 result (cuBLAS on CUDA): where the Triton backend's measured defaults hand GEMMs
    to torch (the losses' folds, token_logprobs' logit tiles and gradient GEMMs)."""
    present = [t for t in tensors if t is not None]
    return all(t.dtype == torch.bfloat16 for t in present) and bf16_gemm_mode(present[0].device) is not None


def operand(t: torch.Tensor) -> torch.Tensor:
    """An input (hidden states, a weight slice) as a GEMM operand: bf16 kept where native
    GEMMs run (see the module doc), else upcast to the compute dtype."""
    if t.dtype == torch.bfloat16 and bf16_gemm_mode(t.device) is not None:
        return t
    if t.dtype == torch.float16 and t.device.type != "cpu":  # a GPU, whose fp16 GEMMs this forgoes
        warn_once(
            f"torch backend on {t.device.type}: fp16 operands are upcast to float32 GEMMs (an fp16 "
            "dL/dz would underflow), slower than the GPU's fp16 tensor cores"
        )
    return t.to(compute_dtype(t.dtype))


def like_operand(tile: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """A float32 tile (dL/dz, probabilities) in the dtype of the operand it multiplies."""
    return tile.to(other.dtype)


def _gemm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """out <- beta * out + alpha * a @ b (beta 0 or 1), out in the compute dtype; a, b operands of
    one dtype: the compute dtype itself, or bf16 (operand())."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b, beta=beta, alpha=alpha)  # beta = 0: the old contents are ignored
    if bf16_gemm_mode(out.device) == "addmm":
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
