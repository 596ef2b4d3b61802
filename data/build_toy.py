"""Rebuild the toy data, tokenizer, teacher and student deterministically, fully offline.

Writes data/toy/*.jsonl, data/toy-teacher/ and data/toy-student/. The models are randomly
initialised Llama checkpoints sharing one ChatML tokenizer; another script trains them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from toy_task import write_sets

DATA_DIR = Path(__file__).resolve().parent
SEED = 0
VOCAB_SIZE = 384  # an upper bound: this small corpus runs out of merges first (325)
PAD, IM_START, IM_END, EOT = "<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
COMMON: dict[str, Any] = {"max_position_embeddings": 1024, "rms_norm_eps": 1e-6}
TEACHER: dict[str, Any] = {
    **COMMON,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 384,
    "tie_word_embeddings": False,
}
# Tied embeddings mirror the real student (Qwen2.5-1.5B), so tied-weight code paths get exercised.
STUDENT: dict[str, Any] = {
    **COMMON,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "intermediate_size": 192,
    "tie_word_embeddings": True,
}


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE with single-digit tokens (so numbers are spelled digit by digit)."""
    tok = Tokenizer(models.BPE())
    # ByteLevel without a prefix space makes decode(encode(x)) == x for any text.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, IM_START, IM_END, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, EOT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


def build_model(
    config_kwargs: dict[str, Any], seed: int, tokenizer: PreTrainedTokenizerFast
) -> LlamaForCausalLM:
    """Random-init float32 Llama whose special-token ids match `tokenizer`."""
    eos, pad = tokenizer.convert_tokens_to_ids([IM_END, PAD])
    # Qwen-style: no BOS is prepended, but configs carry <|endoftext|> as bos id.
    bos = tokenizer.convert_tokens_to_ids(EOT)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, do_sample=False
    )
    return model


def _corpus(train_path: Path) -> list[str]:
    # Train on the text between special tokens, as encode() sees it; feeding the markers themselves
    # would waste merges on pieces like "<|" that encode never produces.
    rows = [json.loads(line) for line in train_path.read_text(encoding="utf-8").splitlines()]
    chats = (
        f"{IM_START}user\n{r['prompt']}{IM_END}\n{IM_START}assistant\n{r['solution']}{IM_END}\n"
        for r in rows
    )
    specials = "|".join(re.escape(t) for t in (PAD, IM_START, IM_END, EOT))
    return [piece for chat in chats for piece in re.split(specials, chat) if piece]


def main() -> None:
    write_sets(DATA_DIR / "toy", SEED)
    corpus = _corpus(DATA_DIR / "toy" / "train.jsonl")
    tokenizer = build_tokenizer(corpus)
    # Stored samples are decoded text, so an inexact round trip would corrupt every later stage.
    assert all(tokenizer.decode(tokenizer.encode(t)) == t for t in corpus)
    for name, cfg in (("toy-teacher", TEACHER), ("toy-student", STUDENT)):
        out = DATA_DIR / name
        shutil.rmtree(out, ignore_errors=True)  # no stale files from an older layout
        build_model(cfg, SEED, tokenizer).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


if __name__ == "__main__":
    main()
