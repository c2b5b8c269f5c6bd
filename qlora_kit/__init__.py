"""qlora-kit: QLoRA fine-tuning for domain experts."""

__version__ = "0.1.0"
