"""`tsdkd distill`: a student trained from cached teacher signals, saved as a Hugging Face folder."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, TrainingArguments
from transformers.training_args import ParallelMode

from stage2_distill.data import SignalBatches, collate_single
from stage2_distill.objective import Objective
from stage2_distill.trainer import CheckpointOnInterrupt, DistillTrainer, MetricsFile, TrainingComplete
from tsdkd import __version__
from tsdkd.config import DISTILL_RUN_INFO, RESUMABLE_DISTILL_CHANGES, DistillConfig
from tsdkd.errors import TsdkdError
from tsdkd.fingerprint import (differing_settings, hub_file, hub_snapshot, is_hub_id, local_path, model_identity, note_unchecked_weights, same_model,
                               same_name, sha256_file, sha256_json, tokenizer_fingerprint, with_real_paths)
from tsdkd.loading import context_length, dtype_name, end_token_ids, gpu_has_bf16, is_license_file, load_tokenizer, padding_id, pinned
from tsdkd.locks import default_permissions, exclusive_use, full_device_is_one_line, in_use, writable_folder
from tsdkd.signals import read_json_object, read_manifest, write_json_atomic
from tsdkd.validate import validate_dataset

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"


def check_signals(cfg: DistillConfig, fingerprint: dict[str, Any]) -> list[dict[str, Any]]:
    """Every dataset valid, made for this student's tokenizer, and usable together."""
    manifests, absolute = [], [local_path(folder) for folder in cfg.signals]
    for index, folder in enumerate(cfg.signals):
        if Path(folder).is_file():
            raise TsdkdError(f"--signals {folder} is a file; name the dataset folder (the --out of `tsdkd generate`)")
        if not Path(folder).is_dir():
            raise TsdkdError(f"--signals {folder}: no such folder")
        if absolute[index] in absolute[:index]:
            raise TsdkdError(f"--signals {folder} is given twice; every row would be trained on twice")
        manifests.append(validate_dataset(Path(folder), fingerprint, deep=True))
    first_seen: dict[str, tuple[str, str]] = {}
    for folder, manifest in zip(cfg.signals, manifests):
        for entry in manifest["shards"]:
            seen_in, seen_file = first_seen.setdefault(entry["sha256"], (folder, entry["file"]))
            if seen_in != folder:  # a copy, or a split job's part beside its merged dataset
                raise TsdkdError(f"--signals {folder}: its {entry['file']} is the same shard as {seen_file} of --signals {seen_in}; "
                                 "every row of it would be trained on twice (name each dataset once; a merged dataset replaces its parts)")
    for key in ("top_k", "teacher_entropy"):
        values = {str(m[key]) for m in manifests}
        if len(values) > 1:
            raise TsdkdError(f"--signals: the datasets differ in {key} ({', '.join(sorted(values))}); distil from one kind at a time")
    if sum(m["stats"]["candidates"] for m in manifests) == 0:
        raise TsdkdError("--signals: the datasets hold no candidates")
    return manifests


def note_data_origin(cfg: DistillConfig, manifests: list[dict[str, Any]], student: dict[str, Any]) -> None:
    """Says (without refusing: shared data is meant for other students too) when a dataset was sampled by
    another model than --student (`student`: its model_identity), or is one part of a split `tsdkd generate`
    job whose other parts are not given."""
    for folder, manifest in zip(cfg.signals, manifests):
        note_unchecked_weights(manifest["student"], student, f"--signals {folder}")
        if not same_model(manifest["student"], student):
            other = f"at other weights or config than --student {cfg.student} now" \
                if same_name(manifest["student"], student) else f"not by --student {cfg.student}"
            print(f"note: --signals {folder} was sampled by {manifest['student']['name_or_path']}, {other}: off-policy "
                  "data for it, and the sequence-level ranking scores its log-probs against the sampler's")
        num_parts = manifest["job"]["num_shards"]
        parts_given = {m["job"]["shard_index"] for m in manifests
                       if m["job"]["num_shards"] == num_parts and not differing_settings(manifest["settings"], m["settings"], ("job",))}
        if len(parts_given) < num_parts:
            print(f"note: --signals {folder} is part {manifest['job']['shard_index'] + 1} of {num_parts} of a split "
                  "`tsdkd generate` job; `tsdkd merge` the parts, or name them all, to train on the whole job")


