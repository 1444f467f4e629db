"""Scoring and update of one training step whose responses have the lengths of an RL step:
fixed micro-batches of the padded step against gopd's length-grouped, trimmed micro-batches.

    python -m benchmarks.micro_batches                    # 32 rows, responses up to 1024 tokens
    python -m benchmarks.micro_batches --cap 2048 --rows 16 --no-save

A step's rollouts are padded to its longest response; with a length cap, some response
nearly always reaches it, while most are much shorter. The layouts, each through the
trainer's own score_rollouts (teacher and reference) and policy_update (the student's
forward and backward, ExOPD lam 1.25):

- padded: micro_batch_size consecutive rows at the step's full width (gopd before
  gopd.batching; a trainer without padding removal or dynamic batch sizes).
- grouped: gopd's micro-batches: rows sorted by length, micro_batch_size at a time, each
  trimmed to its own longest prompt and response.
- tokens: the same with a token budget, micro_batch_tokens = micro_batch_size / 4 x the
  longest possible row, and up to 4x the rows: long rows go a few at a time (a lower peak),
  short rows many at a time.
- packed: grouped's micro-batches, packed (pack_sequences, gopd.packing) as the models'
  attention packs them: under sdpa (these models' default), into bins of the micro-batch's
  longest row, each kept apart by a block-diagonal mask.
- packed-row: the same, each micro-batch as one row of all its tokens (flash attention's
  layout, run here through sdpa's mask: the layout packed had before its bins).
- packed-tokens: tokens' budget (counting real tokens, as it does packed) with packed's bins.

The step (seeded): prompts of 32-128 tokens; responses log-normal around cap/5, one in ten
cut at the cap, as a step of a long-response RL run. The models are Qwen3-shaped (hidden
512, 4 layers, vocabulary 32000, float32; teacher and reference of the student's shape).
Each layout runs in fresh processes, rounds interleaved; peak RSS above the RSS once models
and rollouts exist. The losses and gradient norms must agree across layouts (only the
floating-point order of sums differs).
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS_DIR,
    child_runs,
    cuda_peak_bytes,
    cuda_times_ms,
    machine_description,
    machine_slug,
    markdown_table,
    measured_commit,
    timed_calls,
)
from benchmarks.report import CHILD_ENV

LAYOUTS = ("padded", "grouped", "tokens", "packed", "packed-row", "packed-tokens")
VOCAB, PROMPTS = 32000, (32, 128)


def step_rollouts(rows: int, cap: int, pad: int, seed: int = 0):
    """Rollouts with an RL step's lengths (see the module doc); the tokens are random (no EOS:
    the lengths say where each response ends)."""
    from gopd.data import Example
    from gopd.rollout import Rollouts, left_pad

    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(PROMPTS[0], PROMPTS[1] + 1, (rows,), generator=g)
    lengths = (torch.randn(rows, generator=g) * 0.8 + torch.log(torch.tensor(cap / 5))).exp()
    lengths = lengths.round().clamp(16, cap).long()
    lengths[torch.randperm(rows, generator=g)[: max(1, rows // 10)]] = cap  # cut at the cap
    examples = [
        Example(torch.randint(4, VOCAB, (int(n),), generator=g).tolist(), "default", None, "")
        for n in prompt_lens
    ]
    ids, mask = left_pad([ex.prompt_ids for ex in examples], pad)
    width = int(lengths.max())
    valid = torch.arange(width)[None, :] < lengths[:, None]
    responses = torch.randint(4, VOCAB, (rows, width), generator=g).masked_fill(~valid, pad)
    rollout_logp = -torch.rand(rows, width, generator=g) * valid
    return Rollouts(torch.cat([ids, responses], 1), torch.cat([mask, valid.long()], 1), ids.shape[1], valid,
                    rollout_logp, examples)  # fmt: skip


def models_and_config(layout: str, rows: int, cap: int, micro: int, device: str = "cpu"):
    from gopd.config import TrainConfig
    from gopd.demo.tiny import build_model, build_tokenizer
    from gopd.models import Models

    tok = build_tokenizer("abc")
    build = lambda seed: build_model(tok, hidden=512, layers=4, heads=8, context=PROMPTS[1] + cap,  # noqa: E731
                                     vocab_size=VOCAB, seed=seed).to(device)  # fmt: skip
    student = build(0).train()
    models = Models(student, {"default": build(1).eval()}, build(0).eval(), tok, torch.device(device))
    for m in models.frozen():
        m.requires_grad_(False)
    longest = PROMPTS[1] + cap
    budgeted = layout in ("tokens", "packed-tokens")
    rows_at_most, budget = (micro * 4, max(1, micro // 4) * longest) if budgeted else (micro, None)
    cfg = TrainConfig(
        lam=1.25, micro_batch_size=rows_at_most, micro_batch_tokens=budget, max_prompt_tokens=PROMPTS[1],
        max_new_tokens=cap, kernel_backend="torch" if device == "cpu" else "auto", grad_clip=None,
        device=device, pack_sequences=layout.startswith("packed"),
    )  # fmt: skip
    return models, cfg


def padded_micro_batches(rollouts, rows, max_rows, max_tokens=None, packed=False):
    """The layout before gopd.batching: consecutive rows, as many as allowed."""
    for start in range(0, len(rows), max_rows):
        yield rows[start : start + max_rows]


def untrimmed(rollouts, rows):
    return rollouts.select(rows), torch.tensor(rows)


@contextmanager
def layout_in_effect(layout: str):
    """The trainer's stages with `layout`'s micro-batches: 'padded' puts back consecutive,
    untrimmed rows where the stages look them up; 'packed-row' packs each into one row; the
    others are gopd's own."""
    import gopd.batching
    import gopd.packing
    import gopd.scoring
    import gopd.update

    if layout == "packed-row":
        saved_varlen = gopd.packing.uses_varlen_attention
        gopd.packing.uses_varlen_attention = lambda model: True  # flash attention's layout: one row
        try:
            yield
        finally:
            gopd.packing.uses_varlen_attention = saved_varlen
        return
    if layout != "padded":
        yield
        return
    saved = gopd.batching.micro_batches, gopd.scoring.micro_batch, gopd.update.micro_batch
    gopd.batching.micro_batches = padded_micro_batches
    gopd.scoring.micro_batch = gopd.update.micro_batch = untrimmed
    try:
        yield
    finally:
        gopd.batching.micro_batches, gopd.scoring.micro_batch, gopd.update.micro_batch = saved


