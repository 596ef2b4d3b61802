"""`tsdkd run`: rounds that chain students, survive a kill at any point, and refuse other settings."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TOY_PROMPTS, TOY_STUDENT, TOY_TEACHER, assert_one_line_error, rerun_tsdkd, run_cli, signal_when
from tsdkd.fingerprint import sha256_file
from tsdkd.locks import exclusive_use
from tsdkd.rounds import setting_changes

CONFIG = """
rounds: 2
generate:
  limit: 6
  max-new-tokens: 24
  top-k: 8
  num-candidates: 3
  prompts-per-shard: 2
  backend: hf
distill:
  max-steps: 6
  save-steps: 2
  learning-rate: 0.001
  batch-size: 6
  logging-steps: 1
"""


def run_args(config, out, *extra):
    return ["run", "--prompts", str(TOY_PROMPTS), "--student", str(TOY_STUDENT), "--teacher", str(TOY_TEACHER),
            "--config", str(config), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rounds")
    config = folder / "run.yaml"
    config.write_text(CONFIG)
    result = run_cli(*run_args(config, folder / "run"))
    assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
    return config, folder / "run"


def test_rounds_chain_their_students(finished_run):
    _, out = finished_run
    first = json.loads((out / "round-1" / "signals" / "tsdkd.json").read_text())
    second = json.loads((out / "round-2" / "signals" / "tsdkd.json").read_text())
    assert first["student"]["name_or_path"] == str(TOY_STUDENT) and first["round"] == 1
    assert second["student"]["name_or_path"] == str(out / "round-1" / "student") and second["round"] == 2
    assert second["sampling"]["seed"] == first["sampling"]["seed"] + 1
    state = json.loads((out / "tsdkd_run.json").read_text())["rounds"]
    assert state == {"1": {"signals": True, "student": True}, "2": {"signals": True, "student": True}}


def test_rerun_of_a_finished_run_changes_nothing(finished_run):
    config, out = finished_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert run_cli(*run_args(config, out)).exit_code == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "tsdkd_run.json"} == \
        {p: t for p, t in before.items() if p.name != "tsdkd_run.json"}


def test_rerun_repairs_what_was_lost_and_takes_any_path_spelling(tmp_path, monkeypatch):
    """Each round's commands check their finished output on a rerun: a lost student is trained again, a damaged
    shard made again, each to what it was. The prompts and models may be named by another path."""
    config, out = tmp_path / "run.yaml", tmp_path / "run"
    config.write_text(CONFIG.replace("rounds: 2", "rounds: 1"))
    assert run_cli(*run_args(config, out)).exit_code == 0
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    (out / "round-1" / "student" / "model.safetensors").unlink()
    shard = next((out / "round-1" / "signals" / "data").glob("*.parquet"))
    shard.write_bytes(b"")
    monkeypatch.chdir(ROOT)
    relative = [os.path.relpath(a, ROOT) if a in map(str, (TOY_PROMPTS, TOY_STUDENT, TOY_TEACHER)) else a
                for a in run_args(config, out)]
    result = run_cli(*relative)
    assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
    assert "training it again" in result.stdout and "generating them again" in result.stdout
    assert f"{out}: 1 round done" in result.stdout
    assert sha256_file(shard) == sha256_file(reference / shard.relative_to(out))
    repaired, original = load_file(out / "round-1" / "student" / "model.safetensors"), \
        load_file(reference / "round-1" / "student" / "model.safetensors")
    for name in original:
        torch.testing.assert_close(repaired[name], original[name], rtol=1e-6, atol=1e-6)


def test_a_moved_run_folder_continues(finished_run, tmp_path):
    """Each round's data and students live inside --out and count by content: the folder may move (to
    another disk, another machine) and its run goes on from there."""
    config, out = finished_run
    shutil.copytree(out, tmp_path / "copy")
    moved = (tmp_path / "copy").rename(tmp_path / "moved")
    result = run_cli(*run_args(config, moved, "--rounds", "3"))
    assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
    assert result.stdout.count("already trained") == 2 and result.stdout.count("already complete") == 2
    third = json.loads((moved / "round-3" / "signals" / "tsdkd.json").read_text())
    assert third["student"]["name_or_path"] == str(moved / "round-2" / "student")
    assert (moved / "round-3" / "student" / "model.safetensors").is_file()
    fewer = run_cli(*run_args(config, moved, "--rounds", "2"))  # the shorter run is still done; round 3 is said to be left
    assert fewer.exit_code == 0, fewer.stderr[-3000:]
    assert f"note: {moved} also holds round 3 of an earlier, longer run, kept and not used: the final student is round 2's" \
        in fewer.stdout and f"final student in {moved / 'round-2' / 'student'}" in fewer.stdout


def test_a_rounds_refusal_names_the_round_and_command(finished_run, tmp_path):
    """Its --out is a folder the run chose: the line says where in the run it came from."""
    config, out = finished_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(TOY_PROMPTS.read_text() + '{"prompt": "One more?"}\n')  # edited since the run started
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    record = json.loads((copy / "tsdkd_run.json").read_text())
    record["settings"]["prompts"] = str(prompts)  # as if the run had been started from this file, since edited
    (copy / "tsdkd_run.json").write_text(json.dumps(record))
    args = run_args(config, copy)
    args[args.index("--prompts") + 1] = str(prompts)
    assert_one_line_error(run_cli(*args), f"round 1, generate: --out {copy / 'round-1' / 'signals'} holds a dataset",
                          "the prompt file's contents, changed since the dataset was started")


@pytest.mark.parametrize("gpus, extra, expected", [
    (None, [], ("not started by torchrun", "--distill-processes N")),  # under a launcher
    (4, [], ("4 GPUs are visible", "--distill-processes 4", "CUDA_VISIBLE_DEVICES=0")),
    (2, ["--distill-processes", "4"], ("--distill-processes 4: only 2 GPUs are visible",)),
])
def test_processes_and_gpus_are_checked_before_round_one(tmp_path, monkeypatch, gpus, extra, expected):
    """Several GPUs for one distillation process would be refused by the round's distillation only after its sampling
    (hours), and under a launcher every process would sample the same round: refused before anything is written."""
    if gpus is None:
        monkeypatch.setenv("LOCAL_RANK", "0")
    else:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG)
    assert_one_line_error(run_cli(*run_args(config, tmp_path / "run", *extra)), *expected)
    assert not (tmp_path / "run").exists()


ONE_ROUND = """
rounds: 1
generate: {limit: 8, max-new-tokens: 24, top-k: 8, num-candidates: 3, backend: hf}
distill: {max-steps: 4, save-steps: 1, learning-rate: 0.001, batch-size: 6, logging-steps: 1%s}
"""


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """A finished one-round run whose distillation ran in two CPU processes (gloo)."""
    folder = tmp_path_factory.mktemp("two-processes")
    config = folder / "run.yaml"
    config.write_text(ONE_ROUND % "")
    result = run_cli(*run_args(config, folder / "run", "--distill-processes", "2"))
    assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
    return config, folder / "run"


def test_distill_processes_train_like_accumulation(two_process_run, tmp_path):
    """--distill-processes 2 gives the student of one process accumulating two micro-batches, within float rounding
    as in test_distill's torchrun test; a rerun of the finished run changes nothing."""
    config, two = two_process_run
    assert (two / "round-1/distill.json").is_file() and (two / "round-1/rank-1.log").is_file()
    one_config = tmp_path / "one.yaml"
    one_config.write_text(ONE_ROUND % ", gradient-accumulation-steps: 2")
    result = run_cli(*run_args(one_config, tmp_path / "one"))
    assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
    two_processes = load_file(two / "round-1/student/model.safetensors")
    for key, value in load_file(tmp_path / "one/round-1/student/model.safetensors").items():
        torch.testing.assert_close(two_processes[key], value, rtol=1e-5, atol=1e-6)
    log = (two / "round-1/rank-1.log").read_text()
    rerun = run_cli(*run_args(config, two, "--distill-processes", "2"))
    assert rerun.exit_code == 0, rerun.stderr[-2000:]
    assert "round-1/student: already trained; nothing to do" in rerun.stdout
    assert (two / "round-1/rank-1.log").read_text() == log  # no process was started for it
    after = load_file(two / "round-1/student/model.safetensors")
    assert all(torch.equal(after[key], value) for key, value in two_processes.items())