def check_one_gpu_per_process(args: TrainingArguments) -> None:
    """Several GPUs in one process would make the Trainer replicate the student with nn.DataParallel,
    whose copies split the batch that the output head's statistics were set up for."""
    if args.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        raise TsdkdError(f"{args.n_gpu} GPUs are visible to one process: launch one process per GPU "
                         f"(`torchrun --nproc_per_node {args.n_gpu} -m tsdkd -- distill ...` or `accelerate launch`), "
                         "or pick one GPU with CUDA_VISIBLE_DEVICES=0")


def signals_checksum(manifests: list[dict[str, Any]]) -> str:
    """One checksum over every shard of the datasets, in order: a resumed run must read the same data."""
    return sha256_json([[shard["sha256"] for shard in manifest["shards"]] for manifest in manifests])


def signals_jobs_checksum(manifests: list[dict[str, Any]]) -> str:
    """One checksum over the settings that generated the datasets (models, prompts, sampling): the same for a
    dataset regenerated in place by the same job, whose shards need not be bit-identical. The models count by
    content (hashes, sizes), not by the path or hub name they were loaded by, which a regeneration may change."""
    def model_content(identity: dict[str, Any]) -> dict[str, Any]:
        # Weights too large to hash are known by their name too (as same_model knows them).
        fields = ("config_sha256", "weights_sha256", "weights_files") if identity.get("weights_sha256") else \
            ("config_sha256", "weights_files", "name_or_path", "revision")
        return {field: identity.get(field) for field in fields}

    def by_content(settings: Any) -> Any:
        if not isinstance(settings, dict):
            return settings
        return {key: model_content(value) if key in ("student", "teacher") and isinstance(value, dict) else value
                for key, value in settings.items()}

    return sha256_json([by_content(manifest.get("settings")) for manifest in manifests])


def use_bf16(cfg: DistillConfig) -> bool:
    """bf16 autocast over fp32 master weights: `auto` on a bf16 GPU only; `on` there or, on a machine
    without a GPU, on the CPU (torch's CPU autocast; fast only on CPUs with bf16 instructions)."""
    gpu_bf16 = gpu_has_bf16()
    if cfg.bf16 == "on":
        if torch.cuda.is_available() and not gpu_bf16:
            raise TsdkdError("--bf16 on: this GPU has no bf16 support; use --bf16 off")
        return True
    return cfg.bf16 == "auto" and gpu_bf16


def training_arguments(cfg: DistillConfig, out: Path) -> TrainingArguments:
    if cfg.tensorboard:
        # transformers reads the folder from the environment only; each run (round) gets its own.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=1,  # each dataset item is a whole, bucketed micro-batch
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        ddp_timeout=cfg.ddp_timeout,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=use_bf16(cfg),
        gradient_checkpointing=cfg.gradient_checkpointing,
        # Without it, accelerate sees no distributed run on a CPU-only machine under torchrun.
        use_cpu=not torch.cuda.is_available(),
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=["tensorboard"] if cfg.tensorboard else "none",
        remove_unused_columns=False,
        dataloader_num_workers=cfg.dataloader_workers,
        # New workers each epoch: SignalBatches.set_epoch reorders the batches in this process's copy,
        # which persistent workers would never see.
        dataloader_persistent_workers=False,
        disable_tqdm=False,
    )


def run_settings(cfg: DistillConfig) -> dict[str, Any]:
    """What continuing a run must repeat (the signal folders and student wherever they were named from)."""
    settings = {k: v for k, v in vars(cfg).items() if k not in ("resume", "out", *RESUMABLE_DISTILL_CHANGES)}
    return with_real_paths(settings, ("signals", "student"))


