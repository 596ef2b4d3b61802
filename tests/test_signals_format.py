"""The signal dataset as a public contract: round trip, loading without tsdkd, and every validation."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from conftest import SMALL_JOB, TOY_STUDENT, assert_one_line_error, flip_byte, run_cli
from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import sha256_file
from tsdkd.loading import gpu_has_bf16
from tsdkd.signals import CandidateSignal, signal_schema, signals_to_table, write_parquet_atomic
from tsdkd.validate import check_rows, usable_cores, validate_dataset


def random_signal(rng, vocab_size, k, length, index=0):
    logits = rng.normal(size=(length, vocab_size))
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-logprobs, axis=-1)[:, :k]
    top = np.take_along_axis(logprobs, order, -1)
    tokens = rng.integers(0, vocab_size, size=length)
    return CandidateSignal(
        prompt_id="p0", messages=[{"role": "user", "content": "2 + 2?"}], prompt_token_ids=[1, 2, 3],
        gold_answer="4", candidate_index=index, num_candidates=2, completion_token_ids=tokens,
        completion_text="4", finish_reason="stop", behaviour_logprobs=logprobs[np.arange(length), tokens].astype(np.float32),
        teacher_logprobs=logprobs[np.arange(length), tokens].astype(np.float32), teacher_topk_ids=order,
        teacher_topk_logprobs=top, teacher_tail_mass=1 - np.exp(top).sum(-1), teacher_entropy=-(np.exp(logprobs) * logprobs).sum(-1),
        teacher_entropy_exact=True, teacher_score=-1.5, teacher_rank=index, verified=None,
    )


@pytest.mark.parametrize("vocab_size, id_type", [(300, pa.uint16()), (70000, pa.int32())])
def test_round_trip(tmp_path, vocab_size, id_type):
    rng = np.random.default_rng(0)
    signals = [random_signal(rng, vocab_size, 5, length, index) for index, length in enumerate((7, 3))]
    path = tmp_path / "shard.parquet"
    write_parquet_atomic(signals_to_table(signals, vocab_size), path)
    table = pq.read_table(path)
    assert table.schema.equals(signal_schema(vocab_size))
    assert table.schema.field("completion_token_ids").type.value_type == id_type
    for signal, row in zip(signals, table.to_pylist()):
        assert row["completion_token_ids"] == signal.completion_token_ids.tolist()
        assert np.array(row["teacher_topk_ids"]).tolist() == signal.teacher_topk_ids.tolist()
        np.testing.assert_allclose(row["teacher_topk_logprobs"], signal.teacher_topk_logprobs, rtol=2.0**-11)
        np.testing.assert_array_equal(row["teacher_logprobs"], signal.teacher_logprobs)
        assert row["messages"] == signal.messages and row["teacher_rank"] == signal.teacher_rank
    assert not list(tmp_path.glob(".*tmp*"))


def test_loads_with_datasets_and_no_tsdkd(small_dataset, tmp_path):
    """Each folder loads its own rows, also two folders of one name (every round of `tsdkd run` writes `signals/`)
    read through one `datasets` cache."""
    shorter = tmp_path / "other" / small_dataset.name
    shutil.copytree(small_dataset, shorter)
    (shorter / "data" / "train-00002-of-00003.parquet").unlink()
    script = (
        "import sys; sys.modules['tsdkd'] = None\n"
        "import datasets\n"
        f"a = datasets.load_dataset({str(small_dataset)!r}, split='train', cache_dir={str(tmp_path / 'cache')!r})\n"
        f"b = datasets.load_dataset('parquet', data_files={str(small_dataset / 'data' / '*.parquet')!r}, split='train')\n"
        "assert len(a) == len(b) == 36, (len(a), len(b))\n"
        "assert len(a[0]['teacher_topk_ids'][0]) == 8\n"
        f"c = datasets.load_dataset({str(shorter)!r}, split='train', cache_dir={str(tmp_path / 'cache')!r})\n"
        "assert len(c) == 24, len(c)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_prompt_id_is_the_documented_hash(small_dataset):
    """docs/format.md's formula, for readers without tsdkd."""
    import hashlib

    rows = pq.read_table(sorted((small_dataset / "data").glob("*.parquet"))[0], columns=["prompt_id", "messages"]).to_pylist()
    for row in rows:
        text = json.dumps(row["messages"], sort_keys=True, ensure_ascii=False).encode("utf-8")
        assert row["prompt_id"] == hashlib.sha256(text).hexdigest()[:16]


