"""The stage-2 objective: which loss terms a preset uses, and their sum for one micro-batch.

Every term is normalised by counts over the whole optimizer step (all accumulation micro-batches
on all processes: `StepCounts`), so summing the micro-batch values gives the step's loss whatever
the split: 4 micro-batches of 1 equal 1 of 4, and 2 processes equal 1. The exceptions are the
entropy term's quantile and hard selection's top fraction, taken over each micro-batch (as the
authors' code does): over the whole step they would need every micro-batch's entropies before the
first backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from stage2_distill.chunked import TokenStatistics
from stage2_distill.losses import (
    bucket_entropy,
    decision_prefix_mask,
    direct_distillation_loss,
    entropy_regularization,
    sequence_level_ranking_loss,
    teacher_bucket_logprobs,
    teacher_ordered_listmle,
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
        (rows, steps) `completion_positions` gives when the caller has them (else mask.nonzero)."""
        mask = batch["completion_mask"]
        # Every per-token term works on the completion tokens only, in mask order, like `stats`.
        rows, steps = completion_positions if completion_positions is not None else mask.nonzero(as_tuple=True)
        tokens = counts.tokens
        metrics: dict[str, torch.Tensor] = {"student_entropy": stats.entropy.detach().sum() / tokens}
        loss = stats.entropy.new_zeros(())
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
            metrics["direct"] = direct_distillation_loss(teacher, stats.bucket_logprobs, weights, None, self.jsd_beta, tokens)
            metrics["token_weight_mean"] = weights.sum() / tokens
            metrics["selected_fraction"] = (weights > 0.5).sum() / tokens
            loss = loss + metrics["direct"]
        if self.sft:
            metrics["sft"] = -stats.target_logprob.sum() / tokens
            loss = loss + metrics["sft"]
        if self.token_ranking:
            ranked_rows, ranked_steps = rows[stats.ranked_index], steps[stats.ranked_index]
            per_position = teacher_ordered_listmle(
                stats.topm_ids, stats.topm_logprobs, batch["teacher_topk_ids"][ranked_rows, ranked_steps],
                batch["teacher_topk_logprobs"][ranked_rows, ranked_steps],
            )
            metrics["indirect_token"] = _per_sequence_mean(per_position, ranked_rows, len(mask)).sum() / counts.sequences
            loss = loss + self.alpha * metrics["indirect_token"]
        if self.sequence_ranking:
            metrics["indirect_sequence"] = self._sequence_ranking(batch, stats, rows) / counts.prompts
            loss = loss + self.alpha * metrics["indirect_sequence"]
        if self.entropy:
            metrics["entropy"] = entropy_regularization(stats.entropy, None, self.entropy_quantile) * len(rows) / tokens
            loss = loss + self.lambda_ent * metrics["entropy"]
        return loss, {name: value.detach() for name, value in metrics.items()}

    def _sequence_ranking(self, batch: dict[str, torch.Tensor], stats: TokenStatistics, rows: torch.Tensor) -> torch.Tensor:
        """Sum over this micro-batch's prompts of the ListMLE of its candidates (laid out by the data pipeline
        as `candidates_by_rank`); `rows` are the completion tokens' sequences."""
        mask = batch["completion_mask"]
        policy_mean = _per_sequence_mean(stats.target_logprob, rows, len(mask))
        # where, not a product with the mask: padding may hold anything, NaN included.
        behaviour_mean = torch.where(mask, batch["behaviour_logprobs"], 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
        candidates = batch["candidates_by_rank"]
        present, slots = candidates >= 0, candidates.clamp(min=0)
        return sequence_level_ranking_loss(policy_mean[slots], behaviour_mean[slots], batch["teacher_rank"][slots], present,
                                           self.beta_p) * len(candidates)


def _per_sequence_mean(values: torch.Tensor, rows: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Mean of the per-token `values` [n] of each sequence (`rows` [n]): [num_sequences], 0 where it has none."""
    sums = values.new_zeros(num_sequences).index_add(0, rows, values)
    # Counted by index_add, not bincount: a CUDA bincount reads the maximum back to the host.
    return sums / values.new_zeros(num_sequences).index_add(0, rows, torch.ones_like(values)).clamp(min=1)