def check_output(cfg: DistillConfig, out: Path, student: dict[str, Any], record: dict[str, Any], nothing_saved: bool = False) -> bool:
    """Read-only: a new run (`record` {}) needs an empty folder; a folder holding a run (its run record) is
    continued, with the same settings and the same student (`student`: its model_identity), unless the run saved
    nothing to continue (`nothing_saved`: unfinished, no checkpoint), which a run of other settings replaces. Returns
    True when that run already finished and its saved student is as it was saved."""
    if out.exists() and not out.is_dir():
        raise TsdkdError(f"--out {out} is a file; choose a folder")
    if not record:
        if cfg.resume:
            raise TsdkdError(f"--resume: {out} holds no earlier run ({DISTILL_RUN_INFO} missing); drop --resume to start one")
        if out.exists() and any(out.iterdir()):
            raise TsdkdError(f"--out {out} is not empty and holds no tsdkd run; choose a new folder")
        return False
    earlier = record.get("settings", {})
    # Runs recorded their signal folders and student as given before they were resolved.
    earlier = with_real_paths(earlier, ("signals", "student"))
    settings = run_settings(cfg)
    # Where the record has them, the data and the student count by content (the data is checked once validated):
    # the same whatever their paths, as in a moved `tsdkd run` folder, whose rounds read and write inside it.
    by_content = {key for key, recorded in (("signals", "signals_sha256"), ("student", "student_identity")) if record.get(recorded)}
    changes = [f"{k}: {earlier.get(k)!r} in the run, {settings[k]!r} now"
               for k in sorted(settings) if k not in by_content and earlier.get(k) != settings[k]]
    if "student" in by_content:
        note_unchecked_weights(record["student_identity"], student, f"the run in {out}")
    if "student" in by_content and not same_model(record["student_identity"], student):
        changes.append(f"student: {cfg.student} is not the model the run started from ({earlier['student']}: weights or config differ)")
    checksums = readable_checksums(cfg.signals) if "signals" in by_content and record.get("complete") else None
    # (An unfinished run checks its data once validated. A finished one reads only the manifests, if there: its
    # student is done, and a shard regenerated in place by the same job need not be bit-identical.)
    if checksums and earlier["signals"] != settings["signals"] and checksums[0] != record["signals_sha256"]:
        changes.append(f"signals: {earlier['signals']} in the run, {settings['signals']} now, holding other data")
    elif checksums and record.get("signals_jobs_sha256") not in (None, checksums[1]):
        changes.append(f"signals: {settings['signals']} now hold data generated with other settings than the data the run "
                       "trained on")
    if changes and nothing_saved:
        print(f"note: --out {out} holds a run with other settings ({'; '.join(changes)}) that saved no checkpoint; "
              "starting this one in its place")
        return False
    if changes:
        raise TsdkdError(f"--out {out} holds a run with other settings ({'; '.join(changes)}); rerun with its settings to "
                         "continue it, or choose a new --out")
    if not record.get("complete"):
        return False
    lost = lost_student_files(out, record)
    if lost:
        print(f"{out}: the saved student's {', '.join(lost)} missing or changed since the run finished; training it again")
    return not lost


def lost_student_files(out: Path, record: dict[str, Any]) -> list[str]:
    """The files of a finished run's student that are gone or (weights) no longer the saved ones."""
    return [name for name, digest in record.get("student_files", {}).items()
            if not (out / name).is_file() or (digest is not None and sha256_file(out / name) != digest)]


def readable_checksums(folders: list[str]) -> tuple[str, str] | None:
    """`signals_checksum` and `signals_jobs_checksum` of the folders' manifests; None where one cannot be read, or
    (hand-edited) lacks what they read."""
    try:
        manifests = [read_manifest(Path(folder)) for folder in folders]
        return signals_checksum(manifests), signals_jobs_checksum(manifests)
    except (TsdkdError, KeyError, TypeError):
        return None


def check_same_signals(out: Path, record: dict[str, Any], checksum: str) -> None:
    """A continued run goes on with the data it started with (its `record`), not a dataset regenerated in place."""
    recorded = record.get("signals_sha256")
    if recorded is not None and recorded != checksum:  # None: a run started by an earlier tsdkd
        raise TsdkdError(f"--out {out}: the signal datasets' shards differ from those its run started with; "
                         "resume with the same data or start a new run in another --out")


def read_run_info(out: Path) -> dict[str, Any]:
    return read_json_object(out / DISTILL_RUN_INFO, "a tsdkd run record")


