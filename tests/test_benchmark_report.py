"""The benchmark report's arithmetic (medians, ratios to naive and to the best peer), its
grouping for plots, and the float64 check every implementation passes before it is timed."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

from benchmarks import common, report
from benchmarks import ops as bops
from benchmarks.common import ChildFailed
from benchmarks.report import _series, markdown, summarize


def record(impls: dict) -> dict:
    return {
        "spec": {"op": "token_logprobs", "n": 8, "d": 4, "v": 16, "dtype": "float32"},
        "description": "test",
        "flops": 6e12,
        "impls": impls,
    }


def timed(times, peak, check=1e-7, vs_naive=0.0):
    return {"times_s": times, "peak_bytes": [peak], "check_vs_float64": {"out": check},
            "vs_naive": {"out": vs_naive}}  # fmt: skip


def test_ratios_are_to_naive_and_to_the_best_peer_excluding_ours():
    rec = record({
        "naive": timed([4.0, 2.0, 3.0], 1000),
        "torch-compile": timed([2.0], 400),
        "gopd": timed([1.0, 1.0], 100),
        "gopd-torch": timed([0.5], 50),  # ours too: not a peer
        "liger": {"description": "x", "skipped": "needs CUDA"},
    })  # fmt: skip
    rows = {r["impl"]: r for r in summarize(rec)}
    assert set(rows) == {"naive", "torch-compile", "gopd", "gopd-torch"}  # skipped ones are not rows
    assert rows["naive"]["time"] == 3.0 and rows["naive"]["lo"] == 2.0 and rows["naive"]["hi"] == 4.0
    assert rows["gopd"]["t_naive"] == pytest.approx(1 / 3)
    assert rows["gopd"]["t_peer"] == pytest.approx(0.5)  # best peer: torch-compile, 2 s
    assert rows["gopd"]["m_peer"] == pytest.approx(0.25) and rows["gopd"]["m_naive"] == pytest.approx(0.1)
    assert rows["torch-compile"]["t_peer"] == 1.0 and rows["naive"]["t_peer"] == pytest.approx(1.5)
    assert rows["gopd"]["tflops"] == pytest.approx(6.0)
    table = markdown(rec)
    assert "- liger: not run, needs CUDA" in table and "| gopd | 1 s (1 s-1 s) | 0.33x | 0.50x |" in table


def test_cuda_records_set_tflops_against_the_measured_gemm_rate():
    rec = record({"naive": timed([3.0], 1000), "gopd": timed([1.0], 100)})
    assert all(r["of_peak"] is None for r in summarize(rec))  # CPU: no ceilings, no column
    assert "GEMM peak" not in markdown(rec)
    rec["ceilings"] = {"fp32_gemm_TFLOP_per_s": 12.0, "bf16_gemm_TFLOP_per_s": 600.0}
    rows = {r["impl"]: r for r in summarize(rec)}
    assert rows["gopd"]["of_peak"] == pytest.approx(0.5)  # 6 TFLOP/s of fp32's 12
    rec["spec"]["dtype"] = "bfloat16"
    assert {r["impl"]: r for r in summarize(rec)}["gopd"]["of_peak"] == pytest.approx(0.01)
    assert "| of GEMM peak |" in markdown(rec) and "| 1% |" in markdown(rec)
    rec["spec"]["dtype"] = "float16"  # against its own rate, not bf16's
    rec["ceilings"]["fp16_gemm_TFLOP_per_s"] = 300.0
    assert {r["impl"]: r for r in summarize(rec)}["gopd"]["of_peak"] == pytest.approx(0.02)


def test_kept_gradients_hold_a_16_bit_row_to_its_own_dtype():
    """A dH row under fp16's smallest normal, rounded to fp16 as well as fp16 can, counts as
    exact; an fp32 copy of it (what the report kept until the H100's fp16 run, where such a
    row read 0.35 for every implementation) would not be."""
    exact = torch.full((2, 64), 1e-3, dtype=torch.float64)
    exact[1] = torch.linspace(-2e-7, 2e-7, 64, dtype=torch.float64)  # a token whose upstream is ~1e-6
    got = (torch.zeros(3), exact.half(), None)
    op = bops.OPS["token_logprobs_frozen_head"]  # out and dH
    kept = report._keep(got)
    assert kept["dh"].dtype == torch.float16
    assert bops.errors(op, tuple(kept.values()), (torch.zeros(3), exact), by_row=True)["dh"] < 1e-3
    fp32_copy = (torch.zeros(3), exact.half().float())
    assert bops.errors(op, fp32_copy, (torch.zeros(3), exact), by_row=True)["dh"] > 0.1


def test_series_group_the_records_that_vary_one_field():
    def rec(n, d, v):
        return {"spec": {"op": "token_logprobs", "n": n, "d": d, "v": v, "dtype": "float32"}}

    recs = [rec(2048, 4096, 7), rec(1024, 1024, 7), rec(2048, 512, 7), rec(2048, 1024, 7), rec(1024, 1024, 5)]
    by_d = _series(recs, "d")
    assert list(by_d) == [(("op", "token_logprobs"), ("dtype", "float32"), ("n", 2048), ("v", 7))]
    assert [r["spec"]["d"] for r in next(iter(by_d.values()))] == [512, 1024, 4096]  # sorted by D
    assert [r["spec"]["n"] for r in _series(recs, "n")[(("op", "token_logprobs"), ("dtype", "float32"),
                                                       ("d", 1024), ("v", 7))]] == [1024, 2048]  # fmt: skip
    assert [r["spec"]["v"] for r in next(iter(_series(recs, "v").values()))] == [5, 7]


def test_float64_check_passes_gopd_and_catches_a_wrong_implementation():
    op = bops.OPS["token_logprobs"]
    small = bops.make_inputs(op, 5, 8, 31, torch.float32, "cpu", seed=1)
    weight = small["weight"].clone()
    want = bops.float64_reference(op, small)
    assert want[0].dtype == want[1].dtype == want[2].dtype == torch.float64
    assert torch.equal(small["weight"], weight) and small["weight"].grad is None  # inputs untouched
    assert max(bops.float64_errors(op, op.impls["gopd"], small, want).values()) < 1e-5
    off = bops.Impl("1% off", lambda x: 1.01 * op.impls["naive"].run(x))
    assert bops.float64_errors(op, off, small, want)["out"] > 5e-3


@pytest.mark.parametrize("op_name", list(bops.OPS))
def test_float64_reference_in_row_slices_is_the_whole_reference(op_name):
    """The timed-shape reference runs naive a slice of rows at a time: joined outputs and dH,
    summed dW, and for a token-mean loss each slice weighted by its share of the rows."""
    op = bops.OPS[op_name]
    x = bops.make_inputs(op, 7, 8, 13, torch.float32, "cpu", seed=3)
    whole, sliced = bops.float64_reference(op, x), bops.float64_reference(op, x, rows=3)
    for a, b in zip(whole, sliced, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_the_check_at_the_timed_shape_gives_each_implementation_its_error(monkeypatch):
    """--check-at-n: every timed implementation's result at the timed shape against the float64
    reference on the same inputs. An implementation 3e-5 off passes the small check (fp32
    tolerance 1e-4) and the new column shows it, where naive's fp32 is ~1e-7 off."""
    op = bops.OPS["token_logprobs"]
    drift = bops.Impl("3e-5 off", lambda x: (1 + 3e-5) * op.impls["naive"].run(x))
    monkeypatch.setitem(op.impls, "drift", drift)
    spec = report.Spec("token_logprobs", 9, 8, 31, "float32")

    def measure(spec, names, rounds, repeats, memory_limit):  # the children's results, in-process
        x = report.timed_inputs(spec, "cpu")
        run = lambda name: bops.run_impl(op, op.impls[name], bops.with_leaves(x, op))  # noqa: E731
        kept = {name: report._keep(run(name)) for name in names}
        return {name: {"peak_bytes": [1], "times_s": [1.0], "warmup_s": [0.0]} for name in names}, kept

    monkeypatch.setattr(report, "measure_cpu", measure)
    rec = report.bench_spec(spec, ["naive", "gopd", "drift"], 1, 1, "cpu", check_at_n=True)
    at_n = {name: max(e["worst_row_vs_float64_at_n"].values()) for name, e in rec["impls"].items()}
    assert at_n["naive"] < 1e-6 and at_n["gopd"] < 1e-5
    assert 2e-5 < at_n["drift"] < 4e-5
    table = markdown(rec)
    assert "| float64 at N=67 | float64 at N=9, worst row | vs naive |" in table and "| 3e-05 |" in table
    plain = report.bench_spec(spec, ["naive", "drift"], rounds=1, repeats=1, device="cpu")
    assert "worst_row_vs_float64_at_n" not in plain["impls"]["naive"]
    assert "float64 at N=9" not in markdown(plain)


