"""Gated residual + modulated LayerNorm + per-token 8-bit quantization, in one pass (Triton).

The input of an FP8/INT8 Linear is the output of a norm (official ``norm1(x)·(1+scale)+shift`` before
self-attention, ``norm3(x)`` before cross-attention's q, ``norm2(x)·(1+scale)+shift`` before the FFN). This
kernel reads the residual ``x`` (and the branch output ``y`` with its gate), writes the new float32 residual,
and instead of the bf16 normalized row writes it quantized per token (``q`` 8-bit, ``scale`` float32), once for
all the Linears that read it (self-attention's q, k and v share one quantization).

Numerics are those of the eager twin (:func:`wanrt.ops.norms.gated_residual_layer_norm` then
:func:`wanrt.quant.layers.quantize_per_token` on its ``out_dtype`` result): the normalized row is rounded to
``out_dtype`` before its absmax and quantization, exactly as a Linear quantizing a bf16 input would.

Layers: the private ``@triton.jit`` kernel; :func:`_launch`; the ``wanrt::residual_norm_quant`` custom op with
a fake registration; the public :func:`residual_norm_quant`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanrt.kernels._common import cast_rne, check_device, interpreting, quantize_row, row_launch
from wanrt.kernels.modnorm import _check_modnorm_args, _mod_stride, _mod_token_stride, _rows_of
from wanrt.kernels.quant import QMAX


@triton.jit
def _residual_norm_quant_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, w_ptr, bias_ptr, xnew_ptr, q_ptr, qs_ptr,
    S, D, eps, qmax, inv_qmax,
    sxb, sxs, syb, sys, sgb, sgs, sshb, sshs, sscb, sscs,
    BLOCK: tl.constexpr, HAS_Y: tl.constexpr, HAS_GATE: tl.constexpr, WRITE_X: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROUND_X: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr, OUT_DTYPE: tl.constexpr, IS_INT8: tl.constexpr, SCALE_RECIP: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # One program = one token row (b, s); its modulation row b * s?b + s * s?s (s?s = 0: per-sample modulation).
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s = row % S
    d = tl.arange(0, BLOCK)
    ok = d < D
    z = tl.load(x_ptr + b * sxb + s * sxs + d, mask=ok, other=0.0).to(tl.float32)
    if HAS_Y:
        y = tl.load(y_ptr + b * syb + s * sys + d, mask=ok, other=0.0).to(tl.float32)
        if HAS_GATE:
            y = y * tl.load(gate_ptr + b * sgb + s * sgs + d, mask=ok, other=0.0)
        z = z + y
    if WRITE_X:
        tl.store(xnew_ptr + row * D + d, z, mask=ok)
    mean = tl.sum(z, axis=0) / D
    diff = tl.where(ok, z - mean, 0.0)
    n = diff * tl.rsqrt(tl.sum(diff * diff, axis=0) / D + eps)
    if HAS_W:
        n = n * tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
    if HAS_B:
        n = n + tl.load(bias_ptr + d, mask=ok, other=0.0).to(tl.float32)
    if ROUND_X:
        n = cast_rne(n, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    if HAS_SCALE:
        n = n * (1.0 + tl.load(scale_ptr + b * sscb + s * sscs + d, mask=ok, other=0.0))
    if HAS_SHIFT:
        n = n + tl.load(shift_ptr + b * sshb + s * sshs + d, mask=ok, other=0.0)
    n = cast_rne(n, OUT_DTYPE, INTERPRET).to(tl.float32)  # the Linear's input dtype, as in eager
    n = tl.where(ok, n, 0.0)
    q, qs = quantize_row(n, qmax, inv_qmax, IS_INT8, SCALE_RECIP, INTERPRET)
    tl.store(q_ptr + row * D + d, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(qs_ptr + row, qs)


_TL_DTYPE = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _check(x, y, gate, shift, scale, weight, bias, out_dtype, qdtype) -> None:
    _check_modnorm_args("residual_norm_quant", x, y, gate, shift, scale, weight, bias, out_dtype)
    if qdtype not in QMAX:
        raise ValueError(f"residual_norm_quant: qdtype must be one of {list(QMAX)}, got {qdtype}")
    if out_dtype not in _TL_DTYPE:
        raise ValueError(f"residual_norm_quant: out_dtype must be one of {list(_TL_DTYPE)}, got {out_dtype}")


def _launch(x, y, gate, shift, scale, weight, bias, eps, out_dtype, qdtype, write_x):
    _check(x, y, gate, shift, scale, weight, bias, out_dtype, qdtype)
    check_device("residual_norm_quant", x, y, gate, shift, scale, weight, bias)
    x, y, gate, shift, scale = (_rows_of(t) for t in (x, y, gate, shift, scale))
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    bsz, s, dim = x.shape
    x_new = x.new_empty((bsz, s, dim) if write_x else (0,), dtype=torch.float32)
    q = torch.empty((bsz * s, dim), dtype=qdtype, device=x.device)
    qs = torch.empty((bsz * s, 1), dtype=torch.float32, device=x.device)
    if bsz * s == 0:
        return x_new, q, qs
    block, _, num_warps = row_launch(dim, max_rows=1)
    qmax = QMAX[qdtype]
    dummy = x
    _residual_norm_quant_kernel[(bsz * s,)](
        x, dummy if y is None else y, dummy if gate is None else gate, dummy if shift is None else shift,
        dummy if scale is None else scale, dummy if weight is None else weight, dummy if bias is None else bias,
        x_new if write_x else dummy, q, qs,
        s, dim, float(eps), qmax, float(torch.tensor(1.0 / qmax, dtype=torch.float32)),
        x.stride(0), x.stride(1), 0 if y is None else y.stride(0), 0 if y is None else y.stride(1),
        _mod_stride(gate), _mod_token_stride(gate), _mod_stride(shift), _mod_token_stride(shift),
        _mod_stride(scale), _mod_token_stride(scale),
        BLOCK=block, HAS_Y=y is not None, HAS_GATE=gate is not None, WRITE_X=write_x,
        HAS_W=weight is not None, HAS_B=bias is not None, ROUND_X=y is None and x.dtype != torch.float32,
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, OUT_DTYPE=_TL_DTYPE[out_dtype],
        IS_INT8=qdtype == torch.int8, SCALE_RECIP=x.is_cuda, INTERPRET=interpreting(),
        num_warps=num_warps,
    )
    return x_new, q, qs


@torch.library.custom_op("wanrt::residual_norm_quant", mutates_args=())
def _op(x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None, shift: torch.Tensor | None,
        scale: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
        out_dtype: torch.dtype, qdtype: torch.dtype, write_x: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(x, y, gate, shift, scale, weight, bias, eps, out_dtype, qdtype, write_x)


@_op.register_fake
def _fake(x, y, gate, shift, scale, weight, bias, eps, out_dtype, qdtype, write_x):
    _check(x, y, gate, shift, scale, weight, bias, out_dtype, qdtype)
    bsz, s, dim = x.shape
    return (x.new_empty((bsz, s, dim) if write_x else (0,), dtype=torch.float32),
            x.new_empty((bsz * s, dim), dtype=qdtype), x.new_empty((bsz * s, 1), dtype=torch.float32))


def residual_norm_quant(
    x: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    qdtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``x_new = x + y·gate`` (when ``y`` is given), ``h = LN(x_new)·(1+scale)+shift`` rounded to ``out_dtype``,
    then ``(q, s) = quantize_per_token(h, qdtype)``; one pass.

    Args: as :func:`wanrt.kernels.modnorm.gated_residual_layer_norm`, plus ``qdtype`` (float8_e4m3fn or int8).

    Returns:
        ``(x_new float32 [B, S, D] or None without y, q [B*S, D] in qdtype, s float32 [B*S, 1])``.

    Raises:
        ValueError: bad shapes, dtypes or devices.
    """
    x_new, q, qs = _op(x, y, gate, shift, scale, weight, bias, float(eps), out_dtype, qdtype, y is not None)
    return (x_new if y is not None else None), q, qs