def create_output(cfg: DistillConfig, out: Path, manifests: list[dict[str, Any]], student: dict[str, Any]) -> None:
    """The run record in the folder `writable_folder` made: from now on --out holds this run."""
    write_json_atomic({"tsdkd_version": __version__, "settings": run_settings(cfg), "signals_sha256": signals_checksum(manifests),
                       "signals_jobs_sha256": signals_jobs_checksum(manifests), "student_identity": student,
                       "complete": False}, out / DISTILL_RUN_INFO)


def last_complete_checkpoint(folder: Path) -> tuple[str | None, list[tuple[Path, Path]]]:
    """The newest checkpoint whose trainer_state.json (the Trainer's last write) is whole and whose weight, optimizer
    and state files are not cut short (damaged_file), and the newer ones passed over, each with its damaged file.

    A kill during a save leaves a newer, partial checkpoint that the Trainer's own lookup would pick, and that a
    later save of the same step would write into over the old files.
    """
    if not folder.is_dir():
        return None, []
    numbered = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    damaged = []
    for checkpoint in sorted(numbered, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        state = checkpoint / "trainer_state.json"
        try:
            json.loads(state.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            damaged.append((checkpoint, state))
            continue
        file = damaged_file(checkpoint)
        if file is None:
            return str(checkpoint), damaged
        damaged.append((checkpoint, file))
    return None, damaged


def set_aside_damaged(damaged: list[tuple[Path, Path]]) -> None:
    """Each (checkpoint, its damaged file) renamed out of the Trainer's sight (`damaged-checkpoint-N`), kept for a
    look: it would save into the folder again, and its rotation could keep it over whole ones."""
    for checkpoint, file in damaged:
        problem = "is cut short or corrupt" if file.exists() else "is missing: a save was cut short"
        print(f"note: {checkpoint.name} is damaged ({file.relative_to(checkpoint)} {problem}); "
              f"set aside as damaged-{checkpoint.name}")
        target = checkpoint.with_name(f"damaged-{checkpoint.name}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(checkpoint, target)


TORCH_ZIP, PICKLE = b"PK\x03\x04", b"\x80"  # torch.save's zip format, and its older one (a pickle stream)


def damaged_file(checkpoint: Path) -> Path | None:
    """A file of the checkpoint that cannot be whole: a torch file (zip format) without its closing directory, or
    one that is neither format; safetensors with a header that does not parse or a size other than it says (a copy
    cut short, a full disk). Checked before the Trainer loads them: it would fail with a traceback, on every rerun.
    Not checked: damage inside a file of the right size, FSDP's sharded files."""
    for path in sorted(p for p in checkpoint.rglob("*") if not p.is_dir()):
        if path.suffix in (".pt", ".pth", ".bin"):
            try:
                with open(path, "rb") as handle:
                    start = handle.read(4)
            except OSError:
                return path
            if not (start.startswith(PICKLE) or (start == TORCH_ZIP and zipfile.is_zipfile(path))):
                return path
        if path.suffix == ".safetensors" and not _safetensors_whole(path):
            return path
    return None


def _safetensors_whole(path: Path) -> bool:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if header_size > size - 8:
                return False
            header = json.loads(handle.read(header_size))
        if not isinstance(header, dict):
            return False
        data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        return size == 8 + header_size + data_end  # safetensors refuses a file with bytes after its data
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return False


def load_student(cfg: DistillConfig) -> torch.nn.Module:
    """fp32 master weights from safetensors; heads the chunked loss does not reproduce are refused."""
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32,
                                                     trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as error:
        raise TsdkdError(f"--student {cfg.student}: cannot load it ({str(error).strip().splitlines()[0]})") from None
    head = model.get_output_embeddings()
    transforms = [name for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
                  if getattr(model.config, name, None) not in (None, 1, 1.0)]
    if getattr(head, "bias", None) is not None:
        transforms.append("a bias in the output head")
    if cfg.gradient_checkpointing and not model.supports_gradient_checkpointing:
        raise TsdkdError(f"--gradient-checkpointing: {type(model).__name__} does not support it; drop the option")
    if transforms:
        raise TsdkdError(f"--student {cfg.student}: its logits use {', '.join(transforms)}, which stage 2's chunked head "
                         "does not apply yet; use a Llama/Qwen/Mistral-style student")
    return model


def saved_student_dtype(cfg: DistillConfig) -> torch.dtype:
    """--save-dtype; "auto": the dtype the student was stored in (its config's), float32 where it names no float type.
    Training keeps float32 master weights either way: a bf16 student saved as float32 would take twice its disk."""
    if cfg.save_dtype != "auto":
        return getattr(torch, cfg.save_dtype)
    stored = AutoConfig.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code).dtype
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def student_identity(cfg: DistillConfig) -> dict[str, Any]:
    """--student's model_identity, by real path: a student too large to hash is known by it, whatever the rerun's
    working directory."""
    return {**model_identity(cfg.student, cfg.trust_remote_code), "name_or_path": local_path(cfg.student)}


def finished_run(cfg: DistillConfig) -> bool:
    """Whether --out holds this run finished, its student as saved (then handled as `tsdkd distill` would): a round's
    rerun need not start its distillation processes. Settings changed since are refused as there."""
    out = Path(cfg.out)
    record = read_run_info(out) if (out / DISTILL_RUN_INFO).is_file() else {}
    if not record.get("complete"):
        return False  # the processes continue it
    if not check_output(cfg, out, student_identity(cfg), record):
        return False
    finish_trained_run(cfg)
    return True


def finish_trained_run(cfg: DistillConfig) -> None:
    """A finished run's rerun: removes the checkpoints a kill left between marking it finished and removing them,
    and says it is trained."""
    out = Path(cfg.out)
    if not cfg.keep_checkpoints:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    print(f"{out}: already trained; nothing to do")
    note_saved_dtype(cfg, out)


def note_saved_dtype(cfg: DistillConfig, out: Path) -> None:
    """A finished run's student stays as it was saved: a --save-dtype given since is said to have no effect."""
    saved = read_json_object(out / "config.json", "the student's config").get("dtype")
    wanted = dtype_name(saved_student_dtype(cfg))
    if saved is not None and saved != wanted:
        print(f"note: the student was saved in {saved}, not {wanted} (--save-dtype {cfg.save_dtype}): the setting applies "
              "when a run saves its student; distil into a new --out to have it")


def drop_metrics_after(path: Path, checkpoint: str | None) -> None:
    """Steps after the checkpoint a run resumes from are redone: forget their records, and the end-of-training
    summary of a run killed while saving (the resumed run writes its own)."""
    if not path.is_file():
        return
    last_step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"] if checkpoint else 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if record["step"] <= last_step and "train_runtime" not in record:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line torn by the kill

    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)


def start_processes(cfg: DistillConfig, out: Path) -> tuple[PartialState, TrainingArguments]:
    """The process state, then the training arguments (which refuse some settings, e.g. --bf16 on a GPU
    without it, and write nothing). Under torchrun the state starts the process group, with --ddp-timeout:
    torch's default is 10 minutes for NCCL, and the arguments pass theirs on GPUs only."""
    processes = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=cfg.ddp_timeout))
    return processes, training_arguments(cfg, out)


