"""The example configs load and validate (their data paths swapped for a real file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gopd.config import load_config

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path, tiny):
    raw = yaml.safe_load(path.read_text())
    overrides = {"train_data": str(tiny["train"])}
    if "eval_data" in raw:
        overrides["eval_data"] = str(tiny["eval"])
    teachers = raw["teachers"]
    # Local checkpoint paths of the example do not exist here: point them at a tiny model.
    overrides["teachers"] = (
        {k: str(tiny["teacher"]) for k in teachers} if isinstance(teachers, dict) else str(tiny["teacher"])
    )
    cfg = load_config(str(path), overrides)
    assert cfg.lam == 1.25 and cfg.temperature == 1.0


def test_there_are_examples():
    assert len(EXAMPLES) >= 3
