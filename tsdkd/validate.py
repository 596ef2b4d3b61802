"""Every check a signal dataset must pass before a day of training is spent on it."""

from __future__ import annotations

import math
import os
import reprlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import sha256_file
from tsdkd.ranking import teacher_ranks
from tsdkd.signals import MANIFEST_NAME, SHARD_FILE_NAME, TEACHER_ENTROPY_KINDS, read_manifest, signal_schema

T = TypeVar("T")

# float16 storage rounds a log-prob of 0 to at most this much above 0.
LOGPROB_SLACK = 1e-3
# How far the top-k probabilities plus the tail mass may sum from 1: float16 rounding moves each log-prob by a
# relative 2^-11, so the top-k sum by at most 2^-11 sum_i p_i |log p_i| <= 2^-11 log k, and the tail by 2^-11 of
# itself: under 1e-2 for any vocabulary below 10^8 tokens.
MASS_SLACK = 1e-2
# Columns that may hold nulls (no gold answer; no verdict).
NULLABLE_COLUMNS = ("gold_answer", "verified")
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
    """Every field tsdkd reads from the manifest at `path` is there, with its type (and the enumerations' values)."""
    _check_types(manifest, MANIFEST_FIELDS, path)
    for name, value, least in (("top_k", manifest["top_k"], 1), ("sampling.num_candidates", manifest["sampling"]["num_candidates"], 1),
                               ("round", manifest["round"], 0)):
        if value < least:
            raise TsdkdError(f"{path}: {name} is {value}, expected at least {least}; the manifest was edited, restore it or "
                             "regenerate the dataset")
    if manifest["teacher_entropy"] not in TEACHER_ENTROPY_KINDS:
        # Stage 2 measures the student's entropy to match: a wrong value changes the token weights without a word.
        raise TsdkdError(f"{path}: teacher_entropy is {manifest['teacher_entropy']!r}, expected one of "
                         f"{', '.join(TEACHER_ENTROPY_KINDS)}; the manifest was edited, restore it or regenerate the dataset")
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
    check_shard_names(manifest, folder)
    strays = stray_shards(folder, manifest)
    if strays:
        missing = [entry for entry in manifest["shards"] if not (folder / entry["file"]).is_file()]
        if missing:  # most likely renamed: removing the stray would lose the shard
            raise TsdkdError(f"{folder}: shard {missing[0]['file']} is missing and {strays[0]}, not in the manifest, is "
                             f"there; if it is that shard renamed, give it back its name, else remove it")
        raise TsdkdError(f"{folder}: shard {strays[0]} is not in the manifest; if the manifest's shards list was edited, "
                         "restore its entry, else remove the file")
    schema = signal_schema(manifest["tokenizer"]["vocab_size"])

    def check_shard(entry: dict[str, Any]) -> ShardContents:
        path = checked_shard_file(folder, entry)
        rows = read_parquet(path, lambda p: pq.ParquetFile(p).metadata.num_rows)
        if rows != entry["rows"]:
            raise TsdkdError(f"{path}: {rows} rows, the manifest says {entry['rows']}")
        if path.stat().st_size != entry["bytes"]:
            _edited(folder, f"the entry of {entry['file']} says bytes {entry['bytes']}, the file has {path.stat().st_size}")
        if not deep:
            return ShardContents([], 0)
        table = read_parquet(path, pq.read_table)
        check_schema(table.schema, schema, path, manifest["format_version"])
        contents = check_rows(table, path, manifest)
        for key, found in (("prompts", len(contents.groups)), ("completion_tokens", contents.completion_tokens)):
            if entry[key] != found:
                _edited(folder, f"the entry of {entry['file']} says {key} {entry[key]}, the shard holds {found}")
        return contents

    # Shards are checked side by side (reading, hashing and numpy release the GIL). map yields them in
    # manifest order and each is checked against the earlier ones' prompts before the next is taken, so the
    # first bad shard in that order is the one reported.
    seen_prompts: set[str] = set()
    with ThreadPoolExecutor(max_workers=min(VALIDATION_THREADS, usable_cores())) as pool:
        for entry, contents in zip(manifest["shards"], pool.map(check_shard, manifest["shards"])):
            for row, prompt_id in contents.groups:
                if prompt_id in seen_prompts:
                    raise TsdkdError(f"{folder / entry['file']} row {row}: prompt {prompt_id} appears in more than one "
                                     "group or shard; the shard is damaged, regenerate it")
                seen_prompts.add(prompt_id)
    # Each shard was checked against its entry above, so this catches edited stats.
    for key in ("candidates", "prompts", "completion_tokens", "bytes") if deep else ("candidates", "bytes"):
        total = sum(entry["rows" if key == "candidates" else key] for entry in manifest["shards"])
        if total != manifest["stats"][key]:
            _edited(folder, f"stats.{key} is {manifest['stats'][key]}, the shards hold {total}")
    return manifest


