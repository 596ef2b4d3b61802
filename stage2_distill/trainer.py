"""A transformers Trainer that only computes the TSD-KD loss; the engine does everything else.

DDP, FSDP and DeepSpeed configs, accumulation, schedules, checkpoints and resume are the Trainer's.
Stage-2 specifics: losses normalised by whole-step counts (`StepCounts`), the student's log-softmax
computed a chunk of tokens at a time inside the output head's forward, and the loss terms logged
next to the Trainer's own logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import SequentialSampler
from transformers import SchedulerType, Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from stage2_distill.chunked import TokenStatistics, student_statistics
from stage2_distill.objective import Objective, StepCounts
from tsdkd.errors import TsdkdError
from tsdkd.interrupts import handle_interrupts, interruption, restore_handlers
from tsdkd.loading import dtype_name


class DistillTrainer(Trainer):
    # compute_loss already divides by the whole step's counts: no division by accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, objective: Objective, vocab_size: int, logit_chunk_tokens: int, rank_items: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        check_deepspeed_config(getattr(self.accelerator.state, "deepspeed_plugin", None))
        keep_float32_outputs(getattr(self.accelerator.state, "fsdp_plugin", None))
        self.objective = objective
        self.vocab_size = vocab_size
        self.logit_chunk_tokens = logit_chunk_tokens
        self.rank_items = rank_items
        self._head: tuple[torch.nn.Module, torch.nn.Module] | None = None  # (wrapped model, its output head)
        self._flops_per_token: int | None = None  # 6 x non-embedding parameters
        # The dtype save_model writes the weights in (the student's); None: as trained (checkpoints).
        self.student_dtype: torch.dtype | None = None
        # The loss terms and completion tokens summed over the micro-batches since the last log, one tensor
        # (one add per micro-batch, not one per term), and the optimizer step the window started after.
        self._metric_names: list[str] = []
        self._metric_sums: torch.Tensor | None = None
        self._window_start_step = 0
        # When the window's first step fetched its data: not the setup before the first step, nor a save after a log.
        self._window_start: float | None = None
        self.add_callback(LogLastStep())
        self.add_callback(ResumeAsAsked())
        self.add_callback(NoteOneStepInWarmUp())
        if self.pop_callback(ProgressCallback):  # absent with disable_tqdm, or in a notebook (its own bar): kept as is
            self.add_callback(ProgressWithLoss())

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        # The dataset already shuffles (by epoch) and buckets whole batches; keep its order so that
        # one process with accumulation and several processes see the same steps.
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The batch on the device, every dtype kept. The Trainer's version casts float tensors to bf16 under
        DeepSpeed (meant for float model inputs); here they are the teacher's cached log-probs, which bf16
        would round to 3 digits. (SignalBatches' batches are flat and never empty: no nesting, no empty check.)"""
        return {name: value.to(self.args.device) if isinstance(value, torch.Tensor) else value
                for name, value in inputs.items()}

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple[list, StepCounts]:
        if self._window_start is None:
            self._window_start = time.perf_counter()
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> StepCounts:
        """Tokens, sequences and prompts over the step's micro-batches, summed over processes."""
        counts = torch.tensor(
            [[b["completion_mask"].sum(), len(b["prompt_group"]), len(b["candidates_by_rank"])] for b in batch_samples],
            dtype=torch.float64,
        ).sum(0).to(device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return StepCounts(*counts.to(torch.float32).clamp(min=1))

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: StepCounts | None = None) -> torch.Tensor:
        counts = num_items_in_batch or self._get_num_items_in_batch([inputs], inputs["input_ids"].device)
        # The completion tokens' (rows, steps), found once: a nonzero waits for the GPU.
        completion_positions = inputs["completion_mask"].nonzero(as_tuple=True)
        stats = self._student_statistics(model, inputs, completion_positions)
        loss, metrics = self.objective(inputs, stats, counts, completion_positions)
        if not torch.isfinite(loss):
            bad = ", ".join(f"{name}={value.item():.4g}" for name, value in metrics.items() if not torch.isfinite(value))
            raise TsdkdError(
                f"step {self.state.global_step + 1}: the loss is not finite ({bad}); lower --learning-rate "
                "or check the signal data with `tsdkd validate`"
            )
        self._metric_names = [*metrics, "completion_tokens"]
        values = torch.stack([*metrics.values(), inputs["completion_mask"].sum()]).float()
        if self._metric_sums is None:
            self._metric_sums, self._window_start_step = values, self.state.global_step
        else:
            self._metric_sums = self._metric_sums + values
        # DDP averages gradients over processes; each process's loss is its share of the sum.
        return loss * self.accelerator.num_processes

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: torch.Tensor | float | None = None) -> torch.Tensor | float | None:
        """The Trainer's norm of the step's gradient (over all processes), checked before the optimizer applies it.
        A finite loss can still give a non-finite gradient; applied, it would make every weight NaN, and the
        checkpoints saved after it too, while the stop would come one step later, at the first NaN loss."""
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):  # DeepSpeed may have no norm to give
            # DeepSpeed's engine steps inside its backward: there the update is made already, but not saved.
            kept = "no checkpoint holds the update" if self.is_deepspeed_enabled else "the weights were left as they were"
            raise TsdkdError(
                f"step {self.state.global_step + 1}: the gradient is not finite (norm {float(grad_norm)}) although the "
                f"loss was; {kept}; lower --learning-rate or check the signal data with `tsdkd validate`"
            )
        return grad_norm

    def _student_statistics(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                            completion_positions: tuple[torch.Tensor, torch.Tensor]) -> TokenStatistics:
        """The (wrapped) model's forward, its output head returning the statistics of the completion positions."""
        mask = batch["completion_mask"]
        rows, steps = completion_positions
        # Completion token j of row b is predicted by the hidden state at prompt_length - 1 + j.
        positions = batch["prompt_lengths"][rows] - 1 + steps

        produced = []

        def statistics(hidden: torch.Tensor, head_weight: torch.Tensor) -> TokenStatistics:
            stats = student_statistics(
                hidden[rows, positions], head_weight, mask, batch["teacher_topk_ids"][rows, steps], batch["completion_ids"][rows, steps],
                self.logit_chunk_tokens, self.vocab_size, self.objective.renormalize_topk, self.rank_items,
                self.objective.ranked_positions if self.objective.token_ranking else None, completion_positions,
            )
            produced.append(True)
            return stats

        transformed = "the student's forward transforms its output head's logits ({}); stage 2 needs a forward " \
                      "that returns lm_head(hidden states) as the logits (Llama/Qwen/Mistral-style)"
        try:
            with _head_returns(self._output_head(model), statistics):
                # logits_to_keep=0: the head receives every position's final hidden state.
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=0,
                               use_cache=False).logits
        except Exception as error:
            if not produced:  # an error of the model or of the statistics themselves
                raise
            # The head was the forward's last step; whatever failed after it worked on its output.
            raise TsdkdError(transformed.format(f"{type(error).__name__}: {error}")) from error
        if not isinstance(logits, TokenStatistics):
            raise TsdkdError(transformed.format(f"got a {type(logits).__name__}"))
        return logits

    def _output_head(self, model: torch.nn.Module) -> torch.nn.Module:
        # unwrap_model walks every module: once per wrapped model, not once per step.
        if self._head is None or self._head[0] is not model:
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            # FSDP1 wraps a head that is a unit of its own; the inner module runs with the weight gathered.
            self._head = (model, getattr(head, "_fsdp_wrapped_module", head))
        return self._head[1]

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None and self.student_dtype is not None:
            state_dict = model.state_dict()
        if state_dict is not None:
            state_dict = without_tied_copies(model, state_dict)
        if self.student_dtype is not None:
            state_dict = cast_keeping_shared(state_dict, self.student_dtype)
        super()._save(output_dir, state_dict)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """The Trainer's warnings about a resumed checkpoint's keys, without the tied copies `_save` leaves out (the
        output head of a student with tied embeddings): loading the embedding loads them, so they are not missing."""
        tied = still_tied(self.accelerator.unwrap_model(self.model))
        super()._issue_warnings_after_load(load_result._replace(
            missing_keys=[key for key in load_result.missing_keys if key not in tied]))

    def floating_point_ops(self, inputs: dict[str, torch.Tensor]) -> int:
        """The Trainer's estimate (6 x tokens x non-embedding parameters), with the parameters counted once
        rather than every step."""
        if self._flops_per_token is None:
            self._flops_per_token = super().floating_point_ops({"input_ids": torch.empty(1)})
        return inputs["input_ids"].numel() * self._flops_per_token

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the loss terms (per optimizer step, summed over processes) and tokens/s; the run's summary counts
        sequences per second. Their names carry no `train/` prefix, like the Trainer's own: its TensorBoard and W&B
        callbacks add one."""
        if self._metric_sums is not None and "loss" in logs:
            sums = self._metric_sums.to(self.args.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            # Steps, not micro-batches / accumulation: an epoch's last step may have fewer micro-batches.
            steps = max(self.state.global_step - self._window_start_step, 1)
            elapsed = time.perf_counter() - self._window_start
            for name, value in zip(self._metric_names, sums.tolist()):
                if name == "completion_tokens":
                    logs["tokens_per_s"] = round(value / max(elapsed, 1e-9), 1)
                else:
                    logs[name] = value / steps
            self._metric_sums, self._window_start = None, None
        sequences = getattr(self.train_dataset, "num_sequences", None)
        if "train_samples_per_second" in logs and sequences:
            # The Trainer counts dataset items as samples, here whole micro-batches: sequences instead, at the data's
            # mean micro-batch.
            logs["train_samples_per_second"] = round(logs["train_samples_per_second"] * sequences / len(self.train_dataset), 3)
        super().log(logs, start_time)


@contextmanager
def _head_returns(head: torch.nn.Module, statistics: Callable[[torch.Tensor, torch.Tensor], TokenStatistics]) -> Iterator[None]:
    """For the forward calls inside, `head(hidden)` returns `statistics(hidden, head.weight)`, which the
    model passes on as its `logits`.

    FSDP and ZeRO-3 gather a module's full weight only while that module runs, and hook the module's
    outputs to gather it again for the backward; reading the weight after the model's forward would
    see a shard.
    The override is an instance attribute, so the engine's hooks on the head still fire.
    """
    if "forward" in head.__dict__:
        # accelerate's device-map hooks, for one: replacing them would skip their device moves.
        raise TsdkdError("the student's output head has its forward replaced (a device_map or another wrapper); "
                         "load the student on one device without hooks")
    head.forward = lambda hidden: statistics(hidden, head.weight)
    try:
        yield
    finally:
        del head.forward


def without_tied_copies(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FSDP's full state dict holds a tied weight (the output head of a student with tied embeddings) as a copy of
    its own, which save_pretrained then writes twice (seen on a GPU: V x d float32 more in the student). Where the
    model still shares the parameter, the copy is dropped, as save_pretrained drops tensors that share memory.
    Where it no longer does (a tie the engine did not keep), both are written, with the tie turned off in the
    config, so that loading keeps the trained head. An engine that hides the parameters' names: equal values."""
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied = still_tied(model)
    copies = {key: source for key, source in (getattr(model, "all_tied_weights_keys", None) or {}).items()
              if key in state_dict and source in state_dict}

    def still_shared(key: str, source: str) -> bool:
        if {key, source} <= names:
            return key in tied
        # Flattened by the engine (FSDP1 without use_orig_params): the values tell.
        return torch.equal(state_dict[key], state_dict[source])

    shared = {key for key, source in copies.items() if still_shared(key, source)}
    if copies.keys() - shared and getattr(model.config, "tie_word_embeddings", False):
        print("note: the student's tied weights were trained apart (the sharding engine did not keep the tie); "
              "saved untied (tie_word_embeddings: false)")
        model.config.tie_word_embeddings = False
    return {key: value for key, value in state_dict.items() if key not in shared}


