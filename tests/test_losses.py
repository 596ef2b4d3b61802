"""Stage-2 losses against brute-force references written independently here.

References use explicit Python loops over small vocabularies, explicit Plackett-Luce products and
enumeration of permutations; they never call the function under test.
"""

from __future__ import annotations

import itertools
import math
import weakref

import pytest
import torch

import stage2_distill.chunked
from conftest import quantile_entropy_loss
from stage2_distill.chunked import chunked_token_statistics
from stage2_distill.losses import (
    bucket_entropy,
    decision_prefix_mask,
    direct_distillation_loss,
    entropy_regularization,
    entropy_regularization_gradient,
    generalized_jsd,
    generalized_jsd_and_gradient,
    listmle_loss,
    listmle_loss_and_gradient,
    sequence_level_ranking_loss,
    student_bucket_logprobs,
    teacher_bucket_logprobs,
    teacher_ordered_listmle,
    teacher_ordered_listmle_and_gradient,
    token_level_ranking_loss,
    token_selection_weights,
)

F64 = torch.float64


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- brute-force references


def softmax_list(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(value - top) for value in logits]
    total = math.fsum(exps)
    return [value / total for value in exps]


def kl_loop(p: list[float], q: list[float]) -> float:
    return math.fsum(p_i * math.log(p_i / q_i) for p_i, q_i in zip(p, q) if p_i > 0)


def jsd_loop(p_teacher: list[float], p_student: list[float], beta: float) -> float:
    if beta == 0:
        return kl_loop(p_teacher, p_student)
    if beta == 1:
        return kl_loop(p_student, p_teacher)
    mixture = [beta * t + (1 - beta) * s for t, s in zip(p_teacher, p_student)]
    return beta * kl_loop(p_teacher, mixture) + (1 - beta) * kl_loop(p_student, mixture)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def entropy_loop(p: list[float]) -> float:
    return -math.fsum(p_i * math.log(p_i) for p_i in p if p_i > 0)


