"""The teacher's ranking of a prompt's candidates (rank 0 = best): part of the signal format, which `tsdkd validate` checks."""

from __future__ import annotations


def sequence_score(teacher_token_logprobs: list[float] | object) -> float:
    """Length-normalised teacher log-likelihood: mean log-prob of the sampled tokens."""
    import numpy as np

    return float(np.mean(teacher_token_logprobs))


def teacher_ranks(scores: list[float], verified: list[bool | None]) -> list[int]:
    """Verified-correct candidates first, then by descending score; ties keep sampling order."""
    order = sorted(range(len(scores)), key=lambda i: (verified[i] is False, -scores[i], i))
    ranks = [0] * len(scores)
    for rank, index in enumerate(order):
        ranks[index] = rank
    return ranks
