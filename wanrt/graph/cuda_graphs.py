"""CUDA-graph capture of a denoising step, wrapped from outside the model (style habit 8).

A :class:`StepGraphs` wraps a step function ``fn(*tensors) -> tensor | tuple of tensors`` (typically one DiT
forward). For every *key* the caller builds (e.g. ``(latent shape, batch, backend, precision)``) it owns

* static input buffers, one per input tensor (same shape, dtype and device), into which each call copies its
  inputs;
* one captured graph of ``fn(*static_inputs)``;
* the static outputs that the capture produced; every replay rewrites them in place and returns them.

The host-side logic (scheduler, TeaCache decisions, CFG mixing) stays outside ``fn`` and is never captured.

Keys are kept in a bounded LRU (``max_graphs``). When a capture fails (``fn`` is not capture-safe, no CUDA,
...), a warning with the reason goes to the ``"wanrt"`` logger and that key runs ``fn`` eagerly from then on:
the results are the same, only the launch overhead differs.

How a graph is captured is a :class:`GraphCapturer`; :class:`CudaGraphCapturer` is the real one
(``torch.cuda.CUDAGraph``), and tests pass a fake one that runs on the CPU.

Reference: PyTorch "CUDA Graphs" notes (warm-up on a side stream, ``torch.cuda.graph``, shared memory pools).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["CudaGraphCapturer", "GraphCapturer", "StepGraphs", "graphs_supported"]

log = logging.getLogger("wanrt")

Outputs = torch.Tensor | tuple[torch.Tensor, ...]
"""What a step function returns: one tensor or a tuple of tensors."""


class GraphCapturer(Protocol):
    """How a graph is captured and replayed.

    Contract (what :class:`StepGraphs` relies on):

    * ``capture(fn)`` may call ``fn`` any number of times (warm-up); the **last** call is the one recorded,
      and the tensors that call returned are the graph's static outputs.
    * Recording does not have to execute the work: the static outputs may hold garbage until the first
      ``replay()``.
    * ``replay()`` re-executes the recorded work on the same memory: it reads the current contents of the
      buffers ``fn`` read (the static inputs) and rewrites the recorded outputs in place.
    * ``capture`` raises if ``fn`` cannot be captured; :class:`StepGraphs` then runs that key eagerly.

    A capturer may also define ``device_type: str`` (``"cuda"`` for :class:`CudaGraphCapturer`): inputs on
    another device type are not captured (a CUDA graph records no CPU work, so its replay would do nothing).
    """

    def capture(self, fn: Callable[[], Any]) -> Callable[[], None]:
        """Record ``fn`` and return a ``replay()`` that re-executes it (see the class docstring)."""
        ...


class CudaGraphCapturer:
    """Captures with ``torch.cuda.CUDAGraph``; all graphs of one capturer share one memory pool.

    ``capture(fn)`` follows the PyTorch recipe: run ``fn`` ``warmup`` times on a side stream (which waits on
    the current stream before, and is waited on after), so that lazy initialisation (cuBLAS workspaces,
    Triton autotuning, allocator growth) happens outside the capture; then record one call with
    ``torch.cuda.graph(graph, pool=self.pool)`` and return ``graph.replay``.

    Memory pool: ``self.pool`` is one ``torch.cuda.graph_pool_handle()``, created at the first capture and
    passed to every capture, so the graphs of a wrapper (one per shape key) reuse each other's freed
    intermediate memory instead of each holding a private pool. The price: a graph's intermediates may lie
    where a graph captured *later* keeps its outputs, so replaying one key can overwrite the outputs of
    another. :class:`StepGraphs` therefore documents its outputs as valid only until its next call (any key).
    The graphs must never be replayed concurrently.

    Not thread-safe; a CUDA graph capture is process-wide (``capture_error_mode="global"``): no other thread
    may issue CUDA work while a capture runs.

    Args:
        warmup: Eager runs of ``fn`` on the side stream before the capture (>= 1; PyTorch's docs use 3, we
            default to 2 because one DiT step at full size is not cheap).
        device: CUDA device to capture on; ``None`` uses the current device. The inputs of ``fn`` must be on
            this device.

    Raises:
        ValueError: ``warmup < 1``.
    """

    device_type = "cuda"

    def __init__(self, *, warmup: int = 2, device: str | torch.device | None = None):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (PyTorch requires warm-up runs before a capture), got {warmup}")
        self.warmup = warmup
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type != "cuda":
            raise ValueError(f"CudaGraphCapturer needs a CUDA device, got {self.device}")
        self.pool: Any = None

    def capture(self, fn: Callable[[], Any]) -> Callable[[], None]:
        """Warm ``fn`` up on a side stream, record one call into a new graph, return its ``replay``.

        Args:
            fn: Capture-safe closure over static buffers (see :class:`StepGraphs`).

        Returns:
            ``graph.replay`` of the new ``torch.cuda.CUDAGraph`` (it keeps the graph alive).

        Raises:
            RuntimeError: CUDA is not available, or the capture failed (e.g. ``fn`` synchronized with the host).
            Exception: whatever ``fn`` raises during the warm-up.
        """
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need CUDA, and torch.cuda.is_available() is False")
        with torch.cuda.device(self.device):  # a no-op for None
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                fn()
        return graph.replay


@dataclass
class _Entry:
    """One captured key: its static buffers and its replay."""

    static_inputs: tuple[torch.Tensor, ...]
    outputs: Outputs
    replay: Callable[[], None]


class StepGraphs:
    """Captures ``fn`` once per key and replays it; inputs are copied into static buffers, outputs are static.

    First call for a key: allocate static input buffers (``torch.empty_like`` of each input: same shape, dtype
    and device), copy the inputs in, capture ``fn(*static_inputs)`` with the capturer, replay it once and
    return its static outputs. Later calls for the key: check that the inputs match the static buffers, copy
    them in, replay, return the same static output tensors.

    **Outputs are static.** The returned tensors are the same objects on every call of a key, and they are
    overwritten by the next call of this wrapper with the same key, and possibly by a call with another key
    too (the graphs share one memory pool, see :class:`CudaGraphCapturer`). Treat them as valid until the
    next call: consume them or ``.clone()`` them (e.g. keep the conditional prediction of a CFG pair).

    **What the caller guarantees about fn** (it runs under capture, then is replayed without Python):

    * it is a function of its tensor inputs and of state that does not change between calls (weights);
      Python values (timestep as a float, flags) belong in the key or in ``fn``'s closure, never read at
      replay time;
    * capture-safe: no host synchronization (``.item()``, ``.cpu()``, printing tensors, ``nonzero``), no CPU
      tensors created inside, no data-dependent control flow, no dynamic shapes, no new allocation outside the
      caching allocator;
    * it uses no RNG (noise is drawn by the caller and passed in as an input);
    * it does not depend on running any number of times: warm-up runs it more than once per capture.

    ``fn`` runs under ``torch.no_grad()`` (captured graphs carry no autograd). The static input buffers are
    normal tensors, so calls may come from inside or outside ``torch.inference_mode()``; outputs captured inside
    it are inference tensors (read them, or clone before an in-place update outside it).

    Every input must be a tensor; the key must encode everything that changes the inputs' shapes, dtypes and
    devices (e.g. ``(shape, batch, backend, precision)``); a mismatch for a captured key raises instead of
    recapturing.

    **Failure.** If ``capturer.capture`` raises, a warning with the reason goes to the ``"wanrt"`` logger, the
    key is remembered as eager-only (never retried; ``fallback_reasons[key]`` holds the reason) and the call,
    like every later call for that key, returns ``fn(*inputs)`` computed eagerly. The eager-only set is
    bounded (``max_eager_keys``, least recently used forgotten first; a forgotten key is tried again).

    **LRU.** At most ``max_graphs`` captured keys; capturing a new one first evicts the least recently used
    (its graph, static inputs and outputs are dropped, so their memory returns to the pool). A replay makes
    a key the most recent.

    Not thread-safe: the Engine serializes calls (and a CUDA capture is process-wide anyway).

    Args:
        fn: The step, ``fn(*tensors) -> tensor | tuple[tensor, ...]``.
        max_graphs: Most captured keys kept (>= 1). Each holds its static inputs, outputs and graph memory.
        capturer: How graphs are captured; default a new :class:`CudaGraphCapturer` (one memory pool for
            this wrapper).
        name: Used in log and error messages.

    Attributes:
        stats: Counts of calls by how they were answered, ``captures`` (captured a new graph, then replayed it
            once), ``replays`` (replayed an existing graph) and ``eager_calls`` (ran ``fn`` eagerly, the call
            whose capture failed included), so these three sum to the number of calls; plus ``fallbacks``
            (captures that failed) and ``evictions`` (graphs dropped by the LRU). ``clear()`` keeps them.
        fallback_reasons: Eager-only key -> why its capture failed, least recent first.
        max_eager_keys: Bound on ``fallback_reasons`` (default 32).

    Raises:
        ValueError: ``max_graphs < 1``.
    """

    max_eager_keys: int = 32

    def __init__(
        self,
        fn: Callable[..., Outputs],
        *,
        max_graphs: int = 4,
        capturer: GraphCapturer | None = None,
        name: str = "dit",
    ):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.fn = fn
        self.max_graphs = max_graphs
        self.capturer: GraphCapturer = capturer if capturer is not None else CudaGraphCapturer()
        self.name = name
        self.stats: dict[str, int] = {"captures": 0, "replays": 0, "evictions": 0, "fallbacks": 0, "eager_calls": 0}
        self.fallback_reasons: OrderedDict[Hashable, str] = OrderedDict()
        self._graphs: OrderedDict[Hashable, _Entry] = OrderedDict()

    @property
    def keys(self) -> list:
        """Captured keys, least recently used first."""
        return list(self._graphs)

    def clear(self) -> None:
        """Drop every captured graph with its buffers, and forget the eager-only keys (``stats`` are kept)."""
        self._graphs.clear()
        self.fallback_reasons.clear()

    def __call__(self, key: Hashable, *inputs: torch.Tensor) -> Outputs:
        """Run the step for ``key`` on ``inputs``: capture on the first call, replay afterwards.

        Args:
            key: Hashable; must determine the shapes, dtypes and devices of ``inputs``.
            *inputs: Tensors only.

        Returns:
            The static output tensor(s) of the key's graph (a tuple if ``fn`` returns a tuple or list), valid
            until the next call of this wrapper; or ``fn(*inputs)`` for an eager-only key.

        Raises:
            TypeError: An input is not a tensor, or ``fn`` returned something other than tensor(s).
            ValueError: The inputs do not match the static buffers captured for ``key``.
        """
        for i, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"{self.name}: input {i} is a {type(x).__name__}, not a torch.Tensor; pass only tensors "
                    "(Python values belong in the key or in fn's closure)"
                )
        with torch.no_grad():
            entry = self._graphs.get(key)
            if entry is not None:
                self._check_match(key, entry.static_inputs, inputs)
                self._graphs.move_to_end(key)
                _load(entry.static_inputs, inputs)
                entry.replay()
                self.stats["replays"] += 1
                return entry.outputs
            if key in self.fallback_reasons:
                self.fallback_reasons.move_to_end(key)
                self.stats["eager_calls"] += 1
                return self.fn(*inputs)
            return self._capture(key, inputs)

    def _capture(self, key: Hashable, inputs: Sequence[torch.Tensor]) -> Outputs:
        reason = self._device_mismatch(inputs)
        if reason is None:
            while len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)
                self.stats["evictions"] += 1
            with torch.inference_mode(False):  # normal tensors: copy_ into them works in and out of inference mode
                static = tuple(torch.empty_like(x) for x in inputs)
            _load(static, inputs)
            produced: list[Any] = []

            def body() -> Any:
                out = self.fn(*static)
                produced[:] = [out]  # the last call is the recorded one
                return out

            try:
                replay = self.capturer.capture(body)
                if not produced:
                    raise RuntimeError(f"{type(self.capturer).__name__}.capture() never called fn")
            except Exception as e:  # noqa: BLE001 - any capture failure means: run this key eagerly
                if produced:
                    _as_outputs(self.name, produced[-1])  # a wrong return type is the caller's bug: raise it
                reason = _describe(e)
            else:
                outputs = _as_outputs(self.name, produced[-1])
                _load(static, inputs)  # warm-up runs may have touched the buffers; capture ran nothing
                replay()
                self._graphs[key] = _Entry(static, outputs, replay)
                self.stats["captures"] += 1
                return outputs
        self.stats["fallbacks"] += 1
        self.fallback_reasons[key] = reason
        while len(self.fallback_reasons) > self.max_eager_keys:
            self.fallback_reasons.popitem(last=False)
        log.warning("%s: CUDA graph capture failed for key %r, running it eagerly: %s", self.name, key, reason)
        self.stats["eager_calls"] += 1
        return self.fn(*inputs)

    def _device_mismatch(self, inputs: Sequence[torch.Tensor]) -> str | None:
        device_type = getattr(self.capturer, "device_type", None)
        for i, x in enumerate(inputs):
            if device_type is not None and x.device.type != device_type:
                return f"input {i} is on {x.device}; {type(self.capturer).__name__} captures {device_type} work only"
        return None

    def _check_match(self, key: Hashable, static: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
        if len(static) != len(inputs):
            raise ValueError(f"{self.name}: key {key!r} was captured with {len(static)} inputs, got {len(inputs)}")
        for i, (s, x) in enumerate(zip(static, inputs, strict=True)):
            if s.shape != x.shape or s.dtype != x.dtype or s.device != x.device:
                raise ValueError(
                    f"{self.name}: input {i} for key {key!r} is {_spec(x)} but the graph was captured for "
                    f"{_spec(s)}; the key must encode every input's shape, dtype and device"
                )

    def __repr__(self) -> str:
        return (
            f"StepGraphs(name={self.name!r}, max_graphs={self.max_graphs}, keys={self.keys!r}, "
            f"eager_keys={list(self.fallback_reasons)!r}, stats={self.stats})"
        )


def graphs_supported(device: str | torch.device) -> tuple[bool, str]:
    """Whether CUDA graphs can be captured on ``device``.

    Args:
        device: A device or its name (``"cuda"``, ``"cuda:1"``, ``"cpu"``).

    Returns:
        ``(True, what was found)`` for a visible CUDA device with ``torch.cuda.is_available()``, else
        ``(False, the reason)``.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return False, f"CUDA graphs need a CUDA device, got {dev}"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (a CPU-only torch build, or no usable GPU or driver)"
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        return False, f"{dev} is not visible: {count} CUDA device(s)"
    return True, f"CUDA graphs available on cuda:{index} ({torch.cuda.get_device_name(index)})"


def _load(static: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
    for s, x in zip(static, inputs, strict=True):
        s.copy_(x)


def _as_outputs(name: str, out: Any) -> Outputs:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return tuple(out)
    raise TypeError(f"{name}: fn must return a tensor or a tuple of tensors, got {type(out).__name__}")


def _describe(e: BaseException) -> str:
    reason = f"{type(e).__name__}: {e}"
    cause = e.__cause__ or e.__context__
    if cause is not None:  # torch.cuda.graph's capture_end can raise over the error that broke the capture
        reason += f" (after {type(cause).__name__}: {cause})"
    return reason


def _spec(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, {x.dtype}, {x.device}"
