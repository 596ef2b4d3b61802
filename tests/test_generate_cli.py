"""`tsdkd generate` as a user drives it: config files, refusals, bad input, resume, split and merge."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import SMALL_JOB, TOY_PROMPTS, TOY_TEACHER, assert_one_line_error, rerun_tsdkd, run_cli, signal_when
from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import differing_settings, sha256_file
from tsdkd.loading import gpu_has_bf16
from tsdkd.locks import exclusive_use


def shard_hashes(folder):
    return [e["sha256"] for e in json.loads((folder / "tsdkd.json").read_text())["shards"]]


def tree_state(folder):
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def option(name):
    return SMALL_JOB[SMALL_JOB.index(name) + 1]


def test_config_file_equals_command_line(small_dataset, tmp_path):
    keys = {SMALL_JOB[i].lstrip("-").replace("-", "_"): SMALL_JOB[i + 1] for i in range(0, len(SMALL_JOB), 2)}
    typed = {k: int(v) if v.isdigit() else v for k, v in keys.items()}
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("".join(f"{k.replace('_', '-')}: {json.dumps(v)}\n" for k, v in typed.items()))
    result = run_cli("generate", "--config", yaml_file, "--out", tmp_path / "from-yaml")
    assert result.exit_code == 0, result.stderr
    assert shard_hashes(tmp_path / "from-yaml") == shard_hashes(small_dataset)
    toml_file = tmp_path / "job.toml"
    toml_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in {**typed, "top_k": 5}.items()))
    # The command line wins over the file.
    result = run_cli("generate", "--config", toml_file, "--top-k", "8", "--out", tmp_path / "from-toml")
    assert result.exit_code == 0, result.stderr
    assert shard_hashes(tmp_path / "from-toml") == shard_hashes(small_dataset)


def test_rerun_of_a_finished_dataset_does_nothing(small_dataset):
    before = tree_state(small_dataset)
    result = run_cli("generate", *SMALL_JOB, "--out", small_dataset)
    assert result.exit_code == 0 and "already complete" in result.stdout
    assert tree_state(small_dataset) == before


def test_rerun_names_the_models_by_any_path(small_dataset, tmp_path):
    """A model folder named through a link (or moved) is the same model: its weights are hashed."""
    result = run_cli("generate", *with_models_under(tmp_path), "--out", small_dataset)
    assert result.exit_code == 0 and "already complete" in result.stdout, result.stderr
    swapped = list(SMALL_JOB)
    swapped[swapped.index("--student") + 1] = option("--teacher")  # same tokenizer, other weights
    assert_one_line_error(run_cli("generate", *swapped, "--out", small_dataset), "other settings", "student")


def test_rerun_with_another_chat_template_is_refused(small_dataset, tmp_path):
    """Same weights (the same model by content), but prompts would be rendered otherwise."""
    student = tmp_path / "student"
    shutil.copytree(option("--student"), student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    tokenizer.save_pretrained(student)
    job = list(SMALL_JOB)
    job[job.index("--student") + 1] = str(student)
    assert_one_line_error(run_cli("generate", *job, "--out", small_dataset), "other settings", "tokenizer")


def test_settings_differ_by_keys_of_either_side():
    assert differing_settings({"top_k": 8, "dtype": "bf16"}, {"top_k": 8}) == ["dtype"]
    assert differing_settings({"top_k": 8}, {"top_k": 8, "dtype": "bf16"}) == ["dtype"]


def test_rerun_with_other_settings_is_refused(small_dataset, tmp_path):
    before = tree_state(small_dataset)
    job = list(SMALL_JOB)
    job[job.index("--top-k") + 1] = "4"
    assert_one_line_error(run_cli("generate", *job, "--out", small_dataset), "differs in: top_k (8 in the dataset, 4 now)")
    job = [*SMALL_JOB, "--max-new-tokens", "30", "--batch-size", "3"]  # a group of settings: the entries named
    assert_one_line_error(run_cli("generate", *job, "--out", small_dataset),
                          "differs in: sampling.batch_size (4 in the dataset, 3 now), sampling.max_new_tokens (24 in the "
                          "dataset, 30 now)")
    assert tree_state(small_dataset) == before
    edited = tmp_path / "prompts.jsonl"  # the same prompts, one more line at the end: a changed file
    edited.write_text(TOY_PROMPTS.read_text() + '{"prompt": "One more?"}\n')
    job = list(SMALL_JOB)
    job[job.index("--prompts") + 1] = str(edited)
    assert_one_line_error(run_cli("generate", *job, "--out", small_dataset),
                          "differs in: the prompt file's contents, changed since the dataset was started")
    edited.write_text("".join(TOY_PROMPTS.read_text().splitlines(keepends=True)[:5]))  # fewer prompts than --limit
    assert_one_line_error(run_cli("generate", *job, "--out", small_dataset),
                          "differs in: the prompt file's contents, changed since the dataset was started")
    assert tree_state(small_dataset) == before
    # The same student's name with other weights (a hub branch that moved, a folder trained since): said so.
    moved = tmp_path / "moved"
    shutil.copytree(small_dataset, moved)
    manifest = json.loads((moved / "tsdkd.json").read_text())
    manifest["settings"]["student"]["weights_sha256"] = "0" * 64
    (moved / "tsdkd.json").write_text(json.dumps(manifest))
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--out", moved),
                          "differs in: student (the same name, other weights or config: a hub branch that moved")


def test_a_refusal_names_each_setting_that_differs():
    from stage1_generate.generate import described_change

    assert described_change("top_k", 8, 4) == "top_k (8 in the dataset, 4 now)"
    assert described_change("prompts", {"sha256": "a" * 64, "limit": None, "count": 2}, {"sha256": "b" * 64, "limit": 5, "count": 2}) == \
        "prompts.limit (None in the dataset, 5 now), prompts.sha256 ('aaaaaaaaaaaa...' in the dataset, 'bbbbbbbbbbbb...' now)"
    assert described_change("job", {"shard_index": None}, {}) == "job"  # unequal, with no entry of its own that differs


def test_repeated_prompts_are_kept_once_and_said(tmp_path):
    """Identical prompts would share a prompt id: each is kept at its first row, with a note that names a repeat whose
    gold answer differs from the kept row's (one of them is wrong; 2.0 is 2)."""
    rows = [{"prompt": "1 + 1?", "answer": "2"}, {"prompt": "2 + 2?", "answer": "4"}, {"prompt": "1 + 1?", "answer": "2.0"},
            {"prompt": "2 + 2?", "answer": "5"}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    job = list(SMALL_JOB)
    job[job.index("--prompts") + 1] = str(prompts)
    result = run_cli("generate", *job, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert (f"note: 2 repeated prompts left out, each kept at its first row; 1 with another gold answer than that row's "
            f"({prompts} line 4 against {prompts} line 2)") in result.stdout
    manifest = json.loads((tmp_path / "out/tsdkd.json").read_text())
    assert (manifest["prompts"]["duplicates_dropped"], manifest["stats"]["prompts"]) == (2, 2)
    rerun = run_cli("generate", *job, "--out", tmp_path / "out")  # said as the dataset started, not again
    assert rerun.exit_code == 0 and "already complete" in rerun.stdout and "repeated prompt" not in rerun.stdout


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def with_option(name, value):
    job = list(SMALL_JOB)
    if name in job:
        job[job.index(name) + 1] = str(value)
    else:
        job += [name, str(value)]
    return job


@pytest.mark.parametrize(
    "make_args, fragments",
    [
        (lambda tmp: with_option("--prompts", tmp / "missing.jsonl"), ["missing.jsonl", "not found"]),
        (lambda tmp: with_option("--prompts", write_jsonl(tmp / "p.jsonl", [{"text": "1+1?"}])), ["none of the fields", "text"]),
        (lambda tmp: with_option("--prompts", write_jsonl(tmp / "p.jsonl", [{"prompt": "1+1?"}, {"prompt": "  "}])), ["line 2", "empty"]),
        (lambda tmp: with_option("--prompts", write_jsonl(tmp / "p.jsonl", [{"prompt": "1 + 2 " * 600}])), ["line 1", "context of 1024"]),
        (lambda tmp: with_option("--prompts", write_jsonl(tmp / "p.jsonl", [{"prompt": 7}])), ["line 1", "must be a string"]),
        (lambda tmp: with_option("--answer-field", "solution_text"), ["no field 'solution_text'", "name one of them with --answer-field"]),
        (lambda tmp: with_option("--top-k", "325"), ["--top-k 325", "limit of 324"]),
        (lambda tmp: with_option("--top-p", "0"), ["--top-p"]),
        (lambda tmp: with_option("--backend", "tpu"), ["--backend must be one of"]),
        (lambda tmp: with_option("--student", tmp / "nope"), ["--student", "no such model folder"]),
        (lambda tmp: with_option("--config", tmp / "none.yaml"), ["config file", "not found"]),
    ],
)
def test_bad_input(tmp_path, make_args, fragments):
    out = tmp_path / "out"
    assert_one_line_error(run_cli("generate", *make_args(tmp_path), "--out", out), *fragments)
    assert not (out / "tsdkd.json").exists()


def test_an_over_long_prompt_is_one_line_in_a_process_of_its_own(tmp_path):
    """transformers warns of a sequence longer than the tokenizer's maximum on stderr, which the in-process runner does
    not capture: in a process of its own, the error is still the only line."""
    job = with_option("--prompts", write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1 + 2 " * 600}]))
    done = rerun_tsdkd(["generate", *job, "--out", tmp_path / "out"])
    assert done.returncode == 2 and [line for line in done.stderr.splitlines() if line.strip()] == \
        [line for line in done.stderr.splitlines() if line.startswith("error: ") and "context of 1024" in line], done.stderr


def test_bad_config_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: many\n")
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--config", bad, "--out", tmp_path / "o"), "seed", "must be a whole number")
    bad.write_text("topk: 3\n")
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--config", bad, "--out", tmp_path / "o"),
                          "unknown key 'topk' (did you mean 'top_k'?)")
    bad.write_text("top_p: 2\n")  # out of range: the refusal says where the value came from
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--config", bad, "--out", tmp_path / "o"), f"--top-p (set in {bad}) must be in")
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--config", bad, "--top-p", "3", "--out", tmp_path / "o"),
                          "--top-p must be in")
    bad.write_text("temperature: 0\n")  # a refusal naming two options is not put on the file's one
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--config", bad, "--out", tmp_path / "o"),
                          "error: --temperature 0 (greedy) gives identical candidates: use --num-candidates 1")
    bad.write_text("distill:\n  learning_rate: 0.1\n")
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--config", bad, "--out", tmp_path / "o"),
                          "a `distill:` section belongs in a `tsdkd run` config")
    bad.write_text("top_k: [1\n")
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--config", bad, "--out", tmp_path / "o"), "not valid YAML")


