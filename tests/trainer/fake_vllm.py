"""A CPU stand-in for the part of vLLM that `VLLMRolloutEngine` touches (vLLM itself needs CUDA).

It copies the shapes of vLLM 0.33's API, read from its source: `LLM(model, **engine_args)`,
`LLM.generate(prompts, SamplingParams)` returning one output per prompt with `n` completions
(token ids up to and including EOS, one `{token_id: Logprob}` per step),
`LLM.reset_prefix_cache()`, sleep mode (`LLM(enable_sleep_mode=True)`, `LLM.sleep(level)`,
`LLM.wake_up(tags)`, where level 2 discards the weights and a partial wake-up keeps the rest
asleep), and the model reachable at
`llm.llm_engine.model_executor.driver_worker.model_runner.model` only when the V1 engine runs
in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`). Sampling is gopd's HF engine run on the
fake's own copy of the checkpoint, so the fake's policy is whatever weights were pushed to it.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from gopd.data import Example
from gopd.models import load_tokenizer
from gopd.rollout import VLLM_MULTIPROCESSING, HFRolloutEngine


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    logprobs: int | None = None
    stop_token_ids: list[int] | None = None


def TokensPrompt(prompt_token_ids: list[int]) -> dict:  # a TypedDict in vLLM
    return {"prompt_token_ids": prompt_token_ids}


@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]]


@dataclass
class RequestOutput:
    outputs: list[CompletionOutput] = field(default_factory=list)


def weights_fingerprint(model: torch.nn.Module) -> tuple[float, ...]:
    """Sums that change with any weight: which policy sampled a batch."""
    return tuple(float(p.detach().double().sum()) for p in model.parameters())


class FakeModel:
    """vLLM's model: takes (HF name, tensor) pairs, as vLLM's Qwen3 does."""

    def __init__(self, hf_model, events: list):
        self.hf, self.events = hf_model, events

    def load_weights(self, weights) -> None:
        state = self.hf.state_dict()
        names = []
        with torch.no_grad():
            for name, tensor in weights:
                state[name].copy_(tensor)
                names.append(name)
        self.events.append(("load_weights", names))


class LLM:
    def __init__(self, model: str, **engine_args):
        self.engine_args = engine_args
        self.multiprocessing = os.environ.get(VLLM_MULTIPROCESSING, "1")
        self.hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, engine_args["dtype"]))
        self.tokenizer = load_tokenizer(model)
        self.events: list = []
        self.llm_engine = SimpleNamespace()  # vLLM's default: the model lives in a child process
        if self.multiprocessing == "0":
            runner = SimpleNamespace(model=FakeModel(self.hf, self.events))
            worker = SimpleNamespace(model_runner=runner)
            self.llm_engine.model_executor = SimpleNamespace(driver_worker=worker)

    def reset_prefix_cache(self) -> bool:
        self.events.append(("reset_prefix_cache",))
        return True

    asleep: frozenset = frozenset()  # what sleep freed and wake_up has not brought back

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        if not self.engine_args.get("enable_sleep_mode"):
            raise RuntimeError("Sleep mode is not enabled")  # vLLM's check, in its worker
        self.events.append(("sleep", level))
        self.asleep = frozenset({"weights", "kv_cache"})
        if level == 2:  # discarded: garbage until weights are loaded again
            with torch.no_grad():
                for p in self.hf.parameters():
                    p.fill_(float("nan"))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        self.events.append(("wake_up", tags))
        self.asleep = self.asleep - set(tags or self.asleep)
        return not self.asleep

    def generate(self, prompts: list[dict], params: SamplingParams) -> list[RequestOutput]:
        if self.asleep:
            raise RuntimeError(f"generate while asleep ({sorted(self.asleep)})")
        examples = [Example(p["prompt_token_ids"], "default", None, "") for p in prompts]
        settings = SimpleNamespace(max_new_tokens=params.max_tokens, top_p=params.top_p, fsdp=False,
                                   generate_batch_size=None)  # fmt: skip
        sampler = HFRolloutEngine(self.hf, self.tokenizer, settings)  # each engine samples alone
        # as vLLM: the model's own EOS ids, and the request's stop tokens
        sampler.eos_ids = list(dict.fromkeys([*sampler.eos_ids, *(params.stop_token_ids or [])]))
        rollouts = sampler.generate(examples, params.n, params.temperature)
        self.events.append(("generate", weights_fingerprint(self.hf)))
        outputs = [RequestOutput() for _ in prompts]
        for row in range(len(rollouts.examples)):
            length = int(rollouts.response_mask[row].sum())
            tokens = rollouts.responses[row, :length].tolist()
            logps = rollouts.rollout_logp[row, :length].tolist()
            steps = [{t: Logprob(lp)} for t, lp in zip(tokens, logps, strict=True)]
            outputs[row // params.n].outputs.append(CompletionOutput(tokens, steps))
        return outputs


def install(monkeypatch) -> None:
    """Make `import vllm` (and `vllm.inputs`) find this fake for the rest of the test."""
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
