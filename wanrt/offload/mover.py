"""Block offload: the DiT blocks in host memory (pinned on CUDA), streamed through a few device slots.

:class:`BlockMover` keeps the first ``resident`` blocks on the device and streams the others through ``window``
slots, each slot one device byte arena the size of the largest streamed block, allocated once (a block's
parameters and buffers are views of it at 64-byte aligned offsets, so blocks of different shapes and dtypes, as in
a GGUF file that mixes quantization types, share the slots). The
streamed blocks form a cycle that continues across forwards (the next forward's first blocks are copied while the
current forward's last ones compute). With ``k = window - 1``::

    before block S[m] computes:  issue the copy of S[m + k] into the slot S[m - 1] used
                                 (on the copy stream, after S[m - 1]'s compute finished: an event);
                                 make the compute stream wait for S[m]'s copy (an event)
    after  block S[m] computes:  record its compute-finished event on its slot

so block ``S[m + k]``'s copy is issued before ``S[m]`` computes and waited on before ``S[m + k]`` computes; each
streamed block is copied once per forward; a forward that does not run (a TeaCache-skipped step) moves nothing. A
block's module tensors point at its slot while it is in one (``param.data`` swaps a pointer: nothing is
allocated per step) and at its host copy otherwise.

On the CPU (tests) the copies run synchronously and the events are skipped; the order of operations is the same and
can be recorded (``recorder``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

_ALIGN = 64  # bytes: where each tensor of a block starts in a slot

#: ``recorder(event, block, position)``: ``event`` is "issue", "wait", "compute", "done".
Recorder = Callable[[str, int, int], None]
#: ``reader(block, names, buffers)``: write block ``block``'s tensors (its qualified state-dict names) into
#: ``buffers`` (disk placement: :class:`wanrt.offload.disk.DiskBlocks`).
Reader = Callable[[int, list[str], list[torch.Tensor]], None]


def _tensors(block: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """Every parameter and buffer of ``block`` as ``(owning module, name, is_parameter)``, in a fixed order."""
    out = []
    for module in block.modules():
        out += [(module, name, True) for name, p in module.named_parameters(recurse=False) if p is not None]
        out += [(module, name, False) for name, b in module.named_buffers(recurse=False) if b is not None]
    return out


def _path(root: nn.Module, module: nn.Module) -> str:
    """The qualified name of ``module`` inside ``root``."""
    for name, m in root.named_modules():
        if m is module:
            return name
    raise ValueError("module not inside the block")


def _qualified(blocks: nn.ModuleList, i: int, entries) -> list[str]:
    """The state-dict names (below ``blocks``) of block ``i``'s ``entries`` (from :func:`_tensors`)."""
    return [f"{i}.{name}" if module is blocks[i] else f"{i}.{_path(blocks[i], module)}.{name}"
            for module, name, _ in entries]


def read_blocks(blocks: nn.ModuleList, indices, reader: Reader, device: torch.device) -> None:
    """Give blocks ``indices`` real tensors on ``device``, filled by ``reader`` (disk placement: the blocks were
    loaded as placeholders, ``load_transformer(defer_blocks=True)``)."""
    for i in indices:
        entries = _tensors(blocks[i])
        bufs = [torch.empty(_get(m, n, p).shape, dtype=_get(m, n, p).dtype, device=device) for m, n, p in entries]
        reader(i, _qualified(blocks, i, entries), bufs)
        for (module, name, is_param), buf in zip(entries, bufs):
            _point(module, name, is_param, buf)


def _get(module: nn.Module, name: str, is_param: bool) -> torch.Tensor:
    return module._parameters[name] if is_param else module._buffers[name]


def _point(module: nn.Module, name: str, is_param: bool, data: torch.Tensor) -> None:
    """Make the module's tensor ``name`` use ``data``'s memory (no copy, no allocation)."""
    if is_param:
        module._parameters[name].data = data
    else:
        module._buffers[name] = data


