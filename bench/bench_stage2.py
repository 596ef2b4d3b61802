"""Stage-2 cost of TSD-KD against plain cross-entropy and against the authors' online recipe.

    python bench/bench_stage2.py [--signals DIR] [--repeats 3] [--processes 3] [--parts abc] [--batch-size N]

First a signal dataset is made with `tsdkd generate --backend hf` in a temporary folder (the toy
student and teacher in data/, 32 prompts, 4 candidates, 128 new tokens, top-k 20), unless
--signals names one. Then, on the same micro-batches of that dataset (equal tokens):

(a) time and peak memory of one optimizer step of `tsdkd distill` (the real DistillTrainer and
    Objective, default TSD-KD settings, driven by `Trainer.train`) vs a plain supervised
    cross-entropy step of the same student on the same token batch (`model(...).loss.backward();
    AdamW.step()`). Three more variants split the difference: the `tsdkd distill` step with the
    direct term alone (no indirect or entropy terms, same micro-batches), the TSD-KD loss in the
    same plain loop (`DistillTrainer.compute_loss` + AdamW), and the transformers `Trainer` on
    cross-entropy.
    Also: Parquet decoding time per batch, and a breakdown of the TSD-KD step into sections.
(b) the authors' online recipe (per step: sample the batch's candidates from the current student
    with `generate`, teacher forward over them, then the full-vocabulary TSD-KD loss step) vs the
    offline step of (a) from the cache.
(c) peak memory and time of `chunked_token_statistics` (with the top-m at every 10th token, as the
    token-level ranking reads it at the decision-prefix positions only) forward+backward at
    V=32768, 4096 tokens, d=256, k=20, m=10: chunk 512 vs 4096 (unchunked), with a plain
    cross-entropy head for reference.

--batch-size sets the micro-batch size of (a) and (b) (default: `tsdkd distill`'s).

Timing: the data is decoded before the clock starts; each variant runs one warm-up pass over all
the batches and then --repeats timed passes, in each of --processes fresh processes (variants
interleaved); a step's time is the best pass's mean step. Ratios to CE are given both from the best
steps over all processes and as the median of per-round ratios (each round's variants ran back to
back, so load drift on a shared machine cancels within it). Every process uses --threads torch
threads (default 1: on a shared machine, OpenMP barriers of 2 threads stall on a descheduled
thread and make small-op timings meaningless).
Memory: (1) every variant runs in its own subprocess; the kernel's peak-RSS mark is reset
(/proc/self/clear_refs, 5) after loading, and the peak is ru_maxrss after the steps minus ru_maxrss
before the first step (median over the processes); this includes one-time costs (code pages,
lazy initialisation, allocator caches). (2) torch.profiler's memory timeline (profile_memory=True):
the peak bytes of live tensors during one step on the largest batch, allocator-independent.
Paired timing (--paired workers, run after the others for `tsdkd` and `ce-trainer`): in each process
a pass of the plain CE loop (own student and AdamW) runs right after every Trainer pass, its time
taken out of the step clock; the ratio of each Trainer pass to its CE pass is immune to load drift between
processes, which moves the per-round ratios above by up to +-0.15. Memory is not measured there. The same
for the TSD-KD loss in the plain loop (`loop-pair`): its passes alternate with the CE loop's, so that ratio
is the loss's own cost, both sides with the same loop and optimizer and no Trainer.
Prints markdown tables and writes bench/results/stage2-<date>.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 2**20


# ----------------------------------------------------------------------------------------------
# memory: peak RSS of this process since the mark was reset


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, which ru_maxrss reports) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class RssMarks:
    """Peak RSS above the RSS before the first step (`peak`), and, with the mark reset again after the
    warm-up pass, the peak of the timed passes above the RSS they started from (`steady`)."""

    def start(self) -> None:
        self.reset = reset_peak_rss()
        self.before = max_rss_bytes()
        self.warmup_peak = None

    def after_warmup(self) -> None:
        self.warmup_peak = max_rss_bytes()
        reset_peak_rss()
        self.steady_before = max_rss_bytes()

    def result(self) -> dict[str, Any]:
        end = max_rss_bytes()
        return {"peak_rss_delta_bytes": max(end, self.warmup_peak or 0) - self.before,
                "steady_rss_delta_bytes": end - self.steady_before if self.warmup_peak is not None else None,
                "rss_mark_reset": self.reset}


# ----------------------------------------------------------------------------------------------
# the stage-2 setup, as `tsdkd distill` does it


def distill_setup(signals: Path, student: str, out: Path, **overrides: Any):
    """(config, tokenizer, objective, SignalBatches) exactly as stage2_distill.distill.distill builds them."""
    from stage2_distill.data import SignalBatches
    from stage2_distill.objective import Objective
    from tsdkd.config import DistillConfig
    from tsdkd.loading import context_length, load_tokenizer, padding_id
    from tsdkd.signals import read_manifest

    cfg = DistillConfig(signals=[str(signals)], student=student, out=str(out), **overrides)
    cfg.check()
    tokenizer = load_tokenizer(cfg.student, cfg.trust_remote_code, "student")
    manifest = read_manifest(signals)
    objective = Objective.from_config(cfg, manifest["teacher_entropy"])
    pad = padding_id(tokenizer)
    batches = SignalBatches(
        [signals], batch_size=cfg.batch_size, pad_token_id=pad,
        max_length=cfg.max_length or context_length(cfg.student, cfg.trust_remote_code),
        group_by_prompt=objective.sequence_ranking, only_best=objective.sft, seed=cfg.seed,
    )
    return cfg, tokenizer, objective, batches


def setup(args: argparse.Namespace, folder: Path):
    """distill_setup for the bench's signals and student, at --batch-size when given (else the default)."""
    batch_size = {"batch_size": args.batch_size} if args.batch_size else {}
    return distill_setup(Path(args.signals), args.student, folder / "run", **batch_size)