def test_a_failed_reference_at_the_timed_shape_keeps_the_timed_runs(monkeypatch):
    """The check at N is extra: when its float64 reference fails (out of memory on a smaller
    card, say), the record keeps the timings and says why the column is missing."""
    spec = report.Spec("token_logprobs", 9, 8, 31, "float32")

    def measure(spec, names, *args):
        timed = {n: {"peak_bytes": [1], "times_s": [1.0], "warmup_s": [0.0]} for n in names}
        return timed, {n: {"out": torch.zeros(9)} for n in names}

    real = bops.float64_reference

    def reference(op, x, rows=None):  # the 67-token check passes; the one at N runs out of memory
        if rows is not None:
            raise MemoryError("oom")
        return real(op, x)

    monkeypatch.setattr(report, "measure_cpu", measure)
    monkeypatch.setattr(bops, "float64_reference", reference)
    rec = report.bench_spec(spec, ["naive", "gopd"], 1, 1, "cpu", check_at_n=True)
    assert rec["float64_at_n_failed"] == "MemoryError: oom" and "times_s" in rec["impls"]["gopd"]
    assert "- the float64 reference at N=9 failed: MemoryError: oom" in markdown(rec)


def test_worst_row_error_sees_what_the_largest_entry_hides():
    """A dW whose sampled rows dwarf the rest: 1 % off on every small row is 1e-4 of the largest
    entry, and 1e-2 of each small row."""
    op = bops.OPS["token_logprobs"]
    want = torch.full((6, 4), 1e-2, dtype=torch.float64)
    want[0] = 1.0
    got = want.clone()
    got[1:] *= 1.01
    out = torch.ones(3)
    by_max = bops.errors(op, (out, want, got), (out, want, want))
    by_row = bops.errors(op, (out, want, got), (out, want, want), by_row=True)
    assert by_max["dw"] == pytest.approx(1e-4) and by_row["dw"] == pytest.approx(1e-2)
    assert by_row["dh"] == 0.0 and by_row["out"] == 0.0


