"""token_logprobs forward + backward on this CPU: naive materialising PyTorch vs gopd's torch backend.

Each case runs in a fresh process: inputs are built, the process's peak RSS is read as
the baseline, then one forward + backward (per-token random upstream gradient) gives the
peak memory above it; further calls give the time. Outputs and gradients of every case
are checked against the naive ones from the same run.

    python -m benchmarks.token_logprobs_cpu            # N=4096, D=1024, V=151936 fp32 (minutes)
    python -m benchmarks.token_logprobs_cpu --quick    # a smaller shape, about a minute, not saved
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import machine_description, markdown_table, peak_rss_bytes, run_child, save_results

CASES = {
    "naive": "materialised [N, V] logits, log_softmax, gather (gopd_kernels.token_logprobs_reference)",
    "gopd-torch": "gopd_kernels.token_logprobs(backend='torch'), 64 MiB tile workspace",
}


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * (2.0 / d**0.5)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)
    return hidden, weight, targets, upstream


def forward_backward(case: str, hidden, weight, targets, upstream):
    from gopd_kernels import token_logprobs, token_logprobs_reference

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    t0 = time.perf_counter()
    if case == "naive":
        logp = token_logprobs_reference(h, w, targets)
    else:
        logp = token_logprobs(h, w, targets, backend="torch")
    t1 = time.perf_counter()
    logp.backward(upstream)
    t2 = time.perf_counter()
    return logp.detach(), h.grad, w.grad, t1 - t0, t2 - t0


def child(args) -> None:
    torch.manual_seed(0)
    inputs = make_inputs(args.n, args.d, args.v, getattr(torch, args.dtype))
    torch.randn(256, 256) @ torch.randn(256, 256)  # load BLAS and its thread pool before the baseline
    base = peak_rss_bytes()
    logp, dh, dw, fwd_s, total_s = forward_backward(args.child, *inputs)
    peak = peak_rss_bytes() - base
    fwd_times, total_times = [fwd_s], [total_s]
    for _ in range(args.repeats - 1):
        *_, f, t = forward_backward(args.child, *inputs)
        fwd_times.append(f)
        total_times.append(t)
    out = Path(args.out)
    stride = max(1, dw.shape[0] // 512)  # a sample of dW rows is enough to compare
    torch.save({"logp": logp, "dh": dh, "dw_rows": dw[::stride].clone()}, out.with_suffix(".pt"))
    out.write_text(json.dumps({"peak_extra_bytes": peak, "fwd_s": fwd_times, "fwd_bwd_s": total_times}))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="tokens N")
    p.add_argument("--d", type=int, default=1024, help="hidden size D")
    p.add_argument("--v", type=int, default=151936, help="vocabulary V")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per case, interleaved across cases")
    p.add_argument("--repeats", type=int, default=2, help="calls per process; the first also measures memory")
    p.add_argument("--quick", action="store_true", help="N=2048, D=512, one round, nothing saved: the demo")
    p.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    p.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:  # the demo: prints, and leaves the committed results alone
        args.n, args.d, args.rounds, args.no_save = 2048, 512, 1, True
    if args.child:
        return child(args)

    shape = ["--n", str(args.n), "--d", str(args.d), "--v", str(args.v), "--dtype", args.dtype]
    print(
        f"token_logprobs fwd+bwd, N={args.n} D={args.d} V={args.v} {args.dtype}, one fresh process per case"
    )
    results = {case: {"peak_extra_bytes": [], "fwd_s": [], "fwd_bwd_s": []} for case in CASES}
    tensors = {}
    for r in range(args.rounds):
        for case in CASES:
            res, tensors[case] = run_child(
                "benchmarks.token_logprobs_cpu", ["--child", case, "--repeats", str(args.repeats), *shape]
            )
            results[case]["peak_extra_bytes"].append(res["peak_extra_bytes"])
            results[case]["fwd_s"] += res["fwd_s"]
            results[case]["fwd_bwd_s"] += res["fwd_bwd_s"]
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
            f"{(t['logp'] - ref['logp']).abs().max():.1e}",
            f"{max(rel_err(t['dh'], ref['dh']), rel_err(t['dw_rows'], ref['dw_rows'])):.1e}",
        ])  # fmt: skip
    headers = ["case", "peak extra MiB", "memory saving", "fwd s", "fwd+bwd s (min-max)", "time / naive",
               "max abs logp diff vs naive", "grad rel err vs naive"]  # fmt: skip
    machine = machine_description()
    table = markdown_table(headers, rows)
    md = (
        f"# token_logprobs forward + backward on CPU\n\n"
        f"N={args.n}, D={args.d}, V={args.v}, {args.dtype}; per-token random upstream gradient. "
        f"{args.rounds} round(s) x {args.repeats} calls per case, each round a fresh process per case, "
        f"cases interleaved; times are medians over all calls (min-max); memory is the median over "
        f"rounds of the peak RSS above the process's baseline after the inputs exist (it includes "
        f"the returned dW, {args.v * args.d * 4 / 2**20:.0f} MiB in fp32).\n\n"
        f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"{machine['memory_gib']} GiB, torch {machine['torch']}, {machine['date']}.\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in CASES.items())
        + "\n\n"
        + table
    )
    print()
    print(table)
    if not args.no_save:
        name = f"token_logprobs_N{args.n}_D{args.d}_V{args.v}_{args.dtype}"
        payload = {"machine": machine, "args": vars(args) | {"child": None, "out": None}, "results": results}
        folder = save_results("cpu", name, payload, md)
        print(f"\nsaved {folder}/{name}.md and .json")


if __name__ == "__main__":
    main()
