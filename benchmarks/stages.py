"""Where the Triton token_logprobs spends its time, stage by stage, beside cuBLAS.

    python -m benchmarks.stages                           # CUDA: N = 16384, D = 4096, V = 151936 bf16
    python -m benchmarks.stages --n 67 --d 64 --v 211     # any shape; on CPU through the interpreter
    python -m benchmarks.stages --sweep GOPD_WORKSPACE_MB=600,1200,2400 --op gopd_loss --impls gopd,gopd-torch
    python -m benchmarks.stages --sweep GOPD_BACKWARD_GEMM=triton,torch --op token_logprobs --impls gopd

Forward + backward is one forward launch and, per tile of the backward (R rows by C
vocabulary columns, linear_logsoftmax_triton.backward_tiles), three launches:

    forward      logits tiles -> running log-sum-exp, the target's logit   2 N D V FLOPs
    logit grad   the tile's logits again -> dZ [R, C]                       2 R D C
    dH           dH[rows] += dZ @ W[cols], fp32 across the slices           2 R D C
    dW           dW[cols] = dZ^T @ H[rows], in the head's dtype             2 R D C

Each stage is timed beside cuBLAS's GEMM of its shape on the same operands: for the forward
and the logit grad, the logits GEMM without the softmax (the gap is what tuning that stage
can win, the softmax's own cost included); for dH and dW, exactly what GOPD_BACKWARD_GEMM=torch
runs in their place (bf16 operands, an fp32 result). Every stage's output is checked against
torch before it is timed, and each row is printed as soon as it is measured. The forward
plus tiles x (logit grad + dH + dW) against the measured whole says how much time lies
outside the kernels (allocation, the autograd glue). On CPU the kernels run in the
interpreter, once each: that checks the harness, its times mean nothing.

--sweep NAME=v1,v2,... times whole ops (benchmarks.ops, as the report measures them: peak
memory and time) under each value of one setting: GOPD_WORKSPACE_MB (the Triton backward's
dZ tile, the torch backend's tiles and folds) or GOPD_BACKWARD_GEMM (who runs the backward's
dH and dW GEMMs). Every setting's outputs are compared with the first setting's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

if not torch.cuda.is_available():  # before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import cuda_times_ms, markdown_table  # noqa: E402
from benchmarks.ops import OPS, environment, errors, make_inputs  # noqa: E402
from benchmarks.report import Spec, measure_cpu, measure_cuda  # noqa: E402
from gopd_kernels import token_logprobs  # noqa: E402
from gopd_kernels.backend import workspace_bytes  # noqa: E402
from gopd_kernels.ops import linear_logsoftmax_triton as tri  # noqa: E402
from gopd_kernels.ops.matmul_torch import mm_add, mm_into, operand  # noqa: E402
from gopd_kernels.ops.matmul_triton import matmul  # noqa: E402
from gopd_kernels.reference import rel_err  # noqa: E402

SWEEPABLE = ("GOPD_WORKSPACE_MB", "GOPD_BACKWARD_GEMM", "GOPD_LOGITS_GEMM", "GOPD_DW_SUM")
CHECK_ROWS = 256  # rows of the forward's log-sum-exp checked against torch (the rest would be N x V)


def time_ms(fn, device: torch.device) -> float:
    """Median of at least 10 timed calls on CUDA; one call under the interpreter."""
    if device.type == "cuda":
        return statistics.median(cuda_times_ms(fn))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = rel_err(got, want)  # the report's measure: max |got - want| / max |want|
    if not err <= tol:  # NaN fails too
        raise AssertionError(f"stage {name}: relative error {err:.1e} against torch exceeds {tol:.0e}")


def measure(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device) -> tuple[list[dict], dict]:
    x = make_inputs(OPS["token_logprobs"], n, d, v, dtype, str(device))
    h, w, y = x["hidden"], x["weight"], x["targets"]
    tol = 1e-2 if dtype != torch.float32 else 1e-4
    dz_dtype = tri.logit_grad_dtype(dtype, scaled=True)  # token_logprobs' own
    rows, cols = tri.backward_tiles(n, v, d, dz_dtype, workspace_bytes("triton", w))
    out = []

    def stage(name, shape, flops, ours, cublas):
        ms, cublas_ms = time_ms(ours, device), time_ms(cublas, device) if cublas else None
        out.append({"stage": name, "shape": shape, "flops": flops, "ms": ms, "cublas_ms": cublas_ms})
        beside = f"   cuBLAS {cublas_ms:9.2f} ms" if cublas_ms else ""
        print(f"  {name:<22} {ms:9.2f} ms{beside}", flush=True)

    # forward: (logp, lse) for all N rows
    logp, lse, _ = tri.forward(h, w, None, y, 1.0, False, 0)
    want_lse = torch.logsumexp((h[:CHECK_ROWS].float() @ w.float().T), dim=1)
    _close("forward", lse[:CHECK_ROWS], want_lse, tol)
    stage("forward", f"{n} x {v} x {d}", 2.0 * n * d * v,
          lambda: tri.forward(h, w, None, y, 1.0, False, 0), lambda: torch.mm(h, w.T))  # fmt: skip

    # the backward's first tile (rows x cols of the vocabulary), random upstream gradient of logp
    r, c = slice(0, rows), slice(0, cols)
    tile_flops = 2.0 * rows * d * cols
    g_l = torch.randn(n, device=device)
    dz = torch.empty(rows, cols, dtype=dz_dtype, device=device)
    grad = lambda: tri.logit_grads(h[r], w[c], None, y[r], lse[r], None, g_l[r], None, 1.0, dz)
    grad()
    k = min(rows, CHECK_ROWS)
    want_dz = -g_l[:k, None] * torch.softmax(h[:k].float() @ w.float().T, dim=1)
    want_dz[torch.arange(k), y[:k]] += g_l[:k]
    _close("logit grad", dz[:k], want_dz[:, c], tol)
    stage("logit grad (tile)", f"{rows} x {cols} x {d}", tile_flops, grad, lambda: torch.mm(h[r], w[c].T))

    # dH += dZ @ W[cols] into an fp32 accumulator (when there are several slices),
    # dW[cols] = dZ^T @ H over the tile's rows; beside each, GOPD_BACKWARD_GEMM=torch's GEMM
    # (one operand dtype, an fp32 result, which it then rounds: for dW an fp32 slice)
    dh = torch.randn(rows, d, device=device)
    want_dh = dh + dz.float() @ w[c].float()
    matmul(dz, w[c], out=dh, accumulate=True)
    _close("dH", dh, want_dh, tol)
    mm_w, mm_h, mm_dz = operand(w[c].to(dz_dtype)), operand(h[r].to(dz_dtype)), operand(dz)
    stage("dH += (tile)", f"{rows} x {d} x {cols}", tile_flops,
          lambda: matmul(dz, w[c], out=dh, accumulate=True), lambda: mm_add(dh, mm_dz, mm_w))  # fmt: skip
    dw = torch.empty(cols, d, dtype=dtype, device=device)
    matmul(dz.T, h[r], out=dw)
    _close("dW", dw, dz.float().T @ h[r].float(), tol)
    dw32 = torch.empty(cols, d, device=device)
    stage("dW (tile)", f"{cols} x {d} x {rows}", tile_flops,
          lambda: matmul(dz.T, h[r], out=dw), lambda: mm_into(dw32, mm_dz.T, mm_h))  # fmt: skip

    # the whole op through autograd, as the trainer calls it
    hl, wl = h.detach().requires_grad_(), w.detach().requires_grad_()

    def whole():
        hl.grad = wl.grad = None
        token_logprobs(hl, wl, y, backend="triton").backward(g_l)

    tiles = -(-n // rows) * -(-v // cols)
    stage("fwd + bwd (autograd)", f"{tiles} tiles of {rows} x {cols}", 8.0 * n * d * v, whole, None)
    return out, {"tiles": tiles, "rows": rows, "cols": cols}


def table(rows: list[dict], tiles: int, gemm_tflops: float | None) -> str:
    body = []
    for s in rows:
        tf = s["flops"] / (s["ms"] / 1e3) / 1e12
        of_peak = f"{tf / gemm_tflops:.0%}" if gemm_tflops else "-"
        cublas = f"{s['cublas_ms']:.2f} ms" if s["cublas_ms"] else "-"
        ratio = f"{s['ms'] / s['cublas_ms']:.2f}x" if s["cublas_ms"] else "-"
        body.append([s["stage"], s["shape"], f"{s['ms']:.2f} ms", f"{tf:.0f}", of_peak, cublas, ratio])
    parts = rows[0]["ms"] + tiles * sum(s["ms"] for s in rows[1:4])  # the last slice is narrower
    headers = ["stage", "GEMM (M x N x K)", "ours", "TFLOP/s", "of GEMM peak", "cuBLAS", "ours / cuBLAS"]
    whole = f"forward + {tiles} x (logit grad + dH + dW) = {parts:.2f} ms; the whole {rows[-1]['ms']:.2f} ms"
    return markdown_table(headers, body) + "\n" + whole


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """ "NAME=v1,v2,..." -> (NAME, [v1, v2, ...]); ValueError naming --sweep if malformed."""
    name, _, values = text.partition("=")
    if name not in SWEEPABLE or not values:
        raise ValueError(f"--sweep must read NAME=v1,v2,... with NAME one of {SWEEPABLE}, got {text!r}")
    return name, values.split(",")


def sweep(spec: Spec, impls: list[str], name: str, values: list[str], device: torch.device) -> list[dict]:
    """Peak memory and times of `impls` of spec.op with the environment variable `name` set to
    each of `values` in turn (restored after)."""
    measure = measure_cuda if device.type == "cuda" else measure_cpu
    op, first, out = OPS[spec.op], {}, []
    for value in values:
        print(f"  {name}={value}", flush=True)  # a run cut short keeps what it printed
        with environment({name: value}):
            runs, kept = measure(spec, impls, rounds=1, repeats=1)
        for impl in impls:
            got = tuple(kept[impl].values()) if impl in kept else None
            first.setdefault(impl, got)
            vs = errors(op, got, first[impl]) if got and first[impl] else {}
            out.append({"setting": value, "impl": impl, "vs_first": vs, **runs[impl]})
            print("  " + sweep_table(out[-1:], name).splitlines()[-1], flush=True)
    return out


def sweep_table(rows: list[dict], name: str) -> str:
    body = []
    for r in rows:
        if "times_s" not in r:
            body.append([r["setting"], r["impl"], r.get("skipped", "-"), "-", "-"])
            continue
        err = max(r["vs_first"].values(), default=0.0)
        body.append([r["setting"], r["impl"], f"{statistics.median(r['times_s']) * 1e3:.2f} ms",
                     f"{max(r['peak_bytes']) / 2**20:.0f}", f"{err:.0e}"])  # fmt: skip
    return markdown_table([name, "impl", "time median", "peak MiB", "vs first setting"], body)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--sweep", help="NAME=v1,v2,...: time whole ops under each value of one setting instead")
    p.add_argument("--op", default="gopd_loss", help="--sweep: the op (benchmarks.ops)")
    p.add_argument("--impls", default="gopd,gopd-torch", help="--sweep: comma-separated")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.sweep:
        name, values = parse_sweep(args.sweep)
        if args.op not in OPS:
            raise ValueError(f"--op: unknown op {args.op!r}; choose from {', '.join(OPS)}")
        impls = args.impls.split(",")
        unknown = [i for i in impls if i not in OPS[args.op].impls]
        if unknown:
            raise ValueError(f"--impls: {unknown} are not implementations of {args.op}")
        spec = Spec(args.op, args.n, args.d, args.v, args.dtype)
        print(f"{spec.name}: {name} sweep")
        print(sweep_table(sweep(spec, impls, name, values, device), name))
        return
    if device.type == "cpu":
        print("note: no CUDA device: the kernels run in the Triton interpreter once each; times mean nothing")
    dtype = getattr(torch, args.dtype)
    rows, info = measure(args.n, args.d, args.v, dtype, device)
    rate = None
    if device.type == "cuda":
        from benchmarks.ceilings import gemm_rate

        rate = gemm_rate(dtype) / 1e12
        print(f"{torch.cuda.get_device_name()}: cuBLAS {args.dtype} GEMM {rate:.0f} TFLOP/s (8192^3)")
    print(f"token_logprobs stages, N={args.n} D={args.d} V={args.v} {args.dtype}; fwd + bwd counts 8 N D V")
    print(table(rows, info["tiles"], rate))


if __name__ == "__main__":
    main()
