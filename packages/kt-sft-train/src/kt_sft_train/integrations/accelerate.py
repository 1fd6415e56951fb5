"""Stock accelerate with host-owner experts (KTConfig(distributed="host_owner"); docs/distributed.md).

    accelerator = Accelerator()                       # under `accelerate launch` / torchrun
    model = load_kt_model(path, kt=KTConfig(distributed="host_owner"))
    model = get_peft_model(model, kt_lora_config(model))
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    model, optimizer, loader = kt_accelerate.prepare(accelerator, model, optimizer, loader)
    ...
    accelerator.backward(loss)                        # loss: see "Loss scaling" in docs/distributed.md
    kt_accelerate.clip_grad_norm_(accelerator, model, 1.0)   # instead of accelerator.clip_grad_norm_
    optimizer.step(); optimizer.zero_grad()
    kt_accelerate.save_adapter(accelerator, model, "out/adapter")

`prepare` readies the model (non-owners drop their expert-LoRA copies from the model and the optimizer;
DDP or FSDP2 ignores the expert LoRA and the experts' placeholders), makes `optimizer.step()` sum the
owners' expert grads across hosts first, then calls `accelerator.prepare` unchanged. With one process it
is `accelerator.prepare`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import distributed as kt_distributed


def _host_owner(model: nn.Module) -> bool:
    return any(kt_distributed.is_host_owner_experts(m) for m in model.modules())


def prepare(
    accelerator: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *others: Any,
    monitor_dense: bool | None = None,
) -> tuple[Any, ...]:
    """`accelerator.prepare(model, optimizer, *others)` for a model with host-owner CPU experts.

    monitor_dense: make DDP's gradient all-reduce fail with the failing rank's message instead of
        after the process-group timeout (kt_sft_train.distributed.monitor_ddp; gives up DDP's
        communication overlap). None = on for gloo (CPU) process groups, off for NCCL.
    """
    from accelerate.utils import DistributedType

    if not _host_owner(model):
        if accelerator.num_processes > 1:
            raise ValueError(
                "kt_sft_train.integrations.accelerate.prepare: several processes need the model's experts "
                "built with KTConfig(distributed='host_owner')"
            )
        return accelerator.prepare(model, optimizer, *others)
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if accelerator.distributed_type == DistributedType.DEEPSPEED or (fsdp and not accelerator.is_fsdp2):
        kind = "FSDP1" if fsdp else "DeepSpeed"
        raise NotImplementedError(
            f"{kind} with host-owner CPU experts is not implemented yet; use DDP (the default of "
            "`accelerate launch --multi_gpu` / MULTI_CPU) or FSDP2 (fsdp_version: 2)"
        )
    if fsdp and accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
        raise NotImplementedError(
            "FSDP2's cpu_ram_efficient_loading with host-owner CPU experts is not implemented yet (it moves "
            "the model to the meta device and copies rank 0's weights into the others, which the owner-held "
            "experts cannot take); set it off: `accelerate launch --fsdp_cpu_ram_efficient_loading false` "
            "or FullyShardedDataParallelPlugin(cpu_ram_efficient_loading=False)"
        )
    ignored = kt_distributed.prepare_model(model, optimizer)
    kt_distributed.install_step_sync(model, optimizer)
    if fsdp:
        exclude_from_fsdp2(accelerator.state.fsdp_plugin, model, ignored)
    prepared = accelerator.prepare(model, optimizer, *others)
    wrapped = prepared[0]
    if isinstance(wrapped, nn.parallel.DistributedDataParallel):
        if monitor_dense is None:
            import torch.distributed as dist

            monitor_dense = dist.get_backend() == "gloo"
        if monitor_dense:
            kt_distributed.monitor_ddp(wrapped)
    return tuple(prepared)


def accelerator_for_launch(**kwargs: Any) -> Any:
    """`Accelerator(**kwargs)` as `accelerate launch` configured it, FSDP included on CPU runs.

    `accelerate launch --use_fsdp --fsdp_version 2` exports ACCELERATE_USE_FSDP, FSDP_VERSION and the
    other FSDP_* settings; accelerate 1.15 turns them into its FSDP state only for GPU-like devices (a
    CPU run stays MULTI_CPU, i.e. DDP, without a word). Its FSDP2 code path is device-agnostic (gloo on
    CPU works), so on CPU this applies accelerate's own plugin, read from the same environment, to the
    state as accelerate does on GPUs. FSDP1 then reaches `prepare`'s "not implemented yet".
    """
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, parse_flag_from_env

    accelerator = Accelerator(**kwargs)
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        select_fsdp_on_cpu(accelerator, FullyShardedDataParallelPlugin())
    return accelerator


def select_fsdp_on_cpu(accelerator: Any, plugin: Any) -> bool:
    """Give a multi-process CPU accelerator the FSDP `plugin` it was asked for (accelerate 1.15 keeps a CPU
    run MULTI_CPU, dropping the plugin); what accelerate's state does on GPUs. True when it did."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return True


def exclude_from_fsdp2(plugin: Any, model: nn.Module, ignored: list[str]) -> None:
    """Keep the expert LoRA (owner-held) and the experts' placeholders out of FSDP2's sharding.

    accelerate passes the parameters of `plugin.ignored_modules` to every `fully_shard` call as
    `ignored_params`; the user's own ignored modules (a list or a name regex) are kept.
    """
    import re

    modules = kt_distributed.ignored_modules(model, ignored)
    user = plugin.ignored_modules
    if isinstance(user, str):
        pattern = re.compile(user)
        user = [m for name, m in model.named_modules() if pattern.fullmatch(name)]
    plugin.ignored_modules = list(user or []) + [m for m in modules if all(m is not u for u in user or [])]


def clip_grad_norm_(accelerator: Any, model: nn.Module, max_norm: float) -> torch.Tensor:
    """Gradient clipping over the whole run (use it instead of `accelerator.clip_grad_norm_`)."""
    unwrapped = accelerator.unwrap_model(model)
    if not _host_owner(unwrapped):
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    return kt_distributed.clip_grad_norm_(unwrapped, max_norm)


def save_adapter(accelerator: Any, model: nn.Module, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write ONE PEFT adapter (from the first host's owner, which holds the expert LoRA); all ranks wait."""
    unwrapped = accelerator.unwrap_model(model)
    if not _host_owner(unwrapped):
        if accelerator.is_main_process:
            unwrapped.save_pretrained(path, **kwargs)
        accelerator.wait_for_everyone()
        return
    kt_distributed.save_adapter(unwrapped, path, **kwargs)