def test_commit_is_dirty_for_code_changes_not_for_the_reports_own_results(tmp_path, monkeypatch):
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "ops.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "benchmarks" / "results")
    monkeypatch.delenv("GOPD_COMMIT", raising=False)
    (tmp_path / "benchmarks" / "results" / "new.json").write_text("{}")
    assert not common.measured_commit().endswith("+dirty")
    (tmp_path / "ops.py").write_text("x = 2\n")
    assert common.measured_commit().endswith("+dirty")
    monkeypatch.setenv("GOPD_COMMIT", "abc1234")  # the device machine's copy: told, not read
    assert common.measured_commit() == "abc1234"


def test_child_warms_up_every_implementation_before_it_resets_the_peak(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(common, "reset_peak_rss", lambda: events.append("reset") or 0)  # timed_calls' own
    monkeypatch.setattr(common, "peak_rss_bytes", lambda: 123)
    real_run = bops.run_impl
    run = lambda op, impl, x: events.append(x["h"].shape[0]) or real_run(op, impl, x)
    monkeypatch.setattr(bops, "run_impl", run)
    spec = report.Spec("token_logprobs", 5, 8, 31, "float32")
    report.child(spec, "naive", repeats=2, out_file=tmp_path / "r.json")  # eager: once measured cold
    assert events == [*report.WARMUP_NS, "reset", 5, 5]
    assert '"peak_bytes": 123' in (tmp_path / "r.json").read_text()


def test_a_peer_failing_at_the_timed_shape_is_recorded_as_skipped(monkeypatch):
    """A peer can pass the small float64 check and fail at the timed shape (Liger's chunked
    GRPO loss under torch 2.11's dynamo at N = 16384 did): the record keeps the others."""
    spec = report.Spec("token_logprobs", 8, 8, 31, "float32")

    def measure(spec, names, rounds, repeats, memory_limit):
        runs = {name: {"peak_bytes": [1], "times_s": [1.0], "warmup_s": [0.0]} for name in names}
        runs["gopd"] = {"skipped": "failed at this shape: RuntimeError: boom"}
        kept = {name: {"out": torch.zeros(8)} for name in names if name != "gopd"}
        return runs, kept

    monkeypatch.setattr(report, "measure_cpu", measure)
    rec = report.bench_spec(spec, ["naive", "gopd"], rounds=1, repeats=1, device="cpu")
    assert rec["impls"]["gopd"]["skipped"].endswith("boom") and "vs_naive" not in rec["impls"]["gopd"]
    assert "vs_naive" in rec["impls"]["naive"]
    assert [r["impl"] for r in summarize(rec)] == ["naive"]
    assert "- gopd: not run, failed at this shape" in markdown(rec)


def test_records_say_which_gopd_settings_ran(monkeypatch):
    """A report run under GOPD_* settings (a workspace, a GEMM runner) says so in its JSON and
    its table; the commit override is not a setting."""
    for k in [k for k in os.environ if k.startswith("GOPD_")]:
        monkeypatch.delenv(k)
    assert report.gopd_settings() == {}
    monkeypatch.setenv("GOPD_LOGITS_GEMM", "torch")
    monkeypatch.setenv("GOPD_WORKSPACE_MB", "600")
    monkeypatch.setenv("GOPD_COMMIT", "abc1234")
    settings = report.gopd_settings()
    assert settings == {"GOPD_LOGITS_GEMM": "torch", "GOPD_WORKSPACE_MB": "600"}
    rec = {"spec": {"op": "token_logprobs", "n": 8, "d": 8, "v": 31, "dtype": "float32"}, "description": "x",
           "flops": 1, "impls": {}, "method": {"settings": settings}}  # fmt: skip
    monkeypatch.setattr(report, "summarize", lambda record: [])
    assert "- gopd ran with GOPD_LOGITS_GEMM=torch, GOPD_WORKSPACE_MB=600" in markdown(rec)


def test_an_implementations_settings_hold_for_its_forward_and_backward_only(monkeypatch):
    """gopd-fused sets GOPD_LOGITS_GEMM and GOPD_BACKWARD_GEMM around its own forward and
    backward (where the kernels read them) and leaves the environment as it found it."""
    monkeypatch.setenv("GOPD_BACKWARD_GEMM", "torch")
    monkeypatch.delenv("GOPD_LOGITS_GEMM", raising=False)
    op = bops.OPS["token_logprobs"]
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            seen.append(("forward", os.environ.get("GOPD_LOGITS_GEMM"), os.environ["GOPD_BACKWARD_GEMM"]))
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(("backward", os.environ.get("GOPD_LOGITS_GEMM"), os.environ["GOPD_BACKWARD_GEMM"]))
            return g

    fused = op.impls["gopd-fused"]
    assert fused.env == {"GOPD_LOGITS_GEMM": "triton", "GOPD_BACKWARD_GEMM": "triton"}
    probe = bops.Impl("probe", lambda x: Probe.apply(x["h"].sum(dim=1)), env=fused.env)
    x = bops.make_inputs(op, 3, 4, 7, torch.float32, "cpu")
    bops.run_impl(op, probe, bops.with_leaves(x, op))
    assert seen == [("forward", "triton", "triton"), ("backward", "triton", "triton")]
    assert "GOPD_LOGITS_GEMM" not in os.environ and os.environ["GOPD_BACKWARD_GEMM"] == "torch"


def test_liger_compiles_static_shapes_on_cuda_only():
    """The workaround for Liger's dynamic-shape recompile failure on the H100 applies to CUDA
    runs, and CPU runs keep torch's default (their warm-up makes the graph dynamic)."""
    default = torch._dynamo.config.automatic_dynamic_shapes
    with bops._static_shapes({"device": "cuda"}):
        assert torch._dynamo.config.automatic_dynamic_shapes is False
    with bops._static_shapes({"device": "cpu"}):
        assert torch._dynamo.config.automatic_dynamic_shapes is default
    assert torch._dynamo.config.automatic_dynamic_shapes is default


def test_an_implementation_too_big_for_the_memory_limit_fails_in_its_child_and_is_not_run_again():
    """CPU children map at most memory_limit bytes: naive's [N, V] logits (1.2 GB here) fail on
    the allocation under 1 GiB, with torch's message, and the run goes on with gopd."""
    spec = report.Spec("token_logprobs", 2048, 64, 151936, "float32")
    rec = report.bench_spec(spec, ["naive", "gopd"], rounds=2, repeats=1, device="cpu", memory_limit=1 << 30)
    naive, gopd = rec["impls"]["naive"], rec["impls"]["gopd"]
    assert "can't allocate memory" in naive["skipped"] and "times_s" not in naive
    assert len(gopd["times_s"]) == 2 and "vs_naive" not in gopd  # two rounds; nothing to compare with
    (row,) = summarize(rec)
    assert row["impl"] == "gopd" and row["t_naive"] is None and row["err"] is None
    table = markdown(rec)
    assert "- naive: not run, failed at this shape: RuntimeError:" in table
    (gopd_row,) = [line for line in table.splitlines() if line.startswith("| gopd |")]
    cells = [c.strip() for c in gopd_row.strip("|").split("|")]
    # no naive and no peer: ratios to naive and to the best peer, and the comparison with naive
    assert [cells[i] for i in (2, 3, 6, 7, 9)] == ["-"] * 5 and cells[5].isdigit()  # peak MiB measured


def test_a_killed_child_says_so():
    e = ChildFailed(["--child", "naive"], -9, "")
    assert e.reason == "killed by signal 9 (out of memory?)"
    assert ChildFailed([], 1, "Traceback ...\n  ...\nValueError: bad\n\n").reason == "ValueError: bad"


def test_plots_name_the_shapes_where_an_implementation_failed():
    def rec(n, naive):
        return {"spec": {"op": "token_logprobs", "n": n, "d": 8, "v": 31, "dtype": "float32"},
                "impls": {"naive": naive, "liger": {"skipped": "needs CUDA"}}}  # fmt: skip

    recs = [rec(8, timed([1.0], 1)), rec(16, {"skipped": "failed at this shape: out of memory"})]
    assert report._failed_at(recs, "naive", "n") == ["16"]
    assert report._failed_at(recs, "liger", "n") == []  # never ran here: not a failure at a shape


def test_memory_limit_setting_is_checked_and_refused_on_cuda():
    assert report._memory_limit(2, "cpu") == 2 << 30
    assert 0 < report._memory_limit(None, "cpu") == pytest.approx(report.cpu_memory_limit(), rel=0.05)
    assert report._memory_limit(None, "cuda") is None
    for gib, device in ((0, "cpu"), (-1.5, "cpu"), (4, "cuda")):
        with pytest.raises(ValueError, match="--memory-limit-gib"):
            report._memory_limit(gib, device)
