"""Every Triton kernel compiles for sm_80 and sm_90, every path training runs in bf16 for
sm_100 and sm_120 too, and in bf16 and fp32 for AMD's gfx942 (MI300X), uses
tensor-core MMA (or AMD's MFMA; the row passes of the folded loss, which have no dot,
excepted) and fits shared memory, and every path training runs keeps a launch config that
does not spill registers.

Runs `python -m gopd_kernels.aot` in a child process without TRITON_INTERPRET (which
would replace the kernels by interpreted functions), at every launch config the runtime
pruning can pick for each dtype and target. The fast tests below check the pieces the
report rests on: Triton's argument specialisation and the cuobjdump parsing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import warnings
from collections import Counter

import pytest

from gopd_kernels import aot

# each target's tensor-core instruction in PTX: Ampere's and the 99 KiB parts' mma.sync,
# Hopper's wgmma, datacenter Blackwell's tcgen05; AMD's MFMA in its ISA listing
PTX_MMA = {
    80: "mma.sync", 89: "mma.sync", 120: "mma.sync", 90: "wgmma", 100: "tcgen05.mma",
    "gfx90a": "v_mfma_", "gfx942": "v_mfma_", "gfx950": "v_mfma_",
}  # fmt: skip


@pytest.mark.parametrize("value", [1, 2, 16, 17, 4096, 151936, 16383, 2**31 - 16, 2**33])
def test_int_specialization_is_the_jits(value):
    """The AOT compile must see integers as a real launch does, or its register counts lie."""
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    jit_type, jit_key = native(BaseBackend, value, False, True, True)
    ours, div16 = aot.int_specialization(value)
    assert ours == jit_type
    if jit_type != "constexpr":
        assert div16 == (jit_key == "D")


def test_every_integer_argument_has_a_launch_value():
    import importlib

    for v in aot.kernel_variants():
        kernel = getattr(importlib.import_module(v.module), v.kernel)
        cfg = getattr(importlib.import_module(v.module), v.configs)[0]
        fixed = {**v.constexprs, **cfg.kwargs, **v.pointers, **dict.fromkeys(v.floats)}
        for name in kernel.arg_names:
            if name not in fixed:
                aot.launch_int(name, dict(v.ints))  # KeyError names the argument
    with pytest.raises(KeyError, match="n_experts"):
        aot.launch_int("n_experts", {})


def test_launch_shape_slice_is_the_backwards():
    import torch

    from gopd_kernels.ops.linear_logsoftmax_triton import backward_tiles

    for dtype in (torch.bfloat16, torch.float32):  # a workspace of the head's size
        ws = aot.VOCAB * aot.HIDDEN * dtype.itemsize
        assert backward_tiles(aot.TOKENS, aot.VOCAB, aot.HIDDEN, dtype, ws) == (aot.TOKENS, aot.SLICE)


def test_launch_shape_fold_chunk_is_the_folds():
    from gopd_kernels.ops.folded_loss_torch import FOLD_ROWS

    assert aot.FOLD_CHUNK == FOLD_ROWS["triton"]


RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function logits_grad_kernel:
  REG:255 STACK:240 SHARED:1024 LOCAL:0 CONSTANT[0]:656 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
SASS = """
        /*0a50*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0a60*/                   STL.64 [R1+0x10], R24 ;
        /*0a70*/                   STL [R1+0x18], R26 ;
        /*0a80*/                   LDL.LU R27, [R1+0x18] ;
        /*0a90*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0aa0*/                   FFMA R3, R2, R4, R3 ;
