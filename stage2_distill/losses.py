"""Stage-2 TSD-KD losses (METHOD.md) as pure functions of tensors.

Shapes: B sequences, T completion positions (padded), V vocabulary, k teacher top-k width.
`mask` is a bool [B, T], True on real completion tokens. Every mean over completion tokens divides
by mask.sum(), and padded positions are indexed away, so their contents (even NaN) never reach a
value or a gradient. Where `mask` may be None, the inputs are already the completion tokens, flat
[N, ...] (as the Objective passes them), and means divide by N.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TAIL_MASS_FLOOR = 1e-12


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Cast bf16/fp16 up to float32 and leave float32/float64 alone.
    Used before log_softmax, so that float64 checks stay float64."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _zero_probability_safe(logprobs: torch.Tensor) -> torch.Tensor:
    # A -inf log-prob would make p * log p = 0 * -inf = NaN in the value and the gradient; the most
    # negative finite number still has probability exactly 0.
    return logprobs.clamp(min=torch.finfo(logprobs.dtype).min)


def student_bucket_logprobs(
    student_logprobs_full: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    renormalize_topk: bool = False,
    tail_floor: float = TAIL_MASS_FLOOR,
) -> torch.Tensor:
    """[log p_S(id_1..id_k), log max(1 - sum_i p_S(id_i), floor)]: [..., V], [..., k] -> [..., k+1].
    With renormalize_topk: log(p_S(id_i) / sum_j p_S(id_j)), [..., k]."""
    topk_logprobs = student_logprobs_full.gather(-1, teacher_topk_ids)
    if renormalize_topk:
        return topk_logprobs - topk_logprobs.logsumexp(-1, keepdim=True)
    # The tail is a logsumexp over the complement, exact where 1 - sum(top-k) would cancel. Blanking
    # the top-k with a finite number keeps an empty complement (V == k) free of NaN gradients; the
    # clamp bounds an underflowing tail and gives it zero gradient.
    complement = student_logprobs_full.scatter(
        -1, teacher_topk_ids, torch.finfo(student_logprobs_full.dtype).min
    )
    tail_logprob = complement.logsumexp(-1, keepdim=True).clamp(min=math.log(tail_floor))
    return torch.cat([topk_logprobs, tail_logprob], dim=-1)


def teacher_bucket_logprobs(
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_mass: torch.Tensor,
    renormalize_topk: bool = False,
    tail_floor: float = TAIL_MASS_FLOOR,
) -> torch.Tensor:
    """[log p_T(id_1..id_k), log max(tail_mass, floor)]: [..., k], [...] -> [..., k+1].
    With renormalize_topk: log(p_T(id_i) / sum_j p_T(id_j)), [..., k]."""
    if renormalize_topk:
        return teacher_topk_logprobs - teacher_topk_logprobs.logsumexp(-1, keepdim=True)
    # The cached tail is 1 - sum(top-k probs) in finite precision: it can be 0 or a hair below.
    tail_logprob = teacher_tail_mass.clamp(min=tail_floor).log().to(teacher_topk_logprobs.dtype)
    return torch.cat([teacher_topk_logprobs, tail_logprob.unsqueeze(-1)], dim=-1)


def bucket_entropy(bucket_logprobs: torch.Tensor) -> torch.Tensor:
    """H = -sum_i p_i log p_i over the last dim (k+1 buckets or a vocabulary): [..., n] -> [...].
    Zero-probability entries contribute 0."""
    logprobs = _zero_probability_safe(bucket_logprobs)
    return -(logprobs.exp() * logprobs).sum(-1)


def generalized_jsd(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, beta: float
) -> torch.Tensor:
    """JSD_beta = beta KL(p_T||M) + (1-beta) KL(p_S||M), M = beta p_T + (1-beta) p_S, last dim.
    beta=0 is forward KL(p_T||p_S), beta=1 reverse KL(p_S||p_T): TRL's endpoints, not the limits."""
    return _generalized_jsd(teacher_logprobs, student_logprobs, beta, with_gradient=False)[0]