def plan_shape(rollouts, cfg, model) -> dict:
    """The update's micro-batches under the layout in effect: how many, and the tokens `model`
    runs through (padded ones included: packed, the bins' tail padding)."""
    import gopd.batching
    import gopd.packing
    import gopd.update

    limits = (cfg.micro_batch_size, cfg.micro_batch_tokens)
    plan = gopd.batching.step_plan(rollouts, None, *limits, packed=cfg.pack_sequences)
    parts = [gopd.update.micro_batch(rollouts, rows)[0] for _, chunks in plan for rows, _ in chunks]
    packed = cfg.pack_sequences
    binned = not gopd.packing.uses_varlen_attention(model)
    packed_ids = lambda part: gopd.packing.pack(part, binned).input_ids  # noqa: E731
    tokens = sum(packed_ids(part).numel() if packed else part.sequences.numel() for part in parts)
    return {"micro_batches": len(parts), "tokens": tokens}


def one_step(models, rollouts, cfg):
    from gopd.scoring import score_rollouts
    from gopd.update import make_scheduler, policy_update

    sgd = torch.optim.SGD([p for p in models.student.parameters() if p.requires_grad], lr=0.0)
    scores = score_rollouts(models, rollouts, cfg)
    loss, stats, _ = policy_update(models, rollouts, scores, sgd, make_scheduler(sgd, cfg, 1), cfg)
    return loss, stats["grad_norm"]


def child(layout: str, rows: int, cap: int, micro: int, repeats: int, out: Path) -> None:
    """CPU, in a fresh process: peak RSS of the first step, the time of each."""
    with layout_in_effect(layout):
        models, cfg = models_and_config(layout, rows, cap, micro)
        pad = models.tokenizer.pad_token_id
        rollouts = step_rollouts(rows, cap, pad)
        one_step(models, step_rollouts(2, 32, pad, seed=1), cfg)  # one-time costs
        shape = plan_shape(rollouts, cfg, models.student)
        times, peak, result = timed_calls(lambda: one_step(models, rollouts, cfg), repeats)
    found = {"peak_bytes": peak, "times_s": times, "loss": result[0], "grad_norm": result[1]}
    out.write_text(json.dumps(found | shape))


def measure_cuda(rows: int, cap: int, micro: int, device: str = "cuda") -> dict:
    """CUDA, in this process, one layout after the other (cuda_run)."""
    runs = {}
    for name in LAYOUTS:
        runs[name] = cuda_run(name, rows, cap, micro, device)
        median_ms = statistics.median(runs[name]["times_s"]) * 1e3
        print(
            f"    {name:8s} +{runs[name]['peak_bytes'][0] / 2**20:7.0f} MiB  median {median_ms:.1f} ms",
            flush=True,
        )
        torch.cuda.empty_cache()
    return runs


