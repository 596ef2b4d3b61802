"""`tsdkd run`: self-improvement rounds. Round r samples with the round r-1 student and distils
into round r; each round is a folder with its signals and its student, under a run manifest.

    OUT/tsdkd_run.json      settings and the state of each round
    OUT/round-1/signals     signals sampled by the initial student
    OUT/round-1/student     the student distilled from them
    OUT/round-1/distill.json the round's distill settings (what its processes read with --distill-processes N),
    OUT/round-1/rank-*.log  and with N > 1 the output of processes 1..N-1
    OUT/round-2/...

Rerunning the same command continues where a crash stopped it: finished rounds are kept, a
partial signal dataset resumes shard by shard, a partial distillation from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from tsdkd.config import (DISTILL_RUN_INFO, RESUMABLE_DISTILL_CHANGES, RESUMABLE_GENERATE_CHANGES, RUN_SECTIONS, DistillConfig,
                          GenerateConfig, RunConfig, build_config)
from tsdkd.errors import ReportedFailure, TsdkdError
from tsdkd.fingerprint import with_real_paths
from tsdkd.launch import run_processes
from tsdkd.loading import pinned, release_memory
from tsdkd.locks import exclusive_use
from tsdkd.signals import read_json_object, write_json_atomic

RUN_MANIFEST = "tsdkd_run.json"
ROUND_DISTILL_SETTINGS = "distill.json"
# Run settings that count as distill settings: free to change until a round's distillation starts.
RUN_DISTILL_SETTINGS = ("distill_processes",)


def round_folder(out: Path, round_index: int) -> Path:
    return out / f"round-{round_index}"


def student_of_round(cfg: RunConfig, round_index: int) -> str:
    """Round 0's student is the one given; round r's is distilled in round r."""
    return cfg.student if round_index == 0 else str(round_folder(Path(cfg.out), round_index) / "student")


def read_run_manifest(path: Path) -> dict[str, Any]:
    manifest = read_json_object(path, "a tsdkd run manifest")
    if not (isinstance(manifest.get("settings"), dict) and isinstance(manifest.get("rounds"), dict)):
        raise TsdkdError(f"{path}: not a tsdkd run manifest (settings and rounds); start a new run in another folder")
    return manifest


def student_run_started(out: Path, round_index: int) -> bool:
    """Whether the round's distillation has started (its student folder holds a run record)."""
    return (round_folder(out, round_index) / "student" / DISTILL_RUN_INFO).is_file()


def distillation_started(out: Path, manifest: dict[str, Any]) -> bool:
    return any(student_run_started(out, int(index)) for index in manifest["rounds"])


def effective_section(section: str, values: dict[str, Any], where: str) -> dict[str, Any]:
    """A generate/distill section as its command reads it: typed (YAML's `1e-4` is 0.0001, `30` is 30.0)
    and with the defaults filled in, so that only a real change of setting differs."""
    return vars(build_config(RUN_SECTIONS[section], None, values, where))


def setting_changes(recorded: dict[str, Any], wanted: dict[str, Any], path: Path) -> list[tuple[str, str]]:
    """(section or "", `key: recorded in the run, wanted now`) for each setting a rerun changes."""
    changes = []
    for key in sorted(set(recorded) | set(wanted)):
        if key in RUN_SECTIONS and isinstance(recorded.get(key), dict):
            old = effective_section(key, recorded[key], f"{path}, {key} settings")
            new = effective_section(key, wanted[key], f"{key} settings")
            # Memory and speed settings, free to change.
            free = {"distill": RESUMABLE_DISTILL_CHANGES, "generate": RESUMABLE_GENERATE_CHANGES}[key]
            changes += [(key, f"{key}.{name}: {old[name]!r} in the run, {new[name]!r} now")
                        for name in old if old[name] != new[name] and name not in free]
        elif recorded.get(key) != wanted.get(key):
            section = "distill" if key in RUN_DISTILL_SETTINGS else ""
            changes.append((section, f"{key}: {recorded.get(key)!r} in the run, {wanted.get(key)!r} now"))
    return changes


