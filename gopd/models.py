"""Loading the student, teacher(s) and reference, and reading their final hidden states.

Log-probs never come from a model's logits: each model gives its final hidden states
(after the last norm) and its LM-head weight, and gopd_kernels does the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from gopd.config import TrainConfig
from gopd.fsdp import gathered_weights, is_sharded, root_forward_hidden, whole
from gopd_kernels.hf import (
    HeadLogits,
    final_hidden_states,
    head_logits,
    is_peft_model,
    mask_position_ids,
    transformers_model,
)

logger = logging.getLogger("gopd")


class AdapterFree:
    """The reference when it is a LoRA student's own initial weights: the student with its
    adapters switched off, read through final_hidden / head_weight like a model, with no
    copy of the weights (the adapters start at zero: peft's B = 0)."""

    def __init__(self, student):
        self.student = student

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.student.get_output_embeddings()  # LoRA never adapts the head (config checks)


@dataclass
class Models:
    student: PreTrainedModel  # a peft PeftModel when lora_rank > 0
    teachers: dict[str, PreTrainedModel]  # domain -> teacher ("default" for a single teacher)
    reference: PreTrainedModel | AdapterFree | None  # None when lam == 1 (it cancels)
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    offload_frozen: bool = False

    def frozen(self) -> list[PreTrainedModel]:
        """The frozen models held apart from the student (an AdapterFree reference is not one)."""
        ref = self.reference
        return [
            *self.teachers.values(),
            *([ref] if ref is not None and not isinstance(ref, AdapterFree) else []),
        ]

    @property
    def frozen_sharded(self) -> bool:
        """Whether reading the teachers or the reference takes every rank in step (gopd.fsdp):
        some are sharded (shard_frozen), or the reference is a sharded LoRA student's
        adapter-free self (fsdp)."""
        return any(is_sharded(m) for m in [*self.teachers.values(), self.reference] if m is not None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    return device


def load_model(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    trainable: bool,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A causal LM from `path`, checked for what the fused ops need; attn_implementation:
    transformers' (sdpa when None), e.g. flash_attention_2, which runs packed rows varlen."""
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    except (ImportError, ValueError) as exc:  # a kernel package missing, or a name transformers lacks
        if attn_implementation is None:
            raise
        raise ValueError(f"attn_implementation={attn_implementation!r}: {exc}") from exc
    model.to(device)
    transform = head_logits(model, path)  # refuses logits that the fused ops would score wrongly
    if transform != HeadLogits():
        cap = "" if transform.softcap is None else f", soft-capped at {transform.softcap:g}"
        logger.info("%s: its logits are %g x its LM head's output%s; scored so", path, transform.scale, cap)
    if trainable:
        model.train()
    else:
        model.eval().requires_grad_(False)
    return model


def load_models(cfg: TrainConfig) -> Models:
    dtype = getattr(torch, cfg.dtype)
    device = resolve_device(cfg.device)
    frozen_device = torch.device("cpu") if cfg.offload_frozen else device
    tokenizer = load_tokenizer(cfg.student)
    # fsdp keeps the student's weights in float32 and computes in dtype; it moves them to the
    # device layer by layer as it shards them, so that the whole float32 student is never there
    fsdp = (torch.float32, torch.device("cpu")) if cfg.fsdp else (dtype, device)
    attn = cfg.attn_implementation
    student = load_model(cfg.student, *fsdp, trainable=True, attn_implementation=attn)
    if cfg.lora_rank:
        student = add_lora(student, cfg)
    teachers = {}
    for domain, path in cfg.teacher_map.items():
        check_same_tokenizer(tokenizer, load_tokenizer(path), cfg.student, path)
        teachers[domain] = load_model(path, dtype, frozen_device, trainable=False, attn_implementation=attn)
    reference = None
    if cfg.objective == "sampled" and cfg.lam == 1.0:
        logger.info(
            "lam == 1: the reference cancels out of the G-OPD loss and is not loaded (%s)", cfg.reference
        )
    elif cfg.objective == "dense" and cfg.lam == 1.0:
        logger.info("lam == 1: q = p_teacher, the reference is not loaded (%s)", cfg.reference)
    elif cfg.lora_rank and cfg.reference == "student":
        logger.info("reference = the student with its LoRA adapters off: its initial weights, no copy loaded")
        reference = AdapterFree(student)
    else:
        ref_path = cfg.student if cfg.reference == "student" else cfg.reference
        if ref_path != cfg.student:
            check_same_tokenizer(tokenizer, load_tokenizer(ref_path), cfg.student, ref_path)
        reference = load_model(ref_path, dtype, frozen_device, trainable=False, attn_implementation=attn)
    models = Models(student, teachers, reference, tokenizer, device, cfg.offload_frozen)
    check_same_vocabulary(models)
    if cfg.freeze_lm_head:
        freeze_lm_head(student)
    if cfg.gradient_checkpointing:
        enable_checkpointing(student)
    if cfg.liger:
        apply_liger(student)
    return models


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path}: no tokenizer could be loaded ({exc}); gopd needs one beside every model"
        ) from exc
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{path}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_tokenizer(
    student: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, s_path: str, o_path: str
):
    """Same tokens -> same ids, same EOS and pad: otherwise teacher rewards are garbage (TRL #2215)."""
    problems = []
    sv, ov = student.get_vocab(), other.get_vocab()
    if sv != ov:
        differ = sorted(t for t in set(sv) | set(ov) if sv.get(t) != ov.get(t))
        examples = ", ".join(f"{t!r}: {sv.get(t)} vs {ov.get(t)}" for t in differ[:5])
        problems.append(f"{len(differ)} tokens map to different ids ({examples})")
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(student, name) != getattr(other, name):
            problems.append(f"{name} {getattr(student, name)} vs {getattr(other, name)}")
    if problems:
        raise ValueError(
            f"tokenizer of {o_path} does not match the student's ({s_path}): " + "; ".join(problems)
        )


def check_same_vocabulary(models: Models) -> None:
    vocab = head_weight(models.student).shape[0]
    for name, model in [*models.teachers.items(), ("reference", models.reference)]:
        if model is not None and head_weight(model).shape[0] != vocab:
            rows = head_weight(model).shape[0]
            raise ValueError(
                f"{name}: LM head has {rows} rows, the student's {vocab}: vocabularies must match"
            )


def freeze_lm_head(model: PreTrainedModel) -> None:
    """Fix the LM head's weight (and bias); tied input embeddings are the same tensor: fixed too."""
    head = model.get_output_embeddings()
    head.requires_grad_(False)
    if head.weight is model.get_input_embeddings().weight:
        logger.info("freeze_lm_head: the LM head is tied to the input embeddings; both stay fixed")


def add_lora(model: PreTrainedModel, cfg: TrainConfig):
    """The model with LoRA adapters (peft) on cfg.lora_target_modules; only they train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ValueError("lora_rank > 0 needs peft: pip install 'gopd[lora]'") from exc
    config = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules, bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model = get_peft_model(model, config)
    if tied and hasattr(model.get_base_model().get_input_embeddings(), "lora_A"):
        raise ValueError(
            "lora_target_modules: the input embeddings are tied to the LM head, which takes no adapter; "
            "leave them out (as 'all-linear' does)"
        )
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info(
        "LoRA rank %d: %.3fM of the student's %.1fM weights train", cfg.lora_rank, trained / 1e6, total / 1e6
    )
    return model


def load_student_weights(student, path) -> None:
    """Load a checkpoint's student into `student`: its LoRA adapters (peft's adapter files),
    or all its weights."""
    if is_lora(student):
        from peft import load_peft_weights, set_peft_model_state_dict

        set_peft_model_state_dict(student, load_peft_weights(str(path)))
        return
    trained = AutoModelForCausalLM.from_pretrained(path, dtype=student.dtype)
    student.load_state_dict(trained.state_dict())


def servable_shapes(model) -> dict[str, tuple[int, ...]]:
    """{name: shape} of servable_weights(model), without computing them (a sharded model's are
    its full shapes): whether another model's weights fit where this one's are served."""
    base = model.get_base_model() if is_lora(model) else model
    return {
        name.replace(".base_layer.", "."): tuple(t.shape)
        for name, t in base.state_dict().items()
        if ".lora_" not in name
    }


def servable_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model as a plain transformers model would have them: for a LoRA
    student its base weights with each adapter's delta added (out of place, once rounded: the
    base weights themselves never change, so the adapter-free reference stays exact). A
    sharded model's are gathered one tensor at a time, on every rank (gopd.fsdp)."""
    sharded = is_sharded(model)
    if not is_lora(model):
        yield from gathered_weights(model) if sharded else model.state_dict().items()
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {f"{name}.base_layer.weight": m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, tensor in gathered_weights(base, skip=".lora_") if sharded else base.state_dict().items():
        if ".lora_" in name:
            continue
        module = adapted.get(name)
        if module is not None:  # its delta, made when its turn comes: one matrix's worth at a time
            delta = sum(_lora_delta(module, adapter, sharded) for adapter in module.active_adapters)
            tensor = (tensor.float() + delta).to(tensor.dtype)
        yield name.replace(".base_layer.", "."), tensor


def _lora_delta(module, adapter: str, sharded: bool) -> torch.Tensor:
    """An adapter's B A x scaling in float32: peft's own for a whole module; for a sharded one
    from A and B gathered (plain LoRA on a Linear, as add_lora makes it)."""
    if not sharded:
        return module.get_delta_weight(adapter).float()
    if module.use_dora.get(adapter) or getattr(module, "fan_in_fan_out", False):
        raise ValueError(
            f"fsdp: cannot merge adapter {adapter!r} of {type(module).__name__} (DoRA or Conv1D)"
        )
    a, b = whole(module.lora_A[adapter].weight), whole(module.lora_B[adapter].weight)
    return (b.float() @ a.float()) * module.scaling[adapter]


is_lora = is_peft_model  # a LoRA student is a peft wrapper


def unwrapped(model) -> PreTrainedModel:
    """The transformers model itself (inside a peft wrapper, if any; an AdapterFree
    reference's is its student's)."""
    return transformers_model(model.student if isinstance(model, AdapterFree) else model)


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing, non-reentrant, whatever the transformers release defaults to:
    the reentrant form gives the layers no gradient when nothing before them is trainable,
    as with a frozen tied embedding."""
    kwargs = {"use_reentrant": False}
    model = unwrapped(model)
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers (5.24): the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_liger(model: PreTrainedModel) -> None:
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        raise ValueError(
            "liger=True: liger-kernel's patches are Triton kernels that need the student on CUDA"
        )
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as exc:
        raise ValueError("liger=True needs liger-kernel: pip install 'gopd[bench]' or liger-kernel") from exc
    # Our loss never calls the model's own head, so the cross-entropy patch is irrelevant: norms, MLP, RoPE.
    _apply_liger_kernel_to_instance(
        model=unwrapped(model), cross_entropy=False, fused_linear_cross_entropy=False
    )


def context_length(model) -> int:
    """The longest sequence the model (or its config) takes (max_position_embeddings; no limit
    if unset)."""
    config = getattr(model, "config", model)
    return int(getattr(config, "max_position_embeddings", None) or 10**9)


def head_weight(model: PreTrainedModel | AdapterFree) -> torch.Tensor:
    return model.get_output_embeddings().weight


def head_bias(model: PreTrainedModel | AdapterFree) -> torch.Tensor | None:
    return getattr(model.get_output_embeddings(), "bias", None)


def logits_of(model: PreTrainedModel | AdapterFree) -> HeadLogits:
    """How the model's logits follow from its head's output (a multiplier, Granite's
    1 / logits_scaling; a soft-cap, Gemma 2's): gopd_kernels.hf.head_logits, found when
    load_model checked the model. .kwargs(prefix) gives the ops' arguments."""
    return head_logits(unwrapped(model))


@contextmanager
def adapters_off(student):
    """peft's disable_adapter() with the adapters' requires_grad left as it was: peft switches it
    off meanwhile, and FSDP2 fixes each layer group's gradient reduce dtype (float32, where it
    computes in bf16) from which weights require grad at its first forward, which can be this
    one (scoring the reference when vLLM samples, so that nothing else has run the student):
    the adapters' bf16 gradients would then meet their float32 shards unconverted."""
    trained = [p for p in student.parameters() if p.requires_grad]
    with student.disable_adapter():
        for p in trained:
            p.requires_grad_(True)  # the adapters stay off: peft reads its own flag, not this
        yield


def final_hidden(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden states after the decoder's last norm, [B, T, D], for left-padded sequences
    (gopd_kernels.hf.final_hidden_states), or for packed rows given their position_ids and no
    attention_mask (gopd.packing), for every kind of model the trainer holds."""
    if isinstance(model, AdapterFree):
        with adapters_off(model.student):
            return final_hidden(model.student, input_ids, attention_mask, position_ids)
    model = unwrapped(model)  # peft's LoRA layers live inside it: the adapters still apply
    device = next(model.parameters()).device
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    input_ids, attention_mask, position_ids = to(input_ids), to(attention_mask), to(position_ids)
    if is_sharded(model):  # through the root's forward, which gathers the head (gopd.fsdp)
        positions = position_ids if position_ids is not None else mask_position_ids(attention_mask)
        return root_forward_hidden(model, input_ids, attention_mask, positions)
    return final_hidden_states(model, input_ids, attention_mask, position_ids)


@contextmanager
def frozen_on_device(models: Models, domain: str):
    """(teacher of `domain`, reference or None), on the compute device for the block; back on
    the CPU afterwards when offload_frozen is set."""
    pair = [models.teachers[domain], models.reference]
    moved = [m for m in pair if isinstance(m, torch.nn.Module)] if models.offload_frozen else []
    for m in moved:
        m.to(models.device)
    try:
        yield pair[0], pair[1]
    finally:
        for m in moved:
            m.to("cpu")
