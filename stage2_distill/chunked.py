"""Per-token student statistics that never hold more than chunk_size rows of [*, V] at once.

A full [tokens, V] log-softmax of a 150k-token vocabulary dominates stage-2 memory. Here each chunk
of tokens is projected, reduced to a few numbers per token and dropped; torch.utils.checkpoint
recomputes the chunk in the backward pass instead of storing its [chunk_size, V] intermediates
(when there is more than one chunk: a single chunk is kept, as recomputing it would save nothing).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from stage2_distill.losses import at_least_float32, bucket_entropy, student_bucket_logprobs


class TokenStatistics(NamedTuple):
    bucket_logprobs: torch.Tensor  # [N, k+1] (teacher top-k, tail); [N, k] with renormalize_topk
    entropy: torch.Tensor  # [N], over the full (sliced) vocabulary
    target_logprob: torch.Tensor  # [N]
    topm_ids: torch.Tensor  # [N, m], best first, int64, no gradient
    topm_logprobs: torch.Tensor  # [N, m]


def _chunk_statistics(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    target_ids: torch.Tensor,
    num_items: int,
    renormalize_topk: bool,
) -> tuple[torch.Tensor, ...]:
    """log p_S = log_softmax(h W^T) for one chunk, reduced to the TokenStatistics fields.
    Shapes [n, d], [V, d], [n, k], [n] -> the fields for n tokens."""
    logprobs = torch.log_softmax(at_least_float32(hidden_states @ lm_head_weight.T), dim=-1)
    topm_logprobs, topm_ids = logprobs.topk(num_items, dim=-1)
    return (
        student_bucket_logprobs(logprobs, teacher_topk_ids, renormalize_topk),
        bucket_entropy(logprobs),
        logprobs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1),
        topm_ids,
        topm_logprobs,
    )


def chunked_token_statistics(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    target_ids: torch.Tensor,
    chunk_size: int,
    num_items: int,
    vocab_size: int | None = None,
    renormalize_topk: bool = False,
) -> TokenStatistics:
    """log p_S = log_softmax(h W[:vocab_size]^T) in float32 or wider, chunk by chunk with recompute;
    per token: buckets on the teacher's top-k, entropy, log p_S(target), top-m ids and log-probs."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    # Embedding matrices are often padded beyond the tokenizer (Qwen2.5: 151936 vs 152064 rows);
    # the padded rows are not tokens and must not take probability mass.
    lm_head_weight = lm_head_weight[:vocab_size]
    if hidden_states.shape[0] <= chunk_size:
        # One chunk: recomputing it in the backward pass would cost time and save no memory.
        fields = _chunk_statistics(hidden_states, lm_head_weight, teacher_topk_ids, target_ids, num_items, renormalize_topk)
        return TokenStatistics(*fields)
    chunks = [
        checkpoint(
            _chunk_statistics,
            hidden_states[start : start + chunk_size],
            lm_head_weight,
            teacher_topk_ids[start : start + chunk_size],
            target_ids[start : start + chunk_size],
            num_items,
            renormalize_topk,
            use_reentrant=False,
        )
        for start in range(0, hidden_states.shape[0], chunk_size)
    ]
    return TokenStatistics(*(torch.cat(field) for field in zip(*chunks)))
