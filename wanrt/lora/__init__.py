"""LoRAs for the Wan DiT: the formats users download (:mod:`wanrt.lora.formats`), fused or as a runtime low-rank
branch (:mod:`wanrt.lora.apply`). ``Engine.load_lora`` is the usual entry point; :func:`apply_lora` works on a bare
model."""

from .apply import MODES, LoadedLora, LoraManager, apply_lora, manager_of
from .formats import Delta, LoraAdapter, LoraError, read_lora

__all__ = ["MODES", "Delta", "LoadedLora", "LoraAdapter", "LoraError", "LoraManager", "apply_lora", "manager_of",
           "read_lora"]