def test_the_manifest_names_the_dtype_the_models_ran_in(small_dataset):
    """`--dtype auto` (the default) resolved: float32 on a machine without a GPU, bf16 on one that has it."""
    gpu_bf16 = gpu_has_bf16()
    manifest = json.loads((small_dataset / "tsdkd.json").read_text())
    assert manifest["settings"]["dtype"] == "auto"
    assert manifest["backend"]["dtype"] == ("bfloat16" if gpu_bf16 else "float32")


def test_compact(small_dataset):
    stats = json.loads((small_dataset / "tsdkd.json").read_text())["stats"]
    total = sum(p.stat().st_size for p in (small_dataset / "data").glob("*.parquet"))
    assert stats["bytes"] == total
    # Budget from the issue is 100 B per completion token at k=20; this job stores k=8.
    assert total / stats["completion_tokens"] < 100


def copy_of(dataset, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(dataset, target)
    return target


def rewrite_shard(folder, change, index=0, schema=None):
    """Apply `change` to a shard's rows (the first by default), written with `schema` (default: the shard's own), and
    fix the manifest's checksum and sizes, as a tool that knows the manifest but not what the values mean would: only
    the checks of the rows can tell."""
    manifest = json.loads((folder / "tsdkd.json").read_text())
    entry = manifest["shards"][index]
    path = folder / entry["file"]
    table = pq.read_table(path)
    rows = table.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema or table.schema), path)
    manifest["stats"]["bytes"] += path.stat().st_size - entry["bytes"]
    entry["sha256"], entry["bytes"] = sha256_file(path), path.stat().st_size
    (folder / "tsdkd.json").write_text(json.dumps(manifest))
    return entry["file"]


def set_all(rows, column, value):
    for row in rows:
        row[column] = value


def swap_ranks(rows):
    rows[0]["teacher_rank"], rows[1]["teacher_rank"] = rows[1]["teacher_rank"], rows[0]["teacher_rank"]


def flat_topk(rows):
    """Every top-k log-prob of row 2 at -0.01: sorted and in range, but 20 probabilities of 0.99 each."""
    rows[2]["teacher_topk_logprobs"] = [[-0.01] * len(position) for position in rows[2]["teacher_topk_logprobs"]]


def expect_invalid(folder, *fragments):
    with pytest.raises(TsdkdError) as caught:
        validate_dataset(folder)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert_one_line_error(run_cli("validate", folder), *fragments)


def test_validate_passes_on_a_good_dataset(small_dataset):
    result = run_cli("validate", small_dataset, "--student", TOY_STUDENT)
    assert result.exit_code == 0 and "valid" in result.stdout


def test_corrupt_shard_is_caught_by_checksum(small_dataset, tmp_path):
    folder = copy_of(small_dataset, tmp_path)
    shard = sorted((folder / "data").glob("*.parquet"))[1]
    flip_byte(shard)
    expect_invalid(folder, shard.name, "checksum")


