"""`tsdkd distill` on the transformers Trainer: output, presets, exact accumulation, DDP, resume, bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from conftest import (SMALL_JOB, ROOT, TOY_PROMPTS, TOY_STUDENT, TOY_TEACHER, assert_ends_in_one_error_line, assert_one_line_error,
                      flip_byte, rerun_tsdkd, run_cli, signal_when, tsdkd_process)
import stage2_distill.chunked as chunked_module
import stage2_distill.distill as distill_module
from fsdp_worker import batch_halves, distill_trainer, prompts_batch, toy_student
from stage2_distill.data import SignalBatches, collate_single
from stage2_distill.distill import (check_output, create_output, drop_metrics_after, note_data_origin,
                                    read_run_info, signals_jobs_checksum, training_arguments, use_bf16)
from stage2_distill.objective import Objective
from stage2_distill.trainer import DistillTrainer, check_deepspeed_config, keep_float32_outputs
from tsdkd.config import DISTILL_RUN_INFO, DistillConfig
from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import model_identity, sha256_file, sha256_json
from tsdkd.locks import exclusive_use, in_use, writable_folder

FAST = ["--learning-rate", "1e-3", "--logging-steps", "1", "--batch-size", "6"]
# Tokens per chunk of the head's log-softmax in one_step_parameters: several chunks per micro-batch.
CHUNK_TOKENS = 7


def distill_args(signals, out, *extra, student=TOY_STUDENT):
    return ["distill", "--signals", str(signals), "--student", str(student), "--out", str(out), *FAST, *extra]


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def step_records(folder):
    return [r for r in metrics(folder) if "loss" in r]


def test_output_is_a_hub_style_student(small_dataset, tmp_path):
    out = tmp_path / "student"
    umask = os.umask(0o022)
    try:
        result = run_cli(*distill_args(small_dataset, out, "--max-steps", "3"))
    finally:
        os.umask(umask)
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    # Shared like any file the umask lets others read (safetensors alone would write the weights 0600).
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()} == \
        {p.name: "0o644" for p in out.iterdir() if p.is_file()}
    # No record of how this session loaded the tokenizer (transformers adds them).
    assert not {"is_local", "local_files_only"} & json.loads((out / "tokenizer_config.json").read_text()).keys()
    model = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(TOY_STUDENT)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id != tokenizer.pad_token_id
    assert not [p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    records = step_records(out)
    assert len(records) == 3
    for key in ("direct", "indirect_token", "indirect_sequence", "entropy", "token_weight_mean",
                "selected_fraction", "student_entropy", "tokens_per_s", "loss"):
        assert all(key in r for r in records), key
    weighted = records[0]["direct"] + 0.1 * (records[0]["indirect_token"] + records[0]["indirect_sequence"]) + records[0]["entropy"]
    assert records[0]["loss"] == pytest.approx(weighted, rel=1e-5)
    info = json.loads((out / "tsdkd_distill.json").read_text())
    assert info["complete"] and info["token_weight_entropy"] == "exact"


def test_the_student_has_a_model_card_with_the_students_license(small_dataset, tmp_path):
    """A Hub card (README.md): how the student was made, from which signals; the base model and license of the student's
    own card carried over, with its license file; the card of a student without one names neither."""
    from huggingface_hub import ModelCard

    student = tmp_path / "student"
    shutil.copytree(TOY_STUDENT, student)
    (student / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n"
                                       "tags:\n- math\n---\n# The toy student\n")
    (student / "LICENSE").write_text("Apache License, Version 2.0 (toy copy)\n")
    for folder, source in (("carried", student), ("plain", TOY_STUDENT)):
        assert run_cli(*distill_args(small_dataset, tmp_path / folder, "--max-steps", "2", student=source)).exit_code == 0
    card = ModelCard.load(tmp_path / "carried/README.md")
    assert (card.data.license, card.data.base_model, card.data.library_name, card.data.pipeline_tag) == \
        ("apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct", "transformers", "text-generation")
    assert "tsdkd" in card.data.tags
    # Paths by their last part, a `student` or `signals` folder (a round's) with its parent.
    assert f"trained `{tmp_path.name}/student` for 2 optimizer steps" in card.text
    assert f"| `{small_dataset.name}` | 0 | `{TOY_TEACHER.name}` |" in card.text
    assert (tmp_path / "carried/LICENSE").read_text() == (student / "LICENSE").read_text()
    plain = ModelCard.load(tmp_path / "plain/README.md").data
    assert plain.license is None and plain.base_model is None and not (tmp_path / "plain/LICENSE").exists()
    # The card is not the student: deleted, the finished run is still finished.
    (tmp_path / "carried/README.md").unlink()
    rerun = run_cli(*distill_args(small_dataset, tmp_path / "carried", "--max-steps", "2", student=student))
    assert rerun.exit_code == 0 and "already trained" in rerun.stdout
    # A card header that does not parse (YAML's own errors) stops nothing.
    (student / "README.md").write_text("---\nlicense: [apache\n---\n# broken\n")
    broken = run_cli(*distill_args(small_dataset, tmp_path / "broken", "--max-steps", "1", student=student))
    assert broken.exit_code == 0, (broken.stderr[-2000:], broken.exception)
    assert "README.md: cannot read its card" in broken.stdout
    assert ModelCard.load(tmp_path / "broken/README.md").data.license is None


def test_a_hub_students_card_and_license_come_from_the_hub_cache(small_dataset, tmp_path):
    repo = tmp_path / "hub" / "models--me--toy"
    snapshot = make_hub_snapshot(repo, "a" * 40, TOY_STUDENT / "model.safetensors", "---\nlicense: apache-2.0\nlanguage: en\n---\n")
    (snapshot / "LICENSE").write_text("Apache License, Version 2.0 (toy copy)\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    done = with_hub_cache(tmp_path / "hub", "-m", "tsdkd", *distill_args(small_dataset, tmp_path / "out", "--max-steps", "1",
                                                                      student="me/toy"))
    assert done.returncode == 0, done.stderr[-2000:]
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "out/README.md").data
    assert (card.base_model, card.license, card.language) == ("me/toy", "apache-2.0", "en")
    assert (tmp_path / "out/LICENSE").read_text() == (snapshot / "LICENSE").read_text()
    # Its snapshot folder, passed to pin a revision: the same base model, and the revision named.
    pinned = run_cli(*distill_args(small_dataset, tmp_path / "pinned", "--max-steps", "1", student=snapshot))
    assert pinned.exit_code == 0, (pinned.stderr[-2000:], pinned.exception)
    card = ModelCard.load(tmp_path / "pinned/README.md")
    assert (card.data.base_model, card.data.license, card.data.language) == ("me/toy", "apache-2.0", "en")
    assert f"trained `me/toy` at revision `{'a' * 12}` for 1 optimizer step" in card.text


def test_a_revision_of_a_hub_model_is_its_snapshot(small_dataset, tmp_path):
    """--student-revision / --teacher-revision (a branch, tag or commit of a hub id) read that snapshot of the hub cache:
    it is the model trained, scored with and recorded, and the student's card names it; a rerun naming the same
    snapshot another way continues the run, one naming other weights is refused. A revision the cache lacks (offline),
    an empty one, or one given for a folder or a path that is neither, is one line and exit 2."""
    from huggingface_hub import ModelCard

    repo = tmp_path / "hub" / "models--me--toy"
    main = make_hub_snapshot(repo, "a" * 40, TOY_STUDENT / "model.safetensors", "---\nlicense: apache-2.0\n---\n")
    tagged = make_hub_snapshot(repo, "b" * 40, other_weights(tmp_path / "other.safetensors"), "---\nlicense: mit\n---\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "v2").write_text("b" * 40)

    def tsdkd(*args):
        return with_hub_cache(tmp_path / "hub", "-m", "tsdkd", *args)

    def distill_into(out, *student):
        return tsdkd(*distill_args(small_dataset, out, "--max-steps", "1", *student[1:], student=student[0]))

    done = distill_into(tmp_path / "out", "me/toy", "--student-revision", "v2")
    assert done.returncode == 0, done.stderr[-2000:]
    card = ModelCard.load(tmp_path / "out/README.md")
    assert (card.data.base_model, card.data.license) == ("me/toy", "mit")
    assert f"trained `me/toy` at revision `{'b' * 12}`" in card.text
    recorded = json.loads((tmp_path / "out" / DISTILL_RUN_INFO).read_text())["student_identity"]
    assert recorded["weights_sha256"] == model_identity(str(tagged), False)["weights_sha256"] != \
        model_identity(str(main), False)["weights_sha256"]
    # The same snapshot named by its commit or its folder: the run, finished; the default branch's weights: refused.
    for same in (("me/toy", "--student-revision", "b" * 40), (tagged,)):
        rerun = distill_into(tmp_path / "out", *same)
        assert rerun.returncode == 0 and "already trained" in rerun.stdout, rerun.stderr[-2000:]
    other = distill_into(tmp_path / "out", "me/toy", "--student-revision", "main")
    assert other.returncode == 2 and "is not the model the run started from" in other.stderr, other.stderr[-2000:]
    # A run, its teacher pinned by a tag: recorded as given, its round scored with that snapshot; a rerun is done.
    run = ["run", "--prompts", TOY_PROMPTS, "--student", TOY_STUDENT, "--teacher", "me/toy", "--teacher-revision", "v2",
           "--out", tmp_path / "run", "--rounds", "1", "--backend", "hf", "--limit", "2", "--num-candidates", "2",
           "--max-new-tokens", "16", "--top-k", "8", "--max-steps", "1", "--batch-size", "4"]
    made = tsdkd(*run)
    assert made.returncode == 0, made.stderr[-2000:]
    settings = json.loads((tmp_path / "run/tsdkd_run.json").read_text())["settings"]
    assert (settings["teacher"], settings["teacher_revision"]) == ("me/toy", "v2")
    assert json.loads((tmp_path / "run/round-1/signals/tsdkd.json").read_text())["teacher"]["name_or_path"] == str(tagged)
    again = tsdkd(*run)
    assert again.returncode == 0 and "1 round done" in again.stdout, again.stderr[-2000:]
    # Offline without the revision in the cache; an empty revision; a revision for a folder, or for neither.
    assert_one_line_error(run_cli(*distill_args(small_dataset, tmp_path / "x", "--student-revision", "v3", student="me/toy")),
                          "--student me/toy at --student-revision v3: not in the hub cache, and the hub cannot be reached "
                          "(offline); fetch it with `hf download me/toy --revision v3`")
    assert_one_line_error(run_cli(*distill_args(small_dataset, tmp_path / "x", "--student-revision", " ", student="me/toy")),
                          "--student-revision is empty")
    assert_one_line_error(run_cli(*distill_args(small_dataset, tmp_path / "x", "--student-revision", "v2")),
                          f"--student-revision v2: --student {TOY_STUDENT} is a folder, which holds one revision already")
    assert_one_line_error(run_cli(*distill_args(small_dataset, tmp_path / "x", "--student-revision", "v2", student="./nowhere")),
                          "--student ./nowhere: no such folder, and not a hub id")
    assert_one_line_error(run_cli("generate", *SMALL_JOB, "--student-revision", "v3", "--out", tmp_path / "y"),
                          f"--student-revision v3: --student {TOY_STUDENT} is a folder")


def test_the_students_generation_config_is_kept(small_dataset, tmp_path):
    """Its sampling defaults and stop ids (Qwen2.5-Instruct has two) carry over; the tokenizer's EOS is added."""
    student, out = tmp_path / "student", tmp_path / "run"
    shutil.copytree(TOY_STUDENT, student)
    generation = json.loads((student / "generation_config.json").read_text())
    generation.update(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, eos_token_id=[5, 6])
    (student / "generation_config.json").write_text(json.dumps(generation))
    args = distill_args(small_dataset, out, "--max-steps", "1", student=student)
    assert run_cli(*args).exit_code == 0
    saved = json.loads((out / "generation_config.json").read_text())
    eos = AutoTokenizer.from_pretrained(TOY_STUDENT).eos_token_id
    assert {key: saved[key] for key in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "eos_token_id")} == \
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "eos_token_id": [5, 6, eos]}


