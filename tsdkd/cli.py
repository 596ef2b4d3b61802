"""The `tsdkd` command line. Each command fills its config dataclass and calls one function."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
import typer.core

from tsdkd.errors import ReportedFailure, TsdkdError
from tsdkd.interrupts import Terminated, restore_handlers
from tsdkd.launch import ERROR_CONTEXT


class Commands(typer.core.TyperGroup):
    """The `tsdkd` command group: usage errors of it and its commands (a mistyped option or value) end in one
    `error:` line saying where help is, like any other bad input, instead of click's usage block; exit code 2."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with one_line_usage_errors(None):
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:  # parses the command's own options
        with one_line_usage_errors(ctx):
            return super().invoke(ctx)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta["tsdkd command"] = name  # for the help a usage error without a context of its own points to
        return name, command, rest


@contextlib.contextmanager
def one_line_usage_errors(group_context: Any) -> Iterator[None]:
    """A usage error raised inside is shown as one line (show_one_line); `group_context` names the help to see when
    the error has no context of its own (a missing option value)."""
    try:
        yield
    except Exception as error:
        # By class name: typer may bring its own copy of click, whose classes are not the click package's.
        kinds = {kind.__name__ for kind in type(error).__mro__}
        if "UsageError" in kinds and "NoArgsIsHelpError" not in kinds:  # the latter shows the help, as it should
            error.show = functools.partial(show_one_line, error, error_context(error) or group_context)  # type: ignore[attr-defined]
        raise


def error_context(error: Any) -> Any:
    return getattr(error, "ctx", None)


def show_one_line(error: Any, context: Any, file: Any = None) -> None:
    """Replaces click's UsageError.show, whose signature takes the `file` it would print to (stderr here too)."""
    if context is None:
        where = ""
    elif context is error_context(error) or "tsdkd command" not in context.meta:
        where = f"; see `{context.command_path} --help`"
    else:  # the group's context: the error is the command's
        where = f"; see `{context.command_path} {context.meta['tsdkd command']} --help`"
    typer.echo(f"error: {error.format_message().rstrip('.')}{where}", err=True)


app = typer.Typer(
    cls=Commands,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click help: Rich markup would take each option's "[default]" for a style tag and drop it,
    # and would show a <bool> type after every flag.
    rich_markup_mode=None,
)


def show_version(value: bool | None) -> None:
    if value:
        from tsdkd import __version__

        typer.echo(f"tsdkd {__version__}")
        raise typer.Exit()


@app.callback()
def options(version: Optional[bool] = typer.Option(None, "--version", callback=show_version, is_eager=True,
                                                   help="Print tsdkd's version and exit.")) -> None:
    """Token-Selective Dual Knowledge Distillation: cache teacher signals, then distil a student from them."""


@contextlib.contextmanager
def sigterm_like_ctrl_c() -> Iterator[None]:
    """While a command runs, SIGTERM raises Terminated in this process, which then ends like Ctrl-C.
    Not in the workers of a launcher (torchrun sets LOCAL_RANK): the launcher stops them with SIGTERM,
    also while they wait in a collective, where a Python handler would run only when the wait ends."""
    # A handler can be set in the main thread only (not, say, in a command called from a thread).
    if "LOCAL_RANK" in os.environ or threading.current_thread() is not threading.main_thread():
        yield
        return
    main_pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked child (data loader worker) inherited this: end it as before
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        # The group's data loader workers got the signal too; torch's SIGCHLD handler would report each
        # one's death with a traceback while this process ends.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise Terminated

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, handler)}
    try:
        yield
    finally:
        restore_handlers(previous)


def quiet_teardown() -> None:
    """An interrupt can land inside any library call and leave a half-built object behind (a tqdm bar stopped in
    its __init__), whose __del__ then fails as it is collected, after the one line. The process is ending: such
    failures are not reported."""
    sys.unraisablehook = lambda unraisable: None


