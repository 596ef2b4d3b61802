"""One config dataclass per command, filled from defaults, then a YAML/TOML file, then the CLI."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, TypeVar

import yaml

from tsdkd.errors import TsdkdError

BACKENDS = ("auto", "hf", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")
VERIFIERS = ("none", "math")
# numpy and transformers refuse seeds outside [0, 2**32).
MAX_SEED = 2**32 - 1
SEED_RULE = f"--seed must be in [0, {MAX_SEED}]"


def enforce(rules: list[tuple[bool, str]]) -> None:
    """Raise the message of the first rule that does not hold."""
    for ok, message in rules:
        if not ok:
            raise TsdkdError(message)


def enforce_finite(config: Any) -> None:
    """Refuse nan and inf in any float setting: nan fails every range rule, but inf passes `> 0`
    and only breaks training or sampling later."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise TsdkdError(f"--{field.name.replace('_', '-')} must be a finite number, not {value}")


@dataclass
class GenerateConfig:
    """Settings of `tsdkd generate` (stage 1). Defaults follow METHOD.md."""

    prompts: str = ""
    student: str = ""
    teacher: str = ""
    out: str = ""
    # A branch, tag or commit of a hub id (None: its default branch); see loading.pinned.
    student_revision: str | None = None
    teacher_revision: str | None = None
    num_candidates: int = 4
    top_k: int = 20
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    backend: str = "auto"
    # None: the first of prompt/messages/question/problem and answer/solution the file has.
    prompt_field: str | None = None
    answer_field: str | None = None
    verifier: str = "math"
    limit: int | None = None
    shard_index: int = 0
    num_shards: int = 1
    prompts_per_shard: int = 256
    round: int = 0
    dtype: str = "auto"
    trust_remote_code: bool = False
    # hf backend: prompts per generate() call, padded tokens per teacher forward, and the
    # number of positions whose full-vocabulary log-softmax may exist at once.
    batch_size: int = 16
    score_batch_tokens: int = 16384
    logit_chunk_tokens: int = 2048
    # vllm backend pass-through.
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = False

    def check(self) -> None:
        """Reject out-of-range settings with one line each."""
        for name in ("prompts", "student", "teacher", "out"):
            if not getattr(self, name):
                raise TsdkdError(f"--{name} is required (on the command line or in --config)")
        enforce_finite(self)
        rules = [
            (self.num_candidates >= 1, "--num-candidates must be at least 1"),
            (self.top_k >= 1, "--top-k must be at least 1"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (self.temperature >= 0, "--temperature must be 0 (greedy) or more"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.limit is None or self.limit >= 1, "--limit must be at least 1"),
            (self.num_shards >= 1, "--num-shards must be at least 1"),
            (0 <= self.shard_index < self.num_shards, "--shard-index must be in [0, --num-shards)"),
            (self.prompts_per_shard >= 1, "--prompts-per-shard must be at least 1"),
            (self.round >= 0, "--round must be 0 or more"),
            (0 <= self.seed <= MAX_SEED, SEED_RULE),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.logit_chunk_tokens >= 1, "--logit-chunk-tokens must be at least 1"),
            (self.score_batch_tokens >= 1, "--score-batch-tokens must be at least 1"),
            (self.tensor_parallel_size >= 1, "--tensor-parallel-size must be at least 1"),
            (0 < self.gpu_memory_utilization <= 1, "--gpu-memory-utilization must be in (0, 1]"),
            (self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1, "--max-num-batched-tokens must be at least 1"),
            (self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes >= 1, "--kv-cache-memory-bytes must be at least 1"),
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
            (self.verifier in VERIFIERS, f"--verifier must be one of {', '.join(VERIFIERS)}"),
        ]
        enforce(rules)
        if self.temperature == 0 and self.num_candidates > 1:
            raise TsdkdError("--temperature 0 (greedy) gives identical candidates: use --num-candidates 1")


SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Distill settings that change memory, speed, logs or checkpoints, not results (beyond float rounding): a continued
# run (a rerun of `tsdkd distill` or `tsdkd run`) may change them, e.g. after running out of memory.
RESUMABLE_DISTILL_CHANGES = ("gradient_checkpointing", "logit_chunk_tokens", "ddp_timeout", "dataloader_workers", "logging_steps",
                             "save_steps", "save_total_limit", "keep_checkpoints", "tensorboard", "save_dtype")
