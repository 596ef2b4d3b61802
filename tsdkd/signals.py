"""The teacher-signal dataset: Parquet shards, a manifest and a dataset card (docs/format.md).

One row per candidate; the candidates of a prompt are consecutive rows of one shard, so a
ranking is never split. Layout of a dataset folder:

    tsdkd.json                              manifest: settings, fingerprints, shard checksums
    README.md                               dataset card, so the Hub and `load_dataset` read it
    data/train-00000-of-00004.parquet ...   shards
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tsdkd.errors import TsdkdError

FORMAT_NAME = "tsdkd-teacher-signals"
FORMAT_VERSION = 1
MANIFEST_NAME = "tsdkd.json"
CARD_NAME = "README.md"
# Rows per Parquet row group: small enough for stage 2 to stream, large enough to compress well.
ROW_GROUP_ROWS = 256
FLOAT_SUFFIXES = ("logprobs", "tail_mass", "entropy", "score")
# The manifest's `teacher_entropy`: from the full logits, or over the top-k and one tail bucket (vLLM).
TEACHER_ENTROPY_KINDS = ("exact", "estimated_topk_buckets")
MANIFEST_KEYS = ("complete", "round", "student", "teacher", "tokenizer", "sampling", "top_k", "teacher_entropy",
                 "backend", "settings", "job", "shards")


def id_type(vocab_size: int) -> pa.DataType:
    """Token ids take 2 bytes while the vocabulary fits, else 4."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.int32()


def signal_schema(vocab_size: int) -> pa.Schema:
    ids = id_type(vocab_size)
    return pa.schema(
        [
            ("prompt_id", pa.string()),
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("prompt_token_ids", pa.list_(ids)),
            ("gold_answer", pa.string()),
            ("candidate_index", pa.int16()),
            ("num_candidates", pa.int16()),
            ("completion_token_ids", pa.list_(ids)),
            ("completion_text", pa.string()),
            ("finish_reason", pa.string()),
            ("behaviour_logprobs", pa.list_(pa.float32())),
            ("teacher_logprobs", pa.list_(pa.float32())),
            ("teacher_topk_ids", pa.list_(pa.list_(ids))),
            ("teacher_topk_logprobs", pa.list_(pa.list_(pa.float16()))),
            ("teacher_tail_mass", pa.list_(pa.float16())),
            ("teacher_entropy", pa.list_(pa.float16())),
            ("teacher_entropy_exact", pa.bool_()),
            ("teacher_score", pa.float32()),
            ("teacher_rank", pa.int16()),
            ("verified", pa.bool_()),
        ]
    )


@dataclass
class CandidateSignal:
    """Everything stage 1 knows about one sampled candidate (arrays are per completion token)."""

    prompt_id: str
    messages: list[dict[str, str]]
    prompt_token_ids: list[int]
    gold_answer: str | None
    candidate_index: int
    num_candidates: int
    completion_token_ids: np.ndarray
    completion_text: str
    finish_reason: str
    behaviour_logprobs: np.ndarray
    teacher_logprobs: np.ndarray
    teacher_topk_ids: np.ndarray  # [L, k]
    teacher_topk_logprobs: np.ndarray  # [L, k], sorted descending
    teacher_tail_mass: np.ndarray
    teacher_entropy: np.ndarray
    teacher_entropy_exact: bool
    teacher_score: float
    teacher_rank: int
    verified: bool | None


