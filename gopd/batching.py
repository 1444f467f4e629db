"""Micro-batches: which of a step's rows go through a model together.

A step's rollouts are padded to its longest prompt and its longest response; with hundreds
of rows and a cap of thousands of tokens, some row nearly always reaches the cap. Cut in
the order they came, every micro-batch would pay that width. So the rows are sorted by
length, longest first (a micro-batch that does not fit in memory fails at once, not at the
end of the step), cut into micro-batches, and each is trimmed to its own longest prompt and
response (Rollouts.trimmed) before it reaches a model.

A micro-batch holds at most `micro_batch_size` rows and, when `micro_batch_tokens` is set,
at most that many padded tokens: rows x (longest prompt + longest response among them);
packed (gopd.packing), its rows' real tokens (a packed forward runs those, and under sdpa
the tail padding of its bins).
Sorted rows make that close to the real tokens, so long rows go a few at a time and short
ones many at a time (verl's dynamic batch size). The losses are normalised over the whole
step (gopd.update), so the grouping changes neither the loss nor the gradient.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gopd.distributed import SINGLE, DistContext
from gopd.rollout import Rollouts


def micro_batches(
    rollouts: Rollouts, rows: list[int], max_rows: int, max_tokens: int | None = None, packed: bool = False
) -> Iterator[list[int]]:
    """`rows` (indices into rollouts), longest first, in groups of at most max_rows rows and
    max_tokens padded tokens (real tokens when packed). A row longer than max_tokens alone is
    a group of its own (TrainConfig.validate refuses a budget below the longest possible row)."""
    prompt, response = rollouts.prompt_lengths(), rollouts.response_lengths()
    order = sorted(rows, key=lambda i: (-int(prompt[i] + response[i]), i))
    budget = max_tokens if max_tokens is not None else float("inf")
    group: list[int] = []
    width = (0, 0)  # the group's longest prompt and longest response
    real = 0  # the group's real tokens
    for i in order:
        row = (int(prompt[i]), int(response[i]))
        grown = (max(width[0], row[0]), max(width[1], row[1]))
        tokens = real + sum(row) if packed else (len(group) + 1) * sum(grown)
        if group and (len(group) == max_rows or tokens > budget):
            yield group
            group, grown, real = [], row, 0
        group.append(i)
        width, real = grown, real + sum(row)
    if group:
        yield group


def step_plan(
    rollouts: Rollouts,
    domains: list[str] | None,
    max_rows: int,
    max_tokens: int | None = None,
    ctx: DistContext = SINGLE,
    in_step: bool = False,
    packed: bool = False,
) -> list[tuple[str | None, list[tuple[list[int], bool]]]]:
    """A step's micro-batches, [(domain, [(rows, counts), ...]), ...]: by domain, in the order
    of `domains`, when each row needs its own teacher, else all rows under None.

    in_step: a model sharded over the ranks (gopd.fsdp) gathers its weights in every forward,
    a collective, so every rank must make the same calls: every rank gets every domain and,
    in each, as many micro-batches as the rank with the most. The extra ones (counts False)
    repeat the rank's last micro-batch of the domain, or its first row when it has none
    there; their outputs are dropped and their losses weigh zero."""
    everything = list(range(len(rollouts.examples)))
    if domains is None:
        groups = [(None, everything)]
    else:
        groups = [(d, [i for i in everything if rollouts.examples[i].domain == d]) for d in domains]
    limits = (max_rows, max_tokens, packed)
    plan = [(d, [(c, True) for c in micro_batches(rollouts, rows, *limits)]) for d, rows in groups]
    if in_step:
        most = ctx.max([float(len(chunks)) for _, chunks in plan])
        for (_, chunks), n in zip(plan, most, strict=True):
            filler = chunks[-1][0] if chunks else everything[:1]
            chunks.extend([(filler, False)] * (int(n) - len(chunks)))
    return [(d, chunks) for d, chunks in plan if chunks]


def micro_batch(rollouts: Rollouts, rows: list[int]) -> tuple[Rollouts, torch.Tensor]:
    """The rows' trimmed rollouts and their indices as a tensor (to gather scores, scatter outputs)."""
    return rollouts.select(rows).trimmed(), torch.tensor(rows)
