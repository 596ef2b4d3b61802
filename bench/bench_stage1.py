"""Stage-1 throughput of the hf backend against plain transformers on the same batches.

    python bench/bench_stage1.py [--student data/toy-student --teacher data/toy-teacher]

(a) sampling: HFStudentSampler (which also records behaviour log-probs) vs `model.generate`;
(b) scoring: HFTeacherScorer (top-k, tail, exact entropy, chunked) vs a plain teacher forward
    over the same padded batches; (c) bytes per completion token of the written dataset, k=20.
Each timing is the best of --repeats runs after one warm-up. Prints a markdown table and writes
bench/results/stage1-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stage1_generate.hf_backend import HFStudentSampler, HFTeacherScorer  # noqa: E402
from stage1_generate.types import SamplingSettings  # noqa: E402


def best_of(repeats: int, run) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", default=str(ROOT / "data/toy-student"))
    parser.add_argument("--teacher", default=str(ROOT / "data/toy-teacher"))
    parser.add_argument("--prompts", default=str(ROOT / "data/toy/prompts.jsonl"))
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--num-candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    texts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines()[: args.num_prompts]]
    prompts = [
        tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        for t in texts
    ]
    settings = SamplingSettings(args.num_candidates, 1.0, 1.0, args.max_new_tokens)
    sampler = HFStudentSampler(args.student, settings, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer),
                               args.batch_size, "float32", False)
    seeds = list(range(len(prompts)))
    # Sampled lengths differ between runs; fix them so both sides generate the same tokens.
    sampled = sampler.sample(prompts, seeds)
    tokens_sampled = sum(len(c.completion_token_ids) for g in sampled for c in g)
    ours_sampling = best_of(args.repeats, lambda: sampler.sample(prompts, seeds))
    model = sampler.model

    def plain_generate() -> None:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch])
            mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in batch])[:, None]).long()
            torch.manual_seed(seeds[start])
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                               max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_candidates,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    plain_sampling = best_of(args.repeats, plain_generate)
    sampler.close()

    sequences = [(p, c.completion_token_ids) for p, g in zip(prompts, sampled) for c in g]
    scorer = HFTeacherScorer(args.teacher, args.top_k, len(tokenizer), tokenizer.pad_token_id, 16384, 2048, "float32", False)
    ours_scoring = best_of(args.repeats, lambda: scorer.score(sequences))
    teacher = scorer.model

    def plain_forward() -> None:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
        batch: list[list[int]] = []
        for index in order + [None]:
            row = None if index is None else list(sequences[index][0]) + sequences[index][1].tolist()
            if batch and (row is None or (len(batch) + 1) * len(row) > 16384):
                width = max(len(r) for r in batch)
                ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in batch])
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch])
                with torch.inference_mode():
                    teacher(input_ids=ids, attention_mask=mask).logits.float()
                batch = []
            if row is not None:
                batch.append(row)

    plain_scoring = best_of(args.repeats, plain_forward)
    scorer.close()

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "signals"
        subprocess.run([sys.executable, "-m", "tsdkd", "generate", "--prompts", args.prompts, "--student", args.student,
                        "--teacher", args.teacher, "--out", str(out), "--limit", str(args.num_prompts),
                        "--max-new-tokens", str(args.max_new_tokens), "--top-k", str(args.top_k), "--backend", "hf"],
                       check=True, capture_output=True, cwd=ROOT)
        stats = json.loads((out / "tsdkd.json").read_text())["stats"]

    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "student": args.student, "teacher": args.teacher, "prompts": len(prompts), "candidates": args.num_candidates,
        "completion_tokens": tokens_sampled,
        "sampling_tokens_per_s": {"tsdkd": tokens_sampled / ours_sampling, "plain_generate": tokens_sampled / plain_sampling},
        "sampling_ratio": plain_sampling / ours_sampling,
        "scoring_tokens_per_s": {"tsdkd": tokens_sampled / ours_scoring, "plain_forward": tokens_sampled / plain_scoring},
        "scoring_ratio": plain_scoring / ours_scoring,
        "top_k": args.top_k,
        "bytes_per_completion_token": stats["bytes_per_completion_token"],
    }
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"stage1-{result['date']}-{Path(args.teacher).name}.json").write_text(json.dumps(result, indent=2))
    print("| step | tsdkd tokens/s | plain tokens/s | ratio (aim >= 0.9) |\n|---|---|---|---|")
    print(f"| student sampling | {result['sampling_tokens_per_s']['tsdkd']:.0f} | {result['sampling_tokens_per_s']['plain_generate']:.0f} | {result['sampling_ratio']:.2f} |")
    print(f"| teacher scoring | {result['scoring_tokens_per_s']['tsdkd']:.0f} | {result['scoring_tokens_per_s']['plain_forward']:.0f} | {result['scoring_ratio']:.2f} |")
    print(f"\nbytes per completion token at k={args.top_k}: {result['bytes_per_completion_token']}  ({result['machine']})")


if __name__ == "__main__":
    main()