def still_tied(model: torch.nn.Module) -> set[str]:
    """The model's declared tied copies (all_tied_weights_keys: the output head, for tied embeddings) that are still
    their source's very parameter."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    return {key for key, source in ties.items() if key in parameters and parameters.get(source) is parameters[key]}


def cast_keeping_shared(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The floating-point tensors in `dtype`: those of another dtype cast into a copy on the CPU (on the GPU it could
    run out of memory at the very end, beside the optimizer state), the others as they are; tensors that shared
    memory (ties save_pretrained finds by storage, not by the model's declared ties) still share it, saved once."""
    cast: dict[tuple, torch.Tensor] = {}

    def to_dtype(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            return tensor
        if tensor.numel() == 0:  # empty tensors share no memory, whatever data_ptr says
            return tensor.to("cpu", dtype)
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if view not in cast:
            cast[view] = tensor.to("cpu", dtype)
            if not torch.isfinite(cast[view]).all() and torch.isfinite(tensor).all():  # float16's range ends at 65504
                raise TsdkdError(f"saving the student in {dtype_name(dtype)} (--save-dtype): {name} holds values beyond "
                                 "its range; rerun with --save-dtype bfloat16 or float32 (in `tsdkd run`: save_dtype in "
                                 "its config's distill section) to save it")
        return cast[view]

    return {name: to_dtype(name, tensor) for name, tensor in state_dict.items()}


def keep_float32_outputs(plugin: Any) -> None:
    """FSDP2's mixed precision casts the root module's float outputs to output_dtype, which accelerate sets to
    the training dtype (bf16). Here those outputs are the head's float32 statistics: bf16 would round every
    loss input. Unset before the Trainer wraps the model."""
    policy = getattr(plugin, "mixed_precision_policy", None)
    if getattr(policy, "output_dtype", None) is not None:
        plugin.mixed_precision_policy = dataclasses.replace(policy, output_dtype=None)


def check_deepspeed_config(plugin: Any) -> None:
    """ZeRO-3 must gather the weights when saving, or the Trainer writes a ZeRO checkpoint instead of
    the safetensors student (and no error until the end of the run)."""
    if plugin is not None and plugin.zero_stage == 3 and \
            not plugin.deepspeed_config["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save"):
        raise TsdkdError("DeepSpeed ZeRO-3 config: set zero_optimization.stage3_gather_16bit_weights_on_model_save "
                         "to true, or the student is saved as a ZeRO checkpoint instead of safetensors")


class LogLastStep(TrainerCallback):
    """Log the final step too: with --max-steps below --logging-steps (or not a multiple of it) the Trainer
    would log none of the last steps, and a short run's metrics would hold no loss terms at all."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_log = True


class ProgressWithLoss(ProgressCallback):
    """The Trainer's progress bar, showing the last logged loss and tokens/s beside its steps/s (each log record is
    still written above it)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().on_log(args, state, control, logs=logs, **kwargs)
        if self.training_bar is not None and logs and "loss" in logs:
            shown = {"loss": f"{logs['loss']:.4g}"}
            if "tokens_per_s" in logs:
                shown["tokens_per_s"] = f"{logs['tokens_per_s']:.0f}"
            self.training_bar.set_postfix(shown)


