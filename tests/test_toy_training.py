"""The committed toy models are trained (data/train_toy.py): a competent teacher, weaker student."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

DATA = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(DATA))  # data/ holds scripts, not a package

import train_toy  # noqa: E402

SLICE = 50  # first items of test_id
# Measured on these 50 items: teacher 0.98, student 0.50 (on all 200: 0.97 and 0.49, see
# data/train_toy.py); the bounds leave a margin for other CPUs and library versions.
TEACHER_FLOOR = 0.80
STUDENT_RANGE = (0.06, 0.70)
MIN_GAP = 0.25


@pytest.fixture(scope="module")
def results() -> dict[str, tuple[float, list[list[int]]]]:
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(DATA / "toy-teacher")
    rows = train_toy.read_jsonl(DATA / "toy" / "test_id.jsonl")[:SLICE]
    out = {}
    for name in ("toy-teacher", "toy-student"):
        model = LlamaForCausalLM.from_pretrained(DATA / name, dtype=torch.float32)
        completions = train_toy.generate(model, tokenizer, [r["prompt"] for r in rows], 50)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        correct = sum(train_toy.final_answer(t) == r["answer"] for t, r in zip(texts, rows))
        out[name] = (correct / len(rows), completions)
    out["eos"] = tokenizer.eos_token_id
    return out


def test_teacher_is_competent(results) -> None:
    acc, completions = results["toy-teacher"]
    assert acc >= TEACHER_FLOOR, acc
    assert all(c and c[-1] == results["eos"] for c in completions), "teacher must stop with EOS"


def test_student_is_weaker_but_not_hopeless(results) -> None:
    teacher_acc, _ = results["toy-teacher"]
    acc, completions = results["toy-student"]
    assert STUDENT_RANGE[0] <= acc <= STUDENT_RANGE[1], acc
    assert teacher_acc - acc >= MIN_GAP, (teacher_acc, acc)
    ended = sum(bool(c) and c[-1] == results["eos"] for c in completions)
    assert ended >= 0.8 * len(completions), ended


def test_training_data_excludes_test_prompts() -> None:
    n = train_toy.TEACHER_TRAIN["examples"]
    rows = train_toy.build_train_rows(n)
    prompts = [r["prompt"] for r in rows]
    assert len(prompts) == len(set(prompts)) == n
    held_out = train_toy.held_out_prompts()
    assert len(held_out) == 800  # four test sets of 200 distinct prompts
    assert not set(prompts) & held_out
    committed = train_toy.read_jsonl(DATA / "toy" / "train.jsonl")
    assert rows[: len(committed)] == committed  # the committed split comes first, unchanged
    assert rows == train_toy.build_train_rows(n), "deterministic"
    assert all(r["prompt"].startswith("Start with ") for r in rows)
