"""Reading prompt files (jsonl, json, parquet, csv, a saved `datasets` folder, a dataset folder as the Hub lays it
out) into prompt records."""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsdkd.answers import unmarked_solution
from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import sha256_json

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Field names tried when none is given: plain files, GSM8K (question/answer), MATH (problem/solution).
PROMPT_FIELDS = ("prompt", "messages", "question", "problem")
ANSWER_FIELDS = ("answer", "solution")


@dataclass
class PromptRecord:
    """One prompt as chat messages, with its row in the source file and its gold answer."""

    row: int  # 0-based, in file order
    where: str  # the file and its line (JSON Lines) or 1-based row, as errors name it
    messages: list[dict[str, str]]
    gold_answer: str | None  # None: none given, or only whitespace

    @property
    def prompt_id(self) -> str:
        """Content hash: the same messages get the same id in every run and on every machine."""
        return sha256_json(self.messages)[:16]


def read_text(path: Path) -> str:
    """The contents of a text prompt file; refuses one that is not UTF-8 or holds nothing."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TsdkdError(f"{path}: cannot read it ({error.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line = data.count(b"\n", 0, error.start) + 1
        column = len(data[line_start : error.start].decode("utf-8")) + 1  # the bytes before the bad one are valid
        raise TsdkdError(f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at line {line} column {column}); "
                         "save the file as UTF-8") from None
    if not text.strip():
        raise TsdkdError(f"{path}: the file holds no prompts")
    return text


def json_problem(text: str) -> str | None:
    """Where a JSON or JSON Lines file stops parsing, with 1-based lines: the library's positions count from
    the start of the block it was reading, or not at all. None when Python's parser finds no fault."""
    text = text.removeprefix("\ufeff")  # the library reads a byte-order mark as part of the encoding, not as text
    if text.lstrip().startswith("["):  # one array of records
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            return f"line {error.lineno} column {error.colno}: {error.msg}"
        return None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {number} column {error.colno}: {error.msg}"
        if not isinstance(value, dict):
            return f"line {number}: a JSON {type(value).__name__}, expected an object of fields"
    return None


def library_reason(error: BaseException) -> str:
    """The first line of the parser's own message: `datasets` wraps it in one that names no file or position."""
    from datasets.exceptions import DatasetGenerationError

    while isinstance(error, DatasetGenerationError) and error.__cause__ is not None:
        error = error.__cause__
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def load_table(path: Path, split: str = "train") -> tuple[Any, str | None]:
    """The rows of a prompt file, or of a dataset folder's `split` (its only one, if it has one), as a
    `datasets.Dataset`, and the text of a text file."""
    import datasets

    if not path.exists():
        raise TsdkdError(f"prompt file {path} not found")
    datasets.disable_progress_bars()
    if path.is_dir():
        try:
            return load_folder(path, split), None
        except TsdkdError:
            raise
        except Exception as error:  # datasets/pyarrow raise many types for unreadable folders
            # Read from the library's message (were it reworded, the generic line below would be given).
            if "Config name is missing" in str(error):
                configs = re.search(r"available configs: \[(.*?)\]", str(error))
                raise TsdkdError(f"{path}: a dataset of several configs ({configs[1] if configs else 'see its card'}); "
                                 "give the data file or folder of the one to use instead (the card names them)") from None
            raise TsdkdError(f"{path}: cannot read prompts ({library_reason(error)})") from None
    builder = FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise TsdkdError(f"{path}: unknown prompt file type {path.suffix!r}; use .jsonl, .json, .parquet, .csv, a saved datasets folder or a dataset folder from the Hub")
    # The library reads bytes as UTF-8 unchecked, so a file in another encoding would fail later, mid-run.
    text = None if builder == "parquet" else read_text(path)
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its loaders also log the errors reported below
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", keep_in_memory=True), text
    except Exception as error:  # datasets/pyarrow/pandas raise many types for unreadable files
        if "corresponds to no data" in str(error):  # how datasets says the file parsed to no rows
            raise TsdkdError(f"{path}: the file holds no prompts") from None
        reason = (json_problem(text) if builder == "json" and text is not None else None) or library_reason(error)
        raise TsdkdError(f"{path}: cannot read prompts ({reason}); correct the file") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def load_folder(path: Path, split: str) -> Any:
    """The `split` (or only split) of a folder that `save_to_disk` wrote, or of one laid out as on the Hub (a dataset
    downloaded from it: data files, perhaps a card naming them), read into memory through a cache of its own: the
    shared cache keys a carded folder by its name, so another folder of that name would give its rows. A split that
    the layout joins from files of different names (test_a.jsonl, test_b.jsonl: perhaps different sets, which one
    eval score would mix) is read with a note naming them."""
    import datasets

    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        return loaded[chosen_split(list(loaded), split, path)] if isinstance(loaded, datasets.DatasetDict) else loaded
    with tempfile.TemporaryDirectory() as cache:
        files = datasets.load_dataset_builder(str(path), cache_dir=cache).config.data_files or {}
        chosen = chosen_split([str(name) for name in files], split, path)
        names = sorted(str(Path(str(file)).relative_to(path.resolve())) for file in files[chosen])
        if len({shard_of(name) for name in names}) > 1:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            print(f"note: {path}: its {chosen!r} split joins {shown} into one set; give one file to read it alone")
        # Only the chosen split's files: the others (a benchmark's whole train split) would be converted for nothing.
        return datasets.load_dataset(str(path), data_files={chosen: list(files[chosen])}, split=chosen, cache_dir=cache,
                                     keep_in_memory=True)


