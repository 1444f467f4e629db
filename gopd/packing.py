"""Sequence packing: a micro-batch's rows laid end to end, their padding gone.

A micro-batch is padded to its longest prompt plus its longest response (gopd.batching),
and a padded position costs a model as much as a real one. Packed (pack_sequences), the
rows' tokens sit end to end, with position ids that restart at 0 for each and no attention
mask; transformers then keeps the rows apart from the position ids alone. Only without a
KV cache: with one, transformers reads the position ids as one long row, so the decoders
run with use_cache=False (gopd_kernels.hf.final_hidden_states).

How many packed rows (pack's binned) follows from the attention:

- flash_attention_2/3: one row of all the tokens. transformers runs it through the varlen
  kernels, whose cost is each row's own (and which it uses only for a batch of one row).
- sdpa, eager: a block-diagonal mask over each packed row, computed densely: its cost grows
  as the square of the packed row's length. So the rows go into bins no longer than the
  micro-batch's longest row (first fit, longest first), a batch of [bins, longest row]: the
  attention costs bins x longest^2, under the trimmed micro-batch's rows x longest^2, and the
  bins' tail padding is all that is left of the padding. Measured on a 2-core CPU
  (benchmarks.micro_batches, sdpa, two runs): bins 0.90-0.92x the trimmed micro-batches'
  time, one row 1.29-1.35x.

Padding at a bin's end has position ids of its own run (0, 1, ...), so it is a sequence
apart: no real token attends to it, and its hidden states are dropped.

A model that does not keep the rows apart (remote code, an older transformers) would score
every row against the tokens of the rows before it, with no error: check_packing compares
its packed hidden states with its unpacked ones on three short rows in the layout it will
run (one row or bins), once per model, and refuses it.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from gopd.models import AdapterFree, final_hidden, head_weight
from gopd.rollout import Rollouts
from gopd_kernels.hf import transformers_model

logger = logging.getLogger("gopd")

_CHECKED: weakref.WeakSet = weakref.WeakSet()  # models check_packing has passed


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # [bins, L]: rows' prompt and response tokens end to end, then padding
    position_ids: torch.Tensor  # [bins, L]: 0 .. length - 1 within each row (and the padding's run)
    rows: torch.Tensor  # [n]: for each response token, its row
    cols: torch.Tensor  # [n]: its response column
    at: torch.Tensor  # [n]: the position (bin * L + offset) whose hidden state predicts it


def first_fit(lengths: list[int], bin_len: int | None) -> list[list[int]]:
    """Indices into `lengths`, grouped into bins whose lengths sum to at most bin_len: longest
    first, each into the first bin it fits. bin_len None: one bin. ValueError if a length
    exceeds bin_len."""
    if bin_len is None:
        return [list(range(len(lengths)))]
    if lengths and max(lengths) > bin_len:
        raise ValueError(f"bin_len={bin_len} is shorter than a row of {max(lengths)} tokens")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k, free in enumerate(room) if free >= lengths[i]), len(bins))
        if k == len(bins):
            bins.append([])
            room.append(bin_len)
        bins[k].append(i)
        room[k] -= lengths[i]
    return bins


def pack_pieces(pieces: list[torch.Tensor], bin_len: int | None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Token rows laid end to end in bins of bin_len (first_fit; None: one row of them all):
    (ids [bins, L], position_ids [bins, L], each piece's (bin, offset)). The padding after a
    bin's last piece repeats its first token with a position run of its own (module doc)."""
    lengths = [len(piece) for piece in pieces]
    layout = first_fit(lengths, bin_len)
    width = bin_len if bin_len is not None else sum(lengths)
    ids = torch.empty(len(layout), width, dtype=pieces[0].dtype)
    positions = torch.empty(len(layout), width, dtype=torch.long)
    starts: list = [None] * len(pieces)
    for b, members in enumerate(layout):
        offset = 0
        for k in members:
            ids[b, offset : offset + lengths[k]] = pieces[k]
            positions[b, offset : offset + lengths[k]] = torch.arange(lengths[k])
            starts[k] = (b, offset)
            offset += lengths[k]
        ids[b, offset:] = ids[b, 0]
        positions[b, offset:] = torch.arange(width - offset)
    return ids, positions, starts


