"""Content hashes that tie a signal dataset to the tokenizer, models and prompts that made it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tsdkd.errors import TsdkdError

# Weights above this size are identified by file names and sizes only (but in the hub cache, whose file names are their
# hashes): hashing 30 GB of a 14B teacher would cost minutes on every run.
WEIGHTS_HASH_LIMIT_BYTES = 2 * 1024**3


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(value: Any) -> str:
    return sha256_bytes(json.dumps(value, sort_keys=True, ensure_ascii=False).encode())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Vocabulary, special tokens and chat template: what decides the token ids a dataset holds."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special_tokens = {
        name: getattr(tokenizer, name, None)
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    chat_template = getattr(tokenizer, "chat_template", None)
    token_part = {"vocab": vocab, "special_tokens": special_tokens}
    return {
        "sha256": sha256_json({**token_part, "chat_template": chat_template}),
        "vocab_sha256": sha256_json(token_part),
        "vocab_size": len(tokenizer),
        "special_tokens": special_tokens,
        "chat_template_sha256": sha256_bytes((chat_template or "").encode()),
    }


def model_identity(path_or_id: str, trust_remote_code: bool = False, revision: str | None = None) -> dict[str, Any]:
    """Path or hub id, revision, config hash and a hash of the weights: of a local folder's safetensors files (up to
    WEIGHTS_HASH_LIMIT_BYTES, at any size for a hub cache snapshot's, from their blob names; always their names and
    sizes too), of a hub model's from the hub cache (hub_weights_sha256)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path_or_id, revision=revision, trust_remote_code=trust_remote_code).to_dict()
    except Exception as error:  # transformers raises OSError, ValueError, ... for a bad folder
        raise TsdkdError(f"{path_or_id}: cannot load its config.json ({str(error).strip().splitlines()[0]})") from None
    for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    identity: dict[str, Any] = {
        "name_or_path": path_or_id,
        "revision": revision,
        "config_sha256": sha256_json(config),
        "weights_sha256": None,
    }
    folder = Path(path_or_id)
    if not folder.is_dir():
        identity["weights_sha256"] = hub_weights_sha256(path_or_id, revision)
        return identity
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise TsdkdError(f"{folder}: no .safetensors weights; tsdkd loads safetensors only (convert with save_pretrained)")
    # A hub snapshot folder's weights link to blobs named by their sha256: hashed at any size, unread.
    identity["weights_sha256"] = weights_sha256([(file.name, file) for file in weights])
    # Sizes as well: against a record of sizes only (weights once too large to hash), they still tell other weights.
    # Lists, as a record read back from JSON holds them.
    identity["weights_files"] = [[file.name, file.stat().st_size] for file in weights]
    return identity


def is_hub_id(name_or_path: str) -> bool:
    """Whether a model named on the command line is a hub id (`owner/name`, or a bare legacy `name`; nothing of that
    name here), not a path."""
    return not Path(name_or_path).exists() and len(name_or_path.split("/")) <= 2 and not name_or_path.startswith(("/", ".", "~"))


def hub_snapshot(path: str) -> tuple[str, str] | None:
    """(hub id, commit) of a snapshot folder of the hub cache (.../models--owner--name/snapshots/<commit>, what one
    passes to pin a revision), else None."""
    parts = Path(path).expanduser().resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/"), parts[-1]
    return None


