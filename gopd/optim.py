"""AdamW on float32 master copies of a half-precision student's weights.

A bf16 weight w moves only if its update exceeds half its rounding step, about
|w| * 2^-9: at the official lr of 1e-5, AdamW's updates (about lr each) are lost for every
weight above ~0.005 in magnitude, that is for nearly all of them. (Measured on the tiny
test model, dtype bfloat16, lr 1e-5, 3 steps: 15 % of its weights changed at all, against
all of them in float32.) So for a bf16/fp16 student the optimizer steps float32 copies
and writes them back rounded, as mixed-precision trainers (Megatron, DeepSpeed, FSDP) do.

Gradients are moved into the masters' float32 `.grad` as soon as autograd has accumulated
each one (a post-accumulate hook), so micro-batches add up in float32 and the half-precision
gradient is freed at once. Memory per trained weight: 2 (weight) + 4 (master) + 4 (gradient)
+ 8 (AdamW moments) bytes, against 16 for a float32 student.

Sharded (ZeRO stage 1, `owners`/`rank`, for data parallelism): each rank keeps the masters
and AdamW moments of its own share of the tensors only, 12 / W bytes per trained weight on W
ranks instead of 12. Every rank still accumulates the float32 gradient of every tensor (on
a `GradSlot` where it owns no master), since the gradients are summed over the ranks and
clipped by their global norm; after its step a rank's updated weights are broadcast to the
others (gopd.distributed.broadcast_from_owners).

A float16 student's gradients also need loss scaling: float16 flushes to zero below 6e-8
(bf16 has float32's range), so the loss is multiplied by `loss_scale.scale` before the
backward and the float32 gradients divided by it after. The scale is dynamic (as
torch.amp.GradScaler's): halved on an overflow, whose step is skipped, doubled after
GROWTH_INTERVAL steps without one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor


class GradSlot:
    """Where the float32 gradient of a weight whose master another rank owns accumulates:
    `.grad`, with the `shape`, `dtype` and `device` of that gradient (as a master's)."""

    def __init__(self, param: torch.Tensor):
        self.grad: torch.Tensor | None = None
        self.shape, self.dtype, self.device = param.shape, torch.float32, param.device


def partition(numels: list[int], world_size: int) -> list[int]:
    """The owner rank of each tensor: largest first, each to the rank with the fewest
    elements so far (ties to the lowest rank). The same on every rank."""
    load, owners = [0] * world_size, [0] * len(numels)
    for i in sorted(range(len(numels)), key=lambda i: -numels[i]):
        rank = min(range(world_size), key=lambda r: load[r])
        owners[i] = rank
        load[rank] += numels[i]
    return owners


class LossScale:
    """The dynamic loss scale of a float16 student (see the module doc)."""

    INIT = 2.0**16
    GROWTH_INTERVAL = 2000

    def __init__(self) -> None:
        self.scale, self.good_steps = self.INIT, 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale, self.good_steps = max(self.scale / 2, 1.0), 0
        else:
            self.good_steps += 1
            if self.good_steps == self.GROWTH_INTERVAL:
                self.scale, self.good_steps = self.scale * 2, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def unscale(grads: list[torch.Tensor], scale: float, agree: Callable[[bool], bool] = bool) -> bool:
    """Divide the gradients by the loss scale, unless one is not finite (then False, nothing
    divided). agree(all finite here) -> all finite everywhere: the ranks' verdict where each
    holds other gradients (FSDP's shards)."""
    finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())  # one host sync
    if not agree(finite):
        return False
    if grads:
        torch._foreach_div_(grads, scale)
    return True


