"""GGUF block dequantization in Triton: the weights of :class:`wanrt.quant.gguf.GGUFLinear`, dequantized on the
device just before their GEMM.

* :func:`gguf_dequantize` — uint8 GGUF blocks (``Q8_0``, ``Q4_0``, ``Q5_0``, ``Q4_K``, ``Q5_K``, ``Q6_K``; the
  byte layouts are in :mod:`wanrt.quant.gguf`) to a flat ``[blocks × values per block]`` tensor in ``out_dtype``.
  One program dequantizes ``NB`` whole blocks as an ``[NB, values per block]`` tile: each value's nibble, high
  bit(s), sub-block scale and block scale(s) are gathered from the block's bytes (L1/L2-resident: a block is 18
  to 210 bytes), so the eager twin's dozen passes over the weight (unpack, concatenate, scale, cast) become one
  read of the blocks and one write of the weight. Twin: :func:`wanrt.quant.gguf.dequantize` (``backend="eager"``).

Numerics are the eager twin's, bit for bit: the same float32 products in the same order (``d · q`` for the
``_0`` types, ``(d · sc) · q - dmin · m`` for ``Q4_K``/``Q5_K``, ``d · (q · sc)`` for ``Q6_K``), then a
round-to-nearest-even cast (``cast_rne``: the interpreter's bf16 cast truncates). On a GPU the compiler may
contract the ``K`` types' multiply and subtract into one FMA (one rounding fewer), so there the kernel agrees
with the twin to 1 ulp of float32 before the cast; the tests compare bitwise under the interpreter.

Layers: the private ``@triton.jit`` kernel; the checking launcher; the ``wanrt::gguf_dequantize`` custom op with
its fake registration; the public function.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanrt.kernels._common import TORCH_FLOAT_DTYPES, cast_rne, check_device, interpreting

#: type name -> (kernel id, values per block, bytes per block, blocks per program)
_TYPES = {"Q8_0": (0, 32, 34, 32), "Q4_0": (1, 32, 18, 32), "Q5_0": (2, 32, 22, 32),
          "Q4_K": (3, 256, 144, 4), "Q5_K": (4, 256, 176, 4), "Q6_K": (5, 256, 210, 4)}
GGUF_KERNEL_TYPES = tuple(_TYPES)

# ------------------------------------------------------------------------------ kernel


@triton.jit
def _u8(ptr, off, mask):
    """Bytes at ``ptr + off`` as int32."""
    return tl.load(ptr + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptr, off, mask):
    """The little-endian fp16 at ``ptr + off`` (two bytes) as float32."""
    u = _u8(ptr, off, mask) | (_u8(ptr, off + 1, mask) << 8)
    return u.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _gguf_dequant_kernel(
    raw_ptr, out_ptr, n_blocks,
    QTYPE: tl.constexpr, PER: tl.constexpr, NBYTES: tl.constexpr, NB: tl.constexpr, RNE_BF16: tl.constexpr,
):
    # One program = NB whole blocks, as an [NB, PER] tile of values; v is a value's index inside its block.
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)[:, None]  # [NB, 1]
    v = tl.arange(0, PER)[None, :]  # [1, PER]
    ok = (blk < n_blocks) & (v >= 0)  # [NB, PER]
    base = blk * NBYTES  # each block's first byte
    if QTYPE == 0:  # Q8_0: d, 32 x int8
        d = _f16(raw_ptr, base, ok)
        q = _u8(raw_ptr, base + 2 + v, ok).to(tl.int8).to(tl.float32)
        w = d * q
    elif QTYPE == 1:  # Q4_0: d, 16 bytes of nibbles (values 0-15 low, 16-31 high)
        d = _f16(raw_ptr, base, ok)
        byte = _u8(raw_ptr, base + 2 + (v % 16), ok)
        q = tl.where(v < 16, byte & 15, byte >> 4)
        w = d * (q - 8).to(tl.float32)
    elif QTYPE == 2:  # Q5_0: d, qh (32 fifth bits), 16 bytes of nibbles
        d = _f16(raw_ptr, base, ok)
        high = (_u8(raw_ptr, base + 2 + v // 8, ok) >> (v % 8)) & 1
        byte = _u8(raw_ptr, base + 6 + (v % 16), ok)
        q = tl.where(v < 16, byte & 15, byte >> 4) | (high << 4)
        w = d * (q - 16).to(tl.float32)
    elif QTYPE == 3 or QTYPE == 4:  # Q4_K / Q5_K: d, dmin, 12 bytes of 6-bit scales and mins, [qh], nibbles
        d = _f16(raw_ptr, base, ok)
        dmin = _f16(raw_ptr, base + 2, ok)
        j = v // 32  # the sub-block
        lo4 = j < 4
        jj = j % 4
        a = _u8(raw_ptr, base + 4 + jj, ok)  # scales[j % 4]
        b = _u8(raw_ptr, base + 8 + jj, ok)  # scales[4 + j % 4]
        c = _u8(raw_ptr, base + 12 + jj, ok)  # scales[8 + j % 4]
        sc = tl.where(lo4, a & 63, (c & 15) | ((a >> 6) << 4))
        m = tl.where(lo4, b & 63, (c >> 4) | ((b >> 6) << 4))
        l = v % 64  # noqa: E741 (the value inside its group of 64)
        QS: tl.constexpr = 48 if QTYPE == 4 else 16
        byte = _u8(raw_ptr, base + QS + (v // 64) * 32 + (l % 32), ok)
        q = tl.where(l < 32, byte & 15, byte >> 4)
        if QTYPE == 4:
            q = q | (((_u8(raw_ptr, base + 16 + (l % 32), ok) >> j) & 1) << 4)
        w = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * m.to(tl.float32)
    else:  # Q6_K: ql (128), qh (64), 16 x int8 scales, d last
        h = v // 128  # the half
        r = v % 128
        k = r // 32
        l = r % 32  # noqa: E741
        byte = _u8(raw_ptr, base + h * 64 + (k % 2) * 32 + l, ok)
        low = tl.where(k < 2, byte & 15, byte >> 4)
        hb = (_u8(raw_ptr, base + 128 + h * 32 + l, ok) >> (2 * k)) & 3
        sc = _u8(raw_ptr, base + 192 + h * 8 + 2 * k + l // 16, ok).to(tl.int8).to(tl.float32)
        d = _f16(raw_ptr, base + 208, ok)
        w = d * (((low | (hb << 4)) - 32).to(tl.float32) * sc)
    tl.store(out_ptr + blk * PER + v, cast_rne(w, out_ptr.dtype.element_ty, RNE_BF16), mask=ok)


# ------------------------------------------------------------------------------ launcher


def _check_args(raw: torch.Tensor, qtype: str, out_dtype: torch.dtype) -> None:
    if qtype not in _TYPES:
        raise ValueError(f"gguf_dequantize: unsupported type {qtype!r}; supported: {', '.join(GGUF_KERNEL_TYPES)}")
    if raw.dtype != torch.uint8:
        raise ValueError(f"gguf_dequantize: raw must be uint8 blocks, got {raw.dtype}")
    if out_dtype not in TORCH_FLOAT_DTYPES:
        raise ValueError(f"gguf_dequantize: out_dtype must be one of {TORCH_FLOAT_DTYPES}, got {out_dtype}")
    nbytes = _TYPES[qtype][2]
    if raw.numel() % nbytes:
        raise ValueError(f"gguf_dequantize: {raw.numel()} bytes are not whole {qtype} blocks of {nbytes} bytes")


def _launch(raw: torch.Tensor, qtype: str, out_dtype: torch.dtype) -> torch.Tensor:
    """Check, allocate the flat output, launch one program per ``NB`` blocks."""
    _check_args(raw, qtype, out_dtype)
    check_device("gguf_dequantize", raw)
    kid, per, nbytes, nb = _TYPES[qtype]
    raw = raw.contiguous()
    n_blocks = raw.numel() // nbytes
    out = torch.empty(n_blocks * per, dtype=out_dtype, device=raw.device)
    if n_blocks:
        _gguf_dequant_kernel[(triton.cdiv(n_blocks, nb),)](
            raw, out, n_blocks, QTYPE=kid, PER=per, NBYTES=nbytes, NB=nb, RNE_BF16=interpreting(), num_warps=4)
    return out


# ------------------------------------------------------------------------------ custom op


@torch.library.custom_op("wanrt::gguf_dequantize", mutates_args=())
def _gguf_dequantize_op(raw: torch.Tensor, qtype: str, out_dtype: torch.dtype) -> torch.Tensor:
    return _launch(raw, qtype, out_dtype)


@_gguf_dequantize_op.register_fake
def _(raw, qtype, out_dtype):
    _check_args(raw, qtype, out_dtype)
    _, per, nbytes, _ = _TYPES[qtype]
    return raw.new_empty(raw.numel() // nbytes * per, dtype=out_dtype)


# ------------------------------------------------------------------------------ public


def gguf_dequantize(raw: torch.Tensor, qtype: str, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize GGUF blocks in one kernel.

    Args:
        raw: uint8, any shape, a whole number of ``qtype`` blocks (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        qtype: one of :data:`GGUF_KERNEL_TYPES`.
        out_dtype: float32, bfloat16 or float16.

    Returns:
        ``[blocks × values per block]`` in ``out_dtype`` (reshape to the weight's shape), equal to
        :func:`wanrt.quant.gguf.dequantize` (see the module docstring for the GPU's FMA caveat).

    Raises:
        ValueError: unknown type, wrong dtype, a partial block, a device the kernel cannot take.
    """
    return _gguf_dequantize_op(raw, qtype, out_dtype)