def plackett_luce_probability(scores: list[float], order: list[int]) -> float:
    """Probability of drawing `order` (best first) item by item, without replacement."""
    probability = 1.0
    for position, item in enumerate(order):
        remaining = order[position:]
        probability *= math.exp(scores[item]) / math.fsum(math.exp(scores[j]) for j in remaining)
    return probability


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The cached teacher signal from a full distribution: ids, log-probs, tail mass, entropy."""
    teacher_logprobs = torch.log_softmax(teacher_logits, -1)
    topk_logprobs, topk_ids = teacher_logprobs.topk(k, -1)
    tail_mass = 1 - topk_logprobs.exp().sum(-1)
    entropy = -(teacher_logprobs.exp() * teacher_logprobs).sum(-1)
    return topk_ids, topk_logprobs, tail_mass, entropy


def decision_prefix_loop(entropy: list[list[float]], mask: list[list[bool]], fraction: float):
    selected = [[False] * len(row) for row in mask]
    for b, (entropy_row, mask_row) in enumerate(zip(entropy, mask)):
        positions = [t for t, real in enumerate(mask_row) if real]
        threshold = fraction * math.fsum(entropy_row[t] for t in positions)
        cumulative = 0.0
        for t in positions:
            selected[b][t] = True
            cumulative += entropy_row[t]
            if cumulative >= threshold:
                break
    return selected


def quantile_loop(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


# ---------------------------------------------------------------- buckets and entropy


def test_student_buckets_match_softmax_and_sum_to_one():
    rng = generator(0)
    logits = torch.randn(3, 9, generator=rng, dtype=F64)
    ids = torch.stack([torch.randperm(9, generator=rng)[:4] for _ in range(3)])
    buckets = student_bucket_logprobs(torch.log_softmax(logits, -1), ids)
    assert buckets.shape == (3, 5)
    for row in range(3):
        probs = softmax_list(logits[row].tolist())
        expected = [probs[i] for i in ids[row].tolist()]
        expected.append(1 - math.fsum(expected))
        assert buckets[row].exp().tolist() == pytest.approx(expected, rel=1e-12)
        assert math.fsum(buckets[row].exp().tolist()) == pytest.approx(1, abs=1e-12)


def test_renormalized_buckets_compare_topk_only():
    rng = generator(1)
    logits = torch.randn(2, 8, generator=rng, dtype=F64)
    ids = torch.tensor([[3, 0, 6], [7, 1, 2]])
    student = student_bucket_logprobs(torch.log_softmax(logits, -1), ids, renormalize_topk=True)
    teacher_ids, teacher_logprobs, tail_mass, _ = teacher_topk(logits, 3)
    teacher = teacher_bucket_logprobs(teacher_logprobs, tail_mass, renormalize_topk=True)
    for row in range(2):
        probs = softmax_list(logits[row].tolist())
        kept = [probs[i] for i in ids[row].tolist()]
        assert student[row].exp().tolist() == pytest.approx([p / sum(kept) for p in kept])
        kept = [probs[i] for i in teacher_ids[row].tolist()]
        assert teacher[row].exp().tolist() == pytest.approx([p / sum(kept) for p in kept])


def test_teacher_buckets_sum_to_one_and_floor_the_tail():
    rng = generator(2)
    _, topk_logprobs, tail_mass, _ = teacher_topk(torch.randn(4, 10, generator=rng, dtype=F64), 3)
    buckets = teacher_bucket_logprobs(topk_logprobs, tail_mass)
    assert buckets.exp().sum(-1).tolist() == pytest.approx([1.0] * 4, abs=1e-12)
    assert buckets[..., :3].equal(topk_logprobs)
    # A cached tail of 0 or a rounding-negative tail is floored, not -inf or NaN.
    floored = teacher_bucket_logprobs(topk_logprobs[:2], torch.tensor([0.0, -1e-8], dtype=F64))
    assert floored[:, -1].tolist() == pytest.approx([math.log(1e-12)] * 2)


@pytest.mark.parametrize("case", ["underflow", "empty complement", "masked vocabulary"])
def test_student_tail_never_gives_nan_gradients(case):
    vocab = 4 if case == "empty complement" else 9
    logits = torch.zeros(2, vocab)
    ids = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    if case == "underflow":
        logits[:, :4] = 200.0  # the remaining mass is exp(-200): 0 in float32
    if case == "masked vocabulary":
        logits[:, 4:] = -math.inf
    logits.requires_grad_(True)
    teacher = teacher_bucket_logprobs(
        torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05]] * 2)), torch.tensor([0.05, 0.05])
    )
    for beta in (0.0, 0.5, 0.9, 1.0):
        buckets = student_bucket_logprobs(torch.log_softmax(logits, -1), ids)
        assert torch.isfinite(buckets).all()
        assert buckets[:, -1].tolist() == pytest.approx([math.log(1e-12)] * 2, rel=1e-6)
        (gradient,) = torch.autograd.grad(generalized_jsd(teacher, buckets, beta).sum(), logits)
        assert torch.isfinite(gradient).all()


def test_bucket_entropy_matches_loop_and_handles_zero_probability():
    rng = generator(3)
    logprobs = torch.log_softmax(torch.randn(3, 6, generator=rng, dtype=F64), -1)
    expected = [entropy_loop(row) for row in logprobs.exp().tolist()]
    assert bucket_entropy(logprobs).tolist() == pytest.approx(expected, rel=1e-12)
    with_zero = torch.tensor([0.5, 0.5, 0.0], dtype=F64).log().requires_grad_(True)
    value = bucket_entropy(with_zero)
    assert value.item() == pytest.approx(math.log(2))
    (gradient,) = torch.autograd.grad(value, with_zero)
    assert torch.isfinite(gradient).all()


# ---------------------------------------------------------------- generalised JSD


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_loops(beta):
    rng = generator(4)
    teacher = torch.log_softmax(torch.randn(4, 7, generator=rng, dtype=F64), -1)
    student = torch.log_softmax(torch.randn(4, 7, generator=rng, dtype=F64), -1)
    expected = [
        jsd_loop(t, s, beta) for t, s in zip(teacher.exp().tolist(), student.exp().tolist())
    ]
    assert generalized_jsd(teacher, student, beta).tolist() == pytest.approx(expected, rel=1e-10)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    rng = generator(5)
    teacher = torch.log_softmax(torch.randn(3, 11, generator=rng, dtype=F64), -1)
    student = torch.log_softmax(torch.randn(3, 11, generator=rng, dtype=F64), -1)
    p_teacher, p_student = teacher.exp().tolist(), student.exp().tolist()
    forward = [kl_loop(t, s) for t, s in zip(p_teacher, p_student)]
    reverse = [kl_loop(s, t) for t, s in zip(p_teacher, p_student)]
    assert generalized_jsd(teacher, student, 0.0).tolist() == pytest.approx(forward, rel=1e-12)
    assert generalized_jsd(teacher, student, 1.0).tolist() == pytest.approx(reverse, rel=1e-12)
    assert forward != pytest.approx(reverse)
    # Interior betas are the mixture form, which tends to 0 (not to KL) at the endpoints.
    assert generalized_jsd(teacher, student, 1e-9).abs().max() < 1e-6
    with pytest.raises(ValueError):
        generalized_jsd(teacher, student, 1.5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_generalized_jsd_gradcheck(beta):
    rng = generator(6)
    teacher_logits = torch.randn(3, 5, generator=rng, dtype=F64, requires_grad=True)
    student_logits = torch.randn(3, 5, generator=rng, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, s: generalized_jsd(torch.log_softmax(t, -1), torch.log_softmax(s, -1), beta),
        (teacher_logits, student_logits),
    )


# ---------------------------------------------------------------- token selection weights


def test_soft_weights_are_sigmoid_of_entropy_gap_without_gradient():
    student_entropy = torch.tensor([[1.0, 2.0, 0.5], [3.0, math.nan, 7.0]], requires_grad=True)
    teacher_entropy = torch.tensor([[0.5, 2.5, 0.5], [1.0, 1.0, math.nan]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    weights = token_selection_weights(student_entropy, teacher_entropy, mask, tau=2.0)
    expected = [[sigmoid(0.25), sigmoid(-0.25), 0.5], [sigmoid(1.0), 0.0, 0.0]]
    assert weights.tolist()[0] == pytest.approx(expected[0])
    assert weights.tolist()[1] == pytest.approx(expected[1])
    assert not weights.requires_grad and weights.grad_fn is None


def test_hard_selection_picks_exactly_the_top_fraction():
    gap = torch.tensor([[0.3, 2.0, -1.0, 9.0, 0.1], [1.5, 0.2, 0.9, 50.0, 50.0]])
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    mask[1, 4] = False  # 7 real tokens; padded positions carry the largest gaps
    teacher_entropy = torch.zeros_like(gap)

    def chosen(fraction):
        weights = token_selection_weights(gap, teacher_entropy, mask, hard_fraction=fraction)
        assert set(weights.unique().tolist()) <= {0.0, 1.0}
        return {tuple(index) for index in weights.nonzero().tolist()}

    assert chosen(0.3) == {(1, 3), (0, 1)}  # round(0.3 * 7) = 2
    assert chosen(0.5) == {(1, 3), (0, 1), (1, 0), (1, 2)}  # round(3.5) = 4
    assert chosen(0.01) == {(1, 3)}  # at least one token
    assert chosen(1.0) == {tuple(index) for index in mask.nonzero().tolist()}


# ---------------------------------------------------------------- direct distillation


def make_direct_batch(seed: int, batch: int = 2, length: int = 4, vocab: int = 8, k: int = 3):
    rng = generator(seed)
    student_logits = torch.randn(batch, length, vocab, generator=rng, dtype=F64)
    teacher_logits = 2 * torch.randn(batch, length, vocab, generator=rng, dtype=F64)
    ids, topk_logprobs, tail_mass, teacher_entropy = teacher_topk(teacher_logits, k)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, -1] = False
    return student_logits, teacher_logits, ids, topk_logprobs, tail_mass, teacher_entropy, mask


def test_direct_loss_matches_loops():
    student_logits, teacher_logits, ids, topk_logprobs, tail_mass, teacher_entropy, mask = (
        make_direct_batch(7)
    )
    student_entropy = torch.rand(mask.shape, generator=generator(8), dtype=F64) * 3
    weights = token_selection_weights(student_entropy, teacher_entropy, mask)
    loss = direct_distillation_loss(
        teacher_bucket_logprobs(topk_logprobs, tail_mass),
        student_bucket_logprobs(torch.log_softmax(student_logits, -1), ids),
        weights,
        mask,
        beta=0.9,
    )
    total, count = 0.0, 0
    for b, t in mask.nonzero().tolist():
        teacher_probs = softmax_list(teacher_logits[b, t].tolist())
        student_probs = softmax_list(student_logits[b, t].tolist())
        top = ids[b, t].tolist()
        teacher_buckets = [teacher_probs[i] for i in top]
        teacher_buckets.append(1 - math.fsum(teacher_buckets))
        student_buckets = [student_probs[i] for i in top]
        student_buckets.append(1 - math.fsum(student_buckets))
        gap = student_entropy[b, t].item() - entropy_loop(teacher_probs)
        total += sigmoid(gap) * jsd_loop(teacher_buckets, student_buckets, 0.9)
        count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-10)


def test_direct_loss_gradcheck():
    student_logits, _, ids, topk_logprobs, tail_mass, _, mask = make_direct_batch(9, length=3)
    teacher = teacher_bucket_logprobs(topk_logprobs, tail_mass)
    weights = torch.rand(mask.shape, generator=generator(10), dtype=F64)
    student_logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda logits: direct_distillation_loss(
            teacher, student_bucket_logprobs(torch.log_softmax(logits, -1), ids), weights, mask
        ),
        (student_logits,),
    )


# ---------------------------------------------------------------- ListMLE


def test_listmle_is_the_plackett_luce_likelihood():
    scores = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=F64)
    total_probability = 0.0
    total_exp_loss = 0.0
    for order in itertools.permutations(range(4)):
        probability = plackett_luce_probability(scores.tolist(), list(order))
        loss = listmle_loss(scores[list(order)])
        assert math.exp(-loss.item()) == pytest.approx(probability, rel=1e-12)
        total_probability += probability
        total_exp_loss += math.exp(-loss.item())
    assert total_probability == pytest.approx(1.0, abs=1e-12)
    assert total_exp_loss == pytest.approx(1.0, abs=1e-12)


def test_listmle_uses_suffix_sums_not_the_reversed_prefix_form():
    scores = torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0], dtype=F64)  # agrees with the order
    values = scores.tolist()
    prefix_form = -math.fsum(
        values[k] - math.log(math.fsum(math.exp(v) for v in values[: k + 1])) for k in range(5)
    )
    suffix_form = -math.fsum(
        values[k] - math.log(math.fsum(math.exp(v) for v in values[k:])) for k in range(5)
    )
    assert listmle_loss(scores).item() == pytest.approx(suffix_form, rel=1e-12)
    assert abs(listmle_loss(scores).item() - prefix_form) > 1.0
    # The prefix form is the likelihood of the reversed ranking: it prefers the wrong order.
    assert listmle_loss(scores.flip(0)).item() == pytest.approx(prefix_form, rel=1e-12)
    assert listmle_loss(scores) < listmle_loss(scores.flip(0))


@pytest.mark.parametrize("num_ranked", [0, 1, 2, 3, 5])
def test_partial_ranking_matches_marginal_over_tied_tail(num_ranked):
    scores = torch.tensor([0.5, -0.3, 1.1, 0.0, -2.0], dtype=F64)
    # P(first r items drawn in this order) = sum of PL probabilities of all orders starting so.
    marginal = math.fsum(
        plackett_luce_probability(scores.tolist(), list(order))
        for order in itertools.permutations(range(5))
        if list(order[:num_ranked]) == list(range(num_ranked))
    )
    loss = listmle_loss(scores, torch.tensor(num_ranked))
    assert math.exp(-loss.item()) == pytest.approx(marginal, rel=1e-12)


def test_listmle_item_mask_drops_items_everywhere():
    scores = torch.tensor([[0.4, math.nan, -0.6, 50.0, 1.3], [1.0, 2.0, 3.0, 4.0, 5.0]], dtype=F64)
    item_mask = torch.tensor([[True, False, True, False, True], [True] * 5])
    kept = [0.4, -0.6, 1.3]
    full = listmle_loss(scores, item_mask=item_mask)
    assert math.exp(-full[0].item()) == pytest.approx(
        plackett_luce_probability(kept, [0, 1, 2]), rel=1e-12
    )
    assert math.exp(-full[1].item()) == pytest.approx(
        plackett_luce_probability(scores[1].tolist(), list(range(5))), rel=1e-12
    )
    # num_ranked counts positions: positions 0 and 2 give terms, the rest only denominators.
    partial = listmle_loss(scores[:1], torch.tensor([3]), item_mask[:1])
    marginal = math.fsum(
        plackett_luce_probability(kept, list(order))
        for order in itertools.permutations(range(3))
        if order[:2] == (0, 1)
    )
    assert math.exp(-partial.item()) == pytest.approx(marginal, rel=1e-12)


def test_listmle_gradcheck():
    scores = torch.randn(3, 5, generator=generator(11), dtype=F64, requires_grad=True)
    num_ranked = torch.tensor([5, 2, 4])
    item_mask = torch.tensor([[True] * 5, [True, False, True, True, False], [True] * 4 + [False]])
    assert torch.autograd.gradcheck(
        lambda s: listmle_loss(s, num_ranked, item_mask), (scores,)
    )


# ---------------------------------------------------------------- token-level ranking


def test_decision_prefix_is_per_sequence_not_batch_flattened():
    entropy = torch.tensor(
        [[1.0] * 10, [0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0]], dtype=F64
    )
    mask = torch.ones(2, 10, dtype=torch.bool)
    selected = decision_prefix_mask(entropy, mask, prefix_entropy_fraction=0.3)
    expected = torch.zeros(2, 10, dtype=torch.bool)
    expected[0, :3] = True  # 1 + 1 + 1 reaches 0.3 * 10
    expected[1, :3] = True  # 0.5 + 0.5 + 2 reaches 0.3 * 10
    assert selected.equal(expected)
    # The authors' cut over the flattened batch takes the first 6 positions of sequence 0 only.
    flat = entropy.flatten()
    flat_before = torch.cat([flat.new_zeros(1), flat.cumsum(0)[:-1]])
    flattened = (flat_before < 0.3 * flat.sum()).view(2, 10)
    assert not flattened[1].any() and flattened[0, :6].all()
    assert not selected.equal(flattened)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.35, 1.0])
def test_decision_prefix_matches_loop(fraction):
    rng = generator(12)
    # Multiples of 1/8 sum exactly, so the threshold comparison is the same in both.
    entropy = torch.randint(0, 24, (5, 9), generator=rng).to(F64) / 8
    entropy[3] = 0.0  # no entropy at all: the first position only
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[1, :2] = False  # left padding
    mask[2, 6:] = False  # right padding
    mask[4] = False  # an empty row
    garbage = entropy.masked_fill(~mask, math.nan)
    selected = decision_prefix_mask(garbage, mask, fraction)
    assert selected.tolist() == decision_prefix_loop(entropy.tolist(), mask.tolist(), fraction)


def make_ranking_batch(seed: int, batch=2, length=6, vocab=9, k=4):
    rng = generator(seed)
    student_logits = torch.randn(batch, length, vocab, generator=rng, dtype=F64)
    teacher_ids, teacher_logprobs, _, _ = teacher_topk(
        torch.randn(batch, length, vocab, generator=rng, dtype=F64), k
    )
    student_entropy = torch.rand(batch, length, generator=rng, dtype=F64) * 2
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, -2:] = False
    return student_logits, teacher_ids, teacher_logprobs, student_entropy, mask


def token_ranking_loop(student_logits, teacher_ids, teacher_logprobs, entropy, mask, m, fraction):
    selected = decision_prefix_loop(entropy.tolist(), mask.tolist(), fraction)
    losses = []
    for b, row in enumerate(selected):
        for t, chosen in enumerate(row):
            if not chosen:
                continue
            probs = softmax_list(student_logits[b, t].tolist())
            items = sorted(range(len(probs)), key=lambda i: -probs[i])[:m]
            teacher = dict(zip(teacher_ids[b, t].tolist(), teacher_logprobs[b, t].tolist()))
            ranked = sorted((i for i in items if i in teacher), key=lambda i: -teacher[i])
            tied_last = [i for i in items if i not in teacher]
            order = ranked + tied_last
            log_likelihood = math.fsum(
                math.log(probs[order[position]] / math.fsum(probs[j] for j in order[position:]))
                for position in range(len(ranked))
            )
            losses.append(-log_likelihood)
    return math.fsum(losses) / len(losses)


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_token_level_ranking_loss_matches_loop(fraction):
    student_logits, teacher_ids, teacher_logprobs, entropy, mask = make_ranking_batch(13)
    expected = token_ranking_loop(
        student_logits, teacher_ids, teacher_logprobs, entropy, mask, 5, fraction
    )
    loss = token_level_ranking_loss(
        student_logits, teacher_ids, teacher_logprobs, mask, entropy, 5, fraction
    )
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    selected = decision_prefix_mask(entropy, mask, fraction)
    topm_logprobs, topm_ids = torch.log_softmax(student_logits[selected], -1).topk(5, -1)
    terms = teacher_ordered_listmle(topm_ids, topm_logprobs, teacher_ids[selected], teacher_logprobs[selected])
    assert terms.shape == (selected.sum(),)
    assert (terms.sum() / selected.sum()).item() == pytest.approx(expected, rel=1e-10)


def test_token_level_ranking_gradient_flows_only_through_student_scores():
    student_logits, teacher_ids, teacher_logprobs, entropy, mask = make_ranking_batch(14)
    student_logits.requires_grad_(True)
    entropy.requires_grad_(True)
    teacher_logprobs.requires_grad_(True)
    loss = token_level_ranking_loss(student_logits, teacher_ids, teacher_logprobs, mask, entropy, 5)
    loss.backward()
    assert entropy.grad is None and teacher_logprobs.grad is None
    assert student_logits.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(
        lambda logits: token_level_ranking_loss(
            logits, teacher_ids, teacher_logprobs.detach(), mask, entropy.detach(), 5, 0.5
        ),
        (student_logits.detach().requires_grad_(True),),
    )


# ---------------------------------------------------------------- sequence-level ranking


def test_sequence_level_ranking_matches_loop_and_gradcheck():
    rng = generator(15)
    policy = torch.randn(3, 4, generator=rng, dtype=F64)
    behaviour = torch.randn(3, 4, generator=rng, dtype=F64)
    teacher_rank = torch.tensor([[2, 0, 3, 1], [1, 99, 0, 2], [0, 1, 2, 3]])
    candidate_mask = torch.tensor([[True] * 4, [True, False, True, True], [False] * 4])
    behaviour[2] = math.nan  # a padded prompt
    loss = sequence_level_ranking_loss(policy, behaviour, teacher_rank, candidate_mask, beta_p=0.5)
    log_likelihoods = []
    for p in range(2):
        scores = [0.5 * (a - b) for a, b in zip(policy[p].tolist(), behaviour[p].tolist())]
        valid = [i for i in range(4) if candidate_mask[p, i]]
        order = sorted(valid, key=lambda i: teacher_rank[p, i].item())
        log_likelihoods.append(math.log(plackett_luce_probability(scores, order)))
    assert loss.item() == pytest.approx(-math.fsum(log_likelihoods) / 2, rel=1e-12)
    assert torch.autograd.gradcheck(
        lambda pol: sequence_level_ranking_loss(pol, behaviour, teacher_rank, candidate_mask, 0.5),
        (policy.requires_grad_(True),),
    )


# ---------------------------------------------------------------- entropy regularisation


def test_entropy_quantile_ignores_padding_and_gradcheck():
    entropy = torch.tensor(
        [[0.9, 2.0, 0.1, 1.4, 3.3, 0.0], [0.6, 1.1, 2.7, 0.0, 0.0, 0.0]], dtype=F64
    )
    mask = torch.tensor([[True] * 5 + [False], [True] * 3 + [False] * 3])
    real = entropy[mask].tolist()
    threshold = quantile_loop(real, 0.3)
    kept = [h for h in real if h >= threshold]
    loss = entropy_regularization(entropy, mask, quantile=0.3)
    assert loss.item() == pytest.approx(math.fsum(kept) / len(kept), rel=1e-12)
    # The padded zeros would pull the quantile down and let the smallest real entropy in.
    with_padding = entropy_regularization(entropy, torch.ones_like(mask), quantile=0.3)
    assert with_padding.item() != pytest.approx(loss.item())
    assert torch.autograd.gradcheck(
        lambda h: entropy_regularization(h, mask, 0.3), (entropy.clone().requires_grad_(True),)
    )


# ---------------------------------------------------------------- flat inputs (mask None)


def test_flat_inputs_equal_masked_inputs():
    """mask=None takes the completion tokens already gathered (flat [N]), as the Objective does:
    values and gradients equal the masked call on the padded layout (tested against loops above)."""
    student_logits, _, ids, topk_logprobs, tail_mass, teacher_entropy, mask = make_direct_batch(30, length=5)
    student_entropy = torch.rand(mask.shape, generator=generator(31), dtype=F64) * 3
    teacher = teacher_bucket_logprobs(topk_logprobs, tail_mass)
    logits = student_logits.requires_grad_(True)
    student = student_bucket_logprobs(torch.log_softmax(logits, -1), ids)
    entropy = student_entropy.requires_grad_(True)
    for hard_fraction in (None, 0.4):
        masked = token_selection_weights(entropy, teacher_entropy, mask, hard_fraction=hard_fraction)
        flat = token_selection_weights(entropy[mask], teacher_entropy[mask], None, hard_fraction=hard_fraction)
        assert flat.equal(masked[mask])
    weights = token_selection_weights(entropy, teacher_entropy, mask)
    pairs = [
        (direct_distillation_loss(teacher, student, weights, mask, 0.9),
         direct_distillation_loss(teacher[mask], student[mask], weights[mask], None, 0.9)),
        (direct_distillation_loss(teacher, student, weights, mask, 0.5, torch.tensor(7.0, dtype=F64)),
         direct_distillation_loss(teacher[mask], student[mask], weights[mask], None, 0.5, torch.tensor(7.0, dtype=F64))),
        (entropy_regularization(entropy, mask, 0.3), entropy_regularization(entropy[mask], None, 0.3)),
    ]
    for masked, flat in pairs:
        assert flat.item() == pytest.approx(masked.item(), rel=1e-14)
        for got, expected in zip(torch.autograd.grad(flat, (logits, entropy), allow_unused=True, retain_graph=True),
                                 torch.autograd.grad(masked, (logits, entropy), allow_unused=True, retain_graph=True)):
            assert (got is None) == (expected is None)
            if got is not None:
                torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


# ---------------------------------------------------------------- closed-form gradients (the Objective's)


def autograd_gradient(loss_fn, inputs: torch.Tensor) -> torch.Tensor:
    leaf = inputs.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(loss_fn(leaf).sum(), leaf)
    return gradient


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9, 1.0])
def test_generalized_jsd_gradient_equals_autograd(beta):
    """Including zero-probability buckets on either side (log-prob -inf), as a clamped tail or an
    unreachable teacher id gives them."""
    rng = generator(40)
    teacher = torch.log_softmax(2 * torch.randn(6, 5, generator=rng, dtype=F64), -1)
    student = torch.log_softmax(2 * torch.randn(6, 5, generator=rng, dtype=F64), -1)
    teacher[0, 1] = -math.inf
    student[1, 2] = -math.inf
    expected = autograd_gradient(lambda s: generalized_jsd(teacher, s, beta), student)
    divergence, got = generalized_jsd_and_gradient(teacher, student, beta)
    assert divergence.equal(generalized_jsd(teacher, student, beta))
    assert torch.isfinite(got[1:]).all()
    # Reverse KL against a zero teacher probability is unbounded: both give the same huge number there.
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        generalized_jsd_and_gradient(teacher, student, -0.1)


def test_listmle_gradient_equals_autograd():
    """Full rankings, partial ones (num_ranked), dropped items, and a row with every item dropped."""
    scores = 3 * torch.randn(5, 6, generator=generator(41), dtype=F64)
    num_ranked = torch.tensor([6, 2, 0, 4, 1])
    item_mask = torch.tensor([[True] * 6, [True, False, True, True, False, True], [True] * 6,
                              [False] * 6, [True] * 5 + [False]])
    for ranked, dropped in [(None, None), (num_ranked, None), (None, item_mask), (num_ranked, item_mask)]:
        expected = autograd_gradient(lambda s: listmle_loss(s, ranked, dropped), scores)
        loss, got = listmle_loss_and_gradient(scores, ranked, dropped)
        assert loss.equal(listmle_loss(scores, ranked, dropped))
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
        if dropped is not None:
            assert (got[~dropped] == 0).all()


def test_listmle_gradient_in_float32_far_below_zero():
    """A peaked student's top-m log-probs reach -100 and beyond, where exp(-logsumexp) overflows float32: the
    gradient (taken in log space) stays as close to float64's as autograd's own is. And a kept item at the most
    negative number leaves a dropped item's gradient 0."""
    scores = torch.tensor([[0.0, -40.0, -100.0, -150.0, -1e4], [-90.0, -95.0, -99.0, -200.0, -3e4]], dtype=F64)
    exact = autograd_gradient(lambda s: listmle_loss(s), scores)
    autograd_float32 = autograd_gradient(lambda s: listmle_loss(s), scores.float())
    _, got = listmle_loss_and_gradient(scores.float())
    assert torch.isfinite(got).all()
    assert (got.double() - exact).abs().max() <= max((autograd_float32.double() - exact).abs().max().item(), 1e-6)
    tiny = torch.tensor([[1.0, torch.finfo(torch.float32).min, -2.0]])
    dropped_last = torch.tensor([[True, True, False]])
    _, got = listmle_loss_and_gradient(tiny, item_mask=dropped_last)
    assert got[0, 2] == 0
    torch.testing.assert_close(got, autograd_gradient(lambda s: listmle_loss(s, item_mask=dropped_last), tiny))


