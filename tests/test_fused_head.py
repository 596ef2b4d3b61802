"""The fused head statistics (stage2_distill.chunked) against independent references.

Three references, none calling the code under test: brute-force Python loops over small
vocabularies in float64 (math.fsum), `torch.autograd.gradcheck` of the analytic backward, and the
autograd composite the fused function replaced (log_softmax, student_bucket_logprobs,
bucket_entropy, gather, topk over every token), copied here as it was.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from conftest import quantile_entropy_loss
from stage2_distill.chunked import TokenStatistics, chunked_token_statistics, student_statistics
from stage2_distill.losses import (
    TAIL_MASS_FLOOR,
    at_least_float32,
    bucket_entropy,
    direct_distillation_loss,
    entropy_regularization,
    sequence_level_ranking_loss,
    student_bucket_logprobs,
    teacher_bucket_logprobs,
    teacher_ordered_listmle,
    token_level_ranking_loss,
    token_selection_weights,
)
from stage2_distill.objective import Objective, StepCounts
from tsdkd.config import DistillConfig

F64 = torch.float64
VOCAB, PADDED_VOCAB = 11, 13


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_inputs(seed: int, tokens: int = 9, hidden: int = 4, k: int = 3, dtype=F64, scale: float = 1.0):
    rng = generator(seed)
    hidden_states = (scale * torch.randn(tokens, hidden, generator=rng, dtype=F64)).to(dtype).requires_grad_()
    weight = torch.randn(PADDED_VOCAB, hidden, generator=rng, dtype=F64).to(dtype).requires_grad_()
    teacher_ids = torch.stack([torch.randperm(VOCAB, generator=rng)[:k] for _ in range(tokens)])
    target_ids = torch.randint(0, VOCAB, (tokens,), generator=rng)
    return hidden_states, weight, teacher_ids, target_ids


def clamped_tail_inputs(tokens: int = 6, k: int = 3, gap: float = 40.0):
    """Every other token puts all but ~e^-gap of its mass on its teacher's top-k (the same ids), so
    its tail bucket is below the floor (1e-12 = e^-27.6) and clamped; the others are random tokens."""
    hidden_states, weight, teacher_ids, target_ids = random_inputs(31, tokens=tokens, k=k)
    hidden_states, weight = hidden_states.detach().clone(), weight.detach().clone()
    teacher_ids[0::2] = teacher_ids[0]
    weight[:, 0] = -0.5
    weight[teacher_ids[0], 0] = 0.5
    hidden_states[0::2, 1:] *= 0.3  # small: the gap stays ~gap; nonzero: no tied logits in the top-m
    hidden_states[0::2, 0] = gap
    return hidden_states.requires_grad_(), weight.requires_grad_(), teacher_ids, target_ids


# ---------------------------------------------------------------- brute-force loops


def loop_statistics(hidden_states, weight, teacher_ids, target_ids, vocab_size, m, renormalize):
    """Per token, from the logits as Python floats: buckets, entropy, target log-prob, top-m log-probs and ids."""
    h, w = hidden_states.detach().tolist(), weight.detach().tolist()
    rows = []
    for i in range(len(h)):
        logits = [math.fsum(a * b for a, b in zip(h[i], w[j])) for j in range(vocab_size)]
        top = max(logits)
        lse = top + math.log(math.fsum(math.exp(z - top) for z in logits))
        probs = [math.exp(z - lse) for z in logits]
        ids = teacher_ids[i].tolist()
        if renormalize:
            kept = math.fsum(probs[j] for j in ids)
            buckets = [math.log(probs[j] / kept) for j in ids]
        else:
            tail = math.fsum(p for j, p in enumerate(probs) if j not in ids)
            buckets = [logits[j] - lse for j in ids] + [math.log(max(tail, TAIL_MASS_FLOOR))]
        entropy = -math.fsum(p * (z - lse) for p, z in zip(probs, logits))
        order = sorted(range(vocab_size), key=lambda j: -logits[j])[:m]
        rows.append((buckets, entropy, logits[int(target_ids[i])] - lse, [logits[j] - lse for j in order], order))
    return [torch.tensor(column, dtype=F64) for column in zip(*rows)]


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_values_equal_brute_force_loops(renormalize, chunk_size):
    hidden_states, weight, teacher_ids, target_ids = random_inputs(1, scale=2.0)
    stats = chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, chunk_size, VOCAB, renormalize, 4)
    *expected_floats, loop_ids = loop_statistics(hidden_states, weight, teacher_ids, target_ids, VOCAB, 4, renormalize)
    for got, expected in zip(stats[:4], expected_floats):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert stats.topm_ids.equal(loop_ids.long())
    assert stats.ranked_index.equal(torch.arange(len(hidden_states)))  # no selector: every row


def test_tail_below_the_floor_is_clamped_and_small_tails_are_exact():
    hidden_states, weight, teacher_ids, target_ids = clamped_tail_inputs()
    stats = chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, 4, VOCAB)
    buckets = loop_statistics(hidden_states, weight, teacher_ids, target_ids, VOCAB, 1, False)[0]
    torch.testing.assert_close(stats.bucket_logprobs, buckets, rtol=1e-12, atol=1e-12)
    assert (stats.bucket_logprobs[0::2, -1] == math.log(TAIL_MASS_FLOOR)).all()
    # A tail of e^-20 (above the floor) in float32: 1 - sum(top-k) would be exactly 0 there.
    hidden32, weight32 = (hidden_states.detach() * 0.5).float(), weight.detach().float()
    tail32 = chunked_token_statistics(hidden32, weight32, teacher_ids, target_ids, 4, VOCAB).bucket_logprobs[0::2, -1]
    expected = loop_statistics(hidden32.double(), weight32.double(), teacher_ids, target_ids, VOCAB, 1, False)[0][0::2, -1]
    assert (expected > math.log(TAIL_MASS_FLOOR)).all() and (expected < -15).all()
    torch.testing.assert_close(tail32.double(), expected, rtol=1e-5, atol=0)


def test_empty_complement_gives_a_clamped_tail_and_finite_gradients():
    """vocab_size == k: the teacher's top-k is the whole vocabulary."""
    rng = generator(5)
    hidden_states = torch.randn(4, 3, generator=rng, dtype=F64, requires_grad=True)
    weight = torch.randn(5, 3, generator=rng, dtype=F64, requires_grad=True)
    teacher_ids = torch.stack([torch.randperm(3, generator=rng) for _ in range(4)])
    stats = chunked_token_statistics(hidden_states, weight, teacher_ids, torch.zeros(4, dtype=torch.long), 2, 3)
    assert (stats.bucket_logprobs[:, -1] == math.log(TAIL_MASS_FLOOR)).all()
    torch.testing.assert_close(stats.bucket_logprobs[:, :-1].exp().sum(-1), torch.ones(4, dtype=F64))
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_token_statistics(h, w, teacher_ids, torch.zeros(4, dtype=torch.long), 2, 3, num_items=2)[:4],
        (hidden_states, weight))


