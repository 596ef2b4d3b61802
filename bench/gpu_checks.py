"""The checks only a CUDA GPU can make, in one run (a borrowed GPU machine's time is short).

    python bench/gpu_checks.py --work DIR --report FILE [--sections generate,precision,...]

Each section runs the real commands (`python -m tsdkd ...`, `accelerate launch`) on the toy pair in
data/ and records what it measured; a failing section does not stop the others, and the report
(JSON) is rewritten after each one, so a run cut short keeps what it finished.

generate   `tsdkd generate --backend hf` on the GPU (bf16), then `tsdkd validate` on its output.
precision  `tsdkd distill` with bf16 autocast (`--bf16 auto`, fp32 master weights) and with
           `--bf16 off` on the GPU, and float32 on the CPU, from the same signals: the loss of
           each logged step side by side; the saved student loads and generates on the GPU.
resume     two uninterrupted bf16 runs (is training on this GPU deterministic?), and a run killed
           (SIGKILL) after its first checkpoint and rerun: weights compared to the uninterrupted.
fsdp2      the same under `accelerate launch` with FSDP2 (one process; the head statistics inside
           the sharded head's forward, the full-state-dict save, a killed run resumed from its
           sharded checkpoint).
zero3      the same under `accelerate launch` with DeepSpeed ZeRO-3 (needs deepspeed installed).
eval       `tsdkd eval --backend hf` on the GPU (the toy student and the resume section's).
bench      bench/bench_gpu.py: `chunk`, and `steps` on the toy signals at micro-batch 8 and 32; on a
           random-weight pair of SmolLM2's shapes and tokenizer (--real-like DIR holding their
           config and tokenizer files) with a 64M and a 1B student, on signals that pair made
           (here, or before with --real-signals, to spare the GPU machine's time).

Several invocations with the same --report extend it (e.g. one section per call).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
TOY = {"student": ROOT / "data/toy-student", "teacher": ROOT / "data/toy-teacher", "prompts": ROOT / "data/toy/prompts.jsonl"}
# Four epochs of the toy signals (16 micro-batches of 8 sequences each): 64 steps, a checkpoint every 8.
TRAIN = ["--epochs", "4", "--save-steps", "8", "--logging-steps", "1", "--learning-rate", "1e-4", "--warmup-ratio", "0"]

FSDP2_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 1
num_machines: 1
machine_rank: 0
mixed_precision: bf16
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_cpu_ram_efficient_loading: false
"""
ZERO3_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_processes: 1
num_machines: 1
machine_rank: 0
deepspeed_config:
  deepspeed_config_file: {ds_json}
