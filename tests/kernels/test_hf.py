"""Hugging Face models into the fused ops (gopd_kernels.hf), against the models' own logits."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import GraniteConfig, GraniteForCausalLM, Qwen3Config, Qwen3ForCausalLM

from gopd_kernels import gopd_loss, hf
from gopd_kernels.hf import mask_position_ids, sequence_logprobs
from gopd_kernels.reference import policy_loss_reference
from tests.kernels.helpers import GRAD_ROW_REL, rel_err, row_rel_err, run_gloo_ranks

V = 53  # prime


def tiny_qwen3(seed: int = 0, tied: bool = True) -> Qwen3ForCausalLM:
    config = Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=64, tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


def naive(model, ids, mask, temperature=1.0):
    """What users write: the model's logits, shifted, log-softmaxed, gathered (and the entropy)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=mask_position_ids(mask)).logits
    logp_all = (logits[:, :-1].float() / temperature).log_softmax(-1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    real = mask[:, 1:].bool()
    return torch.where(real, logp, 0.0), torch.where(real, entropy, 0.0)


def grads(model, fn):
    model.zero_grad()
    logp, entropy = fn()
    g = torch.Generator().manual_seed(2)
    up = [torch.randn(logp.shape, generator=g).to(logp.device) for _ in range(2)]  # per-token upstream
    ((logp * up[0]).sum() + (entropy * up[1]).sum()).backward()
    return logp.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_the_models_own(model, backend: str, device: torch.device, temperature: float = 0.7) -> None:
    """sequence_logprobs as the model's materialised logits give them: values, entropies and
    every parameter's gradient, on left-padded rows (zeros there), at a temperature."""
    ids, mask = (t.to(device) for t in left_padded_batch())
    want = grads(model, lambda: naive(model, ids, mask, temperature))
    got = grads(model, lambda: sequence_logprobs(model, ids, mask, temperature=temperature,
                                                 return_entropy=True, backend=backend))  # fmt: skip
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert (got[0][~mask[:, 1:].bool()] == 0).all()
    for name, g in want[2].items():
        assert rel_err(got[2][name], g) < 1e-4, name
        assert row_rel_err(got[2][name], g) < GRAD_ROW_REL[torch.float32], name


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sequence_logprobs_are_the_models_own(backend, temperature, device):
    dev = device if backend == "triton" else torch.device("cpu")
    check_the_models_own(tiny_qwen3().to(dev), backend, dev, temperature)


def test_untied_head_with_no_mask():
    model = tiny_qwen3(tied=False)
    ids, _ = left_padded_batch()
    full = torch.ones_like(ids)
    torch.testing.assert_close(sequence_logprobs(model, ids, backend="torch"), naive(model, ids, full)[0])


def test_lora_adapters_get_their_gradients():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_qwen3(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids, mask = left_padded_batch()
    sequence_logprobs(model, ids, mask, backend="torch").sum().backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def tiny_granite(scaling: float) -> GraniteForCausalLM:
    """Granite divides its logits by config.logits_scaling, in code."""
    config = GraniteConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, logits_scaling=scaling)  # fmt: skip
    torch.manual_seed(0)
    return GraniteForCausalLM(config).eval()


FALCON_H1_SSM = dict(head_dim=16, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1,
                     mamba_d_state=8, mamba_chunk_size=8)  # fmt: skip


def tiny_scaled(family: str, value: float):
    """A tiny model of a family that multiplies its logits by a config value, each its own way:
    Granite divides by logits_scaling, HyperCLOVAX multiplies by it, Cohere by logit_scale,
    Falcon-H1 (Mamba-2 and attention) by lm_head_multiplier."""
    if family == "granite":
        return tiny_granite(value)
    make = dict(hyperclovax=("HyperCLOVAX", "logits_scaling", {}), cohere=("Cohere", "logit_scale", {}),
                falcon_h1=("FalconH1", "lm_head_multiplier", FALCON_H1_SSM))[family]  # fmt: skip
    config = getattr(transformers, f"{make[0]}Config")(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, eos_token_id=None, **{make[1]: value}, **make[2],
    )  # fmt: skip
    torch.manual_seed(0)
    return getattr(transformers, f"{make[0]}ForCausalLM")(config).eval()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize(
    "family, value, scale",
    [("granite", 4.0, 0.25), ("hyperclovax", 4.0, 4.0), ("cohere", 0.0625, 0.0625), ("falcon_h1", 0.5, 0.5)],
    ids=["granite-divides", "hyperclovax-multiplies", "cohere", "falcon-h1"],
)
def test_scaled_logits_are_the_models_own(backend, family, value, scale, device):
    """A logit multiplier named by the config is taken, in the direction the model's own forward
    applies it (the same name goes both ways): values, entropies and every parameter's gradient
    as the model's materialised logits give them, at a temperature."""
    dev = device if backend == "triton" else torch.device("cpu")
    model = tiny_scaled(family, value).to(dev)
    assert hf.head_logits(model) == (scale, None)
    check_the_models_own(model, backend, dev)


def test_a_scale_the_config_names_but_the_forward_ignores_is_not_applied():
    """Qwen3's forward reads no logit_scale: set on its config anyway, the forward decides (1)."""
    model = tiny_qwen3(seed=3)
    model.config.logit_scale = 0.5
    assert hf.head_logits(model) == (1.0, None)
    ids, mask = left_padded_batch()
    torch.testing.assert_close(sequence_logprobs(model, ids, mask), naive(model, ids, mask)[0])


def tiny_soft_capped(family: str = "Gemma2"):
    """A tiny model of a family that soft-caps its logits, c tanh(z / c), with its default
    c = config.final_logit_softcapping: Gemma 2's and VaultGemma's 30, nanochat's 15."""
    config = getattr(transformers, f"{family}Config")(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # logits of tens, where a cap of 15-30 bends them: tiny models' are below 1
        model.get_output_embeddings().weight.mul_(40.0)
    return model


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("family, cap", [("Gemma2", 30.0), ("VaultGemma", 30.0), ("NanoChat", 15.0)])
def test_soft_capped_logits_are_the_models_own(backend, family, cap, device):
    """A cap from the config, checked against the forward: values, entropies and every
    parameter's gradient as the materialised (capped) logits give them, at a temperature."""
    dev = device if backend == "triton" else torch.device("cpu")
    model = tiny_soft_capped(family).to(dev)
    assert hf.head_logits(model) == (1.0, cap)
    ids, _ = left_padded_batch()
    raw = model.get_output_embeddings()(hf.final_hidden_states(model, ids.to(dev)))
    assert raw.abs().max() > cap / 2  # the cap bends the largest logits by 8 % or more
    check_the_models_own(model, backend, dev)


def test_a_cap_the_forward_does_not_apply_is_refused(monkeypatch):
    """A config naming a cap that the forward does not apply (here another one than it applies)."""
    model = tiny_soft_capped()
    forward = type(model).forward

    def capped_at_20(self, *args, **kwargs):  # the forward reads the config: cap at 20 whatever it says
        monkeypatch.setattr(self.config, "final_logit_softcapping", 20.0)
        try:
            return forward(self, *args, **kwargs)
        finally:
            monkeypatch.setattr(self.config, "final_logit_softcapping", 30.0)

    monkeypatch.setattr(type(model), "forward", capped_at_20)
    with pytest.raises(ValueError, match=r"final hidden states, soft-capped at 30 \(off by .*softcapping=30"):
        hf.head_logits(model)


def test_unnamed_scales_are_refused_by_the_forward(monkeypatch):
    """Where no config attribute names the multiplier (as in a remote model's code), the model's
    forward against the head's shows it."""
    monkeypatch.setattr(hf, "LOGIT_SCALES", ())
    ids, mask = left_padded_batch()
    with pytest.raises(ValueError, match=r"model: the model's logits are not its LM head .*\(off by 3 of"):
        sequence_logprobs(tiny_granite(4.0), ids, mask)


def test_a_named_scale_that_does_not_explain_the_logits_is_refused(monkeypatch):
    """Granite divides by 4 (scale 0.25); its config naming 3 instead offers 3 and 1/3, neither right."""
    model = tiny_granite(4.0)
    monkeypatch.setattr(model.config, "logits_scaling", 3.0)
    forward = type(model).forward

    def forward_by_four(self, *args, **kwargs):  # the forward reads the config: keep it dividing by 4
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * (3.0 / 4.0)
        return out

    monkeypatch.setattr(type(model), "forward", forward_by_four)
    with pytest.raises(
        ValueError, match=r"states times 0\.333333 .*a fitted scale of 0\.25.*logits_scaling=3"
    ):
        hf.head_logits(model)


@pytest.mark.parametrize("dtype, scaling", [(torch.bfloat16, 1.004), (torch.float32, 1.0001)], ids=str)
def test_a_scale_within_one_logits_rounding_is_refused(dtype, scaling, monkeypatch):
    """A multiplier this close to 1 moves no logit by more than its dtype's rounding (the
    largest-error check passes it), but the scale fitted over all the logits shows it."""
    monkeypatch.setattr(hf, "LOGIT_SCALES", ())
    ids, mask = left_padded_batch()
    model = tiny_granite(scaling).to(dtype)
    with pytest.raises(ValueError, match=r"a fitted scale of 0\.99"):
        sequence_logprobs(model, ids, mask, backend="torch")
    assert hf.head_logits(tiny_granite(1.0).to(dtype)).scale == 1.0  # the same model unscaled passes


def test_a_plain_granite_passes():
    model = tiny_granite(1.0)
    ids, mask = left_padded_batch()
    torch.testing.assert_close(sequence_logprobs(model, ids, mask), naive(model, ids, mask)[0])


def test_the_check_runs_once_per_model():
    model = tiny_qwen3()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))  # the whole model: only the check runs it
    ids, mask = left_padded_batch()
    sequence_logprobs(model, ids, mask, backend="torch")
    sequence_logprobs(model, ids, mask, backend="torch")
    hf.head_logits(model)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "ids, mask, name",
    [
        (torch.zeros(5, dtype=torch.long), None, "input_ids"),
        (torch.zeros(2, 5), None, "input_ids"),
        (torch.zeros(2, 1, dtype=torch.long), None, "input_ids"),
        (torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), "attention_mask"),
    ],
)
def test_bad_inputs_name_themselves(ids, mask, name):
    with pytest.raises(ValueError, match=name):
        sequence_logprobs(tiny_qwen3(), ids, mask)