@pytest.mark.parametrize(
    "extra, present, absent",
    [
        (["--loss", "sft"], ["sft"], ["direct", "entropy", "indirect_token"]),
        (["--loss", "kd"], ["direct"], ["sft", "entropy", "indirect_token", "indirect_sequence"]),
        (["--loss", "gkd"], ["direct"], ["entropy", "indirect_token"]),
        (["--no-indirect"], ["direct", "entropy"], ["indirect_token", "indirect_sequence"]),
        (["--no-entropy", "--indirect", "token"], ["direct", "indirect_token"], ["entropy", "indirect_sequence"]),
        (["--no-selection", "--indirect", "sequence"], ["indirect_sequence"], ["indirect_token"]),
        (["--selection-fraction", "0.25"], ["direct"], []),
    ],
)
def test_presets_and_ablations(small_dataset, tmp_path, extra, present, absent):
    out = tmp_path / "run"
    result = run_cli(*distill_args(small_dataset, out, "--max-steps", "1", *extra))
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    record = step_records(out)[0]
    assert all(k in record for k in present) and not any(k in record for k in absent), record
    if "--no-selection" in extra or "kd" in extra or "gkd" in extra:
        assert record["token_weight_mean"] == pytest.approx(1.0)
    if "--selection-fraction" in extra:
        assert record["token_weight_mean"] == pytest.approx(0.25, abs=0.02)


DEFAULT_OBJECTIVE = dict(direct=True, jsd_beta=0.9, selection=True, tau_w=1.0, selection_fraction=None, renormalize_topk=False,
                         sft=False, token_ranking=True, sequence_ranking=True, alpha=0.1, prefix_entropy_fraction=0.1,
                         beta_p=1.0, entropy=True, lambda_ent=1.0, entropy_quantile=0.1)
NO_RANKING_OR_ENTROPY = dict(token_ranking=False, sequence_ranking=False, entropy=False)


class Captured(Exception):
    """Raised in place of building the trainer, once the run has made everything it would train with."""


