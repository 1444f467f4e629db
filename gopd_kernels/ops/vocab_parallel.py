"""Vocabulary-parallel LM heads: each rank of a process group holds a slice of the head's rows.

Tensor-parallel trainers split the LM head by vocabulary (a column-parallel output layer):
rank r holds rows [start_r, start_r + V_r) of W and b, in rank order, and every rank holds
the same hidden states and targets. The log-softmax needs whole rows, so each rank runs the
single-device op on its slice, an id of another slice matching none of its columns, and the
ranks exchange three numbers per token in one all_gather:

    lse_r = log sum_{v in r} exp z_v      zy_r = z_y if y in r, else 0      H_r (with the entropy)

which vocab_partials.merge_vocab_shards turns into the whole row's lse, logp = sum_r zy_r - lse
and entropy. The backward needs nothing more: given the merged lse and H, each rank's
recompute gives the exact dZ of its own columns, so dW and db stay on their rank, and
dH = sum_r dZ_r W_r is one all_reduce over the group, in fp32 for 16-bit heads. A caller whose
own autograd sums dH over the group (sequence parallelism's reduce-scatter after an
all-gather of the hidden states) asks for the rank's partial sum instead (reduce_hidden_grad).

The dense loss merges its slices' partial sums instead (merge_dense): each rank combines its
own slices into one set (vocab_partials.combine_slices, exact), and the ranks' sets merge as
the slices of one row would. A frozen head's fold (dlogp/dh in the forward) merges the ranks'
folds in the forward (merge_fold), so that its backward needs no collective.

Heads may also come as DTensors with rows sharded over one mesh dimension (what torch's
ColwiseParallel, and transformers' tp_plan, leave an LM head): local_head takes the group
from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from gopd_kernels.ops.vocab_partials import combine_slices, merge_dense_kl_partials, merge_vocab_shards
from gopd_kernels.validation import check_lm_head


@dataclass(frozen=True)
class VocabShard:
    """This rank holds rows [start, start + size) of a head over `vocab` ids, split across `group`."""

    group: dist.ProcessGroup
    start: int
    size: int
    vocab: int
    reduce_hidden_grad: bool = True

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Ids as columns of this shard; -1, which matches no column, for the other shards' ids."""
        local = targets - self.start
        return torch.where((local >= 0) & (local < self.size), local, torch.full_like(local, -1))

    def merge(
        self, local: torch.Tensor, logp: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The whole vocabulary's (logp, lse, entropy|None) from this shard's, by one all_gather.

        The shard's z_y comes back as its logp + lse (exact up to the rounding of lse)."""
        zy = torch.where(local >= 0, logp + lse, torch.zeros_like(lse))
        stats = torch.stack([lse, zy] if entropy is None else [lse, zy, entropy])
        gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, stats, group=self.group)
        shards = torch.stack(gathered, dim=1)  # [stats, shards, rows]
        return merge_vocab_shards(shards[0], shards[1], None if entropy is None else shards[2])

    def merge_dense(self, student, target, teacher=None):
        """merge_dense_kl_partials over the whole vocabulary: each rank's [slices, rows] partials
        combined into one slice (combine_slices; the teacher's u is shifted by the student's
        max, as its own), one all_gather of them all, merged as slices of one row."""
        u_teacher = () if teacher is None else (teacher[2],)  # shifted by the student's m, as u
        m_a, s_a, u, *u_teacher = combine_slices(*student, *u_teacher)
        fields = [m_a, s_a, u, *combine_slices(*target)]
        if teacher is not None:
            fields += [*combine_slices(teacher[0], teacher[1]), *u_teacher]
        stacked = torch.cat(fields)  # [fields, rows]: (m_a, s_a, u), (m_c, s_c), (m_t, s_t, u_t)
        gathered = [torch.empty_like(stacked) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(gathered, stacked, group=self.group)
        f = torch.stack(gathered, dim=1)  # [fields, ranks, rows]
        return merge_dense_kl_partials(
            (f[0], f[1], f[2]), (f[3], f[4]), None if teacher is None else (f[5], f[6], f[7])
        )

    def merge_fold(
        self,
        local: torch.Tensor,
        logp: torch.Tensor,
        lse: torch.Tensor,
        x: torch.Tensor,
        w_stand_in: torch.Tensor,
        inv_temp: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen-head fold over the whole vocabulary: (logp, x = dlogp/dh [M, D]).

        Each rank folded its rows with a stand-in id y' (the target where it is this rank's):
        x_r = (W_y' - E_r[W]) / tau, E_r under the rank's own softmax, and logp, lse of its rows.
        With w_r = exp(lse_r - lse), E_p[W] = sum_r w_r E_r[W], so

            x = sum_r t_r,   t_r = (1[y in r] - w_r) W_y' / tau + w_r x_r

        summed by one all_reduce in fp32 (or the rank's own t_r with reduce_hidden_grad=False)."""
        on = local >= 0
        whole_logp, whole_lse, _ = self.merge(local, logp, lse, None)
        w = (lse - whole_lse).exp()
        t = x.mul_(w[:, None]).add_(w_stand_in.to(x.dtype) * ((on.to(x.dtype) - w) * inv_temp)[:, None])
        return whole_logp, self.reduce_hidden(t)

    def reduce_hidden(self, dh: torch.Tensor) -> torch.Tensor:
        """dH = sum over the ranks of their dZ_r W_r (in place), or the rank's own term."""
        if self.reduce_hidden_grad:
            dist.all_reduce(dh, group=self.group)
        return dh


def check_vocab_group(vocab_group, reduce_hidden_grad: bool) -> None:
    """vocab_group: None or a process group of an initialised torch.distributed."""
    if not isinstance(reduce_hidden_grad, bool):
        raise ValueError(f"reduce_hidden_grad must be a bool, got {type(reduce_hidden_grad).__name__}")
    if vocab_group is None:
        if not reduce_hidden_grad:
            raise ValueError(
                "reduce_hidden_grad=False applies to a vocabulary-parallel head only (vocab_group)"
            )
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_group is set, but torch.distributed is not initialised")
    if not isinstance(vocab_group, dist.ProcessGroup):
        raise ValueError(
            f"vocab_group must be a torch.distributed ProcessGroup, got {type(vocab_group).__name__}"
        )


def vocab_shard(
    vocab_group: dist.ProcessGroup | None,
    reduce_hidden_grad: bool,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    targets_name: str = "targets",
) -> VocabShard | None:
    """This rank's shard of a head split across vocab_group (None without one).

    One all_gather of every rank's row count, which also checks that all ranks were given the
    same targets (their count and sum: replicated inputs are the contract, and a mismatch would
    hang a later collective or mix rows); targets_name: what the caller calls them (a mask)."""
    check_vocab_group(vocab_group, reduce_hidden_grad)
    if vocab_group is None:
        return None
    check_lm_head(hidden, weight, bias)
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point:
        got = getattr(targets, "dtype", type(targets).__name__)
        raise ValueError(f"{targets_name} must be an integer or bool tensor, got {got}")
    dev = weight.device
    mine = torch.stack(
        [
            torch.tensor(weight.shape[0], device=dev),
            torch.tensor(targets.numel(), device=dev),
            targets.to(device=dev, dtype=torch.int64).sum(),
        ]
    )
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(vocab_group))]
    dist.all_gather(gathered, mine, group=vocab_group)
    table = torch.stack(gathered).tolist()  # one device sync
    if any(row[1:] != table[0][1:] for row in table):
        raise ValueError(
            f"the ranks of vocab_group were given different {targets_name} ((count, sum) by rank: "
            f"{[tuple(row[1:]) for row in table]}): every rank must pass the same hidden states and "
            f"{targets_name}"
        )
    rank = dist.get_rank(vocab_group)
    sizes = [row[0] for row in table]
    return VocabShard(vocab_group, sum(sizes[:rank]), sizes[rank], sum(sizes), reduce_hidden_grad)


def _dtensor_type():
    """torch's DTensor class, or None where torch.distributed is not built in."""
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def local_rows(t: torch.Tensor | None, name: str) -> tuple[torch.Tensor | None, dist.ProcessGroup | None]:
    """(the local tensor, the group its rows are split over, or None) of a DTensor; anything
    else as it is. Sharded by rows (Shard(0)) over one mesh dimension, replicated over any
    other: that dimension's group (a vocabulary-parallel head's rows, as torch's ColwiseParallel
    leaves an LM head). Replicated everywhere: its local tensor. Any other layout is refused."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(t, dtensor):
        return t, None
    placements = t.placements
    split = [i for i, p in enumerate(placements) if not p.is_replicate()]
    if not split:
        return t.to_local(), None
    if len(split) == 1 and placements[split[0]].is_shard(0):
        return t.to_local(), t.device_mesh.get_group(split[0])
    raise ValueError(
        f"{name} is a DTensor placed as {placements}: only rows sharded over one mesh dimension "
        "(Shard(0)), the rest replicated, or a replicated one, are understood"
    )


def local_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vocab_group: dist.ProcessGroup | None,
    names: tuple[str, str, str] = ("hidden", "weight", "bias"),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dist.ProcessGroup | None]:
    """(hidden, weight, bias, vocab_group) with DTensors made local (local_rows): a head whose
    weight is sharded by rows is vocabulary-parallel over that group, without vocab_group being
    passed; its bias must be sharded alike, and the hidden states replicated."""
    hidden, hidden_group = local_rows(hidden, names[0])
    if hidden_group is not None:
        raise ValueError(
            f"{names[0]} is a DTensor sharded by its first dimension: every rank of the head's group "
            "needs all the hidden states (gather them first)"
        )
    weight, group = local_rows(weight, names[1])
    bias, bias_group = local_rows(bias, names[2])
    if bias is not None and bias_group is not group and not _same_ranks(bias_group, group):
        raise ValueError(f"{names[2]} must be sharded as {names[1]} is (rows over one group, or not at all)")
    if group is None:
        return hidden, weight, bias, vocab_group
    if vocab_group is not None and not _same_ranks(vocab_group, group):
        raise ValueError(f"vocab_group is not the group {names[1]}'s rows are sharded over (a DTensor)")
    return hidden, weight, bias, group


def _same_ranks(a: dist.ProcessGroup | None, b: dist.ProcessGroup | None) -> bool:
    if a is None or b is None:
        return False
    return dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)
