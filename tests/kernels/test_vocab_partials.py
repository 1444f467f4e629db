"""Merging per-slice log-softmax partials equals the statistics of the whole row."""

from __future__ import annotations

import torch

from gopd_kernels.ops.vocab_partials import merge_vocab_partials, merge_vocab_shards


def partials(z: torch.Tensor, bounds: list[int], y: torch.Tensor):
    m, s, t, zy = [], [], [], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        zs = z[:, a:b]
        mk = zs.amax(1)
        e = (zs - mk[:, None]).exp()
        m.append(mk)
        s.append(e.sum(1))
        t.append((e * (zs - mk[:, None])).sum(1))
        inside = (y >= a) & (y < b)
        zy.append(torch.where(inside, z.gather(1, y[:, None]).squeeze(1), torch.zeros_like(mk)))
    return [torch.stack(x) for x in (m, s, t, zy)]


def test_merge_matches_direct_statistics():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 50, dtype=torch.float64, generator=g) * 5
    z[0, :20] -= 80  # a slice far below the others: its scale underflows to 0 harmlessly
    y = torch.randint(0, 50, (9,), generator=g)
    logp, lse, ent = merge_vocab_partials(*partials(z, [0, 7, 20, 21, 50], y))
    ref = torch.log_softmax(z, 1)
    torch.testing.assert_close(lse, torch.logsumexp(z, 1))
    torch.testing.assert_close(logp, ref.gather(1, y[:, None]).squeeze(1))
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(1))


def test_entropy_is_accurate_for_large_logits():
    """The textbook lse - E[z] loses digits when |z| ~ 1e4 in float32; the shifted form does not."""
    z = torch.tensor([[10000.0, 10000.0, 9990.0, 9999.0]])
    logp, lse, ent = merge_vocab_partials(*partials(z, [0, 2, 4], torch.tensor([0])))
    ref = torch.log_softmax(z.double(), 1)
    assert abs(ent.item() - float(-(ref.exp() * ref).sum())) < 1e-5


def test_merging_whole_shards_matches_the_whole_row():
    """Each shard's own log-softmax (lse_r, z_y or 0, H_r) merged: the vocabulary-parallel heads."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 41, dtype=torch.float64, generator=g) * 4
    z[1, 30:] += 60  # one shard holds nearly all of a row's mass: the others' weights underflow
    y = torch.randint(0, 41, (7,), generator=g)
    lse, zy, ent = [], [], []
    for a, b in [(0, 13), (13, 30), (30, 41)]:
        logp = torch.log_softmax(z[:, a:b], 1)
        lse.append(torch.logsumexp(z[:, a:b], 1))
        ent.append(-(logp.exp() * logp).sum(1))
        inside = (y >= a) & (y < b)
        zy.append(torch.where(inside, z.gather(1, y[:, None]).squeeze(1), torch.zeros_like(lse[-1])))
    logp, merged_lse, merged_ent = merge_vocab_shards(torch.stack(lse), torch.stack(zy), torch.stack(ent))
    ref = torch.log_softmax(z, 1)
    torch.testing.assert_close(merged_lse, torch.logsumexp(z, 1))
    torch.testing.assert_close(logp, ref.gather(1, y[:, None]).squeeze(1))
    torch.testing.assert_close(merged_ent, -(ref.exp() * ref).sum(1))
    assert merge_vocab_shards(torch.stack(lse), torch.stack(zy), None)[2] is None
