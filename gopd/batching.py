"""Micro-batches: which of a step's rows go through a model together.

A step's rollouts are padded to its longest prompt and its longest response; with hundreds
of rows and a cap of thousands of tokens, some row nearly always reaches the cap. Cut in
the order they came, every micro-batch would pay that width. So the rows are sorted by
length, longest first (a micro-batch that does not fit in memory fails at once, not at the
end of the step), cut into micro-batches, and each is trimmed to its own longest prompt and
response (Rollouts.trimmed) before it reaches a model.

A micro-batch holds at most `micro_batch_size` rows and, when `micro_batch_tokens` is set,
at most that many padded tokens: rows x (longest prompt + longest response among them).
Sorted rows make that close to the real tokens, so long rows go a few at a time and short
ones many at a time (verl's dynamic batch size). The losses are normalised over the whole
step (gopd.update), so the grouping changes neither the loss nor the gradient.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gopd.rollout import Rollouts


def micro_batches(
    rollouts: Rollouts, rows: list[int], max_rows: int, max_tokens: int | None = None
) -> Iterator[list[int]]:
    """`rows` (indices into rollouts), longest first, in groups of at most max_rows rows and
    max_tokens padded tokens. A row longer than max_tokens alone is a group of its own
    (TrainConfig.validate refuses a budget below the longest possible row)."""
    prompt, response = rollouts.prompt_lengths(), rollouts.response_lengths()
    order = sorted(rows, key=lambda i: (-int(prompt[i] + response[i]), i))
    budget = max_tokens if max_tokens is not None else float("inf")
    group: list[int] = []
    width = (0, 0)  # the group's longest prompt and longest response
    for i in order:
        row = (int(prompt[i]), int(response[i]))
        grown = (max(width[0], row[0]), max(width[1], row[1]))
        full = len(group) == max_rows or (len(group) + 1) * sum(grown) > budget
        if group and full:
            yield group
            group, grown = [], row
        group.append(i)
        width = grown
    if group:
        yield group


def micro_batch(rollouts: Rollouts, rows: list[int]) -> tuple[Rollouts, torch.Tensor]:
    """The rows' trimmed rollouts and their indices as a tensor (to gather scores, scatter outputs)."""
    return rollouts.select(rows).trimmed(), torch.tensor(rows)
