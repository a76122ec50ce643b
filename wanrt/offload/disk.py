"""Disk placement: the streamed DiT blocks are read from the checkpoint file when they are copied, instead of being
held in host memory (LightX2V's disk → CPU → GPU tier, for hosts with little RAM).

:class:`DiskBlocks` is the ``reader`` of :class:`~wanrt.offload.mover.BlockMover`: safetensors files are memory-mapped
(``safe_open``), each tensor of a block is read and converted into the staging buffer the mover hands it, with the
loader's key map (official, diffusers and ComfyUI-prefixed files alike) and its dtype rule, so the weights are the
ones ``load_transformer`` gives, bit for bit. Host memory: the staging buffers plus one tensor in flight.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoints.io import CheckpointError, open_tensor_source


class DiskBlocks:
    """``reader(block, names, buffers)`` over the DiT weights of checkpoint ``path``.

    Raises:
        CheckpointError: a block tensor the checkpoint does not hold (names the file and key); a checkpoint stored
            8-bit (disk placement streams float weights).
    """

    def __init__(self, path):
        from ..checkpoints.loaders import _dit_key_mapper, _resolve_dit

        weights, _ = _resolve_dit(Path(path))
        self.source = open_tensor_source(weights)
        _, mapper = _dit_key_mapper(self.source.keys())
        self._key: dict[str, str] = {}
        for k in self.source.keys():
            try:
                official = mapper(k)
            except (KeyError, ValueError):
                continue
            if official is not None and official.startswith("blocks."):
                self._key[official] = k
                if self.source.dtype_name(k) in ("F8_E4M3", "F8_E5M2", "I8"):
                    raise CheckpointError("disk placement streams float weights; this checkpoint stores 8-bit ones "
                                          "(load it without offload_to_disk)", self.source.file_of(k), k)
        self.bytes_read = 0

    def __call__(self, block: int, names: list[str], buffers: list[torch.Tensor]) -> None:
        for name, buf in zip(names, buffers, strict=True):
            key = self._key.get(f"blocks.{name}")
            if key is None:
                raise CheckpointError("checkpoint lacks a block tensor", self.source.describe(), f"blocks.{name}")
            t = self.source.get(key)  # read from the mapped file
            buf.copy_(t)  # converted to the module's dtype (round to nearest even, as the loader's .to)
            self.bytes_read += t.numel() * t.element_size()
            del t

    def close(self) -> None:
        """Release the file handles."""
        self.source.close()
