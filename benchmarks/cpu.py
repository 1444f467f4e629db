"""Fused ops vs naive materialising PyTorch on this CPU: forward + backward, time and peak memory.

Each case runs in a fresh process: inputs are built, the process's peak RSS is read as
the baseline, then one forward + backward (with a random per-token upstream gradient for
token_logprobs) gives the peak memory above it; every call is timed. Cases alternate over
several rounds, each in a new process, so that drift in a shared machine's speed does not
favour one of them. Outputs and gradients of every case are checked against the naive
ones from the same run.

    python -m benchmarks.cpu                          # token_logprobs, N=4096 D=1024 V=151936 fp32
    python -m benchmarks.cpu --op gopd_loss           # the G-OPD policy-gradient loss
    python -m benchmarks.cpu --op gopd_dense_loss     # dense G-OPD, student + teacher + reference
    python -m benchmarks.cpu --quick                  # a smaller token_logprobs run, ~1 min, not saved
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import machine_description, markdown_table, peak_rss_bytes, run_child, save_results


@dataclass
class Op:
    description: str
    shape: tuple[int, int, int]  # default (N, D, V)
    cases: dict[str, str]  # name -> what it runs


OPS = {
    "token_logprobs": Op(
        "log-probs of N sampled tokens, per-token random upstream gradient",
        (4096, 1024, 151936),
        {
            "naive": "materialised [N, V] logits, log_softmax, gather (token_logprobs_reference)",
            "gopd-torch": "gopd_kernels.token_logprobs(backend='torch'), 64 MiB tile workspace",
        },
    ),
    "gopd_loss": Op(
        "G-OPD policy-gradient loss, lam=1.25, on-policy, token-mean; teacher/ref log-probs given",
        (4096, 1024, 151936),
        {
            "naive": "materialised logits, then the loss (gopd_loss_reference)",
            "gopd-torch": "gopd_kernels.gopd_loss(backend='torch')",
        },
    ),
    "gopd_dense_loss": Op(
        "dense G-OPD KL(p_s || q), q ~ p_T^1.25 p_R^-0.25, three models of hidden size D",
        (1024, 1024, 151936),
        {
            "naive": "three materialised [N, V] log-softmaxes (gopd_dense_loss_reference)",
            "gopd-torch": "gopd_kernels.gopd_dense_loss(backend='torch')",
        },
    ),
}


def make_inputs(op: str, n: int, d: int, v: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    head = lambda: (
        torch.randn(n, d, generator=g).to(dtype),
        (torch.randn(v, d, generator=g) * (2.0 / d**0.5)).to(dtype),
    )
    hidden, weight = head()
    x = {"hidden": hidden, "weight": weight, "targets": torch.randint(0, v, (n,), generator=g)}
    if op == "token_logprobs":
        x["upstream"] = torch.randn(n, generator=g)
    elif op == "gopd_loss":
        x["teacher_logp"] = -torch.rand(n, generator=g) * 10
        x["ref_logp"] = -torch.rand(n, generator=g) * 10
    else:
        x["teacher"], x["ref"] = head(), head()
    return x


def run_case(op: str, case: str, x: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """One forward + backward; returns (output, dH, dW, forward seconds, total seconds)."""
    import gopd_kernels as gk
    from gopd_kernels import reference as ref

    naive = case == "naive"
    h = x["hidden"].clone().requires_grad_()
    w = x["weight"].clone().requires_grad_()
    t0 = time.perf_counter()
    if op == "token_logprobs":
        out = (
            ref.token_logprobs_reference(h, w, x["targets"])
            if naive
            else gk.token_logprobs(h, w, x["targets"], backend="torch")
        )
        grad = x["upstream"]
    elif op == "gopd_loss":
        args = (h, w, x["targets"], x["teacher_logp"], x["ref_logp"])
        out = (
            ref.gopd_loss_reference(*args, lam=1.25)
            if naive
            else gk.gopd_loss(*args, lam=1.25, backend="torch")[0]
        )
        grad = None
    else:
        args = (h, w, *x["teacher"], *x["ref"])
        out = (
            ref.gopd_dense_loss_reference(*args, lam=1.25)[0]
            if naive
            else gk.gopd_dense_loss(*args, lam=1.25, backend="torch")[0]
        )
        grad = None
    t1 = time.perf_counter()
    out.backward(grad)
    t2 = time.perf_counter()
    return out.detach(), h.grad, w.grad, t1 - t0, t2 - t0


def child(args) -> None:
    torch.manual_seed(0)
    x = make_inputs(args.op, args.n, args.d, args.v, getattr(torch, args.dtype))
    torch.randn(256, 256) @ torch.randn(256, 256)  # load BLAS and its thread pool before the baseline
    base = peak_rss_bytes()
    out, dh, dw, fwd_s, total_s = run_case(args.op, args.child, x)
    peak = peak_rss_bytes() - base
    fwd_times, total_times = [fwd_s], [total_s]
    for _ in range(args.repeats - 1):
        *_, f, t = run_case(args.op, args.child, x)
        fwd_times.append(f)
        total_times.append(t)
    out_file = Path(args.out)
    stride = max(1, dw.shape[0] // 512)  # a sample of dW rows is enough to compare
    torch.save({"out": out, "dh": dh, "dw_rows": dw[::stride].clone()}, out_file.with_suffix(".pt"))
    out_file.write_text(json.dumps({"peak_extra_bytes": peak, "fwd_s": fwd_times, "fwd_bwd_s": total_times}))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="token_logprobs", choices=list(OPS))
    p.add_argument("--n", type=int, help="tokens N (default: the op's)")
    p.add_argument("--d", type=int, help="hidden size D (default: the op's)")
    p.add_argument("--v", type=int, help="vocabulary V (default: the op's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per case, interleaved across cases")
    p.add_argument("--repeats", type=int, default=2, help="calls per process; the first also measures memory")
    p.add_argument("--quick", action="store_true", help="N=2048, D=512, one round, nothing saved: the demo")
    p.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    op = OPS[args.op]
    args.n, args.d, args.v = (a or b for a, b in zip((args.n, args.d, args.v), op.shape, strict=True))
    if args.quick:  # the demo: prints, and leaves the committed results alone
        args.n, args.d, args.rounds, args.no_save = 2048, 512, 1, True
    if args.child:
        return child(args)

    shape = [
        "--op",
        args.op,
        "--n",
        str(args.n),
        "--d",
        str(args.d),
        "--v",
        str(args.v),
        "--dtype",
        args.dtype,
    ]
    print(f"{args.op} fwd+bwd, N={args.n} D={args.d} V={args.v} {args.dtype}, one fresh process per case")
    results = {case: {"peak_extra_bytes": [], "fwd_s": [], "fwd_bwd_s": []} for case in op.cases}
    tensors = {}
    for r in range(args.rounds):
        for case in op.cases:
            res, tensors[case] = run_child(
                "benchmarks.cpu", ["--child", case, "--repeats", str(args.repeats), *shape]
            )
            for key in ("fwd_s", "fwd_bwd_s"):
                results[case][key] += res[key]
            results[case]["peak_extra_bytes"].append(res["peak_extra_bytes"])
            times = " ".join(f"{x:.2f}" for x in res["fwd_bwd_s"])
            print(f"  round {r + 1} {case:11s} +{res['peak_extra_bytes'] / 2**20:.0f} MiB  fwd+bwd {times} s")

    peak = {case: statistics.median(res["peak_extra_bytes"]) for case, res in results.items()}
    naive_time = statistics.median(results["naive"]["fwd_bwd_s"])
    rows = []
    for case, res in results.items():
        t, ref = tensors[case], tensors["naive"]
        med = statistics.median(res["fwd_bwd_s"])
        rows.append([
            case,
            f"{peak[case] / 2**20:.0f}",
            f"{peak['naive'] / peak[case]:.1f}x",
            f"{statistics.median(res['fwd_s']):.2f}",
            f"{med:.2f} ({min(res['fwd_bwd_s']):.2f}-{max(res['fwd_bwd_s']):.2f})",
            f"{med / naive_time:.2f}",
            f"{(t['out'] - ref['out']).abs().max():.1e}",
            f"{max(rel_err(t['dh'], ref['dh']), rel_err(t['dw_rows'], ref['dw_rows'])):.1e}",
        ])  # fmt: skip
    headers = ["case", "peak extra MiB", "memory saving", "fwd s", "fwd+bwd s (min-max)", "time / naive",
               "max abs output diff vs naive", "grad rel err vs naive"]  # fmt: skip
    machine = machine_description()
    table = markdown_table(headers, rows)
    md = (
        f"# {args.op} forward + backward on CPU\n\n"
        f"N={args.n}, D={args.d}, V={args.v}, {args.dtype}: {op.description}. "
        f"{args.rounds} round(s) x {args.repeats} calls per case, each round a fresh process per case, "
        f"cases interleaved; times are medians over all calls (min-max); memory is the median over "
        f"rounds of the peak RSS above the process's baseline after the inputs exist (it includes "
        f"the returned dW, {args.v * args.d * 4 / 2**20:.0f} MiB in fp32).\n\n"
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"{machine['memory_gib']} GiB, torch {machine['torch']}, {machine['date']}.\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in op.cases.items())
        + "\n\n"
        + table
    )
    print()
    print(table)
    if not args.no_save:
        name = f"{args.op}_N{args.n}_D{args.d}_V{args.v}_{args.dtype}"
        payload = {"machine": machine, "args": vars(args) | {"child": None, "out": None}, "results": results}
        folder = save_results("cpu", name, payload, md)
        print(f"\nsaved {folder}/{name}.md and .json")


if __name__ == "__main__":
    main()