def distill(cfg: DistillConfig) -> Path:
    """Run stage 2 as configured; returns the folder of the trained student."""
    with contextlib.ExitStack() as held:
        return _distill(cfg, held)


def _distill(cfg: DistillConfig, held: contextlib.ExitStack) -> Path:
    cfg.check()
    cfg = pinned(cfg)
    out = Path(cfg.out)
    tokenizer = load_tokenizer(cfg.student, cfg.trust_remote_code, "student")
    # Under torchrun every process runs this: one checks and prepares while the others wait.
    processes, args = start_processes(cfg, out)
    check_one_gpu_per_process(args)
    if cfg.rank_items > len(tokenizer):
        raise TsdkdError(f"--rank-items {cfg.rank_items} exceeds the student's vocabulary ({len(tokenizer)} tokens)")
    # A rerun of the same command continues the run in --out. Every process looks before the main one
    # writes the run record (after the next barrier), so all agree.
    continuing = (out / DISTILL_RUN_INFO).is_file()
    student = student_identity(cfg) if processes.is_main_process else {}
    record = read_run_info(out) if continuing and processes.is_main_process else {}
    # A run that stopped before its first checkpoint (a bad learning rate, say) leaves nothing that binds the rerun;
    # unless it is running still (then refused below as in use).
    nothing_saved = bool(record) and not record.get("complete") and not any((out / CHECKPOINTS).glob("checkpoint-*")) \
        and not in_use(out)
    finished = processes.is_main_process and check_output(cfg, out, student, record, nothing_saved)
    start = processes.is_main_process and not finished
    if start:
        manifests = check_signals(cfg, tokenizer_fingerprint(tokenizer))
        note_data_origin(cfg, manifests, student)
        if continuing and not nothing_saved:
            check_same_signals(out, record, signals_checksum(manifests))
        elif not continuing:
            writable_folder(out)  # an empty folder is a new run's too
        held.enter_context(exclusive_use(out, "distill"))
        if record.get("complete"):  # finished, but check_output found its student damaged
            write_json_atomic({**record, "complete": False}, out / DISTILL_RUN_INFO)
    processes.wait_for_everyone()
    held.enter_context(full_device_is_one_line(out))  # every process writes into checkpoints (its rng state)
    # The main process knows; the others read what it found.
    done = finished if processes.is_main_process else (out / DISTILL_RUN_INFO).is_file() and read_run_info(out).get("complete")
    if done:
        if processes.is_main_process:
            finish_trained_run(cfg)
        return out
    if not start:  # the other processes (the main one has validated them)
        manifests = [read_manifest(Path(folder)) for folder in cfg.signals]
    context = context_length(cfg.student, cfg.trust_remote_code)
    max_length = cfg.max_length or context
    objective = Objective.from_config(cfg, manifests[0]["teacher_entropy"])
    pad = padding_id(tokenizer)
    batches = SignalBatches(
        [Path(s) for s in cfg.signals], batch_size=cfg.batch_size, pad_token_id=pad, max_length=max_length,
        group_by_prompt=objective.sequence_ranking, only_best=objective.sft, seed=cfg.seed,
    )
    if processes.is_main_process:
        note_length_limits(cfg, batches, context)
    if processes.is_main_process and objective.sequence_ranking:  # the batches' units are prompts
        if batches.largest_unit == 1:
            print("note: the signals hold one candidate per prompt, so the sequence-level ranking has nothing to rank "
                  "(its term is 0); sample several with `tsdkd generate --num-candidates`, or leave it out with "
                  "--indirect token")
        elif batches.largest_unit > cfg.batch_size:
            print(f"note: the sequence-level ranking keeps each prompt's candidates in one micro-batch: 1 prompt (up to "
                  f"{batches.largest_unit} sequences) per micro-batch for --batch-size {cfg.batch_size}; for less "
                  "memory, --indirect token or fewer candidates")
    model = load_student(cfg)
    save_dtype = saved_student_dtype(cfg)
    # Written only now: a start that fails on the student or the data leaves --out empty.
    if start and (not continuing or nothing_saved):
        create_output(cfg, out, manifests, student)
    processes.wait_for_everyone()
    interruption = CheckpointOnInterrupt() if CheckpointOnInterrupt.usable(processes.num_processes, cfg.dataloader_workers) else None
    trainer = DistillTrainer(
        model=model, args=args, train_dataset=batches, data_collator=collate_single,
        callbacks=[MetricsFile(out / METRICS), *([interruption] if interruption else [])], objective=objective,
        vocab_size=len(tokenizer), logit_chunk_tokens=cfg.logit_chunk_tokens, rank_items=cfg.rank_items,
    )
    resume_from, damaged = last_complete_checkpoint(out / CHECKPOINTS) if continuing else (None, [])
    # Every process has looked before the main one moves a folder.
    processes.wait_for_everyone()
    if processes.is_main_process and continuing:
        set_aside_damaged(damaged)
        drop_metrics_after(out / METRICS, resume_from)
        print(f"{out}: continuing from {Path(resume_from).name}" if resume_from else f"{out}: no checkpoint yet; starting over")
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except TrainingComplete:  # stopped while saving the student: save it from the last step's checkpoint
        if processes.is_main_process:
            print(f"{out}: {Path(resume_from).name} is the last step's; saving the student from it")
    finally:
        if interruption:
            interruption.restore()
    if interruption and interruption.received is not None:
        print(f"{out}: stopped after step {trainer.state.global_step}, saved as checkpoint-{trainer.state.global_step}")
        interruption.interrupt()
    save_student(trainer, tokenizer, cfg, manifests, objective, save_dtype)
    # The other processes end only once the main one has put the student in place: a launcher that saw one of
    # them end (or abort in its teardown) before would stop the main one mid-save.
    trainer.accelerator.wait_for_everyone()
    return out


