"""`tsdkd merge`: the parts of a job split with --shard-index/--num-shards, as one dataset."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import differing_settings
from tsdkd.signals import MANIFEST_NAME, write_dataset_card, write_json_atomic
from tsdkd.validate import validate_dataset


def merge_datasets(parts: list[Path], out: Path) -> Path:
    """Checks that the parts are one job's complete, disjoint pieces, then copies their shards."""
    if out.exists():
        raise TsdkdError(f"--out {out} already exists; merge into a new folder")
    manifests = [validate_dataset(part, deep=False) for part in parts]
    first = manifests[0]
    for part, manifest in zip(parts[1:], manifests[1:]):
        # Each machine of a split job may keep the models under another path.
        differing = differing_settings(first["settings"], manifest["settings"], ignore=("job",))
        if differing:
            # Distill trains on several datasets of one top-k width and one kind of teacher entropy (the backend's).
            trainable_together = not {"top_k", "backend_name"} & set(differing)
            hint = "; to train on several datasets, give each to `tsdkd distill` with a --signals of its own" \
                if trainable_together else ""
            raise TsdkdError(f"{part}: made with other settings than {parts[0]} (differs in: {', '.join(differing)}); merge "
                             f"joins the parts of one split job{hint}")
        if manifest["tokenizer"] != first["tokenizer"]:
            raise TsdkdError(f"{part}: tokenizer differs from {parts[0]}'s")
    num_shards = first["job"]["num_shards"]
    if any(m["job"]["num_shards"] != num_shards for m in manifests):
        jobs = "; ".join(f"{part}: part {m['job']['shard_index'] + 1} of {m['job']['num_shards']}" for part, m in zip(parts, manifests))
        raise TsdkdError(f"the datasets come from jobs split in different ways ({jobs}); merge the parts of one split job")
    indices = sorted(m["job"]["shard_index"] for m in manifests)
    repeated = [index for index, count in Counter(indices).items() if count > 1]
    if repeated:
        given = [str(part) for part, m in zip(parts, manifests) if m["job"]["shard_index"] == repeated[0]]
        raise TsdkdError(f"{' and '.join(given)} are the same part of the job ({repeated[0] + 1} of {num_shards}); give each "
                         "part once")
    if indices != list(range(num_shards)):
        raise TsdkdError(
            f"the parts cover job shards {indices} of {num_shards}; merge needs each of 0..{num_shards - 1} exactly once"
        )
    staging = out.with_name(f".{out.name}.merging")
    shutil.rmtree(staging, ignore_errors=True)
    shards: list[dict[str, Any]] = []
    try:
        (staging / "data").mkdir(parents=True)
        for part, manifest in zip(parts, manifests):
            for entry in manifest["shards"]:
                shutil.copy2(part / entry["file"], staging / entry["file"])
                shards.append(entry)
    except OSError as error:  # --out under a file or an unwritable folder, a full disk
        shutil.rmtree(staging, ignore_errors=True)
        raise TsdkdError(f"--out {out}: cannot write the merged dataset there ({error.strerror}); "
                         "choose a writable folder") from None
    merged = {**first, "shards": sorted(shards, key=lambda e: e["index"]), "job": {"shard_index": 0, "num_shards": 1},
              "merged_from": [str(p) for p in parts]}
    merged["settings"] = {**first["settings"], "job": merged["job"]}
    merged["stats"] = {key: sum(m["stats"][key] for m in manifests) for key in ("prompts", "candidates", "completion_tokens", "bytes")}
    merged["stats"]["bytes_per_completion_token"] = round(merged["stats"]["bytes"] / max(merged["stats"]["completion_tokens"], 1), 2)
    write_dataset_card(staging, merged)
    write_json_atomic(merged, staging / MANIFEST_NAME)
    staging.rename(out)
    validate_dataset(out, deep=False)
    print(f"{out}: merged {len(parts)} parts, {len(shards)} shards, {merged['stats']['candidates']} candidates")
    return out
