"""`tsdkd eval` and the answer checking it shares with stage 1."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest

from conftest import TOY_STUDENT, TOY_TEACHER, assert_one_line_error, run_cli
from tsdkd.answers import answer_is_correct, extract_answer, gold_final_answer, unmarked_solution
from tsdkd.evaluate import comparison_table
from tsdkd.prompts import load_prompts

EVAL = ["--max-new-tokens", "24", "--backend", "hf"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12 + 7 = 19\n19 * 3 = 57\nAnswer: 57", "57"),
        ("so the result is \\boxed{\\frac{1}{2}} and \\boxed{x^{2}+1}", "x^{2}+1"),
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("The answer is 1,234.", "1,234"),
        ("first 3, then 7", "7"),
        ("no digits at all", None),
        ("He answers 7 questions, then 9", "9"),  # "answers" marks nothing
        ("To get the answer, add 5 and 3.\n5 + 3 = 8", "8"),  # nor does "answer" without "is", ":" or "="
        ("Therefore, the answer is 72 clips.", "72"),  # the things counted are not the answer
        ("The answer is 72. I hope it is correct.", "72"),  # it ends at a sentence's end
        ("The answer is 5. Then 5 + 3 = 8.", "5"),
        ("Answer: 381. The other options are 100 and 200.", "381"),
        ("Answer: $\\frac{1}{2}$. Done.", "\\frac{1}{2}"),
        ("The answer is:\n\n$\\frac{3}{4}$", "\\frac{3}{4}"),  # on the next line that holds something
        ("Answer:\n(B)", "(B)"),
        ("The answer is 25 degrees.", "25"),
        ("Answer: 2 and a half hours", "2 and a half hours"),  # words that change the value stay
        ("Answer: 6 hundred", "6 hundred"),
        ("The answer is 3 x", "3 x"),
        ("Answer:\nLet me think. 3+4 = 7", "7"),  # prose on the next line is reasoning: the last number
        ("**Answer:**\nThe answer is 18.", "18"),  # a mark inside it still counts
        ("The answer is 6 times.", "6"),
        ("The answer is 6 g of sugar", "6"),
        ("The answer is 3 quarters", "3"),
    ],
)
def test_extraction(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "gold, response, correct",
    [
        ("57", "Answer: 57", True),
        ("57", "Answer: 58", False),
        ("#### 1,234", "The answer is 1234", True),
        ("\\frac{1}{2}", "the answer is 0.5", True),
        ("We find \\boxed{3}.", "so we get 3", True),
        ("52", "Answer: 52.0", True),
        ("52", "nothing", False),
        ("6 + 12 = 18\n18 - 18 = 0\nAnswer: 0", "Answer: 0", True),  # a solution marked like the toy data's
        ("6 + 12 = 18\n18 - 18 = 0\nThe answer is 0.", "so 0", True),
        ("\\text{no answer}", "so \\boxed{\\text{no answer}}", True),  # a bare gold answer with the word in it
        ("To answer it, add: 3 + 4 = 7\nThen double it: 14", "14", False),  # no line starts with the mark: compared whole
        ("4 * 3 = 12\nThe answer is: B", "Answer: B", True),  # MetaMathQA's mark
        ("Final Answer: The final answer is $\\$5$. I hope it is correct.", "The answer is $\\$5$", True),  # alike on both sides
        ("\\$18.90", "so the answer is $18.90", True),
        ("72", "Therefore, the answer is 72 clips.", True),
        ("2", "Answer: 2 and a half hours", False),
        ("\\frac{3}{4}", "The answer is:\n\\[ \\frac{3}{4} \\]", True),
        ("#### 2 and a half", "#### 2", False),
        ("4 * 3 = 12\nThe answer is 12 cm. Then we stop.", "The answer is 12 square centimetres", True),
    ],
)
def test_equivalence(gold, response, correct):
    assert answer_is_correct(gold, response) is correct


@pytest.mark.parametrize("gold, read", [
    ("4 * 3 = 12\nAnswer: 12", "12"),
    ("4 * 3 = 12\nThe answer is 12.", "12"),
    ("4 * 3 = 12\nThe answer is: B", "B"),
    ("4 * 3 = 12\n**Final answer:** 12", "12"),
    ("4 * 3 = 12\n**Answer: 12**", "12"),
    ("4 * 3 = 12\nAnswer: **12**", "12"),
    ("4 * 3 = 12\nAnswer: $\\frac{1}{2}$", "\\frac{1}{2}"),
    ("4 * 3 = 12\r\nAnswer: 12\r\n", "12"),
    ("\\text{no answer}", "\\text{no answer}"),  # a bare answer with the word in it
    ("To answer it, add: 3 + 4 = 7\nThen double it: 14", None),  # no line starts with the mark
    ("4 * 3 = 12\nThe answer is:\n12", None),  # the mark's line holds no answer
    ("4 * 3 = 12\nAnswer: \n12", None),
    ("4 * 3 = 12\nFinal Answer: The final answer is $12$. I hope it is correct.", "12"),  # Minerva's, marked twice
    ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("4 * 3 = 12\nThe answer is 12 because 4 * 3 = 12.", "12"),
    ("4 * 3 = 12\nThe answer is 12. It is even.", "12"),
    ("4 * 3 = 12\nThe answer is 1.5 since 3 / 2 = 1.5", "1.5"),
    ("4 * 3 = 12\nAnswer: x + 1", "x + 1"),
    ("Final Answer: The final answer is $\\$18.90$. I hope it is correct.", "\\$18.90"),  # an escaped dollar inside
    ("Final Answer: The final answer is $5\\text{ ft. }3\\text{ in.}$. I hope it is correct.", "5\\text{ ft. }3\\text{ in.}"),
    ("Answer: Dr. Smith", "Dr. Smith"),  # a full stop after a letter ends nothing
    ("The answer is 3 a.m. on Monday", "3 a.m. on Monday"),
    ("The answer is x = 3.5. Then y = 2.", "x = 3.5"),
    ("4 * 3 = 12\nAnswer: $12.50", "12.50"),  # a currency dollar, not closed
    ("The answer is: $18.90. She pays it.", "18.90"),
    ("Answer: $$\\frac12$$", "\\frac12"),
    ("Answer: 25%. So it is a quarter.", "25%"),
    ("The answer is 12 cm. Then we stop.", "12"),  # a number and words: the number
    ("Answer: U.S. Army", "U.S. Army"),
])
def test_the_answer_a_gold_solution_marks(gold, read):
    """None: unmarked, so compared whole; refused when it has several lines and its field was found by itself."""
    assert (gold_final_answer(gold), unmarked_solution(gold)) == ((read, False) if read else (gold.strip(), True))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_items(n=6):
    rows = [json.loads(line) for line in (TOY_TEACHER.parent / "toy" / "test_id.jsonl").read_text().splitlines()[:n]]
    return rows


def test_accuracy_is_computed_from_the_responses(tmp_path):
    """Gold answers set to what the model says (then to a number it never says): 100% and 0%."""
    first = tmp_path / "first"
    options = ["--max-new-tokens", "64", "--backend", "hf"]
    assert run_cli("eval", "--model", TOY_TEACHER, "--data", write_jsonl(tmp_path / "bench.jsonl", toy_items(12)),
                   "--out", first, *options).exit_code == 0
    items = [json.loads(line) for line in (first / "bench.jsonl").read_text().splitlines()]
    answered = [(row, item["extracted"][0]) for row, item in zip(toy_items(12), items) if item["extracted"][0] is not None]
    assert answered, "the model gave no answer to check against"
    right = [{"prompt": row["prompt"], "answer": answer} for row, answer in answered]
    wrong = [{"prompt": row["prompt"], "answer": "987654321"} for row, _ in answered]
    out = tmp_path / "second"
    result = run_cli("eval", "--model", TOY_TEACHER, "--data", write_jsonl(tmp_path / "right.jsonl", right),
                     "--data", write_jsonl(tmp_path / "wrong.jsonl", wrong), "--out", out, *options)
    assert result.exit_code == 0, result.stderr
    results = json.loads((out / "results.json").read_text())["benchmarks"]
    assert results["right"]["accuracy"] == 1.0 and results["wrong"]["accuracy"] == 0.0
    assert "| right | " in result.stdout and "100.0%" in result.stdout


def test_a_benchmark_folder_is_scored_on_its_test_split(tmp_path):
    """A Hub download of a benchmark holds train and test: eval reads the test split, never the training questions."""
    folder = tmp_path / "bench"
    folder.mkdir()
    items = toy_items(5)
    write_jsonl(folder / "train.jsonl", items[:3])
    write_jsonl(folder / "test.jsonl", items[3:])
    out = tmp_path / "out"
    assert run_cli("eval", "--model", TOY_STUDENT, "--data", folder, "--out", out, *EVAL).exit_code == 0
    scored = [json.loads(line)["prompt"] for line in (out / "bench.jsonl").read_text().splitlines()]
    assert scored == [item["prompt"] for item in items[3:]]


def test_gsm8k_and_math_fields(tmp_path):
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}])
    math = write_jsonl(tmp_path / "math.jsonl", [{"problem": "What is 2 + 3?", "solution": "It is $\\boxed{5}$."}])
    out = tmp_path / "out"
    assert run_cli("eval", "--model", TOY_STUDENT, "--data", gsm8k, "--data", math, "--out", out, *EVAL).exit_code == 0
    for name in ("gsm8k", "math"):
        item = json.loads((out / f"{name}.jsonl").read_text())
        assert item["gold"] == "5" and item["prompt"] == "What is 2 + 3?"


def test_pass_at_k(tmp_path):
    out = tmp_path / "out"
    result = run_cli("eval", "--model", TOY_STUDENT, "--data", write_jsonl(tmp_path / "b.jsonl", toy_items(4)),
                     "--out", out, "--samples", "3", *EVAL)
    assert result.exit_code == 0, result.stderr
    row = json.loads((out / "results.json").read_text())["benchmarks"]["b"]
    items = [json.loads(line) for line in (out / "b.jsonl").read_text().splitlines()]
    assert all(len(item["responses"]) == 3 for item in items)
    assert row["pass@3"] == sum(any(item["correct"]) for item in items) / 4
    assert row["accuracy"] == sum(sum(item["correct"]) for item in items) / 12


def test_several_models_are_compared_with_the_same_settings(tmp_path):
    """--model twice: each model's results equal its own single-model run; one table compares them."""
    bench = write_jsonl(tmp_path / "b.jsonl", toy_items(8))
    options = ["--data", bench, "--max-new-tokens", "48", "--backend", "hf"]
    both = run_cli("eval", "--model", TOY_STUDENT, "--model", TOY_TEACHER, "--out", tmp_path / "both", *options)
    assert both.exit_code == 0, both.stderr
    comparison = json.loads((tmp_path / "both" / "comparison.json").read_text())["models"]
    assert list(comparison) == ["1-toy-student", "2-toy-teacher"]
    for label, model in zip(comparison, (TOY_STUDENT, TOY_TEACHER)):
        assert run_cli("eval", "--model", model, "--out", tmp_path / label, *options).exit_code == 0
        alone = json.loads((tmp_path / label / "results.json").read_text())
        assert comparison[label] == alone == json.loads((tmp_path / "both" / label / "results.json").read_text())
        row = alone["benchmarks"]["b"]
        assert f"| {label} ({model}) | {100 * row['accuracy']:.1f}% | {100 * row['stopped_fraction']:.1f}% |" in both.stdout
        assert (tmp_path / "both" / label / "b.jsonl").read_text() == (tmp_path / label / "b.jsonl").read_text()


