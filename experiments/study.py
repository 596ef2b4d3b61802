"""The toy-scale study: TSD-KD against its baselines and ablations over self-improvement rounds.

    python experiments/study.py     # = --out runs/study-2000 --prompts 2000 --seeds 0 1 --rounds 3 --learning-rate 1e-4 --epochs 1

From the committed toy pair (data/toy-teacher, data/toy-student), every method runs `tsdkd run`
with the same prompts, the same generation settings, the same distillation budget and the same
seeds; every round's student is then evaluated greedily on the four held-out test sets. Writes
OUT/results.json, OUT/results.md, OUT/accuracy_by_round.png and OUT/token_weights.png.
Rerunning continues where it stopped (rounds and evaluations already done are kept).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tsdkd.config import EvalConfig, RunConfig  # noqa: E402
from tsdkd.evaluate import evaluate  # noqa: E402
from tsdkd.rounds import run_rounds, start_manifest, student_of_round  # noqa: E402

METHODS = {
    "tsdkd": {},
    "sft": {"loss": "sft"},
    "kd": {"loss": "kd"},
    "gkd": {"loss": "gkd"},
    "tsdkd -indirect": {"no_indirect": True},
    "tsdkd -entropy": {"no_entropy": True},
    "tsdkd -selection": {"no_selection": True},
    # One TSD-KD addition at a time on top of gkd (= tsdkd with all three switched off).
    "gkd +selection": {"no_indirect": True, "no_entropy": True},
    "gkd +entropy": {"no_indirect": True, "no_selection": True},
    "gkd +indirect": {"no_entropy": True, "no_selection": True},
}
TEST_SETS = ["test_id", "test_long", "test_large", "test_shifted"]


def evaluate_once(model: str, out: Path, eval_limit: int, max_new_tokens: int) -> dict[str, float]:
    """Greedy accuracy per test set, cached in OUT/results.json."""
    cached = out / "results.json"
    if not cached.is_file():
        evaluate(EvalConfig(model=[model], data=[str(ROOT / "data" / "toy" / f"{name}.jsonl") for name in TEST_SETS],
                            out=str(out), limit=eval_limit, max_new_tokens=max_new_tokens, backend="hf", batch_size=64))
    results = json.loads(cached.read_text())["benchmarks"]
    return {name: results[name]["accuracy"] for name in TEST_SETS}


def share_first_round(cfg: RunConfig, first_signals: Path) -> None:
    """Round 1 samples with the same initial student, prompts and seed for every method: copy the
    first method's finished round-1 signals instead of generating them again (same bytes)."""
    target = Path(cfg.out) / "round-1" / "signals"
    manifest = first_signals / "tsdkd.json"
    if target.exists() or not manifest.is_file() or not json.loads(manifest.read_text()).get("complete"):
        return
    start_manifest(cfg, Path(cfg.out))
    shutil.copytree(first_signals, target)


def mean_and_spread(values: list[float]) -> str:
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def write_table(results: dict, rounds: int, out: Path) -> None:
    lines = [f"| method (round {rounds}) | " + " | ".join(TEST_SETS) + " |", "|---" * (len(TEST_SETS) + 1) + "|"]
    lines.append("| teacher | " + " | ".join(f"{100 * results['teacher'][t]:.1f}" for t in TEST_SETS) + " |")
    lines.append("| student before (round 0) | " + " | ".join(mean_and_spread([results["initial"][t]]) for t in TEST_SETS) + " |")
    for method, by_seed in results["methods"].items():
        cells = [mean_and_spread([seed_rounds[str(rounds)][t] for seed_rounds in by_seed.values()]) for t in TEST_SETS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    seeds = len(next(iter(results["methods"].values())))
    lines.append(f"\nAccuracy in %, greedy, mean ± half-range over {seeds} seeds.")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_rounds(results: dict, rounds: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(TEST_SETS), figsize=(4 * len(TEST_SETS), 3.6), sharey=True)
    for axis, test in zip(axes, TEST_SETS):
        for method, by_seed in results["methods"].items():
            means = [results["initial"][test]] + [
                statistics.mean(seed_rounds[str(r)][test] for seed_rounds in by_seed.values()) for r in range(1, rounds + 1)
            ]
            axis.plot(range(rounds + 1), [100 * m for m in means], marker="o", label=method,
                      linewidth=2.5 if method == "tsdkd" else 1.2)
        axis.axhline(100 * results["teacher"][test], color="black", linestyle="--", linewidth=1, label="teacher")
        axis.set_title(test)
        axis.set_xlabel("round")
        axis.set_xticks(range(rounds + 1))
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "accuracy_by_round.png", dpi=120)