@pytest.mark.parametrize(
    "what, change, fragments",
    [
        ("unsorted", lambda rows: rows[1]["teacher_topk_logprobs"][2].reverse(), "not sorted"),
        ("out of vocab", lambda rows: rows[2]["teacher_topk_ids"][0].__setitem__(0, 60000), "outside the vocabulary"),
        ("not finite", lambda rows: rows[3]["teacher_logprobs"].__setitem__(0, float("nan")), "non-finite"),
        ("ragged", lambda rows: rows[4]["teacher_entropy"].pop(), "teacher_entropy has"),
        ("ranks", lambda rows: rows[0].__setitem__("teacher_rank", rows[1]["teacher_rank"]), "permutation"),
        ("ranks in another order", swap_ranks, ("row 0: teacher ranks of prompt", "the format's order of its verdicts and scores")),
        ("null id", lambda rows: rows[3]["completion_token_ids"].__setitem__(1, None), "row 3: completion_token_ids is or holds a null"),
        ("null top-k id", lambda rows: rows[2]["teacher_topk_ids"][1].__setitem__(3, None), "row 2: teacher_topk_ids is or holds a null"),
        ("null count", lambda rows: rows[1].__setitem__("num_candidates", None), "row 1: num_candidates is or holds a null"),
        ("null prompt id", lambda rows: rows[4].__setitem__("prompt_id", None), "row 4: prompt_id is or holds a null"),
        ("top-k not a distribution", flat_topk, ("row 2: teacher top-k probabilities and tail mass sum to", "not 1")),
        ("entropy too large", lambda rows: rows[1]["teacher_entropy"].__setitem__(0, 60000.0), "row 1: teacher_entropy 6e+04 exceeds 5.784"),
        ("entropy of another kind", lambda rows: set_all(rows, "teacher_entropy_exact", False),
         "row 0: teacher_entropy_exact is False while the manifest's teacher_entropy is exact"),
        ("score", lambda rows: rows[3].__setitem__("teacher_score", rows[3]["teacher_score"] - 1), ("row 3: teacher_score", "not the mean")),
    ],
)
def test_damaged_rows_are_named(small_dataset, tmp_path, what, change, fragments):
    folder = copy_of(small_dataset, tmp_path)
    changed = rewrite_shard(folder, change)
    expect_invalid(folder, changed, *((fragments,) if isinstance(fragments, str) else fragments), "row ")


def test_shards_checked_side_by_side_report_in_manifest_order(small_dataset, tmp_path):
    """Shards are checked concurrently, yet the first bad one in manifest order is named, also when its
    fault is a prompt repeated from an earlier shard (caught at its row) and a later shard is corrupt."""
    folder = copy_of(small_dataset, tmp_path)
    files = [entry["file"] for entry in json.loads((folder / "tsdkd.json").read_text())["shards"]]
    assert len(files) >= 3
    for name in files[1:3]:
        flip_byte(folder / name)
    expect_invalid(folder, files[1], "checksum")

    folder = copy_of(small_dataset, tmp_path / "again")
    first_prompt = pq.read_table(folder / files[0], columns=["prompt_id"])["prompt_id"][0].as_py()
    group = json.loads((folder / "tsdkd.json").read_text())["sampling"]["num_candidates"]

    def repeat_first_prompt(rows):
        for row in rows[:group]:
            row["prompt_id"] = first_prompt

    changed = rewrite_shard(folder, repeat_first_prompt, index=1)
    flip_byte(folder / files[2])  # a later shard is bad too
    expect_invalid(folder, changed, "row 0", f"prompt {first_prompt} appears in more than one group or shard")


def test_manifest_problems(small_dataset, tmp_path):
    folder = copy_of(small_dataset, tmp_path)
    manifest_path = folder / "tsdkd.json"
    original = manifest_path.read_text()
    manifest_path.write_text(original.replace('"format_version": 1', '"format_version": 99'))
    expect_invalid(folder, "format version 99")
    manifest_path.write_text(original)
    top_k = json.loads(original)["top_k"]
    manifest_path.write_text(original.replace(f'"top_k": {top_k}', f'"top_k": {top_k - 1}'))
    expect_invalid(folder, f"has width {top_k}, expected k={top_k - 1}; the shard matches its checksum, so the manifest's "
                   "top_k was likely edited: restore it")
    manifest_path.write_text(original)
    shutil.copy(sorted((folder / "data").glob("*.parquet"))[0], folder / "data" / "train-00009-of-00010.parquet")
    expect_invalid(folder, "train-00009-of-00010.parquet", "not in the manifest; if the manifest's shards list was edited")
    (folder / "data" / "train-00009-of-00010.parquet").unlink()
    renamed = sorted((folder / "data").glob("*.parquet"))[1]
    renamed.rename(folder / "data" / "shard1.parquet")  # not to be removed: it is the missing shard
    expect_invalid(folder, f"shard data/{renamed.name} is missing and data/shard1.parquet, not in the manifest, is there; "
                   "if it is that shard renamed, give it back its name, else remove it")
    (folder / "data" / "shard1.parquet").rename(renamed)
    sorted((folder / "data").glob("*.parquet"))[2].unlink()
    expect_invalid(folder, "shard missing")
    manifest_path.write_text("{not json")
    expect_invalid(folder, "not valid JSON")


