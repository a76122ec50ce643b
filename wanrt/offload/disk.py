"""Disk placement: the streamed DiT blocks are read from the checkpoint file when they are copied, instead of being
held in host memory (LightX2V's disk → CPU → GPU tier, for hosts with little RAM).

:class:`DiskBlocks` is the ``reader`` of :class:`~wanrt.offload.mover.BlockMover`. The DiT loads with its blocks
deferred (``load_transformer(defer_blocks=True)``: checked in the header, never read), and each copy reads a block's
tensors with the loader's key map (official, diffusers and ComfyUI-prefixed files alike) and its dtype rule, so the
weights are the ones ``load_transformer`` gives, bit for bit.

Safetensors files are read with ``pread`` at the offsets of their header straight into the buffer the mover hands
over (the pinned staging buffer on CUDA, the slot itself on the CPU) when the stored dtype is the model's, through
one temporary tensor and a rounding cast otherwise. Nothing is memory-mapped, so the process's resident set holds
the staging ring and no file page (the kernel's page cache may keep them; it is not the process's memory). Other
files (a ``.pth``) go through the loader's tensor source.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoints.io import CheckpointError, open_tensor_source

_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def safetensors_offsets(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """``key -> (dtype name, shape, first byte, end byte)`` of a safetensors file, from its header (8 bytes of
    little-endian header length, then the JSON header; offsets relative to the data after it).

    Raises:
        CheckpointError: a header that is not a safetensors header (names the file).
    """
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        base = 8 + n
        return {k: (v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
                for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read the safetensors header: {e}", path) from e


class DiskBlocks:
    """``reader(block, names, buffers)`` over the DiT weights of checkpoint ``path``.

    Raises:
        CheckpointError: a block tensor the checkpoint does not hold, or whose size changed since the load, a short
            read (names the file and key); a checkpoint stored 8-bit (disk placement streams float weights).
    """

    def __init__(self, path):
        from ..checkpoints.loaders import _dit_key_mapper, _resolve_dit

        weights, _ = _resolve_dit(Path(path))
        self.source = open_tensor_source(weights)
        _, mapper = _dit_key_mapper(self.source.keys())
        self._key: dict[str, str] = {}
        self._at: dict[str, tuple[int, str, tuple[int, ...], int, int]] = {}  # key -> (fd, dtype, shape, start, end)
        self._fds: dict[Path, int] = {}
        headers: dict[Path, dict] = {}
        for k in self.source.keys():
            try:
                official = mapper(k)
            except (KeyError, ValueError):
                continue
            if official is None or not official.startswith("blocks."):
                continue
            self._key[official] = k
            file = Path(self.source.file_of(k))
            if self.source.dtype_name(k) in ("F8_E4M3", "F8_E5M2", "I8"):
                raise CheckpointError("disk placement streams float weights; this checkpoint stores 8-bit ones "
                                      "(load it without offload_to_disk)", file, k)
            if file.suffix == ".safetensors":
                if file not in headers:
                    headers[file] = safetensors_offsets(file)
                    self._fds[file] = os.open(file, os.O_RDONLY)
                dtype, shape, start, end = headers[file][k]
                if dtype in _FLOAT_DTYPES:
                    self._at[k] = (self._fds[file], dtype, shape, start, end)
        self.bytes_read = 0

    def _pread(self, key: str, out: torch.Tensor) -> None:
        """Fill contiguous CPU ``out`` (exactly the tensor's bytes) from the file."""
        fd, _, _, start, end = self._at[key]
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        done = 0
        while done < end - start:
            n = os.preadv(fd, [view[done:]], start + done)
            if n <= 0:
                raise CheckpointError(f"short read ({done} of {end - start} bytes)", self.source.file_of(key), key)
            done += n

    def __call__(self, block: int, names: list[str], buffers: list[torch.Tensor]) -> None:
        for name, buf in zip(names, buffers, strict=True):
            key = self._key.get(f"blocks.{name}")
            if key is None:
                raise CheckpointError("checkpoint lacks a block tensor", self.source.describe(), f"blocks.{name}")
            at = self._at.get(key)
            if at is None:  # not a float safetensors tensor: through the tensor source
                t = self.source.get(key)
                buf.copy_(t)
                self.bytes_read += t.numel() * t.element_size()
                continue
            _, dtype, shape, start, end = at
            stored = _FLOAT_DTYPES[dtype]
            if tuple(shape) != tuple(buf.shape) or end - start != buf.numel() * stored.itemsize:
                raise CheckpointError(f"block tensor of shape {list(shape)} in the file, {list(buf.shape)} in the "
                                      "model (the file changed since the load?)", self.source.file_of(key), key)
            if stored == buf.dtype and buf.is_contiguous() and buf.device.type == "cpu":
                self._pread(key, buf)  # straight into the slot or staging buffer
            else:
                tmp = torch.empty(buf.shape, dtype=stored)
                self._pread(key, tmp)
                buf.copy_(tmp)  # converted to the module's dtype (round to nearest even, as the loader's .to)
            self.bytes_read += end - start

    def close(self) -> None:
        """Release the file handles."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.source.close()
