"""Every check a signal dataset must pass before a day of training is spent on it."""

from __future__ import annotations

import os
import reprlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import sha256_file
from tsdkd.signals import MANIFEST_NAME, read_manifest, signal_schema

T = TypeVar("T")

# float16 storage rounds a log-prob of 0 to at most this much above 0.
LOGPROB_SLACK = 1e-3
# Shards checked at once (each holds its whole table in memory while it is checked).
VALIDATION_THREADS = 8
# A rerun of the command that made a complete dataset checks every shard and redoes the bad ones.
REDO_SHARD = "restore it, or rerun the `tsdkd generate` command that made the dataset to redo missing or damaged shards"
# The manifest fields that tsdkd reads (validation, distill, merge, inspect, a generate rerun), with their JSON types,
# each after its parent: a missing or mistyped one fails here in one line, not as a KeyError later.
MANIFEST_FIELDS: tuple[tuple[str, type], ...] = (
    ("complete", bool), ("round", int), ("top_k", int), ("teacher_entropy", str), ("settings", dict),
    ("student", dict), ("student.name_or_path", str), ("teacher", dict), ("teacher.name_or_path", str),
    ("backend", dict), ("backend.name", str), ("backend.version", str), ("backend.dtype", str),
    ("tokenizer", dict), ("tokenizer.sha256", str), ("tokenizer.vocab_sha256", str), ("tokenizer.vocab_size", int),
    ("sampling", dict), ("sampling.num_candidates", int), ("sampling.max_new_tokens", int), ("sampling.seed", int),
    ("job", dict), ("job.shard_index", int), ("job.num_shards", int),
    ("shards", list),
)
SHARD_FIELDS = (("shards.{i}", dict), *((f"shards.{{i}}.{key}", int) for key in ("index", "rows", "prompts", "completion_tokens", "bytes")),
                ("shards.{i}.file", str), ("shards.{i}.sha256", str))
STATS_FIELDS = (("stats", dict), *((f"stats.{key}", int) for key in ("prompts", "candidates", "completion_tokens", "bytes")))


def _check_types(manifest: dict[str, Any], fields: Sequence[tuple[str, type]], path: Path) -> None:
    for dotted, kind in fields:
        value: Any = manifest
        for key in dotted.split("."):
            value = value[int(key)] if isinstance(value, list) else value.get(key)
        # json.loads makes exactly these types; `type is` also keeps `true` from passing as an int.
        if type(value) is not kind:
            found = "missing" if value is None else f"{type(value).__name__} {reprlib.repr(value)}"
            raise TsdkdError(f"{path}: {dotted} is {found}, expected {kind.__name__}; "
                             "the manifest was edited or damaged, restore it or regenerate the dataset")


def check_manifest_fields(manifest: dict[str, Any], path: Path) -> None:
    """Every field tsdkd reads from the manifest at `path` is there, with its type."""
    _check_types(manifest, MANIFEST_FIELDS, path)
    # Only now is `shards` known to be a list whose entries can be named.
    later = [(name.format(i=i), kind) for i in range(len(manifest["shards"])) for name, kind in SHARD_FIELDS]
    if manifest["complete"]:  # `tsdkd generate` writes the stats together with `complete`
        later += STATS_FIELDS
    _check_types(manifest, later, path)


def read_checked_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the dataset in `folder`, every field tsdkd reads present with its type."""
    manifest = read_manifest(folder)
    check_manifest_fields(manifest, folder / MANIFEST_NAME)
    return manifest


def check_tokenizer(manifest: dict[str, Any], fingerprint: dict[str, Any], folder: Path, who: str) -> None:
    """The dataset's token ids mean the same tokens for `who` (the student about to be trained)."""
    stored = manifest["tokenizer"]
    if stored["vocab_sha256"] != fingerprint["vocab_sha256"]:
        raise TsdkdError(
            f"{folder}: tokenizer of {who} differs from the dataset's (vocabulary or special tokens; "
            f"dataset vocab {stored['vocab_size']}, {who} {fingerprint['vocab_size']}); use the student the data was made for"
        )
    if stored["vocab_size"] != fingerprint["vocab_size"]:
        # Same vocabulary, other size: the manifest was edited, and ids up to its size would pass the range checks.
        raise TsdkdError(
            f"{folder}: tokenizer.vocab_size {stored['vocab_size']} in {MANIFEST_NAME} differs from the {fingerprint['vocab_size']} "
            f"tokens of {who}; the manifest was edited, restore it or regenerate the dataset"
        )
    if stored["sha256"] != fingerprint["sha256"]:
        raise TsdkdError(f"{folder}: chat template of {who} differs from the dataset's; prompts were rendered with another template")


