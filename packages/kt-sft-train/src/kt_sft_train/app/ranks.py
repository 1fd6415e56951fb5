"""`kt-sft train` under torchrun / accelerate launch: what differs when WORLD_SIZE > 1 (docs/distributed.md).

One process: every method is the identity, so the training loop reads the same either way. Several:
the process group is initialized from the launcher's environment, the experts become host-owner experts
(KTConfig.distributed="host_owner"), each optimizer step's global batch (the same indices on every
rank, from the step number) is split by rank, the loss is scaled so that DDP's average equals the mean
over the global batch's label tokens, clipping sees the whole gradient, and only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch import nn

from ..config import KTConfig
from .options import OptionsError, TrainOptions

IGNORE_INDEX = -100


@dataclass
class RankContext:
    rank: int = 0
    world_size: int = 1
    dense_parallel: str = "none"  # how `prepare` wrapped the dense part: "none", "ddp" or "fsdp2"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writes_files(self) -> bool:
        return self.rank == 0

    # -- setup ------------------------------------------------------------------------------------------

    @classmethod
    def from_environment(cls) -> RankContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(rank=int(os.environ["RANK"]), world_size=world)

    def experts_config(self, options: TrainOptions) -> KTConfig:
        kt = options.kt
        if not self.distributed:
            return kt
        if options.batch_size % self.world_size:
            raise OptionsError(
                f"--batch-size {options.batch_size} must be a multiple of the {self.world_size} ranks "
                "(each rank takes an equal share of every global batch)"
            )
        if kt.distributed == "none":
            kt = kt.replace(distributed="host_owner")
        if options.overlap_microbatches > 1:
            raise OptionsError(
                "--overlap-microbatches with several ranks is not implemented yet (threads would interleave "
                "the ranks' expert exchanges); leave it at 1"
            )
        if options.skip_nonfinite_steps:
            raise OptionsError(
                "--skip-nonfinite-steps with several ranks is not implemented yet (the ranks would have to "
                "agree on every skip)"
            )
        if kt.owner_local_rank != 0:
            raise OptionsError("kt-sft train writes its files from rank 0: keep owner_local_rank=0")
        return kt

    def init_process_group(self, device: torch.device, kt: KTConfig) -> None:
        if not self.distributed:
            return
        import torch.distributed as dist

        if device.type == "cuda":  # NCCL collectives (barrier, object gathers) use the current device
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=kt.distributed_timeout_s))

    def device(self, device: torch.device) -> torch.device:
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """The module to run forwards through (DDP when distributed); `model` stays the PEFT model."""
        if not self.distributed:
            return model
        from .. import distributed

        if launched_with_sharding():
            return self._prepare_with_accelerate(model, optimizer)
        distributed.prepare_model(model, optimizer)
        distributed.install_step_sync(model, optimizer)
        self.dense_parallel = "ddp"
        ddp = nn.parallel.DistributedDataParallel(model)
        if model.get_input_embeddings().weight.device.type == "cpu":
            distributed.monitor_ddp(ddp)
        return ddp

    def _prepare_with_accelerate(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """FSDP2 (or a sharding kt-sft cannot run yet) as `accelerate launch` configured it, through the
        accelerate helper. The optimizer object stays the one the loop drives (accelerate switches its
        parameters to the shards in place)."""
        from ..integrations import accelerate as kt_accelerate

        on_cpu = model.get_input_embeddings().weight.device.type == "cpu"
        accelerator = kt_accelerate.accelerator_for_launch(cpu=on_cpu)
        if accelerator.num_processes != self.world_size:  # accelerate saw no multi-process run
            raise RuntimeError(
                f"accelerate sees {accelerator.num_processes} process(es) ({accelerator.distributed_type}), "
                f"the launcher started {self.world_size}"
            )
        if accelerator.mixed_precision != "no":
            raise OptionsError(
                f"accelerate launch --mixed_precision {accelerator.mixed_precision}: kt-sft train sets the "
                "dense dtype with --dtype; launch with --mixed_precision no"
            )
        if accelerator.distributed_type.name not in ("FSDP", "DEEPSPEED"):  # DeepSpeed asked, on CPU
            raise NotImplementedError(
                "DeepSpeed with host-owner CPU experts is not implemented yet; launch with DDP or FSDP2"
            )
        prepared = kt_accelerate.prepare(accelerator, model, optimizer)[0]
        self.dense_parallel = "fsdp2"  # prepare raised for any other sharding
        return prepared

    @contextmanager
    def whole_model(self, forward_model: nn.Module) -> Iterator[None]:
        """Calls that bypass the root module's forward (generation) see FSDP2's root parameters whole."""
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(forward_model, FSDPModule):
            yield
            return
        forward_model.unshard()
        try:
            yield
        finally:
            forward_model.reshard()

    # -- each step --------------------------------------------------------------------------------------

    def shard(self, indices: list[int]) -> list[int]:
        return indices[self.rank :: self.world_size]

    def loss_scale(self, labels: torch.Tensor) -> tuple[float, float, float]:
        """(scale of this rank's mean token loss, its label tokens, the global batch's label tokens).

        With the scale, DDP's average over ranks is the mean over the global batch's label tokens.
        """
        tokens = float((labels[:, 1:] != IGNORE_INDEX).sum())
        if not self.distributed:
            return 1.0, tokens, tokens
        total = float(self._all_reduce(torch.tensor([tokens], dtype=torch.float64), "label token count")[0])
        return tokens * self.world_size / total, tokens, total

    def global_mean(self, loss: torch.Tensor, tokens: float, total: float) -> float:
        """The global batch's mean loss from this rank's mean `loss` over its `tokens`."""
        if not self.distributed:
            return float(loss)
        summed = self._all_reduce(torch.tensor([float(loss) * tokens], dtype=torch.float64), "loss")
        return float(summed[0]) / total

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, True when it is True on any rank (one tiny all-reduce)."""
        if not self.distributed:
            return tuple(flags)
        import torch.distributed as dist

        tensor = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_control_group(), async_op=True)
        self._wait(work, "the step decision all-reduce")
        return tuple(bool(v) for v in tensor.tolist())

    def _wait(self, work: object, what: str) -> None:
        from .. import distributed

        runtime = distributed.current_runtime()
        if runtime is not None:
            runtime.wait([work], what)
        else:
            work.wait()  # type: ignore[attr-defined]

    def _all_reduce(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        import torch.distributed as dist

        from .. import distributed

        work = dist.all_reduce(tensor, group=_control_group(), async_op=True)
        runtime = distributed.current_runtime()
        if runtime is not None:
            runtime.wait([work], f"the {what} all-reduce")
        else:
            work.wait()
        return tensor

    def clip_grad_norm_(self, model: nn.Module, parameters: list[nn.Parameter], max_norm: float) -> float:
        if not self.distributed:
            return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        from .. import distributed

        return float(distributed.clip_grad_norm_(model, max_norm))

    def barrier(self) -> None:
        if not self.distributed:
            return
        import torch.distributed as dist

        from .. import distributed

        runtime = distributed.current_runtime()
        work = dist.barrier(group=_control_group(), async_op=True)
        if runtime is not None:
            runtime.wait([work], "waiting for rank 0 to write its files")
        else:
            work.wait()

    def finish(self) -> None:
        if not self.distributed:
            return
        import torch.distributed as dist

        from .. import distributed

        self.barrier()
        distributed.shutdown()
        dist.destroy_process_group()


def launched_with_sharding() -> bool:
    """`accelerate launch` asked for FSDP or DeepSpeed (its ACCELERATE_USE_* variables, read with its own
    parser); otherwise several ranks run DDP."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP") or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def _control_group() -> object:
    """The host-owner runtime's gloo group over all ranks (for host tensors), else the default group."""
    from .. import distributed

    runtime = distributed.current_runtime()
    return None if runtime is None else runtime.control_group
