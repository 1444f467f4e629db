"""Checkpoints: the student in Hugging Face format plus everything needed to resume exactly
(optimizer, scheduler, RNG states, step, data position), written to a temporary directory
and renamed into place, so that a crash never leaves a half-written checkpoint behind."""

from __future__ import annotations

import json
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


def staging_dir(output_dir: str, step: int) -> Path:
    """The temporary directory a checkpoint of `step` is written into (see save_checkpoint)."""
    final = checkpoint_dir(output_dir, step)
    return final.with_name(final.name + ".tmp")


def start_checkpoint(output_dir: str, step: int) -> Path:
    """An empty staging directory for the checkpoint of `step`: others may add files to it
    (the ranks' optimizer shards) before save_checkpoint completes it."""
    tmp = staging_dir(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(tmp: Path, student, tokenizer, state: dict, weights: dict | None = None) -> Path:
    """Write the student (Hugging Face format; `weights` for its state dict when given: a
    sharded student's, gathered), its tokenizer and the trainer state into the staging
    directory `tmp`, then rename it into place; returns the checkpoint's path."""
    student.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE_FILE)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def optimizer_shard_file(rank: int) -> str:
    return f"optimizer_rank{rank}.pt"


def load_optimizer_state(path: Path, state: dict, rank: int) -> dict:
    """The optimizer state to resume from: the trainer state's own, or this rank's shard of
    a sharded optimizer (saved beside it, one file per rank)."""
    if "optimizer" in state:
        return state["optimizer"]
    shard = path / optimizer_shard_file(rank)
    if not shard.exists():
        raise ValueError(
            f"{path}: its optimizer was sharded over {state.get('optimizer_shards')} ranks and has no "
            f"shard for rank {rank}; resume with shard_optimizer on as many ranks"
        )
    return torch.load(shard, weights_only=False)


def complete_checkpoints(output_dir: str) -> list[Path]:
    """The complete checkpoints in output_dir, oldest first (not the staging directories)."""
    root = Path(output_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp") and (p / STATE_FILE).exists())


def latest_checkpoint(output_dir: str) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def prune_checkpoints(output_dir: str, keep: int, spare: Path | None = None) -> list[Path]:
    """Remove all but the newest `keep` complete checkpoints, and `spare` (the best one);
    returns the removed ones."""
    old = [p for p in complete_checkpoints(output_dir)[:-keep] if spare is None or p != Path(spare)]
    for path in old:
        shutil.rmtree(path)
    return old


BEST_FILE = "best.json"


def best_checkpoint(output_dir: str) -> dict | None:
    """What keep_best last recorded: {"step", "path", "metric", "value"}; None when nothing has."""
    path = Path(output_dir) / BEST_FILE
    return json.loads(path.read_text()) if path.exists() else None


def record_best(output_dir: str, best: dict) -> None:
    """Write best.json in place atomically (a reader never sees half of it)."""
    path = Path(output_dir) / BEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(best, indent=1) + "\n")
    os.replace(tmp, path)


def resolve_resume(resume: str, output_dir: str) -> Path:
    path = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
    if path is None or not (path / STATE_FILE).exists():
        raise ValueError(
            f"resume={resume!r}: no complete checkpoint found (looked in {output_dir}/checkpoints)"
        )
    return path


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, weights_only=False)


def export_merged(checkpoint: str, out: str) -> Path:
    """Write a LoRA checkpoint's student as a standalone Hugging Face model: the base model's
    weights with the adapters' deltas added (gopd.models.servable_weights), its tokenizer
    beside it. The base is found where the adapter config points."""
    from gopd.models import load_tokenizer, servable_weights

    try:
        from peft import PeftConfig, PeftModel
    except ImportError as exc:
        raise ValueError("exporting a LoRA checkpoint needs peft: pip install 'gopd[lora]'") from exc
    if not (Path(checkpoint) / "adapter_config.json").exists():
        raise ValueError(f"checkpoint: {checkpoint} holds no LoRA adapter (no adapter_config.json)")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        PeftConfig.from_pretrained(checkpoint).base_model_name_or_path
    )
    student = PeftModel.from_pretrained(base, checkpoint)
    merged = dict(servable_weights(student))
    model = student.unload()  # the base model, its LoRA layers taken out, its weights as loaded
    model.load_state_dict(merged)
    model.save_pretrained(out)
    load_tokenizer(checkpoint).save_pretrained(out)
    return Path(out)