def test_the_check_ignores_dropout_and_keeps_the_mode():
    """A model in training mode with dropout: the check compares in eval mode and hands the
    model back in training mode."""
    model = tiny_qwen3()
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    ids, mask = left_padded_batch()
    sequence_logprobs(model, ids, mask, backend="torch")
    assert model.training


def clipped(s, advantages, old):
    ratio = torch.exp(s - old)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.28))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("fold", [None, False])
def test_sequence_loss_is_the_loss_of_the_models_own_logprobs(backend, fold, device):
    """sequence_loss as the model's materialised logits give it: the loss over the response
    tokens (loss_mask) of left-padded rows, its log-probs (and entropies, return_entropy), and
    every parameter's gradient."""
    model = tiny_qwen3(seed=3).to(device)
    ids, mask = (t.to(device) for t in left_padded_batch())
    g = torch.Generator().manual_seed(4)
    advantages, noise = (torch.randn(3, 8, generator=g).to(device) for _ in range(2))
    response = torch.zeros(3, 8, dtype=torch.bool, device=device)
    response[:, 4:] = True  # the last 4 predicted tokens of each row
    counts = mask[:, 1:].bool() & response
    with torch.no_grad():
        old = naive(model, ids, mask, 0.7)[0] + 0.2 * noise

    model.zero_grad()
    logp, entropy = naive(model, ids, mask, 0.7)
    want = torch.where(counts, clipped(logp, advantages, old), 0.0).sum() / counts.sum()
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    loss, got_logp, got_entropy = hf.sequence_loss(
        model, ids, mask, clipped, (advantages, old), loss_mask=response, temperature=0.7, backend=backend,
        fold=fold, return_entropy=True,
    )  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss, want.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_logp, torch.where(counts, logp, 0.0).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_entropy, torch.where(counts, entropy, 0.0).detach(), atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        assert rel_err(p.grad, want_grads[name]) < 1e-4, name


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(loss_mask=torch.ones(3, 9, dtype=torch.bool)), "loss_mask must be a tensor of shape"),
        (dict(loss_fn=lambda s, a, o: s.sum()), "one loss per log-prob"),
        (dict(per_token=(torch.zeros(3, 9), torch.zeros(3, 8))), r"per_token\[0\] shape"),
    ],
)
def test_sequence_loss_checks_before_the_model_runs(change, match, monkeypatch):
    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran before the check")

    monkeypatch.setattr(hf, "final_hidden_states", no_forward)
    ids, mask = left_padded_batch()
    args = dict(loss_fn=clipped, per_token=(torch.zeros(3, 8), torch.zeros(3, 8)), loss_mask=None) | change
    with pytest.raises(ValueError, match=match):
        hf.sequence_loss(
            tiny_qwen3(), ids, mask, args["loss_fn"], args["per_token"], loss_mask=args["loss_mask"]
        )


