"""Launch plumbing shared by the Triton kernels: what the autotuner keys on."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from gopd_kernels.ops.linear_logsoftmax_triton import vocab_slices  # noqa: E402
from gopd_kernels.ops.triton_common import token_bucket  # noqa: E402
from tests.kernels.helpers import autotuned_kernels  # noqa: E402

# Arguments that carry a token count (rows of H, or of dZ: M, and K in dW += dZ^T H).
TOKEN_COUNTS = {"M", "K"}


@pytest.mark.parametrize(
    ("n", "bucket"), [(0, 1), (1, 1), (2, 2), (3, 4), (4096, 4096), (4097, 8192), (16383, 16384)]
)
def test_token_bucket_is_the_next_power_of_two(n, bucket):
    assert token_bucket(n) == bucket


def test_no_autotuner_keys_on_a_raw_token_count():
    """Token counts change every step; a raw one in the key re-tunes every config each time."""
    tuned = autotuned_kernels()
    assert {"vocab_partials_kernel_tuned", "logits_grad_kernel_tuned", "matmul_kernel_tuned"} <= set(tuned)
    for name, autotuner in tuned.items():
        assert not TOKEN_COUNTS & set(autotuner.keys), (name, autotuner.keys)
        assert any(k.endswith("_BUCKET") for k in autotuner.keys), (name, autotuner.keys)


def test_vocab_slices_take_one_value_per_token_bucket():
    """The slice length is an autotuning key too: it must not move within a bucket."""
    cpu = torch.device("cpu")
    for lo in (1025, 4097):
        assert len({vocab_slices(rows, 151936, cpu) for rows in range(lo, 2 * lo - 1, 31)}) == 1


def test_gradient_kernels_key_on_the_slice_width_not_on_each_slice():
    """The backward's last vocabulary slice is narrower than the others; keyed on V (the
    width a launch sees) it would be tuned again. dZ's row stride is the width of them all,
    and takes one value per token bucket (backward_tiles)."""
    from gopd_kernels.ops.linear_logsoftmax_triton import backward_tiles

    tuned = autotuned_kernels()
    for name in ("logits_grad_kernel_tuned", "dense_kl_grad_kernel_tuned"):
        assert "stride_dzm" in tuned[name].keys and "V" not in tuned[name].keys, tuned[name].keys
    widths = {
        backward_tiles(rows, 151936, 4096, torch.bfloat16, 151936 * 4096 * 2)[1]
        for rows in range(8193, 16385, 97)
    }
    assert len(widths) == 1


def test_autotuned_keeps_its_picks_on_disk(monkeypatch):
    """A new process (a resumed run, the next benchmark) reuses the picks instead of timing
    every config again; Triton ignores the flag under the interpreter, so the call is checked."""
    from gopd_kernels.ops import triton_common

    seen = {}

    def fake_autotune(configs, **kwargs):
        seen.update(kwargs, configs=configs)
        return lambda kernel: ("tuned", kernel)

    monkeypatch.setattr(triton_common.triton, "autotune", fake_autotune)
    prune = object()
    assert triton_common.autotuned("k", ["c"], ["M_BUCKET"], prune, restore_value=["c_ptr"]) == ("tuned", "k")
    assert seen == {"configs": ["c"], "key": ["M_BUCKET"], "prune_configs_by": {"early_config_prune": prune},
                    "cache_results": True, "restore_value": ["c_ptr"]}  # fmt: skip
