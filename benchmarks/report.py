"""Side-by-side report: gopd vs naive PyTorch, torch.compile, Liger-Kernel and Cut Cross-Entropy.

    python -m benchmarks.report --preset cpu     # the CPU report committed under results/<machine>/
    python -m benchmarks.report --preset gpu     # on CUDA: bf16 and fp32 up to N=16384, D=4096, V=151936
    python -m benchmarks.report --op token_logprobs --n 1024,4096 --d 512 --v 32000 --no-save
    python -m benchmarks.report --plots-only     # redraw the plots and the summary from saved JSON

For each op and shape, every implementation that can run here (benchmarks/ops.py) is first
checked against the float64 naive reference on a slice of the same D and V (N=67); one that
disagrees is reported and not timed. Then:

- CPU: each (implementation, round) runs in a fresh process; rounds interleave the
  implementations so that drift in a shared machine's speed favours none of them. Peak memory
  is the process's peak RSS above its RSS once the inputs exist (every implementation is
  warmed up first, at two small N, and the peak is reset after; glibc's mmap threshold is
  fixed at 64 KiB so that no allocation reuses freed heap unseen). Times are wall-clock per call.
  Each process may map what the machine had available at the start, less 1 GiB: an
  implementation that needs more fails on an allocation and is reported as not run.
- CUDA: in this process; time from triton.testing.do_bench after a warm-up call (compile,
  autotune), memory from torch.cuda.max_memory_allocated above the allocation before the call.

Memory includes the returned gradients (dW is V x D in the weight's dtype), which every
implementation pays. Outputs and gradients are also compared at the timed shape: with naive's,
and (by default on CUDA, --check-at-n on CPU) with the float64 reference on the same inputs,
computed a slice of rows at a time, dH and dW as their worst row's relative error (each
token's gradient, each vocabulary row of dW, against its own size: the largest entries, the
sampled tokens' rows of dW, cannot hide the error of the rest). That check shows errors
that grow with N and V (gradients summed in bf16 across blocks pass at N = 67 and drift at
N = 16384) and what rounding the logits to bf16 costs the gradient of the unsampled rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import ops as bops
from benchmarks.common import (
    RESULTS_DIR,
    ChildFailed,
    child_rounds,
    cuda_peak_bytes,
    cuda_times_ms,
    machine_description,
    machine_slug,
    markdown_table,
    measured_commit,
    timed_calls,
)

CHECK_N = 67  # rows of the float64 correctness check: odd, and more than one tile row on CPU
WARMUP_NS = (64, 67)  # CPU: the shapes every implementation runs on before it is measured
DW_ROWS = 512  # rows of dW kept for the comparison with naive at the timed shape
REFERENCE_BYTES = 512 << 20  # a float64 [rows, V] logits slice of the timed-shape reference


@dataclass(frozen=True)
class Spec:
    op: str
    n: int
    d: int
    v: int
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.op}_{self.dtype}_N{self.n}_D{self.d}_V{self.v}"

    def as_args(self) -> list[str]:
        return ["--spec", f"{self.op},{self.n},{self.d},{self.v},{self.dtype}"]


def _grid(ops, ns, ds, vs, dtypes) -> list[Spec]:
    return [Spec(o, n, d, v, t) for t in dtypes for o in ops for d in ds for v in vs for n in ns]


V_QWEN = 151936  # Qwen2.5/Qwen3, the official runs' vocabulary
PRESETS = {
    # a smoke run of every op and implementation, ~2 minutes on 2 cores
    "quick": lambda: _grid(list(bops.OPS), [512], [256], [32000], ["float32"]),
    # the committed CPU report: memory and time against N at Qwen's vocabulary, plus V and D;
    # at N = 16384 naive's logits and their gradients outgrow a 24 GiB machine (a result too)
    "cpu": lambda: (
        _grid(["token_logprobs"], [1024, 2048, 4096, 8192, 16384], [1024], [V_QWEN], ["float32"])
        + _grid(["token_logprobs"], [1024], [1024], [32000, 128256, 256000], ["float32"])
        + _grid(["token_logprobs_softcap", "gopd_loss_softcap"], [2048], [1024], [V_QWEN], ["float32"])
        + _grid(["token_logprobs"], [2048], [512, 2048, 4096], [V_QWEN], ["float32"])
        + _grid(["token_logprobs_fwd", "token_logprobs_frozen_head", "frozen_scoring"], [1024, 4096], [1024],
                [V_QWEN], ["float32"])
        + _grid(["gopd_loss"], [2048, 8192, 16384], [1024], [V_QWEN], ["float32"])
        + _grid(["policy_loss"], [2048, 8192], [1024], [V_QWEN], ["float32"])
        + _grid(["gopd_loss_frozen_head"], [1024, 4096], [1024], [V_QWEN], ["float32"])
        + _grid(["gopd_dense_loss", "gopd_dense_loss_exopd"], [512, 1024], [1024], [V_QWEN], ["float32"])
    ),
    "gpu": lambda: (
        _grid(list(bops.OPS), [2048, 4096, 8192, 16384], [4096], [V_QWEN], ["bfloat16"])
        + _grid(list(bops.OPS), [16384], [4096], [V_QWEN], ["float32"])
        + _grid(["token_logprobs"], [16384], [4096], [32000, 128256, 256000], ["bfloat16"])
    ),
}  # fmt: skip


# --- one implementation at one shape -----------------------------------------------------------


def timed_inputs(spec: Spec, device: str) -> dict:
    """The inputs every implementation is timed on at `spec` (seed 0: the same in every process)."""
    return bops.make_inputs(bops.OPS[spec.op], spec.n, spec.d, spec.v, getattr(torch, spec.dtype), device)


def _keep(got: tuple) -> dict:
    """The tensors compared with naive's and float64's: output, dH, and every k-th row of dW,
    in their own dtype, which sets the error's floor (reference.row_rel_err: a 16-bit row below
    the smallest normal is not held to fp32's precision). Kept as fp32 copies, fp16 gradients
    put every run's worst dH row at 0.35 on the H100 (N = 16384, D = 4096): a token whose
    upstream gradient is 1.6e-6, whose exact dH row (entries under 2.2e-7) is 0.35 off once
    rounded to fp16 at all."""
    out, dh, dw = got
    kept = {"out": out.detach().cpu()}
    if dh is not None:
        kept["dh"] = dh.detach().cpu()
    if dw is not None:
        kept["dw"] = dw[:: max(1, dw.shape[0] // DW_ROWS)].detach().cpu()
    return kept


def child(spec: Spec, impl_name: str, repeats: int, out_file: Path, memory_limit: int | None = None) -> None:
    """Runs in a fresh process: peak RSS of the first measured call, then the time of each call.

    memory_limit: bytes this process may map (RLIMIT_DATA, which counts the mmap'd tensors), so
    that an implementation too big for the machine fails on an allocation, with torch's
    message, instead of being killed by the kernel (or taking the machine down with it)."""
    if memory_limit:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
    op, impl = bops.OPS[spec.op], bops.OPS[spec.op].impls[impl_name]
    x = timed_inputs(spec, "cpu")
    call = bops.with_leaves(x, op)
    torch.randn(256, 256) @ torch.randn(256, 256)  # load BLAS and its thread pool before the baseline
    # Every implementation is warmed up outside the measurement, on two small N of the same D
    # and V. First calls pay one-time costs that a trainer pays once: lazy imports, BLAS code
    # pages, allocator set-up, and for torch.compile the compile itself; the second N makes it
    # generalise N (its "automatic dynamic" shapes, as in a trainer whose batches vary), so the
    # timed call does not compile and is not a static-shape special case. Measured: a cold first
    # call of gopd's dense loss at N = 512 had a peak 35 MiB higher than a warmed one.
    t0 = time.perf_counter()
    for n in WARMUP_NS:
        small = bops.make_inputs(op, n, spec.d, spec.v, getattr(torch, spec.dtype), "cpu", seed=2)
        bops.run_impl(op, impl, bops.with_leaves(small, op))
    warmup_s = time.perf_counter() - t0
    del small
    times, peak, kept = timed_calls(lambda: bops.run_impl(op, impl, call), repeats, keep=_keep)
    torch.save(kept, out_file.with_suffix(".pt"))
    out_file.write_text(json.dumps({"peak_bytes": peak, "times_s": times, "warmup_s": warmup_s}))


# glibc hands blocks below its mmap threshold (dynamic, up to 32 MiB) out of a heap that it
# keeps after free: an implementation's warm-up leaves such a heap behind, its timed
# call reuses it, and its peak RSS came out 3 MiB where it needs 194 (measured). A fixed
# threshold of 64 KiB maps every tensor fresh and unmaps it on free, for every implementation.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def cpu_memory_limit() -> int:
    """Bytes each CPU child may map: what the machine has available now, less 1 GiB for the
    report's own process (half, on a machine with less than 2 GiB free), the same for every
    implementation of the run."""
    with open("/proc/meminfo") as f:
        available = 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return max(available - (1 << 30), available // 2)


def _memory_limit(gib: float | None, device: str) -> int | None:
    """The CPU children's memory limit in bytes: --memory-limit-gib, else cpu_memory_limit()."""
    if device == "cuda":
        if gib is not None:
            raise ValueError(
                "--memory-limit-gib is a CPU setting (each child's RLIMIT_DATA); CUDA runs in-process"
            )
        return None
    if gib is not None and gib <= 0:
        raise ValueError(f"--memory-limit-gib must be > 0, got {gib}")
    limit = int(gib * 2**30) if gib else cpu_memory_limit()
    print(f"each process may map {limit / 2**30:.1f} GiB (--memory-limit-gib)")
    return limit


def measure_cpu(
    spec: Spec, names: list[str], rounds: int, repeats: int, memory_limit: int | None = None
) -> tuple[dict, dict]:
    """Fresh processes, rounds interleaving the implementations. One that fails (out of
    memory under memory_limit, say) is recorded as skipped with the reason, and not run again."""
    runs = {name: {"peak_bytes": [], "times_s": [], "warmup_s": []} for name in names}
    kept = {}
    limit_args = ["--memory-limit", str(memory_limit)] if memory_limit else []
    args_for = lambda name: [*spec.as_args(), "--child", name, "--repeats", str(repeats), *limit_args]  # noqa: E731
    for _, name, res, tensors in child_rounds("benchmarks.report", names, rounds, args_for, CHILD_ENV):
        if isinstance(res, ChildFailed):
            runs[name] = {"skipped": f"failed at this shape: {res.reason}"}
            kept.pop(name, None)
            continue
        kept[name] = tensors
        runs[name]["peak_bytes"].append(res["peak_bytes"])
        runs[name]["times_s"] += res["times_s"]
        runs[name]["warmup_s"].append(res["warmup_s"])
    return runs, kept


def measure_cuda(spec: Spec, names: list[str], rounds: int, repeats: int, x: dict | None = None) -> tuple:
    """In this process, on x = timed_inputs(spec, "cuda") (made here when None)."""
    op = bops.OPS[spec.op]
    x = x if x is not None else timed_inputs(spec, "cuda")
    runs, kept = {}, {}
    for name in names:
        impl = op.impls[name]
        call = bops.with_leaves(x, op)
        fn = functools.partial(bops.run_impl, op, impl, call)
        try:
            t0 = time.perf_counter()
            kept[name] = _keep(fn())  # warm-up: compile, autotune
            torch.cuda.synchronize()
            warmup_s = time.perf_counter() - t0
            call["h"].grad = call["w"].grad = None
            torch.cuda.empty_cache()
            _, peak = cuda_peak_bytes(fn)
            ms = cuda_times_ms(fn, min_rep_ms=100 * rounds)  # repeats: a CPU setting
        except Exception as e:  # passed the small check, fails at this shape: a result, as in bench_spec
            runs[name] = {"skipped": f"failed at this shape: {type(e).__name__}: {str(e)[:200]}"}
            kept.pop(name, None)
            print(f"    {name:14s} {runs[name]['skipped']}", flush=True)
            continue
        finally:
            del call, fn
            torch.cuda.empty_cache()
        runs[name] = {"peak_bytes": [peak], "times_s": [t / 1e3 for t in ms], "warmup_s": [warmup_s]}
        print(f"    {name:14s} +{peak / 2**20:7.0f} MiB  median {statistics.median(ms):.2f} ms", flush=True)
    return runs, kept


# --- one op at one shape: check, measure, compare --------------------------------------------


def float64_at_shape(spec: Spec, device: str, x: dict | None = None) -> dict:
    """What _keep keeps of the float64 reference on x = timed_inputs(spec, device) (made here when
    None), computed on `device` a slice of rows at a time and kept on the CPU."""
    op = bops.OPS[spec.op]
    x = x if x is not None else timed_inputs(spec, device)
    rows = max(1, REFERENCE_BYTES // (8 * spec.v))
    t0 = time.perf_counter()
    kept = _keep(bops.float64_reference(op, x, rows=rows))
    del x
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"    float64 reference at N={spec.n}: {time.perf_counter() - t0:.1f} s", flush=True)
    return kept


def gopd_settings() -> dict[str, str]:
    """The GOPD_* environment the run had (workspace, GEMM runners): what its gopd rows ran."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("GOPD_") and k != "GOPD_COMMIT"}


def bench_spec(
    spec: Spec,
    wanted: list[str] | None,
    rounds: int,
    repeats: int,
    device: str,
    memory_limit: int | None = None,
    check_at_n: bool = False,
) -> dict:
    """One op at one shape: the float64 check, then every implementation that passed it timed
    (memory_limit: the CPU children's, see child), each compared with naive's result and, with
    check_at_n, with the float64 reference at the timed shape."""
    op = bops.OPS[spec.op]
    dtype = getattr(torch, spec.dtype)
    record = {"spec": asdict(spec), "description": op.description, "flops": op.flops(spec.n, spec.d, spec.v),
              "impls": {}}  # fmt: skip
    print(f"{spec.name}: {op.description}", flush=True)
    small = bops.make_inputs(op, CHECK_N, spec.d, spec.v, dtype, device, seed=1)
    want = bops.float64_reference(op, small)
    timed = []
    for name, impl in op.impls.items():
        if wanted and name not in wanted and name != "naive":
            continue
        entry = record["impls"][name] = {"description": impl.description}
        why = impl.unavailable(device)
        if why is None:
            try:
                entry["check_vs_float64"] = bops.float64_errors(op, impl, small, want)
            except Exception as e:  # a peer that fails on a supported input is a result, not a crash
                why = f"failed: {type(e).__name__}: {str(e)[:200]}"
        if why is None and max(entry["check_vs_float64"].values()) > bops.tolerance(dtype):
            why = f"disagrees with the float64 reference: {entry['check_vs_float64']}"
        if why:
            entry["skipped"] = why
            print(f"    {name:14s} skipped: {why}")
        else:
            timed.append(name)
    del small, want
    # CUDA: one set of timed inputs for the reference and the runs (drawn on the CPU: the AMD VM
    # takes 3 s for a 151936 x 1024 head)
    x = timed_inputs(spec, device) if device == "cuda" and timed else None
    want_at_n = None
    if check_at_n and timed:
        try:
            want_at_n = float64_at_shape(spec, device, x)
        except Exception as e:  # out of memory, say: the timed runs still count, said so in the record
            record["float64_at_n_failed"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"    float64 reference at N={spec.n} failed: {record['float64_at_n_failed']}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    if device == "cuda":
        runs, kept = measure_cuda(spec, timed, rounds, repeats, x)
        del x
    else:
        runs, kept = measure_cpu(spec, timed, rounds, repeats, memory_limit)
    for name in timed:
        entry = record["impls"][name]
        entry |= runs[name]
        if name in kept and "naive" in kept:  # not when it failed at the timed shape
            entry["vs_naive"] = bops.errors(op, tuple(kept[name].values()), tuple(kept["naive"].values()))
        if name in kept and want_at_n is not None:
            got = tuple(kept[name].values())
            entry["worst_row_vs_float64_at_n"] = bops.errors(op, got, tuple(want_at_n.values()), by_row=True)
    return record


# --- tables and plots --------------------------------------------------------------------------


# A CUDA record's "ceilings" (benchmarks.ceilings, measured in the same run): the GEMM rate
# an op's TFLOP/s is set against, by input dtype. fp32 against plain fp32 cuBLAS (our fp32
# kernels use 3xTF32, which is about fp32-exact).
CEILING_OF = {
    "bfloat16": "bf16_gemm_TFLOP_per_s",
    "float16": "fp16_gemm_TFLOP_per_s",
    "float32": "fp32_gemm_TFLOP_per_s",
}


def summarize(record: dict) -> list[dict]:
    """Medians and ratios for each timed implementation; peers = every implementation but ours
    (gopd, and gopd-torch on CUDA). of_peak: TFLOP/s over the measured GEMM rate, on CUDA."""
    rows = []
    for name, e in record["impls"].items():
        if "times_s" in e:
            t = statistics.median(e["times_s"])
            rows.append({"impl": name, "time": t, "lo": min(e["times_s"]), "hi": max(e["times_s"]),
                         "peak": statistics.median(e["peak_bytes"]), "tflops": record["flops"] / t / 1e12,
                         "err": max(e["vs_naive"].values()) if e.get("vs_naive") else None,
                         "err64": max(e.get("worst_row_vs_float64_at_n", {}).values(), default=None),
                         "check": max(e["check_vs_float64"].values())})  # fmt: skip
    peers = [r for r in rows if not r["impl"].startswith("gopd")]
    best_t = min((r["time"] for r in peers), default=None)
    best_m = min((r["peak"] for r in peers), default=None)
    naive = next((r for r in rows if r["impl"] == "naive"), None)
    peak_rate = (record.get("ceilings") or {}).get(CEILING_OF[record["spec"]["dtype"]])
    for r in rows:
        r["of_peak"] = r["tflops"] / peak_rate if peak_rate else None
        r["t_naive"] = r["time"] / naive["time"] if naive else None
        r["m_naive"] = r["peak"] / naive["peak"] if naive and naive["peak"] else None  # 0: under RSS's grain
        r["t_peer"] = r["time"] / best_t if best_t else None
        r["m_peer"] = r["peak"] / best_m if best_m else None
    return rows


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _seconds(t: float) -> str:
    return f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms"


def markdown(record: dict) -> str:
    s = Spec(**record["spec"])
    summary = summarize(record)
    err = lambda r: "-" if r["err"] is None else f"{r['err']:.0e}"  # "-": naive did not run
    rows = [[r["impl"], f"{_seconds(r['time'])} ({_seconds(r['lo'])}-{_seconds(r['hi'])})",
             _ratio(r["t_naive"]), _ratio(r["t_peer"]), f"{r['tflops']:.3f}", f"{r['peak'] / 2**20:.0f}",
             _ratio(r["m_naive"]), _ratio(r["m_peer"]), f"{r['check']:.0e}", err(r)]
            for r in summary]  # fmt: skip
    headers = ["impl", "time median (min-max)", "time / naive", "time / best peer", "TFLOP/s", "peak MiB",
               "memory / naive", "memory / best peer", f"float64 at N={CHECK_N}", "vs naive"]  # fmt: skip
    if any(r["err64"] is not None for r in summary):  # the float64 reference ran at this N
        headers.insert(9, f"float64 at N={s.n}, worst row")
        for row, r in zip(rows, summary, strict=True):
            row.insert(9, "-" if r["err64"] is None else f"{r['err64']:.0e}")
    if any(r["of_peak"] is not None for r in summary):
        headers.insert(5, "of GEMM peak")
        for row, r in zip(rows, summary, strict=True):
            row.insert(5, f"{100 * r['of_peak']:.0f}%")
    notes = [f"- {n}: not run, {e['skipped']}" for n, e in record["impls"].items() if "skipped" in e]
    if "float64_at_n_failed" in record:
        notes.append(f"- the float64 reference at N={s.n} failed: {record['float64_at_n_failed']}")
    settings = record.get("method", {}).get("settings")
    if settings:
        notes.append("- gopd ran with " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return "\n".join([f"### {s.op}, N={s.n} D={s.d} V={s.v} {s.dtype}", "", record["description"] + ".", "",
                      markdown_table(headers, rows), *([""] + notes if notes else [])])  # fmt: skip


def _series(records: list[dict], key: str) -> dict[tuple, list[dict]]:
    """Records grouped by every spec field but `key` (n, v or d), for the groups that vary it."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        s = rec["spec"]
        group = tuple((k, s[k]) for k in ("op", "dtype", "n", "d", "v") if k != key)
        groups.setdefault(group, []).append(rec)
    return {g: sorted(rs, key=lambda r: r["spec"][key]) for g, rs in groups.items() if len(rs) > 1}


OURS_STYLE = {
    "gopd": {"linewidth": 2.5, "color": "black"},
    "gopd-torch": {"linewidth": 2.5, "color": "black", "linestyle": "--"},
    "gopd-fold": {"linewidth": 2.5, "color": "black", "linestyle": ":"},
    "gopd-recompute": {"linewidth": 2.5, "color": "black", "linestyle": "-."},
    "gopd-entropy": {"linewidth": 1.5, "color": "black", "linestyle": "--"},
}


def _failed_at(records: list[dict], name: str, key: str) -> list[str]:
    """The values of `key` at which implementation `name` failed (out of memory, say): where
    its line in a plot stops short."""
    failed = lambda r: r["impls"].get(name, {}).get("skipped", "").startswith("failed")
    return [str(r["spec"][key]) for r in records if failed(r)]


def plot(records: list[dict], folder: Path) -> list[Path]:
    """Time and peak memory against N (and against V, D), log scales, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label in (("n", "tokens N"), ("v", "vocabulary V"), ("d", "hidden size D")):
        for group, recs in _series(records, key).items():
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
            impls = dict.fromkeys(name for r in recs for name in r["impls"])
            for name in impls:
                pts = [(r["spec"][key], row) for r in recs for row in summarize(r) if row["impl"] == name]
                if pts:
                    xs = [p for p, _ in pts]
                    style = OURS_STYLE.get(name, {})
                    failed = _failed_at(recs, name, key)
                    legend = name + (f" (failed at {key.upper()} = {', '.join(failed)})" if failed else "")
                    ax_t.plot(xs, [row["time"] for _, row in pts], "o-", label=legend, **style)
                    ax_m.plot(xs, [row["peak"] / 2**20 for _, row in pts], "o-", label=legend, **style)
            for ax, ylabel in ((ax_t, "time per call, s"), (ax_m, "peak memory, MiB")):
                ax.set(xscale="log", yscale="log", xlabel=label, ylabel=ylabel)
                ax.grid(True, which="both", alpha=0.3)
            ax_m.legend()
            fixed = dict(group)
            fig.suptitle(" ".join(f"{k}={v}" for k, v in fixed.items()))
            fig.tight_layout()
            rest = "_".join(f"{k.upper() if k in 'ndv' else ''}{v}" for k, v in fixed.items())
            path = folder / f"{rest}_vs_{key.upper()}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
    return paths


def write_summary(folder: Path) -> Path:
    """results/<machine>/README.md: every saved table, and the plots, regenerated from the JSON."""
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    order = list(bops.OPS)
    records.sort(key=lambda r: (order.index(r["spec"]["op"]), r["spec"]["dtype"], r["spec"]["d"],
                                r["spec"]["v"], r["spec"]["n"]))  # fmt: skip
    plots = plot(records, folder)
    machines = {json.dumps(r["machine"], sort_keys=True) for r in records}
    lines = [f"# Benchmarks on {folder.name}", "", "Written by `python -m benchmarks.report`; each table is "
             "one run, its machine and date in the JSON beside it.", ""]  # fmt: skip
    for m in sorted(machines):
        m = json.loads(m)
        lines.append(f"- {m['gpu'] or m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
                     f"torch {m['torch']}, {m['date']}")  # fmt: skip
    lines += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    for r in records:
        lines += [markdown(r), ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


# --- command line --------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), help="a predefined sweep (else --op, --n, ...)")
    p.add_argument("--op", default=",".join(bops.OPS), help=f"comma-separated, of: {', '.join(bops.OPS)}")
    p.add_argument("--n", type=_ints, default=[2048], help="tokens N, comma-separated")
    p.add_argument("--d", type=_ints, default=[1024], help="hidden size D, comma-separated")
    p.add_argument("--v", type=_ints, default=[V_QWEN], help="vocabulary V, comma-separated")
    p.add_argument("--dtype", default="float32", help="comma-separated: float32, bfloat16, float16")
    p.add_argument("--impls", help="comma-separated subset (naive always runs: it is the reference)")
    p.add_argument("--rounds", type=int, default=2, help="CPU: fresh processes per impl; CUDA: x100 ms")
    p.add_argument("--repeats", type=int, default=1, help="CPU: calls per process (first: memory)")
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        help="CPU: memory each process may map (default: available at the start, less 1 GiB)",
    )
    p.add_argument(
        "--check-at-n",
        action=argparse.BooleanOptionalAction,
        help="also compare every implementation with the float64 reference at the timed shape "
        "(default: on CUDA yes; on CPU no, where it costs several times the naive run)",
    )
    p.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    p.add_argument("--plots-only", action="store_true", help="redraw plots and summary from saved JSON")
    p.add_argument("--results", type=Path, help="results folder (default: results/<this machine>)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--memory-limit", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        op, n, d, v, dtype = args.spec.split(",")
        spec = Spec(op, int(n), int(d), int(v), dtype)
        return child(spec, args.child, args.repeats, Path(args.out), args.memory_limit)

    machine = machine_description()
    folder = args.results or RESULTS_DIR / machine_slug(machine)
    if args.plots_only:
        print(write_summary(folder))
        return
    ops, dtypes = args.op.split(","), args.dtype.split(",")
    for name in ops:
        if name not in bops.OPS:
            raise ValueError(f"--op: unknown op {name!r}; choose from {', '.join(bops.OPS)}")
    for dtype in dtypes:
        if dtype not in CEILING_OF:
            raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(CEILING_OF)}")
    if args.preset:  # --op still filters it
        specs = [s for s in PRESETS[args.preset]() if s.op in ops]
    else:
        specs = _grid(ops, args.n, args.d, args.v, dtypes)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and {"bfloat16", "float16"} & {s.dtype for s in specs}:
        print("note: 16-bit dtypes on CPU time PyTorch's CPU GEMMs, not tensor cores")
    wanted = args.impls.split(",") if args.impls else None
    memory_limit = _memory_limit(args.memory_limit_gib, device)
    check_at_n = device == "cuda" if args.check_at_n is None else args.check_at_n
    ceilings = None
    if device == "cuda":  # the card's own rates, for the "of GEMM peak" column
        from benchmarks.ceilings import measure as measure_ceilings

        ceilings = measure_ceilings()
        print(f"ceilings: {ceilings}", flush=True)
    for spec in specs:
        record = bench_spec(spec, wanted, args.rounds, args.repeats, device, memory_limit, check_at_n)
        record["machine"] = machine
        if ceilings:
            record["ceilings"] = ceilings
        record["method"] = {"rounds": args.rounds, "repeats": args.repeats, "device": device,
                            "commit": measured_commit(), "settings": gopd_settings()}  # fmt: skip
        if memory_limit:
            record["method"]["memory_limit_gib"] = round(memory_limit / 2**30, 1)
        print(markdown(record), "\n", flush=True)
        if not args.no_save:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{spec.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    if not args.no_save:
        print(f"saved under {folder}; summary {write_summary(folder)}")


if __name__ == "__main__":
    main()
