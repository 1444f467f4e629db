"""Merging per-slice log-softmax partials equals the statistics of the whole row."""

from __future__ import annotations

import torch

from gopd_kernels.ops.vocab_partials import (
    combine_slices,
    merge_dense_kl_partials,
    merge_vocab_partials,
    merge_vocab_shards,
)


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


def dense_partials(a: torch.Tensor, c: torch.Tensor, zt: torch.Tensor, bounds: list[int]):
    """[slices, rows] (m_a, s_a, u), (m_c, s_c), (m_t, s_t, u_t) as the dense kernels leave them."""
    out = [[] for _ in range(8)]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        a_k, c_k, t_k = a[:, lo:hi], c[:, lo:hi], zt[:, lo:hi]
        m_a, m_c, m_t = (x.amax(1) for x in (a_k, c_k, t_k))
        e = (a_k - m_a[:, None]).exp()
        sum_exp = lambda x, m: (x - m[:, None]).exp().sum(1)  # noqa: E731
        stats = (m_a, e.sum(1), (e * (a_k - c_k)).sum(1), m_c, sum_exp(c_k, m_c),
                 m_t, sum_exp(t_k, m_t), (e * (a_k - t_k)).sum(1))  # fmt: skip
        for k, x in enumerate(stats):
            out[k].append(x)
    f = [torch.stack(x) for x in out]
    return (f[0], f[1], f[2]), (f[3], f[4]), (f[5], f[6], f[7])


def test_combined_slices_merge_as_the_slices_themselves():
    """A rank's slices combined into one (combine_slices, the teacher's u on the student's shift),
    then merged across ranks: the dense KL statistics of all the slices merged at once."""
    g = torch.Generator().manual_seed(2)
    a, c, zt = (torch.randn(5, 60, dtype=torch.float64, generator=g) * 3 for _ in range(3))
    a[0, :25] += 30  # slices whose maxima differ a lot, so a wrong shift shows
    student, target, teacher = dense_partials(a, c, zt, [0, 9, 25, 26, 41, 60])
    ranks = [slice(0, 3), slice(3, 4), slice(4, 5)]  # 3, 1 and 1 slices
    parts = []
    for r in ranks:
        m_a, s_a, u, u_t = combine_slices(student[0][r], student[1][r], student[2][r], teacher[2][r])
        parts.append([m_a, s_a, u, *combine_slices(target[0][r], target[1][r]),
                      *combine_slices(teacher[0][r], teacher[1][r]), u_t])  # fmt: skip
    f = [torch.cat(x) for x in zip(*parts, strict=True)]
    merged = merge_dense_kl_partials((f[0], f[1], f[2]), (f[3], f[4]), (f[5], f[6], f[7]))
    for got, want in zip(merged, merge_dense_kl_partials(student, target, teacher), strict=True):
        torch.testing.assert_close(got, want)