"""
ZERO3_JSON = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
              "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}


def run(command: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 300) -> float:
    """Runs a command to completion, its output appended to `log`; raises on a non-zero exit. Returns seconds."""
    start = time.perf_counter()
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(map(str, command))}\n")
        handle.flush()
        done = subprocess.run(list(map(str, command)), stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, **(env or {})}, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"exit {done.returncode}: {' '.join(map(str, command[:4]))} ... (see {log.name})")
    return time.perf_counter() - start


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as a machine crash would: a launcher's workers
    (torchrun's) run in process groups of their own, so killing the launcher's group leaves them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pending, tree = [pid], []
    while pending:
        tree.append(pending.pop())
        pending.extend(children.get(tree[-1], []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def killed_after_checkpoint(command: list[str], out: Path, log: Path, timeout: float = 300) -> dict[str, Any]:
    """Starts `command`, SIGKILLs its process group once out/checkpoints holds a checkpoint, then reruns
    it to the end. Returns which checkpoints there were when it was killed."""
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(map(str, command))}   (killed after its first checkpoint)\n")
        handle.flush()
        process = subprocess.Popen(list(map(str, command)), stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True)
        deadline = time.monotonic() + timeout
        while process.poll() is None and not list((out / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            if time.monotonic() > deadline:
                kill_tree(process.pid)
                raise RuntimeError(f"no checkpoint in {timeout} s: {' '.join(map(str, command[:4]))} ...")
            time.sleep(0.02)
        kill_tree(process.pid)
        exit_code = process.wait()
    found = sorted((out / "checkpoints").glob("checkpoint-*"))
    kept = {p.name: sorted(f.name for f in p.iterdir()) for p in found}  # the rerun removes them once the student is saved
    if exit_code == 0:
        return {"killed": False, "note": "the run finished before a checkpoint was seen", "checkpoints": kept}
    if not kept:
        raise RuntimeError(f"exit {exit_code} before any checkpoint: {' '.join(map(str, command[:4]))} ... (see {log.name})")
    logged_before = log.stat().st_size
    run(command, log, timeout=timeout)
    with log.open() as handle:
        handle.seek(logged_before)
        rerun_output = handle.read()
    # Training is deterministic here, so a restart from scratch would end with the same weights: the rerun must say
    # it continued.
    if f"{out}: continuing from checkpoint-" not in rerun_output:
        raise RuntimeError(f"the rerun into {out} did not continue from a checkpoint")
    return {"killed": True, "exit_code": exit_code, "checkpoints_at_kill": kept}


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in saved_tensors(folder).items()}


def weight_difference(a: Path, b: Path) -> dict[str, Any]:
    """Max |a - b| over the tensors, and its size against how far training moved the weights
    (max |b - initial|): 0 for identical runs, small against 1 for runs equal up to rounding."""
    first, second, initial = weights(a), weights(b), weights(TOY["student"])
    shared = sorted(set(first) & set(second))
    diff = max(float((first[k] - second[k]).abs().max()) for k in shared)
    moved = max(float((second[k] - initial[k]).abs().max()) for k in shared if k in initial)
    return {"max_abs_diff": diff, "max_abs_moved": moved, "diff_vs_moved": diff / moved if moved else None,
            "identical": diff == 0.0, "tensors": len(shared), "only_in_one": sorted(set(first) ^ set(second))}


def logged(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in logged(out) if "loss" in row]


def distill_command(signals: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tsdkd", "distill", "--signals", signals, "--student", TOY["student"], "--out", out, *TRAIN, *extra]


def launched(config: Path, command: list[str]) -> list[str]:
    """`command` (python -m tsdkd ...) under `accelerate launch --config_file config`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "-m", *command[2:]]


def loads_and_generates(folder: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("Start with 3. Add 4. What is the result?", return_tensors="pt").to(device)
    output = model.generate(**ids, max_new_tokens=24, do_sample=False)
    return {"saved_dtypes": sorted({str(v.dtype) for v in saved_tensors(folder).values()}),
            "generation_eos": GenerationConfig.from_pretrained(folder).eos_token_id, "tokenizer_eos": tokenizer.eos_token_id,
            "greedy_text": tokenizer.decode(output[0, ids["input_ids"].shape[1]:])}


def relative(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]


def machine() -> dict[str, Any]:
    """The GPU, its driver, Python and the versions of the packages the checks run on."""
    import importlib.metadata
    import platform

    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                            text=True).stdout.strip() if shutil.which("nvidia-smi") else None
    packages = {}
    for name in ("torch", "transformers", "accelerate", "deepspeed", "datasets", "pyarrow", "safetensors"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "driver": driver,
            "cuda": torch.version.cuda, "python": platform.python_version(), "packages": packages}