def test_token_ranking_gradient_equals_autograd():
    """The token-level ranking's gradient with respect to the student's item log-probs, in their own order."""
    rng = generator(42)
    item_logprobs = torch.log_softmax(torch.randn(4, 12, generator=rng, dtype=F64), -1).topk(5, -1)
    teacher = torch.log_softmax(torch.randn(4, 12, generator=rng, dtype=F64), -1).topk(3, -1)
    per_position, got = teacher_ordered_listmle_and_gradient(item_logprobs.indices, item_logprobs.values, teacher.indices,
                                                             teacher.values)
    assert per_position.equal(teacher_ordered_listmle(item_logprobs.indices, item_logprobs.values, teacher.indices, teacher.values))
    expected = autograd_gradient(lambda s: teacher_ordered_listmle(item_logprobs.indices, s, teacher.indices, teacher.values),
                                 item_logprobs.values)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)



def test_entropy_regularization_gradient_equals_autograd():
    """With ties at the quantile (kept, as >= keeps them), and no tokens at all."""
    entropy = torch.tensor([0.5, 2.0, 1.0, 1.0, 3.0, 1.0, 0.1], dtype=F64)
    for quantile in (0.0, 0.3, 0.5, 1.0):
        expected = autograd_gradient(lambda h: quantile_entropy_loss(h, quantile), entropy)
        torch.testing.assert_close(entropy_regularization_gradient(entropy, quantile), expected, rtol=1e-15, atol=0)
        assert entropy_regularization(entropy, None, quantile).item() == pytest.approx(quantile_entropy_loss(entropy, quantile).item(), rel=1e-15)
    assert entropy_regularization_gradient(torch.tensor([0.5, 1.0, 1.0, 1.0], dtype=F64), 0.5).tolist() == [0, 1 / 3, 1 / 3, 1 / 3]
    # The same tokens as torch.quantile keeps, whose rank q (n - 1) is rounded to the input's dtype (the
    # first of these differed when computed in double precision), with ties, in float32 and float64.
    cases = [(51, 0.3, torch.float32, 1), *itertools.product((1, 2, 7, 51, 100, 267), (0.0, 0.1, 0.3, 0.37, 0.6, 0.95, 1.0),
                                                              (torch.float32, F64), range(2, 8))]
    for size, quantile, dtype, seed in cases:
        random_entropy = torch.rand(size, generator=generator(seed), dtype=dtype) * 4
        if seed % 3 == 0:
            random_entropy = random_entropy.round()
        kept = random_entropy >= torch.quantile(random_entropy, quantile)
        assert entropy_regularization_gradient(random_entropy, quantile).equal(kept.to(dtype) / kept.sum()), (size, quantile, dtype, seed)
    # bf16 (which torch.quantile refuses): a rank rounded in bf16 would point past the end.
    for size, quantile in ((260, 1.0), (1000, 0.999), (7, 0.5)):
        low_precision = (torch.rand(size, generator=generator(size)) * 4).bfloat16()
        coefficients = entropy_regularization_gradient(low_precision, quantile)
        assert coefficients.dtype == torch.bfloat16 and coefficients.max() > 0
    with pytest.raises(ValueError, match="flat"):
        entropy_regularization_gradient(torch.rand(3, 5), 0.1)
    empty = torch.zeros(0, dtype=F64, requires_grad=True)
    assert entropy_regularization(empty, None).item() == 0 and entropy_regularization_gradient(empty).shape == (0,)
    with pytest.raises(ValueError):
        entropy_regularization_gradient(entropy, 1.5)


