"""`tsdkd eval`: final-answer accuracy of a model on benchmark files, on either backend.

Per benchmark (named by its file): accuracy (greedy, or the mean over k samples), pass@k with
k samples, the share of responses that stopped at EOS; written to OUT/results.json, with every
item's responses in OUT/<benchmark>.jsonl.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tsdkd.answers import answer_is_correct, extract_answer, gold_final_answer
from tsdkd.config import EvalConfig
from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import sha256_json
from tsdkd.loading import context_length, load_tokenizer
from tsdkd.prompts import PromptRecord, load_prompts, render_prompt
from tsdkd.signals import write_json_atomic


def open_model(cfg: EvalConfig, model_path: str, tokenizer: Any, longest_prompt: int) -> Any:
    from stage1_generate.generate import resolve_backend
    from stage1_generate.types import SamplingSettings

    settings = SamplingSettings(cfg.samples, cfg.sampling_temperature, cfg.top_p, cfg.max_new_tokens)
    if resolve_backend(cfg.backend) == "vllm":
        import torch

        from stage1_generate.vllm_backend import VLLMStudentSampler

        engine = {"max_model_len": longest_prompt + cfg.max_new_tokens, "enforce_eager": cfg.enforce_eager,
                  "trust_remote_code": cfg.trust_remote_code}
        if cfg.kv_cache_memory_bytes or not torch.cuda.is_available():
            engine["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes or 1 << 30
        return VLLMStudentSampler(model_path, settings, cfg.dtype, cfg.seed, engine, len(tokenizer))
    from stage1_generate.hf_backend import HFStudentSampler

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return HFStudentSampler(model_path, settings, tokenizer.eos_token_id, pad, len(tokenizer), cfg.batch_size,
                            cfg.dtype, cfg.trust_remote_code)


def load_benchmark(cfg: EvalConfig, path: Path, tokenizer: Any, context: int | None) -> tuple[list[PromptRecord], list[list[int]]]:
    records = load_prompts(path, cfg.prompt_field, cfg.answer_field, cfg.limit)
    unanswered = [r for r in records if r.gold_answer is None]
    if len(unanswered) == len(records):
        raise TsdkdError(f"{path}: no gold answer field (answer or solution); pass --answer-field")
    if unanswered:
        raise TsdkdError(f"{unanswered[0].where}: no gold answer; fill it in or remove the row")
    prompts = [render_prompt(tokenizer, r.messages, r.where) for r in records]
    for record, ids in zip(records, prompts):
        if context is not None and len(ids) + cfg.max_new_tokens > context:
            raise TsdkdError(f"{record.where}: prompt is {len(ids)} tokens; with --max-new-tokens "
                             f"{cfg.max_new_tokens} it exceeds the model's context of {context}")
    return records, prompts


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Every model on every benchmark. One model: OUT/results.json (returned). Several: each in
    OUT/<n>-<folder name>/, then OUT/comparison.json and a table of accuracy by model (returned)."""
    cfg.check()
    out = Path(cfg.out)
    if len(cfg.model) == 1:
        results = evaluate_model(cfg, cfg.model[0], out)
        print(results_table(results))
        return results
    labels = [f"{index}-{Path(model.rstrip('/')).name}" for index, model in enumerate(cfg.model, start=1)]
    comparison = {"models": {label: evaluate_model(cfg, model, out / label) for label, model in zip(labels, cfg.model)}}
    write_json_atomic(comparison, out / "comparison.json")
    print(comparison_table(comparison))
    return comparison


def evaluate_model(cfg: EvalConfig, model_path: str, out: Path) -> dict[str, Any]:
    """One model on every benchmark; results also written to OUT/results.json."""
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code, "model")
    context = context_length(model_path, cfg.trust_remote_code)
    benchmarks = {}
    for data in cfg.data:
        path = Path(data)
        if path.stem in benchmarks:
            raise TsdkdError(f"--data {data}: two benchmark files are named {path.stem!r}; rename one")
        benchmarks[path.stem] = (path, *load_benchmark(cfg, path, tokenizer, context))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TsdkdError(f"--out {out}: cannot create it ({error.strerror})") from None
    longest = max(len(p) for _, _, prompts in benchmarks.values() for p in prompts)
    model = open_model(cfg, model_path, tokenizer, longest)
    results: dict[str, Any] = {"model": model_path, "samples": cfg.samples, "temperature": cfg.sampling_temperature,
                               "max_new_tokens": cfg.max_new_tokens, "benchmarks": {}}
    try:
        for name, (path, records, prompts) in benchmarks.items():
            results["benchmarks"][name] = run_benchmark(cfg, model, tokenizer, name, records, prompts, out)
    finally:
        model.close()
    write_json_atomic(results, out / "results.json")
    return results


def run_benchmark(cfg: EvalConfig, model: Any, tokenizer: Any, name: str, records: list[PromptRecord],
                  prompts: list[list[int]], out: Path) -> dict[str, Any]:
    seeds = [int(sha256_json([cfg.seed, r.prompt_id])[:8], 16) for r in records]
    items, correct_counts, stopped, tokens = [], [], 0, 0
    bar = tqdm(total=len(records), desc=f"eval {name}", unit="item")
    start = time.perf_counter()
    for begin in range(0, len(records), cfg.batch_size):
        groups = model.sample(prompts[begin : begin + cfg.batch_size], seeds[begin : begin + cfg.batch_size])
        for record, group in zip(records[begin : begin + cfg.batch_size], groups):
            texts = [tokenizer.decode(c.completion_token_ids, skip_special_tokens=True) for c in group]
            verdicts = [answer_is_correct(record.gold_answer, text) for text in texts]
            correct_counts.append(sum(verdicts))
            stopped += sum(c.finish_reason == "stop" for c in group)
            tokens += sum(len(c.completion_token_ids) for c in group)
            items.append({"row": record.row, "prompt": record.messages[-1]["content"], "gold": gold_final_answer(record.gold_answer),
                          "responses": texts, "extracted": [extract_answer(t) for t in texts], "correct": verdicts})
        bar.update(len(groups))
        bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.0f}")
    bar.close()
    with open(out / f"{name}.jsonl", "w") as handle:
        handle.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    n, k = len(records), cfg.samples
    summary = {"items": n, "accuracy": sum(correct_counts) / (n * k), "stopped_fraction": stopped / (n * k),
               "mean_completion_tokens": tokens / (n * k)}
    if k > 1:
        summary[f"pass@{k}"] = sum(count > 0 for count in correct_counts) / n
    return summary


def results_table(results: dict[str, Any]) -> str:
    k = results["samples"]
    header = "| benchmark | items | accuracy |" + (f" pass@{k} |" if k > 1 else "") + " stopped at EOS |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, row in results["benchmarks"].items():
        cells = [name, str(row["items"]), f"{100 * row['accuracy']:.1f}%"]
        if k > 1:
            cells.append(f"{100 * row[f'pass@{k}']:.1f}%")
        cells.append(f"{100 * row['stopped_fraction']:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(comparison: dict[str, Any]) -> str:
    """Accuracy of each model (rows) on each benchmark (columns)."""
    models = comparison["models"]
    names = list(next(iter(models.values()))["benchmarks"])
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, results in models.items():
        cells = [f"{100 * results['benchmarks'][name]['accuracy']:.1f}%" for name in names]
        lines.append(f"| {label} ({results['model']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
