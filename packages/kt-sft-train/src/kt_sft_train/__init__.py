"""kt-sft-train: Hugging Face native MoE LoRA fine-tuning with the routed experts on CPU kernels."""

from .arch import MOEArchConfig, MoELayerInfo, UnsupportedModelError, get_moe_arch_config
from .autograd import KTMoEFunction
from .checkpointing import checkpoint, install_checkpoint_regions
from .config import KTConfig, KTConfigError
from .experts import KTExperts, wrap_moe_layers_with_kt_wrapper
from .peft import kt_lora_config, take_over_peft_wrappers
from .reference import ExpertLoRA, moe_forward
from .versions import __version__

__all__ = [
    "ExpertLoRA",
    "KTConfig",
    "KTConfigError",
    "KTExperts",
    "KTMoEFunction",
    "MOEArchConfig",
    "MoELayerInfo",
    "UnsupportedModelError",
    "__version__",
    "checkpoint",
    "get_moe_arch_config",
    "install_checkpoint_regions",
    "kt_lora_config",
    "moe_forward",
    "take_over_peft_wrappers",
    "wrap_moe_layers_with_kt_wrapper",
]
