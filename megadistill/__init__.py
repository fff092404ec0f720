"""megadistill: knowledge distillation for LLM pre-training on Megatron-core and DeepSpeed."""

__version__ = "0.1.0"