def resolved_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """The prompt file and models as absolute paths where they are local: the same run however they are named."""
    return with_real_paths(settings, ("prompts", "student", "teacher"))


def start_manifest(cfg: RunConfig, out: Path) -> dict[str, Any]:
    # What a rerun must repeat: not the number of rounds (it may grow).
    # (setting_changes leaves out the memory and speed settings, which may change.)
    settings = resolved_paths({k: v for k, v in vars(cfg).items() if k not in ("out", "rounds")})
    path = out / RUN_MANIFEST
    if path.is_file():
        manifest = read_run_manifest(path)
        wanted = json.loads(json.dumps(settings))
        # Runs recorded the paths as given before they were resolved, and distilled in one process before
        # --distill-processes.
        changes = setting_changes(resolved_paths({"distill_processes": 1, **manifest["settings"]}), wanted, path)
        if changes and not any(item.is_file() for item in out.glob("round-*/**/*")):
            # The last start stopped before making anything (say on an option its generate refused): nothing to keep.
            print(f"{out}: no round has made anything yet; the new settings replace the recorded ones")
            manifest["settings"] = wanted
            write_json_atomic(manifest, path)
        elif changes and {section for section, _ in changes} == {"distill"} and not distillation_started(out, manifest):
            # Round 1's signals were made but its distillation never started (say it stopped on a setting):
            # the distill settings are still free, and the hours of sampling are kept.
            print(f"{out}: no round has started distilling; the new distill settings replace the recorded ones")
            manifest["settings"] = wanted
            write_json_atomic(manifest, path)
        elif changes:
            raise TsdkdError(f"--out {out} holds a run with other settings ({'; '.join(change for _, change in changes)}); "
                             "rerun with the run's settings to resume it, or choose a new --out")
        return manifest
    if any(out.iterdir()):
        raise TsdkdError(f"--out {out} is not empty and holds no {RUN_MANIFEST}; choose a new folder")
    manifest = {"settings": settings, "rounds": {}}
    write_json_atomic(manifest, path)
    return manifest


def round_configs(cfg: RunConfig, round_index: int) -> tuple[GenerateConfig, DistillConfig]:
    """The `tsdkd generate` and `tsdkd distill` settings of one round."""
    folder = round_folder(Path(cfg.out), round_index)
    student = student_of_round(cfg, round_index - 1)
    generate_cfg = build_config(GenerateConfig, None, {
        **cfg.generate, "prompts": cfg.prompts, "student": student, "teacher": cfg.teacher, "out": str(folder / "signals"),
        "round": round_index, "seed": cfg.seed + round_index,
    })
    distill_cfg = build_config(DistillConfig, None, {
        **cfg.distill, "signals": [str(folder / "signals")], "student": student, "out": str(folder / "student"),
        "seed": cfg.seed + round_index,
    })
    return generate_cfg, distill_cfg


@contextlib.contextmanager
def in_round(round_index: int, command: str) -> Iterator[str]:
    """A round's refusal says which round and command it comes from (its --out is a folder the run chose); the
    context yielded is that prefix, for the processes the round starts to put before their own error lines."""
    context = f"round {round_index}, {command}: "
    try:
        yield context
    except TsdkdError as error:
        raise TsdkdError(f"{context}{error}") from None
    except ReportedFailure as failure:
        raise ReportedFailure(failure.exit_code, failure.line and f"{context}{failure.line}") from None


