"""`tsdkd inspect`: what a signal dataset holds, in numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tsdkd.validate import checked_shard_file, read_checked_manifest, read_parquet, stray_shards

COLUMNS = ["completion_token_ids", "teacher_score", "teacher_rank", "teacher_entropy", "finish_reason", "verified"]


def _quantiles(values: np.ndarray, whole: bool = False) -> str:
    """Min, p10, median, p90, max and mean; `whole` numbers (token counts) as the observed integers."""
    if values.size == 0:
        return "-"
    q = np.quantile(values, [0.0, 0.1, 0.5, 0.9, 1.0], method="inverted_cdf" if whole else "linear")
    digits = ".0f" if whole else ".3f"
    return (f"min {q[0]:{digits}}  p10 {q[1]:{digits}}  median {q[2]:{digits}}  p90 {q[3]:{digits}}  max {q[4]:{digits}}  "
            f"mean {values.mean():{'.1f' if whole else '.3f'}}")


def _read_shard(folder: Path, entry: dict[str, Any]) -> pa.Table:
    """The columns inspect needs, from a shard that matches its manifest entry: a damaged shard can still
    parse, and its numbers would be wrong without a word."""
    return read_parquet(checked_shard_file(folder, entry), lambda p: pq.read_table(p, columns=COLUMNS))


def summarize(folder: Path) -> str:
    """The numbers `tsdkd inspect` prints, one line each; refuses a dataset whose shards differ from its manifest."""
    manifest = read_checked_manifest(folder)
    files = [folder / entry["file"] for entry in manifest["shards"]]
    tables = [_read_shard(folder, entry) for entry in manifest["shards"]]
    lengths = np.concatenate([pc.list_value_length(t["completion_token_ids"]).to_numpy() for t in tables]) if tables else np.zeros(0)
    scores = np.concatenate([t["teacher_score"].to_numpy() for t in tables]) if tables else np.zeros(0)
    ranks = np.concatenate([t["teacher_rank"].to_numpy() for t in tables]) if tables else np.zeros(0)
    entropy = np.concatenate([pc.list_flatten(t["teacher_entropy"]).to_numpy().astype(np.float32) for t in tables]) if tables else np.zeros(0)
    stopped = sum(pc.sum(pc.equal(t["finish_reason"], "stop")).as_py() or 0 for t in tables)
    verdicts = [v for t in tables for v in t["verified"].to_pylist() if v is not None]
    total_bytes = sum(path.stat().st_size for path in files)
    tokens = int(lengths.sum())
    sampling = manifest["sampling"]
    best_scores = scores[ranks == 0] if scores.size else scores
    lines = [
        f"dataset        {folder}  ({manifest['format']} v{manifest['format_version']}, round {manifest['round']}, "
        f"{'complete' if manifest.get('complete') else 'INCOMPLETE'})",
        f"student        {manifest['student']['name_or_path']}",
        f"teacher        {manifest['teacher']['name_or_path']}",
        f"backend        {manifest['backend']['name']} {manifest['backend']['version']}  dtype {manifest['backend']['dtype']}",
        f"sampling       N={sampling['num_candidates']}  temperature {sampling['temperature']}  top-p {sampling['top_p']}  "
        f"max new tokens {sampling['max_new_tokens']}  seed {sampling['seed']}  top-k {manifest['top_k']}",
        f"shards         {len(files)}",
        f"prompts        {len(lengths) // max(sampling['num_candidates'], 1)}",
        f"candidates     {len(lengths)}  ({stopped} ended with EOS, {len(lengths) - stopped} hit max new tokens)",
        f"tokens         {tokens} completion tokens; length {_quantiles(lengths, whole=True)}",
        f"size           {total_bytes} bytes; {total_bytes / max(tokens, 1):.1f} bytes per completion token",
        f"teacher score  {_quantiles(scores)} (mean log-prob per token)",
        f"best candidate {_quantiles(best_scores)} (score of rank 0)",
        f"teacher H_T    {_quantiles(entropy)} nats ({manifest['teacher_entropy']})",
    ]
    if verdicts:
        lines.append(f"verified       {sum(verdicts)} of {len(verdicts)} candidates correct ({100 * sum(verdicts) / len(verdicts):.1f}%)")
    strays = stray_shards(folder, manifest)
    if strays:
        # `load_dataset` reads every shard the card's glob finds, these too; `tsdkd validate` refuses them.
        lines.append(f"NOTE           {len(strays)} shard file(s) not in the manifest ({', '.join(strays)}): left out here, "
                     "read by `load_dataset`; remove them")
    return "\n".join(lines)