"""


def test_parse_sass_usage_counts_spills_and_tensor_core_instructions():
    got = aot.parse_sass_usage(RES_USAGE, SASS, 90)
    assert got == {"registers": 255, "stack": 240, "spill_stores": 2, "spill_loads": 1, "sass_mma": 2}
    assert aot.parse_sass_usage(RES_USAGE, SASS, 80)["sass_mma"] == 0  # HGMMA is not sm_80's HMMA
    with pytest.raises(ValueError, match="REG:"):
        aot.parse_sass_usage("no usage here", SASS, 90)


def test_the_listing_is_skipped_only_where_no_spill_can_be():
    """Spills go to local memory (a stack frame): without one the SASS listing need not be read
    to know there are none. With one, counting them needs the listing."""
    assert aot.local_memory(RES_USAGE)
    no_frame = RES_USAGE.replace("STACK:240", "STACK:0")
    assert not aot.local_memory(no_frame)
    assert aot.local_memory(no_frame.replace("LOCAL:0", "LOCAL:8"))
    got = aot.parse_sass_usage(no_frame, None, 90)
    assert got == {"registers": 255, "stack": 0, "spill_stores": 0, "spill_loads": 0, "sass_mma": -1}
    with pytest.raises(ValueError, match="needs its SASS listing"):
        aot.parse_sass_usage(RES_USAGE, None, 90)


AMD_ISA = """
	v_mfma_f32_32x32x8_bf16 v[0:15], v[18:19], v[30:31], 0
	scratch_store_dwordx2 off, v[2:3], s0 offset:16
	v_mfma_f32_32x32x8_bf16 v[0:15], v[24:25], v[32:33], v[0:15]
; TotalNumVgprs: 256
; ScratchSize: 224
    .sgpr_spill_count: 39
    .vgpr_spill_count: 55
