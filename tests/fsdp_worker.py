"""One TSD-KD loss and backward with the toy student sharded over CPU processes (gloo) by FSDP1,
FSDP2 or DeepSpeed ZeRO-3.

Run by tests/test_distill.py::test_sharded_student_equals_one_process under torchrun; the test
imports `batch_halves`, `toy_student` and `distill_trainer` for its single-process reference.
Accelerate turns FSDP and DeepSpeed on for GPUs only, so here the engine shards the student
directly and the Trainer's own `compute_loss` runs on it.

Two layouts: the toy's tied head in the root unit, or an untied head as its own unit (as a size-based
wrap policy makes of a large vocabulary), which FSDP reshards right after the head's forward.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, TrainingArguments

from stage2_distill.data import SignalBatches, candidates_by_rank, collate_single
from stage2_distill.objective import Objective
from stage2_distill.trainer import DistillTrainer, keep_float32_outputs, without_tied_copies
from tsdkd.config import DistillConfig

TOY_STUDENT = Path(__file__).resolve().parents[1] / "data" / "toy-student"


def prompts_batch(batch: dict[str, torch.Tensor], first: int, last: int) -> dict[str, torch.Tensor]:
    """The micro-batch of prompts first..last (consecutive prompt_group numbers) cut from a collated batch."""
    rows = (batch["prompt_group"] >= first) & (batch["prompt_group"] <= last)
    part = {k: v[rows] for k, v in batch.items() if k != "candidates_by_rank"}
    part["prompt_group"] = part["prompt_group"] - first
    part["candidates_by_rank"] = torch.from_numpy(candidates_by_rank(part["prompt_group"].numpy(), part["teacher_rank"].numpy()))
    return part


def batch_halves(signals: str) -> list[dict[str, torch.Tensor]]:
    """One 4-prompt batch cut into two micro-batches of 2 prompts each."""
    whole = SignalBatches([signals], batch_size=12, pad_token_id=0, group_by_prompt=True, seed=0)[0]
    return [prompts_batch(whole, 0, 1), prompts_batch(whole, 2, 3)]


def toy_student(head_unit: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(TOY_STUDENT, dtype=torch.float32)
    if head_unit == "own":
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return model


def distill_trainer(model: torch.nn.Module, output_dir: str) -> DistillTrainer:
    cfg = DistillConfig(signals=["x"], student=str(TOY_STUDENT), out="x")
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=1, report_to="none", save_strategy="no",
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True)
    return DistillTrainer(model=model, args=args, train_dataset=[], data_collator=collate_single,
                          objective=Objective.from_config(cfg, "exact"), vocab_size=325, logit_chunk_tokens=7, rank_items=10)


def shard(model: torch.nn.Module, engine: str, head_unit: str, world: int) -> torch.nn.Module:
    """Each decoder layer a unit, the head its own unit or part of the root's (ZeRO-3 has no units:
    it gathers each module's parameters while that module runs)."""
    if engine == "zero3":
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
        wrapped, *_ = deepspeed.initialize(model=model, config=config, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
        return wrapped
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import CustomPolicy

        layer_class = type(model.model.layers[0])
        policy = CustomPolicy(lambda module: isinstance(module, layer_class) or (head_unit == "own" and module is model.lm_head))
        return FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world,))
    # accelerate's bf16 policy asks FSDP2 to cast the root's outputs (the statistics) to bf16; the trainer unsets it.
    plugin = SimpleNamespace(mixed_precision_policy=MixedPrecisionPolicy(output_dtype=torch.bfloat16))
    keep_float32_outputs(plugin)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if head_unit == "own":
        fully_shard(model.lm_head, mesh=mesh)
    return fully_shard(model, mesh=mesh, mp_policy=plugin.mixed_precision_policy)


def local_size(parameter: torch.Tensor) -> int:
    if hasattr(parameter, "ds_tensor"):
        return parameter.ds_tensor.numel()
    return parameter.to_local().numel() if hasattr(parameter, "to_local") else parameter.numel()


def full_gradients(model: torch.nn.Module, engine: str) -> dict[str, torch.Tensor]:
    if engine == "zero3":
        from deepspeed.utils import safe_get_full_grad

        return {name: safe_get_full_grad(p).clone() for name, p in model.module.named_parameters()}
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            return {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return {name: p.grad.full_tensor().contiguous() for name, p in model.named_parameters()}


def main(signals: str, out: str, engine: str, head_unit: str) -> None:
    model = toy_student(head_unit)
    trainer = distill_trainer(model, out)  # under torchrun: starts the gloo process group
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    model = shard(model, engine, head_unit, world)
    # Outside any forward, each process holds 1/world of the parameters.
    local_numel = sum(local_size(p) for p in model.parameters())
    half = batch_halves(signals)[rank]
    counts = trainer._get_num_items_in_batch([half], torch.device("cpu"))
    loss = trainer.compute_loss(model, half, num_items_in_batch=counts)
    model.backward(loss) if engine == "zero3" else loss.backward()
    loss_sum = trainer.accelerator.reduce(loss.detach(), reduction="sum") / world
    grads = full_gradients(model, engine)
    gathered = saved = {}
    if engine == "fsdp2":  # the full state dict accelerate saves an FSDP2 student from
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        saved = without_tied_copies(getattr(model, "module", model), gathered) if rank == 0 else {}
    if rank == 0:
        save_file(grads, f"{out}/grads.safetensors")
        result = {"loss": loss_sum.item(), "local_numel": local_numel, "full_numel": sum(g.numel() for g in grads.values()),
                  "gathered_keys": sorted(gathered), "saved_keys": sorted(saved)}
        Path(out, "result.json").write_text(json.dumps(result))
    # Tearing down the gloo group can abort a process (SIGABRT, "terminate called without an active exception";
    # pytorch issue 190489): CI saw it twice on one rank, once with destroy_process_group. Once every rank is past
    # the barrier the results are written, so each leaves without running the group's C++ destructors.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