# ---------------------------------------------------------------- padding invariance


def pad_with_garbage(tensor: torch.Tensor, extra: int, value: float | None, seed: int):
    """Append `extra` positions along dim 1 plus one whole padded sequence, filled with garbage."""
    shape = list(tensor.shape)
    shape[1] += extra
    shape[0] += 1
    if tensor.dtype == torch.bool:
        padded = torch.zeros(shape, dtype=torch.bool)
    elif not tensor.is_floating_point():
        padded = torch.randint(0, 5, shape, generator=generator(seed))
    elif value is None:
        padded = 100 * torch.randn(shape, generator=generator(seed), dtype=tensor.dtype)
    else:
        padded = torch.full(shape, value, dtype=tensor.dtype)
    padded[: tensor.shape[0], : tensor.shape[1]] = tensor
    return padded


def all_losses(student_logits, teacher_ids, teacher_logprobs, tail_mass, teacher_entropy, mask):
    student_logprobs = torch.log_softmax(student_logits, -1)
    student_entropy = -(student_logprobs.exp() * student_logprobs).sum(-1)
    soft = token_selection_weights(student_entropy, teacher_entropy, mask)
    hard = token_selection_weights(student_entropy, teacher_entropy, mask, hard_fraction=0.4)
    teacher = teacher_bucket_logprobs(teacher_logprobs, tail_mass)
    student = student_bucket_logprobs(student_logprobs, teacher_ids)
    return (
        direct_distillation_loss(teacher, student, soft, mask),
        direct_distillation_loss(teacher, student, hard, mask, beta=0.5),
        token_level_ranking_loss(
            student_logits, teacher_ids, teacher_logprobs, mask, student_entropy, 4, 0.5
        ),
        entropy_regularization(student_entropy, mask),
    )