def say_last(line: str) -> None:
    """The command's last line, on stderr, on a line of its own and last: a progress bar still open has left its
    line unfinished (on a terminal and in a log alike), and would otherwise write again as it is closed."""
    from tqdm import tqdm

    open_bars = [bar for bar in list(getattr(tqdm, "_instances", ())) if not getattr(bar, "disable", True)]
    for bar in open_bars:
        bar.disable = True
    typer.echo(("\n" if open_bars else "") + line, err=True)


def one_line_errors(command: Callable[..., Any], next_step: str = "rerun the same command to continue") -> Callable[..., Any]:
    """Bad input ends in one line on stderr and exit code 2, never a traceback; Ctrl-C (exit 130) and
    SIGTERM (exit 143, 128 + 15 as if killed) say `next_step`."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_like_ctrl_c():
                return command(*args, **kwargs)
        except TsdkdError as error:
            # A process `tsdkd run` started for a round (as a launcher's worker): the round's context, as the run's
            # own errors give it.
            context = os.environ.get(ERROR_CONTEXT, "") if "LOCAL_RANK" in os.environ else ""
            say_last(f"error: {context}{error}")
            raise typer.Exit(2) from None
        except ReportedFailure as failure:
            if failure.line:
                say_last(f"error: {failure.line}")
            raise typer.Exit(failure.exit_code) from None
        except KeyboardInterrupt:
            quiet_teardown()
            say_last(f"interrupted; {next_step}")
            raise typer.Exit(130) from None
        except Terminated:
            quiet_teardown()
            say_last(f"terminated (SIGTERM); {next_step}")
            raise typer.Exit(143) from None

    return wrapper


@app.command()
@one_line_errors
def generate(
    prompts: Optional[str] = typer.Option(None, help="Prompt file (.jsonl/.json/.parquet/.csv), saved datasets folder, or dataset folder downloaded from the Hub [required]."),
    student: Optional[str] = typer.Option(None, help="Student model folder or hub id (samples the candidates) [required]."),
    teacher: Optional[str] = typer.Option(None, help="Teacher model folder or hub id (scores and ranks them) [required]."),
    out: Optional[str] = typer.Option(None, help="Output dataset folder (rerun the same command to resume) [required]."),
    student_revision: Optional[str] = typer.Option(None, help="Branch, tag or commit of a hub --student; its snapshot in the hub cache, fetched there if missing [the default branch]."),
    teacher_revision: Optional[str] = typer.Option(None, help="Branch, tag or commit of a hub --teacher; its snapshot in the hub cache, fetched there if missing [the default branch]."),
    num_candidates: Optional[int] = typer.Option(None, help="Candidates sampled per prompt [4]."),
    top_k: Optional[int] = typer.Option(None, help="Teacher top-k stored per completion position [20]."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Longest candidate in tokens [1024]."),
    temperature: Optional[float] = typer.Option(None, help="Student sampling temperature; 0 is greedy [1.0]."),
    top_p: Optional[float] = typer.Option(None, help="Student nucleus sampling [1.0]."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed [0]."),
    backend: Optional[str] = typer.Option(None, help="auto | hf | vllm [auto: vllm with a GPU, else hf]."),
    prompt_field: Optional[str] = typer.Option(None, help="Field holding the prompt text or chat messages [first of prompt/messages/question/problem]."),
    answer_field: Optional[str] = typer.Option(None, help="Field holding the gold answer [answer or solution, if present]."),
    verifier: Optional[str] = typer.Option(None, help="none | math: rank verified-correct candidates first [math]."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N prompts [all]."),
    shard_index: Optional[int] = typer.Option(None, help="This machine's part of a split job [0]."),
    num_shards: Optional[int] = typer.Option(None, help="Machines splitting the job; join with `tsdkd merge` [1]."),
    prompts_per_shard: Optional[int] = typer.Option(None, help="Prompts per Parquet shard [256]."),
    round: Optional[int] = typer.Option(None, help="Self-improvement round recorded in the manifest [0]."),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 [auto: bf16 on GPU]."),
    trust_remote_code: Optional[bool] = typer.Option(None, help="Allow model code from the model folder [off]."),
    batch_size: Optional[int] = typer.Option(None, help="hf: prompts per generate call; it changes the samples, so a rerun keeps it [16]."),
    score_batch_tokens: Optional[int] = typer.Option(None, help="hf: padded tokens per teacher forward [16384]."),
    logit_chunk_tokens: Optional[int] = typer.Option(None, help="hf: positions whose full log-softmax may exist at once [2048]."),
    tensor_parallel_size: Optional[int] = typer.Option(None, help="vllm: GPUs per engine [1]."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, help="vllm: GPU memory fraction [0.9]."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, help="vllm: scheduler token budget [vllm's default]."),
    kv_cache_memory_bytes: Optional[int] = typer.Option(None, help="vllm: KV cache size [1 GiB on CPU]."),
    enforce_eager: Optional[bool] = typer.Option(None, help="vllm: skip torch.compile and CUDA graphs (faster start) [off]."),
    config: Optional[str] = typer.Option(None, help="YAML or TOML file with the same keys; options given here win."),
) -> None:
    """Stage 1: write a signal dataset. The student samples candidates, the teacher scores and ranks them."""
    options = dict(locals())
    config_file = options.pop("config")
    from stage1_generate.generate import generate as run_generate
    from tsdkd.config import GenerateConfig, build_config, check_config

    cfg = build_config(GenerateConfig, config_file, options)
    check_config(cfg, config_file, options)
    run_generate(cfg)


@app.command()
@one_line_errors
def distill(
    signals: Optional[list[str]] = typer.Option(None, help="Signal dataset folder; repeat to train on several [required]."),
    student: Optional[str] = typer.Option(None, help="Student to train (the checkpoint that sampled the signals) [required]."),
    out: Optional[str] = typer.Option(None, help="Output folder: the trained student, checkpoints, metrics.jsonl; rerun the same command to continue a run in it [required]."),
    student_revision: Optional[str] = typer.Option(None, help="Branch, tag or commit of a hub --student; its snapshot in the hub cache, fetched there if missing [the default branch]."),
    loss: Optional[str] = typer.Option(None, help="tsdkd | sft | kd | gkd [tsdkd]."),
    indirect: Optional[str] = typer.Option(None, help="tsdkd ranking term: token | sequence | both [both]."),
    no_indirect: Optional[bool] = typer.Option(None, "--no-indirect/--with-indirect", help="tsdkd without the ranking term [off]."),
    no_entropy: Optional[bool] = typer.Option(None, "--no-entropy/--with-entropy", help="tsdkd without entropy regularisation [off]."),
    no_selection: Optional[bool] = typer.Option(None, "--no-selection/--with-selection", help="tsdkd with weight 1 on every token [off]."),
    jsd_beta: Optional[float] = typer.Option(None, help="Generalised JSD beta: 0 forward KL, 1 reverse KL [0.9]."),
    tau_w: Optional[float] = typer.Option(None, help="Token weight temperature in sigmoid((H_S - H_T)/tau) [1.0]."),
    selection_fraction: Optional[str] = typer.Option(None, help="Hard selection: only the top fraction rho of tokens by H_S - H_T; `off`: soft weights, also over a config file's value [off]."),
    renormalize_topk: Optional[bool] = typer.Option(None, help="Compare on the top-k only, renormalised (no tail bucket) [off]."),
    alpha: Optional[float] = typer.Option(None, help="Weight of the ranking term [0.1]."),
    lambda_ent: Optional[float] = typer.Option(None, help="Weight of the entropy term [1.0]."),
    entropy_quantile: Optional[float] = typer.Option(None, help="Entropy term uses tokens at or above this quantile of H_S [0.1]."),
    rank_items: Optional[int] = typer.Option(None, help="Token-level ranking: the student's top-m ids [10]."),
    prefix_entropy_fraction: Optional[float] = typer.Option(None, help="Token-level ranking: decision prefix holding this share of H_S [0.1]."),
    beta_p: Optional[float] = typer.Option(None, help="Sequence-level ranking score scale [1.0]."),
    learning_rate: Optional[float] = typer.Option(None, help="Peak learning rate [5e-6]."),
    epochs: Optional[float] = typer.Option(None, help="Epochs over the signals [3]."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps, at least 1 (overrides --epochs) [none: --epochs decides]."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per device micro-batch; with the sequence-level ranking, whole prompts, at least one [8]."),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step [1]."),
    max_length: Optional[int] = typer.Option(None, help="Longest prompt + completion; longer completions are cut [model context]."),
    warmup_ratio: Optional[float] = typer.Option(None, help="Linear warm-up share of the steps [0.1]."),
    lr_scheduler: Optional[str] = typer.Option(None, help="transformers scheduler name [cosine]."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay [0]."),
    max_grad_norm: Optional[float] = typer.Option(None, help="Gradient clipping [1.0]."),
    seed: Optional[int] = typer.Option(None, help="Seed for batches and initialisation [0]."),
    logit_chunk_tokens: Optional[int] = typer.Option(None, help="Tokens whose full log-softmax may exist at once [2048]."),
    bf16: Optional[str] = typer.Option(None, help="auto | on | off: bf16 autocast (fp32 master weights) [auto: on a bf16 GPU; on: also on a CPU-only machine]."),
    save_dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16: the saved student's weights, not the checkpoints' [auto: the dtype the student was stored in]."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute layer activations in the backward: less memory, more compute [off]."),
    logging_steps: Optional[int] = typer.Option(None, help="Steps between metric records [10]."),
    save_steps: Optional[int] = typer.Option(None, help="Steps between checkpoints [200]."),
    save_total_limit: Optional[int] = typer.Option(None, help="Checkpoints kept [2]."),
    ddp_timeout: Optional[int] = typer.Option(None, help="Seconds a process waits for the others, the first time while the main process validates the signal data [1800]."),
    dataloader_workers: Optional[int] = typer.Option(None, help="Processes reading the next micro-batches while the step runs, for GPU machines; on a CPU-only one they compete with training [0: between steps]."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Require a run in --out to continue (a rerun of the same command continues one anyway) [off]."),
    keep_checkpoints: Optional[bool] = typer.Option(None, "--keep-checkpoints/--no-keep-checkpoints", help="Keep checkpoints/ after the student is saved [off: removed]."),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard", help="Also log to TensorBoard under OUT/tensorboard [off]."),
    trust_remote_code: Optional[bool] = typer.Option(None, help="Allow model code from the model folder [off]."),
    config: Optional[str] = typer.Option(None, help="YAML or TOML file with the same keys; options given here win."),
) -> None:
    """Stage 2: train the student from a signal dataset. TSD-KD or a baseline loss (--loss)."""
    options = dict(locals())
    config_file = options.pop("config")
    from stage2_distill.distill import distill as run_distill
    from tsdkd.config import DistillConfig, build_config, check_config

    # `off` turns a config file's hard selection off: an option left at None is one not given.
    soft_selection = (options["selection_fraction"] or "").lower() in ("off", "none")
    if soft_selection:
        options["selection_fraction"] = None
    cfg = build_config(DistillConfig, config_file, options)
    if soft_selection:
        cfg.selection_fraction = None
    # Given on the command line, a loss setting counts even at its default value (`--no-indirect --indirect both`,
    # `--loss kd --with-entropy`); a config file may hold a shared base of defaults.
    check_config(cfg, config_file, options)
    run_distill(cfg)
    import torch.distributed

    # Under torchrun: a process that exits with its gloo group alive can abort (SIGABRT, "terminate
    # called without an active exception"). Not after an error: peers may still wait in a collective.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@app.command()
@one_line_errors
def run(
    prompts: Optional[str] = typer.Option(None, help="Prompt file, saved datasets folder, or dataset folder downloaded from the Hub [required]."),
    student: Optional[str] = typer.Option(None, help="Initial student (round 0) [required]."),
    teacher: Optional[str] = typer.Option(None, help="Teacher, the same in every round [required]."),
    out: Optional[str] = typer.Option(None, help="Run folder: round-1/, round-2/, ... and tsdkd_run.json [required]."),
    student_revision: Optional[str] = typer.Option(None, help="Branch, tag or commit of a hub --student (round 0); its snapshot in the hub cache, fetched there if missing [the default branch]."),
    teacher_revision: Optional[str] = typer.Option(None, help="Branch, tag or commit of a hub --teacher; its snapshot in the hub cache, fetched there if missing [the default branch]."),
    rounds: Optional[int] = typer.Option(None, help="Rounds of generate-then-distill; may grow on a rerun [3]."),
    seed: Optional[int] = typer.Option(None, help="Base seed; round r uses seed + r [0]."),
    distill_processes: Optional[int] = typer.Option(None, help="Processes of each round's distillation, one per GPU, as torchrun would start them (on a machine without GPUs, CPU processes) [1]."),
    num_candidates: Optional[int] = typer.Option(None, help="generate: candidates per prompt [4]."),
    top_k: Optional[int] = typer.Option(None, help="generate: teacher top-k [20]."),
    max_new_tokens: Optional[int] = typer.Option(None, help="generate: longest candidate [1024]."),
    temperature: Optional[float] = typer.Option(None, help="generate: sampling temperature [1.0]."),
    backend: Optional[str] = typer.Option(None, help="generate: auto | hf | vllm [auto]."),
    limit: Optional[int] = typer.Option(None, help="generate: use only the first N prompts [all]."),
    loss: Optional[str] = typer.Option(None, help="distill: tsdkd | sft | kd | gkd [tsdkd]."),
    learning_rate: Optional[float] = typer.Option(None, help="distill: peak learning rate [5e-6]."),
    epochs: Optional[float] = typer.Option(None, help="distill: epochs per round [3]."),
    max_steps: Optional[int] = typer.Option(None, help="distill: optimizer steps per round, at least 1 (overrides --epochs) [none: --epochs decides]."),
    batch_size: Optional[int] = typer.Option(None, help="distill: sequences per micro-batch [8]."),
    config: Optional[str] = typer.Option(None, help="YAML/TOML: the keys above at the top level, plus `generate:` and `distill:` sections with any other option of those commands (not the ones the run sets: prompts, student, teacher, their revisions, out, seed, round, signals, resume)."),
) -> None:
    """Self-improvement rounds of generate, then distill. Round r samples with the round r-1 student and
    distils into round r."""
    options = dict(locals())
    config_file = options.pop("config")
    from tsdkd.config import RunConfig, build_config, check_config
    from tsdkd.rounds import run_rounds

    # The generate: and distill: options above go into their sections (config.RUN_SECTION_OPTIONS).
    cfg = build_config(RunConfig, config_file, options)
    check_config(cfg, config_file, options)
    run_rounds(cfg)


@app.command(name="eval")
# eval does not resume: its results appear in --out only once every model is done.
@functools.partial(one_line_errors, next_step="--out holds complete evals only (this one if it said so above); rerun the same "
                                               "command to evaluate again from the start")
def evaluate(
    model: Optional[list[str]] = typer.Option(None, help="Model folder or hub id; repeat to compare several (e.g. student before, after, teacher) [required]."),
    data: Optional[list[str]] = typer.Option(None, help="Benchmark file (jsonl/json/parquet/csv), or dataset folder (saved, or downloaded from the Hub: its test split); repeat for several [required]."),
    out: Optional[str] = typer.Option(None, help="Folder for results.json, per-item <benchmark>.jsonl (one subfolder per model when several) and the settings (tsdkd_eval.json), written once all are done; a rerun with the same settings replaces it, other settings are refused [required]."),
    samples: Optional[int] = typer.Option(None, help="Samples per item; above 1 reports pass@k [1: greedy]."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature [0 for 1 sample, else 1.0]."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling [1.0]."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Longest response [1024]."),
    backend: Optional[str] = typer.Option(None, help="auto | hf | vllm [auto]."),
    prompt_field: Optional[str] = typer.Option(None, help="Prompt field [first of prompt/messages/question/problem]."),
    answer_field: Optional[str] = typer.Option(None, help="Gold answer field [answer or solution]; a solution's marked answer is read (MATH \\boxed{}, GSM8K '#### N', a line starting 'Answer:'), anything else is compared whole."),
    limit: Optional[int] = typer.Option(None, help="Only the first N items of each benchmark [all]."),
    batch_size: Optional[int] = typer.Option(None, help="Prompts per generation batch [32]."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed [0]."),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 [auto]."),
    trust_remote_code: Optional[bool] = typer.Option(None, help="Allow model code from the model folder [off]."),
    enforce_eager: Optional[bool] = typer.Option(None, help="vllm: skip compilation [off]."),
    kv_cache_memory_bytes: Optional[int] = typer.Option(None, help="vllm: KV cache size [1 GiB on CPU]."),
    config: Optional[str] = typer.Option(None, help="YAML or TOML file with the same keys."),
) -> None:
    """Final-answer accuracy on benchmark files. The answer is read from \\boxed{}, ####, Answer: or the last
    number, and compared with math-verify."""
    options = dict(locals())
    config_file = options.pop("config")
    from tsdkd.config import EvalConfig, build_config, check_config
    from tsdkd.evaluate import evaluate as run_evaluate

    cfg = build_config(EvalConfig, config_file, options)
    check_config(cfg, config_file, options)
    run_evaluate(cfg)


@app.command()
@one_line_errors
def merge(
    parts: list[Path] = typer.Argument(..., help="Dataset folders made with --shard-index/--num-shards."),
    out: Path = typer.Option(..., help="Merged dataset folder (must not exist yet)."),
) -> None:
    """Join the outputs of a job split over machines into one dataset."""
    from tsdkd.merge import merge_datasets

    merge_datasets(parts, out)


@app.command()
@one_line_errors
def validate(
    dataset: Path = typer.Argument(..., help="Signal dataset folder."),
    student: Optional[str] = typer.Option(None, help="Also check the tokenizer of the student about to be trained."),
) -> None:
    """Run every check on a signal dataset. Manifest, checksums, shapes, ranges, rankings."""
    from tsdkd.fingerprint import tokenizer_fingerprint
    from tsdkd.validate import validate_dataset

    fingerprint = None
    if student:
        from tsdkd.loading import load_tokenizer

        fingerprint = tokenizer_fingerprint(load_tokenizer(student, False, "student"))
    manifest = validate_dataset(dataset, fingerprint, deep=True)
    shards = len(manifest["shards"])
    typer.echo(f"{dataset}: valid ({shards} shard{'s' if shards != 1 else ''}, {manifest['stats']['candidates']} candidates)")


@app.command()
@one_line_errors
def inspect(dataset: Path = typer.Argument(..., help="Signal dataset folder.")) -> None:
    """Summarise a signal dataset. Sizes, bytes per token, ranks, scores, teacher entropy."""
    from tsdkd.inspect_signals import summarize

    typer.echo(summarize(dataset))


def main() -> None:
    app(prog_name="tsdkd")


if __name__ == "__main__":
    sys.exit(main())
