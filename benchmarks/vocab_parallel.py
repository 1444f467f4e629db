"""token_logprobs forward + backward on a vocabulary-parallel head, next to materialised shard logits.

    python -m benchmarks.vocab_parallel                      # N = 2048, D = 1024, V = 151936, fp32
    python -m benchmarks.vocab_parallel --worlds 1 2 --tokens 4096
    python -m benchmarks.vocab_parallel --frozen-head       # dH only (LoRA): the frozen-head fold

Each rank of a world holds V / world rows of the head (gloo on CPUs, one thread per rank; NCCL,
one GPU per rank, when CUDA has a GPU for each). The implementations, on the same inputs:

- ``gopd``: ``token_logprobs(..., vocab_group=group)``: the rank streams its own rows, one
  all_gather of three numbers per token merges the ranks' log-softmax statistics, and dH is
  one all_reduce (ops/vocab_parallel.py);
- ``gopd-recompute`` (``--frozen-head`` only): the same with ``fold=False``, its logits
  recomputed in the backward instead of dlogp/dh folded into the forward;
- ``materialised``: the method of tensor-parallel trainers' vocabulary-parallel cross-entropy
  (Megatron-LM's, and verl's log-probs from vocabulary-parallel logits), written here: the
  rank's [N, V / world] logits from one GEMM, all_reduces of the row max, the sum of exps and
  the target logit, the shard's softmax kept for the backward, dH all-reduced.

Per implementation and world: every rank's time per call (median over the ranks' calls) and
its peak memory above what it held before the first call (CPU: peak RSS, each world a fresh
set of processes; CUDA: max_memory_allocated), and the agreement of gopd's and the
materialised logits' log-probs, dH and dW. Results under benchmarks/results/<machine>/vocab_parallel/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import (
    RESULTS_DIR,
    cuda_peak_bytes,
    cuda_times_ms,
    machine_description,
    machine_slug,
    markdown_table,
    measured_commit,
    timed_calls,
)
from benchmarks.report import CHILD_ENV
from gopd_kernels import token_logprobs

IMPLS = ("gopd", "materialised")
FROZEN_IMPLS = ("gopd", "gopd-recompute", "materialised")  # gopd folds a frozen head; fold=False beside it


class MaterialisedShardLogprobs(torch.autograd.Function):
    """log p(y) over a vocabulary split across `group`, from this rank's [N, V_r] logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, start, group):
        logits = hidden @ weight.T  # [N, V_r]
        row_max = logits.amax(dim=1)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        probs = logits.sub_(row_max[:, None]).exp_()  # in place: the one [N, V_r] kept
        local = targets - start
        inside = (local >= 0) & (local < weight.shape[0])
        picked = hidden.mul(weight[local.clamp(0, weight.shape[0] - 1)]).sum(1) - row_max
        stats = torch.stack([probs.sum(dim=1), torch.where(inside, picked, torch.zeros_like(picked))])
        dist.all_reduce(stats, group=group)
        sum_exp, z_y = stats
        probs.div_(sum_exp[:, None])
        ctx.save_for_backward(hidden, weight, probs, local, inside)
        ctx.group = group
        return z_y - sum_exp.log()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, probs, local, inside = ctx.saved_tensors
        dz = probs.mul_(-grad[:, None])  # g (1[v = y] - p_v), written over the softmax
        rows = inside.nonzero().squeeze(1)
        dz[rows, local[rows]] += grad[rows]
        dh = dz @ weight
        dist.all_reduce(dh, group=ctx.group)
        return dh, dz.T @ hidden if ctx.needs_input_grad[1] else None, None, None, None