# ---------------------------------------------------------------- gradcheck of the analytic backward


def every_other_row(entropy: torch.Tensor) -> torch.Tensor:
    """A selector of the top-m rows that does not move when gradcheck perturbs the inputs."""
    return torch.arange(len(entropy)) % 2 == 0


def all_outputs(h, w, teacher_ids, target_ids, chunk_size, renormalize, vocab_size=VOCAB, ranked_rows=None):
    """Every float output (ids and rows have no gradient)."""
    return chunked_token_statistics(h, w, teacher_ids, target_ids, chunk_size, vocab_size, renormalize, 3, ranked_rows)[:4]


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("chunk_size", [2, 64])  # several chunks (recompute) and one (kept log p)
@pytest.mark.parametrize("clamped", [False, True])
@pytest.mark.parametrize("ranked_rows", [None, every_other_row])
@pytest.mark.parametrize("vocab_size", [VOCAB, PADDED_VOCAB])  # the head padded beyond the vocabulary, or not
def test_gradcheck_every_output(renormalize, chunk_size, clamped, ranked_rows, vocab_size):
    inputs = clamped_tail_inputs() if clamped else random_inputs(2, tokens=5, hidden=3)
    hidden_states, weight, teacher_ids, target_ids = inputs
    assert torch.autograd.gradcheck(
        lambda h, w: all_outputs(h, w, teacher_ids, target_ids, chunk_size, renormalize, vocab_size, ranked_rows),
        (hidden_states, weight))
    if clamped and not renormalize:
        # The clamped tails have no gradient at all: a cotangent on them alone moves nothing.
        stats = chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, chunk_size, VOCAB)
        stats.bucket_logprobs[0::2, -1].sum().backward()
        assert hidden_states.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_gradcheck_with_a_frozen_head_and_with_frozen_hidden_states():
    hidden_states, weight, teacher_ids, target_ids = random_inputs(3, tokens=5, hidden=3)
    assert torch.autograd.gradcheck(
        lambda h: all_outputs(h, weight.detach(), teacher_ids, target_ids, 2, False), (hidden_states,))
    assert torch.autograd.gradcheck(
        lambda w: all_outputs(hidden_states.detach(), w, teacher_ids, target_ids, 64, False), (weight,))


# ---------------------------------------------------------------- the autograd composite it replaced


def composite_statistics(hidden_states, weight, teacher_ids, target_ids, vocab_size, m, renormalize):
    """The former stage2_distill.chunked._chunk_statistics, unchunked: TokenStatistics' fields."""
    logits = at_least_float32(hidden_states @ weight[:vocab_size].T)
    logprobs = torch.log_softmax(logits, dim=-1)
    topm_logprobs, topm_ids = logprobs.topk(m, dim=-1)
    return (
        student_bucket_logprobs(logprobs, teacher_ids, renormalize),
        bucket_entropy(logprobs),
        logprobs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1),
        topm_logprobs,
        topm_ids,
    )


