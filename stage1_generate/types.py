"""What a backend returns: sampled candidates and the teacher's per-token signal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class SampledCandidate:
    completion_token_ids: np.ndarray  # [L] int64, ends with EOS when finish_reason == "stop"
    behaviour_logprobs: np.ndarray  # [L] float32, the student's raw (temperature 1) log-probs
    finish_reason: str  # "stop" or "length"


@dataclass
class TeacherScores:
    token_logprobs: np.ndarray  # [L] log-prob of each sampled token
    topk_ids: np.ndarray  # [L, k], by descending log-prob, ties by ascending id
    topk_logprobs: np.ndarray  # [L, k]
    tail_mass: np.ndarray  # [L] 1 - sum of the top-k probabilities
    entropy: np.ndarray  # [L] exact, or over the k+1 buckets when `entropy_exact` is False
    entropy_exact: bool


@dataclass
class SamplingSettings:
    num_candidates: int
    temperature: float
    top_p: float
    max_new_tokens: int


class StudentSampler(Protocol):
    def sample(self, prompts: list[list[int]], seeds: list[int]) -> list[list[SampledCandidate]]:
        """N candidates for each tokenised prompt; `seeds` has one seed per prompt."""

    def close(self) -> None: ...


class TeacherScorer(Protocol):
    entropy_exact: bool

    def score(self, sequences: list[tuple[list[int], np.ndarray]]) -> list[TeacherScores]:
        """Teacher signal on each (prompt ids, completion ids) pair's completion positions."""

    def close(self) -> None: ...


def canonical_topk(topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by descending log-prob, ties by ascending id, so backends agree on ties."""
    order = np.lexsort((topk_ids, -topk_logprobs), axis=-1)
    return np.take_along_axis(topk_ids, order, -1), np.take_along_axis(topk_logprobs, order, -1)


def bucket_entropy(topk_logprobs: np.ndarray, tail_mass: np.ndarray) -> np.ndarray:
    """Entropy over the k top-k buckets plus one tail bucket (a lower bound of the true entropy)."""
    probs = np.exp(topk_logprobs)
    tail = np.clip(tail_mass, 1e-30, 1.0)
    return -(probs * topk_logprobs).sum(-1) - np.where(tail_mass > 0, tail * np.log(tail), 0.0)
