"""Stage 1 with the transformers backend, checked against plain forward passes done in the test."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SMALL_JOB, TOY_STUDENT, TOY_TEACHER, run_cli
from stage1_generate.hf_backend import HFStudentSampler, HFTeacherScorer, resolve_device_dtype
from stage1_generate.types import SamplingSettings
from tsdkd.loading import load_tokenizer
from tsdkd.prompts import render_prompt
from tsdkd.ranking import teacher_ranks
from tsdkd.validate import validate_dataset

# float16 storage keeps 11 significant bits: a relative error of at most 2**-11.
FP16_RELATIVE = 2.0**-11


def rows_of(folder):
    manifest = json.loads((folder / "tsdkd.json").read_text())
    return [row for entry in manifest["shards"] for row in pq.read_table(folder / entry["file"]).to_pylist()]


def full_logprobs(model_path, prompt_ids, completion_ids):
    """Reference: one unbatched forward, full-vocabulary log-softmax at each completion position."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    start = len(prompt_ids) - 1
    return torch.log_softmax(logits[start : start + len(completion_ids)], dim=-1).numpy()


def test_dataset_is_valid_and_grouped(small_dataset):
    manifest = validate_dataset(small_dataset)
    assert manifest["complete"] and len(manifest["shards"]) == 3
    assert manifest["teacher_entropy"] == "exact"
    rows = rows_of(small_dataset)
    assert len(rows) == 12 * 3
    for start in range(0, len(rows), 3):
        group = rows[start : start + 3]
        assert {r["prompt_id"] for r in group} == {group[0]["prompt_id"]}
        assert sorted(r["teacher_rank"] for r in group) == [0, 1, 2]


def test_teacher_signal_matches_full_softmax(small_dataset):
    tokenizer = AutoTokenizer.from_pretrained(TOY_TEACHER)
    for row in rows_of(small_dataset)[:6]:
        reference = full_logprobs(TOY_TEACHER, row["prompt_token_ids"], row["completion_token_ids"])
        k = len(row["teacher_topk_ids"][0])
        for t, token in enumerate(row["completion_token_ids"]):
            order = np.argsort(-reference[t], kind="stable")
            assert set(row["teacher_topk_ids"][t]) == set(order[:k].tolist())
            stored = np.array(row["teacher_topk_logprobs"][t])
            expected = reference[t][row["teacher_topk_ids"][t]]
            np.testing.assert_allclose(stored, expected, rtol=FP16_RELATIVE, atol=1e-6)
            assert row["teacher_logprobs"][t] == pytest.approx(reference[t][token], abs=1e-5)
            probs = np.exp(reference[t])
            assert row["teacher_entropy"][t] == pytest.approx(-(probs * reference[t]).sum(), rel=FP16_RELATIVE * 2, abs=1e-5)
            assert row["teacher_tail_mass"][t] == pytest.approx(1 - probs[order[:k]].sum(), rel=FP16_RELATIVE * 2, abs=1e-4)
        assert row["teacher_score"] == pytest.approx(np.mean(row["teacher_logprobs"]), abs=1e-6)
        assert len(tokenizer) > max(row["completion_token_ids"])


def test_behaviour_logprobs_are_the_students_raw_logprobs(small_dataset):
    for row in rows_of(small_dataset)[:6]:
        reference = full_logprobs(TOY_STUDENT, row["prompt_token_ids"], row["completion_token_ids"])
        expected = reference[np.arange(len(row["completion_token_ids"])), row["completion_token_ids"]]
        # The KV-cache path and one full forward differ by float32 rounding only.
        np.testing.assert_allclose(row["behaviour_logprobs"], expected, atol=1e-4)


def test_completions_stop_at_their_first_eos(small_dataset):
    tokenizer = AutoTokenizer.from_pretrained(TOY_STUDENT)
    for row in rows_of(small_dataset):
        ids = row["completion_token_ids"]
        if row["finish_reason"] == "stop":
            assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
        else:
            assert len(ids) == 24 and tokenizer.eos_token_id not in ids


def test_ranks_follow_teacher_scores(small_dataset):
    rows = rows_of(small_dataset)
    for start in range(0, len(rows), 3):
        group = rows[start : start + 3]
        best = min(group, key=lambda r: r["teacher_rank"])
        if all(r["verified"] is not True for r in group):
            assert best["teacher_score"] == max(r["teacher_score"] for r in group)