def note_length_limits(cfg: DistillConfig, batches: SignalBatches, context: int | None) -> None:
    """What the length limit (--max-length, else the student's `context`) leaves out of training, said before the
    first step."""
    if cfg.max_length and context and cfg.max_length > context:
        print(f"note: --max-length {cfg.max_length} exceeds the student's context ({context} positions, its config's "
              "max_position_embeddings): positions beyond it are ones the student was not trained at")
    limit = f"--max-length {cfg.max_length}" if cfg.max_length else f"the student's context ({context} tokens; --max-length unset)"
    if batches.num_dropped:
        print(f"note: {batches.num_dropped} candidates whose prompt alone reaches {limit} are left out")
    if batches.num_cut:
        print(f"note: {batches.num_cut} of {batches.num_sequences} candidates are cut at {limit} (prompt and completion): "
              "their last tokens, the end of the sequence among them, are not trained on")


def student_generation_config(loaded: GenerationConfig, tokenizer: Any) -> GenerationConfig:
    """The student's own generation config (its sampling defaults, every stop id), stopping at the tokenizer's EOS
    too: the EOS the candidates were sampled to end with."""
    generation = copy.deepcopy(loaded)
    stop_ids = end_token_ids(generation.eos_token_id, tokenizer.eos_token_id)
    generation.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids or None
    if generation.pad_token_id is None:
        generation.pad_token_id = padding_id(tokenizer)
    return generation


