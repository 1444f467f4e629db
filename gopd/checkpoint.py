"""Checkpoints: the student in Hugging Face format plus everything needed to resume exactly
(optimizer, scheduler, RNG states, step, data position), written to a temporary directory
and renamed into place, so that a crash never leaves a half-written checkpoint behind."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: str, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:07d}"


def save_checkpoint(
    output_dir: str, step: int, student, tokenizer, optimizer, scheduler, sampler, extra: dict
):
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    student.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(
        {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
         "sampler": sampler.state_dict(), "rng": rng_state(), **extra},
        tmp / STATE_FILE,
    )  # fmt: skip
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(output_dir: str) -> Path | None:
    root = Path(output_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp") and (p / STATE_FILE).exists())
    return done[-1] if done else None


def resolve_resume(resume: str, output_dir: str) -> Path:
    path = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
    if path is None or not (path / STATE_FILE).exists():
        raise ValueError(
            f"resume={resume!r}: no complete checkpoint found (looked in {output_dir}/checkpoints)"
        )
    return path


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, weights_only=False)
