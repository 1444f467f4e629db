"""Rollouts: the student samples responses; each keeps the engine's own log-probs of its
tokens (r_t, for the truncated importance-sampling correction).

Engines: `HFRolloutEngine` (transformers generate; CPU or GPU, batched, left padding) and
`VLLMRolloutEngine` (colocated vLLM >= 0.10.2, the optional `vllm` extra; needs CUDA).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from gopd.config import TrainConfig
from gopd.data import Example
from gopd.distributed import SINGLE, DistContext
from gopd.fsdp import is_sharded
from gopd.models import servable_weights

IGNORE = -100
VLLM_MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"
VLLM_GPU_MEMORY_UTILIZATION = 0.4  # when the config leaves it null
logger = logging.getLogger("gopd")


@dataclass
class Rollouts:
    sequences: torch.Tensor  # [B, P + R]: left-padded prompt, then right-padded response
    attention_mask: torch.Tensor  # [B, P + R]
    prompt_len: int  # P
    response_mask: torch.Tensor  # [B, R] bool: response tokens up to and including EOS
    rollout_logp: torch.Tensor  # [B, R] float32: the engine's log-prob of each response token (0 elsewhere)
    examples: list[Example]  # one per row

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len :]

    @property
    def targets(self) -> torch.Tensor:
        """Response token ids, IGNORE where the response has ended: the targets of the losses."""
        return self.responses.masked_fill(~self.response_mask, IGNORE)

    @property
    def width(self) -> int:
        """R: response columns (the longest response of these rows, or more before trimming)."""
        return self.response_mask.shape[1]

    def prompt_lengths(self) -> torch.Tensor:
        """[B] tokens of each row's prompt (without its left padding)."""
        return self.attention_mask[:, : self.prompt_len].sum(-1)

    def response_lengths(self) -> torch.Tensor:
        """[B] response columns each row needs: up to its last valid token (EOS included)."""
        return (self.response_mask * torch.arange(1, self.width + 1)).amax(-1)

    def cut(self, eos_ids: int | list[int]) -> torch.Tensor:
        """[B] whether each response ended without an EOS: max_new_tokens cut it."""
        return ~(is_stop(self.responses, eos_ids) & self.response_mask).any(-1)

    def select(self, rows: torch.Tensor | list[int]) -> Rollouts:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return replace(
            self,
            sequences=self.sequences[rows],
            attention_mask=self.attention_mask[rows],
            response_mask=self.response_mask[rows],
            rollout_logp=self.rollout_logp[rows],
            examples=[self.examples[i] for i in rows.tolist()],
        )

    def trimmed(self) -> Rollouts:
        """The same rows without the columns that are padding in all of them: the prompts'
        left padding beyond the longest prompt here, the responses' right padding beyond the
        longest response here. The model's outputs at the kept positions do not change
        (positions follow the attention mask; attention is causal), only their cost: a step's
        batch is padded to the longest response of the whole step. At least one column of
        each is kept."""
        prompt = max(1, int(self.prompt_lengths().max()))
        response = max(1, int(self.response_lengths().max()))
        if prompt == self.prompt_len and response == self.width:
            return self
        cols = slice(self.prompt_len - prompt, self.prompt_len + response)
        return replace(
            self,
            sequences=self.sequences[:, cols],
            attention_mask=self.attention_mask[:, cols],
            prompt_len=prompt,
            response_mask=self.response_mask[:, :response],
            rollout_logp=self.rollout_logp[:, :response],
        )

    @staticmethod
    def concat(parts: list[Rollouts], pad_id: int) -> Rollouts:
        """The rows of `parts` in one batch: each part's prompts left-padded and responses
        right-padded to the widest (the model's outputs do not change; see trimmed)."""
        if len(parts) == 1:
            return parts[0]
        P, R = max(p.prompt_len for p in parts), max(p.width for p in parts)

        def widen(p: Rollouts) -> tuple[torch.Tensor, ...]:
            sides, right = (P - p.prompt_len, R - p.width), (0, R - p.width)
            return (F.pad(p.sequences, sides, value=pad_id), F.pad(p.attention_mask, sides, value=0),
                    F.pad(p.response_mask, right, value=False), F.pad(p.rollout_logp, right))  # fmt: skip

        sequences, attention, valid, logp = (torch.cat(c) for c in zip(*map(widen, parts), strict=True))
        return Rollouts(sequences, attention, P, valid, logp, [ex for p in parts for ex in p.examples])