def test_padding_changes_no_loss_and_no_gradient():
    student_logits, _, ids, topk_logprobs, tail_mass, teacher_entropy, mask = make_direct_batch(
        16, length=5
    )
    base_logits = student_logits.clone().requires_grad_(True)
    base = all_losses(base_logits, ids, topk_logprobs, tail_mass, teacher_entropy, mask)

    padded_logits = pad_with_garbage(student_logits, 3, None, 17).requires_grad_(True)
    padded = all_losses(
        padded_logits,
        pad_with_garbage(ids, 3, None, 18),
        pad_with_garbage(topk_logprobs, 3, math.nan, 0),
        pad_with_garbage(tail_mass, 3, math.nan, 0),
        pad_with_garbage(teacher_entropy, 3, math.nan, 0),
        pad_with_garbage(mask, 3, None, 0),
    )
    for base_loss, padded_loss in zip(base, padded):
        assert padded_loss.item() == pytest.approx(base_loss.item(), rel=1e-12, abs=1e-15)
        (base_gradient,) = torch.autograd.grad(base_loss, base_logits, retain_graph=True)
        (padded_gradient,) = torch.autograd.grad(padded_loss, padded_logits, retain_graph=True)
        real = padded_gradient[: mask.shape[0], : mask.shape[1]]
        assert torch.allclose(real, base_gradient, rtol=1e-12, atol=1e-15)
        assert padded_gradient[mask.shape[0] :].abs().sum() == 0
        assert padded_gradient[:, mask.shape[1] :].abs().sum() == 0


