"""metrics.jsonl of `tsdkd distill` always holds the loss terms of the final step."""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import stage2_distill.trainer as trainer_module
from conftest import TOY_STUDENT, run_cli
from stage2_distill.data import SignalBatches
from stage2_distill.trainer import DistillTrainer

LOSS_TERMS = ("loss", "direct", "indirect_token", "indirect_sequence", "entropy",
              "token_weight_mean", "selected_fraction", "student_entropy", "tokens_per_s")


@pytest.mark.parametrize("logging, logged_steps", [
    ([], [3]),  # the default --logging-steps 10 is longer than the run
    (["--logging-steps", "2"], [2, 3]),  # the last step is not a multiple of it
    (["--logging-steps", "3"], [3]),  # the last step is one: logged once, not twice
])
def test_the_last_step_is_logged_with_every_loss_term(small_dataset, tmp_path, logging, logged_steps):
    out = tmp_path / "student"
    result = run_cli("distill", "--signals", small_dataset, "--student", TOY_STUDENT, "--out", out,
                     "--batch-size", "6", "--learning-rate", "1e-3", "--max-steps", "3", *logging)
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == logged_steps
    missing = [term for term in LOSS_TERMS if term not in steps[-1]]
    assert not missing, missing
    assert "train_runtime" in records[-1]  # the Trainer's summary still closes the file
    # Its samples are sequences, not the micro-batches the Trainer sees as items: 6 each here (2 prompts of 3).
    summary = records[-1]
    assert summary["train_samples_per_second"] == pytest.approx(6 * summary["train_steps_per_second"], rel=1e-2)


def test_a_step_with_fewer_micro_batches_logs_its_own_terms(small_dataset, tmp_path):
    """Accumulation over more micro-batches than the epoch holds: its one step has fewer, and its terms are still
    that step's (they add up to the loss, and fractions stay fractions)."""
    out = tmp_path / "student"
    result = run_cli("distill", "--signals", small_dataset, "--student", TOY_STUDENT, "--out", out, "--batch-size", "6",
                     "--epochs", "1", "--gradient-accumulation-steps", "50", "--logging-steps", "1")
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert record["step"] == 1
    weighted = record["direct"] + 0.1 * (record["indirect_token"] + record["indirect_sequence"]) + record["entropy"]
    assert record["loss"] == pytest.approx(weighted, rel=1e-5)
    assert 0 < record["token_weight_mean"] <= 1 and 0 <= record["selected_fraction"] <= 1


def test_tokens_per_s_counts_training_only_and_the_bar_shows_it(small_dataset, tmp_path, monkeypatch):
    """tokens/s counts the steps of its window, data fetching included, but not the setup before the first step nor
    the checkpoint saved after a log (each made to take 1000 s here on the trainer's clock); the progress bar shows
    the last logged loss and tokens/s."""
    offset = [0.0]
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0]))

    def taking_1000_s(method):
        def slow(self, *args, **kwargs):
            offset[0] += 1000.0
            return method(self, *args, **kwargs)
        return slow

    monkeypatch.setattr(DistillTrainer, "_get_train_sampler", taking_1000_s(DistillTrainer._get_train_sampler))
    monkeypatch.setattr(DistillTrainer, "_save_checkpoint", taking_1000_s(DistillTrainer._save_checkpoint))
    out = tmp_path / "student"
    result = run_cli("distill", "--signals", small_dataset, "--student", TOY_STUDENT, "--out", out,
                     "--batch-size", "6", "--max-steps", "3", "--logging-steps", "1", "--save-steps", "1")
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    assert offset[0] == 4000.0  # the setup and three checkpoints
    total_tokens = json.loads((small_dataset / "tsdkd.json").read_text())["stats"]["completion_tokens"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    # A window counted from the setup or across a save would be over 1000 s long: under total_tokens / 1000 tokens/s.
    assert len(records) == 3 and all(record["tokens_per_s"] > total_tokens / 100 for record in records), records
    bar = [line for line in re.split(r"[\r\n]", result.stderr) if "3/3" in line][-1]
    assert f"loss={records[-1]['loss']:.4g}" in bar and f"tokens_per_s={records[-1]['tokens_per_s']:.0f}" in bar, bar


def test_the_logged_student_entropy_is_the_mean_over_the_steps_completion_tokens(small_dataset, tmp_path):
    """Step 1's student_entropy, from the run, against the untrained student's full softmax over the first micro-batch,
    computed here from the logits at each completion token's position."""
    out = tmp_path / "student"
    result = run_cli("distill", "--signals", small_dataset, "--student", TOY_STUDENT, "--out", out, "--batch-size", "6",
                     "--max-steps", "1", "--bf16", "off")
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    batch = SignalBatches([small_dataset], batch_size=6, pad_token_id=AutoTokenizer.from_pretrained(TOY_STUDENT).pad_token_id,
                          group_by_prompt=True)[0]
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(TOY_STUDENT).eval()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    entropies = []
    for row, prompt_length in enumerate(batch["prompt_lengths"].tolist()):
        for step in range(int(batch["completion_mask"][row].sum())):
            probs = torch.softmax(logits[row, prompt_length - 1 + step], dim=-1)
            entropies.append(-(probs * probs.log()).sum().item())
    assert record["student_entropy"] == pytest.approx(sum(entropies) / len(entropies), rel=1e-4)
