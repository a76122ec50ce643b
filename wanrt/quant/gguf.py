"""GGUF weights (the llama.cpp block formats ComfyUI users run Wan DiTs in), kept quantized and dequantized per layer.

Block formats (``ggml-quants``; one row of a ``[out, in]`` weight is ``in / block`` blocks, little-endian):

* ``Q8_0``: 32 values: ``d`` (fp16), 32 × int8 ``q``; ``w = d q``.
* ``Q4_0``: 32 values: ``d`` (fp16), 16 bytes of nibbles (low nibbles are values 0-15, high nibbles 16-31);
  ``w = d (q - 8)``.
* ``Q5_0``: 32 values: ``d`` (fp16), ``qh`` (uint32, the fifth bit of each value), 16 bytes of nibbles;
  ``w = d (q - 16)``.
* ``Q4_K``: 256 values in 8 sub-blocks of 32: ``d``, ``dmin`` (fp16), 12 bytes of packed 6-bit sub-block scales and
  mins, 128 bytes of nibbles (per 64 values: 32 low nibbles, then the same bytes' high nibbles);
  ``w = d sc q - dmin m``.
* ``Q5_K``: as ``Q4_K`` plus ``qh`` (32 bytes: bit ``2j`` / ``2j+1`` of byte ``l`` is the fifth bit of value ``l`` of
  the ``j``-th pair of sub-blocks), before the nibbles.
* ``Q6_K``: 256 values in 16 sub-blocks of 16: ``ql`` (128 bytes, low 4 bits), ``qh`` (64 bytes, high 2 bits),
  16 int8 scales, ``d`` (fp16) last; ``w = d sc (q - 32)``.

:func:`dequantize` is the PyTorch implementation (any device, the eager twin); the ``gguf`` package's NumPy
dequantizers are its reference in the tests; :mod:`wanrt.kernels.gguf` is the one-kernel Triton version the plan
picks on CUDA. :class:`GGUFLinear` holds the raw blocks (``uint8 [out, bytes per row]``) and dequantizes
them to the compute dtype just before its GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: type name -> (values per block, bytes per block); the ggml type ids are in ``GGML_TYPE_IDS``.
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q5_K": (256, 176),
          "Q6_K": (256, 210)}
GGML_TYPE_IDS = {0: "F32", 1: "F16", 2: "Q4_0", 6: "Q5_0", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
QUANTIZED_TYPES = tuple(BLOCKS)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 from the last dimension's 2 bytes (uint8 ``[..., 2]``) → float32 ``[...]``."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def _nibbles(qs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (qs & 0x0F).to(torch.int16), (qs >> 4).to(torch.int16)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (``get_scale_min_k4``): two ``[..., 8]`` int tensors."""
    s = scales.to(torch.int32)
    sc_lo, m_lo = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc_hi = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    m_hi = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([sc_lo, sc_hi], dim=-1), torch.cat([m_lo, m_hi], dim=-1)


