"""Integrations with the Hugging Face training stack.

accelerate works stock (KTExperts keep the experts and their LoRA on the host through `prepare`); for
`transformers.Trainer` and TRL's trainers, `KTTimeSplitCallback` reports where each step's time went,
and `KTTrainer` / `HostOwnerTrainerMixin` run them on several processes with host-owner experts.
"""

from .trainer import HostOwnerTrainerMixin, KTTimeSplitCallback, KTTrainer, host_owner_config

__all__ = ["HostOwnerTrainerMixin", "KTTimeSplitCallback", "KTTrainer", "host_owner_config"]
