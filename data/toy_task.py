"""Seeded generator for a synthetic chain-of-thought arithmetic task.

A problem is a start value followed by a chain of +, -, * operations applied left to right; the
solution works it one step per line and ends with `Answer: N`. Small enough that tiny models can
learn it on CPU, structured enough that a verifier can check every answer exactly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPS = ("+", "-", "*")
_VERBS = {"+": "add {}", "-": "subtract {}", "*": "multiply by {}"}


def _apply(value: int, op: str, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    return value * operand


def _pick_step(rng: random.Random, value: int, max_operand: int) -> tuple[str, int]:
    # Capping values at max_operand**2 keeps numbers short (few digit tokens) while still making
    # multiplication common; subtraction never goes below zero.
    cap = max_operand**2
    ops = ["+"] if value + 1 <= cap else []
    if value >= 1:
        ops.append("-")
    if 2 <= value * 2 <= cap:
        ops.append("*")
    op = rng.choice(ops)
    if op == "+":
        return op, rng.randint(1, min(max_operand, cap - value))
    if op == "-":
        return op, rng.randint(1, min(max_operand, value))
    return op, rng.randint(2, min(max_operand, cap // value))


def _standard_prompt(start: int, steps: list[tuple[str, int]]) -> str:
    actions = ", then ".join(_VERBS[op].format(n) for op, n in steps)
    return f"Start with {start}. {actions[0].upper()}{actions[1:]}. What is the result?"


def _shifted_prompt(start: int, steps: list[tuple[str, int]]) -> str:
    expr = str(start)
    for i, (op, n) in enumerate(steps):
        expr = f"{expr} {op} {n}" if i == 0 else f"({expr}) {op} {n}"
    return f"Compute {expr} step by step."


TEMPLATES = {"standard": _standard_prompt, "shifted": _shifted_prompt}


def make_example(
    rng: random.Random, num_steps: int, max_operand: int, template: str = "standard"
) -> dict[str, str]:
    """One problem with `num_steps` operations, operands in [1, max_operand]."""
    value = rng.randint(1, max_operand)
    start, steps, lines = value, [], []
    for _ in range(num_steps):
        op, n = _pick_step(rng, value, max_operand)
        new = _apply(value, op, n)
        steps.append((op, n))
        lines.append(f"{value} {op} {n} = {new}")
        value = new
    lines.append(f"Answer: {value}")
    prompt = TEMPLATES[template](start, steps)
    return {"prompt": prompt, "answer": str(value), "solution": "\n".join(lines)}


def _sample(
    rng: random.Random,
    n: int,
    seen: set[str],
    steps: tuple[int, int],
    max_operand: int,
    template: str = "standard",
) -> list[dict[str, str]]:
    # `seen` is shared across sets so no prompt appears twice anywhere (held-out by construction).
    out: list[dict[str, str]] = []
    while len(out) < n:
        ex = make_example(rng, rng.randint(*steps), max_operand, template)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            out.append(ex)
    return out


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_sets(out_dir: Path, seed: int) -> None:
    """Write train, four test splits and the 64-prompt demo file as JSONL under `out_dir`."""
    rng = random.Random(seed)
    seen: set[str] = set()
    train = _sample(rng, 2000, seen, (2, 3), 20)
    sets = {
        "train": train,
        "test_id": _sample(rng, 200, seen, (2, 3), 20),
        "test_long": _sample(rng, 200, seen, (4, 5), 20),
        "test_large": _sample(rng, 200, seen, (2, 3), 99),
        "test_shifted": _sample(rng, 200, seen, (2, 3), 20, "shifted"),
        "prompts": [{"prompt": ex["prompt"], "answer": ex["answer"]} for ex in train[:64]],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in sets.items():
        _write_jsonl(out_dir / f"{name}.jsonl", rows)


if __name__ == "__main__":
    write_sets(Path(__file__).resolve().parent / "toy", seed=0)