def fused_statistics(hidden_states, weight, teacher_ids, target_ids, vocab_size, m, renormalize, chunk_size):
    return chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, chunk_size, vocab_size, renormalize, m)


def compare(fused, composite, hidden_states, weight, value_tol, grad_tol, seed):
    """Equal values, top-m ids and gradients for one random cotangent on every float output."""
    assert fused[4].equal(composite[4])
    floats = [0, 1, 2, 3]
    for index in floats:
        torch.testing.assert_close(fused[index], composite[index], **value_tol)
    rng = generator(seed)
    cotangents = [torch.randn(composite[i].shape, generator=rng, dtype=F64).to(composite[i].dtype) for i in floats]

    def gradients(fields):
        return torch.autograd.grad(sum((fields[i] * c).sum() for i, c in zip(floats, cotangents)), (hidden_states, weight))

    for got, expected in zip(gradients(fused), gradients(composite)):
        torch.testing.assert_close(got, expected, **grad_tol)


@pytest.mark.parametrize("seed", [10, 11, 12])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("chunk_size", [3, 64])
def test_equals_the_autograd_composite(seed, renormalize, chunk_size):
    for dtype, value_tol, grad_tol in [(F64, dict(rtol=1e-12, atol=1e-12), dict(rtol=1e-10, atol=1e-12)),
                                       (torch.float32, dict(rtol=1e-5, atol=1e-5), dict(rtol=1e-4, atol=1e-5))]:
        hidden_states, weight, teacher_ids, target_ids = random_inputs(seed, tokens=10, dtype=dtype, scale=3.0)
        fused = fused_statistics(hidden_states, weight, teacher_ids, target_ids, VOCAB, 5, renormalize, chunk_size)
        composite = composite_statistics(hidden_states, weight, teacher_ids, target_ids, VOCAB, 5, renormalize)
        compare(fused, composite, hidden_states, weight, value_tol, grad_tol, seed)


class _RoundToBf16(torch.autograd.Function):
    """x rounded to bf16 and back, with the identity as its gradient (straight-through)."""

    @staticmethod
    def forward(ctx, x):
        return x.bfloat16().to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_equals_the_composite_for_bf16_inputs_computing_in_float32():
    """bf16 hidden states and head: logits are a bf16 matmul, everything after it float32 (both)."""
    hidden_states, weight, teacher_ids, target_ids = random_inputs(13, tokens=10, dtype=torch.bfloat16, scale=3.0)
    fused = fused_statistics(hidden_states, weight, teacher_ids, target_ids, VOCAB, 5, False, 64)
    composite = composite_statistics(hidden_states, weight, teacher_ids, target_ids, VOCAB, 5, False)
    assert all(fused[i].dtype == torch.float32 for i in (0, 1, 2, 3))
    assert fused[4].equal(composite[4])
    floats = [0, 1, 2, 3]
    for index in floats:  # the same bf16 logits, then float32 arithmetic in both
        torch.testing.assert_close(fused[index], composite[index], rtol=1e-5, atol=1e-5)
    # Gradients are bf16 like the inputs, so both differ from exact ones by bf16 rounding. Exact here:
    # float64 from the same inputs, with the logits rounded to bf16 (straight-through).
    hidden64, weight64 = (x.detach().double().requires_grad_() for x in (hidden_states, weight))
    logits = _RoundToBf16.apply(hidden64 @ weight64[:VOCAB].T)
    logprobs = torch.log_softmax(logits, -1)
    exact = (student_bucket_logprobs(logprobs, teacher_ids), bucket_entropy(logprobs),
             logprobs.gather(-1, target_ids[:, None]).squeeze(-1), logprobs.gather(-1, fused[4]))
    rng = generator(13)
    cotangents = [torch.randn(composite[i].shape, generator=rng, dtype=F64) for i in floats]

    def gradients(fields, inputs):
        return torch.autograd.grad(sum((fields[i] * c.to(fields[i].dtype)).sum() for i, c in zip(floats, cotangents)), inputs)

    for got, former, reference in zip(gradients(fused, (hidden_states, weight)), gradients(composite, (hidden_states, weight)),
                                      gradients(exact, (hidden64, weight64))):
        assert got.dtype == torch.bfloat16
        error, former_error = ((g.double() - reference).abs().max() for g in (got, former))
        assert error <= max(1.5 * former_error, 2**-8 * reference.abs().max()), (error, former_error)