def load_student(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def make_distill_trainer(cfg, tokenizer, objective, model, dataset, callbacks=()):
    from stage2_distill.data import collate_single
    from stage2_distill.distill import training_arguments
    from stage2_distill.trainer import DistillTrainer

    return DistillTrainer(
        model=model, args=training_arguments(cfg, Path(cfg.out)), train_dataset=dataset, data_collator=collate_single,
        callbacks=list(callbacks), objective=objective, vocab_size=len(tokenizer),
        logit_chunk_tokens=cfg.logit_chunk_tokens, rank_items=cfg.rank_items,
    )


def make_ce_trainer(cfg, model, items, callbacks=()):
    """The transformers Trainer on cross-entropy over the same micro-batches, in their order, with
    `tsdkd distill`'s training arguments."""
    from transformers import Trainer

    from stage2_distill.data import collate_single
    from stage2_distill.distill import training_arguments

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    ce_items = [{k: b[k] for k in ("input_ids", "attention_mask", "labels")} for b in items]
    return SequentialTrainer(model=model, args=training_arguments(cfg, Path(cfg.out)), train_dataset=ListDataset(ce_items),
                             data_collator=collate_single, callbacks=list(callbacks))


def completion_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["completion_mask"].sum())


# ----------------------------------------------------------------------------------------------
# workers: one variant in a fresh process


class StepClock:
    """A TrainerCallback recording the time of every on_step_end: consecutive marks bound one whole
    Trainer step (batch fetch, counts, forward, backward, clipping, AdamW, scheduler, logging)."""

    def __new__(cls, rss: RssMarks, warmup_steps: int):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self) -> None:
                self.marks: list[float] = []

            def on_train_begin(self, args, state, control, **kwargs):
                self.marks.append((time.perf_counter(), time.process_time()))

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == warmup_steps:
                    rss.after_warmup()
                self.marks.append((time.perf_counter(), time.process_time()))

        return _Clock()


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def pass_times(step_times: list[float], per_pass: int) -> list[float]:
    """Mean step time of each pass over the batches."""
    return [sum(step_times[i : i + per_pass]) / per_pass for i in range(0, len(step_times), per_pass)]


def paired_ce_callback(args: argparse.Namespace, folder: Path, steps_per_pass: int):
    """A TrainerCallback that, after each pass of the Trainer over the batches, runs one pass of the plain CE
    loop (its own student and AdamW) in the same process, recording its (wall, CPU) time in `after_step` by
    the step it followed, so that the worker takes it out of the next step's interval: each Trainer pass
    gets a CE pass timed next to it, so machine-load drift and per-process effects cancel in the ratio."""
    from transformers import TrainerCallback

    items, _, _, step, _ = loop_setup(args, "ce", folder)

    class PairedCE(TrainerCallback):
        def __init__(self) -> None:
            self.after_step: dict[int, tuple[float, float]] = {}

        def on_step_end(self, args_, state, control, **kwargs):
            if state.global_step % steps_per_pass:
                return
            start, start_cpu = time.perf_counter(), time.process_time()
            for batch in items:
                step(batch)
            self.after_step[state.global_step] = (time.perf_counter() - start, time.process_time() - start_cpu)

    return PairedCE()