def hub_file(repo_id: str, name: str, revision: str | None = None) -> Path | None:
    """A file of a hub model where the hub cache has it, else None. Never fetched: a check must not download a
    teacher's weights before it refuses, nor wait for each file on a network that is not there."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, name, revision=revision)
    return Path(path) if isinstance(path, str) else None  # None, or a marker of a file known to be missing


def hub_weights_sha256(repo_id: str, revision: str | None) -> str | None:
    """A hub model's weights hash from the hub cache, as a local folder's would be: over the shards its index names,
    else model.safetensors. The cache names each file by its sha256, so none is read; copies (a cache without
    symlinks) are hashed, up to WEIGHTS_HASH_LIMIT_BYTES in all. None where they are not all in the cache (a first
    run, before the model was ever loaded): such a record counts by name and config."""
    index = hub_file(repo_id, "model.safetensors.index.json", revision)
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index else ["model.safetensors"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    files = [hub_file(repo_id, name, revision) for name in names]
    return weights_sha256(list(zip(names, files))) if all(files) else None


def weights_sha256(files: list[tuple[str, Path]]) -> str | None:
    """sha256_json of [file name, file sha256] of weight files: from their hub blob names where every file has one (at
    any size, none read), else read, up to WEIGHTS_HASH_LIMIT_BYTES in all; None above it."""
    digests = [hub_blob_sha256(path) for _, path in files]
    if not all(digests):
        if sum(path.stat().st_size for _, path in files) > WEIGHTS_HASH_LIMIT_BYTES:
            return None
        digests = [digest or sha256_file(path) for (_, path), digest in zip(files, digests)]
    return sha256_json([(name, digest) for (name, _), digest in zip(files, digests)])


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 of a file in the hub cache, a link to blobs/<its sha256> (files in git LFS, as weights are); else None."""
    target = Path(os.path.realpath(path))
    is_sha256 = len(target.name) == 64 and all(c in "0123456789abcdef" for c in target.name)
    return target.name if target.parent.name == "blobs" and is_sha256 else None


def local_path(path_or_id: str) -> str:
    """A local file or folder's absolute real path (the same one however it is named); anything else, such as a
    hub id, as it is."""
    return os.path.realpath(path_or_id) if path_or_id and Path(path_or_id).exists() else path_or_id


def with_real_paths(settings: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """`settings` with the values at `keys` (a path, or a list of paths) as `local_path`s: the same settings
    however the files are named."""
    def real(value: Any) -> Any:
        if isinstance(value, list):
            return [local_path(item) if isinstance(item, str) else item for item in value]
        return local_path(value) if isinstance(value, str) else value

    return {**settings, **{key: real(settings[key]) for key in keys if key in settings}}


_noted_unchecked: set[str] = set()  # said once per model and process (a run's rounds ask again)


def note_unchecked_weights(recorded: dict[str, Any], current: dict[str, Any], made: str) -> None:
    """Says when a hub model whose weights `recorded` hashed cannot be hashed now (same_model then went by name and
    config): new weights pushed to its branch since would go unnoticed. `made`: what the record made."""
    name = current["name_or_path"]
    if recorded.get("weights_sha256") and not current.get("weights_sha256") and is_hub_id(name) and \
            same_name(recorded, current) and name not in _noted_unchecked:
        _noted_unchecked.add(name)
        print(f"note: {name}'s weights could not be read from the hub cache (not downloaded yet, or copies above "
              f"2 GiB), so they were not checked against those {made} was made with (new ones pushed to its branch "
              "would go unnoticed); pin a revision (--student-revision / --teacher-revision, or its snapshot folder) to check them")


def same_name(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two `model_identity` records name one model: one hub id, or one local folder by its real path."""
    return local_path(recorded.get("name_or_path")) == local_path(current.get("name_or_path"))


def same_model(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two `model_identity` records are one model. Where both hashed their weights, the name does not
    count (a folder moved, or named by a relative path or a link, is the same model); otherwise a local folder
    counts by its real path, a hub id by itself (its weights may not have been downloaded for one record)."""
    hashed = bool(recorded.get("weights_sha256") and current.get("weights_sha256"))
    # Sizes where both records have them (records made before local folders always kept them may lack them).
    sized = "weights_files" in recorded and "weights_files" in current
    others = (recorded.keys() | current.keys()) - {"name_or_path", *(() if hashed else ("weights_sha256",)),
                                                   *(() if sized else ("weights_files",))}
    return (hashed or same_name(recorded, current)) and all(recorded.get(key) == current.get(key) for key in others)


def differing_settings(recorded: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys of a dataset's `settings` (but `ignore`) whose values differ, the models compared by `same_model`."""
    keys = [key for key in [*current, *(key for key in recorded if key not in current)] if key not in ignore]
    return [key for key in keys if not (same_model(recorded.get(key) or {}, current.get(key) or {}) if key in ("student", "teacher")
                                       else recorded.get(key) == current.get(key))]


def source_fingerprint(path: Path) -> str:
    """Hash of a prompt file, or of every file in a dataset folder but hidden ones (a Hub download's `.cache/`
    records its own download times; the card, which may name the data files, counts)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return sha256_json([(str(p.relative_to(path)), sha256_file(p)) for p in files])
    return sha256_file(path)
