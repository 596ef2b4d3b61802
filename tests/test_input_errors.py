"""Bad prompt files and damaged datasets: one line naming the file and the spot, exit code 2, no traceback."""

from __future__ import annotations

import errno
import gc
import io
import json
import os
import re
import shutil
import sys
import tempfile

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import typer

from conftest import SMALL_JOB, TOY_PROMPTS, TOY_STUDENT, assert_ends_in_one_error_line, assert_one_line_error, flip_byte, run_cli
from tsdkd.cli import one_line_errors
from tsdkd.errors import TsdkdError
from tsdkd.interrupts import Terminated
from tsdkd.locks import no_space_left


def generate_with(prompts, tmp_path, *extra):
    job = list(SMALL_JOB)
    job[job.index("--prompts") + 1] = str(prompts)
    return run_cli("generate", *job, "--out", tmp_path / "out", *extra)


def eval_with(data, tmp_path):
    return run_cli("eval", "--model", TOY_STUDENT, "--data", data, "--out", tmp_path / "eval", "--backend", "hf")


def lines(*rows):
    return "".join(row + "\n" for row in rows).encode()


GOOD = '{"prompt": "1 + 1?", "answer": "2"}'


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("latin.jsonl", lines(GOOD) + b'{"prompt": "caf\xe9 \xff", "answer": "1"}\n',
         ["latin.jsonl", "not UTF-8", "byte 0xe9 at line 2 column 16", "save the file as UTF-8"]),
        ("empty.jsonl", b"", ["empty.jsonl", "holds no prompts"]),
        ("blank.jsonl", b"\n  \n", ["blank.jsonl", "holds no prompts"]),
        ("empty.json", b"[]", ["empty.json", "holds no prompts"]),
        ("header.csv", b"prompt,answer\n", ["header.csv", "holds no prompts"]),
        ("cut.json", b'[{"prompt": "a", "answer": "1"},\n {"prompt": "b"', ["cut.json", "line 2 column 16", "Expecting"]),
        ("bad.jsonl", lines(GOOD, GOOD, GOOD, '{"prompt": "d", "answer": '), ["bad.jsonl", "line 4 column", "Expecting value"]),
        ("list.jsonl", lines(GOOD, "[1, 2]"), ["list.jsonl", "line 2", "expected an object"]),
        ("bom.jsonl", b"\xef\xbb\xbf" + lines(GOOD, '{"prompt": "d", "answer": '), ["bom.jsonl", "line 2 column", "Expecting value"]),
        # datasets also logs this parse error; assert_one_line_error allows no second line on stderr.
        ("fields.csv", b"prompt,answer\na,1\nb,2,3\n", ["fields.csv", "Expected 2 fields in line 3"]),
        ("missing.jsonl", lines(GOOD, GOOD, GOOD, '{"answer": "1"}'), ["missing.jsonl line 4:", "no 'prompt'"]),
        ("gaps.jsonl", lines(GOOD, "", '{"prompt": " ", "answer": "1"}'), ["gaps.jsonl line 3:", "'prompt' is empty"]),
        ("chat.jsonl", lines('{"prompt": [{"role": "user"}], "answer": "1"}'),
         ["chat.jsonl line 1:", "message [0] has no 'content'", "'role' and 'content' strings"]),
        ("chat2.jsonl", lines('{"prompt": [{"role": "user", "content": "hi"}, {"content": "x"}], "answer": "1"}'),
         ["chat2.jsonl line 1:", "message [1] has no 'role'"]),
        ("rows.csv", b"prompt,answer\n1 + 1?,2\n,3\n", ["rows.csv row 2:", "no 'prompt'"]),
    ],
)
def test_bad_prompt_file(tmp_path, name, content, fragments):
    path = tmp_path / name
    path.write_bytes(content)
    assert_one_line_error(generate_with(path, tmp_path), *fragments)
    assert not (tmp_path / "out" / "tsdkd.json").exists()