def test_the_comparison_table_shows_what_one_models_table_does():
    """pass@k and the share stopped at EOS, per benchmark, next to accuracy: a model that never stops shows there."""
    def results(model, accuracy, stopped):
        return {"settings": {"samples": 4}, "model": model, "benchmarks": {
            name: {"items": 8, "accuracy": accuracy, "pass@4": 2 * accuracy, "stopped_fraction": stopped} for name in ("gsm", "math")}}

    table = comparison_table({"models": {"1-a": results("a", 0.25, 1.0), "2-b": results("b", 0.125, 0.0)}}).splitlines()
    assert table[0] == "| model | gsm | gsm pass@4 | gsm stopped at EOS | math | math pass@4 | math stopped at EOS |"
    assert table[2:] == ["| 1-a (a) | 25.0% | 50.0% | 100.0% | 25.0% | 50.0% | 100.0% |",
                         "| 2-b (b) | 12.5% | 25.0% | 0.0% | 12.5% | 25.0% | 0.0% |"]


def test_vllm_greedy_equals_hf_greedy(tmp_path):
    bench = write_jsonl(tmp_path / "b.jsonl", toy_items(4))
    for backend in ("hf", "vllm"):
        args = ["--max-new-tokens", "24", "--backend", backend, "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 27)]
        result = run_cli("eval", "--model", TOY_TEACHER, "--data", bench, "--out", tmp_path / backend, *args)
        assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    hf, vllm = ([json.loads(line)["responses"] for line in (tmp_path / b / "b.jsonl").read_text().splitlines()] for b in ("hf", "vllm"))
    assert hf == vllm


def test_bad_input(tmp_path):
    no_answer = write_jsonl(tmp_path / "noanswer.jsonl", [{"prompt": "2 + 2?"}])
    assert_one_line_error(run_cli("eval", "--model", TOY_STUDENT, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "o"), "not found")
    assert_one_line_error(run_cli("eval", "--model", TOY_STUDENT, "--data", no_answer, "--out", tmp_path / "o"), "no gold answer")
    assert_one_line_error(run_cli("eval", "--model", TOY_STUDENT, "--data", no_answer, "--out", tmp_path / "o", "--samples", "2",
                                  "--temperature", "0"), "--samples above 1")
    assert_one_line_error(run_cli("eval", "--model", tmp_path / "nomodel", "--data", no_answer, "--out", tmp_path / "o"), "no such model folder")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same_names = [write_jsonl(tmp_path / folder / "bench.jsonl", [{"prompt": "1?", "answer": "1"}]) for folder in ("a", "b")]
    result = run_cli("eval", "--model", TOY_STUDENT, "--data", same_names[0], "--data", same_names[1], "--out", tmp_path / "o", *EVAL)
    assert_one_line_error(result, "two benchmark files")
    assert not (tmp_path / "o").exists()


def eval_files(folder):
    """Every file under `folder` and its bytes, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_results_record_the_settings_and_a_rerun_replaces_the_whole_eval(tmp_path, monkeypatch):
    """Same settings: evaluated again and swapped in whole (nothing of the old set is left beside it), while what the
    user kept beside the results (notes, plots) stays. The models and data may be named by other paths."""
    bench = write_jsonl(tmp_path / "b.jsonl", toy_items(4))
    out = tmp_path / "ev"
    args = ["eval", "--model", TOY_STUDENT, "--model", TOY_TEACHER, "--data", bench, "--out", out, "--limit", "3", *EVAL]
    assert run_cli(*args).exit_code == 0
    before = eval_files(out)
    assert "tsdkd_eval.json" in before and "comparison.json" in before and "1-toy-student/b.jsonl" in before
    settings = json.loads((out / "1-toy-student" / "results.json").read_text())["settings"]
    assert (settings["data"], settings["limit"], settings["max_new_tokens"]) == ([str(bench)], 3, 24)
    record = json.loads((out / "tsdkd_eval.json").read_text())
    assert record["settings"]["model"] == [str(TOY_STUDENT), str(TOY_TEACHER)] and len(record["data_sha256"]) == 1
    from tsdkd.loading import gpu_has_bf16

    assert record["backend"] == {"name": "hf", "dtype": "bfloat16" if gpu_has_bf16() else "float32"}  # --dtype auto, as run
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    (out / "1-toy-student" / "stale.jsonl").write_text("{}\n")
    (out / "notes.md").write_text("mine\n")
    (out / "plots").mkdir()
    (out / "plots" / "accuracy.svg").write_text("<svg/>\n")
    out.chmod(0o750)  # the user's choice, kept
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert "replaced" in result.stdout
    kept = {"notes.md": b"mine\n", "plots/accuracy.svg": b"<svg/>\n"}
    assert eval_files(out) == {**before, **kept}  # greedy: the same results, the stale file gone, the notes kept
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(a, tmp_path) if isinstance(a, Path) else a for a in args]
    result = run_cli(*relative)
    assert result.exit_code == 0 and "replaced" in result.stdout, result.stderr


def test_ctrl_c_while_the_results_are_moved_in_waits_for_them(tmp_path, monkeypatch):
    """Ctrl-C between the renames of the swap would strand the kept files in the hidden folder: it waits until the
    results are in, and is then taken."""
    import tsdkd.evaluate

    bench = write_jsonl(tmp_path / "b.jsonl", toy_items(2))
    out = tmp_path / "ev"
    args = ["eval", "--model", TOY_STUDENT, "--data", bench, "--out", out, *EVAL]
    assert run_cli(*args).exit_code == 0
    before = eval_files(out)
    (out / "notes.md").write_text("mine\n")
    replace = os.replace

    def interrupted_replace(source, target):
        if Path(target).name.startswith(".ev.previous-"):  # the previous eval moved aside: the swap has begun
            os.kill(os.getpid(), signal.SIGINT)
        replace(source, target)

    monkeypatch.setattr(tsdkd.evaluate.os, "replace", interrupted_replace)
    result = run_cli(*args)
    assert result.exit_code == 130, (result.stderr, result.exception)  # then taken: a loop of evals stops
    assert result.stderr.splitlines()[-2:] == [
        f"SIGINT came while the finished results were moved into {out}; they are complete there",
        "interrupted; --out holds complete evals only (this one if it said so above); rerun the same command to "
        "evaluate again from the start"]
    assert eval_files(out) == {**before, "notes.md": b"mine\n"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_eval_folder_that_cannot_be_written_is_refused_before_the_eval(tmp_path, monkeypatch):
    """Its files could not be replaced, nor the user's kept ones moved back (root, as in CI, writes anywhere: the
    permission is faked)."""
    bench = write_jsonl(tmp_path / "b.jsonl", toy_items(2))
    out = tmp_path / "ev"
    args = ["eval", "--model", TOY_STUDENT, "--data", bench, "--out", out, *EVAL]
    assert run_cli(*args).exit_code == 0
    before = eval_files(out)
    monkeypatch.setattr("tsdkd.evaluate.os.access", lambda path, mode: Path(path) != out)
    assert_one_line_error(run_cli(*args), f"--out {out} is not writable; make it so, or choose another --out")
    assert eval_files(out) == before


def test_an_out_holding_something_else_or_another_eval_is_refused_untouched(tmp_path):
    bench = write_jsonl(tmp_path / "b.jsonl", toy_items(2))
    out = tmp_path / "ev"
    assert run_cli("eval", "--model", TOY_STUDENT, "--data", bench, "--out", out, *EVAL).exit_code == 0
    before = eval_files(out)
    result = run_cli("eval", "--model", TOY_STUDENT, "--data", bench, "--out", out, "--max-new-tokens", "16", "--backend", "hf")
    assert_one_line_error(result, f"--out {out} holds an eval with other settings", "max_new_tokens: 24 there, 16 now",
                          "choose another --out")
    assert eval_files(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    result = run_cli("eval", "--model", TOY_STUDENT, "--data", bench, "--out", other, *EVAL)
    assert_one_line_error(result, f"--out {other} is not empty and holds no eval", "choose a new or empty folder")
    assert list(eval_files(other)) == ["notes.txt"]


def test_results_that_cannot_be_moved_in_are_kept_and_named(tmp_path, monkeypatch):
    """An --out that cannot be renamed (a mount point) must not cost the finished results."""
    import tsdkd.evaluate

    bench = write_jsonl(tmp_path / "b.jsonl", toy_items(2))
    out = tmp_path / "ev"

    def busy(staging, target):
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(tsdkd.evaluate, "swap_in", busy)
    result = run_cli("eval", "--model", TOY_STUDENT, "--data", bench, "--out", out, *EVAL)
    # The models ran (their progress bars are on stderr too), so the error is the last line.
    last = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith("error: ") and "cannot move the finished results in (Device or resource busy); they are in" in last
    kept = Path(last.rsplit("they are in ", 1)[1])
    assert (kept / "results.json").is_file() and (kept / "tsdkd_eval.json").is_file()


def test_an_interrupted_eval_leaves_out_as_it_was_and_says_it_starts_over(tmp_path, monkeypatch):
    import tsdkd.evaluate

    bench = write_jsonl(tmp_path / "b.jsonl", toy_items(2))
    out = tmp_path / "ev"
    args = ["eval", "--model", TOY_STUDENT, "--model", TOY_TEACHER, "--data", bench, "--out", out, *EVAL]
    assert run_cli(*args).exit_code == 0
    before = eval_files(out)
    calls = []

    def interrupted_on_the_second_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = tsdkd.evaluate.run_benchmark
    monkeypatch.setattr(tsdkd.evaluate, "run_benchmark", interrupted_on_the_second_model)
    result = run_cli(*args)
    assert result.exit_code == 130
    assert "interrupted; --out holds complete evals only (this one if it said so above); rerun the same command to " \
           "evaluate again from the start" in result.stderr
    assert "to continue" not in result.stderr
    assert eval_files(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("answer", ["", "  \n"])
def test_an_empty_gold_answer_is_a_missing_one(tmp_path, answer):
    rows = [{"prompt": "1 + 1?", "answer": "2"}, {"prompt": "2 + 2?", "answer": "4"}, {"prompt": "3 + 3?", "answer": answer}]
    bench = write_jsonl(tmp_path / "b.jsonl", rows)
    assert [r.gold_answer for r in load_prompts(bench, None, None, None)] == ["2", "4", None]  # generate reads these too
    result = run_cli("eval", "--model", TOY_STUDENT, "--data", bench, "--out", tmp_path / "o", *EVAL)
    assert_one_line_error(result, f"{bench} line 3: no gold answer; fill it in or remove the row")
    assert not (tmp_path / "o").exists()


def test_a_folder_that_is_not_a_model_is_named_with_what_it_lacks(tmp_path):
    bench = write_jsonl(tmp_path / "b.jsonl", toy_items(2))
    data_folder = TOY_TEACHER.parent / "toy"
    result = run_cli("eval", "--model", data_folder, "--data", bench, "--out", tmp_path / "o", *EVAL)
    assert_one_line_error(result, f"--model {data_folder}: no tokenizer files (tokenizer.json / tokenizer_config.json)",
                          "is it a model folder?", "save_pretrained")
    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    for file in TOY_STUDENT.iterdir():
        if file.suffix != ".safetensors":
            (bin_only / file.name).write_bytes(file.read_bytes())
    (bin_only / "pytorch_model.bin").write_bytes(b"weights")
    result = run_cli("eval", "--model", bin_only, "--data", bench, "--out", tmp_path / "o", *EVAL)
    assert_one_line_error(result, f"{bin_only}: no .safetensors weights; tsdkd loads safetensors only (convert with save_pretrained)")
    assert not (tmp_path / "o").exists()


def test_a_model_whose_tokenizer_has_no_eos_is_evaluated(tmp_path):
    """No stop id from the tokenizer (nor a pad token), none of the model's own either: every response runs to
    --max-new-tokens."""
    import shutil

    model = tmp_path / "no-eos"
    shutil.copytree(TOY_STUDENT, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None, "pad_token": None}))
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({k: v for k, v in generation.items() if k != "eos_token_id"}))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "eos_token_id": None}))
    out = tmp_path / "out"
    result = run_cli("eval", "--model", model, "--data", write_jsonl(tmp_path / "b.jsonl", toy_items(2)), "--out", out, *EVAL)
    assert result.exit_code == 0, (result.stderr[-2000:], result.exception)
    assert json.loads((out / "results.json").read_text())["benchmarks"]["b"]["stopped_fraction"] == 0.0
