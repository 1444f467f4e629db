"""Command line: `gopd train`, `gopd eval`, `gopd export`, `gopd demo`, `gopd prepare`, `gopd env`
(also `python -m gopd ...`)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

import yaml

from gopd.config import ANSWER_MATCHES, TrainConfig, load_config, yaml_load


def _parse_value(text: str) -> Any:
    """CLI values are YAML scalars / lists / mappings: 1e-5, true, null, [0.2, 0.28], {math: a, code: b}."""
    try:
        return yaml_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a YAML value; text with braces or colons goes in single quotes: \"'{text}'\""
        ) from exc


def add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (override the --config file; values are YAML)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        group.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, type=_parse_value, default=argparse.SUPPRESS,
            metavar="VALUE", help=f"{f.metadata.get('help', '')} (default: {default!r})",
        )  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from gopd.distributed import env_world
    from gopd.trainer import train

    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)
    }
    cfg = load_config(args.config, overrides)
    summary = train(cfg, resume=args.resume)
    if env_world()[0] == 0:  # under torchrun, one summary (rank 0's) is enough
        print(yaml.safe_dump({"summary": summary}, sort_keys=False))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gopd.distributed import env_world
    from gopd.evaluate import evaluate_checkpoint

    cfg = TrainConfig(
        student=args.model, teachers=args.model, train_data=args.data, eval_data=args.data,
        prompt_field=args.prompt_field, answer_field=args.answer_field, tests_field=args.tests_field,
        domain_field=args.domain_field, answer_match=args.answer_match, eval_temperature=args.temperature,
        eval_top_p=args.top_p, eval_samples=args.k, eval_max_prompts=args.max_prompts,
        prompt_template=args.prompt_template,
        generate_batch_size=args.generate_batch_size,
        dtype=args.dtype, device=args.device, seed=args.seed,
        allow_code_execution=args.allow_code_execution, code_timeout=args.code_timeout,
        code_workers=args.code_workers,
        max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
        chat_template=args.chat_template, chat_template_kwargs=args.chat_template_kwargs,
        rollout_engine=args.engine,
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization if args.engine == "vllm" else None,
    ).validate()  # fmt: skip
    result = evaluate_checkpoint(args.model, cfg, args.samples_out)
    if env_world()[0] == 0:
        print(yaml.safe_dump({"model": args.model, "data": args.data, **result}, sort_keys=False))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gopd.checkpoint import export_merged

    print(f"wrote {export_merged(args.checkpoint, args.out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    # The tiny SFT's course follows the order of floating-point sums, so the thread count: fixed,
    # the demo gives the README's figures on any machine of that CPU kind, whatever its cores.
    torch.set_num_threads(args.threads)
    if args.merge:
        from gopd.demo.merge import run_merge_demo as run
    else:
        from gopd.demo import run_demo as run

    out = args.out or ("runs/demo_merge" if args.merge else "runs/demo")
    run(
        out,
        seed=args.seed,
        distill_steps=args.distill_steps,
        quick=args.quick,
        device=args.device,
        lams=args.lam,
        weak_teacher=args.weak_teacher,
    )
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from gopd_kernels.environment import report

    print(report())
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    import re

    from gopd.data import write_jsonl
    from gopd.prepare import assert_records, livecodebench_records

    if args.benchmark != "livecodebench":
        lcb_only = ("start_date", "end_date", "public_only")
        given = [f"--{n.replace('_', '-')}" for n in lcb_only if getattr(args, n)]
        if given:
            raise ValueError(
                f"{', '.join(given)}: for livecodebench only; {args.benchmark} has no dates or private tests"
            )
        records = assert_records(args.input, args.benchmark)
        if not records:
            raise ValueError(f"no problem in {args.input}")
        write_jsonl(args.output, records)
        print(f"{len(records)} problems, each with its asserts -> {args.output}")
        for r in records:
            if "repaired" in r:
                print(f"  {r['id']}: its published test mended ({r['repaired']}; gopd.prepare says why)")
        return 0
    for name in ("start_date", "end_date"):
        value = getattr(args, name)
        if value is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            raise ValueError(f"--{name.replace('_', '-')} must be YYYY-MM-DD, got {value!r}")
    records = livecodebench_records(args.input, args.start_date, args.end_date, args.public_only)
    if not records:
        raise ValueError(f"no problem of {args.input} is dated within [{args.start_date}, {args.end_date}]")
    write_jsonl(args.output, records)
    calls = sum("fn_name" in r["tests"] for r in records)
    dates = sorted(r["date"] for r in records)
    cases = sum(len(r["tests"]["inputs"]) for r in records)
    print(f"{len(records)} problems ({len(records) - calls} stdin, {calls} functional), dated {dates[0]} to "
          f"{dates[-1]}, {cases} test cases -> {args.output}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gopd", description="Generalized On-Policy Distillation (G-OPD / ExOPD)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="distil a student from teacher(s) with G-OPD",
        description="Distil a student from one teacher, or merge domain teachers, with G-OPD.",
    )
    p.add_argument("--config", help="YAML file of settings (see below); flags override it")
    p.add_argument("--resume", help="a checkpoint directory, or 'latest' in output_dir/checkpoints")
    add_config_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="avg@k / pass@k of a model on prompts with reference answers or unit tests",
        description="Sample k responses per prompt; each is right when its final answer meets the reference "
        "answer, or when its code passes the record's tests (gopd.verifiers).",
    )
    p.add_argument(
        "--model", required=True, help="checkpoint directory (Hugging Face format, with tokenizer)"
    )
    p.add_argument("--data", required=True, help=".jsonl or .parquet with prompts and answers")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (avg@k, pass@k); default 4")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy; default 1.0"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; default 1.0 (off)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="longest response; default 1024")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longest prompt; default 1024")
    p.add_argument("--max-prompts", type=int, default=None, help="evaluate the first N prompts only")
    p.add_argument("--prompt-field", default="prompt", help="record field of the prompt; default 'prompt'")
    p.add_argument("--prompt-template", default=None, metavar="TEXT",
                   help="each prompt put into TEXT where it says {prompt}, before the chat template (as "
                   "prompt_template); default: the prompt as it is")  # fmt: skip
    p.add_argument("--answer-field", default="answer", help="record field of the answer; default 'answer'")
    p.add_argument(
        "--answer-match", default="math", choices=ANSWER_MATCHES,
        help="exact strings; math: normalised LaTeX and exact numbers; symbolic: that, or equal in SymPy "
        "(needs math-verify); default math",
    )  # fmt: skip
    p.add_argument("--tests-field", default="tests", help="record field of Python unit tests")
    p.add_argument("--domain-field", default="domain", help="record field of the domain (figures per domain)")
    p.add_argument(
        "--allow-code-execution", action="store_true",
        help="run responses to records with tests as Python on this machine (no sandbox)",
    )  # fmt: skip
    p.add_argument("--code-timeout", type=float, default=10.0, help="seconds per test run; default 10")
    p.add_argument("--code-workers", type=int, default=4, help="test runs at once; default 4")
    p.add_argument(
        "--chat-template", type=_parse_value, default=True, help="apply the chat template; default true"
    )
    p.add_argument(
        "--chat-template-kwargs", type=_parse_value, default={}, metavar="MAPPING",
        help="extra chat-template variables (YAML), e.g. '{enable_thinking: false}'; default {}",
    )  # fmt: skip
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="default float32"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N; default auto")
    p.add_argument(
        "--engine", default="hf", choices=["hf", "vllm"],
        help="sampler: hf (transformers generate) or vllm (CUDA; loads the checkpoint itself); default hf",
    )  # fmt: skip
    p.add_argument("--generate-batch-size", type=int, default=None,
                   help="with --engine hf: most sequences per generate call (bounds its KV cache); default: "
                   "64 prompts x k at once")  # fmt: skip
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.9,
                   help="with --engine vllm: its share of the GPU's memory; default 0.9")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="sampling seed; default 0")
    p.add_argument("--samples-out", default=None, metavar="FILE",
                   help="write every sample (prompt, response, right or not, tokens, cut at the cap, the "
                   "answer read or the kind of tests) to this .jsonl")  # fmt: skip
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "export",
        help="a LoRA checkpoint as a standalone model (adapters merged into the base)",
        description="Write a LoRA checkpoint's student as a standalone Hugging Face model: the base "
        "model's weights with the adapters merged in, and the tokenizer.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory written with lora_rank > 0")
    p.add_argument("--out", required=True, help="where the merged model goes")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "demo",
        help="the embedded CPU demo: synthetic task, tiny models, G-OPD, before/after",
        description="Builds a synthetic addition task, a tokenizer and tiny Qwen3-style models, trains a "
        "teacher and a weaker student by SFT, distils with ExOPD and prints accuracies before and after. "
        "No downloads; minutes on a CPU.",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="the merging demo: two domain teachers (add, subtract) into one student",
    )
    p.add_argument("--out", default=None, help="working directory; default runs/demo (runs/demo_merge)")
    p.add_argument("--seed", type=int, default=0, help="seed; default 0")
    p.add_argument("--distill-steps", type=int, default=None, help="G-OPD steps (default: the demo's choice)")
    p.add_argument("--lam", type=float, nargs="+", default=None, metavar="LAM",
                   help="reward scale(s): one G-OPD run each from the same student and teachers, side by "
                   "side (e.g. --lam 1 1.25: OPD against ExOPD); default 1.25")  # fmt: skip
    p.add_argument("--weak-teacher", action="store_true",
                   help="take each teacher as soon as it answers 80%% of its task greedily (default: "
                   "97%%, then 200 steps more): a teacher the student can pass")  # fmt: skip
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads for the demo's tensors; default 2, as the README's figures were made "
                   "(the tiny SFT's course depends on it)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a much shorter run (for smoke tests)")
    p.add_argument("--device", default="cpu",
                   help="where the evaluation and G-OPD run: cpu (default; the README's figures) | auto | "
                   "cuda | cuda:N; the tiny SFT stays on the CPU")  # fmt: skip
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "prepare",
        help="a public benchmark's files as eval records (.jsonl) for gopd eval / eval_data",
        description="Write a public benchmark's problems as gopd eval records: LiveCodeBench's "
        "code_generation_lite files (test.jsonl ... test6.jsonl), private tests decoded, each problem with "
        "its stdin or call tests; HumanEval (HumanEval.jsonl, EvalPlus' HumanEvalPlus-OriginFmt.jsonl.gz) "
        "and MBPP (sanitized-mbpp.json, MBPP+ in its original format), each with its asserts (gopd.prepare).",
    )
    p.add_argument("benchmark", choices=["livecodebench", "humaneval", "mbpp"],
                   help="which benchmark's files")  # fmt: skip
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="the benchmark's .jsonl, .jsonl.gz, .json or .parquet files")  # fmt: skip
    p.add_argument("--output", required=True, help="the records' .jsonl")
    p.add_argument("--start-date", help="only problems from contests on or after this day (YYYY-MM-DD)")
    p.add_argument("--end-date", help="only problems from contests on or before this day (YYYY-MM-DD)")
    p.add_argument("--public-only", action="store_true", help="only the public test cases (a quick check)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "env",
        help="versions, devices and the kernels' choices on them: for bug reports",
        description="Print the versions of gopd and the packages it uses, each CUDA device with the backend "
        "'auto' picks there and the launch configs its shared memory admits, and the GOPD_* / TRITON_* "
        "settings in force, each checked (gopd_kernels.environment).",
    )
    p.set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-file load/save bars drown the step log
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad settings or inputs: a clear message, not a traceback
        print(f"gopd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
