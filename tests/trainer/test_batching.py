"""Micro-batches (gopd.batching): grouped by length, trimmed, and exact against the padded batch."""

from __future__ import annotations

import random
from unittest.mock import patch

import pytest
import torch

from gopd.batching import micro_batch, micro_batches
from gopd.data import Example
from gopd.models import head_weight, load_models
from gopd.rollout import IGNORE, Rollouts, left_pad
from gopd.scoring import response_hidden, score_rollouts
from gopd.update import make_scheduler, policy_update
from gopd_kernels import frozen_logprobs, gopd_loss
from tests.trainer.conftest import base_config

# (prompt, response) lengths: one long row among short ones, as a step with a length cap gives
LENGTHS = [(3, 2), (9, 17), (5, 1), (2, 6), (7, 3), (4, 12), (6, 2), (3, 5)]


def synthetic_rollouts(lengths, vocab: int, pad: int, seed: int = 0) -> Rollouts:
    """Rows with the given (prompt, response) lengths: left-padded prompts, right-padded responses."""
    gen = random.Random(seed)
    examples = [Example([gen.randrange(vocab) for _ in range(p)], "default", None, "") for p, _ in lengths]
    ids, mask = left_pad([ex.prompt_ids for ex in examples], pad)
    width = max(r for _, r in lengths)
    responses = torch.full((len(lengths), width), pad)
    valid = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, (_, r) in enumerate(lengths):
        responses[i, :r] = torch.tensor([gen.randrange(vocab) for _ in range(r)])
        valid[i, :r] = True
    rollout_logp = -torch.rand(len(lengths), width) * valid
    sequences = torch.cat([ids, responses], 1)
    return Rollouts(
        sequences, torch.cat([mask, valid.long()], 1), ids.shape[1], valid, rollout_logp, examples
    )


def test_micro_batches_sort_longest_first_and_respect_both_limits():
    ro = synthetic_rollouts(LENGTHS, vocab=50, pad=0)
    rows = list(range(len(LENGTHS)))
    for max_rows, max_tokens in [(3, None), (8, 30), (2, 40), (8, None), (1, 26)]:
        groups = list(micro_batches(ro, rows, max_rows, max_tokens))
        assert sorted(i for g in groups for i in g) == rows  # every row, once
        order = [i for g in groups for i in g]
        totals = [sum(LENGTHS[i]) for i in order]
        assert totals == sorted(totals, reverse=True)
        for g in groups:
            assert len(g) <= max_rows
            part, _ = micro_batch(ro, g)
            assert part.sequences.numel() <= (max_tokens or float("inf")) or len(g) == 1
            # greedy: the next row would have broken a limit
            nxt = order[len([i for h in groups[: groups.index(g) + 1] for i in h]) :][:1]
            if nxt:
                grown = micro_batch(ro, g + nxt)[0].sequences.numel()
                assert len(g) == max_rows or grown > max_tokens
    # the longest row (26 tokens) alone in its group when the budget is below it
    assert list(micro_batches(ro, rows, 8, 20))[0] == [1]
    assert list(micro_batches(ro, [5, 0], 8, None)) == [[5, 0]]  # only the rows asked for
    # packed: the budget counts each group's real tokens, not rows x its longest row
    for max_rows, max_tokens in [(8, 30), (3, 40), (8, 26)]:
        groups = list(micro_batches(ro, rows, max_rows, max_tokens, packed=True))
        order = [i for g in groups for i in g]
        assert sorted(order) == rows
        real = [sum(sum(LENGTHS[i]) for i in g) for g in groups]
        assert all(t <= max_tokens or len(g) == 1 for t, g in zip(real, groups, strict=True))
        for g, nxt in zip(groups, groups[1:], strict=False):  # greedy: the next row broke a limit
            assert len(g) == max_rows or sum(sum(LENGTHS[i]) for i in g + nxt[:1]) > max_tokens
    assert len(list(micro_batches(ro, rows, 8, 40, packed=True))) < len(list(micro_batches(ro, rows, 8, 40)))


