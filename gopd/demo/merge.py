"""The merging demo (`gopd demo --merge`): two domain teachers distilled back into one student.

1. two synthetic tasks, addition and subtraction (task.py), and a character tokenizer;
2. one tiny Qwen3-style model trained by SFT on both until it answers a share of each
   greedily: the student, and the base of both teachers;
3. two teachers: the student trained on one task each (as the paper's teachers are its
   student after RL in one domain); each masters its task and forgets much of the other;
4. ExOPD with both teachers (each prompt scored by its domain's teacher), then avg@k per
   domain of the teachers and of the student, before and after.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from gopd.demo import (
    DIGITS,
    TeacherStop,
    check_lams,
    describe_lams,
    distill_config,
    distill_each_lam,
    print_notes,
)
from gopd.demo.sft import greedy_accuracy, sft
from gopd.demo.task import MERGE_ALPHABET, make_splits, problem, subtraction
from gopd.demo.tiny import build_model, build_tokenizer, save
from gopd.evaluate import evaluate_checkpoint
from gopd.models import resolve_device

TASKS = {"add": problem, "sub": subtraction}
STUDENT_GREEDY_ACC = 0.4  # the student: when it first answers this share of each task greedily


def train_student_and_teachers(out: Path, seed: int, quick: bool,
                               weak: bool = False) -> tuple[Path, dict[str, Path], dict]:  # fmt: skip
    """SFT on both tasks up to the student; then, from the student, one teacher per task."""
    tokenizer = build_tokenizer(MERGE_ALPHABET)
    model = build_model(tokenizer, seed=seed)
    rng, val_rng = random.Random(seed + 7), random.Random(seed + 8)
    val = {d: [make(val_rng, DIGITS) for _ in range(100)] for d, make in TASKS.items()}
    accuracy = lambda m, d: greedy_accuracy(m, tokenizer, val[d], DIGITS + 2)  # noqa: E731
    info = {"params": sum(p.numel() for p in model.parameters())}

    def both_learnt(step: int) -> bool:
        accs = {d: accuracy(model, d) for d in TASKS}
        done = min(accs.values()) >= STUDENT_GREEDY_ACC or (quick and step == 20)
        if done:
            info.update(student_step=step, student_greedy=accs)
        return done

    domains = list(TASKS)
    mixed = lambda n: [TASKS[domains[i % 2]](rng, DIGITS) for i in range(n)]  # noqa: E731
    last = sft(model, tokenizer, mixed, 40 if quick else 4000, check_every=10, on_check=both_learnt)
    if "student_step" not in info:
        raise RuntimeError(f"SFT never reached greedy accuracy {STUDENT_GREEDY_ACC} on both tasks in {last} "
                           f"steps (seed {seed}: this tiny model learns both from most seeds, not all; try "
                           "another --seed)")  # fmt: skip
    student_dir = save(model, tokenizer, out / "models" / "student")
    teacher_dirs = {}
    for domain, make in TASKS.items():
        teacher, done = copy.deepcopy(model), TeacherStop(weak)
        mastered = lambda step, t=teacher, d=domain, done=done: done(step, accuracy(t, d))  # noqa: E731

        task_rng = random.Random(seed + 100 + len(teacher_dirs))
        steps = sft(teacher, tokenizer, lambda n, make=make, r=task_rng: [make(r, DIGITS) for _ in range(n)],
                    20 if quick else 3000, check_every=10, on_check=mastered)  # fmt: skip
        teacher_dirs[domain] = save(teacher, tokenizer, out / "models" / f"teacher_{domain}")
        info[f"teacher_{domain}_steps"] = steps
        info.setdefault("notes", []).extend([] if quick else done.cap_note(f"teacher {domain}", steps))
    return student_dir, teacher_dirs, info


def run_merge_demo(out: str | Path = "runs/demo_merge", seed: int = 0, distill_steps: int | None = None,
                   quick: bool = False, device: str = "cpu", lams: Sequence[float] | None = None,
                   weak_teacher: bool = False) -> dict:  # fmt: skip
    """device: where the evaluations and the G-OPD stage run (the tiny SFT stays on the CPU).
    lams: one G-OPD run per reward scale, from the same student and teachers (default: 1.25)."""
    out, lams = Path(out), check_lams(lams)
    resolve_device(device)  # an unusable device fails now, not after the SFT
    started = time.perf_counter()
    distill_steps = distill_steps or (3 if quick else 150)
    n_eval, k = (16, 2) if quick else (400, 4)
    train_path, eval_path = make_splits(out / "data", DIGITS, 2000, n_eval, seed, tasks=TASKS)
    print(f"[1/4] tasks: {DIGITS}-digit addition (add) and subtraction (sub), answer digits reversed; "
          f"data in {out / 'data'}")  # fmt: skip
    print("[2/4] SFT of one tiny Qwen3 on both: the student; then one teacher per task, trained on from it")
    student_dir, teacher_dirs, info = train_student_and_teachers(out, seed, quick, weak_teacher)
    greedy = ", ".join(f"{d} {a:.2f}" for d, a in info["student_greedy"].items())
    more = ", ".join(f"teacher {d}: {info[f'teacher_{d}_steps']} steps more" for d in TASKS)
    print(f"      {info['params'] / 1e6:.2f}M params; student = SFT step {info['student_step']} "
          f"(greedy {greedy}); {more}")  # fmt: skip
    print_notes(info)
    teachers = {d: str(path) for d, path in teacher_dirs.items()}
    paths = (student_dir, train_path, eval_path, out)
    cfg = distill_config(teachers, *paths, distill_steps, k, seed, device)
    print(f"[3/4] the teachers' accuracy per domain (avg@{k}, {n_eval // 2} held-out prompts each)")
    teacher_cfg = replace(cfg, seed=seed + 1)  # samples of their own, not the student's first eval's
    rows = {f"teacher {d}": evaluate_checkpoint(path, teacher_cfg) for d, path in teachers.items()}
    print(f"[4/4] {describe_lams(lams)}: each prompt scored by its domain's teacher, reference = the "
          f"student's initial weights, {distill_steps} steps of {cfg.prompts_per_step} prompts, "
          f"lr {cfg.lr}")  # fmt: skip
    before, after = distill_each_lam(cfg, lams)
    rows |= {"student before": before} | after
    avg = {name: {d: r[f"avg@{k}/{d}"] for d in TASKS} | {"both": r[f"avg@{k}"]} for name, r in rows.items()}
    header = f"avg@{k}, temperature {cfg.temperature}"
    width = max(map(len, [header, *avg]))
    print()
    print(f"  {header:{width}s}" + "".join(f"{c:>8s}" for c in [*TASKS, "both"]))
    for name, figures in avg.items():
        print(f"  {name:{width}s}" + "".join(f"{v:8.3f}" for v in figures.values()))
    seconds = time.perf_counter() - started
    print(f"  total time {seconds:.0f} s; per-domain metrics (reward/add, ...) in {cfg.output_dir}"
          + ("" if len(lams) == 1 else "_lam*"))  # fmt: skip
    return {"avg": avg, "lams": list(lams), **info, "seconds": seconds, "output_dir": str(out)}