@pytest.fixture(scope="module")
def second_dataset(tmp_path_factory) -> Path:
    """Another small signal dataset (other samples of the first 4 prompts), for runs on two."""
    out = tmp_path_factory.mktemp("signals") / "second"
    result = run_cli("generate", *SMALL_JOB, "--limit", "4", "--seed", "1", "--out", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return out


@pytest.mark.parametrize("options, objective, head, data, two_datasets", [
    pytest.param([], {}, {}, {}, False, id="defaults"),
    pytest.param(["--loss", "kd"], dict(jsd_beta=0.0, selection=False, **NO_RANKING_OR_ENTROPY), {}, dict(group_by_prompt=False),
                 False, id="kd"),
    pytest.param(["--loss", "gkd"], dict(selection=False, **NO_RANKING_OR_ENTROPY), {}, dict(group_by_prompt=False), False,
                 id="gkd"),
    pytest.param(["--loss", "sft"], dict(direct=False, jsd_beta=0.0, selection=False, sft=True, **NO_RANKING_OR_ENTROPY), {},
                 dict(group_by_prompt=False, only_best=True), False, id="sft"),
    pytest.param(["--no-indirect", "--no-entropy", "--no-selection"], dict(selection=False, **NO_RANKING_OR_ENTROPY), {},
                 dict(group_by_prompt=False), False, id="three-switches"),
    pytest.param(["--indirect", "token"], dict(sequence_ranking=False), {}, dict(group_by_prompt=False), False, id="token"),
    pytest.param(["--indirect", "sequence"], dict(token_ranking=False), {}, {}, False, id="sequence"),
    pytest.param(["--selection-fraction", "0.3"], dict(selection_fraction=0.3), {}, {}, False, id="hard-selection"),
    pytest.param(["--jsd-beta", "0.5", "--tau-w", "0.5", "--renormalize-topk", "--alpha", "0.3", "--lambda-ent", "0.05",
                  "--entropy-quantile", "0.2", "--prefix-entropy-fraction", "0.25", "--beta-p", "2", "--rank-items", "4",
                  "--logit-chunk-tokens", "64", "--max-length", "40", "--seed", "7", "--batch-size", "4"],
                 dict(jsd_beta=0.5, tau_w=0.5, renormalize_topk=True, alpha=0.3, lambda_ent=0.05, entropy_quantile=0.2,
                      prefix_entropy_fraction=0.25, beta_p=2.0),
                 dict(rank_items=4, logit_chunk_tokens=64), dict(max_length=40, seed=7, batch_size=4), True, id="every-setting"),
])
def test_every_loss_and_data_setting_reaches_the_trainer(small_dataset, second_dataset, tmp_path, monkeypatch, options, objective,
                                                          head, data, two_datasets):
    """Each preset, the switches and every METHOD.md weight given on the command line are what the objective, the output
    head and the data pipeline get (each switch alone: test_presets_and_ablations) (what they compute with it is tested against references in test_losses.py and
    test_stage2_data.py). The micro-batches are compared with ones built here from the expected settings."""
    seen = {}

    def capture(**kwargs):
        seen.update(kwargs)
        raise Captured

    monkeypatch.setattr(distill_module, "DistillTrainer", capture)
    options = [*options, "--signals", second_dataset] if two_datasets else options
    result = run_cli("distill", "--signals", small_dataset, "--student", TOY_STUDENT, "--out", tmp_path / "o", *options)
    assert isinstance(result.exception, Captured), (result.stderr[-2000:], result.exception)
    expected = {**DEFAULT_OBJECTIVE, **objective}
    assert {name: getattr(seen["objective"], name) for name in expected} == expected
    assert (seen["rank_items"], seen["logit_chunk_tokens"]) == (head.get("rank_items", 10), head.get("logit_chunk_tokens", 2048))
    settings = dict(batch_size=data.get("batch_size", 8), pad_token_id=AutoTokenizer.from_pretrained(TOY_STUDENT).pad_token_id,
                    max_length=data.get("max_length", 1024), group_by_prompt=data.get("group_by_prompt", True),
                    only_best=data.get("only_best", False), seed=data.get("seed", 0))
    folders = [small_dataset, second_dataset] if two_datasets else [small_dataset]
    reference, trained = SignalBatches(folders, **settings), seen["train_dataset"]
    assert len(trained) == len(reference)
    for index in range(len(reference)):
        assert trained[index].keys() == reference[index].keys()
        assert all(torch.equal(trained[index][name], reference[index][name]) for name in reference[index]), index
    if data or two_datasets:  # the settings change the batches: the comparison above can tell
        defaults = SignalBatches([small_dataset], batch_size=8, pad_token_id=settings["pad_token_id"], max_length=1024, group_by_prompt=True)
        assert len(defaults) != len(reference) or any(not torch.equal(defaults[i]["input_ids"], reference[i]["input_ids"])
                                                      for i in range(len(reference)))


def one_step_parameters(batches, accumulation, loss_options=None):
    """Parameters after one SGD step over `batches` (a list of collated micro-batches). SGD, since
    Adam's first step is lr * sign(gradient), which float noise flips where a gradient is ~0."""
    cfg = DistillConfig(signals=["x"], student=str(TOY_STUDENT), out="x", **(loss_options or {}))
    model = AutoModelForCausalLM.from_pretrained(TOY_STUDENT, dtype=torch.float32)
    args = TrainingArguments(output_dir="/tmp/unused", per_device_train_batch_size=1, gradient_accumulation_steps=accumulation,
                             learning_rate=1.0, optim="sgd", max_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                             lr_scheduler_type="constant", remove_unused_columns=False, disable_tqdm=True)
    trainer = DistillTrainer(model=model, args=args, train_dataset=batches, data_collator=collate_single,
                             objective=Objective.from_config(cfg, "exact"), vocab_size=325, logit_chunk_tokens=CHUNK_TOKENS,
                             rank_items=10)
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_the_trainer_computes_the_head_a_chunk_at_a_time(small_dataset, monkeypatch):
    """In training, the student's full-vocabulary log-softmax exists for at most logit_chunk_tokens tokens at once: the
    step's memory bound."""
    chunk_rows = []
    forward_chunk = chunked_module._forward_chunk

    def recording(hidden_states, *args):
        chunk_rows.append(hidden_states.shape[0])
        return forward_chunk(hidden_states, *args)

    monkeypatch.setattr(chunked_module, "_forward_chunk", recording)
    batch = SignalBatches([small_dataset], batch_size=12, pad_token_id=0, group_by_prompt=True, seed=0)[0]
    one_step_parameters([batch], accumulation=1)
    assert max(chunk_rows) == CHUNK_TOKENS and sum(chunk_rows) == int(batch["completion_mask"].sum())


def split_by_prompt(batch):
    """The micro-batches of one prompt each, cut from one collated batch."""
    return [prompts_batch(batch, group, group) for group in range(int(batch["prompt_group"].max()) + 1)]


@pytest.mark.parametrize("loss_options", [{"entropy_quantile": 0.0}, {"loss": "sft"}, {"loss": "kd"}])
def test_accumulation_equals_one_large_batch(small_dataset, loss_options):
    """4 micro-batches of 1 prompt == 1 batch of 4 prompts. The entropy quantile is a per-batch
    statistic by definition, so the test takes q = 0 (every token), where it is exact too."""
    data = SignalBatches([small_dataset], batch_size=12, pad_token_id=0, group_by_prompt=True, seed=0)
    whole = data[0]
    assert int(whole["prompt_group"].max()) + 1 == 4
    large = one_step_parameters([whole], accumulation=1, loss_options=loss_options)
    small = one_step_parameters(split_by_prompt(whole), accumulation=4, loss_options=loss_options)
    for name in large:
        torch.testing.assert_close(small[name], large[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes_equal_one(small_dataset, tmp_path):
    """torchrun with 2 CPU processes (gloo) == 1 process accumulating 2 micro-batches, to assert_same_training's
    tolerance (here, measured, they are equal to the bit: a sum of two terms is the same in either order, and the
    scaling by the process count is by a power of two)."""
    common = ["--signals", str(small_dataset), "--student", str(TOY_STUDENT), *FAST, "--max-steps", "3", "--batch-size", "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tsdkd", "--",
                "distill", *common, "--save-steps", "1", "--keep-checkpoints"]
    ddp = subprocess.run([*torchrun, "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_cli("distill", *common, "--gradient-accumulation-steps", "2", "--out", tmp_path / "single")
    assert single.exit_code == 0, single.stderr[-2000:]
    assert len(step_records(tmp_path / "ddp")) == 3
    final_two = assert_same_training(tmp_path / "ddp", tmp_path / "single")
    # As if killed after step 2's checkpoint: both processes resume from it and end where the run did.
    resumed = as_if_killed_after_step_2(tmp_path / "ddp", tmp_path / "resumed")
    rerun = subprocess.run([*torchrun, "--out", str(resumed), "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "missing keys" not in rerun.stderr  # the tied head, left out of checkpoints as out of the student
    assert_resumed_after_step_2(resumed, final_two)


def assert_same_training(run: Path, reference: Path) -> dict[str, torch.Tensor]:
    """Every step's loss terms and the final weights of `run` equal `reference`'s to float32 sums taken in another
    order: measured under ZeRO-3 (its reduce-scatter sums in buckets), 8e-7 relative on the terms and 1.2e-7 absolute
    on the weights after 3 steps, so 1e-5 and 1e-6 leave a tenfold margin; returns `run`'s weights."""
    for a, b in zip(step_records(run), step_records(reference), strict=True):
        for key in ("loss", "direct", "indirect_token", "indirect_sequence", "entropy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    final, expected = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert final.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=1e-5, atol=1e-6)
    return final


def as_if_killed_after_step_2(finished: Path, copy: Path) -> Path:
    """A copy of a finished 3-step run (checkpoints kept) as a kill after step 2's checkpoint leaves it."""
    shutil.copytree(finished, copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-3")
    (copy / "model.safetensors").unlink()
    info = json.loads((copy / "tsdkd_distill.json").read_text())
    (copy / "tsdkd_distill.json").write_text(json.dumps({**info, "complete": False}))
    records = [{**json.loads(line), "before_the_kill": True} for line in (copy / "metrics.jsonl").read_text().splitlines()]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return copy


def assert_resumed_after_step_2(resumed: Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    # Steps 1 and 2 were not redone (a restart from scratch would end with the same weights).
    assert [(r["step"], "before_the_kill" in r) for r in step_records(resumed)] == [(1, True), (2, True), (3, False)]
    final_resumed = load_file(resumed / "model.safetensors")
    for name in uninterrupted:
        torch.testing.assert_close(final_resumed[name], uninterrupted[name], rtol=1e-6, atol=1e-7)


def test_accelerate_launch_with_zero3(small_dataset, tmp_path):
    """`accelerate launch` with a DeepSpeed ZeRO-3 config, one process (DeepSpeed runs on the CPU; accelerate's FSDP
    does not): the Trainer's DeepSpeed engine trains, checkpoints as ZeRO does, saves the student from the gathered
    weights, equal to a plain run's within float rounding, and a run resumed from a ZeRO checkpoint ends where it did.
    The same was run on a GPU with bf16 and FSDP2 too (bench/gpu_checks.py, docs/benchmarks.md)."""
    (tmp_path / "zero3.json").write_text(json.dumps({
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto"}))
    (tmp_path / "accelerate.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 1\nnum_machines: 1\n"
        f"machine_rank: 0\ndeepspeed_config:\n  deepspeed_config_file: {tmp_path / 'zero3.json'}\n")
    common = ["--signals", str(small_dataset), "--student", str(TOY_STUDENT), *FAST, "--max-steps", "3", "--save-steps", "1",
              "--keep-checkpoints"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "accelerate.yaml"),
              "-m", "tsdkd", "distill", *common]
    # On the CPU on a machine with a GPU too: bf16 there would move the losses far beyond float rounding.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    zero3 = subprocess.run([*launch, "--out", str(tmp_path / "zero3")], env=env, capture_output=True, text=True, timeout=600)
    assert zero3.returncode == 0, zero3.stderr[-3000:]
    assert (tmp_path / "zero3/checkpoints/checkpoint-2/global_step2").is_dir()  # a ZeRO checkpoint, so DeepSpeed ran
    single = subprocess.run([sys.executable, "-m", "tsdkd", "distill", *common, "--out", str(tmp_path / "single")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    final_zero3 = assert_same_training(tmp_path / "zero3", tmp_path / "single")
    resumed = as_if_killed_after_step_2(tmp_path / "zero3", tmp_path / "resumed")
    rerun = subprocess.run([*launch, "--out", str(resumed), "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_resumed_after_step_2(resumed, final_zero3)


@pytest.mark.parametrize("damaged, problem", [
    ("optimizer.pt", "is cut short or corrupt"), ("rng_state.pth", "is cut short or corrupt"),
    ("model.safetensors", "is cut short or corrupt"), ("trainer_state.json", "is cut short or corrupt"),
    ("trainer_state.json", "is missing: a save was cut short"),
])
def test_a_damaged_checkpoint_is_passed_over(small_dataset, tmp_path, damaged, problem):
    """The newest checkpoint with a file cut short (a copy cut short, a full disk) or without its trainer state (a
    kill during the save) is named in a note, set aside, and the run continues from the one before, ending as the
    uninterrupted run did; the Trainer would fail on a damaged file with a traceback on every rerun, or save into
    the folder again over the old files."""
    options = ["--max-steps", "3", "--save-steps", "1", "--save-total-limit", "3", "--keep-checkpoints"]
    assert run_cli(*distill_args(small_dataset, tmp_path / "run", *options)).exit_code == 0
    resumed = as_if_killed_after_step_2(tmp_path / "run", tmp_path / "resumed")
    cut = resumed / "checkpoints/checkpoint-2" / damaged
    if "missing" in problem:
        cut.unlink()
    else:
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    result = run_cli(*distill_args(small_dataset, resumed, *options))
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    assert f"note: checkpoint-2 is damaged ({damaged} {problem}); set aside as damaged-checkpoint-2" in result.stdout
    assert f"{resumed}: continuing from checkpoint-1" in result.stdout
    assert (resumed / "checkpoints/damaged-checkpoint-2").is_dir()
    assert [r["step"] for r in step_records(resumed)] == [1, 2, 3]
    final, expected = load_file(resumed / "model.safetensors"), load_file(tmp_path / "run/model.safetensors")
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=1e-6, atol=1e-6)


def test_the_student_is_saved_in_the_dtype_it_was_stored_in(small_dataset, tmp_path):
    """A bf16 student comes back bf16 (half the bytes of float32), its float32 master weights rounded once, and its
    config says so; --save-dtype float32 keeps them; checkpoints keep float32 whatever the student is saved in."""
    bf16_student = tmp_path / "bf16-student"
    AutoModelForCausalLM.from_pretrained(TOY_STUDENT, dtype=torch.bfloat16).save_pretrained(bf16_student)
    AutoTokenizer.from_pretrained(TOY_STUDENT).save_pretrained(bf16_student)
    options = ["--max-steps", "2", "--save-steps", "1", "--keep-checkpoints"]
    for out, extra in (("auto", []), ("float32", ["--save-dtype", "float32"])):
        result = run_cli(*distill_args(small_dataset, tmp_path / out, *options, *extra, student=bf16_student))
        assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    saved_bf16, saved_float32 = load_file(tmp_path / "auto/model.safetensors"), load_file(tmp_path / "float32/model.safetensors")
    assert saved_bf16.keys() == saved_float32.keys()
    for name, tensor in saved_bf16.items():
        assert tensor.dtype == torch.bfloat16 and saved_float32[name].dtype == torch.float32
        assert torch.equal(tensor, saved_float32[name].to(torch.bfloat16)), name
    for checkpoint in (tmp_path / "auto/checkpoints").glob("checkpoint-*"):
        assert {t.dtype for t in load_file(checkpoint / "model.safetensors").values()} == {torch.float32}
    assert json.loads((tmp_path / "auto/config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "float32/config.json").read_text())["dtype"] == "float32"
    bytes_bf16, bytes_float32 = ((tmp_path / out / "model.safetensors").stat().st_size for out in ("auto", "float32"))
    assert bytes_bf16 < 0.55 * bytes_float32
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "auto", dtype="auto")
    assert loaded.dtype == torch.bfloat16
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    # A finished run keeps its student; another dtype asked for since is said to have no effect.
    rerun = run_cli(*distill_args(small_dataset, tmp_path / "auto", *options, "--save-dtype", "float32", student=bf16_student))
    assert rerun.exit_code == 0 and "already trained" in rerun.stdout
    assert "note: the student was saved in bfloat16, not float32 (--save-dtype float32)" in rerun.stdout
    assert torch.equal(load_file(tmp_path / "auto/model.safetensors")["model.norm.weight"], saved_bf16["model.norm.weight"])


def test_a_cast_keeps_tensors_that_shared_memory_shared():
    """save_pretrained saves tensors that share memory once (ties it finds by storage); a cast copy of each would be
    saved twice, and loaded untied."""
    from stage2_distill.trainer import cast_keeping_shared

    weight = torch.randn(4, 3)
    state = {"embed": weight, "head": weight.detach(), "other": weight.clone(), "step": torch.tensor(3)}
    cast = cast_keeping_shared(state, torch.bfloat16)
    assert cast["embed"].dtype == cast["other"].dtype == torch.bfloat16 and cast["step"].dtype == torch.int64
    assert cast["embed"].data_ptr() == cast["head"].data_ptr() != cast["other"].data_ptr()
    assert torch.equal(cast["embed"], weight.to(torch.bfloat16))
    with pytest.raises(TsdkdError, match=r"saving the student in float16 \(--save-dtype\): big holds values beyond its range"):
        cast_keeping_shared({"big": torch.tensor([7e4, 1.0])}, torch.float16)


def test_damaged_file_judges_formats_not_names(tmp_path):
    """Whole files of either torch format and safetensors with padding or no tensors pass; a header that is garbage,
    too large or not an object, and a torch file of neither format, are damaged."""
    from stage2_distill.distill import damaged_file

    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    torch.save({"step": 1}, checkpoint / "zip.pt")
    torch.save({"step": 1}, checkpoint / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({"w": torch.ones(3)}, checkpoint / "model.safetensors")
    save_file({}, checkpoint / "empty.safetensors", metadata={"format": "pt"})
    assert damaged_file(checkpoint) is None
    longer = (checkpoint / "model.safetensors").read_bytes() + b"\0" * 8  # safetensors refuses bytes after the data
    for name, content in (("longer.safetensors", longer), ("bad.safetensors", b"\xff" * 16),
                          ("huge.safetensors", (10**12).to_bytes(8, "little") + b"{}"),
                          ("list.safetensors", (2).to_bytes(8, "little") + b"[]"), ("text.bin", b"not a torch file")):
        (checkpoint / name).write_bytes(content)
        assert damaged_file(checkpoint) == checkpoint / name
        (checkpoint / name).unlink()


def test_resume_after_kill_ends_like_an_uninterrupted_run(small_dataset, tmp_path):
    args = [*distill_args(small_dataset, "OUT", "--max-steps", "40", "--save-steps", "4", "--save-total-limit", "20")]
    clean = tmp_path / "clean"
    assert run_cli(*[str(clean) if a == "OUT" else a for a in args]).exit_code == 0
    out = tmp_path / "killed"
    killed = [str(out) if a == "OUT" else a for a in args]
    returncode, _ = signal_when(killed, lambda: any((out / "checkpoints").glob("checkpoint-*")), tmp_path / "stderr.txt",
                                signal.SIGKILL)
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "model.safetensors").exists()
    # The same command again: it continues the run in --out.
    rerun = rerun_tsdkd(killed)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [r["step"] for r in step_records(out)] == list(range(1, 41))
    resumed, reference = load_file(out / "model.safetensors"), load_file(clean / "model.safetensors")
    # Float rounding only: a new process's matmul kernels need not sum in the same order (measured
    # differences up to 2.4e-7 on weights of order 1e-2 after 40 steps).
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU autocast path of --bf16 on")
def test_bf16_autocast_on_the_cpu(small_dataset, tmp_path):
    """--bf16 on without a GPU: bf16 autocast over fp32 master weights. The step losses move off the
    fp32 run's (autocast really is on) by no more than bf16 rounding; the saved weights stay fp32."""
    runs = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        result = run_cli(*distill_args(small_dataset, out, "--max-steps", "3", "--bf16", mode))
        assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
        runs[mode] = [r["loss"] for r in step_records(out)]
        assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    assert runs["on"] != runs["off"]
    # bf16 keeps 8 bits of mantissa: relative rounding 2^-8 = 0.4% per operation.
    np.testing.assert_allclose(runs["on"], runs["off"], rtol=0.05)


def test_dataloader_workers_train_the_same_student(small_dataset, tmp_path, monkeypatch):
    """Worker processes reading the shards ahead give the same steps, over two epochs (the second
    reorders the batches), as reading them in the training process."""
    read_batch = SignalBatches.__getitem__

    def recording_reader(batches, index):
        with open(tmp_path / "readers", "a") as readers:
            readers.write(f"{os.getpid()}\n")
        return read_batch(batches, index)

    monkeypatch.setattr(SignalBatches, "__getitem__", recording_reader)
    students = []
    for workers in ("0", "2"):
        out = tmp_path / f"workers-{workers}"
        assert run_cli(*distill_args(small_dataset, out, "--epochs", "2", "--dataloader-workers", workers)).exit_code == 0
        readers = set((tmp_path / "readers").read_text().split())
        (tmp_path / "readers").unlink()
        assert (readers == {str(os.getpid())}) if workers == "0" else (str(os.getpid()) not in readers and len(readers) >= 2)
        records = step_records(out)
        assert records[-1]["epoch"] == 2
        students.append((load_file(out / "model.safetensors"), [r["loss"] for r in records]))
    (weights, losses), (weights_workers, losses_workers) = students
    assert losses_workers == losses
    assert weights_workers.keys() == weights.keys() and all(weights_workers[k].equal(weights[k]) for k in weights)


def test_one_step_inside_the_warm_up_is_noted_and_changes_nothing(small_dataset, tmp_path):
    """The Trainer's warm-up starts at learning rate 0: a one-step smoke test, or epochs and a batch that come to one
    step, would silently train nothing."""
    note = "note: this run is one optimizer step, and the warm-up starts at learning rate 0, so it changes nothing"
    original = load_file(TOY_STUDENT / "model.safetensors")
    # 12 prompts of 3 candidates in one micro-batch: one step an epoch.
    for name, steps in (("one", ["--max-steps", "1"]), ("epoch", ["--epochs", "1", "--batch-size", "64"])):
        result = run_cli(*distill_args(small_dataset, tmp_path / name, *steps))
        assert result.exit_code == 0, result.stderr
        assert note in result.stdout
        trained = load_file(tmp_path / name / "model.safetensors")
        assert all(trained[key].equal(original[key]) for key in original)
    result = run_cli(*distill_args(small_dataset, tmp_path / "trained", "--max-steps", "1", "--warmup-ratio", "0"))
    assert result.exit_code == 0 and "note: this run is one" not in result.stdout
    trained = load_file(tmp_path / "trained" / "model.safetensors")
    assert not all(trained[name].equal(original[name]) for name in original)
    result = run_cli(*distill_args(small_dataset, tmp_path / "two", "--max-steps", "2"))
    assert result.exit_code == 0 and "note: this run is one" not in result.stdout
    # The constant schedule has no warm-up (transformers leaves it out): its one step trains.
    result = run_cli(*distill_args(small_dataset, tmp_path / "constant", "--max-steps", "1", "--lr-scheduler", "constant"))
    assert result.exit_code == 0 and "note: this run is one" not in result.stdout
    trained = load_file(tmp_path / "constant" / "model.safetensors")
    assert not all(trained[name].equal(original[name]) for name in original)


def test_one_candidate_per_prompt_leaves_the_sequence_ranking_nothing_and_says_so(tmp_path):
    job = [*SMALL_JOB, "--limit", "4", "--out", tmp_path / "signals"]
    job[job.index("--num-candidates") + 1] = "1"
    assert run_cli("generate", *job).exit_code == 0
    note = "note: the signals hold one candidate per prompt, so the sequence-level ranking has nothing to rank"
    result = run_cli(*distill_args(tmp_path / "signals", tmp_path / "both", "--max-steps", "1"))
    assert result.exit_code == 0 and note in result.stdout, result.stderr[-2000:]
    assert step_records(tmp_path / "both")[-1]["indirect_sequence"] == 0
    result = run_cli(*distill_args(tmp_path / "signals", tmp_path / "token", "--max-steps", "1", "--indirect", "token"))
    assert result.exit_code == 0 and note not in result.stdout


def test_a_batch_below_a_prompts_candidates_is_noted(small_dataset, tmp_path):
    """The sequence-level ranking keeps a prompt's candidates (3 here) together: a --batch-size below that (lowered for
    memory) gets whole prompts all the same, and says so; other losses take it as it is."""
    result = run_cli(*distill_args(small_dataset, tmp_path / "two", "--max-steps", "1", "--batch-size", "2"))
    assert result.exit_code == 0, result.stderr
    assert ("note: the sequence-level ranking keeps each prompt's candidates in one micro-batch: 1 prompt (up to 3 "
            "sequences) per micro-batch for --batch-size 2") in result.stdout
    assert [r["epoch"] for r in step_records(tmp_path / "two")] == [pytest.approx(1 / 12)]  # one prompt of 12
    for name, options in (("six", ["--batch-size", "6"]), ("token", ["--batch-size", "2", "--indirect", "token"])):
        result = run_cli(*distill_args(small_dataset, tmp_path / name, "--max-steps", "1", *options))
        assert result.exit_code == 0 and "sequence-level ranking keeps" not in result.stdout


def test_student_with_padded_embeddings(small_dataset, tmp_path):
    """Like Qwen2.5: more embedding rows than tokens. The extra rows take no probability mass."""
    padded = tmp_path / "padded-student"
    model = AutoModelForCausalLM.from_pretrained(TOY_STUDENT)
    model.resize_token_embeddings(325 + 11, mean_resizing=False)
    model.save_pretrained(padded)
    AutoTokenizer.from_pretrained(TOY_STUDENT).save_pretrained(padded)
    out = tmp_path / "out"
    result = run_cli("distill", "--signals", small_dataset, "--student", padded, "--out", out, *FAST, "--max-steps", "2")
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    trained = AutoModelForCausalLM.from_pretrained(out).get_output_embeddings().weight
    torch.testing.assert_close(trained[325:], model.get_output_embeddings().weight[325:])


@pytest.mark.parametrize("trained_apart", [False, True])
def test_a_gathered_tied_head_is_saved_once(tmp_path, trained_apart):
    """FSDP's full state dict gives a tied head as a separate copy (seen on a GPU: the student held lm_head.weight
    next to the embedding); the Trainer's save is handed such a dict here. A head the model still shares with the
    embedding is not written; one it no longer shares (as if the engine had broken the tie, the config still
    saying tied) is written and untied, so that the loaded student has the trained head."""
    model = AutoModelForCausalLM.from_pretrained(TOY_STUDENT)
    if trained_apart:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 0.5)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    distill_trainer(model, str(tmp_path / "checkpoints"))._save(str(tmp_path / "student"), state_dict=state)
    saved = load_file(tmp_path / "student/model.safetensors")
    assert ("lm_head.weight" in saved) == trained_apart
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert torch.equal(loaded.lm_head.weight, state["lm_head.weight"])
    assert torch.equal(loaded.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    assert loaded.config.tie_word_embeddings == (not trained_apart)


@pytest.mark.parametrize("trained_apart", [False, True])
def test_resuming_warns_of_missing_weights_but_not_of_a_tied_copy(tmp_path, monkeypatch, trained_apart):
    """A checkpoint leaves out the tied head as the student does; on resume the Trainer warned it was missing (loading
    the embedding loads it). A head trained apart, or any other weight, missing is still named."""
    import transformers.trainer

    model = AutoModelForCausalLM.from_pretrained(TOY_STUDENT)
    if trained_apart:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    warnings = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", warnings.append)
    keys = torch.nn.modules.module._IncompatibleKeys(missing_keys=["lm_head.weight", "model.norm.weight"], unexpected_keys=[])
    distill_trainer(model, str(tmp_path))._issue_warnings_after_load(keys)
    named = ["lm_head.weight", "model.norm.weight"] if trained_apart else ["model.norm.weight"]
    assert warnings == [f"There were missing keys in the checkpoint model loaded: {named}."]


@pytest.mark.parametrize("trained_apart", [False, True])
def test_a_tied_copy_under_flattened_parameters_is_judged_by_value(trained_apart):
    """FSDP1 without use_orig_params shows only its flat parameters: the head and the embedding are compared by
    value (equal: the copy goes; not: both stay, untied)."""
    from stage2_distill.trainer import without_tied_copies

    embedding = torch.randn(5, 3)
    state = {"model.embed_tokens.weight": embedding, "lm_head.weight": embedding + trained_apart}
    flat = SimpleNamespace(named_parameters=lambda remove_duplicate: iter([("_flat_param", torch.nn.Parameter(torch.zeros(30)))]),
                           all_tied_weights_keys={"lm_head.weight": "model.embed_tokens.weight"},
                           config=SimpleNamespace(tie_word_embeddings=True))
    assert set(without_tied_copies(flat, state)) == ({"model.embed_tokens.weight", "lm_head.weight"} if trained_apart
                                                     else {"model.embed_tokens.weight"})
    assert flat.config.tie_word_embeddings == (not trained_apart)


def test_non_finite_loss_stops_with_the_step(small_dataset):
    cfg = DistillConfig(signals=["x"], student=str(TOY_STUDENT), out="x")
    batches = SignalBatches([small_dataset], batch_size=6, pad_token_id=0, group_by_prompt=True)
    first, second = batches[0], batches[1]
    second["teacher_topk_logprobs"][0, 0, 0] = float("nan")
    args = TrainingArguments(output_dir="/tmp/unused", per_device_train_batch_size=1, max_steps=2, report_to="none",
                             save_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = DistillTrainer(model=AutoModelForCausalLM.from_pretrained(TOY_STUDENT), args=args, train_dataset=[first, second],
                             data_collator=collate_single, objective=Objective.from_config(cfg, "exact"),
                             vocab_size=325, logit_chunk_tokens=64, rank_items=10)
    with pytest.raises(TsdkdError, match=r"step 2: the loss is not finite \(.*direct="):
        trainer.train()


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_non_finite_gradient_stops_before_the_update(small_dataset, tmp_path, max_grad_norm):
    """A finite loss whose gradient is NaN (made so by a hook): the run stops at that step, before the optimizer
    applies it, with clipping (whose norm the Trainer reuses) and without."""
    cfg = DistillConfig(signals=["x"], student=str(TOY_STUDENT), out="x")
    batch = SignalBatches([small_dataset], batch_size=6, pad_token_id=0, group_by_prompt=True)[0]
    model = AutoModelForCausalLM.from_pretrained(TOY_STUDENT)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    model.model.layers[0].mlp.up_proj.weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, max_steps=1, report_to="none",
                             save_strategy="no", use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
                             max_grad_norm=max_grad_norm, learning_rate=1e-2)
    trainer = DistillTrainer(model=model, args=args, train_dataset=[batch], data_collator=collate_single,
                             objective=Objective.from_config(cfg, "exact"), vocab_size=325, logit_chunk_tokens=64, rank_items=10)
    with pytest.raises(TsdkdError, match=r"step 1: the gradient is not finite \(norm nan\) although the loss was"):
        trainer.train()
    assert all(value.equal(before[name]) for name, value in model.state_dict().items())


def test_bad_input(small_dataset, tmp_path):
    missing = tmp_path / "nowhere"
    assert_one_line_error(run_cli(*distill_args(missing, tmp_path / "o1")), "no such folder")
    shard = next((small_dataset / "data").glob("*.parquet"))
    assert_one_line_error(run_cli(*distill_args(shard, tmp_path / "o1")), "is a file", "name the dataset folder")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(small_dataset, corrupt)
    shard = sorted((corrupt / "data").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert_one_line_error(run_cli(*distill_args(corrupt, tmp_path / "o2")), shard.name, "checksum")
    other = tmp_path / "other-student"
    shutil.copytree(TOY_STUDENT, other)
    tokenizer = AutoTokenizer.from_pretrained(TOY_STUDENT)
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(other)
    result = run_cli("distill", "--signals", small_dataset, "--student", other, "--out", tmp_path / "o3")
    assert_one_line_error(result, "tokenizer of the student differs")
    empty = tmp_path / "empty"
    shutil.copytree(small_dataset, empty)
    manifest = json.loads((empty / "tsdkd.json").read_text())
    manifest["shards"] = []
    manifest["stats"].update(prompts=0, candidates=0, completion_tokens=0, bytes=0)
    (empty / "tsdkd.json").write_text(json.dumps(manifest))
    shutil.rmtree(empty / "data")
    assert_one_line_error(run_cli(*distill_args(empty, tmp_path / "o4")), "no candidates")
    no_shard = tmp_path / "no-shard"
    shutil.copytree(small_dataset, no_shard)
    sorted((no_shard / "data").glob("*.parquet"))[1].unlink()
    assert_one_line_error(run_cli(*distill_args(no_shard, tmp_path / "o9")), "train-00001-of-00003.parquet", "shard missing")
    later_format = tmp_path / "later-format"
    shutil.copytree(small_dataset, later_format)
    manifest_text = (later_format / "tsdkd.json").read_text()
    (later_format / "tsdkd.json").write_text(manifest_text.replace('"format_version": 1', '"format_version": 99'))
    assert_one_line_error(run_cli(*distill_args(later_format, tmp_path / "o10")), "format version 99")
    copy = tmp_path / "copy"  # the same data under another name
    shutil.copytree(small_dataset, copy)
    assert_one_line_error(run_cli(*distill_args(small_dataset, tmp_path / "o8", "--signals", copy)), f"--signals {copy}: its data/train-",
                          f"is the same shard as data/train-00000-of-00003.parquet of --signals {small_dataset}", "trained on twice")
    assert_one_line_error(run_cli(*distill_args(small_dataset, tmp_path / "o5", "--jsd-beta", "2")), "--jsd-beta")
    assert_one_line_error(run_cli(*distill_args(small_dataset, tmp_path / "o6", "--loss", "dpo")), "--loss must be one of")
    assert_one_line_error(run_cli(*distill_args(small_dataset, tmp_path / "o6", "--loss", "kdd", "--alpha", "0.1")),
                          "--loss must be one of")  # not "--alpha has no effect with --loss kdd"
    assert_one_line_error(run_cli(*distill_args(small_dataset, tmp_path / "o7", "--resume")), "holds no earlier run")
    for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8", "o9", "o10"):
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("extra, named", [
    (["--loss", "kd", "--jsd-beta", "0.5"], "--jsd-beta"),
    (["--loss", "gkd", "--selection-fraction", "0.2"], "--selection-fraction"),
    (["--loss", "sft", "--renormalize-topk"], "--renormalize-topk"),
    (["--loss", "gkd", "--no-entropy"], "--no-entropy"),
    (["--no-selection", "--tau-w", "2"], "--tau-w"),
    (["--no-indirect", "--indirect", "token"], "--indirect"),
    (["--indirect", "token", "--beta-p", "2"], "--beta-p"),
    (["--indirect", "sequence", "--rank-items", "5"], "--rank-items"),
    (["--no-entropy", "--entropy-quantile", "0.2"], "--entropy-quantile"),
    # given on the command line at their default values
    (["--no-indirect", "--indirect", "both"], "--indirect"),
    (["--loss", "kd", "--jsd-beta", "0.9"], "--jsd-beta"),
    (["--loss", "sft", "--alpha", "0.1"], "--alpha"),
    (["--loss", "kd", "--with-indirect"], "--with-indirect"),  # reads like "KD plus ranking"
    (["--loss", "sft", "--no-renormalize-topk"], "--no-renormalize-topk"),
    (["--selection-fraction", "0.3", "--tau-w", "2"], "--tau-w"),  # hard selection has no temperature
])
def test_a_setting_no_loss_term_reads_is_refused(small_dataset, tmp_path, extra, named):
    """An ablation with a setting its preset or switches leave unused would silently train something else."""
    out = tmp_path / "run"
    result = run_cli(*distill_args(small_dataset, out, *extra))
    assert_one_line_error(result, f"{named} has no effect with --loss", "leave it out")
    assert not out.exists()


def test_a_config_files_default_loss_settings_pass_with_any_preset(small_dataset, tmp_path, monkeypatch):
    """A shared base config may spell out every default; the preset on the command line leaves them unused."""
    base = tmp_path / "base.yaml"
    base.write_text("jsd_beta: 0.9\nalpha: 0.1\nindirect: both\nlambda_ent: 1.0\n")
    seen = []
    monkeypatch.setattr("stage2_distill.distill.distill", seen.append)
    for extra in (["--loss", "sft"], ["--loss", "kd"], ["--no-indirect"]):
        result = run_cli(*distill_args(small_dataset, tmp_path / "run", "--config", base, *extra))
        assert result.exit_code == 0, result.stderr
    assert [cfg.loss for cfg in seen] == ["sft", "kd", "tsdkd"]
    base.write_text("lambda_ent: 0.5\n")
    assert_one_line_error(run_cli(*distill_args(small_dataset, tmp_path / "run", "--config", base, "--no-entropy")),
                          f"--lambda-ent (set in {base}) has no effect with --loss tsdkd --no-entropy; leave it out")


def test_several_gpus_in_one_process_are_refused(small_dataset, tmp_path, monkeypatch):
    """Without torchrun the Trainer would wrap the student in nn.DataParallel, whose replicas each see part
    of the batch while the head's statistics index all of it; refused before anything is written."""
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 4))
    out = tmp_path / "run"
    assert_one_line_error(run_cli(*distill_args(small_dataset, out)), "4 GPUs are visible to one process",
                          "--nproc_per_node 4", "CUDA_VISIBLE_DEVICES")
    assert not out.exists()


def test_a_start_that_fails_writes_nothing(small_dataset, tmp_path, monkeypatch):
    """Failures found while starting (the student, the data, the folder) leave --out empty or absent, so
    the corrected command runs without --resume or a new folder."""
    broken = tmp_path / "broken-student"
    shutil.copytree(TOY_STUDENT, broken)
    (broken / "model.safetensors").write_bytes((broken / "model.safetensors").read_bytes()[:100])
    assert_one_line_error(run_cli("distill", "--signals", small_dataset, "--student", broken, "--out", tmp_path / "o1"),
                          "--student", "cannot load it")
    assert_one_line_error(run_cli(*distill_args(small_dataset, tmp_path / "o2", "--rank-items", "400")),
                          "--rank-items 400 exceeds the student's vocabulary (325 tokens)")
    assert_one_line_error(run_cli(*distill_args(small_dataset, tmp_path / "o3", "--signals", f"{small_dataset}/")),
                          "is given twice")
    for name in ("o1", "o2", "o3"):
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir())
    assert run_cli(*distill_args(small_dataset, tmp_path / "o1", "--max-steps", "1")).exit_code == 0
    empty = tmp_path / "o4"
    empty.mkdir()

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # The folder is probed before the student loads (root, as in CI, may write anywhere chmod forbids).
    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    assert_one_line_error(run_cli(*distill_args(small_dataset, empty)), "cannot write there (Permission denied)")
    assert not any(empty.iterdir())


def test_resume_reads_the_same_data_from_any_path_spelling(small_dataset, tmp_path, monkeypatch):
    signals = tmp_path / "signals"
    shutil.copytree(small_dataset, signals)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert run_cli(*distill_args("signals", out, "--max-steps", "1")).exit_code == 0
    # A kill between marking the run complete and removing its checkpoints: the rerun removes them.
    (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    result = run_cli(*distill_args(signals, out, "--max-steps", "1", "--resume"))  # started relative, now absolute
    assert result.exit_code == 0 and "already trained" in result.stdout, (result.stderr, result.exception)
    assert not (out / "checkpoints").exists()
    # The student named through a link, without --resume: the same run.
    (tmp_path / "models").symlink_to(TOY_STUDENT.parent)
    linked = distill_args(signals, out, "--max-steps", "1", student=f"models/{TOY_STUDENT.name}")
    result = run_cli(*linked)
    assert result.exit_code == 0 and "already trained" in result.stdout, (result.stderr, result.exception)
    # The same folder regenerated with other data is not the data the run started with (the run holding a checkpoint:
    # one with none gives way to the new data, having trained on nothing).
    info = json.loads((out / "tsdkd_distill.json").read_text())
    (out / "tsdkd_distill.json").write_text(json.dumps({**info, "complete": False}))
    (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    shutil.rmtree(signals)
    regenerated = run_cli("generate", *SMALL_JOB, "--limit", "4", "--out", signals)
    assert regenerated.exit_code == 0, regenerated.stderr
    assert_one_line_error(run_cli(*distill_args("signals", out, "--max-steps", "1", "--resume")), "shards differ")
    # A run recorded by an earlier tsdkd: signal folders as given, no checksum; it still resumes.
    info["settings"]["signals"] = ["signals"]
    (out / "tsdkd_distill.json").write_text(json.dumps({k: v for k, v in info.items() if k != "signals_sha256"} | {"complete": False}))
    result = run_cli(*distill_args(signals, out, "--max-steps", "1", "--resume"))
    assert result.exit_code == 0 and "student saved" in result.stdout, (result.stderr, result.exception)
    (out / "tsdkd_distill.json").write_text("[]")
    assert_one_line_error(run_cli(*distill_args("signals", out, "--max-steps", "1", "--resume")), "not a tsdkd run record")


def test_moved_data_and_student_continue_the_run_and_a_changed_student_is_refused(small_dataset, tmp_path):
    """The data counts by its shards and the student by its weights (as in a moved `tsdkd run` folder), not by
    their paths; a student whose weights changed under the same path is not the run's."""
    signals, student, out = tmp_path / "signals", tmp_path / "student", tmp_path / "run"
    shutil.copytree(small_dataset, signals)
    shutil.copytree(TOY_STUDENT, student)
    def args(signals, student):  # checkpoints kept: a run with none would give way to other settings
        return distill_args(signals, out, "--max-steps", "2", "--keep-checkpoints", student=student)

    assert run_cli(*args(signals, student)).exit_code == 0
    info = json.loads((out / "tsdkd_distill.json").read_text())

    def interrupted() -> None:  # as a kill before the end leaves the record
        (out / "tsdkd_distill.json").write_text(json.dumps({**info, "complete": False}))

    interrupted()
    signals.rename(tmp_path / "signals-moved")
    student.rename(tmp_path / "student-moved")
    result = run_cli(*args(tmp_path / "signals-moved", tmp_path / "student-moved"))
    assert result.exit_code == 0 and "student saved after 2 steps" in result.stdout, (result.stderr[-2000:], result.exception)
    interrupted()
    weights = load_file(tmp_path / "student-moved" / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, tmp_path / "student-moved" / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run_cli(*args(tmp_path / "signals-moved", tmp_path / "student-moved")), "is not the model the run started from")


def test_a_kill_while_saving_the_student_saves_it_from_the_last_checkpoint(small_dataset, tmp_path):
    """The rerun must not train a step past --max-steps (the Trainer would, resuming from the last step's
    checkpoint inside an epoch): the student is the uninterrupted run's, saved after the same steps."""
    out = tmp_path / "run"
    args = distill_args(small_dataset, out, "--max-steps", "3", "--batch-size", "2", "--lr-scheduler", "constant",
                        "--warmup-ratio", "0", "--keep-checkpoints")
    assert run_cli(*args).exit_code == 0
    saved = load_file(out / "model.safetensors")
    # What a kill during the save leaves: the last step's checkpoint, the student not (all) written, the run open.
    info = json.loads((out / "tsdkd_distill.json").read_text())
    (out / "tsdkd_distill.json").write_text(json.dumps({**info, "complete": False}))
    for name in ("model.safetensors", "config.json"):
        (out / name).unlink()
    result = run_cli(*args)
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    assert "checkpoint-3 is the last step's; saving the student from it" in result.stdout
    assert "student saved after 3 steps" in result.stdout
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(again[name], saved[name]) for name in saved)
    assert json.loads((out / "tsdkd_distill.json").read_text())["global_step"] == 3


def test_a_continued_run_logs_and_saves_at_the_intervals_given_now(small_dataset, tmp_path):
    """The Trainer would take the intervals back from the checkpoint's state."""
    out = tmp_path / "run"
    assert run_cli(*distill_args(small_dataset, out, "--max-steps", "4", "--batch-size", "2", "--save-steps", "1",
                                 "--save-total-limit", "10", "--keep-checkpoints")).exit_code == 0
    info = json.loads((out / "tsdkd_distill.json").read_text())
    (out / "tsdkd_distill.json").write_text(json.dumps({**info, "complete": False}))
    for step in (3, 4):
        shutil.rmtree(out / "checkpoints" / f"checkpoint-{step}")
    result = run_cli(*distill_args(small_dataset, out, "--max-steps", "4", "--batch-size", "2", "--save-steps", "100",
                                   "--save-total-limit", "10", "--keep-checkpoints"))
    assert result.exit_code == 0 and "continuing from checkpoint-2" in result.stdout, (result.stderr[-2000:], result.exception)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-4"]


def test_a_finished_run_needs_its_data_no_more(small_dataset, tmp_path):
    """Rerunning a finished run (as `tsdkd run` does) reports it done without validating the signals again."""
    signals, out = tmp_path / "signals", tmp_path / "run"
    shutil.copytree(small_dataset, signals)
    assert run_cli(*distill_args(signals, out, "--max-steps", "1")).exit_code == 0
    shutil.rmtree(signals)
    result = run_cli(*distill_args(signals, out, "--max-steps", "1", "--resume"))
    assert result.exit_code == 0 and "already trained" in result.stdout, (result.stderr, result.exception)


def test_a_finished_run_refuses_a_dataset_replaced_in_place(small_dataset, second_dataset, tmp_path):
    """A finished run rerun over its signal folder holding another job's data (other prompts or settings) is refused,
    not reported trained; the same job's data regenerated in place (other shard bytes, same settings) is accepted."""
    signals, out = tmp_path / "signals", tmp_path / "run"
    shutil.copytree(small_dataset, signals)
    assert run_cli(*distill_args(signals, out, "--max-steps", "1")).exit_code == 0
    manifest = json.loads((signals / "tsdkd.json").read_text())
    # Regenerated by the same job, its models named otherwise (another path, a hub id): only the bytes differ.
    manifest["shards"][0]["sha256"] = "0" * 64
    manifest["settings"]["teacher"]["name_or_path"] = "elsewhere/toy-teacher"
    (signals / "tsdkd.json").write_text(json.dumps(manifest))
    result = run_cli(*distill_args(signals, out, "--max-steps", "1"))
    assert result.exit_code == 0 and "already trained" in result.stdout, (result.stderr, result.exception)
    manifest["settings"]["sampling"]["seed"] += 1  # another job
    (signals / "tsdkd.json").write_text(json.dumps(manifest))
    assert_one_line_error(run_cli(*distill_args(signals, out, "--max-steps", "1")), "now hold data generated with other settings")
    shutil.rmtree(signals)
    shutil.copytree(second_dataset, signals)
    assert_one_line_error(run_cli(*distill_args(signals, out, "--max-steps", "1")),
                          f"--out {out} holds a run with other settings", f"signals: ['{signals}'] now hold data generated with other settings")


def test_a_run_that_saved_no_checkpoint_gives_way_to_other_settings(small_dataset, tmp_path):
    """A run stopped before its first checkpoint (here by a learning rate that blows up) holds nothing to continue:
    the corrected command starts in its place, with a note, instead of being refused as other settings."""
    out = tmp_path / "run"
    diverging = run_cli(*distill_args(small_dataset, out, "--max-steps", "3", "--learning-rate", "1e30", "--warmup-ratio", "0",
                                      "--max-grad-norm", "0"))
    assert_ends_in_one_error_line(diverging, "not finite")
    result = run_cli(*distill_args(small_dataset, out, "--max-steps", "2"))
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    assert f"note: --out {out} holds a run with other settings (learning_rate: 1e+30 in the run, 0.001 now" in result.stdout
    assert read_run_info(out)["settings"]["learning_rate"] == 1e-3 and read_run_info(out)["complete"]
    assert [record["step"] for record in step_records(out)] == [1, 2]
    assert_one_line_error(run_cli(*distill_args(small_dataset, out, "--max-steps", "3", "--learning-rate", "1e30")),
                          "holds a run with other settings")


def test_what_the_length_limit_leaves_out_is_said_before_training(small_dataset, tmp_path):
    """Candidates cut at --max-length (their end of sequence lost) and prompts that leave no room are counted in
    notes before the first step; a limit above the student's context is noted."""
    lengths = SignalBatches([small_dataset], batch_size=6, pad_token_id=0)
    prompt_lengths = [int(batch["prompt_lengths"].min()) for batch in (lengths[i] for i in range(len(lengths)))]
    limit = min(prompt_lengths) + 8  # cuts the completions of the shortest prompts and leaves the longer ones no room
    expected = SignalBatches([small_dataset], batch_size=6, pad_token_id=0, max_length=limit)
    assert expected.num_cut > 0 and expected.num_dropped > 0
    result = run_cli(*distill_args(small_dataset, tmp_path / "cut", "--max-steps", "1", "--max-length", str(limit)))
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    assert "{'loss'" in result.stdout
    before_training = result.stdout.split("{'loss'")[0]
    assert (f"note: {expected.num_cut} of {expected.num_sequences} candidates are cut at --max-length {limit} (prompt and "
            "completion)") in before_training, result.stdout
    assert f"note: {expected.num_dropped} candidates whose prompt alone reaches --max-length {limit} are left out" in before_training
    result = run_cli(*distill_args(small_dataset, tmp_path / "long", "--max-steps", "1", "--max-length", "2000"))
    assert result.exit_code == 0 and "note: --max-length 2000 exceeds the student's context (1024 positions" in result.stdout
    assert "are cut at" not in result.stdout


def test_resume_forgets_the_records_it_redoes(tmp_path):
    """Records after the checkpoint are redone by the resumed run, as is the end-of-training summary
    of a run killed while saving its student; a line torn by the kill is dropped."""
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    metrics_file = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "train_runtime": 3.0, "train_loss": 0.95},
               {"step": 3, "loss": 0.8}]
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    drop_metrics_after(metrics_file, str(checkpoint))
    assert [json.loads(line) for line in metrics_file.read_text().splitlines()] == records[:2]


def test_sigterm_to_the_group_with_loader_workers_ends_in_one_line(small_dataset, tmp_path):
    """`timeout` and cluster schedulers signal the whole process group, so the data loader workers die
    too: still one line and exit 143, no traceback about the dead workers."""
    out = tmp_path / "run"
    args = distill_args(small_dataset, out, "--max-steps", "400", "--save-steps", "2", "--dataloader-workers", "1")
    returncode, output = signal_when(args, (out / "checkpoints" / "checkpoint-2").is_dir, tmp_path / "stderr.txt", group=True)
    assert returncode == 143, (returncode, output[-3000:])
    assert "Traceback" not in output and "DataLoader worker" not in output, output[-3000:]
    assert re.findall(r"terminated \(SIGTERM\).*", output) == ["terminated (SIGTERM); rerun the same command to continue"]


@pytest.mark.parametrize("sent, exit_code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_saves_the_step_under_way(small_dataset, tmp_path, sent, exit_code, said):
    """With checkpoints far apart, a Ctrl-C or a preemption's SIGTERM ends the step under way and saves its checkpoint
    before the run stops, so the rerun continues from that step; it ends like an uninterrupted run."""
    args = distill_args(small_dataset, "OUT", "--max-steps", "30", "--save-steps", "1000")
    clean = tmp_path / "clean"
    assert run_cli(*[clean if a == "OUT" else a for a in args]).exit_code == 0
    out = tmp_path / "stopped"
    stopped = [out if a == "OUT" else a for a in args]
    metrics_file = out / "metrics.jsonl"
    returncode, output = signal_when(stopped, lambda: metrics_file.is_file() and metrics_file.read_text().count('"loss"') >= 3,
                                     tmp_path / "stderr.txt", sent)
    assert returncode == exit_code, (returncode, output[-3000:])
    assert output.rstrip().endswith(f"{said}; rerun the same command to continue") and "Traceback" not in output, output[-3000:]
    (checkpoint,) = (out / "checkpoints").glob("checkpoint-*")
    assert 3 <= int(checkpoint.name.split("-")[1]) < 30 and not (out / "model.safetensors").exists()
    rerun = rerun_tsdkd(stopped)
    assert rerun.returncode == 0 and f"continuing from {checkpoint.name}" in rerun.stdout, rerun.stderr[-3000:]
    assert [record["step"] for record in step_records(out)] == list(range(1, 31))
    resumed, reference = load_file(out / "model.safetensors"), load_file(clean / "model.safetensors")
    for name in reference:  # float rounding only, as after a kill (test_resume_after_kill_ends_like_an_uninterrupted_run)
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-6, atol=1e-6)


def test_an_ignored_ctrl_c_stays_ignored(small_dataset, tmp_path):
    """A background job of a script runs with SIGINT ignored: a Ctrl-C at the terminal must not stop its training
    (nor, worse, end it early with the student saved as trained)."""
    out = tmp_path / "run"
    command, env = tsdkd_process(distill_args(small_dataset, out, "--max-steps", "30", "--save-steps", "1000"))
    metrics_file = out / "metrics.jsonl"
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not (metrics_file.is_file() and '"loss"' in metrics_file.read_text()):
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
    assert [record["step"] for record in step_records(out)] == list(range(1, 31))


def test_interrupted_distill_says_how_to_continue(small_dataset, tmp_path, monkeypatch):
    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr("stage2_distill.distill.distill", interrupted)
    result = run_cli(*distill_args(small_dataset, tmp_path / "run"))
    assert result.exit_code == 130 and "rerun the same command to continue" in result.stderr


def test_tensorboard_when_asked(small_dataset, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*distill_args(small_dataset, out, "--max-steps", "2", "--tensorboard")).exit_code == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "tensorboard").glob("events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    # One train/ prefix, as the Trainer's own tags have.
    assert {"train/loss", "train/direct", "train/token_weight_mean", "train/tokens_per_s"} <= set(tags), tags
    assert not [tag for tag in tags if tag.startswith("train/train/")], tags


def test_existing_run_is_never_overwritten(small_dataset, tmp_path):
    out = tmp_path / "run"
    first = run_cli(*distill_args(small_dataset, out, "--max-steps", "1"))
    assert first.exit_code == 0 and "student saved after 1 step\n" in first.stdout, first.stderr
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run_cli(*distill_args(small_dataset, out, "--max-steps", "1"))
    assert again.exit_code == 0 and "already trained" in again.stdout, again.stderr
    for extra in ([], ["--resume"]):
        assert_one_line_error(run_cli(*distill_args(small_dataset, out, "--max-steps", "2", *extra)),
                              "holds a run with other settings", "max_steps: 1 in the run, 2 now", "choose a new --out")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli(*distill_args(small_dataset, unrelated)), "not empty and holds no tsdkd run")
    assert [p.name for p in unrelated.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("damage", ["deleted", "changed"])
def test_a_finished_run_whose_student_was_lost_trains_it_again(small_dataset, tmp_path, damage):
    """The checkpoints are gone once the student is saved: a rerun that finds the saved weights missing or changed
    trains again from the start (same data, same seed) instead of calling the run done."""
    out = tmp_path / "run"
    args = distill_args(small_dataset, out, "--max-steps", "3")
    assert run_cli(*args).exit_code == 0
    saved = {name: tensor.clone() for name, tensor in load_file(out / "model.safetensors").items()}  # not the mapped file
    if damage == "deleted":
        (out / "model.safetensors").unlink()
    else:
        flip_byte(out / "model.safetensors", -1)
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert "model.safetensors missing or changed since the run finished; training it again" in result.stdout
    assert "student saved after 3 steps" in result.stdout
    again = load_file(out / "model.safetensors")
    for name in saved:
        torch.testing.assert_close(again[name], saved[name], rtol=1e-6, atol=1e-6)
    assert [r["step"] for r in step_records(out)] == [1, 2, 3]  # the first training's records replaced
    assert "already trained" in run_cli(*args).stdout


def test_a_lost_student_with_kept_checkpoints_is_saved_again_from_the_last(small_dataset, tmp_path):
    out = tmp_path / "run"
    args = distill_args(small_dataset, out, "--max-steps", "3", "--keep-checkpoints")
    assert run_cli(*args).exit_code == 0
    saved = {name: tensor.clone() for name, tensor in load_file(out / "model.safetensors").items()}
    (out / "model.safetensors").unlink()
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert "checkpoint-3 is the last step's; saving the student from it" in result.stdout
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(again[name], saved[name]) for name in saved)


def test_a_second_run_into_a_folder_in_use_is_refused(small_dataset, tmp_path):
    """Rerunning a command continues its run, so a job submitted twice must not train twice into one folder."""
    out = tmp_path / "run"
    out.mkdir()
    with exclusive_use(out, "distill"):  # as the first run holds it
        assert in_use(out)
        assert_one_line_error(run_cli(*distill_args(small_dataset, out, "--max-steps", "1")), "in use by another running")
        assert not any(out.iterdir())
    assert not in_use(out)
    assert run_cli(*distill_args(small_dataset, out, "--max-steps", "1")).exit_code == 0
    # A run that saved no checkpoint yet but is running still is not replaced by a command with other settings.
    record = read_run_info(out)
    (out / "tsdkd_distill.json").write_text(json.dumps({**record, "complete": False}))
    with exclusive_use(out, "distill"):
        result = run_cli(*distill_args(small_dataset, out, "--max-steps", "2"))
    assert_one_line_error(result, "holds a run with other settings (max_steps: 1 in the run, 2 now)")
    assert "starting this one in its place" not in result.stdout


def test_the_data_job_counts_models_by_content_and_unhashed_ones_by_name():
    """What a finished run compares its signal folders' data by: a model renamed (another path, a hub id) is the same
    job; a model too large to hash under another name is another one."""
    def settings(name: str, weights_sha256: str | None) -> list[dict]:
        teacher = {"name_or_path": name, "revision": None, "config_sha256": "c", "weights_sha256": weights_sha256,
                   "weights_files": [["model.safetensors", 10]]}
        return [{"settings": {"teacher": teacher, "sampling": {"seed": 0}}}]

    assert signals_jobs_checksum(settings("/a/teacher", "w")) == signals_jobs_checksum(settings("org/teacher", "w"))
    assert signals_jobs_checksum(settings("/a/teacher", "w")) != signals_jobs_checksum(settings("/a/teacher", "v"))
    assert signals_jobs_checksum(settings("/m/teacher-v1", None)) != signals_jobs_checksum(settings("/m/teacher-v2", None))


def test_notes_on_data_sampled_by_another_model_or_split(small_dataset, tmp_path, capsys):
    """Shared data may serve another student, and a part of a split job is a valid dataset: a note, not a refusal."""
    manifest = json.loads((small_dataset / "tsdkd.json").read_text())
    linked = tmp_path / "models"
    linked.symlink_to(TOY_STUDENT.parent)

    def notes(student, *manifests):
        cfg = DistillConfig(signals=[f"part{i}" for i in range(len(manifests))], student=str(student), out="x")
        note_data_origin(cfg, list(manifests), model_identity(str(student)))
        return capsys.readouterr().out

    assert notes(TOY_STUDENT, manifest) == ""
    assert notes(linked / TOY_STUDENT.name, manifest) == ""  # the sampler named by another path
    assert "was sampled by" in notes(TOY_TEACHER, manifest) and "off-policy" in notes(TOY_TEACHER, manifest)
    retrained = {**manifest, "student": {**manifest["student"], "weights_sha256": "0" * 64}}
    assert f"at other weights or config than --student {TOY_STUDENT} now" in notes(TOY_STUDENT, retrained)
    # A hub student whose weights are not in the hub cache now cannot be checked against the sampler's: said so.
    hub = {**manifest["student"], "name_or_path": "me/toy"}
    cfg = DistillConfig(signals=["part0"], student="me/toy", out="x")
    note_data_origin(cfg, [{**manifest, "student": hub}], {**hub, "weights_sha256": None})
    assert "note: me/toy's weights could not be read from the hub cache (not downloaded yet, or copies above 2 GiB), " \
           "so they were not checked against those --signals part0 was made with" in capsys.readouterr().out
    note_data_origin(cfg, [{**manifest, "student": hub}], hub)
    assert capsys.readouterr().out == ""

    def part(index, **settings):
        job = {"shard_index": index, "num_shards": 2}
        return {**manifest, "job": job, "settings": {**manifest["settings"], "job": job, **settings}}

    assert "part 1 of 2" in notes(TOY_STUDENT, part(0))
    assert notes(TOY_STUDENT, part(0), part(1)) == ""
    assert "part 2 of 2" in notes(TOY_STUDENT, part(0, round=3), part(1))  # two jobs, one part of each
    three_parts = {**part(1), "job": {"shard_index": 1, "num_shards": 3}}
    assert "part 1 of 2" in notes(TOY_STUDENT, part(0), three_parts)


def make_hub_snapshot(repo: Path, commit: str, weights: Path, card: str) -> Path:
    """A snapshot of the toy student in a hub cache laid out as huggingface_hub writes it (`repo` is
    HF_HUB_CACHE/models--owner--name): its weights a link to blobs/<their sha256>, with `card` as README.md."""
    import hashlib

    folder = repo / "snapshots" / commit
    shutil.copytree(TOY_STUDENT, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    blob = repo / "blobs" / hashlib.sha256(weights.read_bytes()).hexdigest()
    blob.parent.mkdir(exist_ok=True)
    shutil.copyfile(weights, blob)
    (folder / "model.safetensors").symlink_to(os.path.relpath(blob, folder))
    (folder / "README.md").write_text(card)
    return folder


def other_weights(path: Path) -> Path:
    """The toy student's weights, each plus 0.01, saved at `path`."""
    save_file({name: tensor + 0.01 for name, tensor in load_file(TOY_STUDENT / "model.safetensors").items()}, path,
              metadata={"format": "pt"})
    return path


def with_hub_cache(cache: Path, *command: str) -> subprocess.CompletedProcess:
    """`python *command` in a process that reads `cache` as its hub cache, offline."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *map(str, command)], env=env, capture_output=True, text=True, timeout=600)


def test_a_hub_model_counts_by_its_weights_in_the_hub_cache(tmp_path):
    """A hub id names a branch that moves: new weights pushed to it are another model, a card edit is not. The hub
    cache names each weight file by its sha256 (a link to blobs/<sha256>), so no file is read; the same files given
    as the snapshot's folder are the same model; a cache of copies hashes them; a sharded model counts by the shards
    its index names. Weights not in the cache give no hash: such a record counts by name and config."""
    import hashlib

    repo = tmp_path / "hub" / "models--me--toy"
    weights = load_file(TOY_STUDENT / "model.safetensors")
    other_weights(tmp_path / "trained.safetensors")
    make_hub_snapshot(repo, "a" * 40, TOY_STUDENT / "model.safetensors", "# toy\n")
    make_hub_snapshot(repo, "b" * 40, TOY_STUDENT / "model.safetensors", "# toy, a better card\n")
    make_hub_snapshot(repo, "c" * 40, tmp_path / "trained.safetensors", "# toy\n")
    # Two shards and their index, as large models come; another weights file beside them (a full download's) is not one.
    sharded = make_hub_snapshot(repo, "d" * 40, TOY_STUDENT / "model.safetensors", "# toy\n")
    (sharded / "model.safetensors").rename(sharded / "consolidated.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, keys in shards.items():
        save_file({key: weights[key] for key in keys}, tmp_path / shard, metadata={"format": "pt"})
        blob = repo / "blobs" / hashlib.sha256((tmp_path / shard).read_bytes()).hexdigest()
        shutil.copyfile(tmp_path / shard, blob)
        (sharded / shard).symlink_to(os.path.relpath(blob, sharded))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {key: shard for shard, keys in shards.items() for key in keys}}))
    expected_sharded = sha256_json([[shard, hashlib.sha256((tmp_path / shard).read_bytes()).hexdigest()] for shard in shards])
    # A cache without symlinks (huggingface_hub's fallback) holds copies: read and hashed.
    shutil.copytree(TOY_STUDENT, repo / "snapshots" / ("e" * 40), ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copyfile(tmp_path / "trained.safetensors", repo / "snapshots" / ("e" * 40) / "model.safetensors")
    (repo / "refs").mkdir()
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from tsdkd.fingerprint import model_identity, same_model\n"
        "refs = Path(sys.argv[1])\n"
        "identities = {}\n"
        "for commit in 'abcde':\n"
        "    refs.write_text(commit * 40)\n"
        "    identities[commit] = model_identity('me/toy')\n"
        "a, b, c, d, e = (identities[commit] for commit in 'abcde')\n"
        "folder = model_identity(str(refs.parent.parent / 'snapshots' / ('c' * 40)))\n"
        "before = {**a, 'weights_sha256': None}\n"
        "refs.write_text('d' * 40)\n"
        "(refs.parent.parent / 'snapshots' / ('d' * 40) / 'model-00002-of-00002.safetensors').unlink()\n"
        "partial = model_identity('me/toy')\n"
        "print(json.dumps([a['weights_sha256'] is not None, same_model(a, b), same_model(a, c), same_model(c, folder),\n"
        "                  same_model(before, c), d['weights_sha256'], partial['weights_sha256'], same_model(c, e),\n"
        "                  same_model(a, e)]))\n"
    )
    done = with_hub_cache(tmp_path / "hub", "-c", script, repo / "refs" / "main")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [True, True, False, True, True, expected_sharded, None, True, False]


def test_a_snapshot_folder_counts_by_its_blob_names_at_any_size(tmp_path, monkeypatch):
    """Weights above the hashing limit count by their names and sizes; a hub snapshot's weights link to blobs named by
    their sha256, a hash at any size, unread. A record of sizes and one with the hash, of the same folder and config,
    are one model (as for weights not in the cache: by name and config)."""
    import tsdkd.fingerprint as fingerprint

    snapshot = make_hub_snapshot(tmp_path / "hub" / "models--me--toy", "a" * 40, TOY_STUDENT / "model.safetensors", "# toy\n")
    monkeypatch.setattr(fingerprint, "WEIGHTS_HASH_LIMIT_BYTES", 0)
    pinned, folder = fingerprint.model_identity(str(snapshot)), fingerprint.model_identity(str(TOY_STUDENT))
    assert pinned["weights_sha256"] == sha256_json([("model.safetensors", sha256_file(TOY_STUDENT / "model.safetensors"))])
    assert folder["weights_sha256"] is None and folder["weights_files"] == pinned["weights_files"] == \
        [["model.safetensors", (TOY_STUDENT / "model.safetensors").stat().st_size]]
    sized = {**pinned, "weights_sha256": None, "weights_files": folder["weights_files"]}
    assert fingerprint.same_model(sized, pinned) and fingerprint.same_model(pinned, sized)
    assert not fingerprint.same_model({**sized, "config_sha256": "other"}, pinned)
    # Other weights of a size below the limit now, hashed: their sizes still differ from the record's.
    assert not fingerprint.same_model(sized, {**pinned, "weights_files": [["model.safetensors", 1]]})
    # A record of sizes only, as read back from a run record (JSON), is the folder it was made from.
    assert fingerprint.same_model(json.loads(json.dumps(folder)), fingerprint.model_identity(str(TOY_STUDENT)))
    # A record made before identities kept the sizes beside a hash: the hashes decide.
    assert fingerprint.same_model({key: value for key, value in pinned.items() if key != "weights_files"}, pinned)


@pytest.mark.parametrize("engine, head_unit", [("fsdp2", "root"), ("fsdp2", "own"), ("fsdp1", "root"), ("fsdp1", "own"),
                                               ("zero3", "root"), ("zero3", "own")])
def test_sharded_student_equals_one_process(small_dataset, tmp_path, engine, head_unit):
    """The loss and gradients with the student sharded over 2 processes by FSDP or ZeRO-3 equal those
    of one unsharded process accumulating the same two micro-batches. The output head must be read
    inside its forward, where the engine has gathered it: a head in its own FSDP unit is resharded
    right after, ZeRO-3 releases every module's weights after its forward. (FSDP keeps the root unit
    gathered until the backward, so the "root" cases check that layout works rather than the timing.)"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "fsdp_worker.py"),
                          str(small_dataset), str(tmp_path), engine, head_unit], env={**env, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    sharded = json.loads((tmp_path / "result.json").read_text())
    assert sharded["local_numel"] < 0.6 * sharded["full_numel"]  # really sharded (about half, plus padding)
    if engine == "fsdp2":
        # FSDP2's full state dict (accelerate's for FSDP2) gives the head as a tensor of its own, tied or not (the
        # saved GPU student held it twice); the save keeps it only where it is not tied to the embedding.
        assert "lm_head.weight" in sharded["gathered_keys"]
        assert ("lm_head.weight" in sharded["saved_keys"]) == (head_unit == "own")
        assert set(sharded["gathered_keys"]) - set(sharded["saved_keys"]) <= {"lm_head.weight"}

    model = toy_student(head_unit)
    trainer = distill_trainer(model, str(tmp_path / "single"))
    halves = batch_halves(str(small_dataset))
    counts = trainer._get_num_items_in_batch(halves, torch.device("cpu"))
    loss = sum(trainer.compute_loss(model, half, num_items_in_batch=counts) for half in halves)
    loss.backward()
    assert sharded["loss"] == pytest.approx(loss.item(), rel=1e-5)
    grads = load_file(tmp_path / "grads.safetensors")
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_zero3_config_must_gather_weights_on_save():
    """Without stage3_gather_16bit_weights_on_model_save the Trainer would save a ZeRO checkpoint, not
    safetensors, after the whole run: refused at start (ZeRO-1/2 and other stages are not affected)."""
    def plugin(stage, **zero):
        return SimpleNamespace(zero_stage=stage, deepspeed_config={"zero_optimization": {"stage": stage, **zero}})

    with pytest.raises(TsdkdError, match="stage3_gather_16bit_weights_on_model_save"):
        check_deepspeed_config(plugin(3))
    check_deepspeed_config(plugin(3, stage3_gather_16bit_weights_on_model_save=True))
    check_deepspeed_config(plugin(2))
    check_deepspeed_config(None)


def test_process_group_waits_ddp_timeout(tmp_path):
    """Under torchrun the process group gets --ddp-timeout (a one-process group here, in its own
    interpreter): the first collective waits for the main process to validate the signal data."""
    script = (
        "import sys; from pathlib import Path; from stage2_distill.distill import start_processes; "
        "from tsdkd.config import DistillConfig; import torch, torch.distributed as dist; "
        "start_processes(DistillConfig(signals=['x'], student='x', out='x', ddp_timeout=1234), Path(sys.argv[1])); "
        "print(dist.group.WORLD._get_backend(torch.device('cpu')).options._timeout.total_seconds())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) == 1234


def test_bf16_auto_needs_bf16_in_hardware(monkeypatch):
    """--bf16 auto trains in bf16 on a GPU that has it in hardware only (not on a V100 or T4, which
    emulate it), --bf16 on is refused there, and on a machine without a GPU `on` means CPU autocast."""
    def cfg(mode):
        return DistillConfig(signals=["x"], student="x", out="x", bf16=mode)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not use_bf16(cfg("auto")) and use_bf16(cfg("on")) and not use_bf16(cfg("off"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not use_bf16(cfg("auto"))
    with pytest.raises(TsdkdError, match="no bf16 support"):
        use_bf16(cfg("on"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert use_bf16(cfg("auto")) and use_bf16(cfg("on"))


def test_fsdp2_bf16_keeps_the_statistics_float32(tmp_path, monkeypatch):
    """accelerate's FSDP2 bf16 policy casts the root module's outputs (here the head's statistics) to bf16:
    the trainer unsets that cast at start and keeps the rest of the policy. (The sharded FSDP2 test shards
    with a policy that asked for the cast and went through the same function.)"""
    import stage2_distill.trainer as trainer_module
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugins = []
    monkeypatch.setattr(trainer_module, "keep_float32_outputs", plugins.append)
    trainer = distill_trainer(toy_student("root"), str(tmp_path))
    assert plugins == [getattr(trainer.accelerator.state, "fsdp_plugin", None)]  # None here: FSDP needs GPUs

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    assert plugin.mixed_precision_policy.output_dtype == torch.bfloat16
    keep_float32_outputs(plugin)
    assert plugin.mixed_precision_policy.output_dtype is None
    assert plugin.mixed_precision_policy.param_dtype == plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16
    keep_float32_outputs(None)  # no FSDP


def test_batch_keeps_its_dtypes_under_deepspeed(small_dataset, tmp_path, monkeypatch):
    """The Trainer casts every float tensor of a batch to DeepSpeed's dtype (meant for float model inputs);
    the teacher's cached log-probs must keep float32."""
    trainer = distill_trainer(toy_student("root"), str(tmp_path))
    batch = batch_halves(str(small_dataset))[0]
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    bf16_config = SimpleNamespace(hf_ds_config=SimpleNamespace(dtype=lambda: torch.bfloat16))
    monkeypatch.setattr(type(trainer.accelerator.state), "deepspeed_plugin", property(lambda state: bf16_config))
    assert Trainer._prepare_inputs(trainer, batch)["teacher_topk_logprobs"].dtype == torch.bfloat16  # the stock cast
    prepared = trainer._prepare_inputs(batch)
    assert prepared.keys() == batch.keys() and all(prepared[name].equal(batch[name]) for name in batch)
    assert all(prepared[name].dtype == batch[name].dtype for name in batch)


@pytest.mark.parametrize("transform", [lambda logits: logits.float(), lambda logits: logits * 2,
                                       lambda logits: logits[..., :325]])
def test_student_whose_forward_transforms_the_logits_is_refused(small_dataset, tmp_path, transform):
    """The head returns the statistics in place of logits; a forward that post-processes them (remote
    code, for instance) gets one clear line instead of an error deep inside the model or the loss."""
    model = AutoModelForCausalLM.from_pretrained(TOY_STUDENT, dtype=torch.float32)
    original = model.forward
    model.forward = lambda **kwargs: SimpleNamespace(logits=transform(original(**kwargs).logits))
    trainer = distill_trainer(model, str(tmp_path))
    batch = SignalBatches([small_dataset], batch_size=6, pad_token_id=0, group_by_prompt=True, seed=0)[0]
    with pytest.raises(TsdkdError, match="transforms its output head's logits"):
        trainer.compute_loss(model, batch)
    assert "forward" not in model.get_output_embeddings().__dict__  # the head is restored


def test_output_head_with_its_forward_replaced_is_refused(small_dataset, tmp_path):
    """A head whose forward something else already replaced (accelerate's device-map hooks) is not
    silently bypassed."""
    model = AutoModelForCausalLM.from_pretrained(TOY_STUDENT, dtype=torch.float32)
    head = model.get_output_embeddings()
    head.forward = head.forward
    batch = SignalBatches([small_dataset], batch_size=6, pad_token_id=0, group_by_prompt=True, seed=0)[0]
    with pytest.raises(TsdkdError, match="output head has its forward replaced"):
        distill_trainer(model, str(tmp_path)).compute_loss(model, batch)


def test_gradient_checkpointing_recomputes_layers_and_changes_nothing(small_dataset, tmp_path):
    """--gradient-checkpointing: the decoder layers run twice per micro-batch (forward, then again in
    the backward), and the trained weights equal those of a run without it (float rounding)."""
    items = [SignalBatches([small_dataset], batch_size=6, pad_token_id=0, group_by_prompt=True, seed=0)[i] for i in range(2)]
    runs = {}
    for checkpointing in (False, True):
        cfg = DistillConfig(signals=[str(small_dataset)], student=str(TOY_STUDENT), out=str(tmp_path / str(checkpointing)),
                            max_steps=2, learning_rate=1e-3, gradient_checkpointing=checkpointing)
        model = AutoModelForCausalLM.from_pretrained(TOY_STUDENT, dtype=torch.float32)
        layer_calls = []
        # Counted in forward itself: checkpointing's recompute may stop before post-forward hooks run.
        mlp_forward = model.model.layers[0].mlp.forward
        model.model.layers[0].mlp.forward = lambda *args: layer_calls.append(1) or mlp_forward(*args)
        trainer = DistillTrainer(model=model, args=training_arguments(cfg, tmp_path / str(checkpointing)), train_dataset=items,
                                 data_collator=collate_single, objective=Objective.from_config(cfg, "exact"), vocab_size=325,
                                 logit_chunk_tokens=7, rank_items=10)
        trainer.train()
        runs[checkpointing] = (len(layer_calls), {name: p.detach().clone() for name, p in model.named_parameters()})
    assert runs[False][0] == 2 and runs[True][0] == 4
    for name, weight in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    # A run that ran out of memory may resume with it switched on; other settings must still match.
    started = DistillConfig(signals=[str(small_dataset)], student=str(TOY_STUDENT), out=str(tmp_path / "run"), max_steps=2)
    writable_folder(tmp_path / "run")
    student = model_identity(str(TOY_STUDENT))
    create_output(started, tmp_path / "run", [json.loads((small_dataset / "tsdkd.json").read_text())], student)
    assert check_output(dataclasses.replace(started, resume=True, gradient_checkpointing=True), tmp_path / "run", student, read_run_info(tmp_path / "run")) is False
    assert check_output(dataclasses.replace(started, logit_chunk_tokens=64, tensorboard=True, logging_steps=3, save_steps=7,
                                            save_total_limit=5, keep_checkpoints=True), tmp_path / "run", student, read_run_info(tmp_path / "run")) is False
    # Finished: other signal folders must hold the same data (the same folder may have been regenerated in place).
    record = json.loads((tmp_path / "run" / "tsdkd_distill.json").read_text())
    (tmp_path / "run" / "tsdkd_distill.json").write_text(json.dumps({**record, "complete": True, "student_files": {}}))
    other = tmp_path / "other"
    shutil.copytree(small_dataset, other)
    assert check_output(dataclasses.replace(started, signals=[str(other)]), tmp_path / "run", student, read_run_info(tmp_path / "run")) is True
    manifest = json.loads((other / "tsdkd.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (other / "tsdkd.json").write_text(json.dumps(manifest))
    with pytest.raises(TsdkdError, match="holding other data"):
        check_output(dataclasses.replace(started, signals=[str(other)]), tmp_path / "run", student, read_run_info(tmp_path / "run"))
    with pytest.raises(TsdkdError, match="other settings"):
        check_output(dataclasses.replace(started, resume=True, max_steps=3), tmp_path / "run", student, read_run_info(tmp_path / "run"))


def test_gradient_checkpointing_refused_for_a_model_without_it(small_dataset, tmp_path, monkeypatch):
    """One error line right after loading the student (its loading bar comes first), instead of the
    Trainer's ValueError after the whole setup."""
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    out = tmp_path / "out"
    result = run_cli(*distill_args(small_dataset, out, "--max-steps", "1", "--gradient-checkpointing"))
    assert result.exit_code == 2 and "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["error: --gradient-checkpointing: LlamaForCausalLM does not support it; drop the option"], result.stderr
    assert not (out / "model.safetensors").exists()