class BlockMover:
    """Streams ``blocks[resident:]`` of a DiT through ``window`` device slots (see the module docstring).

    Args:
        blocks: the DiT's blocks, on the CPU (host memory); they may differ in shapes and dtypes (each slot is a
            byte arena the size of the largest streamed block).
        device: where they compute.
        resident: the first blocks kept on ``device`` for good.
        window: device slots for the streamed blocks (>= 2).
        pin: pin the host copies (default: when ``device`` is CUDA); each tensor is pinned in place of the
            unpinned one, so host memory holds one copy of the weights.
        recorder: optional ``recorder(event, block, position)`` of the schedule.
        reader: disk placement: the streamed blocks' tensors are not kept in host memory (their module tensors are
            released); each copy reads the block with ``reader(block, names, buffers)`` into a staging buffer (one
            per slot, pinned on CUDA; on the CPU straight into the slot), so host memory holds ``window`` blocks.

    Raises:
        ValueError: ``window < 2``, ``resident`` out of range.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device, resident: int, window: int = 2, *,
                 pin: bool | None = None, recorder: Recorder | None = None, reader: Reader | None = None):
        n = len(blocks)
        if window < 2:
            raise ValueError(f"window must be >= 2 (one block computing, one arriving), got {window}")
        if not 0 <= resident <= n:
            raise ValueError(f"resident must be in 0..{n}, got {resident}")
        self.device = torch.device(device)
        self.blocks, self.resident, self.recorder = blocks, resident, recorder
        self.streamed = list(range(resident, n))
        self.window = min(window, len(self.streamed)) if self.streamed else 0
        self.cuda = self.device.type == "cuda"
        pin = self.cuda if pin is None else pin
        self.moved_bytes = 0  # host->device bytes copied so far
        self.copies = 0
        if reader is not None:  # disk placement: the resident blocks are read once from the file
            read_blocks(blocks, range(resident), reader, self.device)
        for i in range(resident):
            blocks[i].to(self.device)
        self._entries = [_tensors(blocks[i]) for i in range(n)]
        self._names = [_qualified(blocks, i, self._entries[i]) for i in range(n)]
        self.reader = reader
        self._host: dict[int, list[torch.Tensor]] = {}
        # Each block's layout in a slot: its tensors at 64-byte aligned offsets of one byte arena, so blocks of
        # different shapes and dtypes (a GGUF Q4_K_M file mixes Q4_K and Q6_K Linears) share the slots.
        self._layout: dict[int, list[tuple[int, torch.Size, torch.dtype]]] = {}
        self._bytes: dict[int, int] = {}
        arena = 0  # bytes of a slot
        for i in self.streamed:
            host, layout, offset, size = [], [], 0, 0
            for module, name, is_param in self._entries[i]:
                t = _get(module, name, is_param)
                layout.append((offset, t.shape, t.dtype))
                offset += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
                size += t.numel() * t.element_size()
                if reader is not None:  # released: a one-element placeholder of the right shape until read
                    t = torch.zeros((), dtype=t.dtype).expand(t.shape)
                else:
                    t = t.detach().to("cpu")
                    if pin:
                        t = t.pin_memory()
                _point(module, name, is_param, t)
                host.append(t)
            self._host[i], self._layout[i], self._bytes[i] = host, layout, size
            arena = max(arena, offset)
        self.block_bytes = max(self._bytes.values(), default=0)  # the largest streamed block
        self._slots = [torch.empty(arena, dtype=torch.uint8, device=self.device) for _ in range(self.window)]
        self._staging = None  # disk placement on CUDA: pinned host arenas the reader fills, one per slot
        if reader is not None and self.cuda:
            self._staging = [torch.empty(arena, dtype=torch.uint8).pin_memory() for _ in range(self.window)]
        self._views: dict[tuple[int, int, int], list[torch.Tensor]] = {}  # (arenas, slot, block) -> views
        self._occupant: list[int | None] = [None] * self.window  # the block whose tensors point at each slot
        self._copy_done = [None] * self.window
        self._compute_done = [None] * self.window
        if self.cuda:
            self._stream = torch.cuda.Stream(self.device)
            self._copy_done = [torch.cuda.Event() for _ in range(self.window)]
            self._compute_done = [torch.cuda.Event() for _ in range(self.window)]
        self._issued = 0  # positions (in the endless cycle of streamed blocks) whose copy was issued
        self._position = 0  # the position of the next streamed block to compute
        self._ensure(self._position + self.window - 1)  # the first forward's first blocks

    # ------------------------------------------------------------------ the cycle of streamed blocks
    def _block_at(self, position: int) -> int:
        return self.streamed[position % len(self.streamed)]

    def _issue(self, position: int) -> None:
        """Copy the block of ``position`` into slot ``position % window`` (after the slot's last compute)."""
        slot = position % self.window
        block = self._block_at(position)
        old = self._occupant[slot]
        if old is not None:  # the previous occupant goes back to its host copy
            for (module, name, is_param), host in zip(self._entries[old], self._host[old]):
                _point(module, name, is_param, host)
        bufs = self._view(self._slots, slot, block)
        host = self._host[block]
        if self.reader is not None and self._staging is None:  # CPU: the slot is host memory: read straight into it
            self.reader(block, self._names[block], bufs)
        elif self.cuda:
            if self.reader is not None:  # disk placement on CUDA: through the slot's pinned staging buffers
                self._copy_done[slot].synchronize()  # their last copy to the device has finished
                host = self._view(self._staging, slot, block)
                self.reader(block, self._names[block], host)
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(self._compute_done[slot])  # the slot's last block has computed
                for dst, src in zip(bufs, host):
                    dst.copy_(src, non_blocking=True)
                self._copy_done[slot].record(self._stream)
        else:  # CPU, weights in host memory
            for dst, src in zip(bufs, host):
                dst.copy_(src)
        for (module, name, is_param), buf in zip(self._entries[block], bufs):
            _point(module, name, is_param, buf)
        self._occupant[slot] = block
        self.moved_bytes += self._bytes[block]
        self.copies += 1
        if self.recorder is not None:
            self.recorder("issue", block, position)

    def _view(self, arenas: list[torch.Tensor], slot: int, block: int) -> list[torch.Tensor]:
        """Block ``block``'s tensors laid out in ``arenas[slot]`` (views, made once per slot and block)."""
        key = (id(arenas), slot, block)
        views = self._views.get(key)
        if views is None:
            arena = arenas[slot]
            views = [arena[off: off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                     for off, shape, dtype in self._layout[block]]
            self._views[key] = views
        return views

    def _ensure(self, last: int) -> None:
        """Issue every copy up to ``position`` ``last``."""
        while self._issued <= last:
            self._issue(self._issued)
            self._issued += 1

    # ------------------------------------------------------------------ hooks of WanDiT.run_blocks
    def before(self, i: int) -> None:
        """Block ``i`` is about to compute (its modulation is read first): prefetch, then wait for its copy."""
        if i < self.resident:
            return
        p = self._position
        if self._block_at(p) != i:
            raise RuntimeError(f"block offload: block {i} computes out of order (expected block {self._block_at(p)})")
        self._ensure(p + self.window - 1)  # S[m + k]: issued before S[m] computes
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._copy_done[p % self.window])
        if self.recorder is not None:
            self.recorder("wait", i, p)
            self.recorder("compute", i, p)

    def after(self, i: int) -> None:
        """Block ``i`` has been issued on the compute stream: its slot is free once that work finishes."""
        if i < self.resident:
            return
        p = self._position
        if self.cuda:
            self._compute_done[p % self.window].record(torch.cuda.current_stream(self.device))
        if self.recorder is not None:
            self.recorder("done", i, p)
        self._position += 1

    def slot_of(self, t: torch.Tensor) -> int | None:
        """The slot whose memory ``t`` lies in, or None (a host copy, a placeholder, a resident block)."""
        p = t.data_ptr()
        for k, arena in enumerate(self._slots):
            if arena.data_ptr() <= p < arena.data_ptr() + arena.numel():
                return k
        return None

    def stats(self) -> dict:
        """``{"resident", "streamed", "window", "block_bytes" (the largest streamed block), "copies",
        "moved_bytes"}``."""
        return {"resident": self.resident, "streamed": len(self.streamed), "window": self.window,
                "block_bytes": self.block_bytes, "copies": self.copies, "moved_bytes": self.moved_bytes}
