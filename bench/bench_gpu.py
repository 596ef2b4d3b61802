"""Stage-2 cost on a CUDA GPU: one optimizer step of `tsdkd distill` against a plain cross-entropy step.

    python bench/bench_gpu.py steps --signals DIR --student PATH [--batch-size N] [--rounds 3] [--repeats 3]
    python bench/bench_gpu.py chunk [--tokens 4096 --hidden 256 --vocab 32768 --k 20 --m 10]
    python bench/bench_gpu.py random-model --like DIR --out DIR [--set hidden_size=2048 ...]

The GPU counterpart of bench_stage2.py's parts (a) and (c), with its setup code (the same
micro-batches of the same signal dataset, the same DistillTrainer and Objective):

steps: four variants, each from a fresh float32 student on the GPU with bf16 as `tsdkd distill
    --bf16 auto` trains there (accelerate's: the model's forward under autocast, its outputs cast
    to float32, fp32 master weights): bench_stage2's plain loops `ce` (model(...).loss, backward,
    AdamW) and `tsdkd-loop` (DistillTrainer.compute_loss in the same loop), and the Trainers
    `ce-trainer` (cross-entropy) and `tsdkd` (DistillTrainer.train, the real command's step, with
    the Trainer's optimizer and clipping). One warm-up pass over the batches, then --repeats timed
    passes; every step ends with torch.cuda.synchronize(), so a step's time is its whole GPU work;
    a variant's time is its best pass's mean step. Variants run interleaved in one process,
    --rounds times; each is compared with CE on the same engine (`tsdkd` with `ce-trainer`,
    `tsdkd-loop` with `ce`), as the median of the per-round ratios. Peak memory:
    torch.cuda.max_memory_allocated over the steps minus what was allocated before the first step
    (weights); AdamW's states are in both.
chunk: bench_stage2's (c), chunked_token_statistics forward (under bf16 autocast) and backward:
    peak CUDA memory and time, chunk 512 vs one chunk of all tokens, and a plain cross-entropy
    head for reference.
random-model: a randomly initialised model (seed 0) with the tokenizer and config of --like (a
    model folder; its weights are not read), config fields changed by --set: the shapes of a real
    student or teacher where its weights cannot be brought to the GPU machine. Timing does not
    depend on the weights, except that a random model rarely samples EOS, so its completions run
    to --max-new-tokens.

Prints JSON and writes it to --result (default bench/results/gpu-<date>.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_stage2 as cpu_bench  # noqa: E402  (the shared setup: distill_setup, make_distill_trainer, ...)

MiB = 2**20
VARIANTS = ("ce", "tsdkd-loop", "ce-trainer", "tsdkd")


# --device cpu only checks that this script runs on a machine without a GPU: no timing or memory there.
DEVICE = torch.device("cuda")


def synchronized_clock() -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class MemoryMark:
    """Peak CUDA memory allocated since `start`, above what was allocated then (0 with --device cpu)."""

    def start(self) -> None:
        self.cuda = DEVICE.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            self.before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int:
        return torch.cuda.max_memory_allocated() - self.before if self.cuda else 0


def loop_variant(args: argparse.Namespace, variant: str, folder: Path, passes: int) -> tuple[list[float], int]:
    """Step times of the plain loop (`ce` or `tsdkd-loop`, bench_stage2's) over `passes` passes, and its peak memory.
    bf16 as accelerate applies it in the Trainer: the model's forward (the head statistics included) under
    autocast, its outputs cast to float32, the loss terms and the backward outside."""
    from accelerate.utils import convert_outputs_to_fp32

    items, model, _, step, _ = cpu_bench.loop_setup(args, variant, folder)
    model.to(DEVICE)  # the parameters stay the optimizer's (moved in place)
    model.forward = convert_outputs_to_fp32(torch.autocast(DEVICE.type, dtype=torch.bfloat16)(model.forward))
    items = [{k: v.to(DEVICE) for k, v in batch.items()} for batch in items]
    memory = MemoryMark()
    memory.start()
    times = []
    for _ in range(passes):
        for batch in items:
            start = synchronized_clock()
            step(batch)
            times.append(synchronized_clock() - start)
    return times, memory.peak_bytes()


def trainer_variant(args: argparse.Namespace, variant: str, folder: Path, passes: int) -> tuple[list[float], int]:
    """Step times of `tsdkd` (DistillTrainer.train) or `ce-trainer` (transformers Trainer, cross-entropy)."""
    from transformers import TrainerCallback

    cfg, tokenizer, objective, batches = cpu_bench.setup(args, folder)
    items = [batches[i] for i in range(len(batches))]
    cfg.max_steps = passes * len(items)
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            marks.append(synchronized_clock())

        def on_step_end(self, *_, **__):
            marks.append(synchronized_clock())

    model = cpu_bench.load_student(args.student)
    if variant == "tsdkd":
        trainer = cpu_bench.make_distill_trainer(cfg, tokenizer, objective, model, cpu_bench.ListDataset(items * passes), [Clock()])
    else:
        trainer = cpu_bench.make_ce_trainer(cfg, model, items * passes, [Clock()])
    if DEVICE.type == "cuda" and not trainer.args.bf16:
        raise SystemExit("the Trainer did not turn bf16 on: this GPU has no bf16 in hardware")
    memory = MemoryMark()
    memory.start()
    trainer.train()
    return [b - a for a, b in zip(marks[:-1], marks[1:])], memory.peak_bytes()


def bench_steps(args: argparse.Namespace) -> dict[str, Any]:
    passes = 1 + args.repeats
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as folder:
        _, _, _, batches = cpu_bench.setup(args, Path(folder) / "probe")
        steps_per_pass = len(batches)
        tokens = [int(batches[i]["completion_mask"].sum()) for i in range(steps_per_pass)]
        padded = [batches[i]["input_ids"].numel() for i in range(steps_per_pass)]
        for round_number in range(args.rounds):
            for variant in VARIANTS:
                run = loop_variant if variant in ("ce", "tsdkd-loop") else trainer_variant
                times, peak = run(args, variant, Path(folder) / f"{variant}-{round_number}", passes)
                timed = times[steps_per_pass:]  # the first pass is the warm-up
                pass_means = cpu_bench.pass_times(timed, steps_per_pass)
                runs[variant].append({"pass_step_s": pass_means, "warmup_step_s": statistics.mean(times[:steps_per_pass]),
                                      "peak_bytes": peak})
                print(f"  round {round_number + 1}, {variant}: {min(pass_means) * 1e3:.2f} ms/step, "
                      f"peak {peak / MiB:.0f} MiB", file=sys.stderr, flush=True)
                gc.collect()
                if DEVICE.type == "cuda":
                    torch.cuda.empty_cache()
    summary = {}
    for variant, variant_runs in runs.items():
        # Against CE on the same engine: the loops step a foreach AdamW without clipping, the Trainers the
        # Trainer's default optimizer with clipping at 1.0.
        baseline = runs["ce-trainer" if variant in ("tsdkd", "ce-trainer") else "ce"]
        best = [min(r["pass_step_s"]) for r in variant_runs]
        ratios = [b / min(ce["pass_step_s"]) for b, ce in zip(best, baseline)]
        peaks = [r["peak_bytes"] for r in variant_runs]
        baseline_peak = statistics.median(r["peak_bytes"] for r in baseline)
        summary[variant] = {"step_ms_best": min(best) * 1e3, "step_ms_per_round": [t * 1e3 for t in best],
                            "vs_same_engine_ce_median": statistics.median(ratios), "vs_same_engine_ce_range": [min(ratios), max(ratios)],
                            "peak_MiB_median": statistics.median(peaks) / MiB,
                            "peak_vs_same_engine_ce": statistics.median(peaks) / baseline_peak if baseline_peak else None,
                            "tokens_per_s": sum(tokens) / (min(best) * steps_per_pass)}
    return {"student": args.student, "signals": args.signals, "batch_size": args.batch_size, "steps_per_pass": steps_per_pass,
            "completion_tokens_per_step": statistics.mean(tokens), "padded_tokens_per_step": statistics.mean(padded),
            "summary": summary, "runs": runs}


def bench_chunk(args: argparse.Namespace) -> dict[str, Any]:
    """bench_stage2's (c) on the GPU: forward under bf16 autocast, backward outside, as in a training step."""
    n = args.tokens
    hidden, head, teacher_ids, targets = cpu_bench.chunk_inputs(args, n, DEVICE.type)

    def step(chunk: int) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                loss = cpu_bench.chunk_loss(args, chunk, hidden, head, teacher_ids, targets)
            loss.backward()
            hidden.grad = head.grad = None
        return run

    results = {}
    for name, chunk in (("cross-entropy head", 0), (f"chunk {args.chunk_tokens}", args.chunk_tokens), (f"chunk {n} (unchunked)", n)):
        run = step(chunk)
        run()
        memory = MemoryMark()
        memory.start()
        run()
        peak = memory.peak_bytes()
        times = []
        for _ in range(args.repeats):
            start = synchronized_clock()
            run()
            times.append(synchronized_clock() - start)
        results[name] = {"peak_MiB": peak / MiB, "ms_best": min(times) * 1e3}
        print(f"  {name}: peak {peak / MiB:.0f} MiB, {min(times) * 1e3:.2f} ms", file=sys.stderr, flush=True)
    return {"tokens": n, "hidden": args.hidden, "vocab": args.vocab, "k": args.k, "m": args.m, "results": results}


def random_model(like: Path, out: Path, changes: list[str]) -> dict[str, Any]:
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(like)
    for change in changes:
        key, value = change.split("=", 1)
        setattr(config, key, json.loads(value))  # numbers, true/false, null; a string in JSON quotes
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (like / name).exists():
            shutil.copy(like / name, out / name)
    if (like / "generation_config.json").exists():
        GenerationConfig.from_pretrained(like).save_pretrained(out)
    return {"out": str(out), "parameters": sum(p.numel() for p in model.parameters()), "changes": changes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("steps", "chunk", "random-model"))
    parser.add_argument("--like", type=Path, help="random-model: the model folder whose config and tokenizer to use")
    parser.add_argument("--out", type=Path, help="random-model: the folder to write")
    parser.add_argument("--set", nargs="*", default=[], help="random-model: config changes, KEY=VALUE with a JSON value")
    parser.add_argument("--signals")
    parser.add_argument("--student", default=str(cpu_bench.ROOT / "data/toy-student"))
    parser.add_argument("--batch-size", type=int, help="micro-batch size [tsdkd distill's default]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up pass")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--m", type=int, default=10)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: only check that the script runs")
    parser.add_argument("--result", help="JSON file to write [bench/results/gpu-<date>-<part>.json]")
    args = parser.parse_args()
    if args.part == "random-model":
        print(json.dumps(random_model(args.like, args.out, args.set)))
        return
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (bench_stage2.py measures the CPU; --device cpu only checks the script)")
    if args.part == "steps" and not args.signals:
        raise SystemExit("steps needs --signals DIR (make one with `tsdkd generate`)")
    result = bench_steps(args) if args.part == "steps" else bench_chunk(args)
    result.update(part=args.part, date=date.today().isoformat(), gpu=torch.cuda.get_device_name() if DEVICE.type == "cuda" else "none (--device cpu)", torch=torch.__version__)
    text = json.dumps(result, indent=1)
    print(text)
    path = Path(args.result or cpu_bench.ROOT / f"bench/results/gpu-{date.today().isoformat()}-{args.part}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
