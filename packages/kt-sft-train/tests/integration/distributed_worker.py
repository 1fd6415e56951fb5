"""One rank of a host-owner test run, started by test_distributed.py with a torchrun-like environment.

Usage: python distributed_worker.py SPEC.json   (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set)

Scenarios: "train" (one step of the tiny model; writes loss, grads, parameters after AdamW), "owner_fails"
(the owner's experts layer raises), "rank_fails" (a non-owner's dense forward raises), "rank_dies" (a
non-owner exits without a word). Each rank writes rank<R>.pt (train) or rank<R>.json (failures).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_common as common


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ["RANK"])
    out = Path(spec["out"])
    if spec["scenario"] == "accelerate":
        torch.save(train_with_accelerate(spec, rank), out / f"rank{rank}.pt")
        return
    dist.init_process_group("gloo", timeout=timedelta(seconds=spec["timeout_s"]))
    if spec["scenario"] == "train":
        torch.save(train(spec, rank), out / f"rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
        return
    started = time.monotonic()
    try:
        fail(spec, rank)
        result: dict[str, Any] = {"error": None}
    except BaseException as error:
        result = {"error": f"{type(error).__name__}: {error}"}
    result["seconds"] = time.monotonic() - started
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    from kt_sft_train.distributed import current_runtime

    runtime = current_runtime()
    if runtime is not None:  # os._exit skips atexit: rank 0 serves the error board until all read it
        runtime.linger_after_failure()
        if runtime.mailboxes is not None:  # what atexit does on a normal exit
            runtime.mailboxes.close()
    # Pending gloo work of the failed exchange would block a clean teardown: leave at once.
    sys.stdout.flush()
    os._exit(0)


def host_owner_config(spec: dict[str, Any]) -> Any:
    from kt_sft_train import KTConfig

    return KTConfig(
        backend=spec["backend"],
        distributed="host_owner",
        hosts=spec["hosts"],
        owner_local_rank=spec.get("owner_local_rank", 0),
        distributed_timeout_s=spec["timeout_s"],
        activation_policy=spec.get("policy", "retain"),
        exchange_transport=spec.get("transport", "shm"),
    )


def build(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    from kt_sft_train.distributed import monitor_ddp, prepare_model, runtime_for

    if "default_backend" in spec:  # the path a run with this default backend takes (e.g. "nccl" on GPUs)
        runtime_for(host_owner_config(spec), default_backend=spec["default_backend"])
    peft_model = common.build_peft_model(host_owner_config(spec), spec)
    optimizer = common.make_optimizer(peft_model)
    prepare_model(peft_model, optimizer)
    ddp = torch.nn.parallel.DistributedDataParallel(peft_model)
    if spec.get("monitor_ddp"):
        monitor_ddp(ddp)
    return peft_model, ddp, optimizer


def train(spec: dict[str, Any], rank: int) -> dict[str, Any]:
    from kt_sft_train.distributed import (
        expert_lora_parameters,
        failure_reporting,
        install_step_sync,
        sync_expert_grads,
    )

    peft_model, ddp, optimizer = build(spec)
    install_step_sync(peft_model, optimizer)
    empty_experts = common.count_empty_experts(peft_model)
    pieces = common.rank_pieces(spec)
    total = common.predicted_tokens(pieces)
    world = dist.get_world_size()
    with failure_reporting():
        # Per-rank loss summing to world_size * (global mean): DDP's average is then the global mean.
        loss = common.token_loss_sum(ddp, pieces[rank]) * world / total
        loss.backward()
        sync_expert_grads(peft_model)
        grads = {n: p.grad.detach().clone() for n, p in peft_model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        layer_check = common.layer_call(peft_model, spec, rank) if spec.get("layer_check") else None
    lora = expert_lora_parameters(peft_model)
    placeholders_ok = all(p.stride() == (0, 0) and not p.requires_grad for p in lora.values())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    return {
        "loss": float(loss.detach()) / world,
        "grads": grads,
        "params": {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad},
        "expert_lora_in_optimizer": sum(id(p) in in_optimizer for p in lora.values()),
        "expert_lora_count": len(lora),
        "placeholders_ok": placeholders_ok,
        "empty_experts": empty_experts.total,
        "layer_check": layer_check,
        "control_group": control_group_kind(),
        "shm_files": shm_files(),
    }


def shm_files() -> str | None:
    """The glob of this run's shared-memory mailbox files (None with the gloo transport)."""
    from kt_sft_train.distributed import current_runtime

    runtime = current_runtime()
    assert runtime is not None
    boxes = runtime.mailboxes
    return None if boxes is None else str(Path(boxes.directory, f"kt-sft-{boxes.run_id}-*"))


