"""`tsdkd eval`: final-answer accuracy of models on benchmark files, on either backend.

Per benchmark (named by its file): accuracy (greedy, or the mean over k samples), pass@k with k samples,
the share of responses that stopped at EOS.

    OUT/tsdkd_eval.json      the settings (models, data files, limit, max_new_tokens, ...), the data files'
                             hashes and the models' identities
    OUT/results.json         one model: its results, with the settings; OUT/<benchmark>.jsonl: every item's responses
    OUT/<n>-<folder name>/   several models: the same for each model, compared in OUT/comparison.json

The whole set is written to a hidden folder beside OUT and swapped in once every model is done, so OUT never
mixes two evals and an interrupted eval leaves it as it was. A rerun with the same settings evaluates again
and replaces the eval's files (other files in OUT are kept); an eval with other settings is refused (choose
another --out).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tsdkd.answers import answer_is_correct, extract_answer, gold_final_answer
from tsdkd.config import EvalConfig
from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import model_identity, sha256_json, source_fingerprint, with_real_paths
from tsdkd.interrupts import interrupts_deferred
from tsdkd.loading import context_length, load_tokenizer, padding_id
from tsdkd.locks import default_permissions
from tsdkd.prompts import PromptRecord, load_prompts, render_prompt
from tsdkd.signals import read_json_object, write_json_atomic

EVAL_RECORD = "tsdkd_eval.json"


@dataclass
class ModelJob:
    """One model to evaluate, with every benchmark already read and rendered for its tokenizer."""

    path: str
    label: str  # its subfolder when several models are compared: <n>-<folder name>
    tokenizer: Any
    identity: dict[str, Any]
    benchmarks: dict[str, tuple[list[PromptRecord], list[list[int]]]]  # by benchmark name


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

    pad = padding_id(tokenizer)
    pad = 0 if pad is None else pad  # masked out: any id serves when the tokenizer names neither a pad nor an EOS token
    return HFStudentSampler(model_path, settings, tokenizer.eos_token_id, pad, len(tokenizer), cfg.batch_size,
                            cfg.dtype, cfg.trust_remote_code)


def read_benchmark(cfg: EvalConfig, path: Path) -> list[PromptRecord]:
    """A benchmark's records, each with a gold answer."""
    # A benchmark folder with splits (a Hub download) is scored on its test split, never on what models trained on.
    records = load_prompts(path, cfg.prompt_field, cfg.answer_field, cfg.limit, split="test")
    unanswered = [r for r in records if r.gold_answer is None]
    if len(unanswered) == len(records):
        raise TsdkdError(f"{path}: no gold answer field (answer or solution), or only empty ones; pass --answer-field")
    if unanswered:
        raise TsdkdError(f"{unanswered[0].where}: no gold answer; fill it in or remove the row")
    return records


def render_benchmark(cfg: EvalConfig, records: list[PromptRecord], tokenizer: Any,
                     context: int | None) -> tuple[list[PromptRecord], list[list[int]]]:
    """The records and their prompts in one model's chat template, each checked against its context."""
    prompts = [render_prompt(tokenizer, r.messages, r.where) for r in records]
    for record, ids in zip(records, prompts):
        if context is not None and len(ids) + cfg.max_new_tokens > context:
            raise TsdkdError(f"{record.where}: prompt is {len(ids)} tokens; with --max-new-tokens "
                             f"{cfg.max_new_tokens} it exceeds the model's context of {context}")
    return records, prompts


def eval_settings(cfg: EvalConfig) -> dict[str, Any]:
    """What decides the results: every setting but --out, the temperature as used, the models and data files
    as real paths. As JSON reads it back."""
    settings = with_real_paths({key: value for key, value in vars(cfg).items() if key != "out"}, ("model", "data"))
    settings["temperature"] = cfg.sampling_temperature
    return json.loads(json.dumps(settings))