def test_verified_candidates_rank_first():
    ranks = teacher_ranks([-1.0, -0.5, -2.0], [False, False, True])
    assert ranks == [2, 1, 0]
    assert teacher_ranks([-1.0, -0.5, -2.0], [None, None, None]) == [1, 0, 2]


def test_generation_is_deterministic(small_dataset, tmp_path):
    again = tmp_path / "again"
    assert run_cli("generate", *SMALL_JOB, "--out", again).exit_code == 0
    first = json.loads((small_dataset / "tsdkd.json").read_text())["shards"]
    second = json.loads((again / "tsdkd.json").read_text())["shards"]
    assert [e["sha256"] for e in first] == [e["sha256"] for e in second]


def test_chunked_scoring_equals_unchunked(small_dataset):
    rows = rows_of(small_dataset)[:5]
    sequences = [(r["prompt_token_ids"], np.array(r["completion_token_ids"])) for r in rows]
    vocab = len(AutoTokenizer.from_pretrained(TOY_TEACHER))
    results = []
    for chunk, batch_tokens in ((3, 64), (100000, 100000)):
        scorer = HFTeacherScorer(str(TOY_TEACHER), 8, vocab, 0, batch_tokens, chunk, "float32", False)
        results.append(scorer.score(sequences))
    for chunked, whole in zip(*results):
        np.testing.assert_array_equal(chunked.topk_ids, whole.topk_ids)
        np.testing.assert_allclose(chunked.topk_logprobs, whole.topk_logprobs, atol=1e-5)
        np.testing.assert_allclose(chunked.entropy, whole.entropy, atol=1e-5)


def test_scoring_builds_no_kv_cache(small_dataset):
    """A one-pass score has no use for a KV cache (for a large teacher, gigabytes per batch)."""
    rows = rows_of(small_dataset)[:3]
    sequences = [(r["prompt_token_ids"], np.array(r["completion_token_ids"])) for r in rows]
    scorer = HFTeacherScorer(str(TOY_TEACHER), 8, len(AutoTokenizer.from_pretrained(TOY_TEACHER)), 0, 64, 3, "float32", False)
    assert scorer.model.config.use_cache  # the config's default would build one
    caches = []
    scorer.model.get_decoder().register_forward_hook(lambda module, args, output: caches.append(output.past_key_values))
    scorer.score(sequences)
    assert caches and all(cache is None for cache in caches)


def test_auto_dtype_is_bf16_only_on_gpus_with_it_in_hardware(monkeypatch):
    """A V100 or T4 only emulates bf16 (slow in transformers, refused by vLLM): float32 there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_device_dtype("auto") == (torch.device("cuda"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_device_dtype("auto") == (torch.device("cuda"), torch.bfloat16)
    assert resolve_device_dtype("float16") == (torch.device("cuda"), torch.float16)


def test_sampling_stops_at_the_models_own_end_ids(tmp_path):
    """A chat model may end its turn with a token other than its tokenizer's EOS, listed in its generation config
    (as vLLM reads it): a copy of the toy student whose tokenizer EOS is <|endoftext|> and whose generation config
    lists <|im_end|> too samples the same completions as the original, which stops at <|im_end|>."""
    copy = tmp_path / "chat-student"
    shutil.copytree(TOY_STUDENT, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    generation = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [2, 3]}))
    prompts = [json.loads(line)["prompt"] for line in (TOY_STUDENT.parent / "toy" / "test_id.jsonl").read_text().splitlines()[:6]]
    settings = SamplingSettings(num_candidates=1, temperature=0.0, top_p=1.0, max_new_tokens=48)
    completions = {}
    for path in (TOY_STUDENT, copy):
        tokenizer = load_tokenizer(str(path), False, "student")
        ids = [render_prompt(tokenizer, [{"role": "user", "content": p}], "test") for p in prompts]
        sampler = HFStudentSampler(str(path), settings, tokenizer.eos_token_id, 0, len(tokenizer), 8, "float32", False)
        completions[path] = [group[0] for group in sampler.sample(ids, list(range(len(ids))))]
    original, chat = completions[TOY_STUDENT], completions[copy]
    assert any(c.finish_reason == "stop" for c in original)
    for a, b in zip(original, chat):
        assert (a.finish_reason, a.completion_token_ids.tolist()) == (b.finish_reason, b.completion_token_ids.tolist())
