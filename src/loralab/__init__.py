"""loralab: a config-driven experiment framework for LoRA research."""

__version__ = "0.1.0"