def cuda_run(layout: str, rows: int, cap: int, micro: int, device: str) -> dict:
    """One layout after a warm-up step (compile, autotune): the peak of one step
    (max_memory_allocated above the allocation before it), then the step timed as the
    report's CUDA rows are (cuda_times_ms)."""
    with layout_in_effect(layout):
        models, cfg = models_and_config(layout, rows, cap, micro, device)
        pad = models.tokenizer.pad_token_id
        rollouts = step_rollouts(rows, cap, pad)
        one_step(models, step_rollouts(2, 32, pad, seed=1), cfg)
        (loss, norm), peak = cuda_peak_bytes(lambda: one_step(models, rollouts, cfg))
        times = [ms / 1e3 for ms in cuda_times_ms(lambda: one_step(models, rollouts, cfg))]
        shape = plan_shape(rollouts, cfg, models.student)
    return {"peak_bytes": [peak], "times_s": times, "loss": loss, "grad_norm": norm} | shape


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32, help="responses in the step")
    p.add_argument("--cap", type=int, default=1024, help="longest response (max_new_tokens)")
    p.add_argument("--micro", type=int, default=8, help="micro_batch_size of padded and grouped")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per layout")
    p.add_argument("--repeats", type=int, default=2, help="steps per process, the first gives memory")
    p.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("rows", "cap", "micro", "rounds", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.child:
        return child(args.child, args.rows, args.cap, args.micro, args.repeats, Path(args.out))
    ro = step_rollouts(args.rows, args.cap, 0)
    real = int(ro.attention_mask.sum())
    print(f"one step: {args.rows} rows, {real} prompt + response tokens, padded to {ro.sequences.numel()} "
          f"({real / ro.sequences.numel():.0%} real); responses up to {args.cap}", flush=True)  # fmt: skip
    if torch.cuda.is_available():
        runs = measure_cuda(args.rows, args.cap, args.micro)
    else:
        runs = measure_cpu(args)
    record = {"rows": args.rows, "cap": args.cap, "micro": args.micro, "real_tokens": real,
              "padded_tokens": ro.sequences.numel(), "machine": machine_description(),
              "commit": measured_commit(), "runs": runs}  # fmt: skip
    print(table(record), flush=True)
    if not args.no_save:
        folder = RESULTS_DIR / machine_slug(record["machine"]) / "micro_batches"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"R{args.rows}_cap{args.cap}_micro{args.micro}.json").write_text(
            json.dumps(record, indent=1)
        )


def measure_cpu(args) -> dict:
    """CPU: fresh processes (child), rounds interleaving the layouts."""
    shape = ["--rows", str(args.rows), "--cap", str(args.cap), "--micro", str(args.micro),
             "--repeats", str(args.repeats)]  # fmt: skip
    keep = ("loss", "grad_norm", "micro_batches", "tokens")
    return child_runs("benchmarks.micro_batches", list(LAYOUTS), args.rounds, shape, CHILD_ENV, keep)


def table(record: dict) -> str:
    runs, rows = record["runs"], []
    base = runs["padded"]
    for name, run in runs.items():
        if "skipped" in run:
            rows.append([name, "", run["skipped"], "", "", "", "", "", ""])
            continue
        t, mem = statistics.median(run["times_s"]), max(run["peak_bytes"])
        ok = "skipped" not in base
        close = lambda key, run=run: abs(run[key] - base[key]) <= 1e-4 * abs(base[key])  # noqa: E731
        agrees = not ok or (close("loss") and close("grad_norm"))
        rows.append([
            name + ("" if agrees else " (DISAGREES with padded)"),
            f"{run['micro_batches']} / {run['tokens']}",
            f"{t:.2f} s ({min(run['times_s']):.2f}-{max(run['times_s']):.2f})",
            f"{t / statistics.median(base['times_s']):.2f}x" if ok else "-", f"{mem / 2**20:.0f}",
            f"{mem / max(base['peak_bytes']):.2f}x" if ok else "-",
            f"{run['loss']:.6g}", f"{run['grad_norm']:.6g}",
        ])  # fmt: skip
    headers = ["layout", "micro-batches / tokens through a model", "scoring + update, median (min-max)",
               "time / padded", "peak MiB", "memory / padded",
               "loss", "grad norm"]  # fmt: skip
    return markdown_table(headers, rows)


if __name__ == "__main__":
    main()
