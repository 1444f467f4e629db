"""Measurement plumbing shared by the benchmarks: machine facts, fresh-process runs, tables."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIN_CUDA_CALLS = 10  # CUDA: timed calls per measurement, at least


def machine_description() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    desc = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return desc


def machine_slug(desc: dict) -> str:
    """Folder name for a machine's results: the GPU's name, else the CPU's and its core count."""
    name = desc["gpu"] or f"cpu {desc['cpu']} {desc['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def measured_commit() -> str:
    """The gopd commit measured, with '+dirty' when the work tree has changes other than the
    results the benchmarks themselves write; GOPD_COMMIT when set (a copy of the tree whose
    .git is not the checkout's, as on the device machine)."""
    if os.environ.get("GOPD_COMMIT"):
        return os.environ["GOPD_COMMIT"]

    run = lambda *a: subprocess.run(  # noqa: E731
        ["git", *a], capture_output=True, text=True, cwd=RESULTS_DIR.parent.parent
    ).stdout.strip()
    changes = run("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return run("rev-parse", "--short", "HEAD") + ("+dirty" if changes else "")


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS (Linux clear_refs); returns it in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset_peak_rss (or the process's start)."""
    return _proc_status_kib("VmHWM") * 1024


def timed_calls(fn, repeats: int, keep=lambda result: result) -> tuple[list[float], int, object]:
    """fn() `repeats` times in this process: (the wall time of each call, the peak RSS of the
    first call above the RSS before it, keep(the first call's result)). Each result is let go
    before the next call, so that two never coexist."""
    times, peak, kept = [], 0, None
    base = reset_peak_rss()
    for i in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak, kept = peak_rss_bytes() - base, keep(result)
        del result
    return times, peak, kept


class ChildFailed(RuntimeError):
    """A child process that exited with an error, or was killed; `reason` says why in one line."""

    def __init__(self, args: list[str], returncode: int, stderr: str):
        if returncode < 0:  # SIGKILL is what the kernel's OOM killer sends
            oom = " (out of memory?)" if returncode == -9 else ""
            self.reason = f"killed by signal {-returncode}{oom}"
        else:
            lines = [line for line in stderr.splitlines() if line.strip()]
            self.reason = lines[-1].strip() if lines else f"exit status {returncode}"
        super().__init__(f"child {args} failed: {self.reason}\n{stderr[-4000:]}")


def run_child(
    module: str, args: list[str], env: dict | None = None, timeout: float = 3600
) -> tuple[dict, dict]:
    """Run `python -m module ... --out FILE` in a fresh process.

    Returns its JSON result and the tensors it saved beside it (FILE with suffix .pt), if any;
    raises ChildFailed if it fails.
    """
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run(
            [sys.executable, "-m", module, *args, "--out", str(out)],
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise ChildFailed(args, proc.returncode, proc.stderr)
        tensors = out.with_suffix(".pt")
        return json.loads(out.read_text()), (torch.load(tensors) if tensors.exists() else {})


def child_rounds(module: str, names: list[str], rounds: int, args_for, env: dict | None = None):
    """Each name's child (`python -m module *args_for(name)`, see run_child) once a round, the
    rounds interleaving the names so that a drift in a shared machine's speed favours none.
    Yields (round, name, result, tensors); a child that fails yields its ChildFailed as the
    result and is not run again. Each finished child is printed as a line."""
    failed = set()
    for r in range(rounds):
        for name in names:
            if name in failed:
                continue
            try:
                res, tensors = run_child(module, args_for(name), env)
            except ChildFailed as e:
                failed.add(name)
                print(f"    round {r + 1} {name:14s} failed at this shape: {e.reason}", flush=True)
                yield r, name, e, None
                continue
            times = " ".join(f"{t:.2f}" for t in res["times_s"])
            print(
                f"    round {r + 1} {name:14s} +{res['peak_bytes'] / 2**20:7.0f} MiB  {times} s", flush=True
            )
            yield r, name, res, tensors


def child_runs(module: str, names: list[str], rounds: int, shape: list[str], env: dict, keep: tuple) -> dict:
    """{name: run} from each name's child, `python -m module --child NAME *shape`, over the
    rounds (child_rounds): the peak bytes and times of every round, and the `keep` fields of
    the last; a child that failed is {"skipped": "failed: <why>"}."""
    runs = {name: {"peak_bytes": [], "times_s": []} for name in names}
    for _, name, res, _ in child_rounds(module, names, rounds, lambda n: ["--child", n, *shape], env):
        if isinstance(res, ChildFailed):
            runs[name] = {"skipped": f"failed: {res.reason}"}
            continue
        runs[name]["peak_bytes"].append(res["peak_bytes"])
        runs[name]["times_s"] += res["times_s"]
        runs[name] |= {k: res[k] for k in keep}
    return runs


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cuda_peak_bytes(fn) -> tuple[object, int]:
    """(fn(), the most CUDA memory allocated during the call above what was allocated before it)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - base


def cuda_times_ms(fn, min_rep_ms: float = 200.0) -> list[float]:
    """Milliseconds per call of fn, from triton.testing.do_bench (CUDA events, after its warm-up),
    over at least MIN_CUDA_CALLS calls: its `rep` is a time budget, and a 150 ms call in the
    200 ms default was timed once."""
    import torch
    from triton.testing import do_bench

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    call_ms = (time.perf_counter() - t0) * 1e3
    return do_bench(fn, rep=max(min_rep_ms, MIN_CUDA_CALLS * call_ms), return_mode="all")
