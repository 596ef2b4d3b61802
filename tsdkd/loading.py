"""Loading tokenizers and model configs with one-line errors, and the GPU's bf16 support (both stages use these)."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path
from typing import Any, TypeVar

from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import is_hub_id

ConfigT = TypeVar("ConfigT")


# Files any of which lets AutoTokenizer load a tokenizer from a folder (fast, sentencepiece, BPE/WordPiece vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _looks_like_hub_id(path: str) -> bool:
    # owner/name only (fingerprint.is_hub_id also takes a bare legacy name): here a bare name is likelier a folder
    # mistyped, which "no such model folder" names.
    return path.count("/") == 1 and not path.startswith((".", "/")) and not Path(path).exists()


# A model's license and use-policy files (LICENSE, LICENSE.txt, NOTICE, USE_POLICY.md, ...), which its terms ask to pass
# on with any model made from it: a student's folder carries them.
LICENSE_FILES = ("LICENSE", "LICENCE", "NOTICE", "USE_POLICY")


def is_license_file(name: str) -> bool:
    return name.upper().startswith(LICENSE_FILES)


# What a pinned revision fetches where the hub cache lacks it: what loading a model reads, its weights as safetensors
# only (never a pickle), its card and license files (in any case) for the student's card; nothing in subfolders
# (training checkpoints, `original/` weights) nor a second copy of the weights in Mistral's own format.
REVISION_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "*.txt", "*.py", "tokenizer*", "README.md",
                  *("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in name) + "*" for name in LICENSE_FILES)]
NOT_REVISION_FILES = ["*/*", "consolidated*"]


def pinned(cfg: ConfigT) -> ConfigT:
    """`cfg` with its student and teacher (where it has them) given with a revision (`student_revision`: a branch, tag
    or commit of a hub id) replaced by that revision's snapshot folder in the hub cache, fetched there where it is
    missing and the hub can be reached: whatever loads, checks or records them then reads that one revision, as for a
    snapshot folder given by its path."""
    changes = {}
    for role in ("student", "teacher"):
        revision = getattr(cfg, f"{role}_revision", None)
        if revision is not None:
            changes.update({role: snapshot_folder(getattr(cfg, role), revision, role), f"{role}_revision": None})
    return dataclasses.replace(cfg, **changes)


def snapshot_folder(name: str, revision: str, role: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if not revision.strip():
        raise TsdkdError(f"--{role}-revision is empty; name a branch, tag or commit of --{role} {name}")
    if Path(name).expanduser().exists():
        raise TsdkdError(f"--{role}-revision {revision}: --{role} {name} is a folder, which holds one revision already; "
                         f"name a hub id, or leave out --{role}-revision")
    if not is_hub_id(name):
        raise TsdkdError(f"--{role} {name}: no such folder, and not a hub id (owner/name) that --{role}-revision could pin")
    where = f"--{role} {name} at --{role}-revision {revision}"
    try:
        return snapshot_download(name, revision=revision, allow_patterns=REVISION_FILES, ignore_patterns=NOT_REVISION_FILES)
    except LocalEntryNotFoundError:
        reason = f"not in the hub cache, and the hub cannot be reached (offline); fetch it with `hf download {name} --revision {revision}`"
    except GatedRepoError:  # before RepositoryNotFoundError, of which it is a kind
        reason = "a gated model: accept its terms on its Hub page and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        reason = "no such model on the Hub (or a private one: log in with `hf auth login`)"
    except RevisionNotFoundError:
        reason = f"{name} has no branch, tag or commit {revision!r}"
    except Exception as error:  # the network (after the library's retries), a full disk, a bad name
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = f"{type(error).__name__}: {lines[0] if lines else 'no message'}"
    raise TsdkdError(f"{where}: {reason}")


def load_tokenizer(path: str, trust_remote_code: bool, role: str) -> Any:
    """`role` names the option in error messages (student, teacher, model)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.exists() and not _looks_like_hub_id(path):
        raise TsdkdError(f"--{role} {path}: no such model folder")
    if folder.is_file():
        raise TsdkdError(f"--{role} {path} is a file; name a model folder or hub id")
    # Without these transformers' own error names no file ("Couldn't instantiate the backend tokenizer from one of: ").
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise TsdkdError(f"--{role} {path}: no tokenizer files (tokenizer.json / tokenizer_config.json); is it a model "
                         "folder? If so, save its tokenizer there with tokenizer.save_pretrained")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises OSError, ValueError, ... for a bad folder
        raise TsdkdError(f"--{role} {path}: cannot load its tokenizer ({str(error).strip().splitlines()[0]})") from None


def context_length(path: str, trust_remote_code: bool) -> int | None:
    """The model's maximum sequence length, when its config states one."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:  # as above
        raise TsdkdError(f"{path}: cannot load its config.json ({str(error).strip().splitlines()[0]})") from None
    return getattr(config, "max_position_embeddings", None)


def dtype_name(dtype: Any) -> str:
    """A torch dtype as configs and records write it: torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def gpu_has_bf16() -> bool:
    """A CUDA GPU with bf16 in hardware (Ampere or newer). torch's own check also accepts GPUs that only
    emulate it (V100, T4), where bf16 is slow in transformers and refused by vLLM."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def end_token_ids(*ids: int | list[int] | None) -> list[int]:
    """The end ids that generation configs and tokenizers give (each an id, a list of ids or None), in order, once each."""
    flat = [one for given in ids for one in ([] if given is None else [given] if isinstance(given, int) else given)]
    return list(dict.fromkeys(flat))


def padding_id(tokenizer: Any) -> int | None:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (masked out either way); None without both."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def release_memory() -> None:
    """After the last reference to a model or engine is dropped: collect it (vLLM's objects hold reference cycles,
    and collecting shuts its engine process down), then hand back what it left in this process's CUDA cache,
    before the next engine or stage-2 training starts, in this process or another on the same GPU."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