def _list_array(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """A list column built from one flat buffer and offsets, not from Python objects."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(value_type.to_pandas_dtype())))


def _nested_list_array(matrices: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """[rows][positions][k] from one [positions, k] matrix per row."""
    inner = _list_array([row for matrix in matrices for row in matrix.reshape(len(matrix), -1)], value_type)
    offsets = np.zeros(len(matrices) + 1, dtype=np.int32)
    np.cumsum([len(m) for m in matrices], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def signals_to_table(candidates: list[CandidateSignal], vocab_size: int) -> pa.Table:
    schema = signal_schema(vocab_size)
    ids = id_type(vocab_size)
    column = lambda name: [getattr(c, name) for c in candidates]  # noqa: E731
    arrays = {
        "prompt_id": pa.array(column("prompt_id"), pa.string()),
        "messages": pa.array(column("messages"), schema.field("messages").type),
        "prompt_token_ids": _list_array([np.asarray(c.prompt_token_ids) for c in candidates], ids),
        "gold_answer": pa.array(column("gold_answer"), pa.string()),
        "candidate_index": pa.array(column("candidate_index"), pa.int16()),
        "num_candidates": pa.array(column("num_candidates"), pa.int16()),
        "completion_token_ids": _list_array(column("completion_token_ids"), ids),
        "completion_text": pa.array(column("completion_text"), pa.string()),
        "finish_reason": pa.array(column("finish_reason"), pa.string()),
        "behaviour_logprobs": _list_array(column("behaviour_logprobs"), pa.float32()),
        "teacher_logprobs": _list_array(column("teacher_logprobs"), pa.float32()),
        "teacher_topk_ids": _nested_list_array(column("teacher_topk_ids"), ids),
        "teacher_topk_logprobs": _nested_list_array(column("teacher_topk_logprobs"), pa.float16()),
        "teacher_tail_mass": _list_array(column("teacher_tail_mass"), pa.float16()),
        "teacher_entropy": _list_array(column("teacher_entropy"), pa.float16()),
        "teacher_entropy_exact": pa.array(column("teacher_entropy_exact"), pa.bool_()),
        "teacher_score": pa.array(column("teacher_score"), pa.float32()),
        "teacher_rank": pa.array(column("teacher_rank"), pa.int16()),
        "verified": pa.array(column("verified"), pa.bool_()),
    }
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write to a temporary name and rename, so a crash never leaves half a shard under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(
        table,
        temporary,
        compression="zstd",
        compression_level=9,
        row_group_size=ROW_GROUP_ROWS,
        # Dictionaries for the columns of one value per row (pyarrow would not apply a list column's name to its
        # values anyway): they pay for ids, strings and ranks, and would cost on the per-token lists (~12% on the
        # log-probs of SmolLM2 shards, ~4% on the id lists of toy shards).
        use_dictionary=[field.name for field in table.schema
                        if not pa.types.is_list(field.type) and not field.name.endswith(FLOAT_SUFFIXES)],
        write_statistics=False,
    )
    os.replace(temporary, path)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object that tsdkd wrote (a run record, a manifest); one line naming `what` if it is not one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TsdkdError(f"{path}: unreadable ({str(error).splitlines()[0]}); start a new run in another folder") from None
    if not isinstance(value, dict):
        raise TsdkdError(f"{path}: not {what}; start a new run in another folder")
    return value


def write_json_atomic(value: Any, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def shard_path(folder: Path, index: int, count: int) -> Path:
    """The Hub's split naming, so `load_dataset(folder)` finds the shards by itself (`SHARD_FILE_NAME`)."""
    return folder / "data" / f"train-{index:05d}-of-{count:05d}.parquet"


# shard_path's names relative to the dataset folder: (index, count).
SHARD_FILE_NAME = re.compile(r"data/train-(\d{5,})-of-(\d{5,})\.parquet")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if folder.is_file():
        raise TsdkdError(f"{folder} is a file; name the signal dataset's folder (the --out of `tsdkd generate`)")
    if not folder.exists():
        raise TsdkdError(f"{folder}: no such folder; name the --out folder of `tsdkd generate`")
    if not path.is_file():
        raise TsdkdError(f"{folder}: no {MANIFEST_NAME}; not a tsdkd signal dataset (make one with `tsdkd generate`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TsdkdError(f"{path}: manifest is not valid JSON ({error}); regenerate or restore it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise TsdkdError(f"{path}: format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TsdkdError(
            f"{path}: format version {manifest.get('format_version')!r} is not supported by this tsdkd "
            f"(reads version {FORMAT_VERSION}); upgrade tsdkd or regenerate the dataset"
        )
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise TsdkdError(f"{path}: manifest lacks {', '.join(missing)}; it was not written by tsdkd generate or was edited")
    return manifest


def write_dataset_card(folder: Path, manifest: dict[str, Any]) -> None:
    """A Hub dataset card. `load_dataset` finds the shards by their names (data/train-*); a `configs:` header naming
    them would make its cache key the folder's name and that pattern, so two `signals` folders would share rows."""
    sampling = manifest["sampling"]
    stats = manifest.get("stats", {})
    card = f"""---
tags:
- tsdkd
- knowledge-distillation
---
# Teacher signals for TSD-KD (round {manifest['round']})

Made by `tsdkd generate` ({FORMAT_NAME} v{FORMAT_VERSION}; the format is described in tsdkd's
`docs/format.md`). One row per sampled candidate; the candidates of a prompt are consecutive rows.

| | |
|---|---|
| student (sampler) | `{manifest['student']['name_or_path']}` |
| teacher (scorer) | `{manifest['teacher']['name_or_path']}` |
| candidates per prompt | {sampling['num_candidates']} |
| temperature / top-p | {sampling['temperature']} / {sampling['top_p']} |
| max new tokens | {sampling['max_new_tokens']} |
| teacher top-k | {manifest['top_k']} |
| teacher entropy | {manifest['teacher_entropy']} |
| backend | {manifest['backend']['name']} {manifest['backend']['version']} |
| prompts / candidates / completion tokens | {stats.get('prompts', '?')} / {stats.get('candidates', '?')} / {stats.get('completion_tokens', '?')} |

Load it with `datasets.load_dataset("path/to/this/folder")`, or check it with `tsdkd validate`.
"""
    (folder / CARD_NAME).write_text(card)