def _tensor_parallel_rank(rank: int, world: int, path: str) -> dict:
    """One rank of a model loaded with transformers' tensor-parallel plan (its LM head's rows
    sharded, a DTensor): sequence_logprobs against the model's own logits, with gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32).eval()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    ids, mask = left_padded_batch()
    want = grads(model, lambda: naive(model, ids, mask, 0.7))
    got = grads(model, lambda: sequence_logprobs(model, ids, mask, temperature=0.7, return_entropy=True))
    head = model.get_output_embeddings().weight
    errors = {name: row_rel_err(local(got[2][name]), local(g)) for name, g in want[2].items()}
    # the G-OPD loss from the decoder's hidden states and the DTensor head, as a TP student runs it
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    g = torch.Generator().manual_seed(3)
    teacher, ref = (torch.randn(targets.shape, generator=g) - 3 for _ in range(2))

    def policy_loss(logp=None):
        model.zero_grad()
        if logp is None:  # fused, vocabulary-parallel
            hidden = hf.final_hidden_states(model, ids, mask)[:, :-1]
            loss, _ = gopd_loss(hidden, head, targets, teacher, ref, lam=1.25, temperature=0.7)
        else:
            loss = policy_loss_reference(logp, targets, teacher, ref, lam=1.25)
        loss.backward()
        return loss.detach(), {n: local(p.grad).clone() for n, p in model.named_parameters()}

    fused = policy_loss()
    naive_loss = policy_loss(naive(model, ids, mask, 0.7)[0])
    loss_errors = {name: row_rel_err(fused[1][name], g) for name, g in naive_loss[1].items()}
    return {"head": (type(head).__name__, tuple(local(head).shape)), "logp": (got[0], want[0]),
            "entropy": (got[1], want[1]), "grad_row_rel": errors, "loss": (fused[0], naive_loss[0]),
            "loss_grad_row_rel": loss_errors}  # fmt: skip


def test_a_tensor_parallel_model_scores_with_its_sharded_head(tmp_path):
    """transformers' tp_plan="auto" on 2 CPU ranks (gloo) shards the head's rows into a DTensor:
    sequence_logprobs runs it vocabulary-parallel, and values, entropies and every parameter's
    gradient (each rank's shard) are the model's own; so are gopd_loss's loss and gradients from
    the decoder's hidden states and that head."""
    tiny_qwen3(tied=False).save_pretrained(tmp_path / "model")
    ranks = run_gloo_ranks(tmp_path, 2, _tensor_parallel_rank, str(tmp_path / "model"))
    assert [r["head"] for r in ranks] == [("DTensor", (V - V // 2, 32)), ("DTensor", (V // 2, 32))]
    for r in ranks:
        torch.testing.assert_close(*r["logp"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(*r["entropy"], atol=1e-5, rtol=1e-5)
        assert max(r["grad_row_rel"].values()) < GRAD_ROW_REL[torch.float32], r["grad_row_rel"]
        torch.testing.assert_close(*r["loss"], atol=1e-6, rtol=1e-6)
        assert max(r["loss_grad_row_rel"].values()) < GRAD_ROW_REL[torch.float32], r["loss_grad_row_rel"]