# Generate settings that change memory or speed, not the dataset (`tsdkd generate` leaves them out of the settings a
# rerun must repeat): a continued `tsdkd run` may change them, e.g. after the engine ran out of memory.
RESUMABLE_GENERATE_CHANGES = ("score_batch_tokens", "logit_chunk_tokens", "tensor_parallel_size", "gpu_memory_utilization",
                              "max_num_batched_tokens", "kv_cache_memory_bytes", "enforce_eager")
# The run record `tsdkd distill` keeps in its --out (written once the run has started).
DISTILL_RUN_INFO = "tsdkd_distill.json"


@dataclass
class EvalConfig:
    """Settings of `tsdkd eval`: greedy by default; `samples` > 1 samples and reports pass@k.
    Several models are evaluated one after the other with the same settings and compared."""

    model: list[str] = dataclasses.field(default_factory=list)
    data: list[str] = dataclasses.field(default_factory=list)
    out: str = ""
    samples: int = 1
    temperature: float | None = None
    top_p: float = 1.0
    max_new_tokens: int = 1024
    backend: str = "auto"
    prompt_field: str | None = None
    answer_field: str | None = None
    limit: int | None = None
    batch_size: int = 32
    seed: int = 0
    dtype: str = "auto"
    trust_remote_code: bool = False
    enforce_eager: bool = False
    kv_cache_memory_bytes: int | None = None

    def check(self) -> None:
        if not self.model or not self.out:
            raise TsdkdError("--model (one or more) and --out are required")
        if not self.data:
            raise TsdkdError("--data is required (one or more benchmark files)")
        enforce_finite(self)
        rules = [
            (self.samples >= 1, "--samples must be at least 1"),
            (self.temperature is None or self.temperature >= 0, "--temperature must be 0 or more"),
            (self.samples == 1 or self.temperature != 0, "--samples above 1 needs a temperature above 0"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (self.limit is None or self.limit >= 1, "--limit must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (0 <= self.seed <= MAX_SEED, SEED_RULE),
            (self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes >= 1, "--kv-cache-memory-bytes must be at least 1"),
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}"),
            (self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
        ]
        enforce(rules)

    @property
    def sampling_temperature(self) -> float:
        """Greedy for one sample, temperature 1 for pass@k, unless a temperature is given."""
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.samples == 1 else 1.0


LOSSES = ("tsdkd", "sft", "kd", "gkd")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
INDIRECT = ("token", "sequence", "both")
# Each loss setting and the loss term that reads it (DistillConfig.loss_terms).
LOSS_SETTING_TERMS = {
    "no_indirect": "tsdkd", "no_entropy": "tsdkd", "no_selection": "tsdkd",
    "jsd_beta": "jsd", "renormalize_topk": "direct", "tau_w": "soft selection", "selection_fraction": "selection",
    "indirect": "indirect", "alpha": "indirect", "rank_items": "token ranking", "prefix_entropy_fraction": "token ranking",
    "beta_p": "sequence ranking", "lambda_ent": "entropy", "entropy_quantile": "entropy",
}


@dataclass
class DistillConfig:
    """Settings of `tsdkd distill` (stage 2). Loss defaults follow METHOD.md; training defaults are
    the authors' (lr 5e-6, cosine, 10% warm-up, 3 epochs) except the batch, which fits one CPU."""

    signals: list[str] = dataclasses.field(default_factory=list)
    student: str = ""
    out: str = ""
    student_revision: str | None = None
    loss: str = "tsdkd"
    # Which switches apply: `--no-indirect`, `--no-entropy`, `--no-selection` turn TSD-KD terms off.
    indirect: str = "both"
    no_indirect: bool = False
    no_entropy: bool = False
    no_selection: bool = False
    jsd_beta: float = 0.9
    tau_w: float = 1.0
    selection_fraction: float | None = None
    renormalize_topk: bool = False
    alpha: float = 0.1
    lambda_ent: float = 1.0
    entropy_quantile: float = 0.1
    rank_items: int = 10
    prefix_entropy_fraction: float = 0.1
    beta_p: float = 1.0
    learning_rate: float = 5e-6
    epochs: float = 3.0
    # -1: no step limit, --epochs decides (transformers' own "unset", passed on as is); else at least 1.
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int | None = None
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    logit_chunk_tokens: int = 2048
    bf16: str = "auto"
    # The saved student's weights ("auto": the dtype the student was stored in); checkpoints are not cast.
    save_dtype: str = "auto"
    # Recompute each decoder layer's activations in the backward: less memory, ~1/3 more compute.
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    # Seconds a process waits for the others in a collective; the first wait is for the main process
    # validating the signal data (torch's NCCL default would be 10 minutes).
    ddp_timeout: int = 1800
    # Processes that read and collate the next micro-batches from the shards while the step runs (0: the
    # training process reads them between steps). On a CPU-only machine they compete with training for cores.
    dataloader_workers: int = 0
    resume: bool = False
    keep_checkpoints: bool = False
    tensorboard: bool = False
    trust_remote_code: bool = False

    def check(self, given: Collection[str] = (), config_file: str | None = None) -> None:
        """Ranges and choices, then the loss settings no term reads (check_loss_settings: `given` on the command line,
        the rest perhaps from `config_file`), each refused with one line."""
        if not self.signals:
            raise TsdkdError("--signals is required (one or more signal dataset folders)")
        for name in ("student", "out"):
            if not getattr(self, name):
                raise TsdkdError(f"--{name} is required (on the command line or in --config)")
        enforce_finite(self)
        rules = [
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}"),
            (self.indirect in INDIRECT, f"--indirect must be one of {', '.join(INDIRECT)}"),
            (0 <= self.jsd_beta <= 1, "--jsd-beta must be in [0, 1]"),
            (self.tau_w > 0, "--tau-w must be positive"),
            (self.selection_fraction is None or 0 < self.selection_fraction <= 1, "--selection-fraction must be in (0, 1]"),
            (self.alpha >= 0 and self.lambda_ent >= 0, "--alpha and --lambda-ent must be 0 or more"),
            (0 <= self.entropy_quantile < 1, "--entropy-quantile must be in [0, 1)"),
            (self.rank_items >= 2, "--rank-items must be at least 2"),
            (0 < self.prefix_entropy_fraction <= 1, "--prefix-entropy-fraction must be in (0, 1]"),
            # A negative scale inverts the sequence scores, so the ranking term rewards the teacher's worst.
            (self.beta_p > 0, "--beta-p must be positive"),
            (self.learning_rate > 0, "--learning-rate must be positive"),
            (self.max_steps == -1 or self.max_steps >= 1, "--max-steps must be at least 1 (leave it out to train for --epochs)"),
            (self.epochs > 0, "--epochs must be positive"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be at least 1"),
            (self.max_length is None or self.max_length >= 2, "--max-length must be at least 2"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must be 0 or more"),
            # transformers clips only above 0; a negative value would silently mean no clipping.
            (self.max_grad_norm >= 0, "--max-grad-norm must be 0 (no clipping) or more"),
            (0 <= self.seed <= MAX_SEED, SEED_RULE),
            (self.logit_chunk_tokens >= 1, "--logit-chunk-tokens must be at least 1"),
            (self.bf16 in ("auto", "on", "off"), "--bf16 must be auto, on or off"),
            (self.save_dtype in SAVE_DTYPES, f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}"),
            (self.lr_scheduler in SCHEDULERS, f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}"),
            (self.logging_steps >= 1 and self.save_steps >= 1, "--logging-steps and --save-steps must be at least 1"),
            (self.save_total_limit >= 1, "--save-total-limit must be at least 1"),
            (self.ddp_timeout >= 1, "--ddp-timeout must be at least 1 (seconds)"),
            (self.dataloader_workers >= 0, "--dataloader-workers must be 0 or more"),
        ]
        enforce(rules)
        self.check_loss_settings(given, config_file)

    def loss_terms(self) -> set[str]:
        """The parts of the stage-2 loss that this preset and these switches use."""
        terms = {"sft"} if self.loss == "sft" else {"direct"}
        if self.loss in ("tsdkd", "gkd"):
            terms.add("jsd")  # kd is its beta = 0 end
        if self.loss != "tsdkd":
            return terms
        terms.add("tsdkd")
        if not self.no_selection:
            terms.add("selection")
            if self.selection_fraction is None:
                terms.add("soft selection")  # sigmoid weights; hard selection reads no temperature
        if not self.no_entropy:
            terms.add("entropy")
        if not self.no_indirect:
            terms.add("indirect")
            if self.indirect in ("token", "both"):
                terms.add("token ranking")
            if self.indirect in ("sequence", "both"):
                terms.add("sequence ranking")
        return terms

    def check_loss_settings(self, given: Collection[str] = (), config_file: str | None = None) -> None:
        """A loss setting changed from its default, or named in `given` (the command line's options), but read by no
        term in use is a mistake (an ablation that silently runs as something else): one line naming it, and the
        config file it then came from."""
        terms, defaults = self.loss_terms(), DistillConfig()
        for name, term in LOSS_SETTING_TERMS.items():
            if term not in terms and (getattr(self, name) != getattr(defaults, name) or name in given):
                # The other switches in use, which may be what turned the term off (not the option itself).
                switches = "".join(f" {command_line_form(switch, True)}" for switch in ("no_indirect", "no_entropy", "no_selection")
                                   if getattr(self, switch) and switch != name)
                if term in ("token ranking", "sequence ranking") and not self.no_indirect and self.indirect != DistillConfig.indirect:
                    switches += f" --indirect {self.indirect}"  # which ranking is on decides what its options mean
                if term == "soft selection" and "selection" in terms:
                    switches += f" --selection-fraction {self.selection_fraction}"
                origin = f" (set in {config_file})" if config_file and name not in given else ""
                raise TsdkdError(f"{command_line_form(name, getattr(self, name))}{origin} has no effect with --loss {self.loss}{switches}; "
                                 "leave it out")


def command_line_form(name: str, value: Any) -> str:
    """The command-line form that gives a setting this value: --tau-w, and for a switch off --with-entropy (for
    no_entropy) or --no-tensorboard."""
    option = name.replace("_", "-")
    if value is False:
        return f"--with-{option[3:]}" if option.startswith("no-") else f"--no-{option}"
    return f"--{option}"


# The keys of each `tsdkd run` section that the run sets itself for each round.
ROUND_KEYS = {"generate": {"prompts", "student", "teacher", "out", "round", "seed", "student_revision", "teacher_revision"},
              "distill": {"signals", "student", "out", "seed", "resume", "student_revision"}}
# The generate and distill options that `tsdkd run` also takes on its command line and at the top level
# of its config file; each goes into its section, where it wins over the same key.
RUN_SECTION_OPTIONS = {"generate": ("num_candidates", "top_k", "max_new_tokens", "temperature", "backend", "limit"),
                       "distill": ("loss", "learning_rate", "epochs", "max_steps", "batch_size")}


@dataclass
class RunConfig:
    """Settings of `tsdkd run`: R rounds of generate-then-distill. `generate` and `distill` hold
    any further keys of those commands (from a config file's sections of the same names)."""

    prompts: str = ""
    student: str = ""
    teacher: str = ""
    out: str = ""
    student_revision: str | None = None
    teacher_revision: str | None = None
    rounds: int = 3
    seed: int = 0
    distill_processes: int = 1
    generate: dict = dataclasses.field(default_factory=dict)
    distill: dict = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        for name in ("prompts", "student", "teacher", "out"):
            if not getattr(self, name):
                raise TsdkdError(f"--{name} is required (on the command line or in --config)")
        if self.rounds < 1:
            raise TsdkdError("--rounds must be at least 1")
        if self.distill_processes < 1:
            raise TsdkdError("--distill-processes must be at least 1")
        if not 0 <= self.seed <= MAX_SEED - self.rounds:
            raise TsdkdError(f"--seed must be in [0, {MAX_SEED - self.rounds}]: round r uses --seed + r, at most {MAX_SEED}")


# The sections of a `tsdkd run` config and the command each configures.
RUN_SECTIONS = {"generate": GenerateConfig, "distill": DistillConfig}
ConfigT = TypeVar("ConfigT")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last one silently (YAML
    requires unique keys). Keys a `<<` merge brings in may still be overridden, as YAML intends."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Before a merge adds its keys, and once per mapping: one that a `<<` merges is flattened there, perhaps
        # before it is built where it is written.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._refuse_repeated_keys(node)
        super().flatten_mapping(node)

    def _refuse_repeated_keys(self, node: yaml.MappingNode) -> None:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in lines:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice (lines {lines[key]} and {line}); keep one", key_node.start_mark)
                lines[key] = line
            except TypeError:  # an unhashable key: the base constructor names it
                pass


def option_keys(values: dict[Any, Any], where: str) -> dict[str, Any]:
    """A mapping's keys as option names, dashes as underscores; two spellings of one option are refused."""
    options: dict[str, Any] = {}
    spellings: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in options:
            raise TsdkdError(f"{where}: {spellings[name]!r} and {key!r} are the same option; keep one")
        options[name], spellings[name] = value, key
    return options


def read_config_file(path: Path) -> dict[str, Any]:
    """Keys of a YAML or TOML file, dashes normalised to underscores."""
    if path.is_dir():
        raise TsdkdError(f"config file {path} is a folder; name a YAML or TOML file")
    if not path.is_file():
        raise TsdkdError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.load(text, Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as error:
        raise TsdkdError(f"config file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise TsdkdError(f"config file {path}: cannot read it ({error.strerror})") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise TsdkdError(f"config file {path} is not valid {path.suffix[1:].upper()}: {error}".splitlines()[0]) from None
    if not isinstance(values, dict):
        raise TsdkdError(f"config file {path} must hold a mapping of option names to values")
    return option_keys(values, f"config file {path}")


def build_config(cls: type[ConfigT], config_file: str | None, cli_values: dict[str, Any], where: str | None = None) -> ConfigT:
    """Defaults < config file < options given on the command line (those not None). `where` names the values'
    source in errors; without it, a command-line value is named by its option and the others by the config file."""
    source = where or (f"config file {config_file}" if config_file else "options")
    values: dict[str, Any] = {}
    if config_file:
        values.update(read_config_file(Path(config_file)))
        if cls is RunConfig:
            check_run_config_file(values, source)
    given = {key: value for key, value in cli_values.items() if value is not None}
    from_file = dict(values)
    values.update(given)
    if cls is RunConfig:
        values = nest_run_options(values, source)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TsdkdError(unknown_key_message(cls, unknown[0], source))
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        # A value from the command line (no `where`) is named by its option, even beside a config file.
        named = f"--{key.replace('_', '-')}" if where is None and key in given else source
        values[key] = _checked_value(key, value, hints[key], named)
    for key in sorted(given.keys() & from_file.keys()):
        # A repeatable option: one might expect both lists. Said once under torchrun (by the first process).
        replaced = from_file[key] if isinstance(from_file[key], list) else [from_file[key]]
        if isinstance(values.get(key), list) and replaced != values[key] and os.environ.get("RANK", "0") == "0":
            print(f"note: --{key.replace('_', '-')} on the command line replaces {key} in {config_file} ({replaced}); "
                  "repeat the option for each one to use")
    return cls(**values)


def unknown_key_message(cls: type, key: str, where: str) -> str:
    """Names the known keys, and the nearest one to a misspelt key; for `tsdkd run`, also the section that takes a
    generate or distill option; elsewhere, that sections belong in a `tsdkd run` config."""
    if cls is RunConfig:
        for section, section_cls in RUN_SECTIONS.items():
            if key in {field.name for field in dataclasses.fields(section_cls)} - ROUND_KEYS[section]:
                return f"{where}: {key!r} goes in the `{section}:` section (top-level keys: {', '.join(run_top_level_keys())})"
        known = run_top_level_keys()
    else:
        known = sorted(field.name for field in dataclasses.fields(cls))
        if key in RUN_SECTIONS:
            return f"{where}: a `{key}:` section belongs in a `tsdkd run` config; here its keys go at the top level"
    nearest = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {nearest[0]!r}?)" if nearest else ""
    return f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(known)}"


def check_config(cfg: Any, config_file: str | None, cli_values: dict[str, Any]) -> None:
    """cfg.check() for a command line (`cli_values`: its options, None where not given): a refused value set by the
    config file, not on the command line, is said to be, after the option the refusal names first."""
    given = {name for name, value in cli_values.items() if value is not None}
    try:
        cfg.check(given, config_file) if isinstance(cfg, DistillConfig) else cfg.check()
    except TsdkdError as error:
        message = str(error)
        # Only a refusal of one option's value: one naming several (`--alpha and --lambda-ent must be ...`, a missing
        # `--out`) may be about another one's.
        options = set(re.findall(r"(?<![\w/-])--[a-z][a-z0-9-]*", message))
        name = next(iter(options))[2:].replace("-", "_") if len(options) == 1 else None
        if config_file and name and message.startswith("--") and "(set in " not in message and name not in given and \
                name in read_config_file(Path(config_file)):
            option = f"--{name.replace('_', '-')}"
            raise TsdkdError(message.replace(option, f"{option} (set in {config_file})", 1)) from None
        raise


def run_top_level_keys() -> list[str]:
    """What a `tsdkd run` config file takes at the top level: the run's own keys and RUN_SECTION_OPTIONS."""
    return sorted({field.name for field in dataclasses.fields(RunConfig)} | {k for keys in RUN_SECTION_OPTIONS.values() for k in keys})


def check_run_config_file(values: dict[str, Any], where: str) -> None:
    """A `tsdkd run` config file gives each option once: at the top level or in its section, not both (the command
    line, in turn, wins over either)."""
    for section, section_cls in RUN_SECTIONS.items():
        inside = values.get(section)
        if not isinstance(inside, dict):
            continue  # nest_run_options names the problem
        inside = option_keys(inside, f"{where}, {section} section")
        hints = typing.get_type_hints(section_cls)
        for key in RUN_SECTION_OPTIONS[section]:
            if key in values and key in inside and \
                    _checked_value(key, values[key], hints[key], where) != _checked_value(key, inside[key], hints[key], where):
                raise TsdkdError(f"{where}: {key} is {values[key]!r} at the top level and {inside[key]!r} in the `{section}:` "
                                 "section; give it once")


def nest_run_options(values: dict[str, Any], where: str) -> dict[str, Any]:
    """A `tsdkd run` config's values with RUN_SECTION_OPTIONS moved into their sections, and each section's
    keys checked (one line for a key the run sets itself or one its command does not know) and typed by its
    command (YAML's `1e-4` is a string to PyYAML), as the run records and compares them."""
    values = dict(values)
    for section, section_cls in RUN_SECTIONS.items():
        inside = values.get(section) or {}
        if not isinstance(inside, dict):
            raise TsdkdError(f"{where}: {section} must be a mapping of {section} options")
        inside = option_keys(inside, f"{where}, {section} section")
        inside.update({key: values.pop(key) for key in RUN_SECTION_OPTIONS[section] if key in values})
        settable = {field.name for field in dataclasses.fields(section_cls)} - ROUND_KEYS[section]
        for key in sorted(inside):
            if key in ROUND_KEYS[section]:
                how = f"for each round from its own top-level {key}; move it there" if key.endswith("_revision") else \
                    "itself for each round; remove it"
                raise TsdkdError(f"{where}: {section}.{key} is set by `tsdkd run` {how}")
            if key not in settable:
                raise TsdkdError(f"{where}, {section} section: unknown key {key!r}; known keys: {', '.join(sorted(settable))}")
        typed = build_config(section_cls, None, inside, f"{where}, {section} section")
        values[section] = {key: getattr(typed, key) for key in inside}
    return values


def _checked_value(key: str, value: Any, expected: Any, where: str) -> Any:
    if typing.get_origin(expected) is list:
        items = value if isinstance(value, list) else [value]
        return [_checked_value(key, item, typing.get_args(expected)[0], where) for item in items]
    allowed = typing.get_args(expected) or (expected,)
    if value is None and type(None) in allowed:
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):
        # A string that spells a number, for a float setting, is that number: YAML 1.1 (PyYAML) reads
        # `1e-4`, which has no dot, as a string.
        try:
            return float(value)
        except ValueError:
            pass  # not a number: refused below
    # bool is an int in Python: a `true` given for a count is a mistake, not 1.
    if isinstance(value, bool) and bool not in allowed:
        allowed = ()
    if not isinstance(value, tuple(kind for kind in allowed if kind is not type(None))):
        wanted = " or ".join(TYPE_NAMES.get(kind, kind.__name__) for kind in allowed if kind is not type(None)) or "a number"
        named = f"{where} {value!r}" if where.startswith("--") else f"{where}: {key} = {value!r}"
        raise TsdkdError(f"{named} must be {wanted}")
    return value


TYPE_NAMES = {float: "a number", int: "a whole number", str: "a string", bool: "true or false", dict: "a mapping"}
