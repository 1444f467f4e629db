"""Test-wide set-up.

Without a GPU the Triton kernels run through the interpreter, which must be switched on
before `triton` is first imported, hence at the top of this file. With a GPU (and no
explicit TRITON_INTERPRET), the same tests run the compiled kernels on CUDA tensors.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton backend runs here: CUDA when present, else the CPU interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def one_config_per_autotuner(request, monkeypatch):
    """On a GPU each autotuned kernel runs one config in the tests, the last it lists (the
    narrowest, which fits every device and dtype), instead of compiling and timing them all
    at every new key: the autotuner checks none of the outputs it times, so tuning adds no
    checking, only compile time (it cut every GPU test run of the first two leases).
    tests/kernels/test_launch_configs.py pins and checks every config; tests marked
    `autotune` keep the autotuner itself. The interpreter runs one config anyway."""
    if os.environ.get("TRITON_INTERPRET") == "1" or request.node.get_closest_marker("autotune"):
        return
    from tests.kernels.helpers import autotuned_kernels

    for tuned in autotuned_kernels().values():
        monkeypatch.setattr(tuned, "configs", tuned.configs[-1:])
        monkeypatch.setattr(tuned, "cache", {})


@pytest.fixture
def narrow_row_blocks(monkeypatch):
    """The folded losses' Triton row passes in 16-column steps, so that test vocabularies take
    many steps per row (a GPU compiles that width too: it is a launch parameter)."""
    import triton

    from gopd_kernels.ops import fold_rows_triton

    monkeypatch.setattr(fold_rows_triton, "CONFIGS", [triton.Config({"BLOCK_V": 16}, num_warps=1)])


@pytest.fixture
def tiny_chunks(monkeypatch):
    """The folds' workspace as 3 rows of V = 211 fp32 logits: many chunks, the last one short."""
    monkeypatch.setenv("GOPD_WORKSPACE_MB", str(3 * 211 * 4 / 2**20))
