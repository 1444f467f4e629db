"""Vocabulary-parallel heads (ops/vocab_parallel.py): 2 and 3 CPU ranks over gloo, each holding
a slice of the head's rows (uneven slices of a prime vocabulary, given with vocab_group or as
DTensors sharded by rows), against the float64 reference on the whole head: log-probs,
entropies, losses, dH on every rank, and the ranks' dW and db rows put back together; trained
heads and frozen ones (folded and recomputed), all four ops, both backends.

Each world is one spawn running every case (a process start costs seconds, a case under the
Triton interpreter a fraction of one); the tests below check the cases one by one.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from gopd_kernels import frozen_logprobs, gopd_dense_loss, gopd_loss, token_logprobs
from gopd_kernels.reference import gopd_dense_loss_reference, gopd_loss_reference, token_logprobs_reference
from tests.kernels.helpers import (
    GRAD_ROW_REL,
    VALUE_ATOL,
    make_inputs,
    reference_with_grads,
    row_rel_err,
    run_gloo_ranks,
)

N, D, V = 13, 16, 97
SHARDS = {2: [50, 47], 3: [40, 31, 26]}  # rows of the head by rank
TEACHER_D = 24

CASES = {
    "torch float64, entropy, bias, tau, ignored, strided hidden": dict(
        backend="torch", dtype=torch.float64, entropy=True, strided=True
    ),
    "torch float32, one token": dict(backend="torch", n=1, ignore_frac=0.0),
    "torch float32, every token ignored": dict(backend="torch", ignore_frac=1.0),
    "torch float32, frozen head (folded)": dict(backend="torch", frozen=True),
    "torch float32, frozen head, recomputed": dict(backend="torch", frozen=True, fold=False),
    "torch float32, frozen head, dH left to the caller": dict(
        backend="torch", frozen=True, reduce_hidden_grad=False
    ),
    "triton float32, frozen head, folded": dict(backend="triton", frozen=True, fold=True, strided=True),
    "triton bfloat16, frozen head, folded": dict(
        backend="triton", dtype=torch.bfloat16, frozen=True, fold=True
    ),
    "torch float32, DTensor frozen head (folded)": dict(backend="torch", dtensor=True, frozen=True),
    "torch float32, dH left to the caller": dict(backend="torch", reduce_hidden_grad=False, entropy=True),
    "triton float32, entropy, bias, tau, ignored": dict(backend="triton", entropy=True, strided=True),
    "triton bfloat16": dict(backend="triton", dtype=torch.bfloat16),
    "triton float16, entropy": dict(backend="triton", dtype=torch.float16, entropy=True),
    "torch float32, soft-capped head, entropy": dict(backend="torch", softcap=2.5, entropy=True),
    "triton float32, soft-capped frozen head, folded": dict(
        backend="triton", softcap=2.5, frozen=True, fold=True
    ),
    "torch float32, soft-capped frozen head (folded)": dict(backend="torch", softcap=2.5, frozen=True),
    "gopd_loss torch float64, lam 1.25": dict(op="gopd_loss", backend="torch", dtype=torch.float64),
    "gopd_loss triton float32, lam 1.25": dict(op="gopd_loss", backend="triton"),
    "gopd_loss torch float32, DTensor head": dict(op="gopd_loss", backend="torch", dtensor=True),
    "frozen_logprobs torch float64": dict(op="frozen_logprobs", backend="torch", dtype=torch.float64),
    "torch float32, DTensor head": dict(backend="torch", dtensor=True, entropy=True),
    "triton float32, DTensor head": dict(backend="triton", dtensor=True),
    "torch float32, DTensor head without bias": dict(backend="torch", dtensor=True, bias=False),
    "gopd_dense_loss torch float32, DTensor heads": dict(op="gopd_dense_loss", backend="torch", dtensor=True),
    "frozen_logprobs torch float32, DTensor heads": dict(op="frozen_logprobs", backend="torch", dtensor=True),
    "gopd_dense_loss torch float64, lam 1.25": dict(
        op="gopd_dense_loss", backend="torch", dtype=torch.float64
    ),
    "gopd_dense_loss triton float32, lam 1.25": dict(op="gopd_dense_loss", backend="triton"),
    "gopd_dense_loss triton float16, lam 1": dict(
        op="gopd_dense_loss", backend="triton", dtype=torch.float16, lam=1.0
    ),
    "frozen_logprobs triton float32": dict(op="frozen_logprobs", backend="triton"),
    "gopd_dense_loss torch float32, soft-capped student and teacher": dict(
        op="gopd_dense_loss", backend="torch", softcap=2.5
    ),
}
ERROR_CASES = {
    "targets differ across ranks": (dict(backend="torch", skew_targets=True), "were given different targets"),
    "hidden states sharded by rows": (
        dict(backend="torch", dtensor=True, sharded_hidden=True),
        "needs all the hidden states",
    ),
    "gopd_dense_loss fold=True": (
        dict(op="gopd_dense_loss", backend="torch", fold=True),
        "fold=True does not apply",
    ),
    "fold=True, a trained head": (dict(backend="torch", fold=True), "fold=True needs a frozen head"),
    "gopd_loss fold=True": (dict(op="gopd_loss", backend="torch", fold=True), "fold=True does not apply"),
}


def case_inputs(n=N, dtype=torch.float32, ignore_frac=0.3, bias=True, **_):
    """The same inputs on every rank (seeded): hidden, the whole head, targets, per-token upstreams."""
    hidden, weight, bias, targets = make_inputs(n, D, V, dtype, bias=bias, ignore_frac=ignore_frac, seed=3)
    g = torch.Generator().manual_seed(4)
    upstream = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(2)]
    teacher = [torch.randn(n, generator=g, dtype=torch.float64) - 2 for _ in range(2)]  # T_t, R_t
    return hidden, weight, bias, targets, upstream, teacher


def dense_heads(n: int, dtype: torch.dtype, device: str) -> list[tuple]:
    """The teacher's (hidden size TEACHER_D) and the reference's heads of the dense cases."""
    return [make_inputs(n, d, V, dtype, device, seed=seed)[:3] for d, seed in ((TEACHER_D, 5), (D, 6))]


def run_case(rank: int, world: int, op="token_logprobs", **case):
    """One case on this rank: its outputs and the gradients of its own rows."""
    compiled = case["backend"] == "triton" and os.environ.get("TRITON_INTERPRET") != "1"
    device = "cuda" if compiled else "cpu"  # the compiled kernels on a GPU (both ranks on one)
    hidden, weight, bias, targets, upstream, teacher = (
        x if x is None else x.to(device) if isinstance(x, torch.Tensor) else [t.to(device) for t in x]
        for x in case_inputs(**case)
    )
    start = sum(SHARDS[world][:rank])
    rows = slice(start, start + SHARDS[world][rank])
    if case.get("skew_targets"):
        targets = (targets + rank) % V
    kw = dict(backend=case["backend"])
    if case.get("dtensor"):  # rows sharded as torch's ColwiseParallel leaves a head: no vocab_group
        mesh = init_device_mesh(device, (world,))
        cut = lambda t: distribute_tensor(t, mesh, [Shard(0)])  # noqa: E731  (33, 33, 31 rows of 97)
    else:
        kw["vocab_group"] = dist.group.WORLD
        cut = lambda t: t[rows].clone()  # noqa: E731
    if op == "frozen_logprobs":
        t_hidden, t_weight, t_bias, _ = make_inputs(len(targets), TEACHER_D, V, hidden.dtype, device, seed=5)
        scores = frozen_logprobs(
            t_hidden, cut(t_weight), targets, hidden, cut(weight), teacher_bias=cut(t_bias),
            ref_bias=cut(bias), temperature=0.7, **kw,
        )  # fmt: skip
        return dict(teacher_logp=scores.teacher_logp, ref_logp=scores.ref_logp)
    wide = torch.stack([hidden, torch.zeros_like(hidden)], dim=-1).reshape(len(targets), 2 * D)
    wide.requires_grad_()
    h = wide[:, ::2] if case.get("strided") else wide.view(len(targets), D, 2)[..., 0]
    if case.get("sharded_hidden"):
        h = distribute_tensor(h.detach(), mesh, [Shard(0)])
    w = cut(weight).requires_grad_(not case.get("frozen"))
    b = None if bias is None else cut(bias).requires_grad_(not case.get("frozen"))
    if "fold" in case:
        kw["fold"] = case["fold"]
    out = {}
    if op == "gopd_dense_loss":
        (th, tw, tb), (rh, rw, rb) = dense_heads(len(targets), hidden.dtype, device)
        loss, stats = gopd_dense_loss(
            h, w, th, cut(tw), rh, cut(rw), student_bias=b, teacher_bias=cut(tb), ref_bias=cut(rb),
            lam=case.get("lam", 1.25), temperature=0.7, mask=targets != -100,
            student_logit_softcap=case.get("softcap"), teacher_logit_softcap=case.get("softcap"), **kw,
        )  # fmt: skip
        loss.backward()
        out.update(loss=loss.detach(), kl=stats["kl"], kl_teacher=stats["kl_teacher"])
    elif op == "gopd_loss":
        loss, stats = gopd_loss(h, w, targets, teacher[0].to(h.dtype), teacher[1].to(h.dtype), bias=b,
                                lam=1.25, temperature=0.7, return_entropy=True, **kw)  # fmt: skip
        loss.backward()
        out.update(loss=loss.detach(), entropy=stats["entropy"])
    else:
        res = token_logprobs(
            h, w, targets, bias=b, temperature=0.7, return_entropy=case.get("entropy", False),
            logit_softcap=case.get("softcap"), reduce_hidden_grad=case.get("reduce_hidden_grad", True), **kw,
        )  # fmt: skip
        res = res if isinstance(res, tuple) else (res,)
        sum((r.double() * g).sum() for r, g in zip(res, upstream, strict=False)).backward()
        out.update(logp=res[0].detach(), entropy=res[1].detach() if len(res) > 1 else None)
    local = lambda g: g.to_local() if isinstance(g, DTensor) else g  # noqa: E731
    out.update(
        dh=wide.grad.view(len(targets), D, 2)[..., 0].clone(),
        dw=local(w.grad),
        db=None if b is None else local(b.grad),
    )
    return out


def run_cases(rank: int, world: int, cases: dict) -> dict:
    """Every case on this rank: its outputs on the CPU, or the message of the ValueError it
    raised (the error cases; any other exception fails the spawn)."""
    results = {}
    for name, case in cases.items():
        try:
            results[name] = {k: v if v is None else v.cpu() for k, v in run_case(rank, world, **case).items()}
        except ValueError as e:
            results[name] = str(e)
    return results


@pytest.fixture(scope="module", params=sorted(SHARDS))
def ranks(request, tmp_path_factory) -> tuple[int, list[dict]]:
    """(world, each rank's results of every case)."""
    world = request.param
    out = tmp_path_factory.mktemp(f"vocab_parallel_{world}")
    cases = {**CASES, **{name: case for name, (case, _) in ERROR_CASES.items()}}
    return world, run_gloo_ranks(out, world, run_cases, cases)


def tolerances(dtype):
    return VALUE_ATOL[dtype], GRAD_ROW_REL[dtype]


@pytest.mark.parametrize(
    "name", [n for n, c in CASES.items() if c.get("op", "token_logprobs") == "token_logprobs"]
)
def test_token_logprobs_matches_the_whole_head(ranks, name):
    world, results = ranks
    case = CASES[name]
    hidden, weight, bias, targets, upstream, _ = case_inputs(**case)
    entropy = case.get("entropy", False)
    outs, grads = reference_with_grads(
        hidden, weight, bias, targets, upstream[: 1 + entropy], temperature=0.7, return_entropy=entropy,
        logit_softcap=case.get("softcap"),
    )  # fmt: skip
    atol, row_rel = tolerances(hidden.dtype)
    for rank, res in enumerate(r[name] for r in results):
        torch.testing.assert_close(res["logp"].double(), outs[0], atol=atol, rtol=0)
        if entropy:
            torch.testing.assert_close(res["entropy"].double(), outs[1], atol=atol, rtol=0)
        if case.get("reduce_hidden_grad", True):
            assert row_rel_err(res["dh"], grads[0]) <= row_rel, (rank, row_rel_err(res["dh"], grads[0]))
    if not case.get("reduce_hidden_grad", True):  # each rank's own term; they sum to dH
        dh = sum(r[name]["dh"].double() for r in results)
        assert row_rel_err(dh, grads[0]) <= row_rel
        assert row_rel_err(results[0][name]["dh"], grads[0]) > 10 * row_rel  # not the sum already
    if case.get("frozen"):
        assert all(r[name]["dw"] is None and r[name]["db"] is None for r in results)
        return
    dw = torch.cat([r[name]["dw"] for r in results])
    assert dw.shape == (V, D)
    assert row_rel_err(dw, grads[1]) <= row_rel, row_rel_err(dw, grads[1])
    if bias is None:
        assert all(r[name]["db"] is None for r in results)
        return
    db = torch.cat([r[name]["db"] for r in results])
    assert row_rel_err(db, grads[2]) <= row_rel, row_rel_err(db, grads[2])


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("op") == "gopd_loss"])
def test_gopd_loss_matches_the_whole_head(ranks, name):
    world, results = ranks
    hidden, weight, bias, targets, _, (t_logp, r_logp) = case_inputs(**CASES[name])
    leaves = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    loss = gopd_loss_reference(
        *leaves[:2], targets, t_logp, r_logp, bias=leaves[2], lam=1.25, temperature=0.7
    )
    loss.backward()
    _, entropy = token_logprobs_reference(
        *leaves[:2], targets, bias=leaves[2], temperature=0.7, return_entropy=True
    )
    atol, row_rel = tolerances(hidden.dtype)
    for res in (r[name] for r in results):
        assert abs(float(res["loss"]) - loss.item()) <= atol
        assert abs(float(res["entropy"]) - entropy[targets != -100].mean().item()) <= atol
        assert row_rel_err(res["dh"], leaves[0].grad) <= row_rel
    assert row_rel_err(torch.cat([r[name]["dw"] for r in results]), leaves[1].grad) <= row_rel
    assert row_rel_err(torch.cat([r[name]["db"] for r in results]), leaves[2].grad) <= row_rel


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("op") == "gopd_dense_loss"])
def test_gopd_dense_loss_matches_the_whole_heads(ranks, name):
    world, results = ranks
    case = CASES[name]
    hidden, weight, bias, targets, _, _ = case_inputs(**case)
    (th, tw, tb), (rh, rw, rb) = [
        [x.double() for x in head] for head in dense_heads(len(targets), hidden.dtype, "cpu")
    ]
    leaves = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    mask = targets != -100
    dense = lambda lam, ref: gopd_dense_loss_reference(  # noqa: E731
        leaves[0], leaves[1], th, tw, *ref, student_bias=leaves[2], teacher_bias=tb,
        ref_bias=rb if ref else None, lam=lam, temperature=0.7, mask=mask,
        student_logit_softcap=case.get("softcap"), teacher_logit_softcap=case.get("softcap"),
    )  # fmt: skip
    loss, _ = dense(case.get("lam", 1.25), (rh, rw))
    kl_teacher = dense(1.0, ())[1][mask].mean()
    loss.backward()
    atol, row_rel = tolerances(hidden.dtype)
    for res in (r[name] for r in results):
        assert abs(float(res["loss"]) - loss.item()) <= atol
        assert abs(float(res["kl_teacher"]) - kl_teacher.item()) <= atol
        assert row_rel_err(res["dh"], leaves[0].grad) <= row_rel, row_rel_err(res["dh"], leaves[0].grad)
    assert row_rel_err(torch.cat([r[name]["dw"] for r in results]), leaves[1].grad) <= row_rel
    assert row_rel_err(torch.cat([r[name]["db"] for r in results]), leaves[2].grad) <= row_rel


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.get("op") == "frozen_logprobs"])
def test_frozen_logprobs_matches_the_whole_heads(ranks, name):
    world, results = ranks
    hidden, weight, bias, targets, _, _ = case_inputs(**CASES[name])
    t_hidden, t_weight, t_bias, _ = make_inputs(len(targets), TEACHER_D, V, hidden.dtype, seed=5)
    ref = lambda h, w, b: reference_with_grads(
        h, w, b, targets, [torch.zeros(len(targets))], temperature=0.7
    )[0][0]
    atol = VALUE_ATOL[hidden.dtype]
    for res in (r[name] for r in results):
        torch.testing.assert_close(
            res["teacher_logp"].double(), ref(t_hidden, t_weight, t_bias), atol=atol, rtol=0
        )
        torch.testing.assert_close(res["ref_logp"].double(), ref(hidden, weight, bias), atol=atol, rtol=0)


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_errors_name_the_argument_on_every_rank(ranks, name):
    _, results = ranks
    message = ERROR_CASES[name][1]
    assert all(isinstance(r[name], str) and message in r[name] for r in results), [r[name] for r in results]


def test_settings_without_a_group_are_refused():
    hidden, weight, _, targets = make_inputs(3, D, V)
    with pytest.raises(ValueError, match="reduce_hidden_grad=False applies"):
        token_logprobs(hidden, weight, targets, reduce_hidden_grad=False)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        token_logprobs(hidden, weight, targets, vocab_group=object())
    assert not dist.is_initialized()
