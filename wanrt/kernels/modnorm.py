"""Fused gated residual + (modulated, optionally affine) LayerNorm of the Wan2.1 DiT, in Triton.

Every residual add of a ``WanAttentionBlock`` is followed by a LayerNorm: the gated
self-attention add then ``norm3`` (affine), the cross-attention add then ``norm2`` with the FFN
modulation, the gated FFN add then the next block's ``norm1`` (or the head's norm). One kernel
reads ``x``, ``y`` and the modulation rows once and writes the float32 residual and the input of
the next GEMM, instead of four to six eager passes. Numerics follow the official code
(``WanLayerNorm`` = ``nn.LayerNorm`` on ``x.float()`` with biased variance, modulation and
residual in float32); the variance is two-pass (``mean((z - mean)^2)``), never ``E[z^2] - mean^2``.

Layers: the private ``@triton.jit`` kernel (one kernel, constexpr flags pick the variant);
:func:`_modnorm_launch`, which checks and allocates; the ``wanrt::modulated_layer_norm``,
``wanrt::gated_residual`` and ``wanrt::gated_residual_layer_norm`` custom ops with fake
registrations; and the public functions of the same names.
"""


import torch
import triton
import triton.language as tl

from wanrt.kernels._common import TORCH_FLOAT_DTYPES, cast_rne, check_device, interpreting, row_launch
from wanrt.kernels.qk_norm_rope import OUT_DTYPES

# ------------------------------------------------------------------------------ kernel


