"""kt-sft-train: Hugging Face native MoE LoRA fine-tuning with CPU experts."""

__version__ = "0.1.0"