# ---------------------------------------------------------------- chunked statistics


def chunked_inputs(seed: int, tokens: int = 10, hidden: int = 6, padded_vocab: int = 13):
    rng = generator(seed)
    hidden_states = torch.randn(tokens, hidden, generator=rng, dtype=F64, requires_grad=True)
    weight = torch.randn(padded_vocab, hidden, generator=rng, dtype=F64, requires_grad=True)
    teacher_ids = torch.stack([torch.randperm(11, generator=rng)[:3] for _ in range(tokens)])
    target_ids = torch.randint(0, 11, (tokens,), generator=rng)
    return hidden_states, weight, teacher_ids, target_ids


def unchunked_reference(hidden_states, weight, teacher_ids, target_ids, vocab_size, m):
    logits = hidden_states @ weight[:vocab_size].T
    probs = torch.softmax(logits, -1)
    topk_probs = probs.gather(-1, teacher_ids)
    buckets = torch.cat([topk_probs, 1 - topk_probs.sum(-1, keepdim=True)], -1).log()
    entropy = -(probs * probs.log()).sum(-1)
    target = probs.gather(-1, target_ids[:, None]).squeeze(-1).log()
    topm_probs, topm_ids = probs.topk(m, -1)
    return buckets, entropy, target, topm_probs.log(), topm_ids


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64])
def test_chunked_statistics_equal_unchunked_values_and_gradients(chunk_size):
    hidden_states, weight, teacher_ids, target_ids = chunked_inputs(19)
    chunked = chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, chunk_size, vocab_size=11, num_items=4)
    reference = unchunked_reference(hidden_states, weight, teacher_ids, target_ids, 11, 4)
    assert chunked.topm_ids.equal(reference[4])
    float_fields = [0, 1, 2, 3]
    for index in float_fields:
        assert torch.allclose(chunked[index], reference[index], rtol=1e-12, atol=1e-12)
    rng = generator(20)
    cotangents = [torch.randn(reference[i].shape, generator=rng, dtype=F64) for i in float_fields]

    def gradients(fields):
        objective = sum((fields[i] * c).sum() for i, c in zip(float_fields, cotangents))
        return torch.autograd.grad(objective, (hidden_states, weight))

    chunked_hidden, chunked_weight = gradients(chunked)
    reference_hidden, reference_weight = gradients(reference)
    assert torch.allclose(chunked_hidden, reference_hidden, rtol=1e-10, atol=1e-12)
    assert torch.allclose(chunked_weight, reference_weight, rtol=1e-10, atol=1e-12)
    assert chunked_weight[11:].abs().sum() == 0  # rows beyond the tokenizer take no part