def save_student(trainer: DistillTrainer, tokenizer: Any, cfg: DistillConfig, manifests: list[dict[str, Any]],
                 objective: Objective, dtype: torch.dtype) -> None:
    """safetensors in `dtype`, config, tokenizer, a generation config that stops at the tokenizer's EOS, a model card."""
    out = Path(cfg.out)
    staging = out / ".model-tmp"
    # Training turns the KV cache off in the config; the saved student generates with it.
    trainer.model.config.use_cache = True
    if trainer.is_fsdp_enabled:
        # The Trainer saves whole tensors under FSDP only with this type, whatever the checkpoints used.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.student_dtype = dtype
    # Every process takes part (FSDP and DeepSpeed gather the weights); the Trainer writes on one.
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    # save_pretrained names the dtype of the model in memory (float32) in the config.
    config = json.loads((staging / "config.json").read_text())
    write_json_atomic({**config, "dtype": dtype_name(dtype)}, staging / "config.json")
    for session_key in ("is_local", "local_files_only"):  # how this session loaded it, not the student's
        tokenizer.init_kwargs.pop(session_key, None)
    tokenizer.save_pretrained(staging)
    # The Trainer also pickles its arguments; the student folder holds no pickle files.
    (staging / "training_args.bin").unlink(missing_ok=True)
    generation = student_generation_config(trainer.accelerator.unwrap_model(trainer.model).generation_config, tokenizer)
    generation.save_pretrained(staging)
    write_model_card(staging, cfg, manifests, trainer.state.global_step)
    saved = {}
    for item in staging.iterdir():
        default_permissions(item)  # safetensors writes the weights readable by their owner only
        # The weights by hash, the small files by name: a rerun checks them before it calls the run done. The card
        # and license files are not the student: one edited or deleted since is no reason to train it again.
        if item.name != "README.md" and not is_license_file(item.name):
            saved[item.name] = sha256_file(item) if item.suffix == ".safetensors" else None
        os.replace(item, out / item.name)
    staging.rmdir()
    info = read_run_info(out)
    info.update({
        "complete": True,
        "student_files": saved,
        "signals": [{"round": m["round"], "teacher": m["teacher"]["name_or_path"], "teacher_entropy": m["teacher_entropy"]} for m in manifests],
        "token_weight_entropy": objective.weight_entropy,
        "global_step": trainer.state.global_step,
    })
    write_json_atomic(info, out / DISTILL_RUN_INFO)
    if not cfg.keep_checkpoints:
        # A finished student needs no optimizer state: for a 1.5B model that is ~18 GB a checkpoint.
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    steps = trainer.state.global_step
    print(f"{out}: student saved after {steps} step{'s' if steps != 1 else ''}")


