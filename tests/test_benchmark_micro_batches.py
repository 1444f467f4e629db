"""benchmarks.micro_batches: its synthetic step, and one small run of its three layouts."""

from __future__ import annotations

import pytest

from benchmarks import micro_batches


def test_the_step_has_the_lengths_of_a_capped_rl_step():
    ro = micro_batches.step_rollouts(40, 512, pad=0)
    prompts, responses = ro.prompt_lengths(), ro.response_lengths()
    lo, hi = micro_batches.PROMPTS
    assert prompts.min() >= lo and prompts.max() <= hi
    assert responses.min() >= 16 and responses.max() == 512
    assert (responses == 512).sum() >= 4  # one in ten cut at the cap
    assert responses.float().mean() < 0.5 * 512  # most are far shorter: the padding to remove
    assert ro.response_mask.sum(-1).tolist() == responses.tolist()  # each mask is a prefix


@pytest.mark.parametrize("name", ["rows", "cap", "micro", "rounds", "repeats"])
def test_bad_arguments_name_themselves(name):
    with pytest.raises(ValueError, match=f"--{name}"):
        micro_batches.main([f"--{name}", "0", "--no-save"])


def test_the_layouts_agree_and_the_table_says_so(capsys):
    """A fresh process per layout, one small step each: the padded layout (the trainer's stages
    patched back to untrimmed consecutive rows) and gopd's five reach the same loss and gradient."""
    micro_batches.main(
        ["--rows", "6", "--cap", "48", "--micro", "2", "--rounds", "1", "--repeats", "1", "--no-save"]
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| padded", "| grouped", "| tokens"))]
    assert len(rows) == 3 and "DISAGREES" not in out and "failed" not in out
    table = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")]
    assert table == ["| layout"] + [f"| {layout}" for layout in micro_batches.LAYOUTS]  # each layout ran
    padded = micro_batches.step_rollouts(6, 48, pad=0).sequences.numel()
    assert rows[0].startswith(f"| padded | 3 / {padded} |")  # 3 micro-batches at the step's full width
    tokens = [int(row.split("|")[2].split("/")[1]) for row in rows]
    assert tokens[0] > tokens[1] >= tokens[2]  # trimmed; then grouped under a budget


def test_the_cuda_path_runs_with_stand_ins_for_the_cuda_calls(monkeypatch):
    """measure_cuda's logic (never run on a GPU yet) on the CPU: the CUDA calls are stand-ins,
    and the padded layout is put back in effect and then taken away."""
    import torch

    import gopd.batching

    for name, fn in dict(synchronize=lambda: None, reset_peak_memory_stats=lambda: None,
                         memory_allocated=lambda: 0, max_memory_allocated=lambda: 5 << 20,
                         empty_cache=lambda: None).items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(micro_batches, "cuda_times_ms", lambda fn: [(fn(), 5.0)[1]])
    original = gopd.batching.micro_batches
    runs = micro_batches.measure_cuda(4, 32, 2, device="cpu")
    assert gopd.batching.micro_batches is original
    assert runs["padded"]["tokens"] > runs["grouped"]["tokens"] and runs["padded"]["micro_batches"] == 2
    assert all(run["times_s"] == [0.005] and run["peak_bytes"] == [5 << 20] for run in runs.values())
    assert "DISAGREES" not in micro_batches.table({"runs": runs})