def test_chunked_statistics_gradcheck():
    hidden_states, weight, teacher_ids, target_ids = chunked_inputs(21, tokens=5, hidden=3)

    def float_fields(h, w):
        return chunked_token_statistics(h, w, teacher_ids, target_ids, 2, vocab_size=11, num_items=3)[:4]

    assert torch.autograd.gradcheck(float_fields, (hidden_states, weight))


def test_chunked_statistics_keep_no_vocabulary_sized_tensor_for_backward():
    tokens, vocab, chunk_size = 64, 50, 8
    rng = generator(22)
    hidden_states = torch.randn(tokens, 4, generator=rng, requires_grad=True)
    weight = torch.randn(vocab, 4, generator=rng, requires_grad=True)
    teacher_ids = torch.stack([torch.randperm(vocab, generator=rng)[:5] for _ in range(tokens)])
    saved_vocab_elements = []

    def record(tensor):
        if tensor.dim() and tensor.shape[-1] == vocab:
            saved_vocab_elements.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        stats = chunked_token_statistics(
            hidden_states, weight, teacher_ids, torch.zeros(tokens, dtype=torch.long), chunk_size, num_items=3
        )
    assert sum(saved_vocab_elements) <= chunk_size * vocab
    (stats.entropy.sum() + stats.bucket_logprobs.sum() + stats.topm_logprobs.sum()).backward()
    assert torch.isfinite(hidden_states.grad).all()