def check_processes(distill_processes: int) -> None:
    """Before round 1's sampling: `tsdkd run` is one process (under a launcher every process would sample the same
    round) that starts each round's distillation processes itself, one per GPU. Several GPUs for one process
    would be refused by the round's distillation only after the sampling (the Trainer would spread the process
    over them with nn.DataParallel)."""
    import torch

    if "LOCAL_RANK" in os.environ:
        raise TsdkdError("`tsdkd run` is not started by torchrun or accelerate launch: run it as one process, with "
                         "--distill-processes N to distil each round on N GPUs")
    gpus = torch.cuda.device_count()
    if gpus > 1 and distill_processes == 1:
        raise TsdkdError(f"{gpus} GPUs are visible: give --distill-processes {gpus} to distil on all of them (one "
                         "process per GPU), or pick one with CUDA_VISIBLE_DEVICES=0")
    if 0 < gpus < distill_processes:
        raise TsdkdError(f"--distill-processes {distill_processes}: only {gpus} GPU{'s are' if gpus > 1 else ' is'} "
                         "visible (one process per GPU)")


def distill_round(cfg: DistillConfig, processes: int, context: str) -> None:
    """In this process, or in `processes` started as torchrun would, which read the round's settings from
    round-r/distill.json (kept up to date there, as a record and the file to rerun the round's distillation
    by hand with) and put `context` before their error lines."""
    from stage2_distill.distill import distill, finished_run

    folder = Path(cfg.out).parent
    # Real paths: the file is valid from any working directory.
    settings = {**with_real_paths(vars(cfg), ("signals", "student")), "out": str(Path(cfg.out).resolve())}
    record = folder / ROUND_DISTILL_SETTINGS
    try:
        unchanged = json.loads(record.read_text()) == json.loads(json.dumps(settings))
    except (OSError, ValueError):
        unchanged = False
    if not unchanged:  # a rerun of a finished run leaves every file as it was
        write_json_atomic(settings, record)
    if processes == 1:
        distill(cfg)
        return
    if finished_run(cfg):  # a finished round's rerun starts no processes
        return
    # What sampling left in this process's CUDA cache would stay out of reach of process 0 on the same GPU.
    release_memory()
    run_processes(["distill", "--config", str(record)], processes, folder, context)


def run_rounds(cfg: RunConfig) -> Path:
    """Rounds 1..R (R may grow between reruns); returns the last round's student folder."""
    from stage1_generate.generate import generate

    cfg.check()
    check_processes(cfg.distill_processes)
    # Both sections' values are checked before a round's generate spends hours and the run records them.
    for name, section in zip(("generate", "distill"), round_configs(cfg, cfg.rounds)):
        try:
            section.check()
        except TsdkdError as error:
            raise TsdkdError(f"{name} settings of the run: {error}") from None
    # The hub models at their revisions, resolved before anything is written; the run records them as given.
    pinned_cfg = pinned(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TsdkdError(f"--out {out} is a file; choose a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TsdkdError(f"--out {out}: cannot create it ({error.strerror})") from None
    # Locked before the manifest is read or written: a second job must not touch the first one's.
    with exclusive_use(out, "run"):
        manifest = start_manifest(cfg, out)
        for round_index in range(1, cfg.rounds + 1):
            state = manifest["rounds"].setdefault(str(round_index), {"signals": False, "student": False})
            print(f"round {round_index} of {cfg.rounds}")
            # A finished round is handed to its commands too: each checks its output and redoes what was lost since.
            generate_cfg, distill_cfg = round_configs(pinned_cfg, round_index)
            with in_round(round_index, "generate"):
                generate(generate_cfg)
            state["signals"] = True
            write_json_atomic(manifest, out / RUN_MANIFEST)
            with in_round(round_index, "distill") as context:
                distill_round(distill_cfg, cfg.distill_processes, context)
            state["student"] = True
            write_json_atomic(manifest, out / RUN_MANIFEST)
        later = sorted(int(r) for r in manifest["rounds"] if int(r) > cfg.rounds)
        if later:
            print(f"note: {out} also holds round{'s' if len(later) > 1 else ''} {', '.join(map(str, later))} of an earlier, "
                  f"longer run, kept and not used: the final student is round {cfg.rounds}'s")
    final = Path(student_of_round(cfg, cfg.rounds))
    print(f"{out}: {cfg.rounds} round{'s' if cfg.rounds != 1 else ''} done; final student in {final}")
    return final
