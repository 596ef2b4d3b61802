"""Reading prompt files (jsonl, json, parquet, csv, a saved `datasets` folder) into prompt records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import sha256_json

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Field names tried when none is given: plain files, GSM8K (question/answer), MATH (problem/solution).
PROMPT_FIELDS = ("prompt", "messages", "question", "problem")
ANSWER_FIELDS = ("answer", "solution")


@dataclass
class PromptRecord:
    """One prompt as chat messages, with its row in the source file and its gold answer."""

    row: int
    messages: list[dict[str, str]]
    gold_answer: str | None

    @property
    def prompt_id(self) -> str:
        """Content hash: the same messages get the same id in every run and on every machine."""
        return sha256_json(self.messages)[:16]


def load_table(path: Path) -> Any:
    """The rows of a prompt file or saved dataset, as a `datasets.Dataset`."""
    import datasets

    if not path.exists():
        raise TsdkdError(f"prompt file {path} not found")
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise TsdkdError(f"{path}: a saved DatasetDict needs a 'train' split, found {list(loaded)}")
                loaded = loaded["train"]
            return loaded
        builder = FILE_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise TsdkdError(f"{path}: unknown prompt file type {path.suffix!r}; use .jsonl, .json, .parquet, .csv or a saved datasets folder")
        return datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True)
    except TsdkdError:
        raise
    except Exception as error:  # datasets/pyarrow raise many types for unreadable files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TsdkdError(f"{path}: cannot read prompts ({first_line})") from None


def as_messages(value: Any, path: Path, row: int, field: str) -> list[dict[str, str]]:
    """A plain prompt becomes one user message; a message list is checked and kept."""
    if isinstance(value, str):
        if not value.strip():
            raise TsdkdError(f"{path} row {row}: field {field!r} is empty; remove the row or fill it in")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        if not any(m["content"].strip() for m in value):
            raise TsdkdError(f"{path} row {row}: field {field!r} has only empty messages")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise TsdkdError(
        f"{path} row {row}: field {field!r} must be a string or a list of {{role, content}} messages, got {type(value).__name__}"
    )


def load_prompts(path: Path, prompt_field: str | None, answer_field: str | None, limit: int | None) -> list[PromptRecord]:
    """Prompt records in file order. A field left None is the first of PROMPT_FIELDS / ANSWER_FIELDS
    the file has (no gold answer when it has none of the latter)."""
    table = load_table(path)
    columns = list(table.column_names)
    if prompt_field is None:
        prompt_field = next((f for f in PROMPT_FIELDS if f in columns), None)
        if prompt_field is None:
            raise TsdkdError(f"{path}: none of the fields {', '.join(PROMPT_FIELDS)} (fields: {', '.join(columns)}); pass --prompt-field")
    if prompt_field not in columns:
        raise TsdkdError(f"{path}: no field {prompt_field!r} (fields: {', '.join(columns)}); pass --prompt-field")
    if answer_field is not None and answer_field not in columns:
        raise TsdkdError(f"{path}: no field {answer_field!r} (fields: {', '.join(columns)}); pass --answer-field")
    if answer_field is None:
        answer_field = next((f for f in ANSWER_FIELDS if f in columns), None)
    if len(table) == 0:
        raise TsdkdError(f"{path}: the prompt file has no rows")
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    records = []
    for row, item in enumerate(table):
        answer = item.get(answer_field) if answer_field else None
        records.append(
            PromptRecord(
                row=row,
                messages=as_messages(item[prompt_field], path, row, prompt_field),
                gold_answer=None if answer is None else str(answer),
            )
        )
    return records


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], where: str) -> list[int]:
    """Token ids of the prompt under the tokenizer's chat template, generation prompt included;
    `where` (file and row) names the prompt in errors."""
    if tokenizer.chat_template:
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # jinja raises TemplateError, or anything the template itself raises
            raise TsdkdError(f"{where}: the chat template refuses these messages ({error}); fix the roles or their order") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(message["content"] for message in messages)
    return list(tokenizer(text)["input_ids"])
