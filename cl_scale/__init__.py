"""cl-scale: continual learning of LLMs with LoRA-branch methods on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
