"""The transformers backend: KV-cache sampling and exact, chunked teacher scoring."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList

from tsdkd.errors import TsdkdError
from tsdkd.loading import end_token_ids, gpu_has_bf16
from stage1_generate.types import SampledCandidate, SamplingSettings, TeacherScores, canonical_topk


def resolve_device_dtype(dtype: str) -> tuple[torch.device, torch.dtype]:
    """bf16 on a GPU with bf16 in hardware, float32 elsewhere, unless a dtype is asked for."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if gpu_has_bf16() else torch.float32
    return device, getattr(torch, dtype)


def load_model(path: str, dtype: str, trust_remote_code: bool) -> torch.nn.Module:
    """Safetensors weights only; the model's own generation defaults (penalties, min-p, top-k) are
    dropped, because transformers merges them into every generate() call and TSD-KD samples the
    student raw. Its end ids are kept: they end a turn (stop_token_ids)."""
    device, torch_dtype = resolve_device_dtype(dtype)
    try:
        # device_map: the weights load straight onto the GPU, not through host memory first.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True, device_map=device)
    except (OSError, ValueError) as error:
        raise TsdkdError(f"{path}: cannot load the model ({str(error).strip().splitlines()[0]})") from None
    model.generation_config = GenerationConfig(eos_token_id=model.generation_config.eos_token_id)
    return model.eval()


class SuppressPaddedVocabulary(LogitsProcessor):
    """Embedding matrices padded beyond the tokenizer (Qwen2.5) hold rows that are not tokens."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.vocab_size :] = -float("inf")
        return scores


class BehaviourLogprobRecorder(LogitsProcessor):
    """Records the raw log-prob of each sampled token without keeping every step's logits.

    generate() calls custom processors before the temperature/top-p warpers, so `scores` are the
    raw logits. The token sampled at step t is only known at step t+1, so one step is kept.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.previous_logprobs: torch.Tensor | None = None
        self.recorded: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._gather(input_ids[:, -1])
        self.previous_logprobs = torch.log_softmax(scores[:, : self.vocab_size].float(), dim=-1)
        return scores

    def _gather(self, sampled: torch.Tensor) -> None:
        if self.previous_logprobs is not None:
            safe = sampled.clamp(max=self.vocab_size - 1).unsqueeze(-1)
            self.recorded.append(self.previous_logprobs.gather(-1, safe).squeeze(-1))

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[batch, steps] log-probs, given the final sequences (the last token is gathered here)."""
        self._gather(sequences[:, -1])
        return torch.stack(self.recorded, dim=1)


def stop_token_ids(model: torch.nn.Module, eos_token_id: int | None) -> list[int]:
    """The tokenizer's EOS and the model's own end ids (generation_config.json, else config.json): a chat model
    may end its turn with another token than the tokenizer's EOS. vLLM stops at the same ids."""
    return end_token_ids(eos_token_id, model.generation_config.eos_token_id)