def test_prompt_folders_saved_by_datasets_or_laid_out_as_on_the_hub(tmp_path, capsys):
    """A `save_to_disk` folder (one split, or splits with 'train'), and a dataset folder as the Hub lays it out
    (data files, perhaps a card naming them: a download), read their own rows, also two folders of one name;
    the Hub download's `.cache/` does not count in the prompts' fingerprint (the card does); a folder of neither,
    or of several configs, is one line."""
    import datasets

    from tsdkd.fingerprint import source_fingerprint
    from tsdkd.prompts import load_prompts

    def golds(folder):
        return [record.gold_answer for record in load_prompts(folder, None, None, None)]

    rows = {"question": ["1 + 1?", "2 + 2?"], "answer": ["2", "4"]}
    datasets.Dataset.from_dict(rows).save_to_disk(tmp_path / "saved")
    splits = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"question": ["3 + 3?"], "answer": ["6"]}),
                                   "train": datasets.Dataset.from_dict(rows)})
    splits.save_to_disk(tmp_path / "splits")
    assert golds(tmp_path / "saved") == golds(tmp_path / "splits") == ["2", "4"]
    for parent, answers in (("one", ["2", "4"]), ("two", ["7"])):
        hub = tmp_path / parent / "gsm"
        (hub / "data").mkdir(parents=True)
        table = datasets.Dataset.from_dict({"question": [f"q{a}" for a in answers], "answer": answers})
        table.to_parquet(hub / "data" / "train-00000-of-00001.parquet")
        (hub / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                       "    path: data/train-*.parquet\n---\n# prompts\n")
        assert golds(hub) == answers
    (tmp_path / "files").mkdir()
    for split, answer in (("train", "5"), ("test", "9")):
        (tmp_path / "files" / f"{split}.jsonl").write_text(json.dumps({"question": "2 + 3?", "answer": answer}) + "\n")
    assert golds(tmp_path / "files") == ["5"]
    fingerprint = source_fingerprint(tmp_path / "one" / "gsm")
    (tmp_path / "one" / "gsm" / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / "one" / "gsm" / ".cache" / "huggingface" / "README.md.metadata").write_text("downloaded now")
    assert source_fingerprint(tmp_path / "one" / "gsm") == fingerprint
    with open(tmp_path / "one" / "gsm" / "README.md", "a") as card:  # a card may name other data files: it counts
        card.write("A card edited since.\n")
    assert source_fingerprint(tmp_path / "one" / "gsm") != fingerprint
    datasets.DatasetDict({"test": splits["test"]}).save_to_disk(tmp_path / "one-split")
    assert golds(tmp_path / "one-split") == ["6"]  # its only split, whatever its name
    datasets.DatasetDict({"test": splits["test"], "validation": splits["test"]}).save_to_disk(tmp_path / "no-train")
    with pytest.raises(TsdkdError, match=r"a dataset of splits \['test', 'validation'\] but no 'train', the one read here"):
        load_prompts(tmp_path / "no-train", None, None, None)
    for name, answer in (("test_id", "7"), ("test_long", "8")):  # two benchmarks in one folder, as in data/toy/
        (tmp_path / "files" / f"{name}.jsonl").write_text(json.dumps({"question": "1 + 6?", "answer": answer}) + "\n")
    (tmp_path / "files" / "test.jsonl").unlink()
    capsys.readouterr()
    assert golds(tmp_path / "files") == ["5"] and capsys.readouterr().out == ""
    assert [r.gold_answer for r in load_prompts(tmp_path / "files", None, None, None, split="test")] == ["7", "8"]
    assert f"note: {tmp_path / 'files'}: its 'test' split joins test_id.jsonl, test_long.jsonl into one set" in capsys.readouterr().out
    sharded = tmp_path / "sharded" / "data"  # the Hub's shards of one set: no note
    sharded.mkdir(parents=True)
    for index, suffix in enumerate(("-1a2b3c", "-4d5e6f")):
        datasets.Dataset.from_dict(rows).to_parquet(sharded / f"train-0000{index}-of-00002{suffix}.parquet")
    assert golds(sharded.parent) == ["2", "4", "2", "4"] and "joins" not in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(TsdkdError, match="empty: cannot read prompts"):
        load_prompts(tmp_path / "empty", None, None, None)
    configs = tmp_path / "configs"
    card = "---\nconfigs:\n"
    for config in ("main", "socratic"):
        (configs / config).mkdir(parents=True)
        datasets.Dataset.from_dict(rows).to_parquet(configs / config / "train-00000-of-00001.parquet")
        card += f"- config_name: {config}\n  data_files:\n  - split: train\n    path: {config}/train-*\n"
    (configs / "README.md").write_text(card + "---\n")
    with pytest.raises(TsdkdError, match=r"configs: a dataset of several configs \('main', 'socratic'\); give the data file"):
        load_prompts(configs, None, None, None)
    assert golds(configs / "main" / "train-00000-of-00001.parquet") == ["2", "4"]