def control_group_kind() -> str:
    """ "world" when the runtime reuses the default group for host tensors, else its own group's backend."""
    from kt_sft_train.distributed import current_runtime

    runtime = current_runtime()
    assert runtime is not None
    if runtime.control_group is dist.group.WORLD:
        return "world"
    return f"own {dist.get_backend(runtime.control_group)} group"


def train_with_accelerate(spec: dict[str, Any], rank: int) -> dict[str, Any]:
    """One step through stock accelerate (MULTI_CPU, gloo) and the kt-sft helper; saves the adapter."""
    from accelerate import Accelerator
    from kt_sft_train.distributed import expert_lora_parameters
    from kt_sft_train.integrations import accelerate as kt_accelerate

    accelerator = Accelerator(cpu=True)
    if spec.get("fsdp2"):
        from accelerate import FullyShardedDataParallelPlugin
        from accelerate.utils import DistributedType

        # accelerate 1.15 selects FSDP only for GPU-like devices (MULTI_CPU never becomes FSDP); its FSDP2
        # code itself is device-agnostic (fully_shard on a CPU mesh). Set the state as `accelerate launch
        # --use_fsdp --fsdp_version 2` does on GPUs. transformer_based_wrap: one FSDP2 unit per decoder layer.
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    assert accelerator.is_fsdp2 == bool(spec.get("fsdp2")), accelerator.state
    assert accelerator.num_processes == len(spec["pieces"]), accelerator.state
    peft_model = common.build_peft_model(host_owner_config(spec), spec)
    optimizer = common.make_optimizer(peft_model)
    model, optimizer = kt_accelerate.prepare(accelerator, peft_model, optimizer)
    pieces = common.rank_pieces(spec)
    world = accelerator.num_processes
    loss = common.token_loss_sum(model, pieces[rank]) * world / common.predicted_tokens(pieces)
    accelerator.backward(loss)
    norm = kt_accelerate.clip_grad_norm_(accelerator, model, spec["max_norm"])
    grads = {n: full(p.grad) for n, p in peft_model.named_parameters() if p.grad is not None}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    kt_accelerate.save_adapter(accelerator, model, Path(spec["out"]) / "adapter")
    sharded = sum(isinstance(p, DTensor) for p in peft_model.parameters())
    assert (sharded > 0) == bool(spec.get("fsdp2")), sharded
    lora = expert_lora_parameters(peft_model)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    result = {
        "loss": float(loss.detach()) / world,
        "norm": float(norm),
        "grads": grads,
        "params": {n: full(p) for n, p in peft_model.named_parameters() if p.requires_grad},
        "expert_lora_in_optimizer": sum(id(p) in in_optimizer for p in lora.values()),
        "expert_lora_count": len(lora),
        "placeholders_ok": all(p.stride() == (0, 0) and not p.requires_grad for p in lora.values()),
        "empty_experts": 1,  # not counted here (the train scenario checks empty experts)
        "layer_check": None,
    }
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A detached copy of `tensor`, FSDP2 shards gathered (a collective: every rank calls it alike)."""
    if isinstance(tensor, DTensor):
        return tensor.detach().full_tensor().clone()
    return tensor.detach().clone()


def fail(spec: dict[str, Any], rank: int) -> None:
    from kt_sft_train.distributed import current_runtime, failure_reporting

    peft_model, ddp, _ = build(spec)
    runtime = current_runtime()
    assert runtime is not None
    scenario = spec["scenario"]
    if scenario == "owner_fails" and runtime.layout.is_owner and runtime.layout.host_index == 0:
        common.make_owner_layer_fail(peft_model, "injected kernel failure on the owner")
    if scenario == "rank_fails" and rank == spec["failing_rank"]:
        common.make_dense_forward_fail(peft_model, f"bad batch on rank {rank}")
    if scenario == "rank_dies" and rank == spec["failing_rank"]:
        common.make_dense_forward_exit(peft_model)
    pieces = common.rank_pieces(spec)
    with failure_reporting():
        for _ in range(2):  # the failure is in the first step; a second would hang if it were missed
            loss = common.token_loss_sum(ddp, pieces[rank])
            loss.backward()


if __name__ == "__main__":
    main()
