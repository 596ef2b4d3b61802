"""Answer checking with math-verify, shared by stage 1 (ranking) and evaluation."""

from __future__ import annotations


def answer_is_correct(gold_answer: str, response: str) -> bool:
    """True when the response's final answer is mathematically equal to the gold answer."""
    from math_verify import parse, verify

    gold = parse(gold_answer)
    predicted = parse(response)
    return bool(gold and predicted and verify(gold, predicted))
