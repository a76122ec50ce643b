"""Normalisation ops of the Wan2.1 DiT, their fusions, and their eager twins.

The eager twins reproduce the official dtype behaviour (``WanRMSNorm``, ``WanLayerNorm`` and the
block arithmetic of ``WanAttentionBlock`` in ``wan/modules/model.py``; docs/model-reference.md
§2.6, §2.7, §9.1, §9.2): statistics in float32, the normalised value rounded back to the input
dtype before the (float32) weight, modulation and gated residuals in float32.

Every public op takes ``backend``: ``"eager"`` (the twin) or ``"triton"`` (wanrt's fused
kernels, :mod:`wanrt.kernels`), resolved by :mod:`wanrt.ops.backends`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wanrt.ops.rope import RopeTable, _check_rope_shapes, rope_rotate_eager

LAYOUTS = ("bshd", "bhsd")


def _fused(backend: str):
    from wanrt.ops.backends import fused_impl

    return fused_impl(backend)


# ------------------------------------------------------------------------------ RMS norm


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    out_dtype: torch.dtype | None = None,
    backend: str = "eager",
) -> torch.Tensor:
    """RMS norm over the last dim: ``(x * rsqrt(mean(x^2) + eps)).type_as(x) * weight``.

    Reproduces official ``WanRMSNorm``: the statistics and scaling run on ``x.float()``, the
    result is cast back to ``x.dtype``, then multiplied by ``weight``. With a bf16 ``x`` and a
    float32 weight the value is therefore a bf16-rounded norm times an fp32 weight.

    Args:
        x: ``[..., D]`` any float dtype.
        weight: ``[D]`` or ``None`` (no affine).
        eps: Added to the mean square (1e-6 in Wan2.1).
        out_dtype: Output dtype; ``None`` gives ``x.dtype`` promoted with ``weight.dtype``.
        backend: ``"eager"`` or ``"triton"``.

    Returns:
        ``[..., D]`` in ``out_dtype``.
    """
    if backend == "eager":
        return rms_norm_eager(x, weight, eps, out_dtype=out_dtype)
    out_dtype = out_dtype or (x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype))
    shape = x.shape
    rows = x.reshape(1, -1, shape[-1])  # [1, N, D]
    if weight is None:  # the kernel reads weight=None as "no norm"; a unit weight normalises unchanged
        weight = torch.ones(shape[-1], dtype=torch.float32, device=x.device)
    out = _fused(backend).norm_rope(rows, weight, eps, None, None, 1, out_dtype, "bshd")  # [1, N, 1, D]
    return out.reshape(shape)


def rms_norm_eager(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Pure-PyTorch :func:`rms_norm`."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x)
    y = y if weight is None else y * weight
    return y if out_dtype is None else y.to(out_dtype)


def qk_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    rope: RopeTable | None,
    *,
    num_heads: int,
    out_dtype: torch.dtype,
    layout: str = "bshd",
    backend: str = "eager",
) -> torch.Tensor:
    """QK-norm over the full dim, then 3-D RoPE, then the cast for attention (one pass when fused).

    ``y = rms_norm(x, weight, eps)`` (skipped when ``weight`` is None), split into heads,
    ``rope_rotate(y, rope)`` (skipped when ``rope`` is None), cast to ``out_dtype``. This is the
    official q/k path of ``WanSelfAttention`` (norm_q/norm_k over all heads, rope_apply in float64,
    the bf16 cast inside ``flash_attention``) and, without RoPE, of cross-attention.

    Args:
        x: Projected queries or keys ``[B, S, num_heads * head_dim]``, any float dtype.
        weight: RMS-norm weight ``[num_heads * head_dim]`` or ``None``.
        eps: RMS-norm epsilon.
        rope: Rotations of the first ``S_grid <= S`` tokens, or ``None``.
        num_heads: Heads to split the last dim into.
        out_dtype: dtype of the result (the attention compute dtype).
        layout: Memory layout of the result: ``"bshd"`` (contiguous ``[B, S, H, D]``, what
            flash-attn, sageattention, xformers and wanrt's Triton attention read best) or
            ``"bhsd"`` (contiguous ``[B, H, S, D]``, what torch SDPA wants). The returned tensor
            has the logical shape ``[B, S, H, D]`` either way (a permuted view for ``"bhsd"``).
        backend: ``"eager"`` or ``"triton"``.

    Returns:
        ``[B, S, num_heads, head_dim]`` in ``out_dtype``.

    Raises:
        ValueError: on shape, layout or backend errors.
    """
    if x.ndim != 3 or x.shape[2] % num_heads:
        raise ValueError(f"qk_norm_rope expects x [B, S, num_heads*head_dim] with num_heads={num_heads}, "
                         f"got {tuple(x.shape)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if weight is not None and tuple(weight.shape) != (x.shape[2],):
        raise ValueError(f"qk_norm_rope: weight {tuple(weight.shape)} does not match dim {x.shape[2]}")
    if rope is not None:
        _check_rope_shapes(x.unflatten(2, (num_heads, -1)), rope.rot)
    if backend == "eager":
        return qk_norm_rope_eager(x, weight, eps, rope, num_heads=num_heads, out_dtype=out_dtype, layout=layout)
    cos, sin = (None, None) if rope is None else (rope.cos, rope.sin)
    return _fused(backend).norm_rope(x, weight, eps, cos, sin, num_heads, out_dtype, layout)


def qk_norm_rope_eager(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    rope: RopeTable | None,
    *,
    num_heads: int,
    out_dtype: torch.dtype,
    layout: str = "bshd",
) -> torch.Tensor:
    """Pure-PyTorch :func:`qk_norm_rope` (float64 RoPE, as the official code)."""
    y = x if weight is None else rms_norm_eager(x, weight, eps)  # [B, S, dim]
    y = y.unflatten(2, (num_heads, -1))  # [B, S, H, D]
    y = y.to(out_dtype) if rope is None else rope_rotate_eager(y, rope.rot).to(out_dtype)
    if layout == "bhsd":
        y = y.transpose(1, 2).contiguous().transpose(1, 2)  # storage [B, H, S, D], shape [B, S, H, D]
    return y


# ------------------------------------------------------------------------------ LayerNorm


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Layer norm over the last dim, computed in float32, returned in ``x.dtype``.

    ``((x - mean) / sqrt(var + eps) * weight + bias)`` with biased variance, as official
    ``WanLayerNorm``: ``nn.LayerNorm.forward(x.float()).type_as(x)``; the affine parameters
    are applied in float32 before the cast.

    Args:
        x: ``[..., D]`` any float dtype.
        weight: ``[D]`` or ``None``.
        bias: ``[D]`` or ``None``.
        eps: 1e-6 in the DiT blocks and head, 1e-5 (nn.LayerNorm default) in ``img_emb``.

    Returns:
        ``[..., D]`` in ``x.dtype``.
    """
    return layer_norm_eager(x, weight, bias, eps)


def layer_norm_eager(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Pure-PyTorch :func:`layer_norm`."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).type_as(x)


def _check_mod(name: str, x: torch.Tensor, t: torch.Tensor | None) -> None:
    """Modulation ``t``: per sample ``[B or 1, 1, D]`` or per token ``[B or 1, S, D]`` (Wan2.2 per-token
    timesteps), for ``x [B, S, D]``."""
    if t is None:
        return
    b, s, d = x.shape
    if t.ndim != 3 or t.shape[1] not in (1, s) or t.shape[2] != d or t.shape[0] not in (1, b):
        raise ValueError(f"{name} must be [B={b} or 1, 1 or S={s}, D={d}] for x {tuple(x.shape)}, got "
                         f"{tuple(t.shape)}")


def modulated_layer_norm(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    quantize: torch.dtype | None = None,
    backend: str = "eager",
) -> torch.Tensor:
    """Modulated LayerNorm: ``(layer_norm(x).float() * (1 + scale) + shift).to(out_dtype)``.

    The input of a DiT block's self-attention and FFN (official
    ``norm1(x).float() * (1 + e[1]) + e[0]``) and of the head. ``layer_norm`` is
    :func:`layer_norm` (float32 statistics, optional affine, result rounded to ``x.dtype``);
    the modulation is float32. ``shift``/``scale`` None skip the modulation.

    Args:
        x: ``[B, S, D]`` (float32 residual stream, or bf16 before block 0).
        shift: float32 ``[B or 1, 1 or S, D]`` (per sample or per token) or ``None``.
        scale: float32 ``[B or 1, 1 or S, D]`` (per sample or per token) or ``None``.
        eps: LayerNorm epsilon.
        weight: Optional LayerNorm weight ``[D]``; bias: optional ``[D]``.
        out_dtype: Result dtype (the next GEMM's weight dtype); ``None`` gives float32.
        quantize: float8_e4m3fn or int8 to hand the result to 8-bit Linears already quantized per token
            (a :class:`~wanrt.quant.layers.QuantizedActivation` of the ``out_dtype`` result), or None.
        backend: ``"eager"`` or ``"triton"``.

    Returns:
        ``[B, S, D]`` in ``out_dtype`` (or its QuantizedActivation).
    """
    _check_mod("shift", x, shift)
    _check_mod("scale", x, scale)
    out_dtype = out_dtype or torch.float32
    if quantize is not None:
        return _norm_quant(x, None, None, eps, shift, scale, weight, bias, out_dtype, quantize, backend)[1]
    if backend == "eager":
        return modulated_layer_norm_eager(x, shift, scale, eps, weight=weight, bias=bias, out_dtype=out_dtype)
    return _fused(backend).modulated_layer_norm(x, shift, scale, weight, bias, eps, out_dtype)


def modulated_layer_norm_eager(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Pure-PyTorch :func:`modulated_layer_norm`."""
    h = layer_norm_eager(x, weight, bias, eps).float()
    if scale is not None:
        h = h * (1 + scale)
    if shift is not None:
        h = h + shift
    return h.to(out_dtype or torch.float32)


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, *, backend: str = "eager"
) -> torch.Tensor:
    """Gated residual into the float32 stream: ``x.float() + y.float() * gate``.

    Official ``x = x + y * e[2]`` (self-attention), ``x + cross_attn(...)`` (``gate`` None) and
    ``x = x + y * e[5]`` (FFN); the stream is float32 from block 0's first add (§9.1).

    Args:
        x: Residual ``[B, S, D]`` (float32, or bf16 in block 0).
        y: Branch output ``[B, S, D]`` (the GEMM dtype).
        gate: float32 ``[B or 1, 1 or S, D]`` (per sample or per token) or ``None`` (gate 1).
        backend: ``"eager"`` or ``"triton"``.

    Returns:
        float32 ``[B, S, D]``.
    """
    _check_residual(x, y, gate)
    if backend == "eager":
        return gated_residual_eager(x, y, gate)
    return _fused(backend).gated_residual(x, y, gate)


def gated_residual_eager(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """Pure-PyTorch :func:`gated_residual`."""
    return x.float() + (y.float() if gate is None else y.float() * gate)


def _check_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> None:
    if x.ndim != 3 or y.shape != x.shape:
        raise ValueError(f"gated residual: x {tuple(x.shape)} and y {tuple(y.shape)} must both be [B, S, D]")
    _check_mod("gate", x, gate)


def gated_residual_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    eps: float,
    *,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    quantize: torch.dtype | None = None,
    backend: str = "eager",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated residual, then the (modulated, optionally affine) LayerNorm of the new residual.

    ``x_new = gated_residual(x, y, gate)``; ``h = modulated_layer_norm(x_new, shift, scale, eps,
    weight=weight, bias=bias, out_dtype=out_dtype)``. One pass when fused: read x, y, gate,
    shift, scale; write the float32 residual and the low-precision input of the next GEMM. It is
    every residual add of a DiT block followed by the next norm: self-attention's gated add then
    ``norm3`` (affine), cross-attention's add then ``norm2`` with the FFN modulation, and the
    FFN's gated add then the next block's ``norm1`` (or the head's norm) with its modulation.

    With ``quantize`` (float8_e4m3fn or int8), ``h`` is handed on quantized per token (a
    :class:`~wanrt.quant.layers.QuantizedActivation` of the ``out_dtype`` result) for the 8-bit Linears that
    read it; the Triton backend then writes the 8-bit row instead of the ``out_dtype`` one.

    Returns:
        ``(x_new float32 [B, S, D], h [B, S, D] in out_dtype (default float32))``.
    """
    _check_residual(x, y, gate)
    _check_mod("shift", x, shift)
    _check_mod("scale", x, scale)
    out_dtype = out_dtype or torch.float32
    if quantize is not None:
        return _norm_quant(x, y, gate, eps, shift, scale, weight, bias, out_dtype, quantize, backend)
    if backend == "eager":
        return gated_residual_layer_norm_eager(
            x, y, gate, eps, shift=shift, scale=scale, weight=weight, bias=bias, out_dtype=out_dtype
        )
    return _fused(backend).gated_residual_layer_norm(x, y, gate, shift, scale, weight, bias, eps, out_dtype)


def gated_residual_layer_norm_eager(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    eps: float,
    *,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch :func:`gated_residual_layer_norm`."""
    x_new = gated_residual_eager(x, y, gate)
    return x_new, modulated_layer_norm_eager(
        x_new, shift, scale, eps, weight=weight, bias=bias, out_dtype=out_dtype
    )


def _norm_quant(x, y, gate, eps, shift, scale, weight, bias, out_dtype, qdtype, backend):
    """``(x_new or None, QuantizedActivation)``: the residual/norm of the ops above, quantized per token."""
    from wanrt.quant.layers import QuantizedActivation, quantize_per_token

    if backend == "eager":
        if y is None:
            x_new, h = None, modulated_layer_norm_eager(x, shift, scale, eps, weight=weight, bias=bias,
                                                        out_dtype=out_dtype)
        else:
            x_new, h = gated_residual_layer_norm_eager(x, y, gate, eps, shift=shift, scale=scale, weight=weight,
                                                       bias=bias, out_dtype=out_dtype)
        q, qs = quantize_per_token(h.reshape(-1, h.shape[-1]), qdtype)
        return x_new, QuantizedActivation(q, qs, tuple(h.shape), out_dtype)
    if backend != "triton":
        raise ValueError(f"fused-op backend must be 'eager' or 'triton', got {backend!r}")
    from wanrt.kernels.modnorm_quant import residual_norm_quant

    x_new, q, qs = residual_norm_quant(x, y, gate, shift, scale, weight, bias, eps, out_dtype, qdtype)
    return x_new, QuantizedActivation(q, qs, tuple(x.shape), out_dtype)