class Checks:
    def __init__(self, work: Path, report: Path, real_like: Path | None, real_signals: Path | None) -> None:
        self.work, self.report_path, self.real_like, self.real_signals = work, report, real_like, real_signals
        self.log = report.with_suffix(".log")
        self.signals = work / "signals"
        # A report from an earlier invocation into the same file is extended, not replaced.
        self.report: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {**machine(), "sections": {}}

    def section(self, name: str, body: Callable[[], dict[str, Any]]) -> None:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = {"ok": True, **body()}
        except Exception as error:  # a failed section is recorded and the next one runs
            result = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - start, 1)
        self.report["sections"][name] = result
        self.report_path.write_text(json.dumps(self.report, indent=1, default=str))
        print(json.dumps({k: v for k, v in result.items() if k != "traceback"}, default=str)[:3000], flush=True)

    def generate(self) -> dict[str, Any]:
        seconds = run([sys.executable, "-m", "tsdkd", "generate", "--prompts", TOY["prompts"], "--student", TOY["student"],
                       "--teacher", TOY["teacher"], "--out", self.signals, "--limit", "32", "--num-candidates", "4",
                       "--max-new-tokens", "128", "--top-k", "20", "--backend", "hf"], self.log)
        run([sys.executable, "-m", "tsdkd", "validate", self.signals, "--student", TOY["student"]], self.log)
        manifest = json.loads((self.signals / "tsdkd.json").read_text())
        return {"generate_s": round(seconds, 1), "validated": True, "stats": manifest["stats"]}

    def precision(self) -> dict[str, Any]:
        outs = {name: self.work / f"precision-{name}" for name in ("gpu-bf16", "gpu-fp32", "cpu-fp32")}
        run(distill_command(self.signals, outs["gpu-bf16"], "--max-steps", "16"), self.log)
        run(distill_command(self.signals, outs["gpu-fp32"], "--max-steps", "16", "--bf16", "off"), self.log)
        run(distill_command(self.signals, outs["cpu-fp32"], "--max-steps", "16"), self.log, env={"CUDA_VISIBLE_DEVICES": ""})
        loss = {name: losses(out) for name, out in outs.items()}
        finite = all(all(v == v and abs(v) != float("inf") for row in logged(out) for v in row.values() if isinstance(v, float))
                     for out in outs.values())
        return {"losses": loss, "finite": finite,
                "gpu_fp32_vs_cpu_fp32_rel": relative(loss["gpu-fp32"], loss["cpu-fp32"]),
                "gpu_bf16_vs_gpu_fp32_rel": relative(loss["gpu-bf16"], loss["gpu-fp32"]),
                "weights_gpu_fp32_vs_cpu_fp32": weight_difference(outs["gpu-fp32"], outs["cpu-fp32"]),
                "weights_gpu_bf16_vs_gpu_fp32": weight_difference(outs["gpu-bf16"], outs["gpu-fp32"]),
                "student": loads_and_generates(outs["gpu-bf16"]),
                "last_metrics_gpu_bf16": logged(outs["gpu-bf16"])[-1]}

    def resumed(self, name: str, wrap: Callable[[list[str]], list[str]]) -> dict[str, Any]:
        """An uninterrupted run, a second one, and a killed-and-rerun one of the same command (under `wrap`)."""
        outs = {k: self.work / f"{name}-{k}" for k in ("a", "b", "killed")}
        seconds = run(wrap(distill_command(self.signals, outs["a"])), self.log)
        run(wrap(distill_command(self.signals, outs["b"])), self.log)
        kill = killed_after_checkpoint(wrap(distill_command(self.signals, outs["killed"])), outs["killed"], self.log)
        return {"run_s": round(seconds, 1), "steps": len(losses(outs["a"])), "first_losses": losses(outs["a"])[:4],
                "two_runs": weight_difference(outs["a"], outs["b"]),
                "kill": kill, "killed_vs_uninterrupted": weight_difference(outs["killed"], outs["a"]),
                "student": loads_and_generates(outs["a"])}

    def resume(self) -> dict[str, Any]:
        return self.resumed("resume", lambda command: command)

    def launched_section(self, name: str, config_text: str) -> dict[str, Any]:
        config = self.work / f"{name}.yaml"
        config.write_text(config_text)
        result = self.resumed(name, lambda command: launched(config, command))
        single = self.work / "resume-a"
        if (single / "model.safetensors").exists():
            result["vs_single_process_first_losses_rel"] = relative(losses(self.work / f"{name}-a")[:8], losses(single)[:8])
            result["vs_single_process_weights"] = weight_difference(self.work / f"{name}-a", single)
        return result

    def fsdp2(self) -> dict[str, Any]:
        return self.launched_section("fsdp2", FSDP2_CONFIG)

    def zero3(self) -> dict[str, Any]:
        ds_json = self.work / "zero3.json"
        ds_json.write_text(json.dumps(ZERO3_JSON))
        return self.launched_section("zero3", ZERO3_CONFIG.format(ds_json=ds_json))

    def eval(self) -> dict[str, Any]:
        out = self.work / "eval"
        seconds = run([sys.executable, "-m", "tsdkd", "eval", "--model", TOY["student"], "--model", self.work / "resume-a",
                       "--data", ROOT / "data/toy/test_id.jsonl", "--backend", "hf", "--max-new-tokens", "96", "--out", out], self.log)
        return {"eval_s": round(seconds, 1), "files": sorted(p.name for p in out.iterdir()),
                "comparison": json.loads((out / "comparison.json").read_text())}

    def bench(self) -> dict[str, Any]:
        bench = [sys.executable, ROOT / "bench/bench_gpu.py"]
        results = {}

        def measured(name: str, *args: Any) -> None:
            path = self.work / f"bench-{name}.json"
            try:
                run([*bench, *args, "--result", path], self.log, timeout=240)
                results[name] = json.loads(path.read_text())
            except Exception as error:
                results[name] = {"error": f"{type(error).__name__}: {error}"}
            self.report["sections"]["bench (so far)"] = results
            self.report_path.write_text(json.dumps(self.report, indent=1, default=str))

        measured("chunk", "chunk")
        measured("toy-bs8", "steps", "--signals", self.signals, "--student", TOY["student"])
        measured("toy-bs32", "steps", "--signals", self.signals, "--student", TOY["student"], "--batch-size", "32")
        if self.real_like is None:
            return results
        student, teacher, big = self.work / "rand-student", self.work / "rand-teacher", self.work / "rand-1b"
        run([*bench, "random-model", "--like", self.real_like / "smollm2-student", "--out", student], self.log)
        run([*bench, "random-model", "--like", self.real_like / "smollm2-student", "--out", big, "--set", "hidden_size=2048",
             "intermediate_size=8192", "num_hidden_layers=16", "num_attention_heads=32", "num_key_value_heads=8"], self.log)
        real_signals = self.real_signals
        if real_signals is None:
            real_signals = self.work / "rand-signals"
            run([*bench, "random-model", "--like", self.real_like / "smollm2-135m-instruct", "--out", teacher], self.log)
            seconds = run([sys.executable, "-m", "tsdkd", "generate", "--prompts", TOY["prompts"], "--student", student,
                           "--teacher", teacher, "--out", real_signals, "--limit", "32", "--num-candidates", "4",
                           "--max-new-tokens", "128", "--top-k", "20", "--backend", "hf"], self.log)
            results["random_pair_generate_s"] = round(seconds, 1)
        measured("smollm2-shape-64m-bs8", "steps", "--signals", real_signals, "--student", student, "--rounds", "2")
        measured("random-1b-bs8", "steps", "--signals", real_signals, "--student", big, "--rounds", "2")
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--real-like", type=Path, help="a folder holding smollm2-student/ and smollm2-135m-instruct/ "
                        "(config and tokenizer files; no weights needed)")
    parser.add_argument("--real-signals", type=Path, help="signals made by the random pair elsewhere (`random-model` of "
                        "both, `tsdkd generate` 32 prompts x 4 x 128 tokens), to spare the GPU machine's time")
    parser.add_argument("--toy-signals", type=Path, help="toy signals made elsewhere (as the generate section makes them), "
                        "for the other sections when generate is not run or fails")
    parser.add_argument("--sections", default="generate,precision,resume,fsdp2,zero3,eval,bench")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checks = Checks(args.work, args.report, args.real_like, args.real_signals)
    for name in args.sections.split(","):
        generated = checks.report["sections"].get("generate", {}).get("ok")
        if name != "generate" and args.toy_signals and not generated and "signals_from" not in checks.report:
            shutil.rmtree(checks.signals, ignore_errors=True)
            shutil.copytree(args.toy_signals, checks.signals)
            checks.report["signals_from"] = str(args.toy_signals)
        checks.section(name, getattr(checks, name))


if __name__ == "__main__":
    main()