def check_output(out: Path, settings: dict[str, Any]) -> None:
    """--out may be new, empty, or hold an eval with the same settings (replaced once this one is done)."""
    if out.exists() and not out.is_dir():
        raise TsdkdError(f"--out {out} is a file; choose a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not os.access(out, os.W_OK | os.X_OK):  # its files could not be replaced, nor the user's moved back in
        raise TsdkdError(f"--out {out} is not writable; make it so, or choose another --out")
    if not (out / EVAL_RECORD).is_file():
        raise TsdkdError(f"--out {out} is not empty and holds no eval ({EVAL_RECORD}); choose a new or empty folder")
    recorded = read_json_object(out / EVAL_RECORD, "a tsdkd eval record").get("settings")
    if not isinstance(recorded, dict):
        raise TsdkdError(f"{out / EVAL_RECORD}: not a tsdkd eval record; choose a new or empty --out")
    recorded = with_real_paths(recorded, ("model", "data"))  # evals recorded the paths as typed before they were resolved
    changes = [f"{key}: {recorded.get(key)!r} there, {value!r} now" for key, value in settings.items() if recorded.get(key) != value]
    if changes:
        raise TsdkdError(f"--out {out} holds an eval with other settings ({'; '.join(changes)}); "
                         f"choose another --out, or delete {out} to replace it")
    print(f"{out} holds an eval with these settings: it is replaced when this one is done")


def prepare_model(cfg: EvalConfig, index: int, model_path: str, read: dict[str, list[PromptRecord]]) -> ModelJob:
    """Reads and checks one model's tokenizer, weights and benchmark prompts; loads no weights. Each benchmark's
    records are read once, for the first model, into `read` (by name)."""
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code, "model")
    identity = model_identity(model_path, cfg.trust_remote_code)  # also refuses weights that are not safetensors
    context = context_length(model_path, cfg.trust_remote_code)
    benchmarks = {}
    for data in cfg.data:
        name = Path(data).stem
        if name not in read:
            read[name] = read_benchmark(cfg, Path(data))
        benchmarks[name] = render_benchmark(cfg, read[name], tokenizer, context)
    return ModelJob(model_path, f"{index}-{Path(model_path.rstrip('/')).name}", tokenizer, identity, benchmarks)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Every model on every benchmark. One model: its results (OUT/results.json), returned. Several: each in
    OUT/<n>-<folder name>/, compared in OUT/comparison.json (returned). Prints a table."""
    cfg.check()
    out = Path(cfg.out)
    stems = [Path(data).stem for data in cfg.data]
    for data in cfg.data:
        if stems.count(Path(data).stem) > 1:
            raise TsdkdError(f"--data {data}: two benchmark files are named {Path(data).stem!r}; rename one")
    settings = eval_settings(cfg)
    check_output(out, settings)
    # Every model and benchmark is checked before the first one spends hours generating.
    read: dict[str, list[PromptRecord]] = {}
    jobs = [prepare_model(cfg, index, model, read) for index, model in enumerate(cfg.model, start=1)]
    from stage1_generate.generate import backend_dtype, resolve_backend

    backend = resolve_backend(cfg.backend)
    record = {"settings": settings, "data_sha256": [source_fingerprint(Path(data)) for data in cfg.data],
              "models": [job.identity for job in jobs], "backend": {"name": backend, "dtype": backend_dtype(backend, cfg.dtype)}}
    target = out.resolve()  # a name to put the staging folder beside, also for `--out .`
    staging = staging_folder(target, "partial", out)  # its own: two evals at once never share one
    keep = False
    try:
        if len(jobs) == 1:
            returned = evaluate_model(cfg, jobs[0], staging)
            table = results_table(returned)
        else:
            returned = {"models": {job.label: evaluate_model(cfg, job, staging / job.label) for job in jobs}}
            write_json_atomic(returned, staging / "comparison.json")
            table = comparison_table(returned)
        write_json_atomic(record, staging / EVAL_RECORD)
        try:
            swap_in(staging, target)
        except OSError as error:  # e.g. --out is a mount point, which cannot be renamed
            keep = True
            raise TsdkdError(f"--out {out}: cannot move the finished results in ({error.strerror}); "
                             f"they are in {staging}") from None
    finally:
        if not keep:
            shutil.rmtree(staging, ignore_errors=True)  # an interrupted eval's partial results
    print(table)
    return returned


def staging_folder(target: Path, kind: str, out: Path) -> Path:
    """A new, empty hidden folder beside `target`."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{kind}-"))
        default_permissions(folder)  # it becomes --out, shared like any folder (mkdtemp's is its owner's alone)
        return folder
    except OSError as error:
        raise TsdkdError(f"--out {out}: cannot create a folder beside it to write the results in ({error.strerror})") from None