def shard_of(name: str) -> str:
    """What a data file is a shard of: its folder and name without the Hub's shard numbering (train-00000-of-00002,
    with or without a hash after it) or a number for a name (a parquet conversion's 0000.parquet)."""
    path = Path(name)
    stem = "" if path.stem.isdigit() else re.sub(r"-\d+-of-\d+(-[0-9a-f]+)?$", "", path.stem)
    return str(path.parent / stem)


def chosen_split(splits: list[str], split: str, path: Path) -> str:
    """`split` where the dataset has it, else its only split; several others are refused."""
    if split in splits:
        return split
    if len(splits) == 1:
        return splits[0]
    raise TsdkdError(f"{path}: a dataset of splits {splits} but no {split!r}, the one read here; give the data file or "
                     "folder of the one to use")


def row_names(path: Path, text: str | None, rows: int) -> list[str]:
    """How errors name each row: by its line in a JSON Lines file (as editors number them; the library skips
    blank lines), else by its 1-based row."""
    if path.suffix.lower() == ".jsonl" and text is not None:
        lines = [number for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
        if len(lines) == rows:  # else the library split lines otherwise: name rows, not a wrong line
            return [f"{path} line {number}" for number in lines]
    return [f"{path} row {row}" for row in range(1, rows + 1)]


def as_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """A plain prompt becomes one user message; a message list is checked and kept."""
    if value is None:
        raise TsdkdError(f"{where}: no {field!r}; fill it in or remove the row")
    if isinstance(value, str):
        if not value.strip():
            raise TsdkdError(f"{where}: field {field!r} is empty; remove the row or fill it in")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        found = "an empty list" if isinstance(value, list) else type(value).__name__
        raise TsdkdError(f"{where}: field {field!r} must be a string or a list of {{role, content}} messages, got {found}")
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise TsdkdError(f"{where}: field {field!r} message [{index}] is {type(message).__name__}, expected {{role, content}}")
        for key in ("role", "content"):
            # A key absent from one message is None here: the library gives every message the same keys.
            if message.get(key) is None:
                raise TsdkdError(f"{where}: field {field!r} message [{index}] has no {key!r}; "
                                 "each message needs 'role' and 'content' strings")
            if not isinstance(message[key], str):
                raise TsdkdError(f"{where}: field {field!r} message [{index}] {key!r} is {type(message[key]).__name__}, expected a string")
    if not any(m["content"].strip() for m in value):
        raise TsdkdError(f"{where}: field {field!r} has only empty messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def load_prompts(path: Path, prompt_field: str | None, answer_field: str | None, limit: int | None,
                 golds_checked: bool = True, split: str = "train") -> list[PromptRecord]:
    """Prompt records in file order (a dataset folder's `split`). A field left None is the first of PROMPT_FIELDS /
    ANSWER_FIELDS the file has (no gold answer when it has none of the latter). With `golds_checked` (the answers are
    compared to responses), a found answer field holding an unmarked solution of several lines is refused."""
    table, text = load_table(path, split)
    if len(table) == 0:
        raise TsdkdError(f"{path}: the file holds no prompts")
    columns = list(table.column_names)
    if prompt_field is None:
        prompt_field = next((f for f in PROMPT_FIELDS if f in columns), None)
        if prompt_field is None:
            raise TsdkdError(f"{path}: none of the fields {', '.join(PROMPT_FIELDS)} (fields: {', '.join(columns)}); pass --prompt-field")
    if prompt_field not in columns:
        raise TsdkdError(f"{path}: no field {prompt_field!r} (fields: {', '.join(columns)}); name one of them with --prompt-field")
    if answer_field is not None and answer_field not in columns:
        raise TsdkdError(f"{path}: no field {answer_field!r} (fields: {', '.join(columns)}); name one of them with --answer-field")
    answer_field_found = answer_field is None
    if answer_field is None:
        answer_field = next((f for f in ANSWER_FIELDS if f in columns), None)
    names = row_names(path, text, len(table))
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    records = []
    dropped: set[str] = set()  # message fields other than role and content, which a signal dataset does not store
    answered = 0  # conversations that end with the assistant's reply
    for row, item in enumerate(table):
        answer = item.get(answer_field) if answer_field else None
        if golds_checked and answer_field_found and answer is not None and unmarked_solution(str(answer)):
            # Every response would silently count as wrong; a field named with --answer-field is compared whole.
            raise TsdkdError(f"{names[row]}: field {answer_field!r} is a solution of several lines with no final answer "
                             "marked (\\boxed{}, ####, a line starting 'Answer:'), which no response could match; mark "
                             f"its final answer so, or, if the field is a bare answer of several lines (a matrix), give "
                             f"--answer-field {answer_field} to compare it whole")
        messages = as_messages(item[prompt_field], names[row], prompt_field)
        asked = prompt_messages(messages)
        if not asked:
            raise TsdkdError(f"{names[row]}: field {prompt_field!r} has no question before the assistant's reply (no "
                             "user message, or only empty ones, before it); fill in the user's turn or remove the row")
        answered += len(asked) < len(messages)
        records.append(
            PromptRecord(
                row=row,
                where=names[row],
                messages=asked,
                # An empty answer is a missing one: checked against it, every response would count as wrong.
                gold_answer=str(answer) if answer is not None and str(answer).strip() else None,
            )
        )
        if isinstance(item[prompt_field], list):  # the library gives every message every key, None where absent
            dropped.update(key for message in item[prompt_field] for key, value in message.items()
                           if key not in ("role", "content") and value not in (None, "", [], {}))
    if dropped:
        print(f"note: {path}: message field{'s' if len(dropped) > 1 else ''} {', '.join(sorted(dropped))} not kept: "
              "prompts are rendered and stored with each message's role and content only")
    if answered:
        print(f"note: {path}: {answered} of {len(records)} conversations end with the assistant's reply (as SFT data "
              "holds them); the prompt is the conversation before it, so that the models answer it themselves")
    return records


def prompt_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation without its closing assistant turns (a reply the models are to write themselves); empty when
    what is left asks nothing (no message but system or assistant ones holds anything)."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    if end == len(messages):
        return messages
    asked = messages[:end]
    return asked if any(m["content"].strip() and m["role"] not in ("system", "assistant") for m in asked) else []


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], where: str) -> list[int]:
    """Token ids of the prompt under the tokenizer's chat template, generation prompt included;
    `where` (file and line or row) names the prompt in errors."""
    if tokenizer.chat_template:
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # jinja raises TemplateError, or anything the template itself raises
            raise TsdkdError(f"{where}: the chat template refuses these messages ({error}); fix the roles or their order") from None
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    text = "\n".join(message["content"] for message in messages)
    # verbose=False: no warning of its own before the one line that names an over-long prompt (render_prompts).
    return list(tokenizer(text, verbose=False)["input_ids"])