def test_bf16_head_gradient_is_summed_over_chunks_in_float32():
    """A bf16 head (FSDP or DeepSpeed bf16 parameters): its gradient is summed over the chunks in float32
    and rounded to bf16 once, so it is as close to the exact one with 200 chunks as with one. (Summed in
    bf16 it was 7x further off with chunks of 1 token, 3x with chunks of 4.)"""
    hidden_states, weight, teacher_ids, target_ids = random_inputs(40, tokens=200, dtype=torch.bfloat16, scale=3.0)
    hidden64, weight64 = hidden_states.detach().double(), weight.detach().double().requires_grad_()
    logprobs = torch.log_softmax(_RoundToBf16.apply(hidden64 @ weight64[:VOCAB].T), -1)
    exact_fields = (student_bucket_logprobs(logprobs, teacher_ids), bucket_entropy(logprobs),
                    logprobs.gather(-1, target_ids[:, None]).squeeze(-1))
    rng = generator(41)
    cotangents = [torch.randn(field.shape, generator=rng, dtype=F64) for field in exact_fields]
    exact, = torch.autograd.grad(sum((f * c).sum() for f, c in zip(exact_fields, cotangents)), (weight64,))

    def error(chunk_size: int) -> float:
        fields = chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, chunk_size, VOCAB)
        got, = torch.autograd.grad(sum((f.double() * c).sum() for f, c in zip(fields[:3], cotangents)), (weight,))
        assert got.dtype == torch.bfloat16
        return ((got.double() - exact).abs().max() / exact.abs().max()).item()

    one_chunk = error(200)
    assert one_chunk < 2**-7
    for chunk_size in (1, 4):
        assert error(chunk_size) <= 1.5 * one_chunk, chunk_size


def test_recompute_under_autocast_sees_the_forward_logits():
    """Under CPU autocast the logits are a bf16 matmul; the backward's recompute (several chunks) must
    use the same logits as the forward, so its gradients equal those of the kept log p (one chunk).
    Each hidden state's gradient comes from its own row alone: equal to float32 rounding. The head's sums
    bf16 products over the chunks (autocast's dtype), not one product: equal to bf16 rounding."""
    hidden_states, weight, teacher_ids, target_ids = random_inputs(14, tokens=10, dtype=torch.float32, scale=3.0)
    rng = generator(15)
    cotangents = [torch.randn(10, 4, generator=rng), torch.randn(10, generator=rng), torch.randn(10, generator=rng),
                  torch.randn(10, 3, generator=rng)]
    gradients = []
    for chunk_size in (3, 64):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stats = chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, chunk_size, VOCAB, num_items=3)
        loss = sum((field.float() * c).sum() for field, c in zip(stats[:4], cotangents))
        gradients.append(torch.autograd.grad(loss, (hidden_states, weight)))
    (hidden_recomputed, weight_recomputed), (hidden_kept, weight_kept) = gradients
    torch.testing.assert_close(hidden_recomputed, hidden_kept, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight_recomputed, weight_kept, rtol=2**-7, atol=2**-7 * weight_kept.abs().max().item())


def test_statistics_after_the_head_matmul_are_float32_under_autocast():
    """Only the head's matmul runs in autocast's dtype: the entropy (a dot product, which autocast would run in
    bf16) and every other field are float32, equal to float32 statistics of the same bf16 logits."""
    hidden_states, weight, teacher_ids, target_ids = random_inputs(16, tokens=10, dtype=torch.float32, scale=3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, 4, VOCAB, num_items=3)
    logprobs = torch.log_softmax((hidden_states.bfloat16() @ weight[:VOCAB].bfloat16().T).float(), dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    assert {field.dtype for field in (stats.bucket_logprobs, stats.entropy, stats.target_logprob, stats.topm_logprobs)} == {torch.float32}
    torch.testing.assert_close(stats.entropy, entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.target_logprob, logprobs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1))


def backward_with_matmul_dtypes(loss: torch.Tensor, inputs: tuple) -> tuple[list[list[str]], tuple]:
    """The gradients of `loss`, and the operand dtypes of every matrix product the backward ran (as the
    profiler saw them: the dtypes autocast chose)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        gradients = torch.autograd.grad(loss, inputs)
    operands = {"aten::mm": slice(0, 2), "aten::addmm_": slice(1, 3)}  # addmm_'s first input is the sum it adds to
    return [event.input_dtypes[operands[event.name]] for event in profiler.events() if event.name in operands], gradients


@pytest.mark.parametrize("chunk_size", [3, 64])
@pytest.mark.parametrize("vocab_size", [VOCAB, PADDED_VOCAB])
def test_gradient_matmuls_run_in_the_autocast_dtype(chunk_size, vocab_size):
    """Under autocast the backward's matmuls run in its dtype, as a Linear's backward does (float32 ones
    would cost a GPU's head backward many times the time), and the gradients come back in the float32
    of the inputs, equal to the autograd composite's under the same autocast up to bf16 rounding.
    Without autocast they run in the inputs' dtype."""
    hidden_states, weight, teacher_ids, target_ids = random_inputs(17, tokens=10, dtype=torch.float32, scale=3.0)
    rng = generator(18)
    cotangents = [torch.randn(10, 4, generator=rng), torch.randn(10, generator=rng), torch.randn(10, generator=rng),
                  torch.randn(10, 3, generator=rng)]

    def backward_matmuls(statistics, autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            fields = statistics()
        loss = sum((field.float() * c).sum() for field, c in zip(fields[:4], cotangents))
        return backward_with_matmul_dtypes(loss, (hidden_states, weight))

    def fused():
        return chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, chunk_size, vocab_size, num_items=3)

    def composite():
        return composite_statistics(hidden_states, weight, teacher_ids, target_ids, vocab_size, 3, False)

    dtypes, gradients = backward_matmuls(fused, autocast=True)
    recompute = 1 if chunk_size < 10 else 0  # one per chunk, in bf16 like the forward
    assert dtypes == [["c10::BFloat16"] * 2] * ((2 + recompute) * math.ceil(10 / chunk_size)), dtypes
    _, composite_gradients = backward_matmuls(composite, autocast=True)
    for got, expected in zip(gradients, composite_gradients):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=2**-6, atol=2**-6 * expected.abs().max().item())
    dtypes, _ = backward_matmuls(fused, autocast=False)
    assert dtypes == [["float"] * 2] * ((2 + recompute) * math.ceil(10 / chunk_size)), dtypes