def test_chunked_statistics_hold_one_chunk_of_logprobs_at_a_time(monkeypatch):
    """The forward lets go of a chunk's [chunk, V] log p before it computes the next one."""
    hidden_states, weight, teacher_ids, target_ids = chunked_inputs(24, tokens=10)
    forward_chunk = stage2_distill.chunked._forward_chunk
    earlier_logprobs = []

    def tracked(*args):
        assert all(ref() is None for ref in earlier_logprobs), "an earlier chunk's log p is still alive"
        fields = forward_chunk(*args)
        earlier_logprobs.append(weakref.ref(fields[-1]))
        return fields

    monkeypatch.setattr(stage2_distill.chunked, "_forward_chunk", tracked)
    stats = chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, chunk_size=3, vocab_size=11, num_items=4)
    assert len(earlier_logprobs) == 4 and stats.topm_ids.shape == (10, 4)


def test_chunked_statistics_without_items_have_no_item_fields_and_a_bad_selector_is_refused():
    hidden_states, weight, teacher_ids, target_ids = chunked_inputs(25)
    stats = chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, 4, vocab_size=11)
    assert stats.topm_logprobs is None and stats.topm_ids is None and stats.ranked_index is None
    stats.entropy.sum().backward()
    assert torch.isfinite(hidden_states.grad).all()
    for selector in (lambda entropy: (entropy > 0).long(), lambda entropy: (entropy > 0)[:-1]):
        with pytest.raises(ValueError, match="ranked_rows must return a bool tensor"):
            chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, 4, 11, num_items=3, ranked_rows=selector)


def test_chunked_statistics_reduce_bf16_logits_in_float32():
    hidden_states, weight, teacher_ids, target_ids = chunked_inputs(23)
    hidden_states, weight = hidden_states.detach(), weight.detach()
    low = chunked_token_statistics(
        hidden_states.bfloat16(), weight.bfloat16(), teacher_ids, target_ids, 4, vocab_size=11
    )
    logits = (hidden_states.bfloat16() @ weight[:11].bfloat16().T).float()
    expected = torch.log_softmax(logits, -1).gather(-1, target_ids[:, None]).squeeze(-1)
    assert low.target_logprob.dtype == low.entropy.dtype == torch.float32
    assert torch.allclose(low.target_logprob, expected, rtol=1e-6, atol=1e-6)


def test_chunked_statistics_accept_no_tokens():
    weight = torch.randn(11, 4, requires_grad=True)
    no_ids = torch.zeros(0, dtype=torch.long)
    stats = chunked_token_statistics(torch.zeros(0, 4), weight, no_ids.view(0, 3), no_ids, chunk_size=8, num_items=5)
    assert [tuple(field.shape) for field in stats] == [(0, 4), (0,), (0,), (0, 5), (0, 5), (0,)]
    (stats.entropy.sum() + stats.topm_logprobs.sum()).backward()
    assert weight.grad.abs().sum() == 0
