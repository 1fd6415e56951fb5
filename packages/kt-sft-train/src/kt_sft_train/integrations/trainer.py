"""transformers.Trainer (and TRL's trainers) with kt-sft: the time-split callback and multi-process runs.

`KTTimeSplitCallback` logs the CPU-experts / transfers / dense time split of each step. `KTTrainer` (or
`HostOwnerTrainerMixin` in front of any Trainer subclass, e.g. TRL's SFTTrainer) runs under torchrun /
`accelerate launch` with host-owner experts (docs/distributed.md); `host_owner_config` switches the
experts to host-owner mode when the TrainingArguments name several processes.

The callback works with `transformers.Trainer` and every trainer built on it (TRL's SFTTrainer, ...):

    trainer = Trainer(model=peft_model, ..., callbacks=[KTTimeSplitCallback()])

Each log record gets `kt_experts_cpu_s`, `kt_transfer_s`, `kt_dense_s` (mean seconds per optimizer step
since the previous log) and `kt_experts_share` (fraction of the step in the CPU experts). With CUDA the
timer synchronizes around each host<->device copy (see kt_sft_train.timing), which costs a little
throughput; leave the callback out for production runs that do not need the split.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .. import distributed as kt_distributed
from .. import owner_checkpoint
from ..config import KTConfig
from ..timing import StepSplit, StepTimer
from . import accelerate as kt_accelerate

_ZERO = StepSplit(0.0, 0.0, 0.0)


class KTTimeSplitCallback(TrainerCallback):
    """Measures every optimizer step of a model with KTExperts and adds the split to the Trainer's logs."""

    def __init__(self) -> None:
        self.timer: StepTimer | None = None
        self.window = _ZERO
        self.window_steps = 0
        self.total = _ZERO
        self.total_steps = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("KTTimeSplitCallback needs the model (the Trainer passes it to on_train_begin)")
        if self.timer is not None:  # a previous train() of this callback ended in an exception
            self.timer.remove()
        self.timer = StepTimer(model).install()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.timer is not None:
            self.timer.start_step()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.timer is None:
            return
        split = self.timer.end_step()
        self.window = self.window + split
        self.window_steps += 1
        self.total = self.total + split
        self.total_steps += 1

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs is None or self.window_steps == 0:
            return
        record = split_record(self.window, self.window_steps)
        logs.update(record)
        # The Trainer appended a copy of `logs` to the history just before calling us: complete it too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(record)
        self.window = _ZERO
        self.window_steps = 0

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.timer is not None:
            self.timer.remove()
            self.timer = None

    def summary(self) -> dict[str, float]:
        """Mean split per optimizer step over the whole run."""
        return split_record(self.total, self.total_steps) if self.total_steps else {}


def split_record(split: StepSplit, steps: int) -> dict[str, float]:
    return {
        "kt_step_time_s": split.total_s / steps,
        "kt_experts_cpu_s": split.experts_cpu_s / steps,
        "kt_transfer_s": split.transfer_s / steps,
        "kt_dense_s": split.dense_s / steps,
        "kt_experts_share": split.shares()["experts_cpu"],
    }


# -- several processes: host-owner experts under the Trainer -------------------------------------------------


def host_owner_config(args: Any, kt: KTConfig | None = None) -> KTConfig:
    """`kt` (default KTConfig()) with distributed="host_owner" when `args` (TrainingArguments) runs on
    several processes. Reading `args.world_size` makes transformers initialize the process group (through
    accelerate), which the host-owner experts need before the model is loaded."""
    kt = kt or KTConfig()
    if args.world_size > 1 and kt.distributed == "none":
        return kt.replace(distributed="host_owner")
    return kt


