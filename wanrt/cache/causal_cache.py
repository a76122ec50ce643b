"""The Wan-VAE causal feature cache as an explicit state object.

The Wan-VAE (``wan/modules/vae.py``) runs its encoder on chunks of 1, 4, 4, ... frames and its
decoder on one latent frame at a time. Every temporally causal layer keeps the last frames of its
previous input so that the next chunk sees the same receptive field as a run over the whole video.
The official code keeps this in a list ``feat_cache`` indexed by a mutable counter ``feat_idx`` that
every layer increments, with the string ``'Rep'`` as a sentinel for "first chunk seen".

Here each layer that needs a cache gets a fixed slot number once, when its model is built
(:func:`assign_cache_slots`), and a :class:`CausalCache` holds one :class:`CacheSlot` per slot with an
explicit :class:`SlotState`. The cache object is passed through ``forward`` explicitly; there is no
counter to reset between chunks and no global state. One cache serves one encode or one decode of
one batch of videos; :meth:`CausalCache.reset` (or a new cache) starts the next one.

Slot semantics (``CACHE_T = 2``, docs/model-reference.md §4.5):

* ``EMPTY``: no chunk has passed this layer yet.
* ``REPLICATE``: only an ``upsample3d`` layer uses it. The first chunk passed and the layer skipped its
  ``time_conv``, so latent frame 0 decodes to a single frame (the official ``'Rep'``). On the next
  chunk, the frames missing from the new cache entry are zeros.
* ``FRAMES``: ``frames`` holds the last frames of the previous input(s) of the layer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CACHE_T", "SlotState", "CacheSlot", "CausalCache", "assign_cache_slots"]

CACHE_T = 2
"""Frames kept per slot by a causal convolution with temporal kernel 3 (official ``CACHE_T``)."""


class SlotState(enum.Enum):
    """What a cache slot holds (see the module docstring)."""

    EMPTY = enum.auto()
    REPLICATE = enum.auto()
    FRAMES = enum.auto()


@dataclass
class CacheSlot:
    """One layer's cached state.

    Attributes:
        state: the slot's :class:`SlotState`.
        frames: ``[B, C, n, H, W]`` with ``1 <= n <= CACHE_T`` when ``state`` is ``FRAMES``, else ``None``.
    """

    state: SlotState = SlotState.EMPTY
    frames: torch.Tensor | None = None


class CausalCache:
    """Per-layer frame caches for chunked causal 3D convolution (one slot per cached layer).

    Build one with :meth:`for_module` from a module whose cached layers were numbered by
    :func:`assign_cache_slots` (the Wan-VAE encoder has 24 slots, the decoder 32; the official
    ``count_conv3d`` gives 26 and 33 because it also counts the never-cached 1x1x1 shortcuts).

    Args:
        num_slots: number of slots, one per cached layer.

    Raises:
        ValueError: if ``num_slots`` is negative.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        self._slots = [CacheSlot() for _ in range(num_slots)]

    @classmethod
    def for_module(cls, module: nn.Module) -> CausalCache:
        """Creates an empty cache with one slot per cached layer of ``module``.

        A cached layer is a submodule with ``needs_cache_slot = True``; its ``cache_slot`` attribute
        is its slot number, set by :func:`assign_cache_slots`.

        Raises:
            ValueError: if a cached layer has no slot yet, or the slots are not exactly ``0..n-1``
                (e.g. a module holding both the VAE encoder and decoder, whose slots overlap).
        """
        slots = []
        for name, m in module.named_modules():
            if getattr(m, "needs_cache_slot", False):
                slot = getattr(m, "cache_slot", None)
                if slot is None:
                    raise ValueError(f"cached layer {name!r} has no slot; call assign_cache_slots() first")
                slots.append(slot)
        if sorted(slots) != list(range(len(slots))):
            raise ValueError(
                f"cache slots of {type(module).__name__} are not 0..{len(slots) - 1} (duplicates or gaps); "
                "build one cache per encoder/decoder"
            )
        return cls(len(slots))

    def __len__(self) -> int:
        return len(self._slots)

    def __repr__(self) -> str:
        counts = {s: 0 for s in SlotState}
        for slot in self._slots:
            counts[slot.state] += 1
        parts = ", ".join(f"{s.name.lower()}={n}" for s, n in counts.items())
        return f"CausalCache(slots={len(self)}, {parts}, nbytes={self.nbytes})"

    @property
    def is_fresh(self) -> bool:
        """True when no chunk has been seen yet (every slot ``EMPTY``)."""
        return all(s.state is SlotState.EMPTY for s in self._slots)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached frames."""
        return sum(s.frames.numel() * s.frames.element_size() for s in self._slots if s.frames is not None)

    def state(self, slot: int) -> SlotState:
        """The :class:`SlotState` of ``slot``."""
        return self._slots[slot].state

    def frames(self, slot: int) -> torch.Tensor | None:
        """The cached frames of ``slot`` (``[B, C, n, H, W]``), or ``None`` unless ``FRAMES``."""
        return self._slots[slot].frames

    def mark_replicate(self, slot: int) -> None:
        """Records that an ``upsample3d`` layer saw its first chunk and skipped its time_conv.

        Raises:
            RuntimeError: if the slot is not ``EMPTY``.
        """
        entry = self._slots[slot]
        if entry.state is not SlotState.EMPTY:
            raise RuntimeError(f"slot {slot} is {entry.state.name}, expected EMPTY")
        entry.state = SlotState.REPLICATE

    def push(self, slot: int, x: torch.Tensor, num_frames: int = CACHE_T) -> torch.Tensor | None:
        """Stores the last ``num_frames`` frames of a layer input and returns the previous entry.

        The new entry is ``x[:, :, -num_frames:]``. When ``x`` has fewer frames than that, the missing
        leading frames come from the previous entry (state ``FRAMES``), are zeros (state
        ``REPLICATE``), or are left out (state ``EMPTY``: the entry is shorter). This is the official
        rule ``cache_x = x[:, :, -CACHE_T:]`` plus "prepend the old cache's last frame" / "prepend
        zeros after 'Rep'", generalized from one missing frame to ``num_frames - T``.

        Args:
            slot: the layer's slot number.
            x: the layer input, ``[B, C, T, H, W]``, ``T >= 1``, any dtype/device.
            num_frames: frames to keep (2 for temporal kernel 3; the downsample3d time_conv keeps 1).

        Returns:
            The previous frames ``[B, C, n, H, W]`` to prepend to ``x`` for this chunk, or ``None``
            when the slot was ``EMPTY`` or ``REPLICATE`` (the layer then uses zero padding).
        """
        entry = self._slots[slot]
        prev = entry.frames if entry.state is SlotState.FRAMES else None
        tail = x[:, :, -num_frames:]  # [B, C, min(T, num_frames), H, W]
        missing = num_frames - tail.shape[2]
        if missing > 0 and entry.state is SlotState.FRAMES:
            tail = torch.cat([prev[:, :, -missing:].to(tail), tail], dim=2)
        elif missing > 0 and entry.state is SlotState.REPLICATE:
            zeros = tail.new_zeros((*tail.shape[:2], missing, *tail.shape[3:]))
            tail = torch.cat([zeros, tail], dim=2)
        entry.frames = tail.clone()  # own copy: do not keep the whole chunk alive
        entry.state = SlotState.FRAMES
        return prev

    def reset(self) -> None:
        """Empties every slot (start of a new video)."""
        for entry in self._slots:
            entry.state = SlotState.EMPTY
            entry.frames = None


def assign_cache_slots(module: nn.Module) -> int:
    """Numbers the cached layers of ``module`` 0, 1, ... in ``module.modules()`` order.

    A cached layer is a submodule with ``needs_cache_slot = True``; its slot goes into its
    ``cache_slot`` attribute (a plain int, so meta-device construction and ``load_state_dict`` leave
    it alone). Call it once per independently cached module (the VAE encoder, the decoder).

    Returns:
        The number of slots assigned.
    """
    n = 0
    for m in module.modules():
        if getattr(m, "needs_cache_slot", False):
            m.cache_slot = n
            n += 1
    return n