def plot_token_weights(signals: Path, student: str, out: Path) -> None:
    """One candidate of round 1, each token shaded by w_t = sigmoid(H_S - H_T) under the initial student."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((signals / "tsdkd.json").read_text())
    row = pq.read_table(signals / manifest["shards"][0]["file"]).slice(0, 1).to_pylist()[0]
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    ids = torch.tensor([row["prompt_token_ids"] + row["completion_token_ids"]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    start = len(row["prompt_token_ids"]) - 1
    student_entropy = -(logprobs.exp() * logprobs).sum(-1)[start : start + len(row["completion_token_ids"])]
    weights = torch.sigmoid(student_entropy - torch.tensor(row["teacher_entropy"], dtype=torch.float32)).tolist()
    figure = plt.figure(figsize=(10, 4))
    x, y = 0.01, 0.9
    colours = plt.get_cmap("Reds")
    figure.text(0.01, 0.97, f"prompt: {row['messages'][-1]['content']}", fontsize=8, va="top")
    for token, weight in zip(row["completion_token_ids"], weights):
        piece = tokenizer.decode([token])
        if piece.startswith("\n"):
            x, y = 0.01, y - 0.08
            continue
        # Monospace glyphs have one width, so a token's box is as wide as its characters.
        figure.text(x, y, piece, fontsize=10, family="monospace", va="top",
                    bbox={"facecolor": colours(weight), "edgecolor": "none", "pad": 1.5})
        x += 0.0095 * max(len(piece), 1) + 0.002
        if x > 0.95:
            x, y = 0.01, y - 0.08
    figure.text(0.01, 0.02, "shade = token weight w_t (white 0, red 1)", fontsize=8)
    figure.savefig(out / "token_weights.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/study-2000")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2000, help="training prompts per round")
    parser.add_argument("--eval-limit", type=int, default=100, help="items per test set")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    out = Path(args.out)
    student, teacher = str(ROOT / "data" / "toy-student"), str(ROOT / "data" / "toy-teacher")
    generate = {"num_candidates": 4, "top_k": 20, "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
                "backend": "hf", "limit": args.prompts, "prompts_per_shard": 64}
    distill = {"learning_rate": args.learning_rate, "epochs": args.epochs, "batch_size": 8, "logging_steps": 20,
               "save_steps": 10_000, "warmup_ratio": 0.1}
    results: dict = {"settings": {**vars(args), "generate": generate, "distill": distill},
                     "teacher": evaluate_once(teacher, out / "eval" / "teacher", args.eval_limit, args.max_new_tokens),
                     "initial": evaluate_once(student, out / "eval" / "initial", args.eval_limit, args.max_new_tokens),
                     "methods": {}}
    for method in args.methods:
        for seed in args.seeds:
            folder = out / "runs" / method.replace(" ", "_") / f"seed{seed}"
            cfg = RunConfig(prompts=str(ROOT / "data" / "toy" / "train.jsonl"), student=student, teacher=teacher,
                            out=str(folder), rounds=args.rounds, seed=seed, generate=dict(generate),
                            distill={**distill, **METHODS[method]})
            share_first_round(cfg, out / "runs" / args.methods[0].replace(" ", "_") / f"seed{seed}" / "round-1" / "signals")
            run_rounds(cfg)
            results["methods"].setdefault(method, {})[str(seed)] = {
                str(r): evaluate_once(student_of_round(cfg, r), folder / f"round-{r}" / "eval", args.eval_limit, args.max_new_tokens)
                for r in range(1, args.rounds + 1)
            }
            (out / "results.json").write_text(json.dumps(results, indent=2))
    write_table(results, args.rounds, out)
    plot_rounds(results, args.rounds, out)
    first = out / "runs" / "tsdkd" / f"seed{args.seeds[0]}" / "round-1" / "signals"
    if first.is_dir():
        plot_token_weights(first, student, out)


if __name__ == "__main__":
    main()
