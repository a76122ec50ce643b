"""Helpers shared by wanrt's Triton kernels: availability, interpreter detection, launch checks and recipes,
and the ``@triton.jit`` device helpers (the RNE cast, 8-bit rounding and quantization), defined on first use."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import NamedTuple

import torch


@functools.cache
def triton_installed() -> bool:
    """True when the ``triton`` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is decorated, so it must be set before the first
    ``wanrt.kernels`` module is imported; tests' ``conftest.py`` does that on machines without CUDA.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_device_ok(t: torch.Tensor) -> bool:
    """A Triton kernel can take ``t``: a CUDA tensor, or any CPU tensor under the interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def check_device(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless every tensor is usable by a Triton kernel and they share a device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors are on different devices {sorted(map(str, devices))}")
    for t in tensors:
        if t is not None and not kernel_device_ok(t):
            raise ValueError(
                f"{op}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), "
                f"got a tensor on {t.device}"
            )


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


TORCH_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def row_kernel_warps(tile: int) -> int:
    """Warps for a memory-bound kernel whose program holds ``tile`` elements per tensor.

    About 8 elements per thread and tensor (two 16-byte loads of fp32, one of bf16), between 4 and 32 warps.
    Compiled for sm_90a, this keeps the fused norm kernels at 32-60 registers at the Wan2.1 widths (dim 1536
    and 5120), where 4 elements more per thread cost up to 223 registers and most of the occupancy
    (``benchmarks/kernel_resources.py``).
    """
    return min(32, max(4, tile // 256))


class RowLaunch(NamedTuple):
    """Launch parameters of a row kernel, from :func:`row_launch`."""

    block: int  # BLOCK: the row's elements, padded to a power of two
    rows: int  # ROWS: rows per program
    num_warps: int


def row_launch(dim: int, max_rows: int = 64) -> RowLaunch:
    """Block, rows per program and warps of a memory-bound kernel whose programs hold whole rows of ``dim``.

    ``BLOCK = next_pow2(dim)``; programs of about 1024 elements (``1024 // BLOCK`` rows, between 1 and
    ``max_rows``; ``max_rows=1`` for kernels written for one row per program); warps by
    :func:`row_kernel_warps` of the ``rows x BLOCK`` tile.
    """
    block = next_pow2(dim)
    rows = max(1, min(max_rows, 1024 // block))
    return RowLaunch(block, rows, row_kernel_warps(rows * block))


# ------------------------------------------------------------------------------ device helpers
# The ``@triton.jit`` helpers below are defined when a kernel module first imports one
# (``from wanrt.kernels._common import cast_rne``, through the module ``__getattr__``), not when this module
# is imported: the host helpers above must import without Triton (the engine, the loaders and the backends
# ask ``triton_installed()`` and ``interpreting()`` before any kernel is imported), and Triton reads
# ``TRITON_INTERPRET`` when a function is decorated, so helpers decorated before the kernels could be
# compiled functions that the kernels, interpreted, cannot call.

_DEVICE_HELPERS = frozenset({"cast_rne", "round_to_e4m3_grid", "round_clamp_8bit", "quantize_row"})


def __getattr__(name: str):
    if name in _DEVICE_HELPERS:
        _define_device_helpers()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _define_device_helpers() -> None:
    """Import Triton and define the device helpers as globals of this module (once).

    Module globals, not locals: a ``@triton.jit`` function resolves the names in its body (``tl``, the
    constants, the helpers it calls) in its module's globals.
    """
    global triton, tl, libdevice, _ROUND_MAGIC, _SUBNORMAL_MAGIC, _E4M3_MIN_NORMAL
    global cast_rne, round_to_e4m3_grid, round_clamp_8bit, quantize_row
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5·2^23: (v + it) - it rounds float32 |v| < 2^22 half to even
    _SUBNORMAL_MAGIC = tl.constexpr(24576.0)  # 1.5·2^14: its float32 ulp is 2^-9, the e4m3 subnormal step
    _E4M3_MIN_NORMAL = tl.constexpr(0.015625)  # 2^-6

    @triton.jit
    def cast_rne(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
        """Cast float32 ``x`` to ``dtype``, rounding to nearest even.

        The Triton 3.9 interpreter truncates float32 -> bfloat16 casts (and stores); with ``RNE_BF16`` set
        (only when interpreting) the bf16 rounding is done on the bits first, so the cast is exact and the
        interpreter matches the GPU (whose ``cvt`` rounds to nearest even).
        """
        if RNE_BF16:  # noqa: SIM102 (nested static ifs: safe on every Triton version)
            if dtype == tl.bfloat16:
                u = x.to(tl.uint32, bitcast=True)
                u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
                x = u.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def round_to_e4m3_grid(v):
        """Round float32 ``v`` (``|v| <= 448``) to the nearest float8_e4m3fn value, ties to even, as float32.

        Normal range (``|v| >= 2^-6``): keep 3 mantissa bits, rounding on the bits (a carry moves into the
        exponent). Subnormal range: multiples of 2^-9, rounded by a float32 add of ``1.5·2^14`` (whose ulp is
        2^-9) and its subtraction. The sign is put back on the bits, so -0 and tiny negatives stay -0.
        """
        u = v.to(tl.uint32, bitcast=True)
        sign = u & 0x80000000
        a = u & 0x7FFFFFFF
        normal = (a + (0x7FFFF + ((a >> 20) & 1))) & 0xFFF00000
        af = a.to(tl.float32, bitcast=True)
        sub = ((af + _SUBNORMAL_MAGIC) - _SUBNORMAL_MAGIC).to(tl.uint32, bitcast=True)
        r = tl.where(af < _E4M3_MIN_NORMAL, sub, normal) | sign
        return r.to(tl.float32, bitcast=True)

    @triton.jit
    def round_clamp_8bit(q, IS_INT8: tl.constexpr, INTERPRET: tl.constexpr):
        """Float32 ``q`` on the int8 (``IS_INT8``) or float8_e4m3fn grid, as float32 that casts exactly.

        int8: round half to even (``libdevice.rint``, as ``torch.round``; under ``INTERPRET``, where ``rint``
        does not run, ``(q + 1.5·2^23) - 1.5·2^23``), then clamp to ±127. fp8: clamp to ±448, and under
        ``INTERPRET``, whose fp32 -> fp8 cast rounds wrongly, round to the e4m3 grid first
        (:func:`round_to_e4m3_grid`); on the GPU the cast rounds to nearest even.
        """
        if IS_INT8:
            if INTERPRET:
                q = (q + _ROUND_MAGIC) - _ROUND_MAGIC
            else:
                q = libdevice.rint(q)
            q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        else:
            q = tl.minimum(tl.maximum(q, -448.0), 448.0)
            if INTERPRET:
                q = round_to_e4m3_grid(q)
        return q

    @triton.jit
    def quantize_row(x, qmax, inv_qmax, IS_INT8: tl.constexpr, SCALE_RECIP: tl.constexpr,
                     INTERPRET: tl.constexpr):
        """Symmetric 8-bit quantization of one float32 row ``x`` (padding lanes 0): ``(q, scale)``.

        ``scale = amax / qmax`` (``amax * inv_qmax`` with ``SCALE_RECIP``, as torch computes it on CUDA),
        1 when ``amax == 0``; ``q = x / scale`` (IEEE division) through :func:`round_clamp_8bit`, float32.
        """
        amax = tl.max(tl.abs(x), axis=0)
        if SCALE_RECIP:  # torch on CUDA: amax / qmax computed as amax * float32(1 / qmax)
            scale = amax * inv_qmax
        else:
            scale = tl.math.div_rn(amax, qmax)
        scale = tl.where(amax > 0, scale, 1.0)
        q = tl.math.div_rn(x, tl.zeros_like(x) + scale)
        return round_clamp_8bit(q, IS_INT8, INTERPRET), scale