def inputs(tokens: int, dim: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g).to(device, dtype)
    weight = (torch.randn(vocab, dim, generator=g) * dim**-0.5).to(device, dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    upstream = torch.randn(tokens, generator=g).to(device)
    return hidden, weight, targets, upstream


def shard_rows(vocab: int, world: int, rank: int) -> slice:
    """Rank `rank`'s rows of a vocabulary split as evenly as whole rows allow."""
    per, extra = divmod(vocab, world)
    start = rank * per + min(rank, extra)
    return slice(start, start + per + (rank < extra))


def one_call(impl: str, hidden, weight, targets, upstream, start: int, group, frozen: bool):
    """Forward + backward once; (logp, dH, dW of the shard, None for a frozen head)."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_(not frozen)
    if impl.startswith("gopd"):
        logp = token_logprobs(
            h, w, targets, vocab_group=group, fold=False if impl == "gopd-recompute" else None
        )
    else:
        logp = MaterialisedShardLogprobs.apply(h, w, targets, start, group)
    (logp * upstream).sum().backward()
    return logp.detach(), h.grad, w.grad


def rank_main(rank: int, world: int, args: dict, out_dir: str) -> None:
    cuda = args["device"] == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world
    )
    try:
        dtype = getattr(torch, args["dtype"])
        hidden, weight, targets, upstream = inputs(args["tokens"], args["dim"], args["vocab"], dtype, device)
        rows = shard_rows(args["vocab"], world, rank)
        shard = weight[rows].contiguous()
        del weight
        impl, group = args["impl"], dist.group.WORLD
        call = lambda h=hidden, y=targets, g=upstream: one_call(  # noqa: E731
            impl, h, shard, y, g, rows.start, group, args["frozen_head"]
        )
        call(hidden[:64], targets[:64], upstream[:64])  # one-time costs: imports, kernels, pages
        if cuda:
            result, peak = cuda_peak_bytes(call)
            times = [ms / 1e3 for ms in cuda_times_ms(call)]
        else:
            times, peak, result = timed_calls(call, args["repeats"])
        torch.save(
            {"times_s": times, "peak_bytes": peak, "logp": result[0].cpu(), "dh": result[1].cpu(),
             "dw": None if result[2] is None else result[2].cpu(), "rows": (rows.start, rows.stop)},
            Path(out_dir) / f"rank{rank}.pt",
        )  # fmt: skip
    finally:
        dist.destroy_process_group()


def run_world(impl: str, world: int, args: dict) -> list[dict]:
    """One fresh set of `world` ranks for `impl`; each rank's record."""
    os.environ.update(CHILD_ENV)  # the ranks' malloc, as the report's children (peak RSS is exact)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank_main, args=(world, {**args, "impl": impl}, tmp), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]


def agreement(a: list[dict], b: list[dict]) -> dict:
    """Largest differences between two implementations' ranks at one world."""
    rel = lambda x, y: float((x.double() - y.double()).abs().max() / y.double().abs().max())  # noqa: E731
    dw = lambda ranks: torch.cat([r["dw"] for r in ranks])  # noqa: E731
    return {
        "logp_max_abs": max(float((x["logp"] - y["logp"]).abs().max()) for x, y in zip(a, b, strict=True)),
        "dh_rel": max(rel(x["dh"], y["dh"]) for x, y in zip(a, b, strict=True)),
        "dw_rel": None if a[0]["dw"] is None else rel(dw(a), dw(b)),
    }


def table(record: dict) -> str:
    rows = []
    for world, runs in record["worlds"].items():
        base = runs.get("materialised")
        for impl in runs:
            run = runs[impl]
            t = statistics.median(run["times_s"])
            mem = max(run["peak_bytes"])
            rows.append([
                world, impl, f"{t:.3f} s ({min(run['times_s']):.3f}-{max(run['times_s']):.3f})",
                f"{t / statistics.median(base['times_s']):.2f}x", f"{mem / 2**20:.0f}",
                f"{mem / max(base['peak_bytes']):.2f}x",
            ])  # fmt: skip
    headers = ["ranks", "impl", "fwd+bwd per rank, median (min-max)", "time / materialised",
               "peak MiB per rank (largest)", "memory / materialised"]  # fmt: skip
    dw = lambda a: "" if a["dw_rel"] is None else f" and dW {a['dw_rel']:.1e}"  # noqa: E731 (a frozen head: none)
    agree = "\n".join(
        f"- {world} ranks, gopd against materialised: log-probs {a['logp_max_abs']:.1e} apart, "
        f"dH {a['dh_rel']:.1e}{dw(a)} (largest difference / largest entry)"
        for world, a in record["agreement"].items()
    )
    return markdown_table(headers, rows) + "\n\n" + agree


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="ranks sharing the vocabulary")
    p.add_argument("--frozen-head", action="store_true", help="the head takes no gradient (LoRA): dH only")
    p.add_argument("--repeats", type=int, default=3, help="CPU: timed calls per rank, the first gives memory")
    p.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    a = p.parse_args(argv)
    for name in ("tokens", "dim", "vocab", "repeats"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(a, name)}")
    cuda = torch.cuda.is_available()
    if any(w < 1 or w > a.vocab or (cuda and w > torch.cuda.device_count()) for w in a.worlds):
        raise ValueError(f"--worlds {a.worlds}: each in [1, vocab] (and at most one rank per GPU on CUDA)")
    args = dict(tokens=a.tokens, dim=a.dim, vocab=a.vocab, dtype=a.dtype, repeats=a.repeats,
                frozen_head=a.frozen_head, device="cuda" if cuda else "cpu")  # fmt: skip
    worlds, agree = {}, {}
    for world in a.worlds:
        ranks = {impl: run_world(impl, world, args) for impl in (FROZEN_IMPLS if a.frozen_head else IMPLS)}
        worlds[world] = {
            impl: {
                "times_s": [t for r in rs for t in r["times_s"]],
                "peak_bytes": [r["peak_bytes"] for r in rs],
            }
            for impl, rs in ranks.items()
        }
        agree[world] = agreement(ranks["gopd"], ranks["materialised"])
        print(f"  {world} ranks: " + ", ".join(
            f"{impl} {statistics.median(r['times_s']):.3f} s, {max(r['peak_bytes']) / 2**20:.0f} MiB"
            for impl, r in worlds[world].items()), flush=True)  # fmt: skip
    record = {**{k: v for k, v in args.items() if k != "repeats"}, "machine": machine_description(),
              "commit": measured_commit(), "worlds": worlds, "agreement": agree}  # fmt: skip
    print(table(record), flush=True)
    if not a.no_save:
        folder = RESULTS_DIR / machine_slug(record["machine"]) / "vocab_parallel"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{a.dtype}_N{a.tokens}_D{a.dim}_V{a.vocab}{'_frozen_head' if a.frozen_head else ''}.json"
        (folder / name).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