def generalized_jsd_and_gradient(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(generalized_jsd [...], d JSD_beta / d log p_S [..., n] = (1-beta) p_S (log p_S - log M); at beta=0,
    -p_T (0 where log p_S = -inf); at beta=1, p_S (log p_S - log p_T + 1)): the gradient without autograd."""
    return _generalized_jsd(teacher_logprobs, student_logprobs, beta, with_gradient=True)


def _generalized_jsd(
    teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, beta: float, with_gradient: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    teacher_logprobs = _zero_probability_safe(teacher_logprobs)
    if beta == 0.0:
        teacher_probs = teacher_logprobs.exp()
        divergence = (teacher_probs * (teacher_logprobs - _zero_probability_safe(student_logprobs))).sum(-1)
        # At a zero student probability the clamp passes no gradient (KL(p_T||p_S) is unbounded there).
        return divergence, torch.where(student_logprobs > -math.inf, -teacher_probs, 0.0) if with_gradient else None
    student_logprobs = _zero_probability_safe(student_logprobs)
    student_probs = student_logprobs.exp()
    if beta == 1.0:
        student_terms = student_probs * (student_logprobs - teacher_logprobs)
        return student_terms.sum(-1), student_terms + student_probs if with_gradient else None
    mixture_logprobs = torch.logaddexp(
        teacher_logprobs + math.log(beta), student_logprobs + math.log1p(-beta)
    )
    student_terms = student_probs * (student_logprobs - mixture_logprobs)
    divergence = beta * (teacher_logprobs.exp() * (teacher_logprobs - mixture_logprobs)).sum(-1) + (1.0 - beta) * student_terms.sum(-1)
    return divergence, (1.0 - beta) * student_terms if with_gradient else None


def token_selection_weights(
    student_entropy: torch.Tensor,
    teacher_entropy: torch.Tensor,
    mask: torch.Tensor | None,
    tau: float = 1.0,
    hard_fraction: float | None = None,
) -> torch.Tensor:
    """w_t = sigmoid((H_S(t) - H_T(t)) / tau); with hard_fraction rho, 1 on the top round(rho * n)
    (at least 1) of the n completion tokens by H_S - H_T, else 0. 0 on padding, detached: [B, T].
    mask None: every entry is a completion token (flat [N] inputs)."""
    if tau <= 0.0:
        raise ValueError(f"tau must be positive, got {tau}")
    with torch.no_grad():
        entropy_gap = student_entropy - teacher_entropy
        if hard_fraction is None:
            weights = torch.sigmoid(entropy_gap / tau)
            return weights if mask is None else torch.where(mask, weights, 0.0)
        if not 0.0 < hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must lie in (0, 1], got {hard_fraction}")
        num_tokens = entropy_gap.numel() if mask is None else int(mask.sum())
        # round() rather than floor/ceil: rho * count carries float noise (0.29 * 100 = 28.999...).
        num_selected = max(1, round(hard_fraction * num_tokens)) if num_tokens else 0
        candidate_gaps = (entropy_gap if mask is None else entropy_gap.masked_fill(~mask, -math.inf)).flatten()
        weights = torch.zeros_like(candidate_gaps)
        weights[candidate_gaps.topk(num_selected).indices] = 1.0
        return weights.view_as(entropy_gap)


def direct_distillation_loss(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    beta: float = 0.9,
    num_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_direct = sum_t w_t JSD_beta(p_T(t), p_S(t)) / number of completion tokens: scalar.
    Log-probs [B, T, n] over the same n buckets (mask None: flat [N, n], all real); num_tokens
    overrides the count (a whole step's)."""
    if mask is not None:
        teacher_logprobs, student_logprobs, weights = teacher_logprobs[mask], student_logprobs[mask], weights[mask]
    divergence = generalized_jsd(teacher_logprobs, student_logprobs, beta)
    count = max(weights.numel(), 1) if num_tokens is None else num_tokens
    return (weights * divergence).sum() / count


def listmle_loss(
    scores: torch.Tensor,
    num_ranked: torch.Tensor | None = None,
    item_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L = -sum_{k<r} [s_k - logsumexp_{j>=k} s_j], s [..., m] best-first, r = num_ranked (or m).
    Positions >= r are tied last (denominators only); item_mask False drops an item: [...]."""
    return _listmle(scores, num_ranked, item_mask, with_gradient=False)[0]


def listmle_loss_and_gradient(
    scores: torch.Tensor,
    num_ranked: torch.Tensor | None = None,
    item_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(listmle_loss [...], dL/ds_j = sum_{k<=j, k in R} exp(s_j - logsumexp_{i>=k, i kept} s_i) - 1[j in R]: [..., m],
    0 on dropped items), R = the kept positions k < r: the gradient without autograd."""
    return _listmle(scores, num_ranked, item_mask, with_gradient=True)


def _listmle(
    scores: torch.Tensor, num_ranked: torch.Tensor | None, item_mask: torch.Tensor | None, with_gradient: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    dropped = None if item_mask is None else ~item_mask
    if dropped is not None:
        # exp of the most negative finite number is exactly 0, so the item leaves every denominator,
        # while logcumsumexp's backward stays finite (with -inf it returns NaN).
        scores = scores.masked_fill(dropped, torch.finfo(scores.dtype).min)
    if num_ranked is None:
        gives_term = item_mask if item_mask is not None else torch.ones_like(scores, dtype=torch.bool)
    else:
        gives_term = torch.arange(scores.shape[-1], device=scores.device) < num_ranked.unsqueeze(-1)
        gives_term = gives_term if item_mask is None else gives_term & item_mask
    # Suffix sums: position k is chosen from the items not yet placed. A prefix (front) logcumsumexp
    # would be the likelihood of the reversed ranking, the authors' bug.
    suffix_logsumexp = scores.flip(-1).logcumsumexp(-1).flip(-1)
    loss = -torch.where(gives_term, scores - suffix_logsumexp, 0.0).sum(-1)
    if not with_gradient:
        return loss, None
    # sum_{k<=j} exp(s_j - lse_k) = exp(s_j + log sum_{k<=j} exp(-lse_k)), in log space: lse_k can be far
    # below 0 (a peaked student's top-m) and exp(-lse_k) overflow.
    with torch.no_grad():
        chosen_before = torch.where(gives_term, -suffix_logsumexp, -math.inf).logcumsumexp(-1)
        gradient = torch.exp(scores + chosen_before) - gives_term.to(scores.dtype)
        if dropped is not None:  # a kept item scoring near the most negative number would lift a dropped one's
            gradient = gradient.masked_fill(dropped, 0.0)
    return loss, gradient


def decision_prefix_mask(
    student_entropy: torch.Tensor, mask: torch.Tensor, prefix_entropy_fraction: float = 0.1
) -> torch.Tensor:
    """Per sequence, the shortest prefix of its completion positions whose cumulative H_S reaches
    prefix_entropy_fraction of that sequence's total H_S (at least its first one): bool [B, T]."""
    if not 0.0 <= prefix_entropy_fraction <= 1.0:
        raise ValueError(f"prefix_entropy_fraction outside [0, 1]: {prefix_entropy_fraction}")
    with torch.no_grad():
        # clamp: entropies computed in floating point can be a hair below 0.
        entropy = torch.where(mask, student_entropy, 0.0).clamp(min=0.0)
        cumulative = entropy.cumsum(-1)
        # Position t belongs to the prefix while the entropy strictly before it is short of the
        # threshold; shifting the same cumsum (rather than subtracting) keeps the comparison exact.
        entropy_before = F.pad(cumulative[..., :-1], (1, 0))
        threshold = prefix_entropy_fraction * cumulative[..., -1:]
        first_position = mask & (mask.cumsum(-1) == 1)
        return mask & ((entropy_before < threshold) | first_position)


def teacher_ordered_listmle(
    student_item_ids: torch.Tensor,
    student_item_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
) -> torch.Tensor:
    """Token-level ranking at n positions: ListMLE of the student's items [n, m] (its top-m, log p_S)
    in the order of the teacher's cached log-probs [n, k]: [n]. Items outside the teacher's top-k
    are tied last, so only the r items inside it give terms."""
    return _teacher_ordered_listmle(student_item_ids, student_item_logprobs, teacher_topk_ids, teacher_topk_logprobs,
                                    with_gradient=False)[0]


def teacher_ordered_listmle_and_gradient(
    student_item_ids: torch.Tensor,
    student_item_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher_ordered_listmle [n], dL/d log p_S(item j) = listmle's dL/ds at item j's place in the teacher's order:
    [n, m], in the items' own order): the gradient without autograd."""
    return _teacher_ordered_listmle(student_item_ids, student_item_logprobs, teacher_topk_ids, teacher_topk_logprobs,
                                    with_gradient=True)


def _teacher_ordered_listmle(
    student_item_ids: torch.Tensor,
    student_item_logprobs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    with_gradient: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.no_grad():
        is_teacher_id = student_item_ids.unsqueeze(-1) == teacher_topk_ids.unsqueeze(-2)
        teacher_item_logprobs = torch.where(
            is_teacher_id, teacher_topk_logprobs.unsqueeze(-2), -math.inf
        ).amax(-1)
        teacher_order = teacher_item_logprobs.sort(dim=-1, descending=True, stable=True).indices
        num_ranked = (teacher_item_logprobs > -math.inf).sum(-1)
    per_position, ordered_gradient = _listmle(student_item_logprobs.gather(-1, teacher_order), num_ranked, None, with_gradient)
    if not with_gradient:
        return per_position, None
    return per_position, torch.zeros_like(ordered_gradient).scatter_(-1, teacher_order, ordered_gradient)


def token_level_ranking_loss(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    student_entropy: torch.Tensor,
    num_items: int = 10,
    prefix_entropy_fraction: float = 0.1,
) -> torch.Tensor:
    """L_tok = mean over decision_prefix_mask positions of ListMLE(log p_S of the student's top-m
    ids, in teacher order): scalar. student_logits [B, T, V] may be log-probs (idempotent)."""
    selected = decision_prefix_mask(student_entropy, mask, prefix_entropy_fraction)
    student_logprobs = torch.log_softmax(at_least_float32(student_logits[selected]), dim=-1)
    item_logprobs, item_ids = student_logprobs.topk(num_items, dim=-1)
    terms = teacher_ordered_listmle(item_ids, item_logprobs, teacher_topk_ids[selected], teacher_topk_logprobs[selected])
    return terms.sum() / selected.sum().clamp(min=1)


def sequence_level_ranking_loss(
    policy_mean_logprob: torch.Tensor,
    behaviour_mean_logprob: torch.Tensor,
    teacher_rank: torch.Tensor,
    candidate_mask: torch.Tensor,
    beta_p: float = 1.0,
) -> torch.Tensor:
    """L_seq = mean over prompts of ListMLE(s in teacher order, rank 0 first), [P, N] -> scalar;
    s_i = beta_p (mean log p_theta(y_i) - mean log p_behaviour(y_i)); empty prompts are skipped."""
    scores = beta_p * (policy_mean_logprob - behaviour_mean_logprob)
    with torch.no_grad():
        # Missing candidates sort last, so the valid ones form the ranked prefix.
        sort_key = teacher_rank.float().masked_fill(~candidate_mask, math.inf)
        teacher_order = sort_key.sort(dim=-1, stable=True).indices
        ordered_mask = candidate_mask.gather(-1, teacher_order)
    per_prompt = listmle_loss(scores.gather(-1, teacher_order), item_mask=ordered_mask)
    return per_prompt.sum() / candidate_mask.any(-1).sum().clamp(min=1)


def entropy_regularization(
    student_entropy: torch.Tensor, mask: torch.Tensor | None, quantile: float = 0.1
) -> torch.Tensor:
    """L_ent = mean of H_S(t) over completion tokens with H_S(t) >= the q-quantile of H_S over the
    batch's completion tokens (torch.quantile's linear interpolation; padding excluded): scalar.
    mask None: every entry is a completion token (flat [N] input)."""
    entropy = student_entropy if mask is None else student_entropy[mask]
    # The selection is not differentiated, so L_ent is linear in H_S with these coefficients.
    return (entropy_regularization_gradient(entropy, quantile) * entropy).sum()


def entropy_regularization_gradient(student_entropy: torch.Tensor, quantile: float = 0.1) -> torch.Tensor:
    """dL_ent/dH_S(t) = [H_S(t) >= q-quantile of H_S] / number of such t, over completion tokens [N] -> [N]
    (entropy_regularization's gradient with mask None; the quantile interpolates linearly, as torch.quantile)."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
    if student_entropy.dim() != 1:
        raise ValueError(f"student_entropy must be flat [N], got shape {tuple(student_entropy.shape)}")
    detached = student_entropy.detach()
    if detached.numel() == 0:
        return detached
    # torch.quantile's linear interpolation from one sort (torch.quantile costs several times a sort), its rank
    # q (n - 1) computed as torch.quantile does, in float32 or float64 as the entropies, so that the same tokens
    # are kept (bf16 would round it past the end). On the host: no wait for a GPU.
    rank = torch.tensor(quantile, dtype=torch.promote_types(detached.dtype, torch.float32), device="cpu") * (len(detached) - 1)
    below, above = int(rank), min(int(rank.ceil()), len(detached) - 1)
    ascending = detached.sort().values
    kept = detached >= torch.lerp(ascending[below], ascending[above], float(rank - below))
    # A division by the count, not a boolean index: a GPU needs no sync to size it. The count is >= 1 (the maximum).
    return kept.to(detached.dtype) / kept.sum()