def test_teacher_with_another_tokenizer_is_refused(tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(TOY_TEACHER, teacher)
    tokenizer = AutoTokenizer.from_pretrained(TOY_TEACHER)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(teacher)
    assert_one_line_error(run_cli("generate", *with_option("--teacher", teacher), "--out", tmp_path / "o"), "different tokenizers")


def test_unwritable_output_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--out", blocker), "is a file")
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--out", blocker / "sub"), "cannot write there")
    assert blocker.read_text() == "a file, not a folder"
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--out", occupied), "not empty")
    assert (occupied / "notes.txt").read_text() == "mine"


def with_models_under(folder):
    """SMALL_JOB with the student and teacher named through a link in `folder`, as another machine would name them."""
    (folder / "models").symlink_to(TOY_TEACHER.parent)
    job = list(SMALL_JOB)
    for name in ("--student", "--teacher"):
        job[job.index(name) + 1] = str(folder / "models" / Path(option(name)).name)
    return job


def test_split_job_merges_into_the_single_job_dataset(small_dataset, tmp_path):
    parts = []
    # The second machine keeps the models under another path.
    for index, job in enumerate([SMALL_JOB, with_models_under(tmp_path)]):
        part = tmp_path / f"part{index}"
        result = run_cli("generate", *job, "--num-shards", "2", "--shard-index", str(index), "--out", part)
        assert result.exit_code == 0, result.stderr
        parts.append(part)
    assert len(shard_hashes(parts[0])) == 2 and len(shard_hashes(parts[1])) == 1
    merged = tmp_path / "merged"
    result = run_cli("merge", *parts, "--out", merged)
    assert result.exit_code == 0, result.stderr
    assert shard_hashes(merged) == shard_hashes(small_dataset)
    assert run_cli("validate", merged).exit_code == 0
    assert_one_line_error(run_cli("merge", parts[0], "--out", tmp_path / "half"), "exactly once")
    assert_one_line_error(run_cli("merge", parts[0], parts[0], "--out", tmp_path / "twice"),
                          f"{parts[0]} and {parts[0]} are the same part of the job (1 of 2); give each part once")
    assert_one_line_error(run_cli("merge", small_dataset, parts[1], "--out", tmp_path / "mixed"), "split in different ways",
                          f"{small_dataset}: part 1 of 1; {parts[1]}: part 2 of 2")
    other_seed = tmp_path / "other-seed"
    assert run_cli("generate", *SMALL_JOB, "--seed", "1", "--num-shards", "2", "--shard-index", "1", "--out", other_seed).exit_code == 0
    assert_one_line_error(run_cli("merge", parts[0], other_seed, "--out", tmp_path / "other"),
                          f"{other_seed}: made with other settings than {parts[0]} (differs in: sampling)",
                          "to train on several datasets, give each to `tsdkd distill` with a --signals of its own")
    assert_one_line_error(run_cli("merge", *parts, "--out", merged), "already exists")
    assert_one_line_error(run_cli("merge", *parts, "--out", merged / "tsdkd.json" / "x"), "cannot write the merged dataset there")


def test_a_folder_in_use_is_refused(tmp_path):
    """A rerun continues what is in --out, so a job submitted twice must not write twice into one folder. The
    refusal names the process that holds it."""
    out = tmp_path / "out"
    out.mkdir()
    holds = "import fcntl, os, sys, time; fcntl.flock(os.open(sys.argv[1], os.O_RDONLY), fcntl.LOCK_EX); print(flush=True); time.sleep(60)"
    first = subprocess.Popen([sys.executable, "-c", holds, str(out)], stdout=subprocess.PIPE)  # as the first job
    try:
        first.stdout.readline()
        assert_one_line_error(run_cli("generate", *SMALL_JOB, "--out", out), "in use by another running tsdkd command",
                              f"(pid {first.pid}: {sys.executable} -c import fcntl", "`tsdkd generate`")
        assert not any(out.iterdir())
    finally:
        first.kill()
        first.wait()


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """Data loader workers and engine processes may be forked while a command holds its lock: once the command
    ends, a rerun must not be refused because a child still runs."""
    out = tmp_path / "out"
    out.mkdir()
    started, ready = os.pipe()
    with exclusive_use(out, "generate"):
        child = os.fork()
        if child == 0:  # the child outlives its parent's lock
            os.write(ready, b"x")  # the fork hooks have run
            time.sleep(3)
            os._exit(0)
        os.read(started, 1)
    try:
        with exclusive_use(out, "generate"):
            pass
    finally:
        os.waitpid(child, 0)
        os.close(started)
        os.close(ready)


def test_a_part_of_a_split_job_without_prompts_is_refused(tmp_path):
    """The 12 prompts make 3 shards of 4: a fourth machine would get nothing and say nothing."""
    out = tmp_path / "part3"
    result = run_cli("generate", *SMALL_JOB, "--num-shards", "4", "--shard-index", "3", "--out", out)
    assert_one_line_error(result, "--shard-index 3", "3 shard(s)", "--prompts-per-shard 3 or less")
    assert not out.exists()


def test_resume_after_kill_matches_an_uninterrupted_run(small_dataset, tmp_path):
    """SIGKILL the real command once its first shard is final, rerun it, compare with a clean run."""
    out = tmp_path / "killed"
    # One prompt per shard: twelve shards, so the kill lands between two of them.
    args = ["generate", *SMALL_JOB, "--prompts-per-shard", "1", "--out", str(out)]
    clean = tmp_path / "clean"
    assert run_cli("generate", *SMALL_JOB, "--prompts-per-shard", "1", "--out", clean).exit_code == 0
    manifest = out / "tsdkd.json"
    returncode, _ = signal_when(args, lambda: manifest.exists() and bool(json.loads(manifest.read_text())["shards"]),
                                tmp_path / "stderr.txt", signal.SIGKILL)
    killed_at = json.loads(manifest.read_text())
    assert returncode == -signal.SIGKILL and not killed_at["complete"], "the run ended before it could be killed"
    finished_before = {e["file"]: e["sha256"] for e in killed_at["shards"]}
    rerun = rerun_tsdkd(args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    kept = len(killed_at["shards"])
    assert re.search(rf"{out}: continuing: {kept} of 12 shards done, \d+ more sampled and waiting for the teacher", rerun.stdout)
    assert shard_hashes(out) == shard_hashes(clean)
    for file, digest in finished_before.items():
        assert sha256_file(out / file) == digest
    assert not (out / ".work").exists()


def test_resume_redoes_a_damaged_shard(small_dataset, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(small_dataset, folder)
    manifest = json.loads((folder / "tsdkd.json").read_text())
    manifest["complete"] = False
    here = "bfloat16" if gpu_has_bf16() else "float32"  # what `--dtype auto` runs the models in on this machine
    elsewhere = manifest["backend"]["dtype"] = "float32" if here == "bfloat16" else "bfloat16"  # as if started elsewhere
    (folder / "tsdkd.json").write_text(json.dumps(manifest))
    damaged = folder / manifest["shards"][1]["file"]
    damaged.write_bytes(b"garbage")
    result = run_cli("generate", *SMALL_JOB, "--out", folder)
    assert result.exit_code == 0, result.stderr
    assert f"note: {folder} was started with the models in {elsewhere} (as its manifest says); on this machine they " \
           f"run in {here}" in result.stdout
    assert shard_hashes(folder) == shard_hashes(small_dataset)
    # A manifest written before dtypes were resolved says "auto": unknown, so nothing to say.
    manifest["backend"]["dtype"] = "auto"
    (folder / "tsdkd.json").write_text(json.dumps(manifest))
    damaged.write_bytes(b"garbage")
    result = run_cli("generate", *SMALL_JOB, "--out", folder)
    assert result.exit_code == 0 and "was started with the models in" not in result.stdout
    assert sha256_file(damaged) == manifest["shards"][1]["sha256"]


def test_rerun_of_a_finished_dataset_redoes_lost_and_corrupt_shards(small_dataset, tmp_path):
    """What `tsdkd validate` advises for a shard lost or damaged after the run finished."""
    folder = tmp_path / "copy"
    shutil.copytree(small_dataset, folder)
    entries = json.loads((folder / "tsdkd.json").read_text())["shards"]
    (folder / entries[0]["file"]).unlink()
    (folder / entries[2]["file"]).write_bytes(b"")
    assert_one_line_error(run_cli("validate", folder), "shard missing", "rerun the `tsdkd generate` command")
    untouched = sha256_file(folder / entries[1]["file"]), (folder / entries[1]["file"]).stat().st_mtime_ns
    result = run_cli("generate", *SMALL_JOB, "--out", folder)
    assert result.exit_code == 0, result.stderr
    assert f"2 of {len(entries)} shards missing or damaged" in result.stdout
    assert shard_hashes(folder) == shard_hashes(small_dataset)
    assert (sha256_file(folder / entries[1]["file"]), (folder / entries[1]["file"]).stat().st_mtime_ns) == untouched
    assert run_cli("validate", folder).exit_code == 0
    assert "already complete" in run_cli("generate", *SMALL_JOB, "--out", folder).stdout


def test_backend_auto_needs_vllm_and_a_gpu(monkeypatch):
    from stage1_generate import generate as generate_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generate_module.resolve_backend("auto") == "hf"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert generate_module.resolve_backend("auto") == "vllm"
    monkeypatch.setattr(generate_module.importlib.util, "find_spec", lambda name: None)
    assert generate_module.resolve_backend("auto") == "hf"
    with pytest.raises(TsdkdError, match="vLLM is not installed"):
        generate_module.resolve_backend("vllm")