def test_message_fields_other_than_role_and_content_are_noted_as_not_kept(tmp_path, capsys):
    from tsdkd.prompts import load_prompts

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi", "name": "bob"}], "answer": "1"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "2 + 2?"}], "answer": "4"}) + "\n")
    records = load_prompts(path, None, None, None)
    assert [record.messages for record in records] == [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "2 + 2?"}]]
    assert f"note: {path}: message field name not kept" in capsys.readouterr().out


def test_a_conversation_ending_with_the_assistants_reply_is_asked_without_it(tmp_path, capsys):
    """SFT data holds the question and the assistant's solution: as a prompt, the reply would hand the models the
    answer. The conversation before it is the prompt (with a note); one with no question before the reply is refused."""
    from tsdkd.prompts import load_prompts

    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}
    reply = {"role": "assistant", "content": "2 + 2 = 4\nAnswer: 4"}
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": [system, user, reply], "answer": "4"}) + "\n"
                    + json.dumps({"messages": [user], "answer": "4"}) + "\n"
                    + json.dumps({"messages": [user, reply, user, reply, reply], "answer": "4"}) + "\n")
    records = load_prompts(path, None, None, None)
    assert [record.messages for record in records] == [[system, user], [user], [user, reply, user]]
    assert f"note: {path}: 2 of 3 conversations end with the assistant's reply" in capsys.readouterr().out
    path.write_text(json.dumps({"messages": [user], "answer": "4"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": " "}, reply], "answer": "4"}) + "\n")
    with pytest.raises(TsdkdError, match=r"sft.jsonl line 2: field 'messages' has no question before the assistant's reply"):
        load_prompts(path, None, None, None)
    for asks_nothing in ([reply], [system, reply]):
        path.write_text(json.dumps({"messages": asks_nothing, "answer": "4"}) + "\n")
        with pytest.raises(TsdkdError, match=r"sft.jsonl line 1: field 'messages' has no question before the assistant's reply"):
            load_prompts(path, None, None, None)


def test_eval_reports_bad_benchmark_files(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "answer": "1"}\n')
    assert_one_line_error(eval_with(latin, tmp_path), "latin.jsonl", "not UTF-8", "line 1 column 16")
    unanswered = tmp_path / "unanswered.jsonl"
    unanswered.write_bytes(lines(GOOD, "", '{"prompt": "2 + 2?"}'))
    assert_one_line_error(eval_with(unanswered, tmp_path), "unanswered.jsonl line 3:", "no gold answer")
    unmarked = tmp_path / "unmarked.jsonl"
    unmarked.write_bytes(lines('{"prompt": "1 + 1?", "solution": "1 + 1 = 2\\nAnswer: 2"}',
                               '{"prompt": "6 + 12 - 18?", "solution": "6 + 12 = 18\\n18 - 18 = 0"}'))
    assert_one_line_error(eval_with(unmarked, tmp_path), "unmarked.jsonl line 2: field 'solution' is a solution of several",
                          "no final answer marked", "give --answer-field solution to compare it whole")
    assert_one_line_error(generate_with(unmarked, tmp_path), "unmarked.jsonl line 2: field 'solution'")
    assert not (tmp_path / "eval").exists()
    # Named, the field is compared whole (a bare answer of several lines, a matrix); unread, it is not checked.
    named = run_cli("eval", "--model", TOY_STUDENT, "--data", unmarked, "--out", tmp_path / "eval", "--backend", "hf",
                    "--answer-field", "solution", "--max-new-tokens", "8")
    assert named.exit_code == 0, named.stderr
    unread = generate_with(unmarked, tmp_path, "--verifier", "none", "--limit", "2")
    assert unread.exit_code == 0, unread.stderr


def damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "missing":
        path.unlink()
    else:
        flip_byte(path)


@pytest.mark.parametrize("how, problem", [("truncated", "checksum does not match"), ("empty", "checksum does not match"),
                                          ("missing", "shard missing"), ("flipped", "checksum does not match")])
def test_inspect_refuses_a_damaged_shard(small_dataset, tmp_path, how, problem):
    folder = tmp_path / "copy"
    shutil.copytree(small_dataset, folder)
    shard = json.loads((folder / "tsdkd.json").read_text())["shards"][1]["file"]
    damage(folder / shard, how)
    assert_one_line_error(run_cli("inspect", folder), shard, problem, "rerun the `tsdkd generate` command")
    assert_one_line_error(run_cli("validate", folder), shard, problem)


def test_a_missing_folder_or_a_file_for_a_dataset(small_dataset, tmp_path):
    for command in ("inspect", "validate"):
        assert_one_line_error(run_cli(command, tmp_path / "nowhere"), "nowhere: no such folder")
        assert_one_line_error(run_cli(command, small_dataset / "tsdkd.json"), "tsdkd.json is a file; name the signal dataset's folder")


def test_inspect_notes_a_shard_the_manifest_does_not_list(small_dataset, tmp_path):
    """`load_dataset` would read it (validate refuses it); inspect, which only summarises, says so."""
    folder = tmp_path / "copy"
    shutil.copytree(small_dataset, folder)
    shutil.copy(folder / "data" / "train-00000-of-00003.parquet", folder / "data" / "train-00003-of-00003.parquet")
    result = run_cli("inspect", folder)
    assert result.exit_code == 0, result.stderr
    assert "1 shard file(s) not in the manifest (data/train-00003-of-00003.parquet)" in result.stdout


def test_inspect_prints_lengths_as_integers(small_dataset):
    result = run_cli("inspect", small_dataset)
    assert result.exit_code == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("tokens"))
    found = re.search(r"length min (\d+)  p10 \d+  median \d+  p90 \d+  max (\d+)  mean \d+\.\d$", line)
    assert found, line
    lengths = [pc.list_value_length(pq.read_table(path, columns=["completion_token_ids"])["completion_token_ids"]).to_pylist()
               for path in sorted((small_dataset / "data").glob("*.parquet"))]
    flat = [n for shard in lengths for n in shard]
    assert (int(found[1]), int(found[2])) == (min(flat), max(flat))


@pytest.mark.parametrize("interrupt, line", [(KeyboardInterrupt, "interrupted; "), (Terminated, "terminated (SIGTERM); ")])
def test_an_interrupt_inside_a_library_call_still_ends_in_one_line(capfd, monkeypatch, interrupt, line):
    """Ctrl-C or SIGTERM may land in a library's constructor (seen in CI: a tqdm bar, whose __del__ then failed and
    printed a traceback after the line). Nothing follows the line."""
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)  # Python's, which prints; pytest's after the test

    class HalfBuilt:
        def __init__(self):
            raise interrupt

        def __del__(self):
            self.never_set  # noqa: B018, the attribute __init__ did not get to set

    @one_line_errors
    def command():
        HalfBuilt()

    with pytest.raises(typer.Exit):
        command()
    gc.collect()
    assert capfd.readouterr().err == f"{line}rerun the same command to continue\n"


def test_the_last_line_starts_a_line_of_its_own_after_an_open_progress_bar(capsys):
    """A bar's line is unfinished while it runs (the Trainer's, updated by hand, stays open until the end), on a
    terminal and in a log: an error raised meanwhile starts a new line, and the bar writes nothing after it."""
    from tqdm import tqdm

    bar_output = io.StringIO()

    @one_line_errors
    def command():
        bar = tqdm(total=3, file=bar_output)
        bar.update()
        raise TsdkdError("row 2 is bad")

    with pytest.raises(typer.Exit):
        command()
    written = bar_output.getvalue()
    gc.collect()  # the bar is closed as it is collected
    assert capsys.readouterr().err == "\nerror: row 2 is bad\n" and bar_output.getvalue() == written


@pytest.mark.parametrize("args, fragments", [
    (["distill", "--signals", "s", "--student", "m", "--out", "o", "--no-selektion"],
     ["No such option: --no-selektion (Possible options: --no-selection, --with-selection)", "distill --help`"]),
    (["eval", "--model", "m", "--data", "d", "--out", "o", "--samples", "two"], ["Invalid value for '--samples'", "eval --help`"]),
    (["frobnicate"], ["No such command 'frobnicate'; see `"]),
    (["distill", "--loss"], ["Option '--loss' requires an argument; see `", "distill --help`"]),  # no context of its own
])
def test_a_mistyped_option_is_one_line(args, fragments):
    assert_one_line_error(run_cli(*args), *fragments)


def test_tsdkd_alone_still_shows_its_help():
    result = run_cli()
    assert "Commands:" in result.stdout + result.stderr and "error:" not in result.stdout + result.stderr


def test_version():
    from tsdkd import __version__

    result = run_cli("--version")
    assert result.exit_code == 0 and result.stdout == f"tsdkd {__version__}\n"


class DeviceWithRoom:
    """A temporary file on a device that takes `room` bytes more, then says ENOSPC."""

    def __init__(self, room):
        self.room = room

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)

    def flush(self):
        pass

    def fileno(self):
        return 0


