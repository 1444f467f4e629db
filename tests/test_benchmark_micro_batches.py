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
    """Three fresh processes, one small step each: the padded layout (the trainer's stages
    patched back to untrimmed consecutive rows) and gopd's two reach the same loss and gradient."""
    micro_batches.main(
        ["--rows", "6", "--cap", "48", "--micro", "2", "--rounds", "1", "--repeats", "1", "--no-save"]
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| padded", "| grouped", "| tokens"))]
    assert len(rows) == 3 and "DISAGREES" not in out and "failed" not in out