def test_top_items_under_autocast_use_the_logits_of_the_statistics():
    """Under CPU autocast the statistics' logits are a bf16 matmul; the top-m log-probs must be
    z_id - lse of those same logits (z_id in float32 would differ by up to ~0.4 here)."""
    rng = generator(16)
    hidden_states = 3 * torch.randn(50, 64, generator=rng)
    weight = torch.randn(300, 64, generator=rng)
    teacher_ids, target_ids = torch.randint(0, 300, (50, 5), generator=rng), torch.randint(0, 300, (50,), generator=rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, 16, 300, num_items=5)
    ids, logprobs = stats.topm_ids, stats.topm_logprobs
    reference = torch.log_softmax((hidden_states.bfloat16() @ weight.bfloat16().T).float(), -1)
    assert (reference.gather(-1, ids) >= reference.topk(5, -1).values[:, -1:]).all()  # the top 5, up to bf16 ties
    torch.testing.assert_close(logprobs, reference.gather(-1, ids), rtol=0, atol=1e-4)
    # Autocast leaves a float64 matmul in float64: so do the items.
    hidden_states, weight = hidden_states.double(), weight.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = chunked_token_statistics(hidden_states, weight, teacher_ids, target_ids, 16, 300, num_items=5)
    ids, logprobs = stats.topm_ids, stats.topm_logprobs
    reference = torch.log_softmax(hidden_states @ weight.T, -1)
    torch.testing.assert_close(logprobs, reference.gather(-1, ids), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- the objective on top


def synthetic_batch(seed: int, k: int = 3):
    """Two prompts x two candidates, ragged completions, cached teacher signals over VOCAB ids."""
    rng = generator(seed)
    lengths = torch.tensor([7, 4, 6, 2])
    mask = torch.arange(7) < lengths[:, None]
    teacher_logits = 2 * torch.randn(4, 7, VOCAB, generator=rng, dtype=F64)
    teacher_logprobs = torch.log_softmax(teacher_logits, -1)
    topk = teacher_logprobs.topk(k, -1)
    return {
        "completion_mask": mask,
        "completion_ids": torch.randint(0, VOCAB, (4, 7), generator=rng),
        "teacher_topk_ids": topk.indices,
        "teacher_topk_logprobs": topk.values,
        "teacher_tail_mass": 1 - topk.values.exp().sum(-1),
        "teacher_entropy": -(teacher_logprobs.exp() * teacher_logprobs).sum(-1),
        "behaviour_logprobs": -torch.rand(4, 7, generator=rng, dtype=F64),
        "prompt_group": torch.tensor([0, 0, 1, 1]),
        "teacher_rank": torch.tensor([1, 0, 0, 1]),
        "candidates_by_rank": torch.tensor([[1, 0], [2, 3]]),
    }


def objective_inputs(seed: int, chunk_size: int, objective: Objective | None = None):
    """(synthetic_batch(seed), the objective (default TSD-KD's), step counts of this batch alone, the fused head's
    statistics as the objective reads them, (hidden states, head weight))."""
    batch = synthetic_batch(seed)
    mask = batch["completion_mask"]
    objective = objective or Objective.from_config(DistillConfig(), "exact")
    counts = StepCounts(mask.sum().to(F64), torch.tensor(4.0, dtype=F64), torch.tensor(2.0, dtype=F64))
    hidden_states, weight, _, _ = random_inputs(seed + 1, tokens=int(mask.sum()), scale=2.0)
    ranked = objective.token_ranking
    stats = student_statistics(hidden_states, weight, mask, batch["teacher_topk_ids"][mask], batch["completion_ids"][mask],
                               chunk_size, VOCAB, objective.renormalize_topk, 10 if ranked else 0,
                               objective.ranked_positions if ranked else None)
    return batch, objective, counts, stats, (hidden_states, weight)


def leaf_statistics(stats: TokenStatistics, dtype: torch.dtype = F64) -> tuple[TokenStatistics, list[str]]:
    """`stats` with each float field a fresh leaf in `dtype` that requires grad, and those fields' names."""
    leaves = TokenStatistics(*(value.detach().to(dtype).requires_grad_(True) if value is not None and value.is_floating_point()
                               else value for value in stats))
    return leaves, [name for name, value in leaves._asdict().items() if value is not None and value.requires_grad]


@pytest.mark.parametrize("options", [{}, {"prefix_entropy_fraction": 0.5, "renormalize_topk": True},
                                     {"indirect": "token", "selection_fraction": 0.3}])
@pytest.mark.parametrize("chunk_size", [4, 64])
def test_objective_on_fused_statistics_equals_the_autograd_composite(options, chunk_size):
    """Loss, metrics and gradients of the TSD-KD objective with the fused head, its top-m read at the
    ranked positions == with the autograd composite."""
    batch, objective, counts, new_stats, (hidden_states, weight) = objective_inputs(
        20, chunk_size, Objective.from_config(DistillConfig(**options), "exact"))
    mask = batch["completion_mask"]
    assert objective.token_ranking
    teacher_ids, targets = batch["teacher_topk_ids"][mask], batch["completion_ids"][mask]

    former = composite_statistics(hidden_states, weight, teacher_ids, targets, VOCAB, 10, objective.renormalize_topk)
    entropy = torch.zeros(mask.shape, dtype=F64)
    entropy[mask] = former[1].detach()
    chosen = objective.ranked_positions(entropy, mask)[mask]
    assert 0 < chosen.sum() < mask.sum()
    assert new_stats.ranked_index.equal(chosen.nonzero().squeeze(-1))
    assert new_stats.topm_ids.equal(former[4][chosen])
    former_stats = TokenStatistics(*former[:3], former[3][chosen], former[4][chosen], chosen.nonzero().squeeze(-1))
    new_loss, new_metrics = objective(batch, new_stats, counts)
    former_loss, former_metrics = objective(batch, former_stats, counts)
    assert new_metrics.keys() == former_metrics.keys() and "indirect_token" in new_metrics
    for name in former_metrics:
        torch.testing.assert_close(new_metrics[name], former_metrics[name], rtol=1e-12, atol=1e-12, msg=name)
    new_grads = torch.autograd.grad(new_loss, (hidden_states, weight))
    former_grads = torch.autograd.grad(former_loss, (hidden_states, weight))
    for got, expected in zip(new_grads, former_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def autograd_objective(objective: Objective, batch, stats: TokenStatistics, counts: StepCounts) -> dict[str, torch.Tensor]:
    """Each term of the objective straight from the losses in losses.py, recorded by autograd, per-sequence means
    by loops: the reference for the Objective's closed-form gradients."""
    mask = batch["completion_mask"]
    rows, steps = mask.nonzero(as_tuple=True)
    tokens = counts.tokens
    terms = {}
    if objective.direct:
        teacher = teacher_bucket_logprobs(batch["teacher_topk_logprobs"][mask], batch["teacher_tail_mass"][mask],
                                          objective.renormalize_topk)
        weights = torch.ones_like(stats.entropy)
        if objective.selection:
            student_entropy, teacher_entropy = stats.entropy, batch["teacher_entropy"][mask]
            if objective.weight_entropy == "buckets":
                student_entropy = bucket_entropy(stats.bucket_logprobs)
                teacher_entropy = bucket_entropy(teacher) if objective.renormalize_topk else teacher_entropy
            weights = token_selection_weights(student_entropy, teacher_entropy, None, objective.tau_w,
                                              objective.selection_fraction)
        terms["direct"] = direct_distillation_loss(teacher, stats.bucket_logprobs, weights, None, objective.jsd_beta, tokens)
    if objective.sft:
        terms["sft"] = -stats.target_logprob.sum() / tokens
    if objective.token_ranking:
        ranked_rows, ranked_steps = rows[stats.ranked_index], steps[stats.ranked_index]
        per_position = teacher_ordered_listmle(stats.topm_ids, stats.topm_logprobs, batch["teacher_topk_ids"][ranked_rows, ranked_steps],
                                               batch["teacher_topk_logprobs"][ranked_rows, ranked_steps])
        terms["indirect_token"] = sum(per_position[ranked_rows == row].mean() for row in ranked_rows.unique()) / counts.sequences
    if objective.sequence_ranking:
        policy = torch.stack([stats.target_logprob[rows == row].mean() for row in range(len(mask))])
        behaviour = torch.stack([batch["behaviour_logprobs"][row][mask[row]].mean() for row in range(len(mask))])
        candidates = batch["candidates_by_rank"]
        present, slots = candidates >= 0, candidates.clamp(min=0)
        terms["indirect_sequence"] = sequence_level_ranking_loss(policy[slots], behaviour[slots], batch["teacher_rank"][slots],
                                                                 present, objective.beta_p) * len(candidates) / counts.prompts
    if objective.entropy:
        terms["entropy"] = quantile_entropy_loss(stats.entropy, objective.entropy_quantile) * len(rows) / tokens
    return terms


@pytest.mark.parametrize("options", [
    {}, {"loss": "sft"}, {"loss": "kd"}, {"loss": "gkd"}, {"loss": "gkd", "jsd_beta": 1.0},
    {"renormalize_topk": True, "prefix_entropy_fraction": 0.5, "jsd_beta": 0.3, "beta_p": 0.5},
    {"selection_fraction": 0.4, "indirect": "token", "alpha": 0.7}, {"indirect": "sequence", "lambda_ent": 0.2},
    {"no_selection": True, "entropy_quantile": 0.6, "tau_w": 0.5},
])
@pytest.mark.parametrize("teacher_entropy", ["exact", "estimated_topk_buckets"])
def test_objective_closed_form_gradients_equal_autograd(options, teacher_entropy):
    """The Objective's loss, metrics and gradients (computed beside the value, handed to autograd at the end)
    equal autograd through each term's loss function, for every preset and switch."""
    batch, objective, counts, fused, _ = objective_inputs(26, 4, Objective.from_config(DistillConfig(**options), teacher_entropy))
    # A candidate missing from the second prompt (the sequence ranking's dropped items), and a step longer than the
    # micro-batch.
    batch["candidates_by_rank"] = torch.tensor([[1, 0], [2, -1]])
    counts = StepCounts(counts.tokens + 3, counts.sequences + 1, counts.prompts + 1)
    stats, names = leaf_statistics(fused)
    leaves = [getattr(stats, name) for name in names]
    loss, metrics = objective(batch, stats, counts)
    expected_terms = autograd_objective(objective, batch, stats, counts)
    assert expected_terms.keys() <= metrics.keys()
    for name, value in expected_terms.items():
        torch.testing.assert_close(metrics[name], value.detach(), rtol=1e-12, atol=1e-14, msg=name)
    expected_loss = sum(value * {"indirect_token": objective.alpha, "indirect_sequence": objective.alpha,
                                 "entropy": objective.lambda_ent}.get(name, 1.0) for name, value in expected_terms.items())
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-14)
    got = torch.autograd.grad(3 * loss, leaves, allow_unused=True)
    expected = torch.autograd.grad(3 * expected_loss, leaves, allow_unused=True)
    for name, got_gradient, expected_gradient in zip(names, got, expected):
        if expected_gradient is None:
            assert got_gradient is None or (got_gradient == 0).all(), name
        else:
            torch.testing.assert_close(got_gradient, expected_gradient, rtol=1e-10, atol=1e-13, msg=name)


def test_objective_gradients_take_the_statistics_dtype():
    """float32 head statistics with float64 teacher signals: the gradients are float32 (as the statistics), and as
    close to the float64 ones as float32 allows."""
    batch, objective, counts, fused, _ = objective_inputs(32, chunk_size=4)
    gradients = {}
    for dtype in (F64, torch.float32):
        stats, names = leaf_statistics(fused, dtype)
        loss, _ = objective(batch, stats, counts)
        gradients[dtype] = torch.autograd.grad(loss, [getattr(stats, name) for name in names])
    for exact, rounded in zip(gradients[F64], gradients[torch.float32]):
        assert rounded.dtype == torch.float32
        torch.testing.assert_close(rounded.double(), exact, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("renormalize_topk", [False, True])
def test_token_weights_compare_entropies_over_the_same_buckets(renormalize_topk):
    """With a teacher entropy estimated over its k+1 buckets (vLLM), the weight's H_S is taken over the
    same buckets; with renormalize_topk both sides are over the k renormalised buckets the loss compares.
    Reference: Python loops over the full softmax."""
    k = 3
    batch = synthetic_batch(28, k)
    mask = batch["completion_mask"]
    topk_probs = batch["teacher_topk_logprobs"].exp()
    teacher_buckets = torch.cat([topk_probs, batch["teacher_tail_mass"].unsqueeze(-1)], -1)
    batch["teacher_entropy"] = -(teacher_buckets * teacher_buckets.log()).sum(-1)  # as stage 1 stores it for vLLM
    objective = Objective.from_config(DistillConfig(renormalize_topk=renormalize_topk, no_indirect=True, no_entropy=True),
                                      "estimated_topk_buckets")
    counts = StepCounts(mask.sum().to(F64), torch.tensor(4.0, dtype=F64), torch.tensor(2.0, dtype=F64))
    hidden_states, weight, _, _ = random_inputs(29, tokens=int(mask.sum()), scale=2.0)
    teacher_ids = batch["teacher_topk_ids"][mask]
    stats = student_statistics(hidden_states, weight, mask, teacher_ids, batch["completion_ids"][mask], 8, VOCAB,
                               renormalize_topk, 10, None)
    _, metrics = objective(batch, stats, counts)

    def normalised(probs: list[float]) -> list[float]:
        return [p / math.fsum(probs) for p in probs] if renormalize_topk else probs

    def entropy(probs: list[float]) -> float:
        return -math.fsum(p * math.log(p) for p in probs)

    beta = objective.jsd_beta
    weights, weighted = [], []
    for student_logits, ids, teacher_row in zip((hidden_states @ weight[:VOCAB].T).tolist(), teacher_ids.tolist(),
                                                teacher_buckets[mask].tolist()):
        lse = max(student_logits) + math.log(math.fsum(math.exp(z - max(student_logits)) for z in student_logits))
        student = [math.exp(student_logits[j] - lse) for j in ids]
        student = normalised(student + ([] if renormalize_topk else [1 - math.fsum(student)]))
        teacher = normalised(teacher_row[:k] if renormalize_topk else teacher_row)
        w = 1 / (1 + math.exp(-(entropy(student) - entropy(teacher))))
        mixture = [beta * t + (1 - beta) * q for t, q in zip(teacher, student)]
        jsd = beta * math.fsum(t * math.log(t / m) for t, m in zip(teacher, mixture)) + \
            (1 - beta) * math.fsum(q * math.log(q / m) for q, m in zip(student, mixture))
        weights.append(w)
        weighted.append(w * jsd)
    assert metrics["token_weight_mean"].item() == pytest.approx(math.fsum(weights) / len(weights), rel=1e-12)
    assert metrics["direct"].item() == pytest.approx(math.fsum(weighted) / len(weighted), rel=1e-10)


def test_no_top_items_without_token_ranking():
    batch = synthetic_batch(22)
    mask = batch["completion_mask"]
    hidden_states, weight, _, _ = random_inputs(23, tokens=int(mask.sum()))
    stats = student_statistics(hidden_states, weight, mask, batch["teacher_topk_ids"][mask], batch["completion_ids"][mask],
                               8, VOCAB, False, 10, None)
    assert stats.ranked_index is None and stats.topm_ids is None and stats.topm_logprobs is None
    assert stats.entropy.shape == (mask.sum(),)


def test_objective_ignores_padded_positions():
    """NaN and out-of-range garbage in the padded positions of every batch field change no loss term,
    metric or gradient: the objective reads the completion tokens only."""
    batch, objective, counts, stats, (hidden_states, weight) = objective_inputs(24, chunk_size=8)
    mask = batch["completion_mask"]
    garbage = dict(batch)
    for name, values in batch.items():
        if name != "completion_mask" and values.shape[:2] == mask.shape:
            padding = ~mask.view(mask.shape + (1,) * (values.dim() - 2)).expand_as(values)
            garbage[name] = values.masked_fill(padding, math.nan if values.is_floating_point() else 10**6)
    loss, metrics = objective(batch, stats, counts)
    garbage_loss, garbage_metrics = objective(garbage, stats, counts)
    assert set(metrics) >= {"direct", "indirect_token", "indirect_sequence", "entropy"}
    for name in metrics:
        torch.testing.assert_close(garbage_metrics[name], metrics[name], rtol=0, atol=0, msg=name)
    garbage_grads = torch.autograd.grad(garbage_loss, (hidden_states, weight), retain_graph=True)
    for got, expected in zip(garbage_grads, torch.autograd.grad(loss, (hidden_states, weight))):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_objective_terms_equal_the_padded_reference_losses():
    """Each term of the flat objective equals the [B, T] masked loss functions (tested against loops
    in test_losses.py) applied to the same batch: direct and entropy over all tokens, the token
    ranking as a mean per sequence, the sequence ranking over each prompt's candidates."""
    batch, objective, counts, stats, (hidden_states, weight) = objective_inputs(
        26, 8, Objective.from_config(DistillConfig(prefix_entropy_fraction=0.4), "exact"))
    mask = batch["completion_mask"]
    _, metrics = objective(batch, stats, counts)

    logprobs = torch.zeros(mask.shape + (VOCAB,), dtype=F64)
    logprobs[mask] = torch.log_softmax(hidden_states @ weight[:VOCAB].T, -1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    teacher = teacher_bucket_logprobs(batch["teacher_topk_logprobs"], batch["teacher_tail_mass"])
    weights = token_selection_weights(entropy, batch["teacher_entropy"], mask, objective.tau_w)
    direct = direct_distillation_loss(teacher, student_bucket_logprobs(logprobs, batch["teacher_topk_ids"]), weights, mask,
                                      objective.jsd_beta, counts.tokens)
    token_ranking = sum(token_level_ranking_loss(logprobs[b:b + 1], batch["teacher_topk_ids"][b:b + 1],
                                                 batch["teacher_topk_logprobs"][b:b + 1], mask[b:b + 1], entropy[b:b + 1],
                                                 10, objective.prefix_entropy_fraction) for b in range(4)) / counts.sequences
    target = logprobs.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    lengths = mask.sum(-1)
    policy = (torch.where(mask, target, 0.0).sum(-1) / lengths).view(2, 2)
    behaviour = (torch.where(mask, batch["behaviour_logprobs"], 0.0).sum(-1) / lengths).view(2, 2)
    sequence_ranking = sequence_level_ranking_loss(policy, behaviour, batch["teacher_rank"].view(2, 2),
                                                   torch.ones(2, 2, dtype=torch.bool), objective.beta_p) * 2 / counts.prompts
    expected = {"direct": direct, "indirect_token": token_ranking, "indirect_sequence": sequence_ranking,
                "entropy": entropy_regularization(entropy, mask, objective.entropy_quantile)}
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name], value.detach(), rtol=1e-10, atol=1e-12, msg=name)
