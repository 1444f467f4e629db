"""Fully sharded data parallelism (PyTorch's FSDP2, ZeRO-3) for the student (`fsdp: true`)
and for the frozen teachers and reference (`shard_frozen: true`).

    torchrun --nproc_per_node 8 -m gopd train --config my.yaml --fsdp true

Each of the W ranks keeps 1/W of every student weight, of its gradient and of its AdamW
state; a decoder layer's weights are all-gathered just before the layer runs and freed
after it, in the forward and again in the backward, and its gradients are reduce-scattered
(summed, as gopd.distributed sums them: each rank's loss is its share of the step's loss).
The weights are held in float32 and cast to `dtype` for the compute (FSDP2's mixed
precision), so a bf16 student's AdamW steps float32 weights as MasterWeightAdamW does, with
no separate master copy.

The root group (the embeddings, the final norm and the LM head, tied or not) is gathered
by the student's own forward and kept until the backward (FSDP2 does not reshard a root
after its forward): final_hidden therefore runs the student's whole forward (with one
position of logits, `logits_to_keep=1`) and takes the decoder's output from a hook, so that the fused
losses read the gathered head weight and its gradient is reduce-scattered with the rest.

Collectives need every rank to make the same calls: generate() runs with `synced_gpus` (a
rank that has finished keeps stepping until all have), gopd.batching.step_plan gives every
rank as many micro-batches (a rank with fewer repeats one at weight zero), evaluate gives a
rank out of prompts one more, unscored, and each rank's vLLM engine is loaded from the
student gathered one tensor at a time (gathered_weights), all ranks together.

Sharded frozen models are read the same way (their root forward gathers their head) and
free their gathered root after use (release); scoring then also keeps the ranks in step,
domain by domain (gopd.batching.step_plan).

Checkpoints are the student gathered whole (on rank 0, in `dtype`, Hugging Face format as
ever) and one file per rank with that rank's float32 weight shards and AdamW state;
resuming needs as many ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from gopd.distributed import DistContext

logger = logging.getLogger("gopd")


def shard_student(student: torch.nn.Module, ctx: DistContext, dtype: torch.dtype) -> torch.nn.Module:
    """Shard a float32 student over the ranks, computed in `dtype` (see _shard), its gradients
    summed over the ranks. A LoRA student (peft) is sharded inside its wrapper: its adapters
    are sharded with the layer that holds them, beside the frozen base weights, and only they
    have gradients and AdamW state. Returns the same module."""
    cast = {} if dtype == torch.float32 else dict(param_dtype=dtype, reduce_dtype=torch.float32)
    _shard(_inner(student), ctx, mp_policy=MixedPrecisionPolicy(**cast))  # no casts: fully_shard's default
    for module in student.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum over the ranks, not a mean
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    total = sum(p.numel() for p in student.parameters()) / 1e6
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad) / 1e6
    compute = str(dtype).removeprefix("torch.")
    logger.info("fsdp: the student's %.1fM weights (%.3fM trained), their gradients and AdamW state "
                "sharded over %d ranks (float32, computed in %s)", total, trained, ctx.world_size,
                compute)  # fmt: skip
    return student


def shard_frozen(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """Shard a frozen model (a teacher, the reference) over the ranks in the dtype it was
    loaded in (see _shard). Its root group (embeddings, norm, head) stays gathered after a
    forward until release(). Returns the same module."""
    _shard(model, ctx)
    return model


def _shard(model: torch.nn.Module, ctx: DistContext, **options) -> None:
    """Each decoder layer a group, the rest the root. Each group's weights move to ctx.device
    as it is sharded (FSDP2 moves and shards in place), so a model loaded on the CPU reaches
    the GPU one layer at a time."""
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)


def release(*models) -> None:
    """Free the gathered root weights of the sharded ones among `models` (None and replicated
    models are skipped): after a frozen model's outputs and its head are no longer needed (an
    AdapterFree reference's are its sharded student's)."""
    for model in models:
        if is_sharded(model):
            _inner(model).reshard()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    decoder = getattr(model, model.base_model_prefix)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"fsdp: {type(model).__name__} has no decoder `layers` to shard one by one")
    return list(layers)


def is_sharded(model) -> bool:
    """Whether the model is sharded (a LoRA student: the model inside its peft wrapper; an
    AdapterFree reference: its student's)."""
    return isinstance(_inner(model), FSDPModule)


def _inner(model):
    from gopd.models import unwrapped  # here: gopd.models imports this module

    return unwrapped(model)


def root_forward_hidden(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """The final hidden states [B, T, D], from the sharded student's whole forward (see the
    module doc: the root's weights, the head among them, are gathered by it)."""
    decoder = getattr(model, model.base_model_prefix)
    seen = {}
    hook = decoder.register_forward_hook(lambda module, args, out: seen.update(hidden=out.last_hidden_state))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=1)  # fmt: skip
    finally:
        hook.remove()
    return seen["hidden"]


def full_weights(model, dtype: torch.dtype, ctx: DistContext, only: str | None = None
                 ) -> dict[str, torch.Tensor] | None:  # fmt: skip
    """The whole student's state dict in `dtype` on rank 0's CPU (None on the others), gathered
    one tensor at a time, so that no rank ever holds more than one whole float32 tensor; with
    `only`, just the tensors whose names hold it (".lora_": a LoRA student's adapters). Every
    rank must call it (each gather is a collective)."""
    out: dict[str, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor | None] = {}  # a tied head is the same Parameter: gathered once
    for name, t in model.state_dict(keep_vars=True).items():
        if only is not None and only not in name:
            continue
        if id(t) not in gathered:
            full = whole(t)
            gathered[id(t)] = full.to("cpu", dtype) if ctx.is_main else None
        out[name] = gathered[id(t)]
    return out if ctx.is_main else None


def gathered_weights(model, skip: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of a sharded student, one tensor at a time, on every rank (what a
    rank's vLLM engine loads), but those whose names hold `skip`. Each gather is a collective:
    every rank must consume the whole iterator, in the same order. A tied head is gathered
    under each of its names."""
    for name, t in model.state_dict().items():
        if skip is None or skip not in name:
            yield name, whole(t)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A weight whole: gathered from every rank's shard (a collective) when it is sharded."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def shard_state(student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's part of a checkpoint: the float32 shards of its trained weights (the Hugging
    Face files hold them rounded to dtype; frozen ones, a LoRA student's base among them, are
    as loaded) and its optimizer state."""
    weights = [p.to_local().detach().clone() for p in student.parameters() if p.requires_grad]
    return {"weights": weights, "trained_only": True, "optimizer": local_optimizer_state(optimizer)}


@torch.no_grad()
def load_shard_state(student: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of shard_state, on a student sharded as it was (as many ranks). A checkpoint
    from before "trained_only" holds every weight's shard."""
    params = [p for p in student.parameters() if p.requires_grad or not state.get("trained_only")]
    if len(state["weights"]) != len(params) or any(
        w.shape != p.to_local().shape for w, p in zip(state["weights"], params, strict=True)
    ):
        raise ValueError("resume: the checkpoint's weight shards do not match this student's sharding "
                         "(resume an fsdp run on as many ranks)")  # fmt: skip
    for w, p in zip(state["weights"], params, strict=True):
        p.to_local().copy_(w)
    load_local_optimizer_state(optimizer, state["optimizer"])


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with each sharded tensor replaced by this rank's shard."""
    state = optimizer.state_dict()
    state["state"] = {
        k: {name: v.to_local() if isinstance(v, DTensor) else v for name, v in s.items()}
        for k, s in state["state"].items()
    }
    return state


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of local_optimizer_state: each shard back as a DTensor shaped as its weight."""
    optimizer.load_state_dict(state)
    for p, s in optimizer.state.items():
        for name, v in s.items():
            if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.to_local().shape:
                s[name] = DTensor.from_local(v.to(p.to_local().device), p.device_mesh, p.placements,
                                             shape=p.shape, stride=p.stride())  # fmt: skip