class HFStudentSampler:
    def __init__(self, path: str, settings: SamplingSettings, eos_token_id: int | None, pad_token_id: int, vocab_size: int,
                 batch_size: int, dtype: str, trust_remote_code: bool) -> None:
        self.model = load_model(path, dtype, trust_remote_code)
        self.settings = settings
        self.stop_token_ids = stop_token_ids(self.model, eos_token_id)
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        self.batch_size = batch_size

    def _generation_config(self) -> GenerationConfig:
        # Built from scratch: a model's own generation_config may add penalties or a top-k of 50.
        greedy = self.settings.temperature == 0
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else self.settings.temperature,
            top_p=None if greedy else self.settings.top_p,
            top_k=None if greedy else 0,
            max_new_tokens=self.settings.max_new_tokens,
            num_return_sequences=self.settings.num_candidates,
            eos_token_id=self.stop_token_ids or None,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
        )

    @torch.inference_mode()
    def sample(self, prompts: list[list[int]], seeds: list[int]) -> list[list[SampledCandidate]]:
        """Batches of `batch_size` prompts in the order given; each batch seeded by its first prompt's seed."""
        results: list[list[SampledCandidate]] = []
        for start in range(0, len(prompts), self.batch_size):
            torch.manual_seed(seeds[start])
            results.extend(self._sample_batch(prompts[start : start + self.batch_size]))
        return results

    def _sample_batch(self, prompts: list[list[int]]) -> list[list[SampledCandidate]]:
        width = max(len(p) for p in prompts)
        device = self.model.device
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: generation continues every row at the end
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        recorder = BehaviourLogprobRecorder(self.vocab_size)
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=self._generation_config(),
            logits_processor=LogitsProcessorList([recorder, SuppressPaddedVocabulary(self.vocab_size)]),
        )
        completions = output.sequences[:, width:].cpu().numpy()
        logprobs = recorder.finish(output.sequences).cpu().numpy()
        candidates = [self._trim(tokens, lps) for tokens, lps in zip(completions, logprobs)]
        n = self.settings.num_candidates
        return [candidates[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _trim(self, tokens: np.ndarray, logprobs: np.ndarray) -> SampledCandidate:
        """Cut after the first stop id (kept, so the student learns to stop); the rest is padding."""
        stops = np.flatnonzero(np.isin(tokens, self.stop_token_ids))
        end = int(stops[0]) + 1 if stops.size else len(tokens)
        return SampledCandidate(
            completion_token_ids=tokens[:end].astype(np.int64),
            behaviour_logprobs=logprobs[:end].astype(np.float32),
            finish_reason="stop" if stops.size else "length",
        )

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class HFTeacherScorer:
    """Teacher prefill over [prompt; completion] with exact top-k, tail mass and entropy."""

    entropy_exact = True

    def __init__(self, path: str, top_k: int, vocab_size: int, pad_token_id: int, batch_tokens: int,
                 logit_chunk_tokens: int, dtype: str, trust_remote_code: bool) -> None:
        self.model = load_model(path, dtype, trust_remote_code)
        self.top_k = top_k
        self.vocab_size = vocab_size
        self.pad_token_id = pad_token_id
        self.batch_tokens = batch_tokens
        self.logit_chunk_tokens = logit_chunk_tokens
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)

    @torch.inference_mode()
    def score(self, sequences: list[tuple[list[int], np.ndarray]]) -> list[TeacherScores]:
        """Batches of similar length (fewest pad tokens), results returned in input order."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
        results: list[TeacherScores | None] = [None] * len(sequences)
        batch: list[int] = []
        for index in order:
            length = len(sequences[index][0]) + len(sequences[index][1])
            if batch and (len(batch) + 1) * length > self.batch_tokens:
                self._score_batch(sequences, batch, results)
                batch = []
            batch.append(index)
        if batch:
            self._score_batch(sequences, batch, results)
        return results  # type: ignore[return-value]

    def _score_batch(self, sequences: list[tuple[list[int], np.ndarray]], batch: list[int], results: list) -> None:
        rows = [list(sequences[i][0]) + [int(t) for t in sequences[i][1]] for i in batch]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, tokens in enumerate(rows):  # right padding: positions start at 0 in every row
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            attention_mask[row, : len(tokens)] = 1
        device = self.model.device
        # use_cache=False: a one-pass score needs no KV cache (the config's default would build one for the batch).
        hidden = self.model.get_decoder()(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
        ).last_hidden_state
        # The hidden state at position t predicts token t+1: completion token j of a row whose
        # prompt has C tokens is predicted at C - 1 + j.
        positions, targets = [], []
        for row, index in enumerate(batch):
            prompt_length, completion = len(sequences[index][0]), sequences[index][1]
            positions.append(torch.arange(prompt_length - 1, prompt_length - 1 + len(completion)) + row * width)
            targets.append(torch.as_tensor(completion, dtype=torch.long))
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])[torch.cat(positions).to(device)]
        signal = self._token_signal(flat_hidden, torch.cat(targets).to(device))
        offsets = np.cumsum([0] + [len(t) for t in targets])
        for row, index in enumerate(batch):
            part = slice(offsets[row], offsets[row + 1])
            ids, logprobs = canonical_topk(signal["topk_ids"][part], signal["topk_logprobs"][part])
            results[index] = TeacherScores(
                token_logprobs=signal["token_logprobs"][part], topk_ids=ids, topk_logprobs=logprobs,
                tail_mass=signal["tail_mass"][part], entropy=signal["entropy"][part], entropy_exact=True,
            )

    def _token_signal(self, hidden: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
        """Full-vocabulary statistics, `logit_chunk_tokens` positions at a time."""
        head = self.model.get_output_embeddings()
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("token_logprobs", "topk_ids", "topk_logprobs", "tail_mass", "entropy")}
        for start in range(0, len(hidden), self.logit_chunk_tokens):
            logits = head(hidden[start : start + self.logit_chunk_tokens])[:, : self.vocab_size].float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            logprobs = torch.log_softmax(logits, dim=-1)
            top_logprobs, top_ids = logprobs.topk(self.top_k, dim=-1)
            parts["token_logprobs"].append(logprobs.gather(-1, targets[start : start + len(logits), None]).squeeze(-1).cpu().numpy())
            parts["topk_ids"].append(top_ids.cpu().numpy())
            parts["topk_logprobs"].append(top_logprobs.cpu().numpy())
            parts["tail_mass"].append((1 - top_logprobs.exp().sum(-1)).clamp(min=0).cpu().numpy())
            parts["entropy"].append((-(logprobs.exp() * logprobs).sum(-1)).cpu().numpy())
        return {name: np.concatenate(values) for name, values in parts.items()}

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