class CheckpointOnInterrupt(TrainerCallback):
    """Ctrl-C or SIGTERM (a cluster's notice of preemption) during training: the step under way ends, its checkpoint is
    saved and training stops, so that the rerun continues from that step rather than from the last regular checkpoint
    (`--save-steps` apart); a second signal acts at once, as without this. Then `interrupt()` ends the run as the
    first signal would have. For one process only (several would have to agree on the step), reading its batches
    itself (a signal to the process group ends data loader workers, whose batches the step would wait for). A signal
    the process ignores (a background job of a script) stays ignored."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @staticmethod
    def usable(num_processes: int, dataloader_workers: int) -> bool:
        # Not under a launcher (torchrun sets LOCAL_RANK), which kills its workers some time after its SIGTERM.
        return num_processes == 1 and dataloader_workers == 0 and "LOCAL_RANK" not in os.environ and \
            threading.current_thread() is threading.main_thread()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._previous = handle_interrupts(self._record)

    def _record(self, number: int, frame: Any) -> None:
        # Only recorded: the handler may run inside any call, a write to the terminal included.
        if self.received is not None:
            self.restore()
            signal.raise_signal(number)
            return
        self.received = number

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.received is not None and not control.should_training_stop:
            print(f"\n{signal.Signals(self.received).name}: saving the checkpoint of step {state.global_step}, then "
                  "stopping (the same signal again stops at once)", flush=True)
            control.should_save = control.should_training_stop = True

    def restore(self) -> None:
        """The handlers as they were before training (call once training is over, however it ended)."""
        restore_handlers(self._previous)
        self._previous = {}

    def interrupt(self) -> None:
        """After training: the first signal received, raised now and handled as it would have been; where that handler
        did not end the run (a program's own), the CLI's interruption, so that no student is saved as trained."""
        if self.received is not None:
            signal.raise_signal(self.received)
            raise interruption(self.received)


class TrainingComplete(Exception):
    """Raised at the start of training when the checkpoint resumed from is the last step's."""


class NoteOneStepInWarmUp(TrainerCallback):
    """The Trainer's warm-up starts at learning rate 0: a run of one optimizer step inside it (a smoke test, or
    epochs and batch sizes that come to one step) would train nothing without a word."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # (The constant schedule has no warm-up: transformers leaves it out.)
        if state.max_steps == 1 and args.get_warmup_steps(1) > 0 and args.lr_scheduler_type != SchedulerType.CONSTANT \
                and state.is_world_process_zero:
            # (training_arguments passes --warmup-ratio as warmup_steps, which transformers reads as a ratio below 1.)
            print("note: this run is one optimizer step, and the warm-up starts at learning rate 0, so it changes "
                  f"nothing; add --warmup-ratio 0 to train it (--warmup-ratio {args.warmup_steps} now)")


class ResumeAsAsked(TrainerCallback):
    """Two fixes to how the Trainer resumes from a checkpoint:
    - its logging and saving intervals come back from the checkpoint's state, over the rerun's arguments, which a
      continued run may change: the arguments';
    - a rerun after a kill during the final save resumes from the last step's checkpoint, and the Trainer checks its
      step limit only after a step, so it would train one step past the end (with --max-steps inside an epoch):
      stop before, with the checkpoint's weights loaded."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        state.compute_steps(args, state.max_steps)
        if 0 < state.max_steps <= state.global_step:
            raise TrainingComplete


class MetricsFile(TrainerCallback):
    """Appends every log record to a jsonl file (main process only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, **{k: v for k, v in logs.items() if _is_number(v)}}
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
