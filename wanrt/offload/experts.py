"""Wan2.2 A14B's two experts on one device: both resident, or one at a time with the other in host memory.

The high-noise expert runs the first steps, the low-noise one the rest (:class:`wanrt.sampling.loop.ExpertStep`);
each is a whole 14B DiT (28 GB in bf16), so on a card that cannot hold both the inactive expert waits in pinned
host memory and the two trade places at the boundary, once per video each way (the official code's
``offload_model`` does the same with ``model.to("cpu")``). The swap moves every parameter and buffer with
``Module._apply``, so quantized layers (fp8/int8 weights and scales) and LoRA-fused weights travel as they are:
an expert leaving the device is copied back to the host (a fused LoRA written while it was resident is kept).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("wanrt")

#: Device memory kept free beside both experts before they are both made resident (activations, the VAE, caches).
RESERVE_BYTES = 8 << 30


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def should_swap(experts: tuple[nn.Module, nn.Module], device: torch.device, requested: bool | None) -> bool:
    """Whether the experts take turns on ``device``: as ``requested`` (True/False), or (None) when the second
    expert does not fit in the device's free memory with :data:`RESERVE_BYTES` to spare (never off CUDA: host
    memory holds both)."""
    if requested is not None:
        return bool(requested)
    device = torch.device(device)
    if device.type != "cuda":
        return False
    free = torch.cuda.mem_get_info(device)[0]
    resident = sum(module_bytes(e) for e in experts if any(p.device.type == "cuda" for p in e.parameters()))
    missing = sum(module_bytes(e) for e in experts) - resident
    return missing + RESERVE_BYTES > free


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` (pinned when CUDA is present, so the next upload is asynchronous)."""
    pin = torch.cuda.is_available()
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
    return out.copy_(t)


class ExpertSwap:
    """The two experts' placement: both on ``device``, or (``swap``) one at a time.

    Args:
        experts: ``(high_noise, low_noise)`` DiTs, loaded on the host when ``swap`` (else where they are).
        device: the compute device.
        swap: keep one expert on ``device`` at a time.

    Attributes:
        active: the index of the expert on the device (None before the first :meth:`activate` under swap).
        swaps: how many times an expert was uploaded.
        moved_bytes: bytes moved host->device by the swaps.
    """

    def __init__(self, experts: tuple[nn.Module, nn.Module], device: torch.device, swap: bool):
        self.experts = tuple(experts)
        self.device = torch.device(device)
        self.swap = bool(swap)
        self.active: int | None = None
        self.swaps = 0
        self.moved_bytes = 0
        if self.swap:
            for e in self.experts:
                self._evict(e)

    def activate(self, i: int) -> None:
        """Put expert ``i`` (0 high-noise, 1 low-noise) on the device, the other in host memory (under swap);
        a no-op when it is there already or without swap."""
        if i not in (0, 1):
            raise ValueError(f"expert index must be 0 (high noise) or 1 (low noise), got {i!r}")
        if not self.swap or self.active == i:
            self.active = i
            return
        if self.active is not None:
            self._evict(self.experts[self.active])
        self._upload(self.experts[i])
        self.active = i
        self.swaps += 1
        self.moved_bytes += module_bytes(self.experts[i])

    def _upload(self, module: nn.Module) -> None:
        dev = self.device
        # On the host itself a distinct copy stands for the device's, so the swap is real (and testable) there too.
        module._apply(lambda t: t.to(dev, non_blocking=True) if dev.type != "cpu" else t.clone())
        _reset_caches(module)

    def _evict(self, module: nn.Module) -> None:
        module._apply(_to_host)
        _reset_caches(module)

    def describe(self) -> str:
        return "one expert on the device at a time (the other in host memory)" if self.swap else \
            "both experts on the device"

    def stats(self) -> dict:
        """``{"mode", "swaps", "moved_bytes"}``."""
        return {"mode": "swap" if self.swap else "resident", "swaps": self.swaps, "moved_bytes": self.moved_bytes}


def _reset_caches(module: nn.Module) -> None:
    """Drop the DiT's per-device caches (RoPE tables) after its weights moved."""
    if hasattr(module, "_rope_tables"):
        module._rope_tables = {}
        module._rope_last = None