class RolloutEngine(Protocol):
    in_step: bool  # every rank must call generate as often as the others (gopd.fsdp)
    eos_ids: list[int]  # a response ends at the first of them (stop_ids)
    max_rows: int | None  # most sequences it samples at once (None: no limit); more take several calls

    def generate(
        self, examples: list[Example], samples: int, temperature: float, top_p: float | None = None
    ) -> Rollouts:
        """`samples` responses per example, at `temperature` (0: greedy) and `top_p` (None: the
        config's, the training setting)."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None: ...


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def stop_ids(generation_config: GenerationConfig | None, tokenizer) -> list[int]:
    """The ids that end a response: the tokenizer's EOS and the checkpoint's generation_config
    EOS ids. Chat checkpoints often list several (Qwen3: <|im_end|> and <|endoftext|>; Llama 3
    Instruct: <|eot_id|> among others), and a tokenizer's own EOS may be the one a chat turn
    does not end with; both engines stop at any of them, and a response ends at the first."""
    listed = getattr(generation_config, "eos_token_id", None)
    listed = listed if isinstance(listed, list) else [] if listed is None else [listed]
    return list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *listed] if i is not None))


def is_stop(responses: torch.Tensor, eos_ids: int | list[int]) -> torch.Tensor:
    """Where the responses hold an EOS (any of eos_ids)."""
    return torch.isin(responses, torch.tensor(eos_ids, dtype=responses.dtype, device=responses.device))


def response_mask(responses: torch.Tensor, eos_ids: int | list[int]) -> torch.Tensor:
    """True up to and including the first EOS of each row (everything when there is none)."""
    stop = is_stop(responses, eos_ids).long()
    return (stop.cumsum(-1) - stop) == 0


class _SampledLogprobs(LogitsProcessor):
    """Records log p(sampled token) under the final processed scores (temperature, top-p),
    keeping one step of scores: generate(output_scores=True) would keep all R x B x V."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.logps: list[torch.Tensor] = []

    def _record(self, tokens: torch.Tensor) -> None:
        logp = torch.log_softmax(self.previous.float(), dim=-1)
        self.logps.append(logp.gather(-1, tokens[:, None]).squeeze(-1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self._record(input_ids[:, -1])
        self.previous = scores
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        self._record(last_tokens)
        return torch.stack(self.logps, dim=1)


class HFRolloutEngine:
    """Batched sampling with transformers' generate from the student itself."""

    def __init__(self, model, tokenizer, cfg: TrainConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.eos_ids = stop_ids(model.generation_config, tokenizer)

    @property
    def in_step(self) -> bool:
        """Whether every rank must call generate as often as the others: a sharded model (the
        student under fsdp, a teacher under shard_frozen) gathers its weights at every token
        (generate's synced_gpus)."""
        return bool(self.cfg.fsdp) or is_sharded(self.model)

    @property
    def max_rows(self) -> int | None:
        """Most sequences per generate call (generate_batch_size); None: no limit."""
        return self.cfg.generate_batch_size

    def generate(
        self, examples: list[Example], samples: int, temperature: float, top_p: float | None = None
    ) -> Rollouts:
        top_p = self.cfg.top_p if top_p is None else top_p
        rows = [ex for ex in examples for _ in range(samples)]
        size = self.max_rows or len(rows)
        parts = [self._generate(rows[i : i + size], temperature, top_p) for i in range(0, len(rows), size)]
        return Rollouts.concat(parts, self.tokenizer.pad_token_id)

    def _generate(self, rows: list[Example], temperature: float, top_p: float) -> Rollouts:
        pad = self.tokenizer.pad_token_id
        ids, mask = left_pad([ex.prompt_ids for ex in rows], pad)
        device = next(self.model.parameters()).device
        # Temperature and top-p are applied here, before the recorder: generate() would apply
        # its own warpers after custom processors, and r_t would then be at the wrong temperature.
        # Explicit config: never inherit a checkpoint's sampling defaults (e.g. top_k=50).
        # temperature 0: greedy (evaluation), where the sampling fields would only draw a warning
        sampling = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if temperature > 0 else {}
        gen = GenerationConfig(
            **sampling, max_new_tokens=self.cfg.max_new_tokens, pad_token_id=pad,
            eos_token_id=self.eos_ids or None,  # a tokenizer without EOS (it has a pad): to the cap
        )  # fmt: skip
        recorder = _SampledLogprobs()
        processors = []
        if temperature not in (0.0, 1.0):
            processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0 and temperature > 0:
            processors.append(TopPLogitsWarper(top_p))
        was_training, checkpoint_defaults = self.model.training, self.model.generation_config
        self.model.eval()
        # generate() fills every field `gen` leaves unset from the model's own generation_config:
        # a checkpoint's repetition_penalty (instruct models often set one), min_p, num_beams or
        # no_repeat_ngram_size would change the sampling distribution, or apply after the
        # recorder. Rollouts come from the student's distribution alone, so it is set aside.
        self.model.generation_config = GenerationConfig()
        try:
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=gen,
                    logits_processor=LogitsProcessorList([*processors, recorder]),
                    synced_gpus=self.in_step,  # every rank steps until all are done (gopd.fsdp)
                )
        finally:
            self.model.generation_config = checkpoint_defaults
            self.model.train(was_training)
        sequences = out.cpu()
        responses = sequences[:, ids.shape[1] :]
        rollout_logp = recorder.finish(responses[:, -1].to(device)).float().cpu()
        valid = response_mask(responses, self.eos_ids)
        attention = torch.cat([mask, valid.long()], dim=1)
        return Rollouts(sequences, attention, ids.shape[1], valid, rollout_logp * valid, rows)

    def update_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: generate() samples from the live student."""


def load_vllm(cfg: TrainConfig, ctx: DistContext = SINGLE):
    """A colocated vLLM `LLM` for the student, its engine in this process (see below). Under
    torchrun every rank runs its own engine on its own GPU (tensor parallel size 1) inside
    torchrun's process group, vLLM's `external_launcher` mode (as TRL's colocate mode), and
    samples with its own seed."""
    try:
        from vllm import LLM
    except ImportError as exc:
        raise ValueError(
            "rollout_engine='vllm' needs vLLM >= 0.10.2: pip install 'gopd[vllm]' (CUDA machines)"
        ) from exc
    if not torch.cuda.is_available():
        raise ValueError("rollout_engine='vllm' needs a CUDA GPU")
    # vLLM's V1 engine runs its model in a child process by default, out of the trainer's reach:
    # the weight sync needs it in this process (as TRL's colocate mode does).
    user_value = os.environ.get(VLLM_MULTIPROCESSING, "0")
    if user_value != "0":
        logger.warning("rollout_engine='vllm': %s=%s overridden to 0 (the weight sync needs the "
                       "engine in this process)", VLLM_MULTIPROCESSING, user_value)  # fmt: skip
    os.environ[VLLM_MULTIPROCESSING] = "0"
    # processed_logprobs: r_t under the sampling distribution (temperature, top-p), not the raw one.
    per_rank = dict(distributed_executor_backend="external_launcher") if ctx.enabled else {}
    return LLM(
        model=cfg.student, dtype=cfg.dtype, seed=cfg.seed + ctx.rank,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization or VLLM_GPU_MEMORY_UTILIZATION,
        max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens,
        enable_prefix_caching=True, logprobs_mode="processed_logprobs", enable_sleep_mode=cfg.vllm_sleep,
        **per_rank,
    )  # fmt: skip


class VLLMRolloutEngine:
    """Sampling with a colocated vLLM `LLM` (see `load_vllm`), which holds its own copy of the
    student: `update_weights` pushes the live student's weights into it after every update,
    and once at the start (a resumed student is not the checkpoint vLLM loaded).

    With `vllm_sleep`, vLLM sleeps (level 2: its weights and KV cache freed) as soon as a
    generate returns, so that scoring and the update have its GPU memory; the next generate
    wakes it, its weights first, loads the student's into them, then its KV cache."""

    in_step = False  # each rank's engine samples on its own, whatever the student's sharding
    max_rows = None  # vLLM schedules its own batches

    def __init__(self, llm, tokenizer, cfg: TrainConfig, student: torch.nn.Module | None = None):
        """student: the live model whose weights vLLM's copy follows (training); None samples
        the checkpoint vLLM loaded (cfg.student) as it is (evaluation)."""
        if student is None and cfg.vllm_sleep:
            raise ValueError(
                "vllm_sleep: sleep level 2 discards vLLM's weights, which only a live student refills"
            )
        self.llm, self.tokenizer, self.cfg = llm, tokenizer, cfg
        config = student.generation_config if student is not None else saved_generation_config(cfg.student)
        self.eos_ids = stop_ids(config, tokenizer)
        self.asleep = False
        self.student = None
        if student is not None:
            self.update_weights(student)

    def generate(
        self, examples: list[Example], samples: int, temperature: float, top_p: float | None = None
    ) -> Rollouts:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        top_p = self.cfg.top_p if top_p is None else top_p
        params = SamplingParams(n=samples, temperature=temperature, top_p=top_p, top_k=-1,
                                max_tokens=self.cfg.max_new_tokens, logprobs=0,
                                stop_token_ids=self.eos_ids)  # fmt: skip
        self._wake()
        try:
            prompts = [TokensPrompt(prompt_token_ids=ex.prompt_ids) for ex in examples]
            outputs = self.llm.generate(prompts, params)
        finally:
            if self.cfg.vllm_sleep:
                self.llm.sleep(level=2)
                self.asleep = True
        rows, responses, logps = [], [], []
        for ex, out in zip(examples, outputs, strict=True):
            for completion in out.outputs:
                rows.append(ex)
                responses.append(list(completion.token_ids))
                steps = zip(completion.logprobs, completion.token_ids, strict=True)
                logps.append([step[tok].logprob for step, tok in steps])
        pad = self.tokenizer.pad_token_id
        ids, mask = left_pad([ex.prompt_ids for ex in rows], pad)
        width = max(1, max(len(r) for r in responses))
        resp = torch.full((len(rows), width), pad, dtype=torch.long)
        logp = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (r, lp) in enumerate(zip(responses, logps, strict=True)):
            resp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            logp[i, : len(lp)] = torch.tensor(lp)
        valid = response_mask(resp, self.eos_ids) & (
            torch.arange(width)[None, :] < torch.tensor([len(r) for r in responses])[:, None]
        )
        sequences = torch.cat([ids, resp], dim=1)
        return Rollouts(
            sequences, torch.cat([mask, valid.long()], 1), ids.shape[1], valid, logp * valid, rows
        )

    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy the student's weights into vLLM's model, then drop vLLM's prefix cache: its KV
        blocks were computed with the old weights, and reusing them would make the next
        rollouts (and their r_t) come from a mix of old and new policies. Asleep, vLLM has no
        weights to copy into: the student is kept, and loaded when it wakes."""
        self.student = model
        if not self.asleep:
            self._load_weights()
            self.llm.reset_prefix_cache()

    def _load_weights(self) -> None:
        try:
            runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        except AttributeError as exc:
            raise RuntimeError(
                "vLLM's model is not reachable in this process (is its engine running in a child "
                f"process? {VLLM_MULTIPROCESSING} must be 0); the weight sync cannot work"
            ) from exc
        runner.model.load_weights(servable_weights(self.student))  # a LoRA student's merged

    def _wake(self) -> None:
        """Weights first, filled with the student's, then the KV cache: the copy runs before
        the KV cache takes its memory back."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
            if self.student is not None:
                self._load_weights()
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
            self.llm.reset_prefix_cache()


def saved_generation_config(path: str) -> GenerationConfig | None:
    """A checkpoint's generation_config.json, None when it has none."""
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def make_engine(cfg: TrainConfig, student, tokenizer, ctx: DistContext = SINGLE) -> RolloutEngine:
    if cfg.rollout_engine == "vllm":
        return VLLMRolloutEngine(load_vllm(cfg, ctx), tokenizer, cfg, student)
    return HFRolloutEngine(student, tokenizer, cfg)
