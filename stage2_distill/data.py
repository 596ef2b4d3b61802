"""The stage-2 input pipeline: length-bucketed micro-batches read lazily from signal datasets.

Each item of `SignalBatches` is a whole, collated micro-batch, so a DataLoader (or the transformers
Trainer) runs over it with batch size 1 and `collate_single`. Only a small index of cheap columns
lives in memory; the per-token teacher signal is read from the Parquet row groups a batch needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from tsdkd.errors import TsdkdError
from tsdkd.signals import read_manifest

IGNORE_INDEX = -100  # the label torch's cross-entropy and the transformers models skip

_INDEX_COLUMNS = ["prompt_id", "candidate_index", "teacher_rank", "prompt_token_ids", "completion_token_ids"]
_TOKEN_COLUMNS = ["behaviour_logprobs", "teacher_logprobs", "teacher_tail_mass", "teacher_entropy"]
_TOPK_COLUMNS = ["teacher_topk_ids", "teacher_topk_logprobs"]
_READ_COLUMNS = ["prompt_token_ids", "completion_token_ids", *_TOKEN_COLUMNS, *_TOPK_COLUMNS]


def _numpy(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False) if isinstance(array, pa.Array) else array.to_numpy()


def _flat(column: pa.ChunkedArray, depth: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The values of a list column as one numpy array, and each row's length."""
    array = column.combine_chunks()
    lengths = _numpy(pc.list_value_length(array)).astype(np.int64)
    for _ in range(depth):
        array = array.flatten()  # respects the offsets of a taken or sliced array
    return _numpy(array), lengths


