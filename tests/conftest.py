"""Shared fixtures: the committed toy models and one small dataset made once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from tsdkd.cli import app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOY_STUDENT = ROOT / "data" / "toy-student"
TOY_TEACHER = ROOT / "data" / "toy-teacher"
TOY_PROMPTS = ROOT / "data" / "toy" / "prompts.jsonl"

# Small enough for CI, large enough for three shards of several prompts each.
SMALL_JOB = [
    "--prompts", str(TOY_PROMPTS), "--student", str(TOY_STUDENT), "--teacher", str(TOY_TEACHER),
    "--limit", "12", "--prompts-per-shard", "4", "--num-candidates", "3", "--max-new-tokens", "24",
    "--top-k", "8", "--batch-size", "4", "--backend", "hf",
]


def run_cli(*args: str):
    """The CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit code 2, a single `error:` line on stderr naming the fragments, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def assert_ends_in_one_error_line(result, *fragments: str) -> None:
    """Like assert_one_line_error for a failure midway, after progress output: the last line is the only error."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and sum("error:" in line for line in lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def flip_byte(path: Path, index: int | None = None) -> None:
    """Damage a file in place by inverting one byte (its middle one by default): it may still parse, with wrong numbers."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if index is None else index] ^= 0xFF
    path.write_bytes(bytes(data))


def tsdkd_process(args: list) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run `tsdkd *args` as a separate process."""
    return [sys.executable, "-m", "tsdkd", *map(str, args)], {**os.environ, "PYTHONPATH": str(ROOT)}


def rerun_tsdkd(args: list) -> subprocess.CompletedProcess:
    command, env = tsdkd_process(args)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def signal_when(args: list, until: Callable[[], bool], stderr_path: Path, sent: int = signal.SIGTERM,
                group: bool = False) -> tuple[int, str]:
    """Run `python -m tsdkd *args` until `until()` holds (at most 300 s), then send it `sent`, to its whole process
    group when `group` (as `timeout` and cluster schedulers do): its exit code and stderr."""
    command, env = tsdkd_process(args)
    with open(stderr_path, "w") as stderr:  # a pipe could fill up with progress bars
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=group)
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None and not until():
            time.sleep(0.005)
        if group:
            os.killpg(process.pid, sent)
        else:
            process.send_signal(sent)
        process.wait()
    return process.returncode, stderr_path.read_text()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signals") / "small"
    result = run_cli("generate", *SMALL_JOB, "--out", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return out


def quantile_entropy_loss(student_entropy: torch.Tensor, quantile: float) -> torch.Tensor:
    """The entropy term as first written, with torch.quantile, recorded by autograd: the reference for losses.py's
    entropy_regularization and its closed-form gradient (flat [N] entropies)."""
    kept = student_entropy.detach() >= torch.quantile(student_entropy.detach(), quantile)
    return torch.where(kept, student_entropy, 0.0).sum() / kept.sum()