def worker_trainer(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """`tsdkd`, `tsdkd-direct` (the direct term alone) (DistillTrainer.train) or `ce-trainer` (transformers Trainer on
    cross-entropy). With --paired, a CE-loop pass runs after each Trainer pass (PairedCE); memory is then not clean."""
    with tempfile.TemporaryDirectory() as folder:
        passes = 1 + args.repeats
        cfg, tokenizer, objective, batches = setup(args, Path(folder))
        if variant == "tsdkd-direct":  # same micro-batches (grouped by prompt), the direct term alone
            objective = dataclasses.replace(objective, token_ranking=False, sequence_ranking=False, entropy=False)
        items = [batches[i] for i in range(len(batches))]
        cfg.max_steps = passes * len(items)  # one epoch over `passes` copies: no epoch boundaries
        model = load_student(args.student)
        rss = RssMarks()
        clock = StepClock(rss, len(items))
        paired = paired_ce_callback(args, Path(folder), len(items)) if args.paired else None
        callbacks = [clock] if paired is None else [clock, paired]
        if variant in ("tsdkd", "tsdkd-direct"):
            trainer = make_distill_trainer(cfg, tokenizer, objective, model, ListDataset(items * passes), callbacks)
        else:
            trainer = make_ce_trainer(cfg, model, items * passes, callbacks)
        rss.start()
        trainer.train()
        memory = rss.result()
    wall = [b[0] - a[0] for a, b in zip(clock.marks[:-1], clock.marks[1:])]
    cpu = [b[1] - a[1] for a, b in zip(clock.marks[:-1], clock.marks[1:])]
    for step, (ce_wall, ce_cpu) in (paired.after_step.items() if paired else ()):
        if step < len(wall):  # the interval from the mark of `step` to the next one held the CE pass
            wall[step] -= ce_wall
            cpu[step] -= ce_cpu
    n = len(items)
    return {"pass_step_s": pass_times(wall[n:], n), "pass_step_cpu_s": pass_times(cpu[n:], n),
            # The CE pass after the warm-up pass is the CE loop's own warm-up.
            "paired_ce_pass_step_cpu_s": [cpu / n for _, cpu in list(paired.after_step.values())[1:]] if paired else None,
            "warmup_step_s": sum(wall[:n]) / n, **memory,
            "objective": vars(objective), "logit_chunk_tokens": cfg.logit_chunk_tokens,
            "completion_tokens_per_pass": sum(map(completion_tokens, items)), "steps_per_pass": n}


def loop_setup(args: argparse.Namespace, variant: str, folder: Path) -> tuple:
    """The micro-batches, the student, its loss function for `variant` (`ce` or `tsdkd-loop`), one AdamW
    step on a batch (loss, backward, step, zero_grad), and the DistillTrainer behind the TSD-KD loss (None for CE)."""
    cfg, tokenizer, objective, batches = setup(args, folder)
    items = [batches[i] for i in range(len(batches))]
    model = load_student(args.student)
    model.train()
    trainer = None
    if variant == "tsdkd-loop":
        trainer = make_distill_trainer(cfg, tokenizer, objective, model, ListDataset(items))
        model = trainer.model

        def loss_of(batch):
            return trainer.compute_loss(model, batch)
    else:
        def loss_of(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    def step(batch):
        loss_of(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return items, model, loss_of, step, trainer


def worker_loop(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """`ce` (plain cross-entropy step) or `tsdkd-loop` (DistillTrainer.compute_loss in the same loop)."""
    with tempfile.TemporaryDirectory() as folder:
        items, model, loss_of, step, trainer = loop_setup(args, variant, Path(folder))
        rss = RssMarks()
        rss.start()
        steps, cpu = [], []
        for repeat in range(1 + args.repeats):
            for batch in items:
                start, start_cpu = time.perf_counter(), time.process_time()
                step(batch)
                steps.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            if repeat == 0:
                rss.after_warmup()
        result = {"pass_step_s": pass_times(steps[len(items):], len(items)),
                  "pass_step_cpu_s": pass_times(cpu[len(items):], len(items)), "warmup_step_s": sum(steps[: len(items)]) / len(items),
                  **rss.result(),
                  "completion_tokens_per_pass": sum(map(completion_tokens, items)), "steps_per_pass": len(items),
                  "ce_label_tokens_per_pass": sum(int((b["labels"][:, 1:] != -100).sum()) for b in items)}
        if args.breakdown:
            result["breakdown"] = breakdown(args, model, items, loss_of, trainer)
    return result


def worker_loop_pair(args: argparse.Namespace) -> dict[str, Any]:
    """The plain CE loop and the TSD-KD loss in the same loop (each its own student and AdamW), passes alternating in
    one process: each TSD-KD pass is timed next to a CE pass, so their ratio is the loss's own cost, with the same
    optimizer and no Trainer on either side, and immune to load drift between processes."""
    with tempfile.TemporaryDirectory() as folder:
        loops = {variant: loop_setup(args, variant, Path(folder) / variant) for variant in ("ce", "tsdkd-loop")}
        cpu: dict[str, list[float]] = {variant: [] for variant in loops}
        for repeat in range(1 + args.repeats):
            # The order alternates (CE first, then TSD-KD first), so that neither always runs on the other's cache state.
            for variant in (["ce", "tsdkd-loop"] if repeat % 2 == 0 else ["tsdkd-loop", "ce"]):
                items, _, _, step, _ = loops[variant]
                start = time.process_time()
                for batch in items:
                    step(batch)
                cpu[variant].append((time.process_time() - start) / len(items))
    # The first pass of each is its warm-up.
    return {"pass_step_cpu_s": cpu["tsdkd-loop"][1:], "paired_ce_pass_step_cpu_s": cpu["ce"][1:]}


def breakdown(args, model, items, loss_of, trainer) -> dict[str, Any]:
    """CPU seconds per step in each section (best pass), and torch.profiler's top operators by self CPU time."""
    import stage2_distill.chunked as chunked_module
    import stage2_distill.trainer as trainer_module

    sections: dict[str, float] = defaultdict(float)
    in_backward = [False]
    # The objective's terms run once more, off the step's clock (not while profiling): alone on leaf copies of the
    # head's statistics, forward and backward (their gradients are computed in the forward, in closed form).
    unclocked: dict[str, float] = defaultdict(float)
    rerun_alone = [True]

    def timed(name: str | Callable, fn: Callable) -> Callable:
        def wrapper(*a, **k):
            start = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                sections[name(a) if callable(name) else name] += time.process_time() - start
        return wrapper

    patches = []
    original_forward = model.forward
    model.forward = timed("model forward", original_forward)
    if trainer is not None:
        patches = [(trainer_module, "student_statistics"), (chunked_module, "chunked_token_statistics"),
                   (chunked_module._HeadStatistics, "backward")]
        originals = [getattr(m, n) for m, n in patches]
        trainer_module.student_statistics = timed("head: student statistics, forward", originals[0])
        chunked_module.chunked_token_statistics = timed("  of which fused head statistics, forward", originals[1])
        chunked_module._HeadStatistics.backward = staticmethod(timed("  of which fused head statistics, backward", originals[2]))
        objective = trainer.objective

        class TimedObjective:
            def __getattr__(self, name):
                return getattr(objective, name)

            def __call__(self, *a, **k):
                if rerun_alone[0]:
                    batch, stats, *rest = a
                    leaves = stats._replace(**{name: value.detach().requires_grad_() for name, value in stats._asdict().items()
                                               if value is not None and value.is_floating_point()})
                    start = time.process_time()
                    objective(batch, leaves, *rest, **k)[0].backward()
                    unclocked[OBJECTIVE_ALONE] += time.process_time() - start
                return timed("objective: loss terms", objective)(*a, **k)

        trainer.objective = TimedObjective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6)
    best: dict[str, float] | None = None
    best_total = math.inf
    for _ in range(1 + args.repeats):
        sections.clear()
        start = time.process_time()
        for batch in items:
            unclocked.clear()
            t0 = time.process_time()
            loss = loss_of(batch)
            sections["loss (forward incl. model)"] += time.process_time() - t0 - sum(unclocked.values())
            start += sum(unclocked.values())
            for name, seconds in unclocked.items():
                sections[name] += seconds
            t0 = time.process_time()
            in_backward[0] = True
            loss.backward()
            in_backward[0] = False
            sections["backward"] += time.process_time() - t0
            t0 = time.process_time()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sections["AdamW step + zero_grad"] += time.process_time() - t0
        total = time.process_time() - start
        if total < best_total:
            best_total, best = total, {k: v / len(items) for k, v in sections.items()}
    from torch.profiler import ProfilerActivity, profile

    rerun_alone[0] = False
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in items:
            loss = loss_of(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in ops)
    top = [{"op": e.key, "calls_per_step": e.count / len(items), "self_ms_per_step": e.self_cpu_time_total / 1e3 / len(items),
            "share": e.self_cpu_time_total / total_self} for e in ops[:12]]
    num_ops = sum(e.count for e in ops) / len(items)
    model.forward = original_forward
    for (module, name), original in zip(patches, originals if patches else []):
        setattr(module, name, staticmethod(original) if isinstance(module, type) else original)
    return {"step_s": best_total / len(items), "sections_s": best, "profiler_top_ops": top, "profiler_ops_per_step": num_ops}


TIMELINE_CATEGORIES = ["unknown", "parameter", "optimizer_state", "input", "temporary", "activation", "gradient", "autograd_detail"]


def live_tensor_timeline(step: Callable[[], None]) -> list[list[int]]:
    """Bytes of live tensors by TIMELINE_CATEGORIES at each moment of one call of `step`
    (torch.profiler's memory timeline)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as folder:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
            step()
        path = Path(folder) / "timeline.raw.json"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prof.export_memory_timeline(str(path), device="cpu")
        return json.loads(path.read_text())[1]


def worker_tensor_memory(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Peak bytes of live tensors during one step on the largest micro-batch (after two warm-up
    steps), from torch.profiler's memory timeline: independent of the allocator and of one-time costs."""
    with tempfile.TemporaryDirectory() as folder:
        items, _, _, step, _ = loop_setup(args, variant, Path(folder))
        largest = max(range(len(items)), key=lambda i: items[i]["input_ids"].numel())
        for batch in items[:2]:
            step(batch)
        sizes = live_tensor_timeline(lambda: step(items[largest]))
    totals = [sum(row) for row in sizes]
    at_peak = sizes[max(range(len(totals)), key=totals.__getitem__)]
    return {"peak_tensor_bytes": max(totals), "start_tensor_bytes": totals[0],
            "at_peak_by_category": dict(zip(TIMELINE_CATEGORIES, at_peak)),
            "batch_shape": list(items[largest]["input_ids"].shape), "completion_tokens": completion_tokens(items[largest])}


def worker_online(args: argparse.Namespace) -> dict[str, Any]:
    """The authors' online recipe, per optimizer step on the prompts of one cached batch: sample N
    candidates per prompt from the current student, teacher forward over them, then the TSD-KD loss
    over the full vocabulary (all three terms), backward, AdamW. Every pass starts from the same
    weights and seeds, so every pass samples the same tokens."""
    from stage2_distill.losses import (
        entropy_regularization,
        generalized_jsd,
        sequence_level_ranking_loss,
        token_level_ranking_loss,
        token_selection_weights,
    )
    from tsdkd.loading import padding_id
    from tsdkd.signals import read_manifest

    with tempfile.TemporaryDirectory() as folder:
        cfg, tokenizer, objective, batches = setup(args, Path(folder))
        items = [batches[i] for i in range(len(batches))]
    sampling = read_manifest(Path(args.signals))["sampling"]
    num_candidates, max_new_tokens = sampling["num_candidates"], sampling["max_new_tokens"]
    top_k = batches.top_k
    student = load_student(args.student)
    teacher = load_student(args.teacher)
    teacher.eval()
    initial = copy.deepcopy(student.state_dict())
    pad = padding_id(tokenizer)
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    prompts_per_step = []  # the prompts of each cached batch, one per prompt group
    for b in items:
        first_rows = [int((b["prompt_group"] == g).nonzero()[0]) for g in range(int(b["prompt_group"].max()) + 1)]
        prompts_per_step.append([b["input_ids"][row, : b["prompt_lengths"][row]].tolist() for row in first_rows])
    sections: dict[str, float] = defaultdict(float)

    def step(prompts: list[list[int]], seed: int, optimizer) -> int:
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        prompt_mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
        t0 = time.process_time()
        torch.manual_seed(seed)
        with torch.no_grad():
            sequences = student.generate(
                input_ids=ids, attention_mask=prompt_mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=max_new_tokens, num_return_sequences=num_candidates, pad_token_id=pad, eos_token_id=eos)
        t1 = time.process_time()
        completion = sequences[:, width:]
        is_eos = completion == eos
        mask = (is_eos.cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
        attention = torch.cat([prompt_mask.repeat_interleave(num_candidates, 0), mask.long()], dim=1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=sequences, attention_mask=attention, position_ids=positions).logits
            teacher_logprobs = torch.log_softmax(teacher_logits[:, width - 1 : -1, :vocab].float(), -1)
        t2 = time.process_time()
        student_logits = student(input_ids=sequences, attention_mask=attention, position_ids=positions).logits
        student_logprobs = torch.log_softmax(student_logits[:, width - 1 : -1, :vocab].float(), -1)
        tokens = mask.sum().clamp(min=1)
        h_s = -(student_logprobs.exp() * student_logprobs).sum(-1)
        h_t = -(teacher_logprobs.exp() * teacher_logprobs).sum(-1)
        weights = token_selection_weights(h_s, h_t, mask, cfg.tau_w)
        direct = (weights[mask] * generalized_jsd(teacher_logprobs[mask], student_logprobs[mask], cfg.jsd_beta)).sum() / tokens
        teacher_topk_logprobs, teacher_topk_ids = teacher_logprobs.topk(top_k, -1)
        token_rank = token_level_ranking_loss(student_logprobs, teacher_topk_ids, teacher_topk_logprobs, mask, h_s,
                                              cfg.rank_items, cfg.prefix_entropy_fraction)
        lengths = mask.sum(-1).clamp(min=1)
        policy = (student_logprobs.gather(-1, completion.unsqueeze(-1)).squeeze(-1) * mask).sum(-1) / lengths
        teacher_score = (teacher_logprobs.gather(-1, completion.unsqueeze(-1)).squeeze(-1) * mask).sum(-1) / lengths
        grid = (len(prompts), num_candidates)
        rank = teacher_score.view(grid).argsort(-1, descending=True).argsort(-1)
        # The behaviour policy is the student that sampled: the same weights, so its detached log-probs.
        sequence_rank = sequence_level_ranking_loss(policy.view(grid), policy.detach().view(grid), rank,
                                                    torch.ones(grid, dtype=torch.bool), cfg.beta_p)
        entropy = entropy_regularization(h_s, mask, cfg.entropy_quantile)
        loss = direct + cfg.alpha * (token_rank + sequence_rank) + cfg.lambda_ent * entropy
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.process_time()
        sections["student generate"] += t1 - t0
        sections["teacher forward"] += t2 - t1
        sections["loss step (full vocabulary)"] += t3 - t2
        return int(mask.sum())

    rss = RssMarks()
    rss.start()
    passes, passes_cpu, tokens, best_sections = [], [], [], None
    for repeat in range(1 + args.repeats):
        student.load_state_dict(initial)
        student.train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        sections.clear()
        start, start_cpu = time.perf_counter(), time.process_time()
        count = sum(step(p, 1000 + i, optimizer) for i, p in enumerate(prompts_per_step))
        elapsed = (time.perf_counter() - start) / len(items)
        elapsed_cpu = (time.process_time() - start_cpu) / len(items)
        if repeat and (not passes_cpu or elapsed_cpu < min(passes_cpu)):
            best_sections = {k: v / len(items) for k, v in sections.items()}
        if repeat:
            passes.append(elapsed)
            passes_cpu.append(elapsed_cpu)
            tokens.append(count)
        else:
            rss.after_warmup()
    return {"pass_step_s": passes, "pass_step_cpu_s": passes_cpu, **rss.result(), "sections_s": best_sections,
            "completion_tokens_per_pass": tokens, "steps_per_pass": len(items),
            "sequences_per_step": len(items) and sum(len(p) * num_candidates for p in prompts_per_step) / len(items)}


def chunk_inputs(args: argparse.Namespace, n: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """(hidden [n, d], head [V, d], teacher ids [n, k], targets [n]) for (c), seeded, on `device`."""
    d, vocab, k = args.hidden, args.vocab, args.k
    torch.manual_seed(0)
    hidden = torch.randn(n, d, device=device, requires_grad=True)
    head = (torch.randn(vocab, d, device=device) * 0.02).requires_grad_()  # the head is trained too
    # k distinct ids per token without a [n, V] temporary.
    teacher_ids = (torch.randint(0, vocab, (n, 1), device=device) + torch.arange(k, device=device) * (vocab // k)) % vocab
    return hidden, head, teacher_ids, torch.randint(0, vocab, (n,), device=device)


def chunk_loss(args: argparse.Namespace, chunk_size: int, hidden, head, teacher_ids, targets) -> torch.Tensor:
    """A scalar of every output of chunked_token_statistics at `chunk_size` (0: a plain cross-entropy head)."""
    from stage2_distill.chunked import chunked_token_statistics

    if chunk_size == 0:
        return torch.nn.functional.cross_entropy(hidden @ head.T, targets)
    # The top-m where the token-level ranking reads it (decision-prefix positions): here every 10th token.
    stats = chunked_token_statistics(hidden, head, teacher_ids, targets, chunk_size, args.vocab, num_items=args.m,
                                     ranked_rows=lambda entropy: torch.arange(len(entropy), device=entropy.device) % 10 == 0)
    return stats.bucket_logprobs.sum() + stats.entropy.sum() + stats.target_logprob.sum() + stats.topm_logprobs.sum()


def worker_chunk(args: argparse.Namespace) -> dict[str, Any]:
    """chunked_token_statistics (or a plain cross-entropy head) forward+backward on random data.
    Memory: a small run first (code pages, lazy initialisation), then the mark is reset and the
    first full-size run is measured; timing: best of --repeats after it; then one more run under
    torch.profiler for the live-tensor peak."""
    from torch.profiler import ProfilerActivity, profile

    def inputs(n: int):
        return chunk_inputs(args, n)

    def run(hidden, head, teacher_ids, targets) -> None:
        chunk_loss(args, args.chunk_size, hidden, head, teacher_ids, targets).backward()
        hidden.grad = head.grad = None

    run(*inputs(min(64, args.tokens)))
    data = inputs(args.tokens)
    reset = reset_peak_rss()
    before = max_rss_bytes()
    run(*data)
    peak = max_rss_bytes() - before
    times, cpu = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run(*data)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    sizes = live_tensor_timeline(lambda: run(*data))
    totals = [sum(row) for row in sizes]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(*data)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in ops)
    top = [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total_self}
           for e in ops[:10]]
    return {"times_s": times, "times_cpu_s": cpu, "peak_rss_delta_bytes": peak, "rss_mark_reset": reset,
            "peak_tensor_bytes": max(totals), "start_tensor_bytes": totals[0], "profiler_top_ops": top}


def worker_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.worker in ("tsdkd", "tsdkd-direct", "ce-trainer"):
        result = worker_trainer(args, args.worker)
    elif args.worker in ("ce", "tsdkd-loop"):
        result = worker_loop(args, args.worker)
    elif args.worker == "loop-pair":
        result = worker_loop_pair(args)
    elif args.worker.startswith("tensor-memory:"):
        result = worker_tensor_memory(args, args.worker.split(":", 1)[1])
    elif args.worker == "online":
        result = worker_online(args)
    elif args.worker == "chunk":
        result = worker_chunk(args)
    else:
        raise SystemExit(f"unknown worker {args.worker}")
    Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# the driver


def run_worker(args: argparse.Namespace, worker: str, *extra: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        command = [sys.executable, __file__, "--worker", worker, "--result", handle.name, "--repeats", str(args.repeats),
                   "--student", args.student, "--teacher", args.teacher, "--threads", str(args.threads), *extra]
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
        if args.signals:
            command += ["--signals", str(args.signals)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        if done.returncode:
            sys.stderr.write(done.stdout[-5000:] + done.stderr[-5000:])
            raise SystemExit(f"worker {worker} {' '.join(extra)} failed with exit code {done.returncode}")
        print(f"  {worker} {' '.join(extra)}: done", file=sys.stderr, flush=True)
        return json.loads(Path(handle.name).read_text())


def generate_signals(args: argparse.Namespace, folder: Path) -> Path:
    out = folder / "signals"
    command = [sys.executable, "-m", "tsdkd", "generate", "--prompts", args.prompts, "--student", args.student,
               "--teacher", args.teacher, "--out", str(out), "--limit", str(args.num_prompts),
               "--num-candidates", str(args.num_candidates), "--max-new-tokens", str(args.max_new_tokens),
               "--top-k", str(args.top_k), "--backend", "hf"]
    print("generating the signal dataset: " + " ".join(command[1:]), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return out


def decode_time(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds to read and collate one micro-batch from Parquet (SignalBatches.__getitem__), best pass."""
    with tempfile.TemporaryDirectory() as folder:
        _, _, _, batches = setup(args, Path(folder))
    best = best_cpu = math.inf
    for _ in range(1 + args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for i in range(len(batches)):
            batches[i]
        best = min(best, (time.perf_counter() - start) / len(batches))
        best_cpu = min(best_cpu, (time.process_time() - start_cpu) / len(batches))
    items = [batches[i] for i in range(len(batches))]
    return {"decode_s_per_batch": best, "decode_cpu_s_per_batch": best_cpu, "batches": len(batches), "sequences": batches.num_sequences,
            "completion_tokens": batches.num_tokens,
            "mean_padded_tokens_per_batch": statistics.mean(b["input_ids"].numel() for b in items),
            "mean_completion_tokens_per_batch": statistics.mean(map(completion_tokens, items)),
            "sequences_per_batch": statistics.mean(len(b["input_ids"]) for b in items)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    passes = [t for r in runs for t in r["pass_step_s"]]
    cpu = [t for r in runs for t in r["pass_step_cpu_s"]]
    return {"step_cpu_s_best": min(cpu), "step_cpu_s_median": statistics.median(cpu),
            "step_s_best": min(passes), "step_s_median": statistics.median(passes), "passes": len(passes),
            "peak_rss_delta_MiB_median": statistics.median(r["peak_rss_delta_bytes"] for r in runs) / MiB,
            "peak_rss_delta_MiB_all": [r["peak_rss_delta_bytes"] / MiB for r in runs],
            "steady_rss_delta_MiB_median": statistics.median(r["steady_rss_delta_bytes"] for r in runs) / MiB,
            "rss_mark_reset": all(r["rss_mark_reset"] for r in runs), "runs": runs}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default=str(ROOT / "data/toy-student"))
    parser.add_argument("--teacher", default=str(ROOT / "data/toy-teacher"))
    parser.add_argument("--prompts", default=str(ROOT / "data/toy/prompts.jsonl"))
    parser.add_argument("--signals", help="an existing signal dataset (default: generate one in a temporary folder)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--num-candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up pass")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per variant in (a)")
    parser.add_argument("--parts", default="abc")
    parser.add_argument("--batch-size", type=int, help="micro-batch size in (a) and (b) [tsdkd distill's default]")
    # (c)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--m", type=int, default=10)
    parser.add_argument("--chunk-sizes", default="512,4096")
    parser.add_argument("--processes-c", type=int, default=1, help="fresh processes per variant in (c)")
    # worker-only
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--breakdown", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process [1]: on a shared machine, OpenMP barriers of 2+ threads stall on descheduled threads")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.worker:
        worker_main(args)
        return
    torch.set_num_threads(args.threads)

    import transformers

    result: dict[str, Any] = {
        "date": date.today().isoformat(),
        "command": " ".join(["python", "bench/bench_stage2.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s) per process, no GPU used, "
                   f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        "load_average_at_start": os.getloadavg(),
        "memory_method": "own subprocess per variant; peak-RSS mark reset via /proc/self/clear_refs after loading; "
                         "ru_maxrss after the steps minus ru_maxrss before the first step",
    }
    with tempfile.TemporaryDirectory() as folder:
        if "a" in args.parts or "b" in args.parts:
            if not args.signals:
                args.signals = str(generate_signals(args, Path(folder)))
            result["dataset"] = {"signals": "temporary" if folder in args.signals else args.signals,
                                 "prompts": args.num_prompts, "candidates": args.num_candidates,
                                 "max_new_tokens": args.max_new_tokens, "top_k": args.top_k, "batch_size_option": args.batch_size,
                                 **decode_time(args)}
        if "a" in args.parts:
            variants = ["ce", "tsdkd", "tsdkd-direct", "tsdkd-loop", "ce-trainer"]
            runs: dict[str, list] = {v: [] for v in variants}
            for _ in range(args.processes):
                for variant in variants:
                    runs[variant].append(run_worker(args, variant))
            result["a"] = {v: summarize(r) for v, r in runs.items()}
            for v in variants:
                # Each process round runs every variant back to back: ratios within a round cancel the
                # drift of a shared machine's load, which best-of-all-rounds ratios do not.
                result["a"][v]["cpu_ratio_to_ce_per_round"] = [
                    min(r["pass_step_cpu_s"]) / min(ce["pass_step_cpu_s"]) for r, ce in zip(runs[v], runs["ce"])]
            for v in variants:
                assert result["a"][v]["runs"][0]["completion_tokens_per_pass"] == result["a"]["ce"]["runs"][0]["completion_tokens_per_pass"]
            assert runs["ce"][0]["ce_label_tokens_per_pass"] == runs["ce"][0]["completion_tokens_per_pass"], "CE sees other tokens"
            result["a"]["paired"] = {}
            for v in ("tsdkd", "ce-trainer", "tsdkd-loop"):
                worker = ["loop-pair"] if v == "tsdkd-loop" else [v, "--paired"]
                paired_runs = [run_worker(args, *worker) for _ in range(args.processes)]
                result["a"]["paired"][v] = {
                    "pass_ratios": [t / c for r in paired_runs for t, c in zip(r["pass_step_cpu_s"], r["paired_ce_pass_step_cpu_s"])],
                    "best_pass_ratio_per_process": [min(r["pass_step_cpu_s"]) / min(r["paired_ce_pass_step_cpu_s"]) for r in paired_runs],
                    "runs": paired_runs}
            result["a"]["tensor_memory"] = {v: run_worker(args, f"tensor-memory:{v}") for v in ("ce", "tsdkd-loop")}
            result["a"]["breakdown"] = {v: run_worker(args, v, "--breakdown")["breakdown"] for v in ("tsdkd-loop", "ce")}
        if "b" in args.parts:
            result["b"] = {"online": summarize([run_worker(args, "online")])}
            if "a" not in args.parts:
                result["a"] = {"tsdkd": summarize([run_worker(args, "tsdkd")]), "tsdkd-loop": summarize([run_worker(args, "tsdkd-loop")])}
        if "c" in args.parts:
            result["c"] = {}
            shape = ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
                     "--k", str(args.k), "--m", str(args.m)]
            for chunk in [int(c) for c in args.chunk_sizes.split(",")] + [0]:
                name = f"chunk {chunk}" if chunk else "plain cross-entropy head"
                runs_c = [run_worker(args, "chunk", "--chunk-size", str(chunk), *shape) for _ in range(args.processes_c)]
                result["c"][name] = {"chunk_size": chunk, "time_cpu_s_best": min(t for r in runs_c for t in r["times_cpu_s"]),
                                     "time_s_best": min(t for r in runs_c for t in r["times_s"]),
                                     "time_cpu_s_all": [r["times_cpu_s"] for r in runs_c], "time_s_all": [r["times_s"] for r in runs_c],
                                     "peak_rss_delta_MiB_median": statistics.median(r["peak_rss_delta_bytes"] for r in runs_c) / MiB,
                                     "peak_rss_delta_MiB_all": [r["peak_rss_delta_bytes"] / MiB for r in runs_c],
                                     "peak_tensor_MiB": runs_c[0]["peak_tensor_bytes"] / MiB,
                                     "profiler_top_ops": runs_c[0]["profiler_top_ops"],
                                     "start_tensor_MiB": runs_c[0]["start_tensor_bytes"] / MiB,
                                     "rss_mark_reset": all(r["rss_mark_reset"] for r in runs_c)}
            result["c_shape"] = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "k": args.k, "m": args.m}

    result["load_average_at_end"] = os.getloadavg()
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"stage2-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print_tables(result)
    print(f"\nwritten: {path.relative_to(ROOT)}  ({result['machine']}; load average {result['load_average_at_start'][0]:.1f} "
          f"at start, {result['load_average_at_end'][0]:.1f} at end)")


NAMES = {"ce": "plain CE loop (baseline)", "tsdkd": "`tsdkd distill` step (DistillTrainer.train)",
         "tsdkd-direct": "same, direct term only (no indirect or entropy terms; batches grouped by prompt as above)",
         "tsdkd-loop": "TSD-KD loss in the plain loop", "ce-trainer": "transformers Trainer, CE"}
OBJECTIVE_ALONE = "  the same terms alone, forward and backward (run again, off the clock)"
SECTION_ORDER = ["loss (forward incl. model)", "model forward", "head: student statistics, forward",
                 "  of which fused head statistics, forward",
                 "objective: loss terms", OBJECTIVE_ALONE, "backward", "  of which fused head statistics, backward", "AdamW step + zero_grad"]


def print_tables(result: dict[str, Any]) -> None:
    if "dataset" in result:
        d = result["dataset"]
        print(f"Dataset: {d['prompts']} prompts x {d['candidates']} candidates, max {d['max_new_tokens']} new tokens, "
              f"top-k {d['top_k']}: {d['batches']} micro-batches of {d['sequences_per_batch']:.0f} sequences, "
              f"{d['mean_completion_tokens_per_batch']:.0f} completion tokens ({d['mean_padded_tokens_per_batch']:.0f} padded tokens) "
              f"per batch on average.\nParquet read + collate (SignalBatches.__getitem__): {ms(d['decode_cpu_s_per_batch'])} ms CPU, "
              f"{ms(d['decode_s_per_batch'])} ms wall per batch (not in the step times below).\n")
    if "a" in result and "ce" in result["a"]:
        a = result["a"]
        base = a["ce"]
        print("(a) One optimizer step on the same micro-batches\n")
        print("| variant | CPU ms/step best | CPU median | wall ms/step best | CPU time vs CE (aim <= 1.15) "
              "| same, median of per-round ratios (range) | wall vs CE | peak RSS delta MiB | vs CE (aim <= 1.2) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for v in ("ce", "tsdkd", "tsdkd-direct", "tsdkd-loop", "ce-trainer"):
            r = a[v]
            rounds = r.get("cpu_ratio_to_ce_per_round") or [math.nan]
            print(f"| {NAMES[v]} | {ms(r['step_cpu_s_best'])} | {ms(r['step_cpu_s_median'])} | {ms(r['step_s_best'])} | "
                  f"{r['step_cpu_s_best'] / base['step_cpu_s_best']:.2f} | "
                  f"{statistics.median(rounds):.2f} ({min(rounds):.2f}-{max(rounds):.2f}) | {r['step_s_best'] / base['step_s_best']:.2f} | "
                  f"{r['peak_rss_delta_MiB_median']:.1f} | {r['peak_rss_delta_MiB_median'] / max(base['peak_rss_delta_MiB_median'], 1e-9):.2f} |")
        if "paired" in a:
            runs = a["paired"]["tsdkd"]["runs"]
            print("\nPaired in one process: after each pass of the Trainer over the batches, one pass of the plain CE loop; "
                  "for the TSD-KD loss in the plain loop, its passes alternate with the CE loop's "
                  f"({len(runs)} processes x {len(runs[0]['pass_step_cpu_s'])} timed passes per variant):\n")
            print("| variant | CPU time vs the adjacent CE pass, median of passes (range) | best pass vs best CE pass, median of processes |")
            print("|---|---|---|")
            for v, p in a["paired"].items():
                print(f"| {NAMES[v]} | {statistics.median(p['pass_ratios']):.3f} ({min(p['pass_ratios']):.2f}-{max(p['pass_ratios']):.2f}) | "
                      f"{statistics.median(p['best_pass_ratio_per_process']):.3f} |")
            same_engine = statistics.median(a["paired"]["tsdkd"]["pass_ratios"]) / statistics.median(a["paired"]["ce-trainer"]["pass_ratios"])
            print(f"\n`tsdkd distill` step vs the transformers Trainer's CE step (same engine), ratio of the two medians: {same_engine:.3f}")
        if "tensor_memory" in a:
            t = a["tensor_memory"]
            ce_peak = t["ce"]["peak_tensor_bytes"]
            print(f"\nLive-tensor peak (torch.profiler memory timeline), one step on the largest batch {t['ce']['batch_shape']}:\n")
            print("| variant | peak MiB | vs CE (aim <= 1.2) | activation | autograd detail | temporary | gradient | parameter + optimizer state |")
            print("|---|---|---|---|---|---|---|---|")
            for v in ("ce", "tsdkd-loop"):
                c = t[v]["at_peak_by_category"]
                print(f"| {NAMES[v]} | {t[v]['peak_tensor_bytes'] / MiB:.1f} | {t[v]['peak_tensor_bytes'] / ce_peak:.2f} | "
                      f"{c['activation'] / MiB:.1f} | {c['autograd_detail'] / MiB:.1f} | {c['temporary'] / MiB:.1f} | "
                      f"{c['gradient'] / MiB:.1f} | {(c['parameter'] + c['optimizer_state']) / MiB:.1f} |")
        for v, b in a.get("breakdown", {}).items():
            print(f"\nBreakdown, {NAMES.get(v, v)} ({ms(b['step_s'])} CPU ms/step in this run, {b['profiler_ops_per_step']:.0f} torch ops/step):\n")
            print("| section | CPU ms/step |\n|---|---|")
            for name in SECTION_ORDER:
                if name in b["sections_s"]:
                    print(f"| {name.strip()} | {ms(b['sections_s'][name])} |")
            print("\n| top operators by self CPU time | calls/step | ms/step | share |\n|---|---|---|---|")
            for op in b["profiler_top_ops"][:8]:
                print(f"| `{op['op']}` | {op['calls_per_step']:.0f} | {op['self_ms_per_step']:.2f} | {op['share']:.0%} |")
    if "b" in result:
        online, offline, loop = result["b"]["online"], result["a"]["tsdkd"], result["a"]["tsdkd-loop"]
        tokens_on = statistics.mean(online["runs"][0]["completion_tokens_per_pass"]) / online["runs"][0]["steps_per_pass"]
        tokens_off = offline["runs"][0]["completion_tokens_per_pass"] / offline["runs"][0]["steps_per_pass"]
        print("\n(b) Online (authors' recipe) vs offline, per optimizer step\n")
        print("| recipe | CPU ms/step best | wall ms/step best | completion tokens/step | CPU ms per 1k completion tokens "
              "| peak RSS delta MiB | online / this, CPU (aim >= 3) | wall |")
        print("|---|---|---|---|---|---|---|---|")
        rows = [("online: generate + teacher forward + full-vocab loss step", online, tokens_on),
                ("offline: `tsdkd distill` step from the cache", offline, tokens_off),
                ("offline: TSD-KD loss in the plain loop", loop, tokens_off)]
        for name, r, tok in rows:
            print(f"| {name} | {ms(r['step_cpu_s_best'])} | {ms(r['step_s_best'])} | {tok:.0f} | {ms(r['step_cpu_s_best'] / tok * 1000)} | "
                  f"{r['peak_rss_delta_MiB_median']:.1f} | {online['step_cpu_s_best'] / r['step_cpu_s_best']:.1f}x | "
                  f"{online['step_s_best'] / r['step_s_best']:.1f}x |")
        sections = online["runs"][0]["sections_s"]
        print("\nOnline step, CPU time by section (best pass): " + ", ".join(f"{k} {ms(v)} ms" for k, v in sections.items()))
    if "c" in result:
        s = result["c_shape"]
        print(f"\n(c) Loss head forward+backward, {s['tokens']} tokens, d={s['hidden']}, V={s['vocab']}, k={s['k']}, m={s['m']}\n")
        print("| variant | CPU s best | wall s best | peak RSS delta MiB | live-tensor peak above the inputs MiB |\n|---|---|---|---|---|")
        for name, r in result["c"].items():
            label = f"chunked_token_statistics, {name}" + (" (unchunked)" if r["chunk_size"] >= s["tokens"] else "")
            if not r["chunk_size"]:
                label = "reference: F.cross_entropy(h @ W.T), unchunked"
            print(f"| {label} | {r['time_cpu_s_best']:.2f} | {r['time_s_best']:.2f} | {r['peak_rss_delta_MiB_median']:.0f} | {r['peak_tensor_MiB'] - r['start_tensor_MiB']:.0f} |")
        for name, r in result["c"].items():
            top = ", ".join(f"`{op['op'].replace('aten::', '')}` {op['share']:.0%}" for op in r["profiler_top_ops"][:8])
            print(f"\nTop operators by self CPU time, {name}: {top}")


if __name__ == "__main__":
    main()