def _scatter(values: np.ndarray, lengths: np.ndarray, keep: np.ndarray, shift: np.ndarray, out: np.ndarray) -> None:
    """Write row b's first keep[b] values at out[b, shift[b]:], for all rows at once."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    positions = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    kept = positions < keep[rows]
    out[rows[kept], positions[kept] + shift[rows[kept]]] = values[kept]


def candidates_by_rank(prompt_group: np.ndarray, teacher_rank: np.ndarray) -> np.ndarray:
    """Each prompt's rows of a batch, best teacher rank first, then -1: [prompts, most candidates].
    prompt_group numbers the batch's prompts 0..P-1 (the sequence-level ranking's layout)."""
    order = np.lexsort((teacher_rank, prompt_group))
    sizes = np.bincount(prompt_group)
    slots = np.arange(len(order)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    layout = np.full((len(sizes), sizes.max(initial=0)), -1, dtype=np.int64)
    layout[prompt_group[order], slots] = order
    return layout


class SignalBatches(torch.utils.data.Dataset):
    """Micro-batches of candidates (or of whole prompts, with group_by_prompt) from signal datasets.

    The batches are made once, from `seed`: units (sequences, or prompts) are shuffled, sorted by length within
    windows of `bucket_batches` batches (so a batch holds sequences of similar length and little padding), and cut
    into batches of as many whole units as `batch_size` sequences hold, at least one; `set_epoch` only reorders them.
    """

    def __init__(
        self,
        folders: list[Path],
        batch_size: int,
        pad_token_id: int,
        max_length: int | None = None,
        group_by_prompt: bool = False,
        only_best: bool = False,
        seed: int = 0,
        bucket_batches: int = 64,
    ) -> None:
        if batch_size < 1 or bucket_batches < 1:
            raise TsdkdError(f"batch_size ({batch_size}) and bucket_batches ({bucket_batches}) must be at least 1")
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.top_k = self._check_top_k(folders)
        self._paths: list[Path] = []
        self._row_group_starts: list[np.ndarray] = []
        self._handles: dict[int, pq.ParquetFile] = {}
        self._handles_pid = os.getpid()

        shard, row, group, prompt_len, completion_len, rank, candidate = self._build_index(folders)
        keep = rank == 0 if only_best else np.ones(len(row), dtype=bool)
        self.num_dropped = self.num_cut = 0
        if max_length is not None:
            # The candidates of a prompt share its prompt, so a prompt's group is dropped whole.
            fits = prompt_len < max_length
            self.num_dropped = int((keep & ~fits).sum())
            keep &= fits
            self.num_cut = int((keep & (prompt_len + completion_len > max_length)).sum())
            completion_len = np.minimum(completion_len, max_length - prompt_len)
        if not keep.any():
            where = ", ".join(map(str, folders))
            if self.num_dropped:
                raise TsdkdError(
                    f"no training rows left in {where} with a max length of {max_length} tokens: all {self.num_dropped} rows "
                    "dropped because the prompt alone leaves no room for a completion token; raise --max-length"
                )
            raise TsdkdError(f"no training rows in {where}")

        self._shard, self._row = shard[keep], row[keep]
        self._prompt_len, self._completion_len = prompt_len[keep], completion_len[keep]
        self._rank, self._candidate = rank[keep], candidate[keep]
        self._group = group = group[keep]
        group_starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        # Kept rows are in (shard, row) order, so a unit is a contiguous range of them.
        self._unit_starts = np.r_[group_starts if group_by_prompt else np.arange(len(group)), len(group)]
        self.num_prompts = len(group_starts)
        # The most sequences of a unit (a prompt's candidates, with group_by_prompt); a batch holds as many whole
        # units as batch_size sequences do, at least one.
        self.largest_unit = int(np.diff(self._unit_starts).max())
        self._batches = self._make_batches(max(1, batch_size // self.largest_unit), bucket_batches)
        self.set_epoch(0)

    @staticmethod
    def _check_top_k(folders: list[Path]) -> int:
        widths = {str(folder): read_manifest(Path(folder))["top_k"] for folder in folders}
        if not widths:
            raise TsdkdError("no signal dataset folders given")
        if len(set(widths.values())) > 1:
            raise TsdkdError(f"the folders have different teacher top-k widths ({widths}); train on one width at a time")
        return next(iter(widths.values()))

    def _build_index(self, folders: list[Path]) -> tuple[np.ndarray, ...]:
        """Per row: shard, row in shard, prompt group, prompt and completion length, rank, candidate index."""
        columns: list[list[np.ndarray]] = [[] for _ in range(7)]
        groups_so_far = 0
        for folder in folders:
            for entry in read_manifest(Path(folder))["shards"]:
                path = Path(folder) / entry["file"]
                with pq.ParquetFile(path) as file:
                    table = file.read(columns=_INDEX_COLUMNS)
                    sizes = [file.metadata.row_group(i).num_rows for i in range(file.metadata.num_row_groups)]
                self._row_group_starts.append(np.cumsum([0, *sizes]))
                # A prompt's candidates are consecutive rows of one shard: a new prompt id starts a group.
                prompt_ids = table.column("prompt_id").combine_chunks()
                new = np.r_[True, _numpy(pc.not_equal(prompt_ids[1:], prompt_ids[:-1])).astype(bool)] if len(table) else np.zeros(0, bool)
                values = [
                    np.full(len(table), len(self._paths), dtype=np.int32),
                    np.arange(len(table), dtype=np.int64),
                    groups_so_far + np.cumsum(new) - 1,
                    _numpy(pc.list_value_length(table.column("prompt_token_ids"))).astype(np.int64),
                    _numpy(pc.list_value_length(table.column("completion_token_ids"))).astype(np.int64),
                    _numpy(table.column("teacher_rank")).astype(np.int64),
                    _numpy(table.column("candidate_index")).astype(np.int64),
                ]
                for column, value in zip(columns, values):
                    column.append(value)
                groups_so_far += int(new.sum())
                self._paths.append(path)
        return tuple(np.concatenate(column) if column else np.zeros(0, np.int64) for column in columns)

    def _make_batches(self, units_per_batch: int, bucket_batches: int) -> list[np.ndarray]:
        starts = self._unit_starts[:-1]
        # A batch pads to its longest sequence, so a unit sorts by its longest row.
        lengths = np.maximum.reduceat(self._prompt_len + self._completion_len, starts)
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(starts))
        window = bucket_batches * units_per_batch
        batches = []
        for begin in range(0, len(order), window):
            units = order[begin : begin + window]
            units = units[np.argsort(lengths[units], kind="stable")]
            batches += [units[i : i + units_per_batch] for i in range(0, len(units), units_per_batch)]
        return batches

    def set_epoch(self, epoch: int) -> None:
        """Reorder the same batches, seeded by (seed, epoch)."""
        self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self._batches))

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def num_sequences(self) -> int:
        return len(self._row)

    @property
    def num_tokens(self) -> int:
        """Completion tokens per epoch, after truncation to max_length: the tokens the losses see."""
        return int(self._completion_len.sum())

    def _batch_rows(self, index: int) -> np.ndarray:
        """Indices into the kept rows, in (shard, row) order so each prompt's rows stay consecutive."""
        units = np.sort(self._batches[self._order[index]])
        starts, ends = self._unit_starts[units], self._unit_starts[units + 1]
        return np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])

    def rows(self, index: int) -> list[tuple[Path, int]]:
        """(shard file, row in shard) of each sequence of batch `index`, in batch order: for debugging."""
        rows = self._batch_rows(index)
        return [(self._paths[s], int(r)) for s, r in zip(self._shard[rows], self._row[rows])]

    def _file(self, shard: int) -> pq.ParquetFile:
        if self._handles_pid != os.getpid():  # a forked DataLoader worker must not share the parent's handles
            self._handles, self._handles_pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = pq.ParquetFile(self._paths[shard])
        return self._handles[shard]

    def __getstate__(self) -> dict[str, Any]:
        # Open files do not pickle (spawned DataLoader workers); each process opens its own.
        return {**self.__dict__, "_handles": {}}

    def _read(self, rows: np.ndarray) -> pa.Table:
        """The signal columns of the given kept rows, in that order (they are in (shard, row) order)."""
        pieces = []
        shards, local = self._shard[rows], self._row[rows]
        for shard in np.unique(shards):
            wanted = local[shards == shard]
            starts = self._row_group_starts[shard]
            row_groups = np.searchsorted(starts, wanted, side="right") - 1
            for row_group in np.unique(row_groups):
                table = self._file(int(shard)).read_row_group(int(row_group), columns=_READ_COLUMNS)
                pieces.append(table.take(wanted[row_groups == row_group] - starts[row_group]))
        # Folders may store ids as uint16 or int32; "permissive" widens them to one type.
        return pa.concat_tables(pieces, promote_options="permissive")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rows = self._batch_rows(index)
        table = self._read(rows)
        prompt_len, completion_len = self._prompt_len[rows], self._completion_len[rows]
        B, T, L, k = len(rows), int((prompt_len + completion_len).max()), int(completion_len.max()), self.top_k
        no_shift = np.zeros(B, dtype=np.int64)

        input_ids = np.full((B, T), self.pad_token_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        completion_ids = np.zeros((B, L), dtype=np.int64)
        prompt_values, prompt_lengths = _flat(table.column("prompt_token_ids"))
        _scatter(prompt_values, prompt_lengths, prompt_lengths, no_shift, input_ids)
        completion_values, lengths = _flat(table.column("completion_token_ids"))
        _scatter(completion_values, lengths, completion_len, prompt_len, input_ids)
        _scatter(completion_values, lengths, completion_len, prompt_len, labels)
        _scatter(completion_values, lengths, completion_len, no_shift, completion_ids)

        batch = {}
        for name in _TOKEN_COLUMNS:
            out = np.zeros((B, L), dtype=np.float32)
            _scatter(*_flat(table.column(name)), completion_len, no_shift, out)
            batch[name] = torch.from_numpy(out)
        for name, dtype in zip(_TOPK_COLUMNS, (np.int64, np.float32)):
            values, _ = _flat(table.column(name), depth=2)
            out = np.zeros((B, L, k), dtype=dtype)
            _scatter(values.reshape(-1, k), lengths, completion_len, no_shift, out)
            batch[name] = torch.from_numpy(out)

        positions = np.arange(T)
        # Rows are in (shard, row) order, so a prompt's rows are consecutive and groups count up.
        prompt_group = np.unique(self._group[rows], return_inverse=True)[1].astype(np.int64)
        teacher_rank = self._rank[rows]
        return {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy((positions < (prompt_len + completion_len)[:, None]).astype(np.int64)),
            "labels": torch.from_numpy(labels),
            "prompt_lengths": torch.from_numpy(prompt_len),
            "completion_mask": torch.from_numpy(np.arange(L) < completion_len[:, None]),
            "completion_ids": torch.from_numpy(completion_ids),
            **batch,
            "teacher_rank": torch.from_numpy(teacher_rank),
            "prompt_group": torch.from_numpy(prompt_group),
            "candidates_by_rank": torch.from_numpy(candidates_by_rank(prompt_group, teacher_rank)),
            "candidate_index": torch.from_numpy(self._candidate[rows]),
        }


def collate_single(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """For a DataLoader with batch_size=1 over SignalBatches, whose items are already batches."""
    return items[0]