@triton.jit
def _modnorm_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, w_ptr, bias_ptr, xnew_ptr, h_ptr,
    n_rows, S, D, eps,
    sxb, sxs, syb, sys, sgb, sgs, sshb, sshs, sscb, sscs,
    BLOCK: tl.constexpr, ROWS: tl.constexpr,
    HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, WRITE_X: tl.constexpr, DO_NORM: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROUND_X: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, RNE_BF16: tl.constexpr,
):
    # One tile = ROWS tokens x BLOCK channels; rows are b * S + s. Modulation row of token (b, s): b * s?b + s * s?s
    # (s?s = 0 for a per-sample modulation [B, 1, D], its row stride for a per-token one [B, S, D]).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    d = tl.arange(0, BLOCK)  # [BLOCK]
    d_ok = d < D
    mask = (rows < n_rows)[:, None] & d_ok[None, :]  # [ROWS, BLOCK]
    r64 = rows.to(tl.int64)
    b = r64 // S
    s = r64 % S
    dd = d[None, :]

    z = tl.load(x_ptr + (b * sxb + s * sxs)[:, None] + dd, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + (b * syb + s * sys)[:, None] + dd, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(gate_ptr + (b * sgb + s * sgs)[:, None] + dd, mask=mask, other=0.0)
        z = z + y  # x.float() + y.float() * gate
    if WRITE_X:
        tl.store(xnew_ptr + (r64 * D)[:, None] + dd, z, mask=mask)

    if DO_NORM:
        mean = tl.sum(z, axis=1) / D  # [ROWS]
        diff = tl.where(mask, z - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / D  # biased, as nn.LayerNorm
        n = diff * tl.rsqrt(var + eps)[:, None]
        if HAS_W:
            n = n * tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            n = n + tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        if ROUND_X:  # WanLayerNorm's .type_as(x) for a low-precision x
            n = cast_rne(n, x_ptr.dtype.element_ty, RNE_BF16).to(tl.float32)
        if HAS_SCALE:
            n = n * (1.0 + tl.load(scale_ptr + (b * sscb + s * sscs)[:, None] + dd, mask=mask, other=0.0))
        if HAS_SHIFT:
            n = n + tl.load(shift_ptr + (b * sshb + s * sshs)[:, None] + dd, mask=mask, other=0.0)
        tl.store(h_ptr + (r64 * D)[:, None] + dd, cast_rne(n, h_ptr.dtype.element_ty, RNE_BF16), mask=mask)


# ------------------------------------------------------------------------------ launcher


def _check_modnorm_args(op, x, y, gate, shift, scale, weight, bias, out_dtype) -> None:
    """Validate shapes and dtypes (devices are checked at launch)."""
    if x.ndim != 3:
        raise ValueError(f"{op}: x must be [B, S, D], got {tuple(x.shape)}")
    if x.dtype not in TORCH_FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be one of {TORCH_FLOAT_DTYPES}, got {x.dtype}")
    if y is not None and (tuple(y.shape) != tuple(x.shape) or y.dtype not in TORCH_FLOAT_DTYPES):
        raise ValueError(f"{op}: y must be a float tensor shaped like x {tuple(x.shape)}, got {y.dtype} "
                         f"{tuple(y.shape)}")
    bsz, seq, dim = x.shape
    for name, t in (("gate", gate), ("shift", shift), ("scale", scale)):
        if t is not None and (t.ndim != 3 or t.shape[0] not in (1, bsz) or t.shape[1] not in (1, seq)
                              or t.shape[2] != dim or t.dtype != torch.float32):
            raise ValueError(f"{op}: {name} must be float32 [B={bsz} or 1, 1 or S={seq}, D={dim}] for x "
                             f"{tuple(x.shape)}, got {t.dtype} {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (tuple(t.shape) != (dim,) or t.dtype not in TORCH_FLOAT_DTYPES):
            raise ValueError(f"{op}: {name} must be a float [D={dim}] tensor, got {t.dtype} {tuple(t.shape)}")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def _rows_of(t: torch.Tensor | None) -> torch.Tensor | None:
    """Make the last dim unit-stride (the kernel reads channels contiguously)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _mod_stride(t: torch.Tensor | None) -> int:
    """The modulation's sample stride (0 when it is shared by the batch)."""
    return 0 if t is None or t.shape[0] == 1 else t.stride(0)


def _mod_token_stride(t: torch.Tensor | None) -> int:
    """The modulation's token stride: 0 per sample (``[B, 1, D]``), its row stride per token (``[B, S, D]``)."""
    return 0 if t is None or t.shape[1] == 1 else t.stride(1)


def _modnorm_launch(
    op: str,
    x: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None,
    write_x: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Check, allocate ``x_new`` (float32, when ``write_x``) and ``h`` (when ``out_dtype``), launch."""
    _check_modnorm_args(op, x, y, gate, shift, scale, weight, bias, out_dtype)
    check_device(op, x, y, gate, shift, scale, weight, bias)
    x, y, gate, shift, scale = (_rows_of(t) for t in (x, y, gate, shift, scale))
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    bsz, s, dim = x.shape
    x_new = torch.empty((bsz, s, dim), dtype=torch.float32, device=x.device) if write_x else None
    h = torch.empty((bsz, s, dim), dtype=out_dtype, device=x.device) if out_dtype is not None else None
    n_rows = bsz * s
    if n_rows == 0 or dim == 0:
        return x_new, h
    block, rows, num_warps = row_launch(dim)
    dummy = x  # never read: its flag is off
    _modnorm_kernel[(triton.cdiv(n_rows, rows),)](
        x, dummy if y is None else y, dummy if gate is None else gate, dummy if shift is None else shift,
        dummy if scale is None else scale, dummy if weight is None else weight, dummy if bias is None else bias,
        dummy if x_new is None else x_new, dummy if h is None else h,
        n_rows, s, dim, float(eps),
        x.stride(0), x.stride(1), 0 if y is None else y.stride(0), 0 if y is None else y.stride(1),
        _mod_stride(gate), _mod_token_stride(gate), _mod_stride(shift), _mod_token_stride(shift),
        _mod_stride(scale), _mod_token_stride(scale),
        BLOCK=block, ROWS=rows,
        HAS_Y=y is not None, HAS_GATE=gate is not None, WRITE_X=write_x, DO_NORM=h is not None,
        HAS_W=weight is not None, HAS_B=bias is not None,
        ROUND_X=y is None and x.dtype != torch.float32,
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, RNE_BF16=interpreting(),
        num_warps=num_warps,
    )
    return x_new, h


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("wanrt::modulated_layer_norm", mutates_args=())
def _modulated_layer_norm_op(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _modnorm_launch("modulated_layer_norm", x, None, None, shift, scale, weight, bias, eps, out_dtype,
                           write_x=False)[1]


@_modulated_layer_norm_op.register_fake
def _modulated_layer_norm_fake(x, shift, scale, weight, bias, eps, out_dtype):
    _check_modnorm_args("modulated_layer_norm", x, None, None, shift, scale, weight, bias, out_dtype)
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("wanrt::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return _modnorm_launch("gated_residual", x, y, gate, None, None, None, None, 0.0, None, write_x=True)[0]


@_gated_residual_op.register_fake
def _gated_residual_fake(x, y, gate):
    _check_modnorm_args("gated_residual", x, y, gate, None, None, None, None, None)
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("wanrt::gated_residual_layer_norm", mutates_args=())
def _gated_residual_layer_norm_op(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _modnorm_launch("gated_residual_layer_norm", x, y, gate, shift, scale, weight, bias, eps, out_dtype,
                           write_x=True)


@_gated_residual_layer_norm_op.register_fake
def _gated_residual_layer_norm_fake(x, y, gate, shift, scale, weight, bias, eps, out_dtype):
    _check_modnorm_args("gated_residual_layer_norm", x, y, gate, shift, scale, weight, bias, out_dtype)
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape, dtype=out_dtype)


# ------------------------------------------------------------------------------ public API


def modulated_layer_norm(
    x: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Modulated LayerNorm: ``h = (LN(x) * (1 + scale) + shift).to(out_dtype)``, one pass.

    ``LN(x) = ((x_f - mean) * rsqrt(var + eps) * weight + bias)`` over ``D`` in float32
    (``x_f = x.float()``, biased variance), rounded to ``x.dtype`` when ``x`` is bf16/fp16
    (``WanLayerNorm``'s ``.type_as(x)``); the modulation is float32. Official
    ``norm1(x).float() * (1 + e[1]) + e[0]`` of ``WanAttentionBlock`` and the head's
    ``norm(x) * (1 + e[1]) + e[0]`` (``wan/modules/model.py``). Twin:
    :func:`wanrt.ops.norms.modulated_layer_norm_eager`.

    Args:
        x: ``[B, S, D]`` float32/bfloat16/float16; any B and S strides.
        shift: float32 ``[B or 1, 1 or S, D]`` (per sample or per token) or ``None`` (no shift).
        scale: float32 ``[B or 1, 1 or S, D]`` (per sample or per token) or ``None`` (no scale).
        weight: LayerNorm weight ``[D]`` (any float dtype) or ``None``.
        bias: LayerNorm bias ``[D]`` (any float dtype) or ``None``.
        eps: LayerNorm epsilon (1e-6 in the DiT).
        out_dtype: float16, bfloat16, float32 or float64.

    Returns:
        ``h`` ``[B, S, D]`` in ``out_dtype`` (contiguous).

    Raises:
        ValueError: on bad shapes or dtypes, or tensors that are not CUDA (CPU only under
            ``TRITON_INTERPRET=1``) or not on one device.
    """
    _check_modnorm_args("modulated_layer_norm", x, None, None, shift, scale, weight, bias, out_dtype)
    return _modulated_layer_norm_op(x, shift, scale, weight, bias, float(eps), out_dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """Gated residual into the float32 stream: ``x_new = x.float() + y.float() * gate``.

    Official ``x = x + y * e[2]`` / ``x + cross_attn(...)`` / ``x = x + y * e[5]`` of
    ``WanAttentionBlock``. Twin: :func:`wanrt.ops.norms.gated_residual_eager`.

    Args:
        x: Residual ``[B, S, D]`` float32 (bf16/fp16 in block 0).
        y: Branch output ``[B, S, D]``, any float dtype.
        gate: float32 ``[B or 1, 1 or S, D]`` (per sample or per token) or ``None`` (gate 1).

    Returns:
        A new float32 ``[B, S, D]`` tensor.

    Raises:
        ValueError: on bad shapes, dtypes or devices.
    """
    _check_modnorm_args("gated_residual", x, y, gate, None, None, None, None, None)
    return _gated_residual_op(x, y, gate)


def gated_residual_layer_norm(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated residual then modulated LayerNorm of the new residual, one pass.

    ``x_new = x.float() + y.float() * gate``;
    ``h = ((x_new - mean) * rsqrt(var + eps) * weight + bias) * (1 + scale) + shift`` in float32
    (biased variance over ``D``), cast to ``out_dtype``. Reads ``x``, ``y`` and the modulation once;
    writes the float32 residual and the next GEMM's input. Twin:
    :func:`wanrt.ops.norms.gated_residual_layer_norm_eager`.

    Args:
        x: Residual ``[B, S, D]`` float32 (bf16/fp16 in block 0).
        y: Branch output ``[B, S, D]``, any float dtype.
        gate: float32 ``[B or 1, 1 or S, D]`` (per sample or per token) or ``None`` (gate 1).
        shift: float32 ``[B or 1, 1 or S, D]`` (per sample or per token) or ``None``.
        scale: float32 ``[B or 1, 1 or S, D]`` (per sample or per token) or ``None``.
        weight: LayerNorm weight ``[D]`` or ``None``.
        bias: LayerNorm bias ``[D]`` or ``None``.
        eps: LayerNorm epsilon.
        out_dtype: dtype of ``h``: float16, bfloat16, float32 or float64.

    Returns:
        ``(x_new float32 [B, S, D], h [B, S, D] in out_dtype)``, both new contiguous tensors.

    Raises:
        ValueError: on bad shapes, dtypes or devices.
    """
    _check_modnorm_args("gated_residual_layer_norm", x, y, gate, shift, scale, weight, bias, out_dtype)
    return _gated_residual_layer_norm_op(x, y, gate, shift, scale, weight, bias, float(eps), out_dtype)
