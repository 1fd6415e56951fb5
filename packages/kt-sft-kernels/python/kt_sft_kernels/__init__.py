"""kt-sft-kernels: CPU MoE expert kernels with LoRA forward/backward. Never imports torch."""

__version__ = "0.1.0"
