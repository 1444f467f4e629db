"""Sequence packing: a micro-batch's rows as one row of their real tokens, no padding.

A micro-batch is padded to its longest prompt plus its longest response (gopd.batching),
and a padded position costs a model as much as a real one. Packed (pack_sequences), the
rows' tokens sit end to end in one row of T = the sum of their lengths, with position ids
that restart at 0 for each and no attention mask. transformers then keeps the rows apart
from the position ids alone: flash attention's varlen kernels (flash_attention_2/3), or a
block-diagonal mask (sdpa, eager: exact, though its attention grows as T^2 over the packed
row). Only without a KV cache: with one, transformers reads the position ids as one long
row, so the decoders run with use_cache=False (gopd_kernels.hf.final_hidden_states).

A model that does not keep the rows apart (remote code, an older transformers) would score
every row against the tokens of the rows before it, with no error: check_packing compares
its packed hidden states with its unpacked ones on two short rows, once per model, and
refuses it.
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
    input_ids: torch.Tensor  # [1, T]: each row's prompt and response tokens, end to end
    position_ids: torch.Tensor  # [1, T]: 0 .. length - 1 within each row
    rows: torch.Tensor  # [n]: for each response token, its row
    cols: torch.Tensor  # [n]: its response column
    at: torch.Tensor  # [n]: the packed position whose hidden state predicts it


def pack(rollouts: Rollouts) -> PackedRows:
    """The rows of `rollouts` packed: each row's prompt (without its left padding) and its
    response up to its last valid token; rows without one are left out (nothing to score)."""
    prompts, responses = rollouts.prompt_lengths().tolist(), rollouts.response_lengths().tolist()
    P = rollouts.prompt_len
    pieces, positions, rows, cols, at = [], [], [], [], []
    offset = 0
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if r == 0:
            continue
        if p == 0:
            raise ValueError(f"pack_sequences: row {i} has no prompt token to predict its response from")
        pieces.append(rollouts.sequences[i, P - p : P + r])
        positions.append(torch.arange(p + r))
        rows.append(torch.full((r,), i))
        cols.append(torch.arange(r))
        at.append(offset + p - 1 + torch.arange(r))  # position p - 1 + j predicts response token j
        offset += p + r
    if not pieces:  # no response token anywhere: one prompt token keeps the shapes valid
        pieces, positions = [rollouts.sequences[:1, P - 1]], [torch.zeros(1, dtype=torch.long)]
    cat = lambda ts: torch.cat(ts) if ts else torch.zeros(0, dtype=torch.long)  # noqa: E731
    return PackedRows(cat(pieces)[None], cat(positions)[None], cat(rows), cat(cols), cat(at))


def packed_response_hidden(model, rollouts: Rollouts) -> torch.Tensor:
    """response_hidden's [B, R, D] from one packed forward (zeros where no response token is)."""
    check_packing(model)
    packed = pack(rollouts)
    hidden = final_hidden(model, packed.input_ids, None, packed.position_ids)[0]  # [T, D]
    out = hidden.new_zeros(len(rollouts.examples), rollouts.width, hidden.shape[-1])
    dev = hidden.device
    out[packed.rows.to(dev), packed.cols.to(dev)] = hidden[packed.at.to(dev)]
    return out


def check_packing(model, tokens: int = 6) -> None:
    """ValueError unless the model's hidden states for two rows packed into one equal those of
    each row alone (within a rounding or two of its dtype, relative to the largest): the rows'
    attention kept apart by the position ids. Checked once per model object."""
    if model in _CHECKED:
        return
    weight = head_weight(model)
    ids = torch.arange(3, 3 + 2 * tokens) % weight.shape[0]
    first, second = ids[:tokens], ids[tokens:].flip(0)
    with torch.no_grad():
        ones = torch.ones(1, tokens, dtype=torch.long)
        alone = [final_hidden(model, row[None], ones)[0] for row in (first, second)]
        positions = torch.arange(tokens).repeat(2)[None]
        packed = final_hidden(model, torch.cat([first, second])[None], None, positions)[0]
    want = torch.cat(alone).double()
    err = float((packed.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if err > (1e-4 if weight.dtype == torch.float32 else 2e-2):
        raise ValueError(
            f"pack_sequences: this model's hidden states of two rows packed into one are {err:.2g} off "
            "(relative to the largest) from each row's alone: its attention does not keep packed rows "
            "apart by their position ids (remote code, or a transformers without packed-sequence "
            "masks); set pack_sequences: false"
        )
    _CHECKED.add(model)
    attn = attention_implementation(model)
    if not attn.startswith("flash"):
        logger.warning(
            "pack_sequences with attn_implementation %r: transformers keeps the packed rows apart with a "
            "dense block-diagonal mask, whose attention grows as the square of the packed row's length "
            "(on a 2-core CPU with sdpa: 1.35x slower than the trimmed micro-batches, in "
            "benchmarks.micro_batches); flash_attention_2 or flash_attention_3 run the rows with varlen "
            "kernels", attn,
        )  # fmt: skip


def attention_implementation(model) -> str:
    """The attention transformers runs for `model` ("sdpa", "flash_attention_2", ...)."""
    inner = transformers_model(model.student if isinstance(model, AdapterFree) else model)
    return str(getattr(inner.config, "_attn_implementation", None) or "sdpa")
