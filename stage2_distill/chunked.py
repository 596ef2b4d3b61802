"""The student's per-token statistics from its output head, never holding more than chunk_size rows of [*, V].

A full [tokens, V] log-softmax of a 150k-token vocabulary dominates stage-2 memory, and a chain of
autograd ops over it (log-softmax, gathers, a scatter and logsumexp for the tail bucket, the
entropy, top-m) stores and backpropagates a dozen [tokens, V] intermediates. Here one
`torch.autograd.Function` (`_HeadStatistics`) reduces each chunk of tokens to a few numbers per token
and drops the chunk; its backward is analytic. With z = h W^T, p = softmax(z), log p = z - lse:

    d log p_i / dz          = e_i - p
    d H / dz                = -p (log p + H)                        H = -sum_j p_j log p_j
    d log tail / dz         = p [j not in K] / tail - p             tail = sum_{j not in K} p_j
    d (z_i - lse_K(z)) / dz = e_i - softmax_K(z)                    (renormalised top-k)

so grad_z = p * (a row scalar - g_H log p) + a few scattered entries, then grad_h = grad_z W and
grad_W = grad_z^T h (under autocast, matmuls in its dtype like the forward's, as for any Linear).
The backward recomputes each chunk's logits (no torch.utils.checkpoint) unless there is a single
chunk, whose log p is kept (a recompute would save no memory).

The student's top-m items (token-level ranking) come from the same log p, and an item's log-prob
z_id - lse adds e_id - p to the gradient like the target's does. They are read at the ranked rows
only (the decision prefixes), which a selector picks from the entropies once every chunk is done:
with one chunk, from its kept log p; with several, each chunk keeps the top-m of all its rows
([n, m], small), since a second pass over the head for the ranked rows would cost a matmul.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from stage2_distill.losses import TAIL_MASS_FLOOR, at_least_float32

LOG_TAIL_FLOOR = math.log(TAIL_MASS_FLOOR)


class TokenStatistics(NamedTuple):
    """The student's head statistics per completion token, flat [N, ...] (in mask order, for the Objective)."""

    bucket_logprobs: torch.Tensor  # [N, k+1] (teacher top-k, tail); [N, k] with renormalize_topk
    entropy: torch.Tensor  # [N], over the full (sliced) vocabulary
    target_logprob: torch.Tensor  # [N]
    # With num_items = m > 0 (the token-level ranking), else None: at the R ranked rows, the student's m
    # largest log-probs (best first) and their int64 ids, [R, m]; and which rows those are, int64 [R] ascending
    # (all without a selector; Objective.ranked_positions in training).
    topm_logprobs: torch.Tensor | None = None
    topm_ids: torch.Tensor | None = None
    ranked_index: torch.Tensor | None = None


def _logits(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h W^T in the inputs' dtype, then float32 or wider (as `at_least_float32` before log_softmax)."""
    return at_least_float32(hidden_states @ weight.T)


def _chunks(total: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, total)) for start in range(0, total, chunk_size)]


def _forward_chunk(hidden_states, weight, teacher_topk_ids, target_ids, renormalize_topk):
    """One chunk's fields: (buckets, entropy, target log-prob, lse, unclamped log tail or None, log p [n, V])."""
    logprobs = _logits(hidden_states, weight)
    # One exp pass gives lse and p: e = exp(z - max), s = sum(e), p = e / s, lse = max + log(s).
    top = logprobs.amax(-1, keepdim=True)
    exps = (logprobs - top).exp_()
    sums = exps.sum(-1)
    log_sums = sums.log()
    lse = top.squeeze(-1) + log_sums
    logprobs.sub_(lse.unsqueeze(-1))
    # H = -sum_j p_j log p_j. Logits from a matmul of finite numbers are finite, so log p is too and an
    # underflowing p_j gives 0 * finite = 0. A dot product without a [n, V] temporary; autocast would run it
    # in bf16 (it counts as a matrix product), hence off.
    with torch.autocast(hidden_states.device.type, enabled=False):
        entropy = torch.linalg.vecdot(exps, logprobs).div_(sums).neg_()
    target = logprobs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    topk = logprobs.gather(-1, teacher_topk_ids)
    if renormalize_topk:
        return topk - topk.logsumexp(-1, keepdim=True), entropy, target, lse, None, logprobs
    # The tail mass as a sum of the complement's own probabilities: no 1 - sum(top-k) cancellation.
    # Where it is >= the floor, its largest term is >= floor / V, far from underflow, so the sum is
    # exact to rounding; below the floor it is clamped (and gets no gradient).
    log_tail = exps.scatter_(-1, teacher_topk_ids, 0.0).sum(-1).log_().sub_(log_sums)
    buckets = torch.cat([topk, log_tail.clamp(min=LOG_TAIL_FLOOR).unsqueeze(-1)], dim=-1)
    return buckets, entropy, target, lse, log_tail, logprobs


