"""cgclora_lite: CGC-LoRA and the 1+N multi-task pattern, from scratch in PyTorch."""
__version__ = "0.1.0"
