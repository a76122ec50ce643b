"""Numerical comparison helpers shared by wanrt's kernel tests, GPU suite and benchmarks.

A fused op is checked against its eager twin with a tolerance that depends on the dtype the op
computes in (:data:`TOLERANCES`). A failure reports the relative error of the whole tensor, the
worst element (its multi-index, both values and the error), and how many elements are out of
tolerance, so a wrong tile or an unwritten row is visible at a glance.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """Bounds for ``|out - ref| <= atol + rtol * |ref|`` elementwise and ``‖out - ref‖ / ‖ref‖ <= rel``."""

    atol: float
    rtol: float
    rel: float


# dtype the op computes/stores in -> tolerance. The low-precision bounds allow one or two roundings of
# the output (bf16 has 8 mantissa bits: 2^-8 = 3.9e-3 relative half-ulp is 2^-9) plus accumulation-order
# differences of fp32 reductions.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-10, rel=1e-10),
    torch.float32: Tolerance(atol=2e-5, rtol=2e-5, rel=1e-5),
    torch.float16: Tolerance(atol=2e-3, rtol=4e-3, rel=2e-3),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=3.2e-2, rel=1.6e-2),
}


def mismatch_report(out: torch.Tensor, ref: torch.Tensor, tol: Tolerance, name: str = "output") -> str | None:
    """Compare ``out`` with ``ref`` (both cast to float64); ``None`` when within ``tol``, else a report.

    Raises:
        ValueError: if the shapes differ.
    """
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    nonfinite = ~torch.isfinite(o)
    if (nonfinite & torch.isfinite(r)).any():
        idx = _unravel(int((nonfinite & torch.isfinite(r)).flatten().nonzero()[0]), o.shape)
        return f"{name}: non-finite value {o[idx].item()} at index {idx} (reference {r[idx].item()})"
    err = (o - r).abs()
    bound = tol.atol + tol.rtol * r.abs()
    bad = err > bound
    denom = r.norm().item()
    rel = (o - r).norm().item() / denom if denom > 0 else (o - r).norm().item()
    if not bad.any() and rel <= tol.rel:
        return None
    worst = _unravel(int((err - bound).flatten().argmax()), o.shape)
    return (
        f"{name}: {int(bad.sum())}/{o.numel()} elements out of tolerance "
        f"(atol={tol.atol:g}, rtol={tol.rtol:g}); relative L2 error {rel:.3e} (limit {tol.rel:g}); "
        f"worst at index {worst}: got {o[worst].item():.6g}, expected {r[worst].item():.6g}, "
        f"|diff| {err[worst].item():.3e}"
    )


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None,
                 name: str = "output", tol: Tolerance | None = None) -> None:
    """Assert ``out`` matches ``ref`` within :data:`TOLERANCES` for ``dtype`` (default ``out.dtype``).

    Raises:
        AssertionError: with :func:`mismatch_report`'s message.
    """
    tol = tol or TOLERANCES[dtype or out.dtype]
    report = mismatch_report(out, ref, tol, name)
    if report is not None:
        raise AssertionError(report)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out - ref‖ / ‖ref‖`` in float64."""
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    return ((o - r).norm() / r.norm().clamp_min(1e-300)).item()


def _unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    idx = []
    for s in reversed(shape):
        idx.append(flat % s)
        flat //= s
    return tuple(reversed(idx))


class TensorMemoryTracker:
    """Peak bytes of live tensor storages created while active (a ``TorchDispatchMode``; any device).

    Deterministic where process memory (RSS) is not: every storage produced by an op is counted once while any
    tensor holds it, and released when it is garbage collected. Tensors created before entering are not counted
    (weights, inputs). Use as ``with TensorMemoryTracker() as m: ...; m.peak_bytes``.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._track(t)
                return out

        self._mode = _Mode()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        import weakref

        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

        def release(k=key, n=size):
            self._seen.discard(k)
            self.live_bytes -= n

        weakref.finalize(storage, release)

    def __enter__(self) -> TensorMemoryTracker:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


@contextlib.contextmanager
def tf32_off():
    """Full-precision fp32 matmuls and cuDNN convolutions inside the block (PyTorch runs cuDNN convolutions in TF32
    by default, ~1e-3 relative, far above the float32 tolerance of an eager reference); both previous flags are
    restored after. Harmless on the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def random_gguf_blocks(qtype: str, rows: int, cols: int, seed: int = 0):
    """Random GGUF blocks (NumPy uint8 ``[rows, bytes per row]``) of a ``[rows, cols]`` weight in ``qtype`` (a type
    of :data:`wanrt.quant.gguf.BLOCKS`): random bytes, with finite fp16 block scales of weight-like size written
    over their scale fields, so every bit pattern of the quants, sub-block scales and high bits occurs."""
    import numpy as np

    from .quant.gguf import BLOCKS

    per, nbytes = BLOCKS[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // per * nbytes), dtype=np.uint8)
    blk = raw.reshape(-1, nbytes)

    def f16(lo, hi):
        return rng.uniform(lo, hi, len(blk)).astype(np.float16).view(np.uint8).reshape(-1, 2)

    if qtype in ("Q8_0", "Q4_0", "Q5_0"):
        blk[:, 0:2] = f16(-0.01, 0.01)
    elif qtype in ("Q4_K", "Q5_K"):
        blk[:, 0:2], blk[:, 2:4] = f16(0, 0.002), f16(0, 0.002)
    else:
        blk[:, 208:210] = f16(-0.0005, 0.0005)
    return raw