@pytest.mark.parametrize("room, full", [(2**19, True), (2**22, False)])
def test_no_space_left_is_found_by_writing_a_mebibyte(tmp_path, monkeypatch, room, full):
    monkeypatch.setattr(tempfile, "TemporaryFile", DeviceWithRoom(room))
    monkeypatch.setattr(os, "fsync", lambda handle: None)
    assert no_space_left(tmp_path) is full


def test_a_full_device_while_generating_is_one_line(tmp_path, monkeypatch):
    """pyarrow says it with the errno (seen on a full tmpfs); a device other than --out's is named by its file."""
    def full(table, where, **kwargs):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr("tsdkd.signals.pq.write_table", full)
    assert_ends_in_one_error_line(generate_with(TOY_PROMPTS, tmp_path), f"no space left on --out {tmp_path / 'out'}: its device",
                                  "OSError: [Errno 28]", "free some space, then rerun the same command to continue")

    def cache_full(table, where, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/dev/shm/torch_123")

    monkeypatch.setattr("tsdkd.signals.pq.write_table", cache_full)
    assert_ends_in_one_error_line(generate_with(TOY_PROMPTS, tmp_path), "no space left on the device of /dev/shm/torch_123")


def test_a_full_device_while_saving_a_checkpoint_is_one_line(small_dataset, tmp_path, monkeypatch):
    """torch's checkpoint writer says only `iostream error` (seen on a full tmpfs): the device is probed."""
    from safetensors import SafetensorError

    from stage2_distill.trainer import DistillTrainer

    def full(self, *args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(DistillTrainer, "_save_checkpoint", full)
    out = tmp_path / "run"
    args = ["distill", "--signals", small_dataset, "--student", TOY_STUDENT, "--out", out, "--max-steps", "2", "--save-steps", "1"]
    monkeypatch.setattr("tsdkd.locks.no_space_left", lambda folder: folder == out)
    assert_ends_in_one_error_line(run_cli(*args), f"no space left on --out {out}: its device (RuntimeError: basic_ios::clear: iostream error)")
    monkeypatch.setattr("tsdkd.locks.no_space_left", lambda folder: False)  # a failed write on a device with room
    result = run_cli(*args)
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)

    def weights_full(self, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(DistillTrainer, "_save_checkpoint", weights_full)  # safetensors gives the errno in words only
    assert_ends_in_one_error_line(run_cli(*args), f"no space left on --out {out}: its device (SafetensorError: ")

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(DistillTrainer, "_save_checkpoint", out_of_memory)
    monkeypatch.setattr("tsdkd.locks.no_space_left", lambda folder: True)  # not a write: not blamed on a full device
    result = run_cli(*args)
    assert result.exit_code == 1 and str(result.exception) == "CUDA out of memory"