class ShardContents(NamedTuple):
    groups: list[tuple[int, str]]  # each prompt group's first row and prompt id
    completion_tokens: int


def _edited(folder: Path, what: str) -> None:
    raise TsdkdError(f"{folder / MANIFEST_NAME}: {what}; the manifest or a shard was edited, restore it or regenerate the dataset")


def stray_shards(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """The shard files in the dataset's data/ that its manifest does not list (`load_dataset` would read them)."""
    on_disk = {str(path.relative_to(folder)) for path in (folder / "data").glob("*.parquet")}
    return sorted(on_disk - {entry["file"] for entry in manifest["shards"]})


def check_shard_names(manifest: dict[str, Any], folder: Path) -> None:
    """Shard i of a job of n is data/train-i-of-n.parquet, the Hub's split naming that `load_dataset` finds (another
    name would be left out, one outside the folder not found)."""
    counts = set()
    for entry in manifest["shards"]:
        match = SHARD_FILE_NAME.fullmatch(entry["file"])
        if not match or int(match[1]) != entry["index"] or int(match[1]) >= int(match[2]):
            _edited(folder, f"shard {entry['index']} is named {entry['file']!r}, not data/train-{entry['index']:05d}-of-NNNNN.parquet")
        counts.add(match[2])
    if len(counts) > 1:
        _edited(folder, f"the shard names count different totals ({', '.join(sorted(counts))})")


def check_schema(found: pa.Schema, expected: pa.Schema, path: Path, version: int) -> None:
    """The shard's columns, in order and with their types, are format v`version`'s; else names the first difference."""
    if [(field.name, field.type) for field in found] == [(field.name, field.type) for field in expected]:
        return  # nullability aside: nulls are checked value by value
    expected_types = {field.name: field.type for field in expected}
    for field in found:
        if field.name not in expected_types:
            problem = f"column {field.name!r} is not in the format"
            break
        if field.type != expected_types[field.name]:
            problem = f"column {field.name} is {field.type}, expected {expected_types[field.name]}"
            break
    else:
        missing = [name for name in expected_types if name not in found.names]
        problem = f"column {missing[0]} is missing" if missing else f"columns are in another order (expected {', '.join(expected.names)})"
    raise TsdkdError(f"{path}: {problem} (format v{version}); regenerate the shard, or cast it to the format's schema "
                     "(`tsdkd.signals.signal_schema`) and update its sha256 and bytes in the manifest")


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
    if sha256_file(path) != entry["sha256"]:
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


def _first_null(array: pa.Array) -> int | None:
    """The index of the first element of `array` that is null or holds a null at any depth (lists, structs)."""
    if array.null_count:
        return int(np.argmax(array.is_null().to_numpy(zero_copy_only=False)))
    if pa.types.is_list(array.type):
        inner = _first_null(array.flatten())  # flatten respects a sliced array's offsets
        return None if inner is None else int(pc.list_parent_indices(array)[inner].as_py())
    if pa.types.is_struct(array.type):
        found = [index for index in map(_first_null, array.flatten()) if index is not None]
        return min(found, default=None)
    return None


def check_rows(table: pa.Table, path: Path, manifest: dict[str, Any]) -> ShardContents:
    """No nulls (but where the format allows them), shapes, value ranges, sortedness, the teacher's probabilities
    summing to 1, scores and ranks as the format defines them, and the integrity of each prompt's candidate group.
    Returns each group's first row and prompt id (for the check across shards) and the completion tokens."""

    def fail(row: int, what: str, manifest_key: str | None = None) -> None:
        # The shard is the file the manifest hashed (checked before): a value at odds with one of the manifest's own
        # settings points to that setting edited; any other, to data written wrong.
        cause = (f"the shard matches its checksum, so the manifest's {manifest_key} was likely edited: restore it, else "
                 "regenerate the dataset") if manifest_key else "the shard was written wrong: regenerate it"
        raise TsdkdError(f"{path} row {row}: {what}; {cause}")

    for name in table.column_names:
        rows_before = 0
        for chunk in [] if name in NULLABLE_COLUMNS else table[name].chunks:  # chunk by chunk: no copy of the column
            row = _first_null(chunk)
            if row is not None:
                fail(rows_before + row, f"{name} is or holds a null")
            rows_before += len(chunk)
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
            fail(int(np.searchsorted(np.cumsum(lengths), position, side="right")), f"{name} has width {widths[position]}, expected k={k}",
                 "top_k")

    flat = lambda name: pc.list_flatten(table[name]).to_numpy(zero_copy_only=False)  # noqa: E731
    for name in ("completion_token_ids", "prompt_token_ids"):
        ids = flat(name)  # uint16 or int32 as stored: both compare right, a wider copy would only cost memory
        row = _first_bad_row(table[name], (ids < 0) | (ids >= vocab_size))
        if row is not None:
            fail(row, f"{name} holds an id outside the vocabulary (0..{vocab_size - 1})", "tokenizer.vocab_size")
    per_token = {name: flat(name) for name in ("behaviour_logprobs", "teacher_logprobs", "teacher_tail_mass", "teacher_entropy")}
    for name, stored in per_token.items():
        values = stored.astype(np.float32)
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
    outside = ((topk_ids < 0) | (topk_ids >= vocab_size)).any(1)
    if outside.any():
        fail(int(position_rows[np.argmax(outside)]), f"teacher top-k holds an id outside the vocabulary (0..{vocab_size - 1})",
             "tokenizer.vocab_size")
    bad_position = ~np.isfinite(topk_logprobs).all(1) | (topk_logprobs > LOGPROB_SLACK).any(1)
    if bad_position.any():
        fail(int(position_rows[np.argmax(bad_position)]), "teacher top-k holds a log-prob that is not finite or above 0")
    unsorted = (np.diff(topk_logprobs, axis=1) > 0).any(1)
    if unsorted.any():
        fail(int(position_rows[np.argmax(unsorted)]), "teacher top-k log-probs are not sorted in descending order")
    duplicate = (np.diff(np.sort(topk_ids, axis=1), axis=1) == 0).any(1) if k > 1 else np.zeros(len(topk_ids), bool)
    if duplicate.any():
        fail(int(position_rows[np.argmax(duplicate)]), "teacher top-k repeats a token id")
    # The distillation targets are these k probabilities and the tail: a set that is no distribution (top-k
    # renormalised while a tail is kept, log-probs at another temperature) would train on wrong targets.
    mass = np.exp(topk_logprobs.astype(np.float64)).sum(1) + per_token["teacher_tail_mass"].astype(np.float64)
    off = np.flatnonzero(np.abs(mass - 1) > MASS_SLACK)
    if off.size:
        fail(int(position_rows[off[0]]), f"teacher top-k probabilities and tail mass sum to {mass[off[0]]:.4f} at a position, not 1")
    _check_teacher_entropy(table, fail, manifest, per_token["teacher_entropy"].astype(np.float64), position_rows)
    _check_scores(table, fail, per_token["teacher_logprobs"].astype(np.float64), lengths)
    return ShardContents(_check_candidate_groups(table, fail, manifest["sampling"]["num_candidates"]), int(lengths.sum()))


def _check_teacher_entropy(table: pa.Table, fail: Any, manifest: dict[str, Any], entropy: np.ndarray, position_rows: np.ndarray) -> None:
    """Each row's kind of entropy is the manifest's, and no entropy exceeds the largest that kind can take."""
    exact = table["teacher_entropy_exact"].to_numpy(zero_copy_only=False)
    other_kind = np.flatnonzero(exact != (manifest["teacher_entropy"] == "exact"))
    if other_kind.size:
        fail(int(other_kind[0]), f"teacher_entropy_exact is {bool(exact[other_kind[0]])} while the manifest's teacher_entropy "
             f"is {manifest['teacher_entropy']}", "teacher_entropy")
    # Exact: over the vocabulary, at most log V; estimated: over k + 1 buckets, at most log(k + 1).
    most = math.log(manifest["tokenizer"]["vocab_size"] if manifest["teacher_entropy"] == "exact" else manifest["top_k"] + 1)
    too_large = entropy > most * (1 + 2**-10) + LOGPROB_SLACK  # float16 rounding
    if too_large.any():
        fail(int(position_rows[np.argmax(too_large)]), f"teacher_entropy {entropy[np.argmax(too_large)]:.4g} exceeds "
             f"{most:.4g} nats, the most an entropy of kind {manifest['teacher_entropy']} can be")


def _check_scores(table: pa.Table, fail: Any, teacher_logprobs: np.ndarray, lengths: np.ndarray) -> None:
    """teacher_score is the mean of the row's teacher_logprobs (float32 rounding allowed)."""
    scores = table["teacher_score"].to_numpy(zero_copy_only=False).astype(np.float64)
    means = np.add.reduceat(teacher_logprobs, np.cumsum(lengths) - lengths) / lengths if len(lengths) else scores
    wrong = ~np.isfinite(scores) | (np.abs(scores - means) > 1e-4 * np.abs(means) + 1e-5)
    if wrong.any():
        row = int(np.argmax(wrong))
        fail(row, f"teacher_score {scores[row]:.6g} is not the mean of its teacher_logprobs ({means[row]:.6g})")


def _check_candidate_groups(table: pa.Table, fail: Any, num_candidates: int) -> list[tuple[int, str]]:
    prompt_ids = table["prompt_id"].to_pylist()
    candidate_index = table["candidate_index"].to_numpy()
    counts = table["num_candidates"].to_numpy()
    ranks = table["teacher_rank"].to_numpy()
    scores = table["teacher_score"].to_numpy().astype(np.float64)
    verified = table["verified"].to_pylist()
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
        if counts[start] != num_candidates:
            fail(start, f"candidate group of prompt {prompt_id} has num_candidates {counts[start]}, the manifest "
                 f"{num_candidates}", "sampling.num_candidates")
        if end > len(prompt_ids) or any(p != prompt_id for p in prompt_ids[start:end]):
            fail(start, f"candidate group of prompt {prompt_id} is not {num_candidates} consecutive rows")
        if list(candidate_index[start:end]) != list(range(end - start)):
            fail(start, f"candidate indices of prompt {prompt_id} are not 0..{end - start - 1}")
        if sorted(ranks[start:end]) != list(range(end - start)):
            fail(start, f"teacher ranks of prompt {prompt_id} are not a permutation of 0..{end - start - 1}")
        expected = teacher_ranks(list(scores[start:end]), verified[start:end])
        if list(ranks[start:end]) != expected:
            fail(start, f"teacher ranks of prompt {prompt_id} are {ranks[start:end].tolist()}, the format's order of its verdicts "
                 f"and scores gives {expected}")
        start = end
    return groups