def validate_dataset(folder: Path, tokenizer_fingerprint: dict[str, Any] | None = None, deep: bool = True) -> dict[str, Any]:
    """Manifest, checksums and row counts; with `deep`, every value of every row. Returns the manifest."""
    manifest = read_checked_manifest(folder)
    if tokenizer_fingerprint is not None:
        check_tokenizer(manifest, tokenizer_fingerprint, folder, "the student")
    if not manifest.get("complete"):
        raise TsdkdError(f"{folder}: the dataset is incomplete (generation did not finish); rerun the same `tsdkd generate` command")
    listed = {entry["file"] for entry in manifest["shards"]}
    on_disk = {str(p.relative_to(folder)) for p in (folder / "data").glob("*.parquet")}
    if on_disk - listed:
        raise TsdkdError(f"{folder}: shard {sorted(on_disk - listed)[0]} is not in the manifest; remove it")
    schema = signal_schema(manifest["tokenizer"]["vocab_size"])

    def check_shard(entry: dict[str, Any]) -> list[tuple[int, str]]:
        path = checked_shard_file(folder, entry)
        rows = read_parquet(path, lambda p: pq.ParquetFile(p).metadata.num_rows)
        if rows != entry["rows"]:
            raise TsdkdError(f"{path}: {rows} rows, the manifest says {entry['rows']}")
        if not deep:
            return []
        table = read_parquet(path, pq.read_table)
        if not table.schema.equals(schema):
            raise TsdkdError(f"{path}: columns or types differ from format v{manifest['format_version']}")
        return check_rows(table, path, manifest)

    # Shards are checked side by side (reading, hashing and numpy release the GIL). map yields them in
    # manifest order and each is checked against the earlier ones' prompts before the next is taken, so the
    # first bad shard in that order is the one reported.
    seen_prompts: set[str] = set()
    with ThreadPoolExecutor(max_workers=min(VALIDATION_THREADS, usable_cores())) as pool:
        for entry, shard_groups in zip(manifest["shards"], pool.map(check_shard, manifest["shards"])):
            for row, prompt_id in shard_groups:
                if prompt_id in seen_prompts:
                    raise TsdkdError(f"{folder / entry['file']} row {row}: prompt {prompt_id} appears in more than one "
                                     "group or shard; the shard is damaged, regenerate it")
                seen_prompts.add(prompt_id)
    # Each shard's rows were checked against its file above, so this catches edited stats or shard entries.
    candidates = sum(entry["rows"] for entry in manifest["shards"])
    if candidates != manifest["stats"]["candidates"]:
        raise TsdkdError(
            f"{folder / MANIFEST_NAME}: stats.candidates is {manifest['stats']['candidates']}, the shards hold {candidates} rows; "
            "the manifest or a shard was edited, restore it or regenerate the dataset"
        )
    return manifest


def usable_cores() -> int:
    """The cores this process may run on (a container's limit, not the host's count); all of them where the
    system cannot say (macOS has no sched_getaffinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def shard_matches(folder: Path, entry: dict[str, Any]) -> bool:
    """Whether a manifest's shard entry has its file, the one the manifest hashed."""
    path = folder / entry["file"]
    return path.is_file() and sha256_file(path) == entry["sha256"]


def checked_shard_file(folder: Path, entry: dict[str, Any]) -> Path:
    """The path of a manifest's shard entry, refused when the file is missing or not the one the manifest hashed."""
    path = folder / entry["file"]
    if not path.is_file():
        raise TsdkdError(f"{path}: shard missing; {REDO_SHARD}")
    if not shard_matches(folder, entry):
        raise TsdkdError(f"{path}: checksum does not match the manifest (the file is corrupt or was changed); {REDO_SHARD}")
    return path


def read_parquet(path: Path, read: Callable[[Path], T]) -> T:
    """`read(path)`, with any pyarrow error as one line: its messages can span several."""
    try:
        return read(path)
    except Exception as error:  # pyarrow's error types differ by version
        first_line = str(error).strip().partition("\n")[0]
        raise TsdkdError(f"{path}: not a readable Parquet file ({first_line}); {REDO_SHARD}") from None


def _first_bad_row(list_column: pa.ChunkedArray, bad_values: np.ndarray) -> int | None:
    """The row holding the first True of `bad_values`, a mask over the column's flattened values."""
    if not bad_values.any():
        return None
    lengths = pc.list_value_length(list_column).to_numpy(zero_copy_only=False)
    return int(np.searchsorted(np.cumsum(lengths), np.argmax(bad_values), side="right"))


