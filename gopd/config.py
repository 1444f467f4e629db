"""The trainer's one config: a dataclass, loadable from YAML, overridable from the command line.

Defaults follow the official G-OPD / ExOPD runs (lam 1.25, temperature 1.0, top_p 1.0, lr
1e-5 constant, one sample per prompt, one update per batch, truncated IS cap 5,
token-mean). A setting that cannot take effect is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

OBJECTIVES = ("sampled", "dense")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("float32", "bfloat16", "float16")
ENGINES = ("hf", "vllm")
LOGGERS = ("jsonl", "console", "tensorboard", "wandb")
KERNEL_BACKENDS = ("auto", "triton", "torch")
ANSWER_MATCHES = ("exact", "math", "symbolic")  # gopd.verifiers
SYMBOLIC_NEEDS = "needs math-verify: pip install 'gopd[math]'"


def _is_int(value: Any, low: int) -> bool:
    """An int >= low. A bool is not one: YAML's `true` would pass as 1 unseen."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # -- models -----------------------------------------------------------------------
    student: str = _f("", "student checkpoint: a local directory in Hugging Face format (or a hub id)")
    teachers: Any = _f("", "teacher checkpoint, or a mapping {domain: checkpoint} for multi-teacher merging")
    reference: str = _f(
        "student",
        "reference model: 'student' (the student's initial weights) or a checkpoint, e.g. the teacher's "
        "pre-RL base (reward correction)",
    )
    # -- objective --------------------------------------------------------------------
    lam: float = _f(1.25, "reward scale lambda: 1 = OPD, > 1 = ExOPD reward extrapolation, < 1 interpolation")
    objective: str = _f("sampled", "'sampled' (the paper's per-token loss) or 'dense' (full-vocabulary KL)")
    temperature: float = _f(1.0, "sampling temperature; every log-prob (student, teacher, reference) uses it")
    top_p: float = _f(1.0, "nucleus sampling for rollouts (1.0 = off)")
    loss_agg: str = _f("token-mean", "token-mean | seq-mean-token-mean | seq-mean-token-sum")
    clip_ratio: list = _f(
        [0.2, 0.2], "PPO clip (low, high); acts only off-policy (mini_batch_prompts, update_epochs)"
    )
    is_cap: float | None = _f(
        5.0, "truncated importance weight cap on exp(old - rollout) log-probs; null = off"
    )
    # -- data -------------------------------------------------------------------------
    train_data: str = _f("", "training prompts: a .jsonl or .parquet file")
    eval_data: str | None = _f(None, "held-out prompts with reference answers (.jsonl or .parquet)")
    prompt_field: str = _f("prompt", "record field holding the prompt text")
    answer_field: str = _f("answer", "record field holding the reference answer (eval)")
    tests_field: str = _f(
        "tests", "record field holding Python unit tests (eval of code: run after the response's code)"
    )
    domain_field: str = _f("domain", "record field naming the domain (picks the teacher when several)")
    domain_weights: dict | None = _f(
        None,
        "{domain: weight}: each step's prompts drawn from the domains in these proportions, each from its "
        "own shuffled passes; null = uniformly over all prompts (proportional to the domains' sizes)",
    )
    prompt_template: Any = _f(
        None,
        "each record's prompt put into this text where it says {prompt}, before the chat template (e.g. "
        "'{prompt} Put your final answer within \\boxed{}.'); or {domain: template}, each record by its "
        "domain; null = the prompt as it is",
    )
    chat_template: bool = _f(True, "apply the tokenizer's chat template to prompts when it has one")
    chat_template_kwargs: dict = _f(
        {},
        "extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3's non-thinking mode",
    )
    max_prompt_tokens: int = _f(1024, "longest prompt allowed (tokens); longer ones are an error")
    max_new_tokens: int = _f(1024, "longest response sampled (tokens)")
    # -- batch ------------------------------------------------------------------------
    prompts_per_step: int = _f(64, "prompts sampled per step (one rollout batch)")
    samples_per_prompt: int = _f(1, "responses sampled per prompt")
    mini_batch_prompts: int | None = _f(
        None,
        "prompts per optimizer update; null = prompts_per_step: one update per rollout batch, on-policy (the "
        "official setting). Smaller: prompts_per_step / mini_batch_prompts updates per step, the later ones "
        "off-policy (PPO ratio and clipping against the student's log-probs before the first)",
    )
    update_epochs: int = _f(1, "passes over each rollout batch's mini-batches (> 1: off-policy, as above)")
    micro_batch_size: int = _f(16, "most sequences per forward/backward (gradient accumulation)")
    micro_batch_tokens: int | None = _f(
        None,
        "most padded tokens per forward/backward (rows x longest row; rows are grouped by length; "
        "with pack_sequences, real tokens); null = micro_batch_size alone decides",
    )
    attn_implementation: str | None = _f(
        None,
        "transformers' attention for every model (sdpa, eager, flash_attention_2, flash_attention_3, ...); "
        "null = transformers' default, sdpa. flash_attention_2/3 (their packages installed) run "
        "pack_sequences' rows with varlen kernels",
    )
    pack_sequences: bool = _f(
        False,
        "run each micro-batch's sequences end to end without their padding (position ids restart per "
        "sequence, which transformers keeps apart): one row through flash attention's varlen kernels, "
        "or for sdpa/eager bins as long as the micro-batch's longest sequence, each with a "
        "block-diagonal mask; checked per model, which must keep them apart",
    )
    # -- optimisation -----------------------------------------------------------------
    lr: float = _f(1e-5, "AdamW learning rate")
    lr_schedule: str = _f("constant", "constant | cosine | linear (decay to 0 after warmup)")
    warmup_steps: int = _f(0, "linear warmup, in optimizer updates")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_betas: list = _f([0.9, 0.999], "AdamW betas")
    grad_clip: float | None = _f(1.0, "clip the global gradient norm to this; null = off")
    steps: int | None = _f(None, "optimizer steps; null = as many as `epochs` passes over train_data take")
    epochs: int = _f(1, "passes over train_data when steps is null")
    # -- evaluation, checkpoints, logging ---------------------------------------------
    eval_every: int = _f(0, "evaluate every N steps (0 = only at the start and the end)")
    eval_samples: int = _f(4, "k of avg@k: samples per eval prompt")
    eval_max_prompts: int | None = _f(None, "evaluate on at most this many eval prompts")
    eval_temperature: float | None = _f(
        None, "sampling temperature of evaluation; null = temperature, 0 = greedy"
    )
    eval_top_p: float | None = _f(None, "nucleus sampling of evaluation; null = top_p")
    eval_teachers: bool = _f(
        False, "also evaluate each teacher at the start, as the student is: the bar the student is held to"
    )
    eval_log_samples: bool = _f(
        False,
        "write every evaluation sample (response, right or not, length, answer read) to "
        "output_dir/eval_samples/step_N.jsonl (the teachers': teacher_<domain>.jsonl)",
    )
    answer_match: str = _f(
        "math",
        "exact | math | symbolic: how a final answer meets the reference (math: normalised LaTeX, "
        "exact numbers; symbolic: that, or equal in SymPy, needs math-verify)",
    )
    allow_code_execution: bool = _f(
        False, "run eval responses to records with tests as Python on this machine (no sandbox: opt in)"
    )
    code_timeout: float = _f(10.0, "seconds each test run may take (eval of code)")
    code_workers: int = _f(4, "test runs at once, each its own process (eval of code)")
    save_every: int = _f(0, "save a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int | None = _f(
        None, "keep only the newest N checkpoints, removing older ones once a new one is complete; null = all"
    )
    keep_best: bool = _f(
        False,
        "at each evaluation whose avg@k beats every earlier one (after step 0), write a checkpoint "
        "there and name it in output_dir/best.json; keep_checkpoints never removes it",
    )
    output_dir: str = _f("runs/gopd", "where checkpoints, metrics.jsonl and logs go")
    loggers: list = _f(["jsonl", "console"], "any of jsonl, console, tensorboard, wandb")
    wandb_project: str = _f("gopd", "W&B project (with the wandb logger)")
    # -- execution --------------------------------------------------------------------
    seed: int = _f(0, "seed for data order, sampling and initialisation")
    dtype: str = _f(
        "float32",
        "float32 | bfloat16 | float16: weights and compute of all models (a half-precision "
        "student's optimizer steps float32 master copies of its weights)",
    )
    device: str = _f("auto", "auto (cuda if present) | cpu | cuda | cuda:N")
    rollout_engine: str = _f("hf", "hf (transformers generate) | vllm (colocated, optional extra)")
    generate_batch_size: int | None = _f(
        None,
        "most sequences per transformers generate call (rollouts and evaluation), which bounds its KV "
        "cache: rows x (prompt + max_new_tokens) tokens; null = a whole batch at once",
    )
    vllm_gpu_memory_utilization: float | None = _f(
        None,
        "share of the GPU's memory vLLM may take for its weights and KV cache (rollout_engine "
        "vllm; null = 0.4, leaving the rest to the student, the teachers and the update)",
    )
    vllm_sleep: bool = _f(
        False,
        "rollout_engine vllm: free vLLM's GPU memory (weights and KV cache, sleep level 2) between "
        "rollouts, for scoring and the update; the student's weights are loaded at each wake-up",
    )
    offload_frozen: bool = _f(False, "keep teachers and reference on the CPU between uses")
    shard_optimizer: bool = _f(
        False,
        "under torchrun: each rank keeps the float32 master weights and AdamW moments of only its share of "
        "the student's tensors (ZeRO stage 1: 12/W instead of 12 bytes per weight on W ranks) and "
        "broadcasts its updated weights after each step",
    )
    fsdp: bool = _f(
        False,
        "under torchrun: shard the student's weights, gradients and AdamW state over the ranks (FSDP2, "
        "ZeRO stage 3; float32 weights computed in dtype), for students that do not fit one GPU with "
        "their optimizer (shard_frozen does the same for the teachers and reference)",
    )
    shard_frozen: bool = _f(
        False,
        "under torchrun: shard the teachers and the reference over the ranks (FSDP2): each rank keeps 1/W of "
        "their weights and gathers a layer at a time while scoring, for teachers too large to copy onto "
        "every GPU",
    )
    gradient_checkpointing: bool = _f(False, "recompute the student's activations in the backward")
    freeze_lm_head: bool = _f(
        False,
        "keep the student's LM head fixed (and its input embeddings when the two are tied): the loss "
        "then skips the head's gradient GEMM, and neither the V x D gradient nor its optimizer state exist",
    )
    lora_rank: int = _f(
        0,
        "train LoRA adapters of this rank on the student instead of all its weights (0 = full fine-tuning; "
        "needs peft: pip install 'gopd[lora]'); with reference 'student' the reference is the student with "
        "its adapters off, so no copy of it is loaded",
    )
    lora_alpha: float | None = _f(
        None, "LoRA scale numerator (the update is alpha / rank * B A); null = 2 x rank"
    )
    lora_dropout: float = _f(0.0, "dropout on the LoRA adapters' inputs")
    lora_target_modules: Any = _f(
        "all-linear",
        "modules given adapters: 'all-linear' (every linear layer but the LM head) or a list of module names",
    )
    liger: bool = _f(False, "apply liger-kernel's model patches to the student (CUDA only)")
    kernel_backend: str = _f("auto", "gopd_kernels backend: auto | triton | torch")
    loss_fold: bool | None = _f(
        None,
        "compute the loss's gradient in its forward (the logits once, a [rows, V] fp32 chunk held) instead "
        "of recomputing the logits in the backward (leanest); null = where measured faster: the torch "
        "backend, and the Triton backend with bf16 heads (H100: sampled 1.4x, dense 2.3-2.8x faster, "
        "for 1.5-2x the memory)",
    )

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per rollout batch: its mini-batches, update_epochs times over."""
        return (
            self.prompts_per_step // (self.mini_batch_prompts or self.prompts_per_step) * self.update_epochs
        )

    @property
    def eval_sampling(self) -> tuple[float, float]:
        """(temperature, top_p) of evaluation: its own settings, else training's."""
        temperature = self.temperature if self.eval_temperature is None else self.eval_temperature
        return temperature, self.top_p if self.eval_top_p is None else self.eval_top_p

    @property
    def teacher_map(self) -> dict[str, str]:
        """{domain: checkpoint}; a single teacher serves every domain under the key 'default'."""
        return dict(self.teachers) if isinstance(self.teachers, dict) else {"default": self.teachers}

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the setting for anything that cannot work."""
        err = _Errors()
        err.need(bool(self.student), "student", "is required")
        teachers = self.teacher_map
        err.need(
            all(teachers.values()) and bool(teachers), "teachers", "is required (a path or {domain: path})"
        )
        for name, path in [("student", self.student), *((f"teachers.{k}", v) for k, v in teachers.items())]:
            err.need(not path or _exists_or_hub_id(path), name, f"path {path!r} does not exist")
        if self.reference != "student":
            err.need(
                _exists_or_hub_id(self.reference), "reference", f"path {self.reference!r} does not exist"
            )
        err.need(
            _finite(self.lam) and self.lam >= 0, "lam", f"must be a finite number >= 0, got {self.lam!r}"
        )
        err.choice(self.objective, OBJECTIVES, "objective")
        err.need(_finite(self.temperature) and self.temperature > 0, "temperature", "must be > 0")
        err.need(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        err.choice(self.loss_agg, LOSS_AGGS, "loss_agg")
        err.need(len(self.clip_ratio) == 2 and 0 <= self.clip_ratio[0] < 1 and self.clip_ratio[1] >= 0,
                 "clip_ratio", "must be [low, high] with 0 <= low < 1, high >= 0")  # fmt: skip
        err.need(
            self.is_cap is None or (_finite(self.is_cap) and self.is_cap > 0), "is_cap", "must be > 0 or null"
        )
        err.need(self.loss_fold in (None, True, False), "loss_fold", "must be true, false or null")
        if self.objective == "dense":
            err.need(
                self.is_cap is None,
                "is_cap",
                "applies to objective 'sampled' only; set it to null for 'dense'",
            )
        err.need(bool(self.train_data), "train_data", "is required")
        err.need(isinstance(self.chat_template_kwargs, dict), "chat_template_kwargs", "must be a mapping")
        template = self.prompt_template
        forms = list(template.values()) if isinstance(template, dict) else [template]
        one_slot = bool(forms) and all(isinstance(t, str) and t.count("{prompt}") == 1 for t in forms)
        err.need(template is None or one_slot, "prompt_template",
                 "must be null, a text holding {prompt} once, or {domain: such a text} (a YAML string: "
                 "quote it, since {prompt} alone reads as a mapping)")  # fmt: skip
        err.need(self.chat_template or not self.chat_template_kwargs, "chat_template_kwargs",
                 "applies only with chat_template: true")  # fmt: skip
        for name in ("train_data", "eval_data"):
            path = getattr(self, name)
            if path:
                err.need(os.path.isfile(path), name, f"file {path!r} does not exist")
                err.need(path.endswith((".jsonl", ".parquet")), name, "must be a .jsonl or .parquet file")
        for name in ("max_prompt_tokens", "max_new_tokens", "prompts_per_step", "samples_per_prompt",
                     "micro_batch_size", "eval_samples", "epochs", "code_workers",
                     "update_epochs"):  # fmt: skip
            err.need(
                _is_int(getattr(self, name), 1), name, f"must be an int >= 1, got {getattr(self, name)!r}"
            )
        for name in ("steps", "keep_checkpoints", "generate_batch_size", "eval_max_prompts"):
            value = getattr(self, name)
            err.need(value is None or _is_int(value, 1), name, f"must be null or an int >= 1, got {value!r}")
        if self.mini_batch_prompts is not None:
            step = self.prompts_per_step
            err.need(
                _is_int(self.mini_batch_prompts, 1) and _is_int(step, 1)
                and step % self.mini_batch_prompts == 0,
                "mini_batch_prompts", f"must be null or an int >= 1 dividing prompts_per_step ({step})",
            )  # fmt: skip
        if self.micro_batch_tokens is not None:
            lengths = (self.max_prompt_tokens, self.max_new_tokens)
            longest = sum(lengths) if all(_is_int(n, 1) for n in lengths) else 1
            err.need(
                _is_int(self.micro_batch_tokens, longest),
                "micro_batch_tokens",
                f"must be null or an int >= max_prompt_tokens + max_new_tokens ({longest}), the longest row",
            )
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            err.need(
                _is_int(getattr(self, name), 0), name, f"must be an int >= 0, got {getattr(self, name)!r}"
            )
        err.need(_finite(self.lr) and self.lr > 0, "lr", "must be > 0")
        err.choice(self.lr_schedule, SCHEDULES, "lr_schedule")
        err.need(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be >= 0")
        err.need(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas", "2 in [0,1)"
        )
        err.need(
            self.grad_clip is None or (_finite(self.grad_clip) and self.grad_clip > 0), "grad_clip", "> 0"
        )
        err.need(self.eval_every == 0 or bool(self.eval_data), "eval_every", "needs eval_data")
        for name in ("eval_temperature", "eval_top_p", "eval_max_prompts"):  # evaluation's alone
            err.need(getattr(self, name) is None or bool(self.eval_data), name, "needs eval_data")
        for name in ("allow_code_execution", "eval_teachers", "keep_best", "eval_log_samples"):
            err.need(not getattr(self, name) or bool(self.eval_data), name, "needs eval_data")
        if self.domain_weights is not None:
            weights = self.domain_weights
            err.need(
                isinstance(weights, dict) and set(weights) == set(teachers) and len(teachers) > 1,
                "domain_weights", f"must map each teacher's domain to a weight ({sorted(teachers)})",
            )  # fmt: skip
            values = list(weights.values()) if isinstance(weights, dict) else []
            err.need(all(_finite(w) and w >= 0 for w in values) and sum(values) > 0, "domain_weights",
                     "weights must be numbers >= 0, not all 0")  # fmt: skip
        t = self.eval_temperature
        err.need(
            t is None or (_finite(t) and t >= 0), "eval_temperature", "must be null or a finite number >= 0"
        )
        err.need(t != 0 or self.eval_samples == 1, "eval_samples",
                 "must be 1 at eval_temperature 0 (greedy: every sample is the same)")  # fmt: skip
        p = self.eval_top_p
        err.need(p is None or (_finite(p) and 0 < p <= 1), "eval_top_p", "must be null or in (0, 1]")
        err.choice(self.answer_match, ANSWER_MATCHES, "answer_match")
        err.need(self.answer_match != "symbolic" or _installed("math_verify"), "answer_match",
                 f"'symbolic' {SYMBOLIC_NEEDS}")  # fmt: skip
        for f in dataclasses.fields(self):  # a switch given as "on" or 1 would pass as true unseen
            if f.type in ("bool", "bool | None"):
                value, nullable = getattr(self, f.name), f.type != "bool"
                err.need(isinstance(value, bool) or (nullable and value is None), f.name,
                         f"must be true or false{' or null' if nullable else ''}, got {value!r}")  # fmt: skip
        err.need(_finite(self.code_timeout) and self.code_timeout > 0, "code_timeout", "must be > 0")
        err.choice(self.dtype, DTYPES, "dtype")
        attn = self.attn_implementation
        named = isinstance(attn, str) and attn.strip() == attn != ""
        err.need(attn is None or named, "attn_implementation",
                 f"must be null or a name (sdpa, flash_attention_2, ...), got {attn!r}")  # fmt: skip
        err.choice(self.rollout_engine, ENGINES, "rollout_engine")
        share = self.vllm_gpu_memory_utilization
        if self.rollout_engine == "vllm":
            err.need(share is None or (_finite(share) and 0 < share < 1), "vllm_gpu_memory_utilization",
                     "must be in (0, 1) or null")  # fmt: skip
        else:
            err.need(share is None, "vllm_gpu_memory_utilization",
                     "applies to rollout_engine 'vllm' only; leave it null")  # fmt: skip
            err.need(not self.vllm_sleep, "vllm_sleep", "applies to rollout_engine 'vllm' only")
        # vLLM schedules its own batches; transformers samples there only for eval_teachers' teachers
        # of another shape than the student (gopd.evaluate.evaluate_teachers)
        err.need(self.generate_batch_size is None or self.rollout_engine == "hf" or self.eval_teachers,
                 "generate_batch_size",
                 "applies to transformers generate: rollout_engine 'hf', or eval_teachers' teachers "
                 "under vllm")  # fmt: skip
        self._validate_lora(err)
        self._validate_fsdp(err)
        err.choice(self.kernel_backend, KERNEL_BACKENDS, "kernel_backend")
        for name in self.loggers:
            err.choice(name, LOGGERS, "loggers")
        err.need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
                 f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")  # fmt: skip
        err.raise_if_any()
        return self

    def _validate_fsdp(self, err: _Errors) -> None:
        """What fsdp and shard_frozen do not combine with (yet), each an error naming the setting."""
        err.need(not (self.shard_frozen and self.offload_frozen), "offload_frozen",
                 "does not combine with shard_frozen (sharded, they stay on the GPU)")  # fmt: skip
        if not self.fsdp:
            return
        err.need(not self.shard_optimizer, "shard_optimizer", "fsdp shards it already; leave it off")
        err.need(not self.liger, "liger", "liger's patches are not supported with fsdp")
        err.need(not self.pack_sequences, "pack_sequences", "is not supported with fsdp yet")

    def _validate_lora(self, err: _Errors) -> None:
        rank = self.lora_rank
        err.need(_is_int(rank, 0), "lora_rank",
                 f"must be an int >= 0, got {rank!r}")  # fmt: skip
        targets = self.lora_target_modules
        err.need(
            targets == "all-linear" or (isinstance(targets, list) and bool(targets)
                                        and all(isinstance(t, str) for t in targets)),
            "lora_target_modules", f"must be 'all-linear' or a list of module names, got {targets!r}",
        )  # fmt: skip
        err.need(not (isinstance(targets, list) and "lm_head" in targets), "lora_target_modules",
                 "the LM head cannot take an adapter: gopd's losses read its weight directly")  # fmt: skip
        alpha, dropout = self.lora_alpha, self.lora_dropout
        err.need(alpha is None or (_finite(alpha) and alpha > 0), "lora_alpha", "must be > 0 or null")
        err.need(_finite(dropout) and 0 <= dropout < 1, "lora_dropout", "must be in [0, 1)")
        if rank == 0:  # the other LoRA settings would do nothing
            for name, default in (
                ("lora_alpha", None),
                ("lora_dropout", 0.0),
                ("lora_target_modules", "all-linear"),
            ):
                err.need(getattr(self, name) == default, name, "applies only with lora_rank > 0")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _exists_or_hub_id(path: str) -> bool:
    """Local paths must exist; 'org/name' with no such local path is taken for a hub id."""
    if os.path.exists(path):
        return True
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    return not looks_local


class _Errors:
    def __init__(self):
        self.messages: list[str] = []

    def need(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            self.messages.append(f"{name}: {message}")

    def choice(self, value, choices, name: str) -> None:
        self.need(value in choices, name, f"must be one of {choices}, got {value!r}")

    def raise_if_any(self) -> None:
        if self.messages:
            raise ValueError("invalid config:\n  " + "\n  ".join(self.messages))


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-5 as a string (its floats need a dot: 1.0e-5); this loader also reads
    the exponent forms YAML 1.2 and Python take as floats, so that `lr: 1e-5` means 1e-5."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text):
    """Settings from YAML text or a file (safe loading; 1e-5 is a float)."""
    return yaml.load(text, Loader=_Loader)


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (optional) then overrides; unknown keys are an error. Returns a validated config."""
    values: dict[str, Any] = {}
    if path:
        with open(path) as f:
            values = yaml_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config {path!r} must hold a mapping of settings")
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys: {unknown}")
    return TrainConfig(**values).validate()


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