class _HeadStatistics(torch.autograd.Function):
    """(hidden [N, d], weight [V', d], teacher ids [N, k], target ids [N]) -> TokenStatistics fields,
    over the first vocab_size rows of weight, chunk by chunk; ranked_rows(entropy [N]) -> bool [N] picks
    the rows of the top-m (None: all; no top-m fields at all with num_items = 0), returned as an index.
    See the module docstring."""

    @staticmethod
    def forward(ctx, hidden_states, weight, teacher_topk_ids, target_ids, vocab_size, chunk_size, renormalize_topk,
                num_items, ranked_rows):
        weight_v = weight[:vocab_size]
        spans = _chunks(hidden_states.shape[0], chunk_size) or [slice(0, 0)]
        chunks, chunk_items, kept_logprobs = [], [], None
        for span in spans:
            *fields, logprobs = _forward_chunk(hidden_states[span], weight_v, teacher_topk_ids[span], target_ids[span],
                                               renormalize_topk)
            chunks.append(fields)
            if len(spans) == 1:  # keep its log p for the backward rather than recompute it
                kept_logprobs = logprobs
            elif num_items:
                chunk_items.append(logprobs.topk(num_items, dim=-1))
            del logprobs  # before the next chunk's: one [chunk, V] at a time
        buckets, entropy, target, lse, log_tail = chunks[0] if len(chunks) == 1 else \
            [None if field[0] is None else torch.cat(field) for field in zip(*chunks)]
        topm_logprobs = topm_ids = selected = topm_rows = None  # selected None: every row (for the backward)
        if num_items:
            if ranked_rows is not None:
                selected = _checked_rows(ranked_rows(entropy), entropy).nonzero().squeeze(-1)
            topm_rows = torch.arange(len(entropy), device=entropy.device) if selected is None else selected
            if kept_logprobs is not None:
                rows = kept_logprobs if selected is None else kept_logprobs[selected]
                topm_logprobs, topm_ids = rows.topk(num_items, dim=-1)
            else:
                topm_logprobs, topm_ids = (torch.cat(field) for field in zip(*chunk_items))
                if selected is not None:
                    topm_logprobs, topm_ids = topm_logprobs[selected], topm_ids[selected]
            ctx.mark_non_differentiable(topm_ids, topm_rows)
        ctx.vocab_size, ctx.chunk_size, ctx.renormalize_topk = vocab_size, chunk_size, renormalize_topk
        # A backward recompute must see the logits the forward saw, autocast included.
        device_type = hidden_states.device.type
        ctx.autocast = (device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type))
        ctx.save_for_backward(hidden_states, weight, teacher_topk_ids, target_ids, selected, topm_ids, lse, entropy,
                              log_tail, buckets if renormalize_topk else None, kept_logprobs)
        return buckets, entropy, target, topm_logprobs, topm_ids, topm_rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_buckets, grad_entropy, grad_target, grad_topm, _, __):
        (hidden_states, weight, teacher_topk_ids, target_ids, selected, topm_ids, lse, entropy, log_tail, buckets,
         kept_logprobs) = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        vocab_size = ctx.vocab_size
        weight_v = weight[:vocab_size]
        spans = _chunks(hidden_states.shape[0], ctx.chunk_size)
        if not spans:  # no tokens
            return (torch.zeros_like(hidden_states) if need_hidden else None, torch.zeros_like(weight) if need_weight else None,
                    None, None, None, None, None, None, None)
        k = teacher_topk_ids.shape[-1]
        device_type, autocast_dtype, autocast_enabled = ctx.autocast

        def as_in_forward() -> torch.autocast:
            # A recompute must see the forward's logits, and under autocast the gradient matmuls run in its
            # dtype, as a Linear's backward does (bf16 on a GPU, not float32 at a fraction of the speed).
            # Autocast casts the head at each matmul, as in the forward: no [V, d] copy lives across chunks.
            return torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled)

        # Row scalars: grad_z = p * (row - g_H log p) + scattered terms.
        row = -grad_target - grad_entropy * entropy
        item_grad, item_ids = grad_topm, topm_ids
        if selected is not None:  # the top-m's gradient on every row (0 off the ranked ones), to scatter by chunk
            item_grad = grad_topm.new_zeros(len(entropy), grad_topm.shape[-1]).index_copy_(0, selected, grad_topm)
            item_ids = topm_ids.new_zeros(item_grad.shape).index_copy_(0, selected, topm_ids)
        if item_ids is not None:
            row = row - item_grad.sum(-1)
        if ctx.renormalize_topk:
            sparse = grad_buckets - grad_buckets.sum(-1, keepdim=True) * buckets.exp()
            row_off_topk = row
        else:
            sparse = grad_buckets[:, :k]
            grad_tail = torch.where(log_tail >= LOG_TAIL_FLOOR, grad_buckets[:, k], 0.0)
            row = row - sparse.sum(-1) - grad_tail
            # Off the top-k the tail adds g_tail p_j / tail; exp(-log tail) <= 1 / floor where it counts.
            row_off_topk = row + grad_tail * torch.exp(-log_tail.clamp(min=LOG_TAIL_FLOOR))
        grad_hidden = []
        grad_weight = None
        for span in spans:
            ids = teacher_topk_ids[span]
            if kept_logprobs is not None:
                logprobs = kept_logprobs
            else:
                with as_in_forward():
                    logits = _logits(hidden_states[span], weight_v)
                logprobs = logits.sub_(lse[span].unsqueeze(-1))
            topk_logprobs = logprobs.gather(-1, ids)
            probs = logprobs.exp()
            # grad_z = p * (row - g_H log p); a kept log p is a saved tensor and not overwritten, a
            # recomputed one is (one [n, V] buffer less).
            scale = grad_entropy[span].neg().unsqueeze(-1)
            grad_z = logprobs * scale if kept_logprobs is not None else logprobs.mul_(scale)
            grad_z.add_(row_off_topk[span].unsqueeze(-1)).mul_(probs)
            del probs, logprobs
            # On the top-k entries: no tail term (written over the dense value, never cancelled against it).
            topk_grad = topk_logprobs.mul(scale).add_(row[span].unsqueeze(-1)).mul_(topk_logprobs.exp())
            grad_z.scatter_(-1, ids, topk_grad)
            grad_z.scatter_add_(-1, ids, sparse[span])
            grad_z.scatter_add_(-1, target_ids[span].unsqueeze(-1), grad_target[span].unsqueeze(-1))
            if item_ids is not None:
                grad_z.scatter_add_(-1, item_ids[span], item_grad[span])
            grad_z = grad_z.to(weight.dtype)
            if autocast_enabled and grad_z.dtype == torch.float32:  # as autocast would, once for both matmuls
                grad_z = grad_z.to(autocast_dtype)
            with as_in_forward():
                if need_hidden:
                    grad_hidden.append((grad_z @ weight_v).to(hidden_states.dtype))
                if need_weight:
                    chunk_hidden = hidden_states[span].to(weight.dtype)
                    if len(spans) == 1:  # nothing to sum; 0 on padded rows
                        grad_weight = grad_z.T @ chunk_hidden
                        if vocab_size < weight.shape[0]:
                            grad_weight = F.pad(grad_weight, (0, 0, 0, weight.shape[0] - vocab_size))
                    else:
                        if grad_weight is None:  # summed in float32 or wider, even for a bf16 weight
                            grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
                        if grad_z.dtype == grad_weight.dtype:  # in place: no [V, d] temporary per chunk
                            grad_weight[:vocab_size].addmm_(grad_z.T, chunk_hidden)
                        else:  # a bf16 product (autocast, or a bf16 weight)
                            grad_weight[:vocab_size] += grad_z.T @ chunk_hidden
            del grad_z
        grad_hidden = (grad_hidden[0] if len(grad_hidden) == 1 else torch.cat(grad_hidden)) if need_hidden else None
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None  # one rounding, for a bf16 weight
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _checked_rows(ranked: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    if ranked.dtype != torch.bool or ranked.shape != entropy.shape or ranked.device != entropy.device:
        raise ValueError(f"ranked_rows must return a bool tensor shaped and placed like its entropy argument "
                         f"{tuple(entropy.shape)} on {entropy.device}, got {ranked.dtype} {tuple(ranked.shape)} on {ranked.device}")
    return ranked


def chunked_token_statistics(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    target_ids: torch.Tensor,
    chunk_size: int,
    vocab_size: int | None = None,
    renormalize_topk: bool = False,
    num_items: int = 0,
    ranked_rows: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TokenStatistics:
    """log p_S = log_softmax(h W[:vocab_size]^T) in float32 or wider, chunk by chunk, reduced per token to
    buckets on the teacher's top-k, entropy, log p_S(target), and the top num_items log-probs with their ids
    at the rows ranked_rows(entropy) picks (default all; None with num_items = 0). Shapes [N, d], [V', d],
    [N, k], [N] -> TokenStatistics; gradients reach h and W (none reach W's rows >= vocab_size).
    ranked_rows runs inside the forward on the returned entropy: it must not modify it. With several
    chunks every row's top-m is computed (the log p is gone once the selector can run), then selected."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    # Embedding matrices are often padded beyond the tokenizer (Qwen2.5: 151936 vs 152064 rows);
    # the padded rows are not tokens and must not take probability mass.
    vocab_size = lm_head_weight.shape[0] if vocab_size is None else min(vocab_size, lm_head_weight.shape[0])
    return TokenStatistics(*_HeadStatistics.apply(
        hidden_states, lm_head_weight, teacher_topk_ids, target_ids, vocab_size, chunk_size, renormalize_topk, num_items,
        ranked_rows,
    ))


def student_statistics(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    mask: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    target_ids: torch.Tensor,
    chunk_size: int,
    vocab_size: int | None,
    renormalize_topk: bool,
    num_items: int,
    ranked_positions: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    completion_positions: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TokenStatistics:
    """TokenStatistics from the flat per-token inputs (hidden [N, d], teacher ids [N, k], targets [N],
    N = mask.sum(), in the order of `mask` [B, T], whose (rows, steps) `completion_positions` gives when the
    caller has them). With ranked_positions(entropy [B, T], mask) -> bool [B, T], the student's top-m at
    those positions."""
    def ranked_rows(flat_entropy: torch.Tensor) -> torch.Tensor:
        positions = completion_positions if completion_positions is not None else mask.nonzero(as_tuple=True)
        entropy = flat_entropy.new_zeros(mask.shape).index_put_(positions, flat_entropy)
        return ranked_positions(entropy, mask)[positions]

    return chunked_token_statistics(hidden_states, lm_head_weight, teacher_topk_ids, target_ids, chunk_size, vocab_size,
                                    renormalize_topk, num_items if ranked_positions is not None else 0, ranked_rows)