def swap_in(staging: Path, out: Path) -> None:
    """`staging` becomes `out`, with `out`'s permissions. A previous eval there is moved aside first, so `out` never
    holds a mix of two; what else was kept at its top (notes, plots) then comes back, and the rest of the previous
    eval is removed. Ctrl-C and SIGTERM wait until the folders are in place."""
    mode = stat.S_IMODE(out.stat().st_mode) if out.is_dir() else None
    with interrupts_deferred() as received:
        if out.is_dir() and any(out.iterdir()):
            previous = staging_folder(out, "previous", out)
            os.replace(out, previous)  # onto the new, empty folder
            os.replace(staging, out)
            written = {entry.name for entry in out.iterdir()}
            for entry in previous.iterdir():
                if entry.name not in written:
                    os.replace(entry, out / entry.name)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, out)  # onto an empty folder too
        if mode is not None:
            os.chmod(out, mode)
    if received:
        print(f"{signal.Signals(received[0]).name} came while the finished results were moved into {out}; they are "
              "complete there", file=sys.stderr)
        signal.raise_signal(received[0])  # now taken as it would have been: the command ends as interrupted


def evaluate_model(cfg: EvalConfig, job: ModelJob, out: Path) -> dict[str, Any]:
    """One model on every benchmark; its results also written to OUT/results.json."""
    out.mkdir(exist_ok=True)
    longest = max(len(p) for _, prompts in job.benchmarks.values() for p in prompts)
    model = open_model(cfg, job.path, job.tokenizer, longest)
    # The settings shared by all models, so that a model's results say how they were made.
    shared = {key: value for key, value in eval_settings(cfg).items() if key != "model"}
    results: dict[str, Any] = {"model": job.path, "settings": shared, "benchmarks": {}}
    try:
        for name, (records, prompts) in job.benchmarks.items():
            results["benchmarks"][name] = run_benchmark(cfg, model, job.tokenizer, name, records, prompts, out)
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


def benchmark_columns(name: str, k: int) -> list[str]:
    """The columns of one benchmark's results: accuracy, pass@k (with k samples) and the share stopped at EOS."""
    return [name, *([f"pass@{k}"] if k > 1 else []), "stopped at EOS"]


def benchmark_cells(row: dict[str, Any], k: int) -> list[str]:
    """One benchmark's results under benchmark_columns, as percentages."""
    return [f"{100 * row['accuracy']:.1f}%", *([f"{100 * row[f'pass@{k}']:.1f}%"] if k > 1 else []),
            f"{100 * row['stopped_fraction']:.1f}%"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, as the command prints it."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def results_table(results: dict[str, Any]) -> str:
    k = results["settings"]["samples"]
    header = ["benchmark", "items", *benchmark_columns("accuracy", k)]
    return markdown_table(header, [[name, str(row["items"]), *benchmark_cells(row, k)]
                                   for name, row in results["benchmarks"].items()])


def comparison_table(comparison: dict[str, Any]) -> str:
    """Each model (rows) on each benchmark (columns: accuracy, pass@k, stopped at EOS)."""
    models = comparison["models"]
    first = next(iter(models.values()))
    k, names = first["settings"]["samples"], list(first["benchmarks"])
    header = ["model", *(column if column == name else f"{name} {column}" for name in names for column in benchmark_columns(name, k))]
    rows = [[f"{label} ({results['model']})", *(cell for name in names for cell in benchmark_cells(results["benchmarks"][name], k))]
            for label, results in models.items()]
    return markdown_table(header, rows)
