"""One G-OPD update step of a Qwen3-shaped student, forward and backward through the model:
gopd's fused loss on the final hidden states against the same loss on materialised logits.

    python -m benchmarks.update_step                          # 2048 and 8192 response tokens
    python -m benchmarks.update_step --tokens 1024 --layers 1 --no-save
    python -m benchmarks.update_step --layers 28 --dtype bfloat16   # on CUDA: Qwen3-0.6B's depth
    python -m benchmarks.update_step --frozen-head            # the head fixed, as under LoRA

The op tables (benchmarks.report) time the losses alone, on random hidden states. Here they
sit behind a real model (Qwen3-0.6B's widths: hidden 1024, 16 heads, vocabulary 151936, tied
head; fewer layers, for the CPU), so the peak includes the activations and the weights'
gradients that every trainer holds, and shows what share of a step the loss takes.

- naive: gopd_loss_reference on the response positions' hidden states: the [N, V] logits and
  their log-softmax, as a trainer without a fused loss (HF logits with `logits_to_keep`).
- gopd: gopd_loss, as gopd's trainer runs it.

Both take the same batch (sequences of 64 prompt and 512 response tokens, ExOPD lam 1.25
with a reference) after a warm-up step at one sequence. On a CPU each runs in a fresh process
(peak RSS above the RSS once the model and the batch exist), rounds interleaved; on CUDA in
this process (torch.cuda.max_memory_allocated above the allocation before the step; gopd on
its Triton kernels). Their losses and the embedding's gradient norms are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
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

PROMPT, RESPONSE = 64, 512
IMPLS = ("naive", "gopd")


def qwen3_like(layers: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
        max_position_embeddings=PROMPT + RESPONSE,
    )  # fmt: skip
    return Qwen3ForCausalLM(config).train()


def batch(sequences: int, vocab: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sequences, PROMPT + RESPONSE), generator=g)
    logp = lambda: -torch.rand(sequences, RESPONSE, generator=g) * 4  # noqa: E731
    return dict(ids=ids, mask=torch.ones_like(ids), targets=ids[:, PROMPT:], teacher=logp(), ref=logp())


def watched(model) -> torch.Tensor:
    """The weight whose gradient the implementations must agree on: the embedding (tied to the
    head), or with a frozen head the final norm, the last weight before the loss."""
    embedding = model.get_input_embeddings().weight
    return embedding if embedding.requires_grad else model.model.norm.weight


def step(model, x: dict, impl: str) -> tuple[float, float]:
    """Forward and backward of one update; (loss, the watched weight's gradient norm)."""
    from gopd.models import final_hidden, head_weight
    from gopd_kernels import gopd_loss
    from gopd_kernels.reference import gopd_loss_reference

    hidden = final_hidden(model, x["ids"], x["mask"])[:, PROMPT - 1 : -1]
    args = (hidden, head_weight(model), x["targets"], x["teacher"], x["ref"])
    loss = gopd_loss(*args, lam=1.25)[0] if impl == "gopd" else gopd_loss_reference(*args, lam=1.25)
    loss.backward()
    norm = float(watched(model).grad.norm())
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), norm


