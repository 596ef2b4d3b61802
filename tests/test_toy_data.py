"""Checks on the committed toy task data and tokenizer (data/build_toy.py builds them)."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(DATA))  # data/ holds scripts, not a package

from toy_task import make_example, write_sets  # noqa: E402

SPLITS = ("train", "test_id", "test_long", "test_large", "test_shifted")
STEP = re.compile(r"^(\d+) ([+*-]) (\d+) = (\d+)$")


def _read(name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (DATA / "toy" / f"{name}.jsonl").read_text().splitlines()]


def _check_solution(solution: str, answer: str) -> int:
    """Recompute every step independently; return the number of steps."""
    *steps, last = solution.split("\n")
    value = None
    for line in steps:
        a, op, b, result = STEP.match(line).groups()
        a, b, result = int(a), int(b), int(result)
        assert value is None or a == value, "each step must start from the previous result"
        assert result == {"+": a + b, "-": a - b, "*": a * b}[op] >= 0
        value = result
    assert last == f"Answer: {value}" and answer == str(value)
    return len(steps)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DATA / "toy-student")


def test_generator_is_deterministic(tmp_path: Path) -> None:
    a = [make_example(random.Random(7), 3, 20, t) for t in ("standard", "shifted")]
    b = [make_example(random.Random(7), 3, 20, t) for t in ("standard", "shifted")]
    assert a == b
    write_sets(tmp_path, seed=0)
    for name in (*SPLITS, "prompts"):
        file = f"{name}.jsonl"
        assert (tmp_path / file).read_bytes() == (DATA / "toy" / file).read_bytes()


@pytest.mark.parametrize(
    "name, size, steps, max_operand",
    [
        ("train", 2000, {2, 3}, 20),
        ("test_id", 200, {2, 3}, 20),
        ("test_long", 200, {4, 5}, 20),
        ("test_large", 200, {2, 3}, 99),
        ("test_shifted", 200, {2, 3}, 20),
    ],
)
def test_split_arithmetic(name: str, size: int, steps: set[int], max_operand: int) -> None:
    rows = _read(name)
    assert len(rows) == size
    for row in rows:
        assert _check_solution(row["solution"], row["answer"]) in steps
        operands = [int(n) for n in re.findall(r"\d+", row["prompt"])]
        assert all(1 <= n <= max_operand for n in operands)
    prefix = "Compute " if name == "test_shifted" else "Start with "
    assert all(row["prompt"].startswith(prefix) for row in rows)


def test_splits_disjoint_from_train() -> None:
    train = {row["prompt"] for row in _read("train")}
    for name in SPLITS[1:]:
        assert not train & {row["prompt"] for row in _read(name)}, name
    demo = _read("prompts")
    assert demo == [{"prompt": r["prompt"], "answer": r["answer"]} for r in _read("train")[:64]]


def test_tokenizer_round_trips_solutions(tokenizer) -> None:
    for row in _read("test_id") + _read("test_shifted"):
        for text in (row["solution"], row["prompt"]):
            assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert all(len(t) == 1 for t in tokenizer.tokenize("12345")), "digits are single tokens"


def test_special_tokens(tokenizer) -> None:
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for name in ("toy-teacher", "toy-student"):
        config = json.loads((DATA / name / "config.json").read_text())
        assert config["vocab_size"] == len(tokenizer)
        assert (config["eos_token_id"], config["pad_token_id"]) == (
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )


def test_chat_template(tokenizer) -> None:
    messages = [{"role": "user", "content": "Start with 1. Add 2. What is the result?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    plain = tokenizer.apply_chat_template(messages, tokenize=False)
    assert plain.endswith("<|im_end|>\n")
