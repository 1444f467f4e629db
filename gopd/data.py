"""Prompts from JSONL or Parquet: tokenised (chat template when there is one), with their
domain (which teacher scores them) and reference answer (for evaluation); and a sampler
whose position is part of the checkpoint."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from gopd.config import TrainConfig
from gopd.verifiers import CallCases, Tests


@dataclass
class Example:
    prompt_ids: list[int]
    domain: str
    answer: str | None
    prompt: str
    tests: Tests | None = None  # a code prompt's asserts, stdin cases or calls (eval; gopd.verifiers)


def read_records(path: str) -> list[dict]:
    """Rows of a .jsonl (or gzipped .jsonl.gz, as EvalPlus publishes), a .json list (MBPP's
    sanitized-mbpp.json) or a .parquet file."""
    if path.endswith((".jsonl", ".jsonl.gz")):
        with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.endswith(".json"):
        with open(path) as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
        return rows
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: expected a .jsonl, .jsonl.gz, .json or .parquet file")


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    """`records` one JSON object a line (what read_records reads back), the folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str, chat_template: bool, template_kwargs: dict | None = None
) -> list[int]:
    """Token ids of a prompt: the chat template's user turn and generation prompt (with
    template_kwargs as extra template variables) when asked and present, else the plain text."""
    if chat_template and tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
            **(template_kwargs or {}),
        )  # fmt: skip
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def load_examples(
    path: str,
    cfg: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    context_length: int,
    for_eval: bool = False,
) -> list[Example]:
    """Every record becomes an Example; a bad record is an error naming its line.

    Training: the domain picks the record's teacher. Evaluation (for_eval): every record needs
    a reference answer or tests (gopd.verifiers), and its domain only labels its figures."""
    domains = cfg.teacher_map
    examples = []
    for i, rec in enumerate(read_records(path)):
        where = f"{path} record {i}"
        if cfg.prompt_field not in rec:
            raise ValueError(f"{where}: no field {cfg.prompt_field!r} (prompt_field)")
        domain = str(rec.get(cfg.domain_field, "default")) if for_eval or len(domains) > 1 else "default"
        if not for_eval and domain not in domains:
            raise ValueError(f"{where}: domain {domain!r} has no teacher (teachers: {sorted(domains)})")
        prompt = templated(cfg.prompt_template, str(rec[cfg.prompt_field]), rec.get(cfg.domain_field), where)
        answer = rec.get(cfg.answer_field)
        tests = _tests(rec.get(cfg.tests_field), where, cfg) if for_eval else None
        if for_eval and answer is None and tests is None:
            raise ValueError(
                f"{where}: no field {cfg.answer_field!r} (answer_field) or {cfg.tests_field!r} (tests_field) "
                "for evaluation"
            )
        ids = encode_prompt(tokenizer, prompt, cfg.chat_template, cfg.chat_template_kwargs)
        if len(ids) > cfg.max_prompt_tokens:
            raise ValueError(
                f"{where}: prompt has {len(ids)} tokens > max_prompt_tokens={cfg.max_prompt_tokens}"
            )
        if len(ids) + cfg.max_new_tokens > context_length:
            raise ValueError(
                f"{where}: prompt ({len(ids)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the "
                f"model's context of {context_length} tokens"
            )
        answer = None if answer is None else str(answer)
        examples.append(Example(ids, domain, answer, prompt, tests))
    if not examples:
        raise ValueError(f"{path}: no records")
    return examples


def templated(template: str | dict | None, prompt: str, domain, where: str) -> str:
    """The prompt put into prompt_template where it says {prompt} (a plain replacement: the
    template's other braces, \\boxed{} among them, stay as they are); with a template per
    domain, the record's domain picks it."""
    if template is None:
        return prompt
    if isinstance(template, dict):
        key = "default" if domain is None else str(domain)
        if key not in template:
            raise ValueError(f"{where}: domain {key!r} has no prompt_template (it has {sorted(template)})")
        template = template[key]
    return template.replace("{prompt}", prompt)


def _tests(value, where: str, cfg: TrainConfig) -> Tests | None:
    """A record's tests (gopd.verifiers): asserts as one Python source, from a string or a list
    of statements (MBPP's test_list); stdin cases, from a list of {"input", "output"}; or
    {"inputs": [...], "outputs": [...]} (APPS's and LiveCodeBench's `input_output`), stdin
    cases without "fn_name" and calls of that function with it (LiveCodeBench's "functional"
    tests: arguments as JSON lines, the return value as JSON). Refused before any sampling
    unless allow_code_execution."""
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = "\n".join(value)
    elif isinstance(value, list) and all(_is_stdin_case(v) for v in value) and value:
        value = [(v["input"], v["output"]) for v in value]
    elif isinstance(value, dict):
        value = _input_output(value, where, cfg)
    elif not isinstance(value, str):
        raise ValueError(f"{where}: {cfg.tests_field!r} (tests_field) must be a string of asserts, a list of "
                         'them, a list of {"input": ..., "output": ...} stdin cases, or {"inputs": [...], '
                         '"outputs": [...], "fn_name": ...}')  # fmt: skip
    if not cfg.allow_code_execution:
        raise ValueError(
            f"{where}: has tests ({cfg.tests_field!r}), which run the model's responses as Python on this "
            "machine: set allow_code_execution: true to evaluate it"
        )
    return value