def check_rows(table: pa.Table, path: Path, manifest: dict[str, Any]) -> list[tuple[int, str]]:
    """Shapes, value ranges, sortedness and the integrity of each prompt's candidate group; returns each
    group's first row and prompt id (for the check across shards)."""

    def fail(row: int, what: str) -> None:
        raise TsdkdError(f"{path} row {row}: {what}; the shard is damaged, regenerate it")

    vocab_size = manifest["tokenizer"]["vocab_size"]
    k = manifest["top_k"]
    lengths = pc.list_value_length(table["completion_token_ids"]).to_numpy(zero_copy_only=False)
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        fail(int(empty[0]), "empty completion")
    # Stage 2 reads the prediction of completion token 0 at the last prompt position.
    empty = np.flatnonzero(pc.list_value_length(table["prompt_token_ids"]).to_numpy(zero_copy_only=False) == 0)
    if empty.size:
        fail(int(empty[0]), "empty prompt")
    for name in ("behaviour_logprobs", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_mass", "teacher_entropy"):
        other = pc.list_value_length(table[name]).to_numpy(zero_copy_only=False)
        mismatch = np.flatnonzero(other != lengths)
        if mismatch.size:
            fail(int(mismatch[0]), f"{name} has {other[mismatch[0]]} positions, completion has {lengths[mismatch[0]]}")
    for name in ("teacher_topk_ids", "teacher_topk_logprobs"):
        widths = pc.list_value_length(pc.list_flatten(table[name])).to_numpy(zero_copy_only=False)
        if widths.size and (widths != k).any():
            position = int(np.argmax(widths != k))
            fail(int(np.searchsorted(np.cumsum(lengths), position, side="right")), f"{name} has width {widths[position]}, expected k={k}")

    flat = lambda name: pc.list_flatten(table[name]).to_numpy(zero_copy_only=False)  # noqa: E731
    for name in ("completion_token_ids", "prompt_token_ids"):
        row = _first_bad_row(table[name], flat(name) >= vocab_size)
        if row is not None:
            fail(row, f"{name} holds an id outside the vocabulary (size {vocab_size})")
    for name in ("behaviour_logprobs", "teacher_logprobs", "teacher_tail_mass", "teacher_entropy"):
        values = flat(name).astype(np.float32)
        bad = ~np.isfinite(values)
        if name.endswith("logprobs"):
            bad |= values > LOGPROB_SLACK
        elif name == "teacher_tail_mass":
            bad |= (values < 0) | (values > 1 + LOGPROB_SLACK)
        else:
            bad |= values < -LOGPROB_SLACK
        row = _first_bad_row(table[name], bad)
        if row is not None:
            fail(row, f"{name} holds a non-finite or out-of-range value")

    topk_ids = pc.list_flatten(pc.list_flatten(table["teacher_topk_ids"])).to_numpy(zero_copy_only=False).reshape(-1, k)
    topk_logprobs = pc.list_flatten(pc.list_flatten(table["teacher_topk_logprobs"])).to_numpy(zero_copy_only=False)
    topk_logprobs = topk_logprobs.astype(np.float32).reshape(-1, k)
    position_rows = np.repeat(np.arange(len(lengths)), lengths)
    bad_position = (topk_ids >= vocab_size).any(1) | ~np.isfinite(topk_logprobs).all(1) | (topk_logprobs > LOGPROB_SLACK).any(1)
    if bad_position.any():
        fail(int(position_rows[np.argmax(bad_position)]), "teacher top-k holds an id outside the vocabulary or a non-finite log-prob")
    unsorted = (np.diff(topk_logprobs, axis=1) > 0).any(1)
    if unsorted.any():
        fail(int(position_rows[np.argmax(unsorted)]), "teacher top-k log-probs are not sorted in descending order")
    duplicate = (np.diff(np.sort(topk_ids, axis=1), axis=1) == 0).any(1) if k > 1 else np.zeros(len(topk_ids), bool)
    if duplicate.any():
        fail(int(position_rows[np.argmax(duplicate)]), "teacher top-k repeats a token id")

    return _check_candidate_groups(table, fail, manifest["sampling"]["num_candidates"])


def _check_candidate_groups(table: pa.Table, fail: Any, num_candidates: int) -> list[tuple[int, str]]:
    prompt_ids = table["prompt_id"].to_pylist()
    candidate_index = table["candidate_index"].to_numpy()
    counts = table["num_candidates"].to_numpy()
    ranks = table["teacher_rank"].to_numpy()
    groups: list[tuple[int, str]] = []
    seen_prompts: set[str] = set()
    start = 0
    while start < len(prompt_ids):
        prompt_id = prompt_ids[start]
        if prompt_id in seen_prompts:
            fail(start, f"prompt {prompt_id} appears in more than one group or shard")
        seen_prompts.add(prompt_id)
        groups.append((start, prompt_id))
        end = start + int(counts[start])
        if counts[start] != num_candidates or end > len(prompt_ids) or any(p != prompt_id for p in prompt_ids[start:end]):
            fail(start, f"candidate group of prompt {prompt_id} is not {num_candidates} consecutive rows")
        if list(candidate_index[start:end]) != list(range(end - start)):
            fail(start, f"candidate indices of prompt {prompt_id} are not 0..{end - start - 1}")
        if sorted(ranks[start:end]) != list(range(end - start)):
            fail(start, f"teacher ranks of prompt {prompt_id} are not a permutation of 0..{end - start - 1}")
        start = end
    return groups