class ScaledAdamW(torch.optim.AdamW):
    """torch.optim.AdamW on FSDP's float32 shards of a student computed in float16
    (gopd.fsdp): the dynamic loss scale, without masters (the shards are the float32
    weights). An overflow on any rank's shards skips the step on every rank (`agree`)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], agree: Callable[[bool], bool], **adamw_kwargs):
        super().__init__(params, **adamw_kwargs)
        self.loss_scale, self.agree = LossScale(), agree

    def unscale_grads(self) -> bool:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]  # in place: the shards
        return unscale(local, self.loss_scale.scale, self.agree)

    def state_dict(self) -> dict:
        return super().state_dict() | {"loss_scale": self.loss_scale.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        scale = state_dict.pop("loss_scale", None)
        if scale is None:  # as MasterWeightAdamW says it
            raise ValueError("optimizer state and student disagree on float16 loss scaling (another dtype?)")
        self.loss_scale.load_state_dict(scale)
        super().load_state_dict(state_dict)


class MasterWeightAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose parameters are float32 copies of `params` (half precision).

    Clip and inspect gradients through `slots` (the masters, and GradSlots where the
    optimizer is sharded): the model's own `.grad` stays None. The state dict carries the
    masters (and the loss scale), so a resumed run continues from the float32 weights, not
    their rounding. `loss_scale` is a LossScale when any parameter is float16, else None.
    `owners` (one rank per parameter, see `partition`) with this process's `rank` shards it.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        owners: list[int] | None = None,
        rank: int = 0,
        **adamw_kwargs,
    ):
        self.model_params = list(params)
        self.owners = owners if owners is not None else [rank] * len(self.model_params)
        if len(self.owners) != len(self.model_params):
            raise ValueError(f"owners: {len(self.owners)} ranks for {len(self.model_params)} parameters")
        self.owned = [i for i, o in enumerate(self.owners) if o == rank]
        self.slots: list[torch.Tensor | GradSlot] = [GradSlot(p) for p in self.model_params]
        for i in self.owned:
            self.slots[i] = self.model_params[i].detach().float().clone().requires_grad_(True)
        masters = [self.slots[i] for i in self.owned]
        super().__init__(masters or [torch.zeros(0, requires_grad=True)], **adamw_kwargs)
        self.loss_scale = LossScale() if any(p.dtype == torch.float16 for p in self.model_params) else None
        for p, slot in zip(self.model_params, self.slots, strict=True):
            p.register_post_accumulate_grad_hook(self._to_slot(slot))

    @property
    def sharded(self) -> bool:
        return len(self.owned) < len(self.model_params)

    @property
    def masters(self) -> list[torch.Tensor]:
        """The float32 weights this rank owns (all of them unless sharded)."""
        return [self.slots[i] for i in self.owned]

    @staticmethod
    def _to_slot(slot: torch.Tensor | GradSlot):
        def hook(param: torch.Tensor) -> None:
            if slot.grad is None:
                slot.grad = param.grad.float()
            else:
                slot.grad.add_(param.grad)
            param.grad = None

        return hook

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for slot in self.slots:
            if isinstance(slot, GradSlot):
                slot.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for i in self.owned:
            self.model_params[i].copy_(self.slots[i])
        return loss

    def unscale_grads(self) -> bool:
        """Divide every gradient by the loss scale; False (and nothing divided) if any is not
        finite: the float16 backward overflowed at this scale."""
        return unscale([s.grad for s in self.slots if s.grad is not None], self.loss_scale.scale)

    def state_dict(self) -> dict:
        # references, not copies, as torch.optim keeps its own state tensors in state_dict()
        state = super().state_dict() | {
            "master_weights": [m.detach() for m in self.masters],
            "owners": self.owners,
        }
        return state | ({"loss_scale": self.loss_scale.state_dict()} if self.loss_scale else {})

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        if saved is None:
            raise ValueError("optimizer state has no master_weights: it was not saved by MasterWeightAdamW")
        owners = state_dict.pop("owners", None)
        if owners is not None and list(owners) != self.owners:
            raise ValueError("optimizer state was sharded over other ranks (another world size or student?)")
        scale = state_dict.pop("loss_scale", None)
        if (scale is None) != (self.loss_scale is None):
            raise ValueError("optimizer state and student disagree on float16 loss scaling (another dtype?)")
        if scale is not None:
            self.loss_scale.load_state_dict(scale)
        super().load_state_dict(state_dict)
        for i, s in zip(self.owned, saved, strict=True):
            self.slots[i].copy_(s)
            self.model_params[i].copy_(s)