def test_trimmed_keeps_the_models_outputs_at_every_valid_position(tiny, tmp_path):
    models = load_models(base_config(tiny, tmp_path))
    tok = models.tokenizer
    ro = synthetic_rollouts(LENGTHS, vocab=len(tok), pad=tok.pad_token_id)
    for rows in ([0, 2, 6], [1], [4, 7, 3]):
        padded = ro.select(rows)
        part, _ = micro_batch(ro, rows)
        prompts, responses = zip(*[LENGTHS[i] for i in rows], strict=True)
        assert part.prompt_len == max(prompts) and part.width == max(responses)
        assert part.sequences.shape[1] == max(prompts) + max(responses)  # of 26 before trimming
        torch.testing.assert_close(part.targets, padded.targets[:, : part.width])
        with torch.no_grad():
            want = response_hidden(models.student, padded)[:, : part.width]
            got = response_hidden(models.student, part)
        valid = part.response_mask
        torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    whole = ro.select(range(len(LENGTHS)))
    assert whole.trimmed() is whole  # nothing to trim: the same object


class GradientsSeen(torch.optim.SGD):
    """Keeps the gradients it was asked to step on (policy_update clears them after)."""

    def step(self, closure=None):
        self.seen = [p.grad.clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


@pytest.mark.parametrize(
    "loss_agg, packed", [("token-mean", False), ("seq-mean-token-mean", False), ("token-mean", True)]
)
def test_scores_and_update_match_the_untrimmed_batch_in_one_piece(tiny, tmp_path, loss_agg, packed):
    """score_rollouts and policy_update, over length-grouped trimmed micro-batches (or packed
    ones: each one row of its sequences' real tokens), against the frozen scores and the
    G-OPD loss of the whole padded batch at once."""
    cfg = base_config(
        tiny, tmp_path, micro_batch_size=3, micro_batch_tokens=32, loss_agg=loss_agg, grad_clip=None,
        pack_sequences=packed,
    )  # fmt: skip
    models = load_models(cfg)
    tok = models.tokenizer
    ro = synthetic_rollouts(LENGTHS, vocab=len(tok), pad=tok.pad_token_id, seed=1)
    student, teacher, ref = models.student, models.teachers["default"], models.reference
    with torch.no_grad():
        want = frozen_logprobs(response_hidden(teacher, ro), head_weight(teacher), ro.targets,
                               response_hidden(ref, ro), head_weight(ref), backend="torch")  # fmt: skip
    scores = score_rollouts(models, ro, cfg)
    torch.testing.assert_close(scores.teacher_logp, want.teacher_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.ref_logp, want.ref_logp, atol=1e-5, rtol=1e-5)
    assert (scores.teacher_logp[~ro.response_mask] == 0).all()

    loss, _ = gopd_loss(
        response_hidden(student, ro), head_weight(student), ro.targets, want.teacher_logp, want.ref_logp,
        lam=cfg.lam, rollout_logp=ro.rollout_logp, is_cap=cfg.is_cap, loss_agg=loss_agg, ignore_index=IGNORE,
        backend="torch",
    )  # fmt: skip
    loss.backward()
    params = [p for p in student.parameters() if p.requires_grad]
    want_grads = [p.grad.clone() for p in params]
    student.zero_grad(set_to_none=True)
    sgd = GradientsSeen(params, lr=0.0)
    got_loss, _, stepped = policy_update(models, ro, scores, sgd, make_scheduler(sgd, cfg, 1), cfg)
    assert stepped
    assert got_loss == pytest.approx(float(loss.detach()), rel=1e-5)
    for g, w in zip(sgd.seen, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_packed_rows_score_as_padded_ones_and_leave_out_empty_responses(tiny, tmp_path):
    """response_hidden from packed rows equals the padded batch's at every response token (an
    empty response adds no tokens), for the student, a teacher of another hidden size, and a
    LoRA student's adapter-free reference; zeros elsewhere. sdpa packs into bins of the longest
    row, padded at their ends; one row (flash attention's layout) scores the same."""
    from gopd.models import AdapterFree
    from gopd.packing import pack, uses_varlen_attention

    cfg = base_config(tiny, tmp_path, lora_rank=4, reference="student", pack_sequences=True)
    models = load_models(cfg)
    assert isinstance(models.reference, AdapterFree)
    tok = models.tokenizer
    lengths = [*LENGTHS[:3], (4, 0), *LENGTHS[3:5]]
    ro = synthetic_rollouts(lengths, vocab=len(tok), pad=tok.pad_token_id, seed=2)
    real = [p + r for p, r in lengths if r]
    one_row = pack(ro)
    assert one_row.input_ids.shape == (1, sum(real))  # no padding at all
    assert one_row.position_ids.max() == max(real) - 1
    assert not uses_varlen_attention(models.student)  # sdpa: bins
    bins = pack(ro, binned=True)
    assert bins.input_ids.shape[1] == max(real) and 1 < bins.input_ids.shape[0] < len(real)
    for model in (models.student, models.teachers["default"], models.reference):
        with torch.no_grad():
            want = response_hidden(model, ro)
            got = response_hidden(model, ro, packed=True)
        valid = ro.response_mask
        torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
        assert (got[~valid] == 0).all()
    with patch("gopd.packing.uses_varlen_attention", return_value=True), torch.no_grad():
        got = response_hidden(models.teachers["default"], ro, packed=True)
        want = response_hidden(models.teachers["default"], ro)
    torch.testing.assert_close(got[ro.response_mask], want[ro.response_mask], atol=1e-5, rtol=1e-5)


def test_first_fit_bins_longest_first():
    """Rows go longest first into the first bin with room; None is one bin; a row longer than
    the bin is a ValueError naming bin_len."""
    from gopd.packing import first_fit

    assert first_fit([3, 7, 2, 5, 4], 7) == [[1], [3, 2], [4, 0]]
    assert first_fit([3, 7, 2], None) == [[0, 1, 2]]
    assert first_fit([], 4) == []
    with pytest.raises(ValueError, match="bin_len=4 is shorter than a row of 5 tokens"):
        first_fit([5], 4)


def test_a_model_that_mixes_packed_rows_is_refused(tiny, tmp_path):
    """A decoder that does not keep packed rows apart (here: one that drops the position ids,
    so the second row attends to the first) fails check_packing, with a ValueError naming the
    setting, before it scores anything."""
    from gopd.packing import check_packing

    models = load_models(base_config(tiny, tmp_path))
    decoder = models.student.model
    forward = decoder.forward
    decoder.forward = lambda *a, position_ids=None, **k: forward(*a, **k)  # positions: 0 .. T - 1
    ro = synthetic_rollouts(LENGTHS[:3], vocab=len(models.tokenizer), pad=models.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="pack_sequences: this model's hidden states of rows packed"):
        response_hidden(models.student, ro, packed=True)
    check_packing(models.teachers["default"])  # a plain model passes


def test_dense_update_is_the_same_packed(tiny, tmp_path):
    """The dense objective reads the student's, the teacher's and the reference's hidden states
    in its update: packed, its loss and gradients are the padded micro-batches'."""
    results = []
    for packed in (False, True):
        cfg = base_config(tiny, tmp_path, objective="dense", lam=1.25, reference=str(tiny["reference"]),
                          is_cap=None, micro_batch_size=3, grad_clip=None, pack_sequences=packed)  # fmt: skip
        models = load_models(cfg)
        tok = models.tokenizer
        ro = synthetic_rollouts(LENGTHS, vocab=len(tok), pad=tok.pad_token_id, seed=3)
        params = [p for p in models.student.parameters() if p.requires_grad]
        sgd = GradientsSeen(params, lr=0.0)
        loss, _, stepped = policy_update(models, ro, None, sgd, make_scheduler(sgd, cfg, 1), cfg)
        assert stepped
        results.append((loss, sgd.seen))
    (loss, grads), (packed_loss, packed_grads) = results
    assert packed_loss == pytest.approx(loss, rel=1e-5)
    for g, w in zip(packed_grads, grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_attention_is_a_setting_and_packing_over_a_dense_mask_says_so(tiny, tmp_path, caplog):
    """attn_implementation reaches every model; a name transformers lacks is a ValueError naming
    the setting. Packing through an attention that is not flash attention's varlen kernels
    says in a log line that it packs into bins (a dense block-diagonal mask per bin)."""
    import logging

    models = load_models(
        base_config(tiny, tmp_path, attn_implementation="eager", reference=str(tiny["reference"]))
    )
    for model in (models.student, models.teachers["default"], models.reference):
        assert model.config._attn_implementation == "eager"
    ro = synthetic_rollouts(LENGTHS[:3], vocab=len(models.tokenizer), pad=models.tokenizer.pad_token_id)
    with caplog.at_level(logging.INFO, logger="gopd"):
        response_hidden(models.student, ro, packed=True)
    said = "pack_sequences with attn_implementation 'eager': each micro-batch's rows go into bins"
    assert said in caplog.text
    with pytest.raises(ValueError, match="attn_implementation='no_such_attention'"):
        load_models(base_config(tiny, tmp_path, attn_implementation="no_such_attention"))