def _input_output(value: dict, where: str, cfg: TrainConfig) -> list[tuple[str, str]] | CallCases:
    """{"inputs", "outputs", optional "fn_name"}: stdin cases, or CallCases when fn_name is set."""
    inputs, outputs, name = value.get("inputs"), value.get("outputs"), value.get("fn_name")
    field = f"{where}: {cfg.tests_field!r} (tests_field)"
    if set(value) - {"inputs", "outputs", "fn_name"}:
        raise ValueError(f"{field}: unknown keys {sorted(set(value) - {'inputs', 'outputs', 'fn_name'})}")
    strings = all(isinstance(v, str) for v in [*(inputs or []), *(outputs or [])])
    if not (isinstance(inputs, list) and isinstance(outputs, list) and inputs and strings):
        raise ValueError(f"{field}: 'inputs' and 'outputs' must be lists of strings, as many of each")
    if len(inputs) != len(outputs):
        raise ValueError(f"{field}: {len(inputs)} inputs but {len(outputs)} outputs")
    if name is None:
        return list(zip(inputs, outputs, strict=True))
    try:
        return CallCases(str(name), tuple(zip(inputs, outputs, strict=True)))
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from exc


def _is_stdin_case(case) -> bool:
    """{"input": str, "output": str}, with no testtype or "stdin" (LiveCodeBench's
    "functional" ones need their function's name: the {"inputs", "outputs", "fn_name"} form)."""
    if not isinstance(case, dict) or case.get("testtype", "stdin") != "stdin":
        return False
    return isinstance(case.get("input"), str) and isinstance(case.get("output"), str)


class PromptSampler:
    """Shuffled passes over the examples; (epoch, position) is saved with checkpoints."""

    def __init__(self, examples: list[Example], seed: int):
        self.examples, self.seed = examples, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next_batch(self, n: int) -> list[Example]:
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            batch.append(self.examples[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if "epoch" not in state:
            raise ValueError("domain_weights: the checkpoint's sampler drew by domain; resume with the same "
                             "domain_weights")  # fmt: skip
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()


class DomainMixSampler:
    """Each batch draws its prompts from the domains in fixed proportions (domain_weights):
    counts by largest remainder, each domain from its own shuffled passes (a PromptSampler),
    the batch then shuffled so that micro- and mini-batches mix the domains. Its state (each
    domain's position, batches drawn) is saved with checkpoints, as PromptSampler's."""

    def __init__(self, examples: list[Example], seed: int, weights: dict[str, float]):
        self.weights = {d: float(w) for d, w in weights.items() if w > 0}
        self.samplers = {}
        for i, domain in enumerate(self.weights):
            mine = [ex for ex in examples if ex.domain == domain]
            if not mine:
                raise ValueError(f"domain_weights: domain {domain!r} has no prompts in train_data")
            self.samplers[domain] = PromptSampler(mine, seed * 1_000_003 + i)
        self.seed, self.batches = seed, 0

    def counts(self, n: int) -> dict[str, int]:
        """n split by the weights: the floors, then one more for the largest remainders."""
        total = sum(self.weights.values())
        exact = {d: n * w / total for d, w in self.weights.items()}
        counts = {d: int(x) for d, x in exact.items()}
        by_remainder = sorted(exact, key=lambda d: counts[d] - exact[d])  # largest remainder first, stable
        for d in by_remainder[: n - sum(counts.values())]:
            counts[d] += 1
        return counts

    def next_batch(self, n: int) -> list[Example]:
        batch = [ex for d, k in self.counts(n).items() for ex in self.samplers[d].next_batch(k)]
        g = torch.Generator().manual_seed(self.seed * 7_919 + self.batches)
        self.batches += 1
        return [batch[i] for i in torch.randperm(len(batch), generator=g).tolist()]

    def state_dict(self) -> dict:
        return {"batches": self.batches, "domains": {d: s.state_dict() for d, s in self.samplers.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = sorted(state.get("domains", ()))
        if saved != sorted(self.samplers):
            raise ValueError(
                f"domain_weights: the checkpoint's sampler drew from the domains {saved}, this run from "
                f"{sorted(self.samplers)}: resume with the same weights"
            )
        self.batches = state["batches"]
        for d, sampler in self.samplers.items():
            sampler.load_state_dict(state["domains"][d])


def make_sampler(examples: list[Example], cfg: TrainConfig) -> PromptSampler | DomainMixSampler:
    """The training prompts' sampler: uniform over all of them, or by cfg.domain_weights."""
    if cfg.domain_weights:
        return DomainMixSampler(examples, cfg.seed, cfg.domain_weights)
    return PromptSampler(examples, cfg.seed)
