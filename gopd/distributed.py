"""Data parallelism over processes started by torchrun: one full student replica per rank.

    torchrun --nproc_per_node 8 -m gopd train --config my.yaml

Every rank draws the same global batch of `prompts_per_step` prompts (one data order, one
seed) and keeps its share, rows rank, rank + W, ... (W = world size). It samples, scores and
differentiates only those. The loss's normalisers, the step's valid tokens (token-mean) or
sequences (the sequence-mean modes), are summed over the ranks before any loss is formed, so
each rank's loss is its share of the whole step's loss, and the step's gradient is the sum of
the ranks' gradients: one all-reduce (sum) after the last micro-batch. Every rank then
clips, checks and steps the same gradient with the same optimizer state, so the replicas
stay identical to the bit (checked at the start and at every checkpoint: `check_replicas_agree`).

With `shard_optimizer` each rank keeps the optimizer state (float32 masters, AdamW moments)
of its share of the tensors only (gopd.optim.partition), steps that share, and broadcasts
the updated weights to the others (broadcast_from_owners): ZeRO stage 1. With `fsdp` the
student itself is sharded (gopd.fsdp, ZeRO stage 3) and FSDP2 sums the gradients instead.

The all-reduce runs after the backward, not overlapped with it as DDP's buckets are: in
on-policy distillation the rollouts dominate a step's time, and the update does not go
through the model's forward (the loss reads the final hidden states and the LM head), which
DDP's wrapper needs. Frozen teachers and the reference are replicated on every rank, unless
`shard_frozen` shards them (gopd.fsdp).

Backends: NCCL for CUDA ranks (rank r on cuda:LOCAL_RANK), gloo for CPU ranks (the tests).
A single process (no torchrun) is world size 1 and every helper here is a no-op.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger("gopd")
BUCKET_BYTES = 64 << 20  # gradients are all-reduced in flat buckets of at most this size
COLLECTIVE_TIMEOUT = timedelta(minutes=60)  # torch: 30 min for gloo, 10 for NCCL (short for long rollouts)


@dataclass(frozen=True)
class DistContext:
    """This process's place among the ranks; world_size 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives' tensors live (gloo: cpu)
    owns_group: bool = False  # the process group was started here (and is ended by close_distributed)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of a list that every rank holds whole: items rank, rank + W, ..."""
        return items[self.rank :: self.world_size]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over the ranks (float64)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: list[float], op) -> list[float]:
        if not self.enabled or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, obj) -> list | None:
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others: what only rank 0
        writes, without a copy of everything on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE = DistContext()


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: not a valid rank")
    return rank, world, local


def rank_device(device: str, local_rank: int, world_size: int) -> str:
    """The compute device of this rank for the config's `device`: under torchrun every CUDA
    rank takes its own GPU, cuda:LOCAL_RANK."""
    if world_size == 1:
        return device
    if device.startswith("cuda:"):
        raise ValueError(
            f"device: {device!r} would put all {world_size} ranks on one GPU; under torchrun use 'cuda' "
            "or 'auto' (rank r then runs on cuda:LOCAL_RANK)"
        )
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return f"cuda:{local_rank}"


def init_distributed(device: str) -> tuple[DistContext, str]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). Returns the context
    and this rank's device name (see rank_device)."""
    rank, world, local = env_world()
    name = rank_device(device, local, world)
    if world == 1:
        return SINGLE, name
    on_cuda = name.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(torch.device(name))
    owns = not dist.is_initialized()  # a caller's own group is used as it is, and left open
    if owns:  # ranks wait at a collective for the slowest one's rollouts or for rank 0's checkpoint
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    ctx = DistContext(rank, world, local, torch.device(name) if on_cuda else torch.device("cpu"), owns)
    if not ctx.is_main:  # one copy of the run's info lines, from rank 0; warnings from all
        logging.getLogger("gopd").setLevel(logging.WARNING)
    logger.info("data parallel: %d ranks (%s), rank 0 logs and saves", world, "nccl" if on_cuda else "gloo")
    return ctx, name


def close_distributed(ctx: DistContext) -> None:
    """End the process group this process started, once every rank is done with it. Models
    sharded over it (gopd.fsdp) are collected first: their device meshes, left to the
    interpreter's exit after the group's end, made 4 runs in 36 abort there (gloo, 2 ranks)."""
    if ctx.owns_group and dist.is_initialized():
        gc.collect()  # FSDP2 modules sit in reference cycles: unreachable is not yet freed
        dist.barrier()
        dist.destroy_process_group()


@torch.no_grad()
def all_reduce_grads(ctx: DistContext, params: list[torch.Tensor]) -> None:
    """Sum every parameter's .grad over the ranks, in place.

    A parameter with a gradient on some ranks and none on others (a rank whose rows never
    reached it) gets zeros where it had none; one that no rank differentiated keeps None, as
    it would in a single process, so the optimizer skips it alike.
    """
    if not ctx.enabled:
        return
    has = ctx.sum([float(p.grad is not None) for p in params])
    grads = []
    for p, n in zip(params, has, strict=True):
        if n > 0:
            if p.grad is None:  # p: a parameter, a float32 master, or a GradSlot (gopd.optim)
                p.grad = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            grads.append(p.grad)
    _bucketed(dist.all_reduce, grads)


@torch.no_grad()
def broadcast_from_owners(ctx: DistContext, params: list[torch.Tensor], owners: list[int]) -> None:
    """Copy each parameter from the rank that owns it (stepped it) to all the others."""
    if not ctx.enabled:
        return
    for rank in range(ctx.world_size):
        theirs = [p.data for p, o in zip(params, owners, strict=True) if o == rank]
        _bucketed(lambda t, rank=rank: dist.broadcast(t, src=rank), theirs)


def _bucketed(collective, tensors: list[torch.Tensor]) -> None:
    """Run an in-place collective over `tensors` in flat buckets (see _buckets): one call per
    bucket instead of one per tensor, the results copied back."""
    for bucket in _buckets(tensors, BUCKET_BYTES):
        if len(bucket) == 1:
            collective(bucket[0])
            continue
        flat = torch.cat([t.reshape(-1) for t in bucket])
        collective(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def _buckets(tensors: list[torch.Tensor], max_bytes: int):
    """Consecutive runs of tensors of one dtype and device, at most max_bytes each (a larger
    tensor is a bucket of its own)."""
    bucket, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        same = not bucket or (t.dtype == bucket[0].dtype and t.device == bucket[0].device)
        if bucket and (not same or size + nbytes > max_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def check_replicas_agree(ctx: DistContext, model: torch.nn.Module) -> None:
    """RuntimeError if the ranks' copies of `model` differ: a cheap fingerprint per rank (the
    float64 sums of every tensor and of its squares), gathered and compared exactly."""
    if not ctx.enabled:
        return
    local = torch.cat([_fingerprint(t) for t in model.state_dict().values()])
    prints = ctx.gather_objects(local)
    for r, other in enumerate(prints):
        if not torch.equal(other, prints[0]):
            bad = int((other != prints[0]).nonzero()[0]) // 2
            name = list(model.state_dict())[bad]
            raise RuntimeError(
                f"the student's replicas differ between rank 0 and rank {r} (first at {name!r}): the "
                "ranks started from different weights, stepped different gradients or ran a "
                "non-deterministic update"
            )


def _fingerprint(t: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """[sum, sum of squares] of a tensor in float64, on the CPU, through bounded temporaries."""
    acc = torch.zeros(2, dtype=torch.float64)
    for part in t.detach().reshape(-1).split(chunk):
        part = part.double()
        acc += torch.stack([part.sum(), part.square().sum()]).cpu()
    return acc
