"""vdep: train LLaVA-style multimodal LLMs with VDEP under DeepSpeed."""

__version__ = "0.1.0"
