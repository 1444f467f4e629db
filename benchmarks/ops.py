"""What the benchmarks run: each op, its inputs, its FLOP count and every implementation of it.

An implementation is a function of the inputs dict that runs the forward and returns its
output; the harness then runs the backward (when the op has one) with ``Op.upstream`` and
reads the gradients of ``hidden`` and ``weight``. Every implementation of an op computes the
same quantity from the same inputs, so outputs and gradients are compared across them:

    naive          the materialising reference a user would write (gopd_kernels.reference)
    torch-compile  torch.compile of that same function
    gopd           gopd_kernels (torch backend on CPU, Triton on CUDA)
    gopd-torch     gopd_kernels' torch backend on CUDA (cuBLAS GEMMs, bf16 or fp16 operands with fp32
                   results, fp16 gradient tiles scaled; the losses fold their gradient)
    gopd-fold      fold=True on CUDA (the losses, and token_logprobs with a frozen head): the Triton
                   backend's fold (cuBLAS GEMMs, fused row passes; the default in bf16)
    gopd-recompute fold=False on CUDA: the recomputing Triton backward (the default in fp32)
    gopd-fused     token_logprobs on CUDA with the fused Triton kernels and Triton GEMMs throughout
                   (GOPD_LOGITS_GEMM=GOPD_BACKWARD_GEMM=triton): the leanest path, where bf16's
                   default builds the logit tiles and runs the gradient GEMMs on cuBLAS
    liger          Liger-Kernel: fused linear cross-entropy (CUDA only), chunked GRPO, fused linear JSD
    liger-fp32     token_logprobs: Liger's fused linear cross-entropy with accum_dtype=float32, its
                   setting that sums dW in fp32 across token chunks (the default sums in bf16)
    liger-scaled   Liger-Kernel's per-token scaled cross-entropy (token_logprobs): its SM90 CuTe DSL
                   kernel on an H100 (with nvidia-cutlass-dsl), its chunked PyTorch fallback elsewhere
    cce            Cut Cross-Entropy's linear_cross_entropy ("torch_compile" impl on CPU, "cce" on CUDA)

A peer that cannot run somewhere says why (``Impl.unavailable``) and is left out of that run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch

import gopd_kernels as gk
from gopd_kernels import reference as ref

LAM = 1.25  # the ExOPD setting of the official runs; gopd_dense_loss uses lam = 1 (see its description)


@dataclass
class Impl:
    description: str
    run: Callable[[dict], torch.Tensor]
    needs: str | None = None  # importable module it needs
    cuda_only: str | None = None  # why it runs on CUDA only
    env: dict[str, str] = field(default_factory=dict)  # settings for its forward and backward

    def unavailable(self, device: str) -> str | None:
        if self.cuda_only and device != "cuda":
            return f"needs CUDA ({self.cuda_only})"
        if self.needs and importlib.util.find_spec(self.needs) is None:
            return f"{self.needs} is not installed (pip install -e '.[bench]')"
        return None


TRITON_ONLY = "its kernels are Triton-only"


def _ours(name: str, run: Callable[..., torch.Tensor], folds: bool = False) -> dict[str, Impl]:
    """gopd with its default backend, and on CUDA also with backend='torch', to compare Triton's
    recomputing kernels with cuBLAS GEMMs (and, for the losses, the folded gradient). An op
    that folds (run(x, backend, fold)) adds its Triton backend with fold=True and fold=False."""
    out = {
        "gopd": Impl(f"gopd_kernels.{name}", lambda x: run(x, "auto")),
        "gopd-torch": Impl(f"gopd_kernels.{name}(backend='torch')", lambda x: run(x, "torch"),
                           cuda_only="on CPU it is the gopd row"),
    }  # fmt: skip
    if folds:
        out["gopd-fold"] = Impl(f"gopd_kernels.{name}(fold=True): the Triton backend's fold (cuBLAS GEMMs, "
                                "Triton row passes)", lambda x: run(x, "auto", True),
                                cuda_only="on CPU it is the gopd row")  # fmt: skip
        out["gopd-recompute"] = Impl(f"gopd_kernels.{name}(fold=False): the Triton backend's recomputing "
                                     "backward", lambda x: run(x, "auto", False),
                                     cuda_only="this is the Triton backward")  # fmt: skip
    return out


@dataclass
class Op:
    description: str
    backward: bool
    flops: Callable[[int, int, int], float]  # useful FLOPs for (N, D, V): the GEMMs any method must do
    make_extra: Callable[[dict, torch.Generator], None]  # adds the op's own inputs
    impls: dict[str, Impl] = field(default_factory=dict)
    frozen_head: bool = False  # the backward wants dH only (LoRA, a frozen LM head)

    def upstream(self, x: dict) -> torch.Tensor | None:
        return x.get("upstream") if self.backward else None


def make_inputs(op: Op, n: int, d: int, v: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """The student's hidden states and LM head, the sampled tokens, and the op's own inputs."""
    g = torch.Generator().manual_seed(seed)
    x = {"n": n, "d": d, "v": v, "dtype": dtype, "device": device}
    x["hidden"], x["weight"] = _model(x, g)
    x["targets"] = torch.randint(0, v, (n,), generator=g).to(device)
    op.make_extra(x, g)
    return x


def _model(x: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [N, D] and an LM head [V, D] whose logits have std ~2 (peaked, not degenerate)."""
    n, d, v = x["n"], x["d"], x["v"]
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * (2.0 / d**0.5)
    return h.to(x["device"], x["dtype"]), w.to(x["device"], x["dtype"])