def test_tokenizer_mismatch_is_refused(small_dataset, tmp_path):
    other = tmp_path / "other-student"
    shutil.copytree(TOY_STUDENT, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert_one_line_error(run_cli("validate", small_dataset, "--student", other), "chat template")
    tokenizer = AutoTokenizer.from_pretrained(TOY_STUDENT)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(other)
    assert_one_line_error(run_cli("validate", small_dataset, "--student", other), "vocabulary", "dataset vocab 325")


def rewrite_manifest(folder, change):
    """Apply `change` to the manifest as a dict, as a hand edit would."""
    manifest = json.loads((folder / "tsdkd.json").read_text())
    change(manifest)
    (folder / "tsdkd.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda m: m.pop("stats"), "stats is missing"),
        (lambda m: m["tokenizer"].pop("vocab_size"), "tokenizer.vocab_size is missing"),
        (lambda m: m["tokenizer"].pop("vocab_sha256"), "tokenizer.vocab_sha256 is missing"),
        (lambda m: m["tokenizer"].update(vocab_size="325"), "tokenizer.vocab_size is str '325', expected int"),
        (lambda m: m["sampling"].pop("num_candidates"), "sampling.num_candidates is missing"),
        (lambda m: m["shards"][0].pop("sha256"), "shards.0.sha256 is missing"),
        (lambda m: m["shards"][0].pop("file"), "shards.0.file is missing"),
        (lambda m: m["shards"][0].pop("rows"), "shards.0.rows is missing"),
        # Stage 2 measures the student's entropy to match this: another value would change the token weights.
        (lambda m: m.update(teacher_entropy="bogus"), "teacher_entropy is 'bogus', expected one of exact, estimated_topk_buckets"),
        (lambda m: m.update(top_k=0), "top_k is 0, expected at least 1"),
        (lambda m: m.update(round=-1), "round is -1, expected at least 0"),
    ],
)
def test_manifest_fields_are_checked(small_dataset, tmp_path, change, fragment):
    folder = copy_of(small_dataset, tmp_path)
    rewrite_manifest(folder, change)
    expect_invalid(folder, "tsdkd.json", fragment)
    # Stage 2 validates before it reads anything else; inspect and a generate rerun (resume) read fields too.
    assert_one_line_error(run_cli("distill", "--signals", folder, "--student", TOY_STUDENT, "--out", tmp_path / "out"), fragment)
    assert_one_line_error(run_cli("inspect", folder), fragment)
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--out", folder), fragment)


@pytest.mark.parametrize("where", ["data page", "footer"])
def test_unreadable_shard_is_one_line(small_dataset, tmp_path, where):
    """A shard damaged after its checksum was recorded, or with the checksum recomputed: only pyarrow notices,
    and its messages can end in or span several lines."""
    folder = copy_of(small_dataset, tmp_path)
    path = folder / json.loads((folder / "tsdkd.json").read_text())["shards"][0]["file"]
    data = bytearray(path.read_bytes())
    if where == "data page":
        # Leaf column 7 is completion_token_ids, zstd-compressed: the footer stays readable.
        start = pq.ParquetFile(path).metadata.row_group(0).column(7).data_page_offset + 30
    else:
        start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")  # the footer, before its length and "PAR1"
    for i in range(start, start + 50):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    rewrite_manifest(folder, lambda m: m["shards"][0].update(sha256=sha256_file(path)))
    expect_invalid(folder, path.name, "not a readable Parquet file")


def test_edited_vocab_size_is_refused(small_dataset, tmp_path):
    """With a larger vocab_size in the manifest, id 900 would pass the range checks and crash training."""
    folder = copy_of(small_dataset, tmp_path)
    rewrite_shard(folder, lambda rows: rows[0]["completion_token_ids"].__setitem__(0, 900))
    rewrite_manifest(folder, lambda m: m["tokenizer"].update(vocab_size=1000))
    result = run_cli("validate", folder, "--student", TOY_STUDENT)
    assert_one_line_error(result, "tokenizer.vocab_size 1000", "325 tokens of the student")