def prepared(tokens: int, layers: int, dtype: str, device: str, frozen_head: bool = False) -> tuple:
    """(model, the batch, a one-sequence warm-up batch) on `device`."""
    model = qwen3_like(layers).to(device=device, dtype=getattr(torch, dtype))
    model.get_output_embeddings().requires_grad_(not frozen_head)  # tied: the embedding too
    on = lambda x: {k: v.to(device) for k, v in x.items()}  # noqa: E731
    vocab = model.config.vocab_size
    return model, on(batch(tokens // RESPONSE, vocab)), on(batch(1, vocab, seed=2))


def child(impl: str, tokens: int, layers: int, dtype: str, frozen: bool, repeats: int, out: Path) -> None:
    """CPU, in a fresh process: peak RSS of the first step, the time of each."""
    model, x, warm = prepared(tokens, layers, dtype, "cpu", frozen)
    step(model, warm, impl)  # one-time costs
    times, peak, result = timed_calls(lambda: step(model, x, impl), repeats)
    out.write_text(
        json.dumps({"peak_bytes": peak, "times_s": times, "loss": result[0], "grad_norm": result[1]})
    )


def measure_cuda(tokens: int, layers: int, dtype: str, frozen: bool) -> dict:
    """CUDA, in this process, after each implementation's warm-up (compile, autotune): the peak
    of one step, then the step timed as the report's CUDA rows are (cuda_times_ms)."""
    model, x, warm = prepared(tokens, layers, dtype, "cuda", frozen)
    runs = {}
    for name in IMPLS:
        try:
            step(model, warm, name)
            (loss, norm), peak = cuda_peak_bytes(lambda name=name: step(model, x, name))
            times = [ms / 1e3 for ms in cuda_times_ms(lambda name=name: step(model, x, name))]
        except torch.OutOfMemoryError as e:
            runs[name] = {"skipped": f"failed: out of memory ({str(e).splitlines()[0][:100]})"}
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        runs[name] = {"peak_bytes": [peak], "times_s": times, "loss": loss, "grad_norm": norm}
        print(f"    {name:6s} +{peak / 2**20:7.0f} MiB  median {statistics.median(times) * 1e3:.1f} ms "
              f"({len(times)} steps)", flush=True)  # fmt: skip
    return runs


def measure(tokens: int, layers: int, dtype: str, frozen: bool, rounds: int, repeats: int) -> dict:
    """CPU: fresh processes, rounds interleaving the implementations."""
    shape = ["--tokens", str(tokens), "--layers", str(layers), "--dtype", dtype, "--repeats", str(repeats)]
    shape += ["--frozen-head"] if frozen else []
    return child_runs("benchmarks.update_step", list(IMPLS), rounds, shape, CHILD_ENV, ("loss", "grad_norm"))


def check_agreement(runs: dict, rtol: float = 1e-4) -> None:
    """Marks each implementation whose loss or gradient norm differs from naive's by more
    than rtol (relative): its row then says so, and its time is no comparison."""
    naive = runs.get("naive", {})
    for name, run in runs.items():
        if name == "naive" or "skipped" in run or "skipped" in naive:
            continue
        close = lambda a, b: abs(a - b) <= rtol * max(abs(b), 1e-12)  # noqa: E731
        run["agrees"] = close(run["loss"], naive["loss"]) and close(run["grad_norm"], naive["grad_norm"])


def table(record: dict) -> str:
    runs, rows = record["runs"], []
    naive = runs.get("naive", {})
    for name, run in runs.items():
        if "skipped" in run:
            rows.append([name, run["skipped"], "", "", "", "", ""])
            continue
        t, mem = statistics.median(run["times_s"]), max(run["peak_bytes"])
        ok = "skipped" not in naive
        flag = "" if run.get("agrees", True) else " (DISAGREES with naive)"
        rows.append([
            name + flag, f"{t:.2f} s ({min(run['times_s']):.2f}-{max(run['times_s']):.2f})",
            f"{t / statistics.median(naive['times_s']):.2f}x" if ok else "-", f"{mem / 2**20:.0f}",
            f"{mem / max(naive['peak_bytes']):.2f}x" if ok else "-",
            f"{run['loss']:.6f}", f"{run['grad_norm']:.6g}",
        ])  # fmt: skip
    headers = ["impl", "time median (min-max)", "time / naive", "peak MiB", "memory / naive", "loss",
               "grad norm (embedding; final norm if the head is frozen)"]  # fmt: skip
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="2048,8192", help="response tokens per step, comma-separated "
                   f"(multiples of {RESPONSE})")  # fmt: skip
    p.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen3-0.6B has 28)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model and batch")
    p.add_argument(
        "--frozen-head", action="store_true", help="fix the head and tied embedding (as LoRA does)"
    )
    p.add_argument("--rounds", type=int, default=2, help="CPU: fresh processes per implementation")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="CPU: steps per process, the first gives memory (CUDA: cuda_times_ms)",
    )
    p.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tokens = [int(t) for t in str(args.tokens).split(",")]
    if any(t < RESPONSE or t % RESPONSE for t in tokens):
        raise ValueError(f"--tokens: each must be a positive multiple of {RESPONSE}, got {args.tokens}")
    if args.layers < 1:
        raise ValueError(f"--layers must be >= 1, got {args.layers}")
    if args.child:
        return child(
            args.child, tokens[0], args.layers, args.dtype, args.frozen_head, args.repeats, Path(args.out)
        )
    machine = machine_description()
    cuda = torch.cuda.is_available()
    for n in tokens:
        head = ", frozen head" if args.frozen_head else ""
        print(f"update step: {n} response tokens, {args.layers} layers, {args.dtype}{head}", flush=True)
        if cuda:
            runs = measure_cuda(n, args.layers, args.dtype, args.frozen_head)
        else:
            runs = measure(n, args.layers, args.dtype, args.frozen_head, args.rounds, args.repeats)
        check_agreement(runs)
        record = {"tokens": n, "layers": args.layers, "dtype": args.dtype, "frozen_head": args.frozen_head,
                  "machine": machine, "commit": measured_commit(), "runs": runs}  # fmt: skip
        print(table(record), flush=True)
        if not args.no_save:
            folder = RESULTS_DIR / machine_slug(machine) / "update_step"  # apart from the report's JSON
            folder.mkdir(parents=True, exist_ok=True)
            name = f"L{args.layers}_N{n}_{args.dtype}{'_frozen_head' if args.frozen_head else ''}.json"
            (folder / name).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