def _per_token(x: dict, t: torch.Tensor) -> torch.Tensor:
    return t.to(x["device"], torch.float32)  # per-token values stay fp32, as a trainer holds them


def with_leaves(x: dict, op: Op, copy: bool = True) -> dict:
    """x plus leaf copies "h", "w" of the student's hidden states and head, for run_impl; they
    need gradients when the op has a backward, the head not when the op freezes it. With
    copy=False the leaves share x's storage (for an x made for one call)."""
    leaf = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
    h = leaf(x["hidden"]).requires_grad_(op.backward)
    w = leaf(x["weight"]).requires_grad_(op.backward and not op.frozen_head)
    return {**x, "h": h, "w": w}


# --- peers' entry points, imported lazily so that a missing peer only removes its rows -------


@cache
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn)


def _cce_logp(
    h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if h.is_cuda else "torch_compile"
    return -linear_cross_entropy(h, w, y, reduction="none", impl=impl, softcap=softcap).float()


def _liger_flce_logp(
    h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, accum_dtype: torch.dtype | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """accum_dtype: what Liger sums dW in across its token chunks (None: the head's dtype)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none", accum_dtype=accum_dtype, softcap=softcap)
    return -loss(w, h, y).float()


def _liger_scaled_logp(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Liger's per-token scaled cross-entropy, negated: on an sm_90 GPU its CuTe DSL kernel
    (the published anchor; it needs nvidia-cutlass-dsl, else the import fails, recorded as
    such), elsewhere its chunked PyTorch fallback (512 tokens, after verl's fused PPO)."""
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

    return -LigerFusedLinearScaledCrossEntropyFunction.apply(h, w, y.long(), 1.0, -100).float()


# --- token_logprobs: forward only, and forward + backward with a per-token upstream gradient ---


def _upstream(x: dict, g: torch.Generator) -> None:
    x["upstream"] = _per_token(x, torch.randn(x["n"], generator=g))


def _student(x: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return x["h"], x["w"], x["targets"]


def _logprob_impls(frozen_head: bool = False) -> dict[str, Impl]:
    """frozen_head: the op's backward wants dH only, which token_logprobs can fold (fold=...)."""
    return {
        "naive": Impl("materialised [N, V] logits, log_softmax, gather",
                      lambda x: ref.token_logprobs_reference(*_student(x))),
        "torch-compile": Impl("torch.compile of naive",
                              lambda x: _compiled(ref.token_logprobs_reference)(*_student(x))),
        **_ours("token_logprobs", lambda x, b, f=None: gk.token_logprobs(*_student(x), backend=b, fold=f),
                frozen_head),
        **({} if frozen_head else {"gopd-fused": Impl(
            "gopd_kernels.token_logprobs with GOPD_LOGITS_GEMM=GOPD_BACKWARD_GEMM=triton: the fused kernels",
            lambda x: gk.token_logprobs(*_student(x)), cuda_only="the Triton kernels",
            env={"GOPD_LOGITS_GEMM": "triton", "GOPD_BACKWARD_GEMM": "triton"})}),
        "liger": Impl("LigerFusedLinearCrossEntropyLoss(reduction='none'), negated",
                      lambda x: _liger_flce_logp(*_student(x)),
                      needs="liger_kernel", cuda_only=TRITON_ONLY),
        **({} if frozen_head else {"liger-fp32": Impl(
            "LigerFusedLinearCrossEntropyLoss(reduction='none', accum_dtype=torch.float32), negated: dW "
            "summed in fp32 across its token chunks (by default in the head's dtype)",
            lambda x: _liger_flce_logp(*_student(x), accum_dtype=torch.float32),
            needs="liger_kernel", cuda_only=TRITON_ONLY)}),
        "liger-scaled": Impl("LigerFusedLinearScaledCrossEntropyFunction, negated: the SM90 CuTe DSL "
                             "kernel on an H100, its chunked fallback elsewhere",
                             lambda x: _liger_scaled_logp(*_student(x)), needs="liger_kernel"),
        "cce": Impl("cut_cross_entropy.linear_cross_entropy(reduction='none'), negated",
                    lambda x: _cce_logp(*_student(x)), needs="cut_cross_entropy"),
    }  # fmt: skip


GEMMA_SOFTCAP = 30.0  # Gemma 2's final_logit_softcapping: logits c tanh(z / c)


def _softcap_logp(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ref.token_logprobs_reference(h, w, y, logit_softcap=GEMMA_SOFTCAP)


def _softcap_impls() -> dict[str, Impl]:
    """token_logprobs' implementations for a soft-capped head: each peer with its softcap argument."""
    c = GEMMA_SOFTCAP
    return {
        "naive": Impl("materialised [N, V] logits, c tanh(z / c), log_softmax, gather",
                      lambda x: _softcap_logp(*_student(x))),
        "torch-compile": Impl("torch.compile of naive", lambda x: _compiled(_softcap_logp)(*_student(x))),
        **_ours("token_logprobs", lambda x, b: gk.token_logprobs(*_student(x), logit_softcap=c, backend=b)),
        "liger": Impl(f"LigerFusedLinearCrossEntropyLoss(reduction='none', softcap={c}), negated",
                      lambda x: _liger_flce_logp(*_student(x), softcap=c),
                      needs="liger_kernel", cuda_only=TRITON_ONLY),
        "cce": Impl(f"cut_cross_entropy.linear_cross_entropy(reduction='none', softcap={c}), negated",
                    lambda x: _cce_logp(*_student(x), softcap=c), needs="cut_cross_entropy"),
    }  # fmt: skip


# --- gopd_loss: the on-policy G-OPD policy-gradient loss (of a soft-capped head too) --------


def _loss_inputs(x: dict, g: torch.Generator) -> None:
    n = x["n"]
    x["teacher_logp"] = _per_token(x, -torch.rand(n, generator=g) * 10)
    x["ref_logp"] = _per_token(x, -torch.rand(n, generator=g) * 10)
    # Liger's GRPO loss takes the advantage as an input: it gets the student's log-probs from
    # before the update, as a trainer holds them from the rollout (chunked, never [N, V]).
    with torch.no_grad():
        x["old_logp"] = gk.token_logprobs(x["hidden"], x["weight"], x["targets"])


def _naive_gopd_loss(h, w, y, teacher_logp, ref_logp):
    return ref.gopd_loss_reference(h, w, y, teacher_logp, ref_logp, lam=LAM)


def _naive_softcap_gopd_loss(h, w, y, teacher_logp, ref_logp):
    return ref.gopd_loss_reference(h, w, y, teacher_logp, ref_logp, lam=LAM, logit_softcap=GEMMA_SOFTCAP)


def _cce_gopd_loss(x: dict, softcap: float | None = None) -> torch.Tensor:
    s = _cce_logp(*_student(x), softcap=softcap)
    adv = gk.gopd_advantage(s.detach(), x["teacher_logp"], x["ref_logp"], lam=LAM)
    return -(adv * torch.exp(s - s.detach())).mean()


def _static_shapes(x: dict):
    """For Liger's torch.compile'd chunk losses on CUDA: compile each chunk shape as it is. On
    the H100 (torch 2.11) the GRPO loss, compiled at the 67-token check and then at N = 16384,
    recompiled with dynamic shapes and raised InternalTorchDynamoError (IndexError creating a
    shape guard, can_use_32bit_indexing); static shapes avoid that path (not yet rerun on the
    GPU). CPUs keep the default: there each round is a fresh process whose warm-up shapes
    make the graph dynamic, so that the timed shape does not compile again."""
    if x["device"] != "cuda":
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(automatic_dynamic_shapes=False)


def _liger_grpo_loss(x: dict, advantages: torch.Tensor, **settings) -> torch.Tensor:
    """LigerFusedLinearGRPOLoss on the student's rows, one token per "sequence": Liger's
    advantages are per sequence, ours per token. `settings` are its loss_type and clip range."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(
        beta=0.0, use_ref_model=False, chunk_size=1024, compiled=True, **settings
    )
    ones = torch.ones(x["n"], 1, dtype=torch.long, device=x["h"].device)
    with _static_shapes(x):
        out = loss_fn(x["h"].unsqueeze(1), x["w"], x["targets"].unsqueeze(1), ones, advantages,
                      old_per_token_logps=x["old_logp"].unsqueeze(1))  # fmt: skip
    return out[0] if isinstance(out, tuple) else out


def _liger_gopd_loss(x: dict) -> torch.Tensor:
    # With one token per sequence, loss_type "grpo" is the token mean, as ours.
    adv = gk.gopd_advantage(x["old_logp"], x["teacher_logp"], x["ref_logp"], lam=LAM)
    return _liger_grpo_loss(x, adv, loss_type="grpo")


def _loss_args(x: dict) -> tuple:
    return x["h"], x["w"], x["targets"], x["teacher_logp"], x["ref_logp"]


def _loss_impls() -> dict[str, Impl]:
    return {
        "naive": Impl("materialised logits, then the loss (gopd_loss_reference)",
                      lambda x: _naive_gopd_loss(*_loss_args(x))),
        "torch-compile": Impl("torch.compile of naive",
                              lambda x: _compiled(_naive_gopd_loss)(*_loss_args(x))),
        **_ours("gopd_loss", lambda x, b, f=None: gk.gopd_loss(*_loss_args(x), lam=LAM, backend=b, fold=f)[0],
                True),
        "gopd-entropy": Impl("gopd_kernels.gopd_loss(return_entropy=True), as the trainer calls it: the "
                             "student's entropy from the loss's own pass over the logits",
                             lambda x: gk.gopd_loss(*_loss_args(x), lam=LAM, return_entropy=True)[0]),
        "liger": Impl("LigerFusedLinearGRPOLoss, one token per sequence, advantage from pre-update log-probs",
                      _liger_gopd_loss, needs="liger_kernel"),
        "cce": Impl("linear_cross_entropy(reduction='none') log-probs, then the loss in PyTorch",
                    _cce_gopd_loss, needs="cut_cross_entropy"),
    }  # fmt: skip


def _softcap_loss_impls() -> dict[str, Impl]:
    """gopd_loss of a soft-capped head; Liger's GRPO loss takes no softcap, so only CCE's log-probs."""
    c = GEMMA_SOFTCAP
    return {
        "naive": Impl(f"materialised logits capped at {c:g}, then the loss (gopd_loss_reference)",
                      lambda x: _naive_softcap_gopd_loss(*_loss_args(x))),
        "torch-compile": Impl("torch.compile of naive",
                              lambda x: _compiled(_naive_softcap_gopd_loss)(*_loss_args(x))),
        **_ours("gopd_loss", lambda x, b, f=None: gk.gopd_loss(*_loss_args(x), lam=LAM, logit_softcap=c,
                                                               backend=b, fold=f)[0], True),
        "cce": Impl(f"linear_cross_entropy(reduction='none', softcap={c:g}) log-probs, then the loss",
                    lambda x: _cce_gopd_loss(x, softcap=c), needs="cut_cross_entropy"),
    }  # fmt: skip


# --- policy_loss: a per-token loss of the caller's, through token_logprob_loss ------------------

CLIP = (0.2, 0.28)  # DAPO's clip-higher


def _policy_inputs(x: dict, g: torch.Generator) -> None:
    """Per-token advantages, and pre-update log-probs 0.2 off the current ones so that the clip acts."""
    n = x["n"]
    x["advantages"] = _per_token(x, torch.randn(n, generator=g))
    with torch.no_grad():
        s = gk.token_logprobs(x["hidden"], x["weight"], x["targets"])
    x["old_logp"] = s + _per_token(x, torch.randn(n, generator=g) * 0.2)


def clipped_surrogate(s: torch.Tensor, advantages: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """PPO's clipped surrogate per token, DAPO's clip range (CLIP)."""
    ratio = torch.exp(s - old_logp.to(s.dtype))
    adv = advantages.to(s.dtype)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP[0], 1 + CLIP[1]))


def _naive_policy_loss(h, w, y, advantages, old_logp):
    return clipped_surrogate(ref.token_logprobs_reference(h, w, y), advantages, old_logp).mean()


def _policy_args(x: dict) -> tuple:
    return x["h"], x["w"], x["targets"], x["advantages"], x["old_logp"]


def _liger_policy_loss(x: dict) -> torch.Tensor:
    # "dapo" normalises by the batch's tokens: the token mean.
    return _liger_grpo_loss(x, x["advantages"], loss_type="dapo", epsilon_low=CLIP[0], epsilon_high=CLIP[1])


def _policy_impls() -> dict[str, Impl]:
    def ours(x, backend, fold=None):
        h, w, y, adv, old = _policy_args(x)
        return gk.token_logprob_loss(h, w, y, clipped_surrogate, (adv, old), backend=backend, fold=fold)[0]

    def then_loss(logp: Callable[..., torch.Tensor]) -> Callable[[dict], torch.Tensor]:
        return lambda x: clipped_surrogate(logp(*_student(x)), x["advantages"], x["old_logp"]).mean()

    return {
        "naive": Impl("materialised logits, then the loss", lambda x: _naive_policy_loss(*_policy_args(x))),
        "torch-compile": Impl("torch.compile of naive",
                              lambda x: _compiled(_naive_policy_loss)(*_policy_args(x))),
        **_ours("token_logprob_loss", ours, True),
        "gopd-unfolded": Impl("gopd_kernels.token_logprobs, then the loss in PyTorch (its backward "
                              "recomputes the logits): what token_logprob_loss folds",
                              then_loss(gk.token_logprobs)),
        "liger": Impl("LigerFusedLinearGRPOLoss(loss_type='dapo'), one token per sequence",
                      _liger_policy_loss, needs="liger_kernel"),
        "cce": Impl("linear_cross_entropy(reduction='none') log-probs, then the loss in PyTorch",
                    then_loss(_cce_logp), needs="cut_cross_entropy"),
    }  # fmt: skip


# --- gopd_dense_loss at lam = 1: the full-vocabulary reverse KL to the teacher ----------------


def _teacher_head(x: dict, g: torch.Generator) -> None:
    x["teacher"] = _model(x, g)


def _naive_dense(h, w, th, tw):
    return ref.gopd_dense_loss_reference(h, w, th, tw)[0]


def _liger_dense(x: dict) -> torch.Tensor:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    # beta = 1 is KL(student || teacher); no hard (cross-entropy) term
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, compiled=True)
    with _static_shapes(x):
        return loss_fn(x["h"], x["w"], *x["teacher"], x["targets"])


def _dense_impls() -> dict[str, Impl]:
    args = lambda x: (x["h"], x["w"], *x["teacher"])
    return {
        "naive": Impl("two materialised [N, V] log-softmaxes (gopd_dense_loss_reference)",
                      lambda x: _naive_dense(*args(x))),
        "torch-compile": Impl("torch.compile of naive", lambda x: _compiled(_naive_dense)(*args(x))),
        **_ours("gopd_dense_loss", lambda x, b, f=None: gk.gopd_dense_loss(*args(x), backend=b, fold=f)[0],
                True),
        "liger": Impl("LigerFusedLinearJSDLoss(beta=1, weight_hard_loss=0)", _liger_dense,
                      needs="liger_kernel"),
    }  # fmt: skip


# --- frozen scoring: teacher and reference log-probs of the sampled tokens, no grad ----------


def _teacher_and_ref(x: dict, g: torch.Generator) -> None:
    x["teacher"], x["ref"] = _model(x, g), _model(x, g)


# --- gopd_dense_loss_exopd: dense G-OPD at lam != 1, which needs the reference; no peer has it -


def _naive_dense_exopd(h, w, th, tw, rh, rw):
    return ref.gopd_dense_loss_reference(h, w, th, tw, rh, rw, lam=LAM)[0]


def _dense_exopd_impls() -> dict[str, Impl]:
    args = lambda x: (x["h"], x["w"], *x["teacher"], *x["ref"])
    return {
        "naive": Impl("three materialised [N, V] log-softmaxes (gopd_dense_loss_reference)",
                      lambda x: _naive_dense_exopd(*args(x))),
        "torch-compile": Impl("torch.compile of naive", lambda x: _compiled(_naive_dense_exopd)(*args(x))),
        # the loss alone, as naive computes it: no KL-to-teacher statistic
        **_ours("gopd_dense_loss(teacher_kl=False)",
                lambda x, b, f=None: gk.gopd_dense_loss(*args(x), lam=LAM, teacher_kl=False, backend=b,
                                                        fold=f)[0], True),
    }  # fmt: skip


def _naive_scores(th, tw, rh, rw, y):
    return torch.stack([ref.token_logprobs_reference(th, tw, y), ref.token_logprobs_reference(rh, rw, y)])


def _scoring_impls() -> dict[str, Impl]:
    args = lambda x: (*x["teacher"], *x["ref"], x["targets"])

    def ours(x, backend):
        th, tw, rh, rw, y = args(x)
        return torch.stack(gk.frozen_logprobs(th, tw, y, rh, rw, backend=backend)[:2])

    def per_model(logp_fn):
        return lambda x: torch.stack([logp_fn(*x["teacher"], x["targets"]), logp_fn(*x["ref"], x["targets"])])

    return {
        "naive": Impl("two materialised [N, V] log-softmaxes", lambda x: _naive_scores(*args(x))),
        "torch-compile": Impl("torch.compile of naive", lambda x: _compiled(_naive_scores)(*args(x))),
        **_ours("frozen_logprobs (Triton: cuBLAS tiles per model for bf16, else one launch for both)", ours),
        "liger": Impl("LigerFusedLinearCrossEntropyLoss(reduction='none'), once per model",
                      per_model(_liger_flce_logp), needs="liger_kernel", cuda_only=TRITON_ONLY),
        "cce": Impl("linear_cross_entropy(reduction='none'), once per model", per_model(_cce_logp),
                    needs="cut_cross_entropy"),
    }  # fmt: skip


OPS: dict[str, Op] = {
    "token_logprobs_fwd": Op(
        "log-probs of N sampled tokens, forward only (no grad)",
        False, lambda n, d, v: 2 * n * d * v, lambda x, g: None, _logprob_impls()),
    "token_logprobs": Op(
        "log-probs of N sampled tokens, forward + backward with a random per-token upstream gradient",
        True, lambda n, d, v: 6 * n * d * v, _upstream, _logprob_impls()),
    "token_logprobs_softcap": Op(
        f"log-probs of N sampled tokens of a soft-capped head (logits {GEMMA_SOFTCAP:g} tanh(z / "
        f"{GEMMA_SOFTCAP:g}), Gemma 2's), forward + backward with a random per-token upstream gradient",
        True, lambda n, d, v: 6 * n * d * v, _upstream, _softcap_impls()),
    "token_logprobs_frozen_head": Op(
        "log-probs of N sampled tokens, forward + backward to the hidden states only (frozen LM "
        "head, as under LoRA), random per-token upstream gradient",
        True, lambda n, d, v: 4 * n * d * v, _upstream, _logprob_impls(frozen_head=True), frozen_head=True),
    "gopd_loss": Op(
        f"on-policy G-OPD policy-gradient loss, lam={LAM}, token-mean; teacher/ref log-probs given",
        True, lambda n, d, v: 6 * n * d * v, _loss_inputs, _loss_impls()),
    "gopd_loss_softcap": Op(
        f"gopd_loss (lam={LAM}, on-policy, token-mean) of a soft-capped head (logits {GEMMA_SOFTCAP:g} "
        f"tanh(z / {GEMMA_SOFTCAP:g}), Gemma 2's); teacher/ref log-probs given",
        True, lambda n, d, v: 6 * n * d * v, _loss_inputs, _softcap_loss_impls()),
    "gopd_loss_frozen_head": Op(
        f"gopd_loss (lam={LAM}) with a frozen LM head (the trainer's freeze_lm_head, or LoRA): "
        "gradient to the hidden states only",
        True, lambda n, d, v: 4 * n * d * v, _loss_inputs, _loss_impls(), frozen_head=True),
    "policy_loss": Op(
        f"a per-token loss of the caller's: PPO's clipped surrogate (clip {CLIP[0]:g} / {CLIP[1]:g}) with "
        "per-token advantages, off-policy, token-mean (token_logprob_loss)",
        True, lambda n, d, v: 6 * n * d * v, _policy_inputs, _policy_impls()),
    "gopd_dense_loss": Op(
        "dense G-OPD at lam=1, KL(p_s || p_T) over the full vocabulary (the only lam a reverse-KL "
        "peer can do); student and teacher of hidden size D",
        True, lambda n, d, v: 8 * n * d * v, _teacher_head, _dense_impls()),
    "gopd_dense_loss_exopd": Op(
        f"dense G-OPD at lam={LAM} (ExOPD), KL(p_s || q) with q ~ p_T^lam p_R^(1-lam) over the full "
        "vocabulary; student, teacher and reference of hidden size D (no peer computes it)",
        True, lambda n, d, v: 10 * n * d * v, _teacher_and_ref, _dense_exopd_impls()),
    "frozen_scoring": Op(
        "teacher and reference log-probs of N sampled tokens (no grad), both of hidden size D",
        False, lambda n, d, v: 4 * n * d * v, _teacher_and_ref, _scoring_impls()),
}  # fmt: skip


def run_impl(op: Op, impl: Impl, call: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One forward (+ backward) on ``call = with_leaves(x, op)``; returns (output, dH, dW|None)."""
    h, w = call["h"], call["w"]
    with environment(impl.env):
        if not op.backward:
            with torch.no_grad():
                return impl.run(call), None, None
        h.grad = w.grad = None
        out = impl.run(call)
        out.backward(op.upstream(call))
    return out.detach(), h.grad, w.grad


@contextlib.contextmanager
def environment(settings: dict[str, str]):
    """The environment variables `settings` set around a block, restored after."""
    old = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})


def float64_reference(op: Op, x: dict, rows: int | None = None) -> tuple:
    """naive in float64 on the values of ``x`` (already rounded to its dtype): (output, dH, dW).

    Computed once per shape, on leaves that are the float64 copies themselves: at D = 4096,
    V = 151936 the head and its gradient are 5 GB each in float64. rows: run naive on that
    many rows at a time (its [rows, V] float64 logits instead of [N, V]), summing dW and
    joining the rows' outputs and dH; a scalar output is a token mean (every loss here is),
    so each chunk's counts rows / N of it.
    """
    to64 = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    x64 = {k: tuple(map(to64, t)) if isinstance(t, tuple) else to64(t) for k, t in x.items()}
    n = x["n"]
    if rows is None or rows >= n:
        return run_impl(op, op.impls["naive"], with_leaves(x64, op, copy=False))
    outs, dhs, dw = [], [], None
    for start in range(0, n, rows):
        part = with_leaves(rows_of(x64, slice(start, min(start + rows, n))), op, copy=False)
        out = op.impls["naive"].run(part)
        if out.ndim == 0:
            out = out * (part["n"] / n)
        if op.backward:
            out.backward(op.upstream(part))
            dhs.append(part["h"].grad)
            if part["w"].grad is not None:
                dw = part["w"].grad if dw is None else dw.add_(part["w"].grad)
        outs.append(out.detach())
    out = sum(outs) if outs[0].ndim == 0 else torch.cat(outs, dim=-1)
    return out, (torch.cat(dhs) if dhs else None), dw


ROW_INPUTS = ("hidden", "targets", "upstream", "teacher_logp", "ref_logp", "old_logp", "advantages")
MODEL_INPUTS = ("teacher", "ref")  # (hidden states, head): the hidden states are rows


def rows_of(x: dict, rows: slice) -> dict:
    """``x`` for a slice of its N rows (heads whole): what the op computes on those tokens alone."""
    part = {**x, "n": len(range(x["n"])[rows])}
    part |= {k: x[k][rows] for k in ROW_INPUTS if k in x}
    part |= {k: (x[k][0][rows], x[k][1]) for k in MODEL_INPUTS if k in x}
    return part


def float64_errors(op: Op, impl: Impl, x: dict, want: tuple) -> dict[str, float]:
    """Relative max errors of ``impl`` on inputs ``x`` against ``want = float64_reference(op, x)``."""
    return errors(op, run_impl(op, impl, with_leaves(x, op)), want)


def errors(op: Op, got: tuple, want: tuple, by_row: bool = False) -> dict[str, float]:
    """Relative max errors of (output, dH, dW) against another run's (dW: unless frozen).

    by_row: dH and dW as their worst row's relative error instead (reference.row_rel_err): each
    token's gradient and each vocabulary row of dW against its own size, where the max error
    is set against the largest entry of all, which the sampled tokens' rows of dW hold. Measured on
    the AMD VM (token_logprobs, bf16, N = 4096, D = 256, V = 32000, against float64): naive's
    dW 4.3e-3 by the max, 3.3e-2 by its worst row; gopd's 2.6e-3 and 2.0e-3."""
    names = ("out", "dh", "dw") if op.backward else ("out",)
    err = lambda k, a, b: ref.row_rel_err(a, b) if by_row and k != "out" else ref.rel_err(a, b)  # noqa: E731
    return {k: err(k, a, b) for k, a, b in zip(names, got, want, strict=False) if b is not None}


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 3e-2