@pytest.mark.parametrize("what", ["stats edited", "shard emptied"])
def test_stats_must_match_the_shards(small_dataset, tmp_path, what):
    folder = copy_of(small_dataset, tmp_path)
    if what == "shard emptied":
        rewrite_shard(folder, lambda rows: rows.clear())
        rewrite_manifest(folder, lambda m: m["shards"][0].update(rows=0, prompts=0, completion_tokens=0))
    else:
        rewrite_manifest(folder, lambda m: m["stats"].update(candidates=m["stats"]["candidates"] + 3))
    expect_invalid(folder, "tsdkd.json", "stats.candidates is", "the shards hold")


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m["stats"].update(prompts=m["stats"]["prompts"] + 1), "stats.prompts is"),
    (lambda m: m["stats"].update(completion_tokens=5), "stats.completion_tokens is 5, the shards hold"),
    (lambda m: m["stats"].update(bytes=m["stats"]["bytes"] - 1), "stats.bytes is"),
    (lambda m: m["shards"][1].update(prompts=77), "the entry of data/train-00001-of-00003.parquet says prompts 77, the shard holds"),
    (lambda m: m["shards"][0].update(completion_tokens=-3), "says completion_tokens -3"),
    (lambda m: m["shards"][2].update(bytes=10), "says bytes 10, the file has"),
])
def test_every_count_of_the_manifest_must_match_the_shards(small_dataset, tmp_path, change, fragment):
    """`merge` adds these up into a merged dataset's card and manifest: an edited one would spread."""
    folder = copy_of(small_dataset, tmp_path)
    rewrite_manifest(folder, change)
    expect_invalid(folder, "tsdkd.json", fragment)


def test_a_shard_written_with_required_fields_is_valid(small_dataset, tmp_path):
    """Another writer may mark fields non-nullable: nulls are checked value by value, so only names and types count."""
    folder = copy_of(small_dataset, tmp_path)
    entry = json.loads((folder / "tsdkd.json").read_text())["shards"][0]
    stored = pq.read_schema(folder / entry["file"])
    required = pa.schema([field.with_nullable(field.name not in ("gold_answer", "verified")) for field in stored])
    rewrite_shard(folder, lambda rows: None, schema=required)
    validate_dataset(folder)


def test_shards_must_be_named_as_the_hub_finds_them(small_dataset, tmp_path):
    """`load_dataset` reads data/train-*.parquet: a renamed shard would be left out by every
    loader but tsdkd, one outside the folder not found."""
    folder = copy_of(small_dataset, tmp_path)
    (folder / "data" / "train-00001-of-00003.parquet").rename(folder / "data" / "shard1.parquet")
    rewrite_manifest(folder, lambda m: m["shards"][1].update(file="data/shard1.parquet"))
    expect_invalid(folder, "shard 1 is named 'data/shard1.parquet', not data/train-00001-of-NNNNN.parquet")
    folder = copy_of(small_dataset, tmp_path / "outside")
    rewrite_manifest(folder, lambda m: m["shards"][0].update(file="data/../../elsewhere/train-00000-of-00003.parquet"))
    expect_invalid(folder, "shard 0 is named 'data/../../elsewhere/")


def test_a_negative_id_is_outside_the_vocabulary(small_dataset):
    """int32 ids (vocabularies over 65,536 tokens) can be negative, which uint16 ones cannot."""
    manifest = json.loads((small_dataset / "tsdkd.json").read_text())
    path = small_dataset / manifest["shards"][0]["file"]
    rows = pq.read_table(path).to_pylist()
    manifest["tokenizer"]["vocab_size"] = 70000
    assert check_rows(pa.Table.from_pylist(rows, schema=signal_schema(70000)), path, manifest).completion_tokens > 0
    for column, change in (("completion_token_ids", lambda row: row["completion_token_ids"].__setitem__(0, -7)),
                           ("teacher top-k", lambda row: row["teacher_topk_ids"][0].__setitem__(3, -5))):
        damaged = copy.deepcopy(rows)
        change(damaged[1])
        with pytest.raises(TsdkdError, match=f"row 1: {column} holds an id outside the vocabulary"):
            check_rows(pa.Table.from_pylist(damaged, schema=signal_schema(70000)), path, manifest)


def test_validation_threads_without_sched_getaffinity(small_dataset, monkeypatch):
    """macOS has no os.sched_getaffinity: validation falls back to the core count and still runs."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert usable_cores() == (os.cpu_count() or 1)
    assert validate_dataset(small_dataset)["complete"]