def write_model_card(folder: Path, cfg: DistillConfig, manifests: list[dict[str, Any]], steps: int) -> None:
    """A Hub model card (README.md) saying how the student was distilled and from which teacher's signals, with the
    student's base model (a hub id itself, or the id of a hub cache snapshot folder), license and language carried
    over from its own card, and its license files (a hub id's from the hub cache, where a download put them:
    `from_pretrained` fetches neither). Nothing in the student's folder stops the save: what cannot be read is left
    out, with a note."""
    from huggingface_hub import ModelCard, ModelCardData

    student, from_hub = Path(cfg.student), is_hub_id(cfg.student)
    snapshot = hub_snapshot(cfg.student)
    if from_hub:  # its card and license files where the hub cache has them
        config = hub_file(cfg.student, "config.json")
        student = config.parent if config else student
    earlier = ModelCardData()
    if student.is_dir():
        for item in sorted(student.iterdir()):
            if item.is_file() and is_license_file(item.name):
                try:
                    shutil.copyfile(item, folder / item.name)
                except OSError as error:
                    print(f"note: {item}: cannot copy it to the student ({error.strerror}); copy it by hand")
        if (student / "README.md").is_file():
            try:
                earlier = ModelCard.load(student / "README.md").data
            except Exception as error:  # yaml, OSError, ValueError: any card that does not read carries nothing
                print(f"note: {student / 'README.md'}: cannot read its card ({type(error).__name__}); the student's card "
                      "names no base model or license")
    data = ModelCardData(base_model=cfg.student if from_hub else snapshot[0] if snapshot else earlier.base_model,
                         license=earlier.license, license_name=earlier.license_name, license_link=earlier.license_link,
                         language=earlier.language, library_name="transformers", pipeline_tag="text-generation",
                         tags=["tsdkd", "knowledge-distillation"])
    rows = "\n".join(f"| {_shown(folder_name)} | {manifest['round']} | {_shown(manifest['teacher']['name_or_path'])} | "
                     f"{manifest['stats']['candidates']} |" for folder_name, manifest in zip(cfg.signals, manifests))
    body = f"""# A student distilled with tsdkd

`tsdkd distill` (loss `{cfg.loss}`) trained {_shown(cfg.student)} for {steps} optimizer step{'s' if steps != 1 else ''} on the teacher signals of

| signals | round | teacher | candidates |
|---|---|---|---|
{rows}

The run's settings are in `{DISTILL_RUN_INFO}`, its losses per step in `{METRICS}`.
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(folder / "README.md")


def _shown(name_or_path: str) -> str:
    """A hub id as it is, a hub cache snapshot folder as its id and revision, other paths by their last part (a card is
    for sharing; the rest names one machine's folders), with the round's folder for a `tsdkd run` round's `student` or
    `signals`, as Markdown code."""
    parts, snapshot = Path(name_or_path).resolve().parts, hub_snapshot(name_or_path)
    if snapshot:
        return f"{_code(snapshot[0])} at revision {_code(snapshot[1][:12])}"
    return _code(name_or_path if is_hub_id(name_or_path) else
                 "/".join(parts[-2:] if parts[-1] in ("student", "signals") and len(parts) > 2 else parts[-1:]))


def _code(name: str) -> str:
    return "`" + " ".join(name.replace("`", "'").replace("|", "/").split()) + "`"
