"""benchmarks.update_step's checks and table (the benchmark itself runs for minutes)."""

from __future__ import annotations

import pytest

from benchmarks import update_step


@pytest.mark.parametrize("argv,match", [(["--tokens", "700"], "--tokens"), (["--layers", "0"], "--layers")])
def test_bad_arguments_name_themselves(argv, match):
    with pytest.raises(ValueError, match=match):
        update_step.main([*argv, "--no-save"])


def runs(gopd_loss: float) -> dict:
    return {
        "naive": {"peak_bytes": [4 << 30], "times_s": [12.0, 12.4], "loss": -10.0, "grad_norm": 17.8},
        "gopd": {"peak_bytes": [2 << 30], "times_s": [10.0, 10.4], "loss": gopd_loss, "grad_norm": 17.8},
    }


def test_an_implementation_that_disagrees_with_naive_is_flagged():
    agree, disagree = runs(-10.0 * (1 + 1e-6)), runs(-10.1)
    update_step.check_agreement(agree)
    update_step.check_agreement(disagree)
    assert agree["gopd"]["agrees"] and not disagree["gopd"]["agrees"]
    assert "DISAGREES" not in update_step.table({"runs": agree})
    text = update_step.table({"runs": disagree})
    assert "gopd (DISAGREES with naive)" in text and "| 0.50x |" in text  # memory / naive


def test_a_failed_implementation_is_a_row_that_says_why():
    record = {"runs": {"naive": {"skipped": "failed: out of memory"}, **{"gopd": runs(-10.0)["gopd"]}}}
    update_step.check_agreement(record["runs"])
    text = update_step.table(record)
    assert "failed: out of memory" in text and "| - |" in text


def test_the_cuda_path_runs_with_stand_ins_for_the_cuda_calls(monkeypatch):
    """measure_cuda's logic (never run on a GPU yet) on the CPU: the CUDA calls are stand-ins."""
    import torch

    for name, fn in dict(synchronize=lambda: None, reset_peak_memory_stats=lambda: None,
                         memory_allocated=lambda: 0, max_memory_allocated=lambda: 5 << 20,
                         empty_cache=lambda: None).items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, fn)
    on_cpu = update_step.prepared
    monkeypatch.setattr(
        update_step,
        "prepared",
        lambda n, layers, dtype, device, frozen: on_cpu(n, layers, dtype, "cpu", frozen),
    )

    def times_ms(fn):  # do_bench's stand-in: runs the step once, 5 ms (each step is ~2 s here)
        return [(fn(), 5.0)[1]]

    monkeypatch.setattr(update_step, "cuda_times_ms", times_ms)
    found = update_step.measure_cuda(512, 1, "float32", True)  # with a frozen head
    update_step.check_agreement(found)
    assert found["gopd"]["agrees"] and found["naive"]["peak_bytes"] == [5 << 20]
    assert found["gopd"]["times_s"] == [0.005]  # milliseconds from cuda_times_ms, kept in seconds
    assert "gopd" in update_step.table({"runs": found})