def pack(rollouts: Rollouts, binned: bool = False) -> PackedRows:
    """The rows of `rollouts` packed (pack_pieces): each row's prompt (without its left
    padding) and its response up to its last valid token; rows without a response token are
    left out (nothing to score). binned: into bins as long as the longest row (sdpa, eager),
    else one row of them all (flash attention's varlen kernels; module doc)."""
    prompts, responses = rollouts.prompt_lengths().tolist(), rollouts.response_lengths().tolist()
    P = rollouts.prompt_len
    kept = [i for i, r in enumerate(responses) if r > 0]
    for i in kept:
        if prompts[i] == 0:
            raise ValueError(f"pack_sequences: row {i} has no prompt token to predict its response from")
    if not kept:  # no response token anywhere: one prompt token keeps the shapes valid
        ids = rollouts.sequences[:1, P - 1 : P]
        empty = torch.zeros(0, dtype=torch.long)
        return PackedRows(ids, torch.zeros_like(ids), empty, empty, empty)
    pieces = [rollouts.sequences[i, P - prompts[i] : P + responses[i]] for i in kept]
    ids, positions, starts = pack_pieces(pieces, max(map(len, pieces)) if binned else None)
    width = ids.shape[1]
    rows, cols, at = [], [], []
    for i, (b, offset) in zip(kept, starts, strict=True):
        p, r = prompts[i], responses[i]
        rows.append(torch.full((r,), i))
        cols.append(torch.arange(r))
        at.append(b * width + offset + p - 1 + torch.arange(r))  # position p - 1 + j predicts token j
    return PackedRows(ids, positions, torch.cat(rows), torch.cat(cols), torch.cat(at))


def packed_response_hidden(model, rollouts: Rollouts) -> torch.Tensor:
    """response_hidden's [B, R, D] from one packed forward (zeros where no response token is)."""
    check_packing(model)
    packed = pack(rollouts, binned=not uses_varlen_attention(model))
    hidden = final_hidden(model, packed.input_ids, None, packed.position_ids)  # [bins, L, D]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    out = hidden.new_zeros(len(rollouts.examples), rollouts.width, hidden.shape[-1])
    dev = hidden.device
    out[packed.rows.to(dev), packed.cols.to(dev)] = hidden[packed.at.to(dev)]
    return out


def check_packing(model, tokens: int = 6) -> None:
    """ValueError unless the model's hidden states for three rows packed in the layout it
    runs (pack_pieces: one row, or two padded bins) equal those of each row alone (within a
    rounding or two of its dtype, relative to the largest): the rows' attention kept apart by
    the position ids. Checked once per model object."""
    if model in _CHECKED:
        return
    weight = head_weight(model)
    lengths = (tokens, tokens - 2, 1)
    rows = (torch.arange(3, 3 + sum(lengths)) % weight.shape[0]).flip(0).split(lengths)
    varlen = uses_varlen_attention(model)
    ids, positions, starts = pack_pieces(list(rows), None if varlen else tokens + 1)
    with torch.no_grad():
        alone = [final_hidden(model, row[None], torch.ones(1, len(row), dtype=torch.long))[0] for row in rows]
        hidden = final_hidden(model, ids, None, positions)
    packed = torch.cat([hidden[b, o : o + n] for (b, o), n in zip(starts, lengths, strict=True)])
    want = torch.cat(alone).double()
    err = float((packed.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if err > (1e-4 if weight.dtype == torch.float32 else 2e-2):
        raise ValueError(
            f"pack_sequences: this model's hidden states of rows packed together are {err:.2g} off "
            "(relative to the largest) from each row's alone: its attention does not keep packed rows "
            "apart by their position ids (remote code, or a transformers without packed-sequence "
            "masks); set pack_sequences: false"
        )
    _CHECKED.add(model)
    if not varlen:
        logger.info(
            "pack_sequences with attn_implementation %r: each micro-batch's rows go into bins as long as "
            "its longest row, kept apart by a dense block-diagonal mask (flash_attention_2 or _3 would "
            "run them as one row through varlen kernels)", attention_implementation(model),
        )  # fmt: skip


def uses_varlen_attention(model) -> bool:
    """Whether transformers runs `model`'s packed rows through flash attention's varlen kernels."""
    return attention_implementation(model).startswith("flash")


def attention_implementation(model) -> str:
    """The attention transformers runs for `model` ("sdpa", "flash_attention_2", ...)."""
    inner = transformers_model(model.student if isinstance(model, AdapterFree) else model)
    return str(getattr(inner.config, "_attn_implementation", None) or "sdpa")
