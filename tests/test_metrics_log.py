"""metrics.jsonl of `tsdkd distill` always holds the loss terms of the final step."""

from __future__ import annotations

import json

import pytest

from conftest import TOY_STUDENT, run_cli

LOSS_TERMS = ("loss", "train/direct", "train/indirect_token", "train/indirect_sequence", "train/entropy",
              "train/token_weight_mean", "train/selected_fraction", "train/student_entropy", "tokens_per_s")


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
