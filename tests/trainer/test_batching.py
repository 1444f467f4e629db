"""Micro-batches (gopd.batching): grouped by length, trimmed, and exact against the padded batch."""

from __future__ import annotations

import random

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


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_scores_and_update_match_the_untrimmed_batch_in_one_piece(tiny, tmp_path, loss_agg):
    """score_rollouts and policy_update, over length-grouped trimmed micro-batches, against
    the frozen scores and the G-OPD loss of the whole padded batch at once."""
    cfg = base_config(
        tiny, tmp_path, micro_batch_size=3, micro_batch_tokens=32, loss_agg=loss_agg, grad_clip=None
    )
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
