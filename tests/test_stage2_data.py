"""Stage-2 input pipeline: every row once, values as stored, grouping, bucketing, truncation."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stage2_distill.data import SignalBatches, candidates_by_rank, collate_single
from tsdkd.errors import TsdkdError
from tsdkd.signals import (
    FORMAT_NAME, FORMAT_VERSION, MANIFEST_KEYS, MANIFEST_NAME, CandidateSignal, read_manifest, shard_path,
    signals_to_table, write_json_atomic,
)

PAD = 7


def make_dataset(folder: Path, prompts: list[tuple[int, list[int]]], k: int = 4, prompts_per_shard: int = 4,
                 row_group_size: int = 4, vocab_size: int = 300, seed: int = 0) -> Path:
    """A synthetic signal dataset: prompts given as (prompt length, [completion length per candidate]).
    Row groups are tiny so that batches read several and prompts straddle them."""
    rng = np.random.default_rng(seed)
    shards = [prompts[i : i + prompts_per_shard] for i in range(0, len(prompts), prompts_per_shard)]
    entries = []
    for index, shard in enumerate(shards):
        rows = []
        for prompt_number, (prompt_length, completion_lengths) in enumerate(shard):
            prompt = rng.integers(0, vocab_size, prompt_length).tolist()
            ranks = rng.permutation(len(completion_lengths))
            for candidate, length in enumerate(completion_lengths):
                topk = np.stack([rng.choice(vocab_size, k, replace=False) for _ in range(length)])
                rows.append(CandidateSignal(
                    prompt_id=f"{index:03d}-{prompt_number:03d}", messages=[{"role": "user", "content": "q"}],
                    prompt_token_ids=prompt, gold_answer=None, candidate_index=candidate,
                    num_candidates=len(completion_lengths), completion_token_ids=rng.integers(0, vocab_size, length),
                    completion_text="", finish_reason="stop", behaviour_logprobs=-rng.random(length),
                    teacher_logprobs=-rng.random(length), teacher_topk_ids=topk,
                    teacher_topk_logprobs=-np.sort(rng.random((length, k)) * 5, axis=-1),
                    teacher_tail_mass=rng.random(length), teacher_entropy=rng.random(length) * 3,
                    teacher_entropy_exact=True, teacher_score=-1.0, teacher_rank=int(ranks[candidate]), verified=None,
                ))
        path = shard_path(folder, index, len(shards))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(signals_to_table(rows, vocab_size), path, row_group_size=row_group_size)
        entries.append({"index": index, "file": str(path.relative_to(folder)), "rows": len(rows)})
    # Only what the reader uses is filled in; the other manifest keys just have to be present.
    manifest = {key: None for key in MANIFEST_KEYS}
    manifest.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "top_k": k, "shards": entries})
    write_json_atomic(manifest, folder / MANIFEST_NAME)
    return folder


def stored_rows(*folders: Path) -> dict[tuple[Path, int], dict]:
    """Every row of the folders, read directly with pyarrow, by (shard file, row)."""
    rows = {}
    for folder in folders:
        for entry in read_manifest(folder)["shards"]:
            path = folder / entry["file"]
            for index, row in enumerate(pq.read_table(path).to_pylist()):
                rows[(path, index)] = row
    return rows


def all_batches(dataset: SignalBatches) -> list[tuple[dict[str, torch.Tensor], list[tuple[Path, int]]]]:
    return [(dataset[i], dataset.rows(i)) for i in range(len(dataset))]


def assert_batch_matches(batch: dict[str, torch.Tensor], keys: list[tuple[Path, int]], stored: dict,
                         max_length: int | None = None) -> None:
    B, T = batch["input_ids"].shape
    L = batch["completion_mask"].shape[1]
    k = batch["teacher_topk_ids"].shape[2]
    assert len(keys) == B and batch["completion_ids"].shape == batch["teacher_entropy"].shape == (B, L)
    for b, key in enumerate(keys):
        row = stored[key]
        prompt = row["prompt_token_ids"]
        P = len(prompt)
        C = min(len(row["completion_token_ids"]), max_length - P) if max_length else len(row["completion_token_ids"])
        completion = row["completion_token_ids"][:C]
        assert batch["prompt_lengths"][b] == P
        assert batch["input_ids"][b].tolist() == prompt + completion + [PAD] * (T - P - C)
        assert batch["attention_mask"][b].tolist() == [1] * (P + C) + [0] * (T - P - C)
        assert batch["labels"][b].tolist() == [-100] * P + completion + [-100] * (T - P - C)
        # Completion token j sits at input position P + j.
        assert torch.equal(batch["input_ids"][b, P + torch.arange(C)], batch["completion_ids"][b, :C])
        assert batch["completion_mask"][b].tolist() == [True] * C + [False] * (L - C)
        assert batch["completion_ids"][b].tolist() == completion + [0] * (L - C)
        for name in ("behaviour_logprobs", "teacher_logprobs", "teacher_tail_mass", "teacher_entropy"):
            expected = np.asarray(row[name][:C], dtype=np.float32)
            assert batch[name].dtype == torch.float32
            assert np.array_equal(batch[name][b, :C].numpy(), expected) and not batch[name][b, C:].any(), name
        ids = np.asarray(row["teacher_topk_ids"][:C], dtype=np.int64).reshape(C, k)
        logprobs = np.asarray(row["teacher_topk_logprobs"][:C], dtype=np.float32).reshape(C, k)
        assert np.array_equal(batch["teacher_topk_ids"][b, :C].numpy(), ids) and not batch["teacher_topk_ids"][b, C:].any()
        assert np.array_equal(batch["teacher_topk_logprobs"][b, :C].numpy(), logprobs)
        assert not batch["teacher_topk_logprobs"][b, C:].any()
        assert batch["teacher_rank"][b] == row["teacher_rank"] and batch["candidate_index"][b] == row["candidate_index"]
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["teacher_topk_ids"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.bool and batch["teacher_topk_logprobs"].dtype == torch.float32


def padded_tokens(dataset: SignalBatches) -> int:
    return sum(int((1 - dataset[i]["attention_mask"]).sum()) for i in range(len(dataset)))


def test_every_row_once_with_stored_values(small_dataset):
    dataset = SignalBatches([small_dataset], batch_size=5, pad_token_id=PAD)
    stored = stored_rows(small_dataset)
    seen = Counter()
    for batch, keys in all_batches(dataset):
        assert_batch_matches(batch, keys, stored)
        assert len(keys) <= 5
        seen.update(keys)
    assert seen == Counter(stored.keys())
    assert len(dataset) == 8 and dataset.num_sequences == 36 and dataset.num_prompts == 12
    assert dataset.num_tokens == sum(len(row["completion_token_ids"]) for row in stored.values())
    assert dataset.num_dropped == 0


def test_synthetic_rows_across_row_groups(tmp_path):
    rng = np.random.default_rng(1)
    folder = make_dataset(tmp_path / "s", [(int(rng.integers(1, 9)), rng.integers(1, 12, 3).tolist()) for _ in range(10)])
    dataset = SignalBatches([folder], batch_size=4, pad_token_id=PAD, bucket_batches=2)
    stored = stored_rows(folder)
    seen = Counter()
    for batch, keys in all_batches(dataset):
        assert_batch_matches(batch, keys, stored)
        seen.update(keys)
    assert seen == Counter(stored.keys())


def test_candidates_by_rank_lays_out_each_prompt_best_first():
    """Unequal groups, ranks with gaps (candidates filtered out) and out of order within a prompt."""
    prompt_group = np.array([0, 0, 0, 1, 2, 2])
    teacher_rank = np.array([2, 0, 3, 1, 1, 0])
    assert candidates_by_rank(prompt_group, teacher_rank).tolist() == [[1, 0, 2], [3, -1, -1], [5, 4, -1]]


def assert_groups_whole(dataset: SignalBatches, stored: dict, prompts_per_batch: int) -> None:
    seen = Counter()
    for batch, keys in all_batches(dataset):
        groups = batch["prompt_group"].tolist()
        assert groups == sorted(groups) and set(groups) == set(range(groups[-1] + 1)) and groups[-1] < prompts_per_batch
        for group in set(groups):
            members = [key for key, g in zip(keys, groups) if g == group]
            paths, ids = {path for path, _ in members}, {stored[key]["prompt_id"] for key in members}
            assert len(paths) == len(ids) == 1
            assert sorted(batch["candidate_index"][batch["prompt_group"] == group].tolist()) == [0, 1, 2]
            # The sequence-level ranking's layout: this prompt's rows, best teacher rank first.
            layout_rows = batch["candidates_by_rank"][group].tolist()
            assert sorted(layout_rows) == [i for i, g in enumerate(groups) if g == group]
            assert [stored[keys[i]]["teacher_rank"] for i in layout_rows] == sorted(stored[key]["teacher_rank"] for key in members)
            seen[(paths.pop(), ids.pop())] += 1
    assert all(count == 1 for count in seen.values())  # no prompt split over batches
    assert sum(seen.values()) == dataset.num_prompts


def test_group_by_prompt_keeps_candidates_together(small_dataset, tmp_path):
    dataset = SignalBatches([small_dataset], batch_size=7, pad_token_id=PAD, group_by_prompt=True)
    assert len(dataset) == 6 and dataset.num_prompts == 12  # floor(7 / 3) = 2 prompts per batch
    assert_groups_whole(dataset, stored_rows(small_dataset), prompts_per_batch=2)
    # Row groups of 4 rows cut through prompts of 3 candidates.
    folder = make_dataset(tmp_path / "s", [(3, [2, 5, 4])] * 9)
    dataset = SignalBatches([folder], batch_size=6, pad_token_id=PAD, group_by_prompt=True, bucket_batches=1)
    assert_groups_whole(dataset, stored_rows(folder), prompts_per_batch=2)
    # A batch size below N still keeps a prompt whole: one prompt per batch.
    assert len(SignalBatches([folder], batch_size=2, pad_token_id=PAD, group_by_prompt=True)) == 9


def test_only_best(small_dataset):
    dataset = SignalBatches([small_dataset], batch_size=4, pad_token_id=PAD, only_best=True)
    stored = stored_rows(small_dataset)
    keys = [key for _, batch_keys in all_batches(dataset) for key in batch_keys]
    assert sorted(keys) == sorted(key for key, row in stored.items() if row["teacher_rank"] == 0)
    assert len(keys) == 12 and all(not dataset[i]["teacher_rank"].any() for i in range(len(dataset)))


def test_bucketing_reduces_padding(tmp_path):
    rng = np.random.default_rng(2)
    folder = make_dataset(tmp_path / "s", [(int(rng.integers(1, 40)), [int(rng.integers(1, 60))]) for _ in range(96)],
                          k=2, prompts_per_shard=32, row_group_size=16)
    bucketed = SignalBatches([folder], batch_size=8, pad_token_id=PAD, bucket_batches=64)
    unsorted = SignalBatches([folder], batch_size=8, pad_token_id=PAD, bucket_batches=1)
    assert padded_tokens(bucketed) < padded_tokens(unsorted) / 3
    # Minimal padding: each batch is as long as its longest sequence, its per-token signals as its longest completion.
    for index in range(len(bucketed)):
        batch = bucketed[index]
        assert bool(batch["attention_mask"].all(-1).any()) and bool(batch["completion_mask"].all(-1).any())
        assert batch["teacher_topk_ids"].shape[1] == batch["completion_mask"].shape[1]


def batch_sets(dataset: SignalBatches) -> list[frozenset]:
    return [frozenset(dataset.rows(i)) for i in range(len(dataset))]


def test_deterministic_and_epochs_reorder_the_same_batches(small_dataset):
    make = lambda seed: SignalBatches([small_dataset], batch_size=3, pad_token_id=PAD, seed=seed, bucket_batches=2)  # noqa: E731
    first, again = make(0), make(0)
    assert batch_sets(first) == batch_sets(again)
    assert all(torch.equal(first[i][name], again[i][name]) for i in range(len(first)) for name in first[i])
    epoch0 = batch_sets(first)
    first.set_epoch(1)
    assert batch_sets(first) != epoch0 and sorted(batch_sets(first), key=sorted) == sorted(epoch0, key=sorted)
    first.set_epoch(0)
    assert batch_sets(first) == epoch0
    assert set(batch_sets(make(1))) != set(epoch0)


def test_max_length_truncates_and_drops(tmp_path):
    # Prompt 8 leaves no room at max_length 8; prompt 7 leaves one completion token.
    folder = make_dataset(tmp_path / "s", [(3, [2, 9]), (8, [1, 1]), (7, [4, 1]), (5, [6, 3]), (10, [2, 2])])
    dataset = SignalBatches([folder], batch_size=3, pad_token_id=PAD, max_length=8, group_by_prompt=True)
    assert dataset.num_dropped == 4 and dataset.num_sequences == 6 and dataset.num_prompts == 3
    assert dataset.num_tokens == (2 + 5) + (1 + 1) + (3 + 3)
    stored = stored_rows(folder)
    seen = []
    for batch, keys in all_batches(dataset):
        assert batch["input_ids"].shape[1] <= 8
        assert_batch_matches(batch, keys, stored, max_length=8)
        seen += keys
    assert sorted(len(stored[key]["prompt_token_ids"]) for key in seen) == [3, 3, 5, 5, 7, 7]


def test_nothing_left_is_one_clear_error(tmp_path):
    folder = make_dataset(tmp_path / "s", [(6, [2, 2]), (9, [3, 1])])
    with pytest.raises(TsdkdError) as error:
        SignalBatches([folder], batch_size=2, pad_token_id=PAD, max_length=6)
    message = str(error.value)
    assert "\n" not in message and "a max length of 6 tokens" in message and "raise --max-length" in message and "all 4 rows dropped" in message


def test_two_folders(small_dataset, tmp_path):
    # The same prompts in two folders (say two rounds) stay two separate groups.
    copy = Path(shutil.copytree(small_dataset, tmp_path / "copy"))
    dataset = SignalBatches([small_dataset, copy], batch_size=6, pad_token_id=PAD, group_by_prompt=True)
    stored = stored_rows(small_dataset, copy)
    assert dataset.num_sequences == 72 and dataset.num_prompts == 24 and len(dataset) == 12
    assert_groups_whole(dataset, stored, prompts_per_batch=2)
    seen = Counter()
    for batch, keys in all_batches(dataset):
        assert_batch_matches(batch, keys, stored)
        seen.update(keys)
    assert seen == Counter(stored.keys())


def test_mismatched_top_k_is_refused(small_dataset, tmp_path):
    other = make_dataset(tmp_path / "s", [(3, [2, 2])], k=5)
    with pytest.raises(TsdkdError, match="top-k"):
        SignalBatches([small_dataset, other], batch_size=2, pad_token_id=PAD)


def test_dataloader_with_collate_single(small_dataset):
    dataset = SignalBatches([small_dataset], batch_size=4, pad_token_id=PAD)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_single)
    batches = list(loader)
    assert len(batches) == len(dataset)
    assert torch.equal(batches[0]["input_ids"], dataset[0]["input_ids"])


def test_batches_stream_from_the_row_groups_they_need(tmp_path, monkeypatch):
    """Never the whole dataset in memory: the index reads only the columns that size, group and rank the rows, and
    each batch reads the signal columns of the row groups its rows are in, each once, and nothing else."""
    rng = np.random.default_rng(3)
    folder = make_dataset(tmp_path / "s", [(int(rng.integers(1, 9)), rng.integers(1, 12, 3).tolist()) for _ in range(12)],
                          prompts_per_shard=6, row_group_size=4)
    whole_file_reads, row_group_reads = [], []
    opened, read, read_row_group = pq.ParquetFile.__init__, pq.ParquetFile.read, pq.ParquetFile.read_row_group

    def open_file(self, source, *args, **kwargs):
        self.test_source = Path(source)
        opened(self, source, *args, **kwargs)

    def read_whole(self, columns=None, **kwargs):
        whole_file_reads.append(set(columns or ["every column"]))
        return read(self, columns=columns, **kwargs)

    def read_group(self, index, columns=None, **kwargs):
        row_group_reads.append((self.test_source, index, frozenset(columns or ["every column"])))
        return read_row_group(self, index, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "__init__", open_file)
    monkeypatch.setattr(pq.ParquetFile, "read", read_whole)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_group)
    monkeypatch.setattr(pq, "read_table", lambda *args, **kwargs: pytest.fail("a whole table read"))
    dataset = SignalBatches([folder], batch_size=4, pad_token_id=PAD, bucket_batches=2)
    per_token_signals = {"behaviour_logprobs", "teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs",
                         "teacher_tail_mass", "teacher_entropy"}
    assert len(whole_file_reads) == 2 and not any(columns & (per_token_signals | {"every column"}) for columns in whole_file_reads)
    assert not row_group_reads
    signal_columns = {"prompt_token_ids", "completion_token_ids", *per_token_signals}
    for index in range(len(dataset)):
        row_group_reads.clear()
        dataset[index]
        needed = {(path, row // 4) for path, row in dataset.rows(index)}
        assert sorted((path, group) for path, group, _ in row_group_reads) == sorted(needed)
        assert all(columns == signal_columns for _, _, columns in row_group_reads)
    assert len(whole_file_reads) == 2
