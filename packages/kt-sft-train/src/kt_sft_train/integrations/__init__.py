"""Integrations with the Hugging Face training stack.

accelerate works stock (KTExperts keep the experts and their LoRA on the host through `prepare`); for
`transformers.Trainer` and TRL's trainers, `KTTimeSplitCallback` reports where each step's time went.
"""

from .trainer import KTTimeSplitCallback

__all__ = ["KTTimeSplitCallback"]