def _dequant_blocks(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """uint8 ``[N, bytes per block]`` → float32 ``[N, values per block]``."""
    if qtype == "Q8_0":
        d = _f16(blocks[:, 0:2].reshape(-1, 1, 2))
        q = blocks[:, 2:34].contiguous().view(torch.int8).float()
        return d * q
    if qtype == "Q4_0":
        d = _f16(blocks[:, 0:2].reshape(-1, 1, 2))
        lo, hi = _nibbles(blocks[:, 2:18])
        return d * (torch.cat([lo, hi], dim=1).float() - 8)
    if qtype == "Q5_0":
        d = _f16(blocks[:, 0:2].reshape(-1, 1, 2))
        qh = blocks[:, 2:6].to(torch.int64)
        bits = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)  # [N]
        high = (bits[:, None] >> torch.arange(32, device=blocks.device)) & 1  # [N, 32]
        lo, hi = _nibbles(blocks[:, 6:22])
        q = torch.cat([lo, hi], dim=1).to(torch.int64) | (high << 4)
        return d * (q.float() - 16)
    if qtype in ("Q4_K", "Q5_K"):
        d = _f16(blocks[:, 0:2].reshape(-1, 1, 2))
        dmin = _f16(blocks[:, 2:4].reshape(-1, 1, 2))
        sc, m = _scale_min_k4(blocks[:, 4:16])  # [N, 8]
        qs = blocks[:, -128:].reshape(-1, 4, 32)  # 4 groups of 64 values
        lo, hi = _nibbles(qs)  # [N, 4, 32] each: sub-blocks 2j and 2j+1
        q = torch.stack([lo, hi], dim=2).to(torch.int32)  # [N, 4, 2, 32]
        if qtype == "Q5_K":
            qh = blocks[:, 16:48].to(torch.int32)  # [N, 32]
            shift = torch.arange(8, device=blocks.device).reshape(4, 2, 1)  # bit 2j, 2j+1
            q = q | (((qh[:, None, None, :] >> shift) & 1) << 4)
        q = q.reshape(-1, 8, 32).float()
        return (d * sc.float()).unsqueeze(-1).mul(q).sub((dmin * m.float()).unsqueeze(-1)).reshape(-1, 256)
    if qtype == "Q6_K":
        ql = blocks[:, 0:128].to(torch.int32).reshape(-1, 2, 64)  # two halves of 128 values
        qh = blocks[:, 128:192].to(torch.int32).reshape(-1, 2, 32)
        sc = blocks[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 2, 8)
        d = _f16(blocks[:, 208:210].reshape(-1, 1, 2)).reshape(-1, 1, 1)
        q1 = (ql[..., :32] & 0x0F) | ((qh & 3) << 4)
        q2 = (ql[..., 32:] & 0x0F) | (((qh >> 2) & 3) << 4)
        q3 = (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4)
        q4 = (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)
        q = torch.stack([q1, q2, q3, q4], dim=2).float() - 32  # [N, 2, 4, 32]: values 32*k + l of each half
        scale = sc.reshape(-1, 2, 4, 2)  # sub-block of value 32k + l is 2k + l // 16
        q = q.reshape(-1, 2, 4, 2, 16) * scale.unsqueeze(-1)
        return (d.unsqueeze(-1).unsqueeze(-1) * q).reshape(-1, 256)
    raise ValueError(f"unsupported GGUF quantization {qtype!r}; supported: {', '.join(QUANTIZED_TYPES)}")


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of ``shape`` from its GGUF blocks ``raw`` (uint8, ``numel / values per block * bytes per block``
    bytes, any shape) in ``dtype``, on ``raw``'s device.

    Raises:
        ValueError: an unknown type, or a byte count that does not match ``shape``.
    """
    if qtype not in BLOCKS:
        raise ValueError(f"unsupported GGUF quantization {qtype!r}; supported: {', '.join(QUANTIZED_TYPES)}")
    per, nbytes = BLOCKS[qtype]
    numel = 1
    for s in shape:
        numel *= s
    if numel % per or raw.numel() != numel // per * nbytes:
        raise ValueError(f"{qtype}: {raw.numel()} bytes do not hold a weight of shape {tuple(shape)} "
                         f"({per} values per {nbytes}-byte block)")
    return _dequant_blocks(raw.reshape(-1, nbytes), qtype).reshape(shape).to(dtype)


class GGUFLinear(nn.Module):
    """A Linear whose weight stays in GGUF blocks (``raw``: uint8 ``[out, bytes per row]``), dequantized to
    ``out_dtype`` at each call (``y = x W^T + b`` in ``out_dtype``).

    Args:
        in_features, out_features: the weight's shape ``[out, in]``; ``in`` must be a multiple of the block size.
        qtype: one of :data:`QUANTIZED_TYPES`. bias: keep a float32 bias. out_dtype: the compute dtype.

    ``dequant_backend`` (set by ``WanDiT.set_backend`` from the plan's fused-ops backend): ``"eager"``
    (:func:`dequantize`) or ``"triton"`` (:func:`wanrt.kernels.gguf.gguf_dequantize`, one kernel).
    """

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: bool = True,
                 out_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if qtype not in BLOCKS:
            raise ValueError(f"unsupported GGUF quantization {qtype!r}; supported: {', '.join(QUANTIZED_TYPES)}")
        per, nbytes = BLOCKS[qtype]
        if in_features % per:
            raise ValueError(f"{qtype} needs in_features divisible by {per}, got {in_features}")
        self.in_features, self.out_features, self.qtype, self.out_dtype = in_features, out_features, qtype, out_dtype
        self.dequant_backend = "eager"
        self.register_buffer("raw", torch.empty(out_features, in_features // per * nbytes, dtype=torch.uint8,
                                                device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        """The raw blocks (for the device and the bytes; the values are :meth:`dequantized`)."""
        return self.raw

    def dequantized(self) -> torch.Tensor:
        """The weight ``[out, in]`` in ``out_dtype``."""
        if self.dequant_backend == "triton":
            from ..kernels.gguf import gguf_dequantize

            return gguf_dequantize(self.raw, self.qtype, self.out_dtype).view(self.out_features, self.in_features)
        return dequantize(self.raw, self.qtype, (self.out_features, self.in_features), self.out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(self.out_dtype) if self.bias is not None else None
        return F.linear(x.to(self.out_dtype), self.dequantized(), bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.qtype}, out_dtype={self.out_dtype}, "
                f"dequant={self.dequant_backend}")
