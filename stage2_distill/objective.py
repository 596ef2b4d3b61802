"""The stage-2 objective: which loss terms a preset uses, and their sum for one micro-batch.

Every term is normalised by counts over the whole optimizer step (all accumulation micro-batches
on all processes: `StepCounts`), so summing the micro-batch values gives the step's loss whatever
the split: 4 micro-batches of 1 equal 1 of 4, and 2 processes equal 1. The exceptions are the
entropy term's quantile and hard selection's top fraction, taken over each micro-batch (as the
authors' code does): over the whole step they would need every micro-batch's entropies before the
first backward.

The terms are computed without autograd, each with its gradient with respect to the head's statistics in
closed form (the `*_and_gradient` functions of losses.py, and the chain rule through the gathers and
per-sequence means here), and the loss hands those gradients to autograd (`_ClosedFormGradients`).
Recorded by autograd, the terms' small operators and their backward took 1.5 ms per toy micro-batch,
against 1.0 ms this way (docs/benchmarks.md). Tests compare the values and the gradients with autograd
through losses.py's functions, for every preset and switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from stage2_distill.chunked import TokenStatistics
from stage2_distill.losses import (
    bucket_entropy,
    decision_prefix_mask,
    entropy_regularization_gradient,
    generalized_jsd_and_gradient,
    listmle_loss_and_gradient,
    teacher_bucket_logprobs,
    teacher_ordered_listmle_and_gradient,
    token_selection_weights,
)
from tsdkd.config import DistillConfig


class StepCounts(NamedTuple):
    """Completion tokens, sequences and prompts in the whole optimizer step."""

    tokens: torch.Tensor
    sequences: torch.Tensor
    prompts: torch.Tensor


@dataclass
class Objective:
    direct: bool
    jsd_beta: float
    selection: bool
    tau_w: float
    selection_fraction: float | None
    renormalize_topk: bool
    # "exact": H_S over the vocabulary; "buckets": H_S over the teacher's k+1 buckets (the k renormalised
    # ones, for H_T too, with renormalize_topk), to match a teacher entropy that was itself estimated
    # from its top-k (vLLM).
    weight_entropy: str
    sft: bool
    token_ranking: bool
    sequence_ranking: bool
    alpha: float
    prefix_entropy_fraction: float
    beta_p: float
    entropy: bool
    lambda_ent: float
    entropy_quantile: float

    @classmethod
    def from_config(cls, cfg: DistillConfig, teacher_entropy: str) -> "Objective":
        terms = cfg.loss_terms()
        return cls(
            direct="direct" in terms,
            jsd_beta=cfg.jsd_beta if "jsd" in terms else 0.0,
            selection="selection" in terms,
            tau_w=cfg.tau_w,
            selection_fraction=cfg.selection_fraction,
            renormalize_topk=cfg.renormalize_topk,
            weight_entropy="exact" if teacher_entropy == "exact" else "buckets",
            sft="sft" in terms,
            token_ranking="token ranking" in terms,
            sequence_ranking="sequence ranking" in terms,
            alpha=cfg.alpha,
            prefix_entropy_fraction=cfg.prefix_entropy_fraction,
            beta_p=cfg.beta_p,
            entropy="entropy" in terms,
            lambda_ent=cfg.lambda_ent,
            entropy_quantile=cfg.entropy_quantile,
        )

    def ranked_positions(self, student_entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Where the token-level ranking reads the student's top-m (TokenStatistics.topm_*): bool [B, T]."""
        return decision_prefix_mask(student_entropy, mask, self.prefix_entropy_fraction)

    def __call__(self, batch: dict[str, torch.Tensor], stats: TokenStatistics, counts: StepCounts,
                 completion_positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) for one micro-batch; `stats` are flat over the completion tokens of `batch`, whose
        (rows, steps) `completion_positions` gives when the caller has them (else mask.nonzero). The sequence ranking
        reads `candidates_by_rank` as the data pipeline lays it out (each prompt's candidates best teacher rank first,
        then -1; stage2_distill.data.candidates_by_rank). The metrics are inference tensors: read them, or use copies
        in autograd or in place."""
        # Nothing computed here is recorded or saved by autograd (inference mode skips its bookkeeping per
        # operator); the loss hands autograd the gradients computed beside it.
        with torch.inference_mode():
            loss, gradients, metrics = self._terms(batch, stats, counts, completion_positions)
        fields = list(gradients)
        return _ClosedFormGradients.apply(loss, [gradients[name] for name in fields], *(getattr(stats, name) for name in fields)), metrics

    def _terms(self, batch: dict[str, torch.Tensor], stats: TokenStatistics, counts: StepCounts,
               completion_positions: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(loss, its gradient with respect to each TokenStatistics field it reads, metrics), without autograd."""
        mask = batch["completion_mask"]
        # Every per-token term works on the completion tokens only, in mask order, like `stats`.
        rows, steps = completion_positions if completion_positions is not None else mask.nonzero(as_tuple=True)
        counts = StepCounts(*(count.to(stats.entropy.dtype) for count in counts))
        tokens = counts.tokens
        metrics: dict[str, torch.Tensor] = {"student_entropy": stats.entropy.sum() / tokens}
        gradients: dict[str, torch.Tensor] = {}
        loss = stats.entropy.new_zeros(())

        def add_term(name: str, weight: float, value: torch.Tensor, field: str, gradient: torch.Tensor) -> None:
            """Term `name` = value enters the loss as weight x value, and its gradient d value / d stats.field alike."""
            nonlocal loss
            metrics[name] = value
            loss = loss + weight * value
            gradient = (weight * gradient).to(getattr(stats, field).dtype)  # float64 teacher signals give float64 terms
            gradients[field] = gradients[field] + gradient if field in gradients else gradient

        if self.direct:
            teacher_topk_logprobs = batch["teacher_topk_logprobs"][rows, steps]
            teacher = teacher_bucket_logprobs(teacher_topk_logprobs, batch["teacher_tail_mass"][rows, steps], self.renormalize_topk)
            if self.selection:
                student_entropy, teacher_entropy = stats.entropy, batch["teacher_entropy"][rows, steps]
                if self.weight_entropy == "buckets":
                    # H_T was estimated over the teacher's k+1 buckets: measure H_S alike, and both over
                    # the k renormalised buckets when those are what the loss compares.
                    student_entropy = bucket_entropy(stats.bucket_logprobs)
                    if self.renormalize_topk:
                        teacher_entropy = bucket_entropy(teacher)
                weights = token_selection_weights(student_entropy, teacher_entropy, None, self.tau_w, self.selection_fraction)
            else:
                weights = torch.ones_like(stats.entropy)
            # direct_distillation_loss over the step's tokens (the tests hold it to that function).
            divergence, divergence_gradient = generalized_jsd_and_gradient(teacher, stats.bucket_logprobs, self.jsd_beta)
            token_shares = weights / tokens
            add_term("direct", 1.0, (token_shares * divergence).sum(), "bucket_logprobs", token_shares.unsqueeze(-1) * divergence_gradient)
            metrics["token_weight_mean"] = token_shares.sum()
            metrics["selected_fraction"] = (weights > 0.5).sum() / tokens
        if self.sft:
            add_term("sft", 1.0, -stats.target_logprob.sum() / tokens, "target_logprob", (-1 / tokens).expand_as(stats.target_logprob))
        if self.token_ranking:
            add_term("indirect_token", self.alpha, *self._token_ranking(batch, stats, rows, steps, counts))
        if self.sequence_ranking:
            add_term("indirect_sequence", self.alpha, *self._sequence_ranking(batch, stats, rows, counts))
        if self.entropy:
            # Over this micro-batch's tokens, as a share of the step's.
            coefficients = entropy_regularization_gradient(stats.entropy, self.entropy_quantile) * (len(rows) / tokens)
            add_term("entropy", self.lambda_ent, (coefficients * stats.entropy).sum(), "entropy", coefficients)
        return loss, gradients, metrics

    def _token_ranking(self, batch: dict[str, torch.Tensor], stats: TokenStatistics, rows: torch.Tensor, steps: torch.Tensor,
                       counts: StepCounts) -> tuple[torch.Tensor, str, torch.Tensor]:
        """(Sum over this micro-batch's sequences of the mean ListMLE of their ranked positions, over the step's sequences;
        "topm_logprobs"; its gradient)."""
        ranked_rows, ranked_steps = rows[stats.ranked_index], steps[stats.ranked_index]
        per_position, item_gradient = teacher_ordered_listmle_and_gradient(
            stats.topm_ids, stats.topm_logprobs, batch["teacher_topk_ids"][ranked_rows, ranked_steps],
            batch["teacher_topk_logprobs"][ranked_rows, ranked_steps],
        )
        # Each position's share: 1 / (its sequence's ranked positions x the step's sequences). Counted by index_add,
        # not bincount: a CUDA bincount reads the maximum back to the host.
        positions_per_sequence = per_position.new_zeros(len(batch["completion_mask"])).index_add_(
            0, ranked_rows, torch.ones_like(per_position)).clamp_(min=1)
        position_weights = 1 / (positions_per_sequence[ranked_rows] * counts.sequences)
        return (per_position * position_weights).sum(), "topm_logprobs", item_gradient * position_weights.unsqueeze(-1)

    def _sequence_ranking(self, batch: dict[str, torch.Tensor], stats: TokenStatistics, rows: torch.Tensor,
                          counts: StepCounts) -> tuple[torch.Tensor, str, torch.Tensor]:
        """(Sum over this micro-batch's prompts of the ListMLE of its candidates, over the step's prompts;
        "target_logprob"; its gradient). `rows` are the completion tokens' sequences."""
        mask = batch["completion_mask"]
        tokens_per_sequence = mask.sum(-1).clamp(min=1)
        policy_mean = stats.target_logprob.new_zeros(len(mask)).index_add_(0, rows, stats.target_logprob) / tokens_per_sequence
        # where, not a product with the mask: padding may hold anything, NaN included.
        behaviour_sum = torch.where(mask, batch["behaviour_logprobs"], 0.0).sum(-1)
        behaviour_mean = behaviour_sum.to(torch.promote_types(behaviour_sum.dtype, policy_mean.dtype)) / tokens_per_sequence
        # sequence_level_ranking_loss on the data pipeline's layout (candidates_by_rank): each prompt's candidates
        # best rank first, then -1, so no sort; every prompt has one, so its mean over prompts is a sum / P.
        candidates = batch["candidates_by_rank"]
        present, slots = candidates >= 0, candidates.clamp(min=0)
        per_prompt, slot_gradient = listmle_loss_and_gradient(self.beta_p * (policy_mean - behaviour_mean)[slots], item_mask=present)
        # Back from the slots to the sequences' means: a missing slot names sequence 0 with a gradient of exactly 0.
        mean_gradient = slot_gradient.new_zeros(len(mask)).index_add_(0, slots.flatten(), slot_gradient.flatten())
        return per_prompt.sum() / counts.prompts, "target_logprob", (mean_gradient * (self.beta_p / counts.prompts) / tokens_per_sequence)[rows]


class _ClosedFormGradients(torch.autograd.Function):
    """(loss, [d loss / d input], *inputs) -> loss, whose backward hands each input its gradient, computed beside the
    loss in closed form: autograd records one node instead of the terms' operators."""

    @staticmethod
    def forward(ctx, loss, gradients, *inputs):
        ctx.gradients = gradients
        return loss.clone()  # a copy made outside inference mode: an inference tensor could not enter autograd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return None, None, *(gradient * grad_loss for gradient in ctx.gradients)
