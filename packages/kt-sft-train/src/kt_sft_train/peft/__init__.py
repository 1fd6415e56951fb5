"""PEFT integration: the LoraConfig helper, the takeover of PEFT's wrappers around KTExperts, and the
one decoder of PEFT's 3-D expert-LoRA layout (DESIGN.md §4.4)."""

from .config import kt_lora_config
from .layout import per_expert_factors
from .takeover import ensure_peft_takeover, is_taken_over, take_over_peft_wrappers

__all__ = [
    "ensure_peft_takeover",
    "is_taken_over",
    "kt_lora_config",
    "per_expert_factors",
    "take_over_peft_wrappers",
]