def processes_naming(path: Path) -> list[int]:
    """The processes whose command line holds `path`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:  # ended meanwhile
            pass
    return found


@pytest.mark.parametrize("sent", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_ends_its_distill_processes_and_continues(two_process_run, tmp_path, sent):
    """Killed (SIGKILL: its distillation processes get SIGTERM from the kernel) or stopped (SIGTERM: it stops them)
    during the distillation, the run leaves no process behind to hold the round's folder; the same command then
    ends with the uninterrupted run's student, to float rounding."""
    config, reference = two_process_run
    out = tmp_path / "run"
    args = run_args(config, out, "--distill-processes", "2")
    checkpoint = out / "round-1/student/checkpoints/checkpoint-2/trainer_state.json"
    returncode, stderr = signal_when(args, checkpoint.exists, tmp_path / "stderr.txt", sent)
    assert not (out / "round-1/student/model.safetensors").exists(), "the run ended before it could be stopped"
    if sent == signal.SIGTERM:
        assert returncode == 143 and stderr.splitlines()[-1] == "terminated (SIGTERM); rerun the same command to continue"
    else:
        assert returncode == -signal.SIGKILL
    deadline = time.time() + 30
    while processes_naming(out) and time.time() < deadline:
        time.sleep(0.1)
    assert not processes_naming(out)
    rerun = rerun_tsdkd(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = load_file(out / "round-1/student/model.safetensors")
    for key, value in load_file(reference / "round-1/student/model.safetensors").items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("codes, exit_code, line", [
    ([0, 0], None, ""),
    ([0, -6], None, "note: the distillation finished in process 0; process 1 of 2 was killed by SIGABRT (its output is in L1)"),
    ([0, None], None, "note: the distillation finished in process 0; process 1 of 2 had not ended, and was stopped (its output is in L1)"),
    ([2, 1], 2, None),  # process 0's bad-input line is the cause; the other failed because it left
    ([1, None], 1, None),  # only process 0 failed: its traceback says why
    ([1, 3], 1, "process 1 of 2 failed (exit code 3) (its output is in L1); process 0 of 2 failed (exit code 1)"),
    ([None, 3], 1, "process 1 of 2 failed (exit code 3) (its output is in L1)"),
    ([-9, None], 1, "process 0 of 2 was killed by SIGKILL"),
    ([1, 0, -6], 1, "process 2 of 3 was killed by SIGABRT (its output is in L2); process 0 of 3 failed (exit code 1)"),
])
def test_how_distill_processes_end_is_judged(codes, exit_code, line, capsys):
    """Exit codes of the processes when the wait ended (None: still running, then stopped): success (with notes),
    or the run's exit code and the line it prints (None: process 0 printed it)."""
    from tsdkd.errors import ReportedFailure
    from tsdkd.launch import _judge

    logs = {1: "L1", 2: "L2"}
    if exit_code is None:
        _judge(codes, logs)
        assert capsys.readouterr().out.strip() == line
        return
    with pytest.raises(ReportedFailure) as failure:
        _judge(codes, logs)
    assert (failure.value.exit_code, failure.value.line and failure.value.line.removesuffix("; rerun the same command to continue")) == (exit_code, line)


def test_a_rounds_started_processes_failure_gets_the_rounds_prefix():
    from tsdkd.errors import ReportedFailure
    from tsdkd.rounds import in_round

    for line, expected in (("process 1 of 2 failed", "round 3, distill: process 1 of 2 failed"), (None, None)):
        with pytest.raises(ReportedFailure) as failure, in_round(3, "distill"):
            raise ReportedFailure(7, line)
        assert (failure.value.exit_code, failure.value.line) == (7, expected)


def test_a_failure_in_distill_processes_ends_in_its_one_line(tmp_path):
    """Refused by the round's distillation itself (the vocabulary is known there only): process 0 says why, the
    run ends with its exit code and says nothing more; the other process's output is in its log."""
    config = tmp_path / "run.yaml"
    config.write_text(ONE_ROUND % ", rank-items: 400")
    # A process of its own: the distillation processes write to the real stderr, which run_cli does not capture.
    result = rerun_tsdkd(run_args(config, tmp_path / "run", "--distill-processes", "2"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and sum("error:" in line for line in lines) == 1, result.stderr[-3000:]
    # With the round's context, as one process gives it.
    assert lines[-1].startswith("error: round 1, distill: --rank-items 400 exceeds the student's vocabulary"), lines[-1]
    assert "Traceback" not in result.stderr
    assert "rank-items" in (tmp_path / "run/round-1/rank-1.log").read_text()


def test_a_run_folder_in_use_is_refused(finished_run, tmp_path):
    config, _ = finished_run
    out = tmp_path / "run"
    out.mkdir()
    with exclusive_use(out, "run"):  # as the first job holds it
        assert_one_line_error(run_cli(*run_args(config, out)), "in use by another running tsdkd command", "`tsdkd run`")


@pytest.mark.parametrize("kill_when", ["round-1/student/checkpoints/checkpoint-2/trainer_state.json", "round-2/signals/tsdkd.json"])
def test_kill_and_rerun_ends_like_an_uninterrupted_run(finished_run, tmp_path, kill_when):
    config, reference = finished_run
    out = tmp_path / "run"
    returncode, _ = signal_when(run_args(config, out), (out / kill_when).exists, tmp_path / "stderr.txt", signal.SIGKILL)
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "round-2" / "student" / "model.safetensors").exists()
    rerun = rerun_tsdkd(run_args(config, out))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ours = json.loads((out / "round-1" / "signals" / "tsdkd.json").read_text())["shards"]
    theirs = json.loads((reference / "round-1" / "signals" / "tsdkd.json").read_text())["shards"]
    assert [s["sha256"] for s in ours] == [s["sha256"] for s in theirs]
    # A resumed distillation equals the uninterrupted one to float rounding (weights within 1e-6:
    # matmul kernels need not sum in the same order in a new process), so round 2, sampled from it,
    # must hold the same tokens, ranks and verdicts, and log-probs equal to rounding.
    resumed_rows, expected_rows = (pq.read_table(run / "round-2" / "signals" / "data").to_pylist() for run in (out, reference))
    assert len(resumed_rows) == len(expected_rows) > 0
    for resumed_row, expected_row in zip(resumed_rows, expected_rows):
        for key, value in expected_row.items():
            if key in ("behaviour_logprobs", "teacher_logprobs", "teacher_topk_logprobs", "teacher_tail_mass",
                       "teacher_entropy", "teacher_score"):
                np.testing.assert_allclose(resumed_row[key], value, rtol=1e-4, atol=1e-5)
            else:
                assert resumed_row[key] == value, key
    resumed = load_file(out / "round-2" / "student" / "model.safetensors")
    expected = load_file(reference / "round-2" / "student" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-6, atol=1e-6)


def test_rerun_may_switch_gradient_checkpointing_on(finished_run, tmp_path):
    """As after running out of memory: the same run with gradient checkpointing (or smaller logit chunks, other
    logging or checkpoint settings) goes on (here: finds nothing left to do), while any other changed distill
    setting is refused."""
    config, out = finished_run
    with_checkpointing = tmp_path / "run.yaml"
    with_checkpointing.write_text(config.read_text().replace("logging-steps: 1", "logging-steps: 3") +
                                  "  gradient-checkpointing: true\n  logit-chunk-tokens: 64\n  keep-checkpoints: true\n")
    result = run_cli(*run_args(with_checkpointing, out))
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    other = tmp_path / "other.yaml"
    other.write_text(config.read_text() + "  jsd-beta: 0.5\n")
    assert_one_line_error(run_cli(*run_args(other, out)), "other settings", "distill")


def test_other_settings_are_refused(finished_run, tmp_path):
    config, out = finished_run
    before = (out / "tsdkd_run.json").read_text()
    assert_one_line_error(run_cli(*run_args(config, out, "--seed", "5")), "other settings", "seed")
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  seed: 3\n")
    assert_one_line_error(run_cli(*run_args(bad, tmp_path / "o")), "generate.seed")
    bad.write_text("distill:\n  jsd_beta: high\n")
    assert_one_line_error(run_cli(*run_args(bad, tmp_path / "o")), f"config file {bad}, distill section", "jsd_beta",
                          "must be a number")
    # Out of range: refused before round 1's generate runs and before the run records the value.
    bad.write_text("distill:\n  jsd_beta: 1.5\n")
    assert_one_line_error(run_cli(*run_args(bad, tmp_path / "o")), "--jsd-beta")
    bad.write_text("generate:\n  top_k: 0\n")
    assert_one_line_error(run_cli(*run_args(bad, tmp_path / "o")), "--top-k")
    assert not (tmp_path / "o").exists()
    (tmp_path / "a-file").write_text("")
    assert_one_line_error(run_cli(*run_args(config, tmp_path / "a-file")), "is a file")
    for damaged in ('{"settings": {}', "[]"):  # cut short (hand edit, failing disk), or not a run manifest
        (tmp_path / "damaged").mkdir(exist_ok=True)
        (tmp_path / "damaged" / "tsdkd_run.json").write_text(damaged)
        assert_one_line_error(run_cli(*run_args(config, tmp_path / "damaged")), "tsdkd_run.json", "another folder")
    assert_one_line_error(run_cli(*run_args(config, tmp_path / "o2", "--rounds", "0")), "--rounds")
    assert (out / "tsdkd_run.json").read_text() == before


def test_memory_and_speed_settings_are_free_in_a_continued_run(tmp_path):
    """Neither section's memory, speed, logging or checkpoint settings count as a change, also where a run
    recorded them (as runs did before they were free); a content setting does."""
    recorded = {"generate": {"top_k": 8, "gpu_memory_utilization": 0.9, "enforce_eager": False},
                "distill": {"learning_rate": 1e-3, "logging_steps": 5, "save_steps": 50, "logit_chunk_tokens": 64}}
    wanted = {"generate": {"top_k": 8, "gpu_memory_utilization": 0.7, "enforce_eager": True}, "distill": {"learning_rate": 1e-3}}
    assert setting_changes(recorded, wanted, tmp_path / "tsdkd_run.json") == []
    wanted["generate"]["top_k"] = 5
    assert setting_changes(recorded, wanted, tmp_path / "tsdkd_run.json") == [("generate", "generate.top_k: 8 in the run, 5 now")]
    # The saved student's dtype too: a save that failed for it (beyond float16's range) is rerun with another.
    wanted = {"generate": recorded["generate"], "distill": {**recorded["distill"], "save_dtype": "bfloat16"}}
    assert setting_changes(recorded, wanted, tmp_path / "tsdkd_run.json") == []


def test_any_setting_may_change_until_a_round_makes_something(tmp_path):
    """Round 1's generate refuses an option only it can check (the teacher's vocabulary bounds top-k): the run
    recorded its settings, but nothing was made, so the corrected command starts the run."""
    config, out = tmp_path / "run.yaml", tmp_path / "run"
    config.write_text(CONFIG.replace("rounds: 2", "rounds: 1").replace("top-k: 8", "top-k: 100000"))
    failed = run_cli(*run_args(config, out))
    assert failed.exit_code == 2 and "--top-k 100000 is above" in failed.stderr
    assert (out / "tsdkd_run.json").is_file()
    config.write_text(CONFIG.replace("rounds: 2", "rounds: 1"))
    result = run_cli(*run_args(config, out))
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    assert "no round has made anything yet; the new settings replace the recorded ones" in result.stdout
    assert json.loads((out / "tsdkd_run.json").read_text())["settings"]["generate"]["top_k"] == 8


def test_distill_settings_may_change_until_a_round_distils(tmp_path, monkeypatch):
    """Round 1 stops at the start of its distillation on a setting only the student can refuse (top-m
    above its vocabulary): the rerun with that setting fixed keeps round 1's signals and goes on. Once a
    round has distilled, the distill settings are fixed again."""
    one_round = CONFIG.replace("rounds: 2", "rounds: 1")
    config, out = tmp_path / "run.yaml", tmp_path / "run"
    config.write_text(one_round + "  rank-items: 400\n")
    failed = run_cli(*run_args(config, out))  # after round 1's sampling, whose progress bars come first
    assert failed.exit_code == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == "error: round 1, distill: --rank-items 400 exceeds the student's vocabulary (325 tokens)"
    shards = {path: path.stat().st_mtime_ns for path in (out / "round-1" / "signals" / "data").glob("*.parquet")}
    assert shards
    assert json.loads((out / "round-1" / "distill.json").read_text())["rank_items"] == 400  # the round's settings, as tried
    config.write_text(one_round)
    # The number of distillation processes counts as a distill setting (it changes the optimizer batch).
    monkeypatch.setattr("tsdkd.validate.usable_cores", lambda: 1)
    result = run_cli(*run_args(config, out, "--distill-processes", "2"))
    assert result.exit_code == 0 and "new distill settings" in result.stdout, (result.stderr[-2000:], result.exception)
    assert "note: 2 processes share 1 CPU core on this machine without GPUs" in result.stdout
    assert json.loads((out / "round-1" / "distill.json").read_text())["rank_items"] == 10
    assert {path: path.stat().st_mtime_ns for path in shards} == shards  # sampled once
    assert (out / "round-1" / "student" / "model.safetensors").is_file()
    config.write_text(one_round + "  jsd-beta: 0.5\n")
    assert_one_line_error(run_cli(*run_args(config, out, "--distill-processes", "2")), "other settings", "distill")
    config.write_text(one_round)
    assert_one_line_error(run_cli(*run_args(config, out)), "other settings", "distill_processes: 2 in the run, 1 now")


def test_rerun_compares_typed_settings_and_names_each_change(tmp_path):
    """A run started with `--learning-rate 1e-4 --epochs 30` continues from a config file saying the same in
    YAML (where PyYAML reads `1e-4` as a string), also from a run record written before the settings were
    typed; another value is refused naming the key and both values. Round 1 stops at once on the missing
    prompt file, after the run record: which error comes back shows whether the settings were accepted."""
    prompts, out = tmp_path / "missing.jsonl", tmp_path / "run"
    args = ["run", "--prompts", prompts, "--student", TOY_STUDENT, "--teacher", TOY_TEACHER, "--out", out]
    not_found = f"prompt file {prompts} not found"
    assert_one_line_error(run_cli(*args, "--learning-rate", "1e-4", "--epochs", "30"), not_found)
    # As after round 1's distillation started: distill settings are fixed from then on.
    manifest_path = out / "tsdkd_run.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["rounds"] = {"1": {"signals": True, "student": False}}
    manifest_path.write_text(json.dumps(manifest))
    (out / "round-1" / "student").mkdir(parents=True)
    (out / "round-1" / "student" / "tsdkd_distill.json").write_text("{}")
    config = tmp_path / "run.yaml"
    config.write_text("distill:\n  learning_rate: 1e-4\n  epochs: 30\n")
    assert_one_line_error(run_cli(*args, "--config", config), not_found)
    manifest["settings"]["distill"]["learning_rate"] = "1e-4"  # as such a record held it before
    manifest_path.write_text(json.dumps(manifest))
    assert_one_line_error(run_cli(*args, "--config", config), not_found)
    config.write_text("distill:\n  learning_rate: 1e-3\n  epochs: 30\n")
    assert_one_line_error(run_cli(*args, "--config", config),
                          "(distill.learning_rate: 0.0001 in the run, 0.001 now); "
                          "rerun with the run's settings to resume it, or choose a new --out")


@pytest.mark.parametrize("stop_when", ["round-1/signals/data/train-00000-of-00003.parquet",
                                       "round-1/student/checkpoints/checkpoint-2/trainer_state.json"])
def test_sigterm_ends_in_one_line_and_the_rerun_finishes(tmp_path, stop_when):
    """SIGTERM (a cluster preemption, `timeout`) during generate or distill ends like Ctrl-C: one line saying
    how to continue, exit code 143 (128 + 15, as if killed), no traceback; rerunning finishes the run."""
    config, out = tmp_path / "run.yaml", tmp_path / "run"
    config.write_text(CONFIG.replace("rounds: 2", "rounds: 1"))
    returncode, output = signal_when(run_args(config, out), (out / stop_when).exists, tmp_path / "stderr.txt")
    assert returncode == 143, (returncode, output[-3000:])
    assert "Traceback" not in output
    # Once, to the end of its line (which a progress bar left unfinished may have begun).
    assert re.findall(r"terminated \(SIGTERM\).*", output) == ["terminated (SIGTERM); rerun the same command to continue"], \
        output[-3000:]
    assert not (out / "round-1" / "student" / "model.safetensors").exists()
    rerun = run_cli(*run_args(config, out))
    assert rerun.exit_code == 0, rerun.stderr[-3000:]
    assert (out / "round-1" / "student" / "model.safetensors").is_file()
