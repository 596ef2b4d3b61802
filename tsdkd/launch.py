"""Several processes of one tsdkd command on this machine, as `torchrun --standalone` starts them (one per GPU),
for `tsdkd run`'s distillations.

Not torchrun itself: its agent ends a failed run with a many-line failure report over the one line the failing
process printed, and its workers outlive it when it is killed. Here each worker gets torchrun's variables
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), a session of its own (a Ctrl-C
reaches this process only, which stops the workers) and, on Linux, SIGTERM when this process dies, even by SIGKILL.
Process 0 writes to this terminal; the others, which would repeat its lines, to a log file each.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from tsdkd.errors import ReportedFailure

PR_SET_PDEATHSIG = 1
# What a started process puts before its error line (the CLI reads it), e.g. "round 2, distill: ".
ERROR_CONTEXT = "TSDKD_ERROR_CONTEXT"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _parent_death_signal() -> Callable[[], None] | None:
    """A function for subprocess's preexec_fn that asks the kernel to SIGTERM the child when this process dies;
    None where there is no prctl (not Linux: a killed run then leaves its workers to finish). prctl is looked up
    here, before the fork: the child, a copy of a process with many threads, only calls it."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(workers: list[subprocess.Popen]) -> None:
    """SIGTERM to the workers still running (under a launcher they end at once, saying nothing), then wait."""
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    deadline = time.monotonic() + 60
    for worker in workers:
        try:
            worker.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def run_processes(args: list[str], processes: int, logs: Path, context: str = "") -> None:
    """`python -m tsdkd *args` in `processes` processes, the output of process r > 0 appended to logs/rank-r.log,
    `context` before their error lines; returns when process 0 succeeds. An interrupt of this process stops them
    all, then goes on."""
    import torch

    from tsdkd.validate import usable_cores

    cores = usable_cores()
    if not torch.cuda.is_available() and processes > cores:
        print(f"note: {processes} processes share {cores} CPU core{'s' if cores > 1 else ''} on this machine without "
              "GPUs: each gets a fraction of one")
    port = free_port()
    end_with_parent = _parent_death_signal()
    log_files = {rank: logs / f"rank-{rank}.log" for rank in range(1, processes)}
    sys.stdout.flush()  # this process's lines before process 0's, in a log too
    sys.stderr.flush()
    workers = []
    try:
        for rank in range(processes):
            # OMP_NUM_THREADS: 1 unless set, as torchrun does, so that the processes do not fight over the cores.
            env = {"OMP_NUM_THREADS": "1", **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), "RANK": str(rank), "LOCAL_RANK": str(rank),
                   ERROR_CONTEXT: context}
            with contextlib.ExitStack() as output:
                log = None
                if rank:
                    log = output.enter_context(open(log_files[rank], "a"))
                    log.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')}: tsdkd {' '.join(args)} (process {rank} of {processes})\n")
                    log.flush()
                    env["PYTHONUNBUFFERED"] = "1"  # its last lines reach the log even when it is stopped
                workers.append(subprocess.Popen([sys.executable, "-m", "tsdkd", *args], env=env, stdout=log, stderr=log,
                                                start_new_session=True, preexec_fn=end_with_parent))
        while all(worker.poll() in (None, 0) for worker in workers) and workers[0].returncode is None:
            time.sleep(0.2)
        # Process 0 done: the others end too. A failure: the others often fail in turn (a peer gone from a
        # collective), a moment tells who failed by itself.
        deadline = time.monotonic() + (30 if workers[0].returncode == 0 else 3)
        while any(worker.poll() is None for worker in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        codes = [worker.poll() for worker in workers]
    finally:
        _stop(workers)
    _judge(codes, log_files)


def _judge(codes: list[int | None], log_files: dict[int, Path]) -> None:
    """Process 0 saves the student and prints the command's own errors: its success is the run's (the others'
    failures are notes, e.g. a gloo teardown abort); its bad-input error (exit 2) is the cause. Otherwise the
    processes that failed by themselves (None: still running, stopped here) are named, with process 0's exit code
    or 1."""
    def how(rank: int, code: int | None) -> str:
        if code is None:
            ended = "had not ended, and was stopped"
        else:
            ended = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"failed (exit code {code})"
        return f"process {rank} of {len(codes)} {ended}" + (f" (its output is in {log_files[rank]})" if rank else "")

    if codes[0] == 0:
        others = [how(rank, code) for rank, code in enumerate(codes) if rank and code != 0]
        if others:
            print(f"note: the distillation finished in process 0; {'; '.join(others)}")
        return
    others = [how(rank, code) for rank, code in enumerate(codes) if rank and code not in (None, 0)]
    exit_code = codes[0] if codes[0] is not None and codes[0] > 0 else 1
    if codes[0] is not None and codes[0] > 0 and (codes[0] == 2 or not others):
        raise ReportedFailure(exit_code)  # it printed why
    # The others first: process 0 failing after another was killed is mostly its peer gone from a collective.
    failed = others + ([how(0, codes[0])] if codes[0] is not None else [])
    raise ReportedFailure(exit_code, f"{'; '.join(failed)}; rerun the same command to continue")
