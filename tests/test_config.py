"""Config checks: out-of-range and non-finite settings, and config files, refused with one line."""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer
import yaml

from conftest import assert_one_line_error, run_cli
from tsdkd.cli import app
from tsdkd.config import (ROUND_KEYS, RUN_SECTION_OPTIONS, DistillConfig, EvalConfig, GenerateConfig, RunConfig,
                          build_config, read_config_file)
from tsdkd.errors import TsdkdError

SEED_RULE = r"--seed must be in \[0, 4294967295\]"


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "inf"], "--epochs must be a finite number, not inf"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--max-steps", "0"], "--max-steps must be at least 1 (leave it out to train for --epochs)"),
    (["--max-steps", "-2"], "--max-steps must be at least 1"),
    (["--loss", "kd", "--no-entropy"], "--no-entropy has no effect with --loss kd; leave it out"),
    (["--no-indirect", "--alpha", "0.5"], "--alpha has no effect with --loss tsdkd --no-indirect; leave it out"),
    (["--indirect", "sequence", "--rank-items", "5"], "--rank-items has no effect with --loss tsdkd --indirect sequence; leave it out"),
    (["--indirect", "token", "--beta-p", "2"], "--beta-p has no effect with --loss tsdkd --indirect token; leave it out"),
    (["--no-selection", "--indirect", "token", "--tau-w", "2"], "--tau-w has no effect with --loss tsdkd --no-selection; leave it out"),
    (["--learning-rate", "inf"], "--learning-rate must be a finite number"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number"),
    (["--tau-w", "inf"], "--tau-w must be a finite number"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    (["--seed", "5000000000"], "--seed must be in [0, 4294967295]"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be 0 (no clipping) or more"),
    (["--weight-decay", "-5"], "--weight-decay must be 0 or more"),
    (["--beta-p", "-1"], "--beta-p must be positive"),
    (["--save-total-limit", "-1"], "--save-total-limit must be at least 1"),
    (["--save-dtype", "float64"], "--save-dtype must be one of auto, float32, bfloat16, float16"),
])
def test_distill_refuses_out_of_range_settings_before_reading_anything(tmp_path, extra, message):
    """The signals and student do not exist: the settings must be refused before they are looked at."""
    out = tmp_path / "out"
    result = run_cli("distill", "--signals", tmp_path / "no-signals", "--student", tmp_path / "no-student",
                     "--out", out, *extra)
    assert_one_line_error(result, message)
    assert not out.exists()


def test_distill_accepts_the_edges_of_the_new_ranges():
    DistillConfig(signals=["s"], student="m", out="o", max_grad_norm=0.0, weight_decay=0.0, seed=2**32 - 1).check()
    DistillConfig(signals=["s"], student="m", out="o", max_steps=1).check()


@pytest.mark.parametrize("extra, message", [
    (["--max-steps", "0"], "distill settings of the run: --max-steps must be at least 1"),
    (["--epochs", "0"], "distill settings of the run: --epochs must be positive"),
])
def test_run_checks_its_distill_settings_like_distill(tmp_path, extra, message):
    out = tmp_path / "run"
    result = run_cli("run", "--prompts", tmp_path / "p.jsonl", "--student", "s", "--teacher", "t", "--out", out, *extra)
    assert_one_line_error(result, message)
    assert not out.exists()


# Each command's options and the config classes that hold their defaults (run: its own, then its sections').
COMMAND_CONFIGS = {"generate": [GenerateConfig], "distill": [DistillConfig], "eval": [EvalConfig],
                   "run": [RunConfig, DistillConfig, GenerateConfig]}


def config_default(name, classes):
    for cls in classes:
        for field in dataclasses.fields(cls):
            if field.name == name:
                return field.default
    raise AssertionError(f"no config field for option {name}")


@pytest.mark.parametrize("command", COMMAND_CONFIGS)
def test_help_shows_the_default_of_every_option(command):
    """Each option's help ends its text with its default or [required], and a plain default is the config
    class's: the help cannot drift from the code."""
    options = [p for p in typer.main.get_command(app).commands[command].params if p.name not in ("help", "config")]
    for option in options:
        shown = re.findall(r"\[([^\[\]]+)\]", option.help)
        assert shown, f"{command} --{option.name}: no [default] in {option.help!r}"
        value = shown[-1].split(":")[0]  # "auto: vllm with a GPU, else hf" -> auto
        default = config_default(option.name, COMMAND_CONFIGS[command])
        if default is None or (option.name, default) == ("max_steps", -1):
            continue  # no value: the help says what happens instead ("all", "none: --epochs decides")
        if value == "required":
            assert default in ("", dataclasses.MISSING), option.name
        elif isinstance(default, bool):
            assert value == ("on" if default else "off"), option.name
        elif isinstance(default, (int, float)):
            assert float(value) == default, option.name
        elif isinstance(default, str):
            assert value == default, option.name


@pytest.mark.parametrize("command", COMMAND_CONFIGS)
def test_help_renders_the_defaults(command):
    """The rendered help keeps the [defaults] (Rich markup would drop them as style tags) and shows no
    <bool> type after flags."""
    result = run_cli(command, "--help")
    assert result.exit_code == 0
    assert "[required]" in result.stdout and "<bool>" not in result.stdout
    assert not re.search(r"\s\.$", result.stdout, re.MULTILINE), result.stdout


GENERATE = {"prompts": "p.jsonl", "student": "s", "teacher": "t", "out": "o"}
EVAL = {"model": ["m"], "data": ["d.jsonl"], "out": "o"}


@pytest.mark.parametrize("cls, values, match", [
    (GenerateConfig, {**GENERATE, "temperature": float("nan")}, "--temperature must be a finite number, not nan"),
    (GenerateConfig, {**GENERATE, "top_p": float("nan")}, "--top-p must be a finite number"),
    (GenerateConfig, {**GENERATE, "gpu_memory_utilization": float("inf")}, "--gpu-memory-utilization must be a finite"),
    (GenerateConfig, {**GENERATE, "seed": -1}, SEED_RULE),
    (GenerateConfig, {**GENERATE, "seed": 2**32}, SEED_RULE),
    (EvalConfig, {**EVAL, "temperature": float("inf")}, "--temperature must be a finite number, not inf"),
    (EvalConfig, {**EVAL, "top_p": float("nan")}, "--top-p must be a finite number"),
    (EvalConfig, {**EVAL, "seed": -1}, SEED_RULE),
    (EvalConfig, {**EVAL, "seed": 2**32}, SEED_RULE),
    (GenerateConfig, {**GENERATE, "score_batch_tokens": 0}, "--score-batch-tokens must be at least 1"),
    (GenerateConfig, {**GENERATE, "tensor_parallel_size": 0}, "--tensor-parallel-size must be at least 1"),
    (GenerateConfig, {**GENERATE, "gpu_memory_utilization": 1.5}, r"--gpu-memory-utilization must be in \(0, 1\]"),
    (GenerateConfig, {**GENERATE, "max_num_batched_tokens": 0}, "--max-num-batched-tokens must be at least 1"),
    (GenerateConfig, {**GENERATE, "kv_cache_memory_bytes": -1}, "--kv-cache-memory-bytes must be at least 1"),
    (EvalConfig, {**EVAL, "kv_cache_memory_bytes": 0}, "--kv-cache-memory-bytes must be at least 1"),
])
def test_generate_and_eval_refuse_out_of_range_settings(cls, values, match):
    cfg = build_config(cls, None, values)
    with pytest.raises(TsdkdError, match=match):
        cfg.check()


@pytest.mark.parametrize("seed", [-1, 2**32 - 3])
def test_run_refuses_a_seed_that_a_round_would_push_out_of_range(seed):
    """Round r seeds its generate and distill with seed + r: with 3 rounds, 2**32 - 3 would reach 2**32."""
    cfg = RunConfig(prompts="p", student="s", teacher="t", out="o", rounds=3, seed=seed)
    with pytest.raises(TsdkdError, match=r"--seed must be in \[0, 4294967292\]: round r uses --seed \+ r"):
        cfg.check()


def test_run_accepts_the_largest_seed_its_rounds_allow():
    RunConfig(prompts="p", student="s", teacher="t", out="o", rounds=3, seed=2**32 - 4).check()


def test_yaml_floats_without_a_dot_are_read_as_floats(tmp_path):
    path = tmp_path / "distill.yaml"
    path.write_text("learning_rate: 1e-4\nselection_fraction: 5e-1\nepochs: '2'\n")
    assert yaml.safe_load(path.read_text())["learning_rate"] == "1e-4"  # PyYAML's YAML 1.1 reading
    cfg = build_config(DistillConfig, str(path), {})
    assert (cfg.learning_rate, cfg.selection_fraction, cfg.epochs) == (1e-4, 0.5, 2.0)


@pytest.mark.parametrize("line, message", [
    ("learning_rate: fast", "learning_rate = 'fast' must be a number"),
    ("batch_size: '8'", "batch_size = '8' must be a whole number"),  # only floats are read from strings
])
def test_config_strings_that_are_not_floats_are_refused(tmp_path, line, message):
    path = tmp_path / "distill.yaml"
    path.write_text(line + "\n")
    with pytest.raises(TsdkdError, match=re.escape(f"config file {path}: {message}")):
        build_config(DistillConfig, str(path), {})


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_a_config_file_that_is_not_utf8_is_refused(tmp_path, suffix):
    path = tmp_path / f"b{suffix}"
    path.write_bytes(b"\xff\xfe x")
    assert_one_line_error(run_cli("distill", "--config", path), f"config file {path} is not UTF-8", "save it as UTF-8")


def test_a_config_folder_is_refused_as_a_folder(tmp_path):
    assert_one_line_error(run_cli("distill", "--config", tmp_path), f"config file {tmp_path} is a folder; name a YAML or TOML file")


def test_an_unreadable_config_file_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "job.yaml"
    path.write_text("learning_rate: 0.001\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(path), "read_text", denied)  # root, as in CI, reads whatever chmod forbids
    assert_one_line_error(run_cli("distill", "--config", path), f"config file {path}: cannot read it (Permission denied)")


@pytest.mark.parametrize("name, text, command, message", [
    ("distill.yaml", "learning_rate: 1e-4\nepochs: 2\nlearning_rate: 3e-4\n", "distill",
     " is not valid YAML: 'learning_rate' is given twice (lines 1 and 3); keep one"),
    ("distill.yaml", "learning-rate: 1e-4\nlearning_rate: 3e-4\n", "distill",
     ": 'learning-rate' and 'learning_rate' are the same option; keep one"),
    ("distill.toml", "learning-rate = 1e-4\nlearning_rate = 3e-4\n", "distill",
     ": 'learning-rate' and 'learning_rate' are the same option; keep one"),
    ("run.yaml", "distill:\n  epochs: 1\n  epochs: 2\n", "run",
     " is not valid YAML: 'epochs' is given twice (lines 2 and 3); keep one"),
    ("run.yaml", "distill:\n  warmup-ratio: 0.1\n  warmup_ratio: 0.2\n", "run",
     ", distill section: 'warmup-ratio' and 'warmup_ratio' are the same option; keep one"),
])
def test_an_option_given_twice_in_a_config_file_is_refused(tmp_path, name, text, command, message):
    """PyYAML keeps the last of two equal keys silently, and dashes and underscores spell one option."""
    path = tmp_path / name
    path.write_text(text)
    required = ["--prompts", "p", "--student", "s", "--teacher", "t"] if command == "run" else ["--signals", "d", "--student", "s"]
    assert_one_line_error(run_cli(command, "--config", path, *required, "--out", tmp_path / "o"), f"config file {path}{message}")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "distill.yaml"
    path.write_text("base: &base\n  learning_rate: 1e-4\n  epochs: 2\njob:\n  <<: *base\n  epochs: 3\n")
    assert read_config_file(path)["job"] == {"learning_rate": "1e-4", "epochs": 3}
    # A merged mapping that overrides a merge itself, merged (so flattened) before it is built where it is written.
    path.write_text("defs:\n  b: &b\n    a: 1\n  c: &c\n    <<: *b\n    a: 2\njob:\n  <<: *c\n  epochs: 3\n")
    assert read_config_file(path) == yaml.safe_load(path.read_text())  # no key is given twice: read as PyYAML reads it


def test_run_takes_its_generate_and_distill_options_at_the_top_level_of_its_config(tmp_path):
    """As `tsdkd run --help` says: the options it shows are also top-level keys, each going into its section; the
    command line wins over the file; a key given both at the top level and in its section (with another value)
    is refused, since which one counts would be a guess."""
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-4\nnum-candidates: 2\nepochs: 2\ndistill:\n  learning-rate: 0.0001\n  warmup_ratio: 0.2\n")
    cfg = build_config(RunConfig, str(path), {"epochs": 1.0, "top_k": None})
    assert cfg.distill == {"learning_rate": 1e-4, "warmup_ratio": 0.2, "epochs": 1.0}
    assert cfg.generate == {"num_candidates": 2}
    path.write_text("learning_rate: 1e-4\ndistill:\n  learning_rate: 3e-4\n")
    with pytest.raises(TsdkdError, match="learning_rate is '1e-4' at the top level and '3e-4' in the `distill:` section; give it once"):
        build_config(RunConfig, str(path), {})


def test_run_section_options_are_the_run_command_options():
    run_options = {p.name for p in typer.main.get_command(app).commands["run"].params} - {"config", "help"}
    sectioned = {key for keys in RUN_SECTION_OPTIONS.values() for key in keys}
    assert sectioned == run_options - {field.name for field in dataclasses.fields(RunConfig)}
    for section, cls in (("generate", GenerateConfig), ("distill", DistillConfig)):
        assert set(RUN_SECTION_OPTIONS[section]) <= {field.name for field in dataclasses.fields(cls)}


@pytest.mark.parametrize("text, message", [
    ("warmup_ratio: 0.2\n", "'warmup_ratio' goes in the `distill:` section (top-level keys: backend, batch_size, distill,"),
    ("speed: 2\n", "unknown key 'speed' (did you mean 'seed'?); known keys: backend, batch_size, distill, distill_processes, epochs, "
                    "generate, learning_rate,"),
    ("generate:\n  out: x\n", "generate.out is set by `tsdkd run` itself for each round; remove it"),
    ("distill:\n  student_revision: v2\n",
     "distill.student_revision is set by `tsdkd run` for each round from its own top-level student_revision; move it there"),
])
def test_run_config_keys_in_the_wrong_place_are_refused_with_where_they_go(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    result = run_cli("run", "--config", path, "--prompts", "p", "--student", "s", "--teacher", "t", "--out", tmp_path / "o")
    assert_one_line_error(result, f"config file {path}: {message}")


def test_run_section_known_keys_leave_out_those_the_run_sets(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("generate:\n  speed: 2\n")
    with pytest.raises(TsdkdError, match=f"config file {re.escape(str(path))}, generate section: unknown key 'speed'") as error:
        build_config(RunConfig, str(path), {})
    known = str(error.value).split("known keys: ")[1].split(", ")
    assert "top_k" in known and not set(known) & ROUND_KEYS["generate"]


def test_switches_set_in_a_config_file_can_be_turned_off_on_the_command_line(tmp_path, monkeypatch):
    path = tmp_path / "distill.yaml"
    switches = ["no_indirect", "no_entropy", "no_selection", "gradient_checkpointing", "resume", "keep_checkpoints",
                "tensorboard", "renormalize_topk", "trust_remote_code"]
    path.write_text("".join(f"{name}: true\n" for name in switches))
    seen = []
    monkeypatch.setattr("stage2_distill.distill.distill", seen.append)
    off = ["--with-indirect", "--with-entropy", "--with-selection", "--no-gradient-checkpointing", "--no-resume",
           "--no-keep-checkpoints", "--no-tensorboard", "--no-renormalize-topk", "--no-trust-remote-code"]
    for given, expected in (([], True), (off, False)):
        result = run_cli("distill", "--config", path, "--signals", "d", "--student", "s", "--out", "o", *given)
        assert result.exit_code == 0, result.stderr
        assert {name: getattr(seen[-1], name) for name in switches} == dict.fromkeys(switches, expected)
    # A value setting too: hard selection from a config file, soft weights asked for on the command line.
    path.write_text("selection_fraction: 0.2\n")
    for given, expected in (([], 0.2), (["--selection-fraction", "0.5"], 0.5), (["--selection-fraction", "off"], None)):
        result = run_cli("distill", "--config", path, "--signals", "d", "--student", "s", "--out", "o", *given)
        assert result.exit_code == 0, result.stderr
        assert seen[-1].selection_fraction == expected
    # Named by its option, beside a config file too.
    for config in ([], ["--config", path]):
        assert_one_line_error(run_cli("distill", "--signals", "d", "--student", "s", "--out", "o", *config,
                                      "--selection-fraction", "half"), "error: --selection-fraction 'half' must be a number")


def test_a_repeatable_option_on_the_command_line_replacing_the_files_list_is_noted(tmp_path, capsys):
    path = tmp_path / "distill.yaml"
    path.write_text("signals: [a, b]\nstudent: s\nout: o\n")
    cfg = build_config(DistillConfig, str(path), {"signals": ["c"], "student": "t"})
    assert (cfg.signals, cfg.student) == (["c"], "t")
    assert capsys.readouterr().out == f"note: --signals on the command line replaces signals in {path} (['a', 'b']); repeat the option " \
                                      "for each one to use\n"
    build_config(DistillConfig, str(path), {"signals": ["a", "b"]})
    path.write_text("signals: a\n")  # one folder, as a string: the same list
    build_config(DistillConfig, str(path), {"signals": ["a"]})
    assert capsys.readouterr().out == ""


def test_a_bad_file_value_the_command_line_overrides_is_not_checked(tmp_path):
    path = tmp_path / "distill.yaml"
    path.write_text("learning_rate: abc\nepochs: [1]\nsignals: 5\n")
    cfg = build_config(DistillConfig, str(path), {"learning_rate": 1e-5, "epochs": 2.0, "signals": ["a"]})
    assert (cfg.learning_rate, cfg.epochs, cfg.signals) == (1e-5, 2.0, ["a"])


def test_a_refused_file_value_names_the_file_also_for_options_with_digits(tmp_path):
    path = tmp_path / "distill.yaml"
    path.write_text("bf16: maybe\n")
    result = run_cli("distill", "--config", path, "--signals", "s", "--student", "t", "--out", tmp_path / "o")
    assert_one_line_error(result, f"--bf16 (set in {path}) must be auto, on or off")