class HostOwnerTrainerMixin:
    """Put in front of a transformers Trainer class (Trainer, TRL's SFTTrainer, ...) for host-owner experts.

        class KTSFTTrainer(HostOwnerTrainerMixin, SFTTrainer): ...

    With host-owner experts (several processes) it readies the model before DDP wraps it (non-owners drop
    their expert-LoRA copies, DDP ignores the expert LoRA), makes each optimizer step sum the owners'
    expert grads across hosts first, clips over the whole gradient (dense + the owners' expert LoRA; a
    per-rank clip would clip the ranks differently) and saves ONE adapter from the first host's owner.
    The Trainer's loss scaling already gives the global batch's token mean (average_tokens_across_devices).
    Checkpoints and resume go through the Trainer's hooks (the owner's adapter and its optimizer state by
    parameter name); FSDP2 (fsdp_version 2) keeps the experts out of the sharding, also on CPU.
    With one process it changes nothing.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    args: Any
    processing_class: Any

    def _kt_host_owner(self) -> bool:
        return any(kt_distributed.is_host_owner_experts(m) for m in self.model.modules())

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        if self._kt_host_owner():
            fsdp2 = self._kt_check_fsdp(resume_from_checkpoint)
            ignored = kt_distributed.prepare_model(self.model, self.optimizer)
            if fsdp2:
                kt_accelerate.exclude_from_fsdp2(self.accelerator.state.fsdp_plugin, self.model, ignored)
            if self.optimizer is not None:
                self._kt_install_step_sync(self.optimizer)
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; on a multi-process CPU run with FSDP arguments, FSDP as asked
        (accelerate 1.15 would drop the plugin there and run DDP without a word)."""
        super().create_accelerator_and_postprocess()  # type: ignore[misc]
        plugin_args = getattr(self.args, "fsdp_plugin_args", None)
        if plugin_args is not None:
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin(**plugin_args)
            if kt_accelerate.select_fsdp_on_cpu(self.accelerator, plugin):
                self.is_fsdp_enabled = True

    def _kt_check_fsdp(self, resume_from_checkpoint: Any) -> bool:
        """True under FSDP2. Not implemented with host-owner experts: FSDP1, checkpoints under FSDP2."""
        if not getattr(self, "is_fsdp_enabled", False):
            return False
        plugin = self.accelerator.state.fsdp_plugin
        if plugin.fsdp_version != 2:
            raise NotImplementedError(
                "FSDP1 under the Trainer with host-owner experts is not implemented yet; use fsdp_version 2"
            )
        if resume_from_checkpoint or self.args.save_strategy != "no":
            raise NotImplementedError(
                "checkpoints of a Trainer run under FSDP2 with host-owner experts are not implemented yet "
                "(save_strategy must be 'no'); DDP runs and kt-sft train under FSDP2 checkpoint and resume"
            )
        if plugin.cpu_ram_efficient_loading:
            raise NotImplementedError(
                "FSDP2's cpu_ram_efficient_loading with host-owner experts is not implemented yet; set "
                "fsdp_config={'cpu_ram_efficient_loading': False}"
            )
        on_cpu = self.model.get_input_embeddings().weight.device.type == "cpu"
        if on_cpu and "fused" in str(self.args.optim):
            raise ValueError(
                f"TrainingArguments(optim={str(self.args.optim)!r}) under FSDP2 on CPU: the fused kernel "
                "cannot mix the sharded dense parameters and the owner's expert LoRA: optim='adamw_torch'"
            )
        return True

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)  # type: ignore[misc]
        if self._kt_host_owner():
            self._kt_install_step_sync(optimizer)
        return optimizer

    def _kt_install_step_sync(self, optimizer: torch.optim.Optimizer) -> None:
        if getattr(optimizer, "_kt_step_sync", None) is None:
            optimizer._kt_step_sync = kt_distributed.install_step_sync(self.model, optimizer)  # type: ignore[attr-defined]

    # Checkpoints: the Trainer's own hooks, the owner's adapter and optimizer state (owner_checkpoint.py).
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self._kt_host_owner():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        from safetensors.torch import load_file

        path = os.path.join(resume_from_checkpoint, "adapter_model.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume_from_checkpoint: {path} is missing (no adapter saved there)")
        owner_checkpoint.load_owner_adapter(self.model, load_file(path))
        return None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
        if self._kt_host_owner() and self.optimizer is not None:
            owner_checkpoint.save_owner_optimizer(self.model, self.optimizer, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._kt_host_owner() or self.optimizer is None:
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        from transformers.trainer import SCHEDULER_NAME

        state = owner_checkpoint.owner_optimizer_state(self.model, self.optimizer, checkpoint)
        self.optimizer.load_state_dict(state)
        scheduler = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        self.lr_scheduler.load_state_dict(scheduler)  # type: ignore[attr-defined]
        return None

    # transformers' clipping calls (Trainer._clip_grad_norm / _get_grad_norm in 5.x).
    def _clip_grad_norm(self, model: nn.Module) -> Any:
        if not self._kt_host_owner():
            return super()._clip_grad_norm(model)  # type: ignore[misc]
        return kt_distributed.clip_grad_norm_(self.model, self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        if grad_norm is None and self._kt_host_owner():
            grad_norm = kt_distributed.clip_grad_norm_(self.model, float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)  # type: ignore[misc]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self._kt_host_owner():
            return super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        output_dir = output_dir or self.args.output_dir
        kt_distributed.save_adapter(self.model, output_dir)  # the first host's owner writes; all wait
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        return None


class KTTrainer(HostOwnerTrainerMixin, Trainer):
    """transformers.Trainer that also runs with host-owner experts on several processes."""