"""


def test_amd_usage_reads_registers_spills_and_mfma_off_the_isa_listing():
    got = aot.amd_usage(AMD_ISA)
    assert got == {"registers": 256, "stack": 224, "spill_stores": 55, "spill_loads": -1, "sass_mma": 2}
    with pytest.raises(ValueError, match="vgpr_spill_count"):
        aot.amd_usage(AMD_ISA.replace(".vgpr_spill_count", ".other"))
    with pytest.raises(ValueError, match="TotalNumVgprs"):
        aot.amd_usage("v_mfma_f32_32x32x8_bf16")


def test_hot_paths_that_spill_needs_one_spill_free_config_per_path():
    def result(spills, dtype="bfloat16", hot=True, features="-"):
        return aot.AotResult("k", dtype, features, hot, "", 90, "", 0, 1, [], True, spill_stores=spills)

    assert aot.hot_paths_that_spill([result(3), result(0)]) == []
    assert aot.hot_paths_that_spill([result(3), result(1)]) == ["k [-] bfloat16 sm_90"]
    assert aot.hot_paths_that_spill([result(3, hot=False)]) == []
    assert aot.hot_paths_that_spill([result(3, dtype="float32")]) == []
    assert aot.hot_paths_that_spill([result(3, dtype="float32")], ("float32",)) == ["k [-] float32 sm_90"]


RECORD = os.path.join(os.path.dirname(__file__), "aot_record.json")


@pytest.fixture(scope="module")
def aot_report() -> dict:
    """The default run's report. Jobs under a key in RECORD take its figures (but for
    aot.CHECKED of them, compiled again and compared), the others compile; GOPD_AOT_FULL=1
    compiles them all (~13 min cold on a 2-core CPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    reuse = [] if os.environ.get("GOPD_AOT_FULL") == "1" else ["--reuse-record", RECORD]
    proc = subprocess.run(
        [sys.executable, "-m", "gopd_kernels.aot", "--json", *reuse],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.stdout, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    fresh = sum(r["source"] == "compiled" for r in report["results"])
    if reuse and fresh:
        warnings.warn(
            f"{fresh} of {len(report['results'])} AOT jobs are not in {RECORD} and compiled (~2 s each): "
            f"update it with python -m gopd_kernels.aot --reuse-record {RECORD} --write-record {RECORD}",
            stacklevel=1,
        )
    return report


def test_the_reuse_plan_compiles_every_unrecorded_job_and_checks_a_spread_of_recorded_ones():
    keys = [f"k{i}" for i in range(30)]
    record = dict.fromkeys(keys[:25])
    to_compile, to_check = aot.reuse_plan(keys, record, 12)
    assert to_check == list(range(0, 25, 3))  # every third of the 25 recorded: 9 <= 12
    assert to_compile == sorted(to_check + list(range(25, 30)))
    assert aot.reuse_plan(keys, record, 100)[1] == list(range(25))
    assert aot.reuse_plan(keys, dict.fromkeys(keys[:1]), 12) == ([0, *range(1, 30)], [0])
    assert aot.reuse_plan(keys, record, 0) == (list(range(25, 30)), [])


def test_a_recorded_job_compiled_again_to_other_figures_fails(monkeypatch):
    """check_all's reuse, with stand-ins for the compile (a thread pool runs them) and the keys."""
    from concurrent.futures import ThreadPoolExecutor

    todo = aot.todo_jobs()[:4]
    real = dict(shared=1024, mma=["mma.sync.x"], registers=96, stack=0, spill_stores=0, spill_loads=0,
                sass_mma=-1)  # fmt: skip
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(aot, "todo_jobs", lambda *args: todo)
    monkeypatch.setattr(aot, "job_key", lambda job: str(todo.index(job)))
    monkeypatch.setattr(aot, "ProcessPoolExecutor", ThreadPoolExecutor)
    monkeypatch.setattr(aot, "_run", lambda job: aot.job_result(job, dict(real)))
    record = {"0": real, "1": real, "2": dict(real, registers=128)}  # job 3 is not recorded
    results = aot.check_all(record=record, checked=3)
    got = [(r.source, r.ok) for r in results]
    assert got == [("checked", True), ("checked", True), ("checked", False), ("compiled", True)]
    assert "where the record says" in results[2].error
    results = aot.check_all(record=record, checked=1)
    assert [(r.source, r.ok) for r in results] == [("checked", True), ("record", True), ("record", True),
                                                   ("compiled", True)]  # fmt: skip
    assert aot.figures(results[2]) == record["2"]  # the record's figures, as they are


KEYS = """
import json
from gopd_kernels import aot
todo = aot.todo_jobs()
variant, target, index, limit, sass = todo[0]
print(json.dumps({
    "keys": [aot.job_key(job) for job in todo],
    "again": aot.job_key(todo[0]),
    "other_listing": aot.job_key((variant, target, index, limit, "usage" if sass == "full" else "full")),
    "other_limit": aot.job_key((variant, target, index, limit + 1, sass)),
}))
"""


@pytest.mark.aot
def test_job_keys_tell_apart_what_changes_the_machine_code():
    """Triton's cache key of each job (aot.job_key; in a child process: the interpreter's
    kernels have no key): every job of the default run its own, the same again for the same
    job, another for another way of reading its machine code, the same for another limit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", KEYS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(got["keys"])) == len(got["keys"]) == len(aot.todo_jobs())
    assert got["again"] == got["other_limit"] == got["keys"][0] != got["other_listing"]


def test_a_written_record_reads_back_and_a_result_rebuilds_from_it(tmp_path, monkeypatch):
    monkeypatch.setattr(aot, "job_key", lambda job: f"{job[0].kernel} {job[1]} {job[2]}")  # see above
    todo = aot.todo_jobs()[:3]
    fig = lambda i: dict(shared=1024 * i, mma=["mma.sync.x"], registers=90 + i, stack=0, spill_stores=0,
                         spill_loads=0, sass_mma=4)  # fmt: skip
    made = [aot.job_result(job, fig(i)) for i, job in enumerate(todo)]
    made[2] = aot.job_result(todo[2], None, "CompilationError: no")  # a failed compile is not kept
    aot.write_record(str(tmp_path / "r.json"), todo, made)
    record = aot.read_record(str(tmp_path / "r.json"))
    assert record == {aot.job_key(job): aot.figures(r) for job, r in zip(todo[:2], made[:2], strict=True)}
    rebuilt = aot.job_result(todo[1], record[aot.job_key(todo[1])], source="record")
    assert (rebuilt.ok, rebuilt.source, aot.figures(rebuilt)) == (True, "record", aot.figures(made[1]))
    assert aot.read_record(str(tmp_path / "none.json")) == {}


@pytest.mark.aot
@pytest.mark.slow
def test_every_kernel_has_an_aot_variant(aot_report):
    assert aot_report["uncovered"] == []


@pytest.mark.aot
@pytest.mark.slow
def test_all_configs_compile_with_tensor_cores_within_shared_memory(aot_report):
    results = aot_report["results"]
    assert results
    failures = [r for r in results if not r["ok"]]
    assert not failures, failures
    variants, listed = set(), set()  # (variant, target): all, and those whose machine code was read
    for r in results:
        assert r["shared"] <= r["shared_limit"]
        if not r["needs_mma"]:  # the folded loss's row passes: memory-bound, and must not spill
            assert r["kernel"].startswith("row_") and r["spill_stores"] == 0, r
            continue
        assert any(m.startswith(PTX_MMA[r["target"]]) for m in r["mma"]), r
        assert r["sass_mma"] != 0, r  # and the machine code runs on the tensor cores
        variant = (r["kernel"], r["operand_dtype"], r["features"], r["pointers"], r["target"])
        variants.add(variant)
        if r["sass_mma"] > 0:
            listed.add(variant)
    assert variants == listed, variants - listed  # each one's first config at least (aot.jobs)


@pytest.mark.aot
@pytest.mark.slow
def test_recorded_figures_are_those_a_fresh_compile_gives(aot_report):
    """Where the report took figures from the record, some of those jobs compiled again, each to
    the recorded figures (aot.check_all fails a job that differs; the test above sees it too)."""
    sources = Counter(r["source"] for r in aot_report["results"])
    if sources["record"]:
        assert sources["checked"] >= 1
    for r in aot_report["results"]:
        if r["source"] == "checked":
            assert r["ok"] and not r["error"], r


@pytest.mark.aot
@pytest.mark.slow
def test_spills_are_where_the_frame_says(aot_report):
    """The premise of reading the SASS listing only where a config has local memory: among the
    configs whose listing was read (each variant's first, every one with a frame), STL / LDL
    spills appear exactly where cuobjdump reports a stack frame."""
    listed = [r for r in aot_report["results"] if isinstance(r["target"], int) and r["sass_mma"] >= 0]
    assert any(r["stack"] > 0 for r in listed) and any(r["stack"] == 0 for r in listed)
    for r in listed:
        assert (r["stack"] > 0) == (r["spill_stores"] + r["spill_loads"] > 0), r


@pytest.mark.aot
@pytest.mark.slow
def test_hot_paths_keep_a_config_without_register_spills(aot_report):
    results = [aot.AotResult(**r) for r in aot_report["results"]]
    assert any(r.hot for r in results)
    assert aot.hot_paths_that_spill(results) == []


@pytest.mark.aot
@pytest.mark.slow
def test_each_kernel_dtype_and_target_has_configs(aot_report):
    per = Counter((r["kernel"], r["operand_dtype"], r["target"]) for r in aot_report["results"])
    kernels = {k for k, _, _ in per}
    tile_kernels = (
        "vocab_partials_kernel",
        "logits_grad_kernel",
        "dense_kl_partials_kernel",
        "dense_kl_grad_kernel",
    )
    assert {*tile_kernels, "matmul_kernel", "row_log_softmax_kernel", "row_logit_grads_kernel"} <= kernels
    for kernel in tile_kernels:
        for dtype in ("bfloat16", "float16", "float32"):
            for target in aot.TARGETS:
                assert per[(kernel, dtype, target)] >= 1, (kernel, dtype, target)
        for target in aot.HOT_TARGETS:  # the hot paths, in bf16
            assert per[(kernel, "bfloat16", target)] >= 1, (kernel, target)
        for target in aot.AMD_HOT_TARGETS:  # the hot paths, in bf16 and in fp32 (AMD's own fp32 dots)
            for dtype in ("bfloat16", "float32"):
                assert per[(kernel, dtype, target)] >= 1, (kernel, dtype, target)
    fp32_targets = {r["target"] for r in aot_report["results"] if r["operand_dtype"] == "float32"}
    assert fp32_targets == set(aot.TARGETS + aot.AMD_HOT_TARGETS)


@pytest.mark.aot
@pytest.mark.slow
def test_fp32_dots_on_amd_multiply_fp32(aot_report):
    """Triton's HIP backend has no 3xTF32 (NVIDIA's fp32 path): on AMD an fp32 head's dots take
    fp32 MFMA, which multiply fp32 operands as they are (not xf32, not split into bf16)."""
    amd_fp32 = [
        r
        for r in aot_report["results"]
        if r["target"] in aot.AMD_TARGETS and r["operand_dtype"] == "float32" and r["needs_mma"]
    ]
    assert amd_fp32
    for r in amd_fp32:
        assert r["mma"] and all(re.fullmatch(r"v_mfma_f32_\d+x\d+x\d+_?f32", m) for m in r["mma"]), r


def test_targets_name_what_can_be_compiled():
    from gopd_kernels.ops.triton_common import SHARED_MEMORY_LIMIT

    default = aot.TARGETS + aot.HOT_TARGETS + aot.AMD_HOT_TARGETS
    assert set(default) <= set(aot.SASS_MMA_NAME) == set(SHARED_MEMORY_LIMIT)
    assert set(aot.AMD_HOT_TARGETS) <= set(aot.AMD_TARGETS) <= set(aot.SASS_MMA_NAME)
    assert set(aot.SASS_MMA_NAME) <= set(aot.MMA_PATTERN) and set(PTX_MMA) <= set(aot.SASS_MMA_NAME)
    assert aot._targets("86,100") == (86, 100)
    assert aot._targets("gfx942,90") == ("gfx942", 90)
    for bad in ("87", "sm_90", "", "gfx1100"):
        with pytest.raises(argparse.ArgumentTypeError, match="--targets takes some of"):
            aot._targets(bad)


def test_pruning_keeps_configs_for_every_variant_and_target():
    """On every target the runtime pruning keeps a config of each variant by its own estimate,
    never the fallback of the last config (which the AOT run then compiles against the limit)."""
    from gopd_kernels.ops.triton_common import SHARED_MEMORY_LIMIT as LIMIT

    for target in (*aot.TARGETS, *aot.HOT_TARGETS, *aot.AMD_TARGETS):
        for v in aot.kernel_variants():
            assert aot.pruned_configs(v, LIMIT[target], target), (v.kernel, v.operand_dtype, target)
    for v in aot.kernel_variants():  # and 99 KiB keeps fewer of the widest kernels' configs
        if v.kernel in ("vocab_partials_kernel", "matmul_kernel") and v.operand_dtype == "bfloat16":
            for target in (89, 120):
                assert len(aot.pruned_configs(v, LIMIT[target])) < len(aot.pruned_configs(v, LIMIT[90])), (
                    v.kernel
                )


@pytest.mark.aot
def test_the_compile_names_fp_fusion_so_triton_does_not_warn():
    """As the runtime's launches do (triton_common.LAUNCH_OPTIONS): Triton 3.9 warns at the first
    compile of a process where FP fusion is left to its default, which 3.10 turns off."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    code = (
        "from gopd_kernels import aot; "
        "v = next(v for v in aot.kernel_variants() if v.kernel == 'matmul_kernel'); "
        "print(aot.compile_variant(v, 80, 0, sass='none')['mma'])"
    )
    cmd = [sys.executable, "-W", "always", "-c", code]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "mma.sync" in proc.stdout, proc.stderr[-3000:]
    assert "FP_FUSION" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.aot
def test_turing_gets_no_tensor_cores_from_triton():
    """The premise of backend.MIN_TRITON_CAPABILITY (T4, V100 run the torch backend). If this
    fails, Triton has gained a Turing tensor-core path: measure it, then revisit the gate."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "gopd_kernels.aot", "--turing"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["fp16_mma"] == []  # fp16 x fp16 -> fp32, which Turing's tensor cores run
    assert "requires .target sm_80" in got["bf16_dz_fp16_head_backward"]  # bf16 dZ against an fp16 head
