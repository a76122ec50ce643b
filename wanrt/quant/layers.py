"""Quantized Linear layers: FP8 (W8A8, float8_e4m3fn), INT8 (W8A8) and INT8 weight-only.

All three keep the weight in 8 bits with one float32 scale per output channel (``weight ≈ q · scale[:, None]``)
and are built from a float ``nn.Linear`` with ``from_linear``. The state-dict names are ``weight`` (8-bit),
``weight_scale`` (float32 ``[out_features]``) and ``bias`` (the output dtype): the layout of LightX2V's
per-channel fp8/int8 files, so those load directly.

* :class:`FP8Linear` quantizes activations per token on the fly (absmax → scale → cast) and runs
  ``torch._scaled_mm`` with both scales and the bias, output in ``out_dtype`` (bf16).
* :class:`Int8Linear` quantizes activations per token to int8, runs ``torch._int_mm`` (int32 accumulation),
  then rescales by ``x_scale · w_scale`` and adds the bias.
* :class:`Int8WeightOnlyLinear` multiplies the activations by the int8 weight cast to the activation dtype and
  scales the output columns (GPUs without fast int8 GEMMs; memory saving only).

Sources: FP8 formats, Micikevicius et al. 2022 (arXiv:2209.05433); LLM.int8 / SmoothQuant-style per-token ×
per-channel W8A8, Dettmers et al. 2022 and Xiao et al. 2023.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT8_MAX = 127.0
_EPS = 1e-12


# ------------------------------------------------------------------------------ quantize / dequantize


def quantize_rowwise(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of ``w [rows, cols]``: ``(q, scale)`` with ``w ≈ q · scale[:, None]``.

    ``scale = absmax(row) / qmax`` (qmax 448 for float8_e4m3fn, 127 for int8), computed in float32; an all-zero
    row gets scale 1. fp8 values are cast (round to nearest even), int8 values rounded and clamped to ±127.

    Returns:
        ``q`` ``[rows, cols]`` in ``dtype``; ``scale`` float32 ``[rows]``.

    Raises:
        ValueError: for a dtype other than float8_e4m3fn or int8, or a non-2-D ``w``.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_rowwise expects a 2-D tensor, got {tuple(w.shape)}")
    qmax = _qmax(dtype)
    wf = w.float()
    amax = wf.abs().amax(dim=1)  # [rows]
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = wf / scale[:, None]
    if dtype == torch.int8:
        q = q.round().clamp_(-INT8_MAX, INT8_MAX)
    else:
        q = q.clamp_(-FP8_MAX, FP8_MAX)
    return q.to(dtype), scale


def dequantize_rowwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.float() · scale[:, None]`` in ``dtype`` (``scale`` ``[rows]``, or a scalar for per-tensor scales)."""
    s = scale.float()
    s = s[:, None] if s.ndim == 1 else s
    return (q.float() * s).to(dtype)


def _qmax(dtype: torch.dtype) -> float:
    if dtype == FP8_DTYPE:
        return FP8_MAX
    if dtype == torch.int8:
        return INT8_MAX
    raise ValueError(f"unsupported quantized dtype {dtype}; use torch.float8_e4m3fn or torch.int8")


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype,
                       backend: str = "eager") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) activation quantization of ``x [M, K]``: ``(q [M, K], scale float32 [M, 1])``.

    Same rule as :func:`quantize_rowwise` (absmax / qmax, scale 1 for an all-zero row). ``backend="triton"`` runs
    the fused kernel of :mod:`wanrt.kernels.quant` (one read of ``x``, one write of ``q``).
    """
    if backend == "triton":
        from wanrt.kernels.quant import quantize_per_token as kernel

        return kernel(x, dtype)
    q, scale = quantize_rowwise(x, dtype)
    return q, scale[:, None]


class QuantizedActivation:
    """An activation already quantized per token, for the 8-bit Linears that read it.

    Attributes:
        q: ``[M, K]`` float8_e4m3fn or int8 (M = the product of the leading dims).
        scale: float32 ``[M, 1]``.
        shape: the activation's logical shape ``[..., K]``.
        dtype: the dtype the activation had before quantization (the Linears' compute dtype).

    Produced by the fused norm ops (``quantize=`` of :func:`wanrt.ops.gated_residual_layer_norm`), so a norm's
    output is quantized once for every Linear that reads it (self-attention's q, k and v).
    """

    __slots__ = ("q", "scale", "shape", "dtype")

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype):
        self.q, self.scale, self.shape, self.dtype = q, scale, tuple(shape), dtype

    def dequantize(self) -> torch.Tensor:
        """``q · scale`` as a ``shape`` tensor in ``dtype``."""
        return (self.q.float() * self.scale).to(self.dtype).reshape(self.shape)


def input_quant_dtype(*layers: nn.Module) -> torch.dtype | None:
    """The activation dtype that every one of ``layers`` quantizes its input to (all FP8Linear or all Int8Linear),
    else None: the norm before them can then hand them a :class:`QuantizedActivation`."""
    kinds = {type(m) for m in layers}
    if len(kinds) == 1 and kinds.pop() in (FP8Linear, Int8Linear):
        return layers[0].qdtype
    return None


# ------------------------------------------------------------------------------ layers


class _QuantLinear(nn.Module):
    """Shared parts: an 8-bit ``weight [out, in]``, float32 ``weight_scale [out]``, optional ``bias [out]``."""

    qdtype: torch.dtype
    scheme: str

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 out_dtype: torch.dtype = torch.bfloat16, device=None, act_backend: str = "eager"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.out_dtype = out_dtype
        self.act_backend = act_backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=self.qdtype, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=out_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, out_dtype: torch.dtype = torch.bfloat16, device=None,
                    act_backend: str = "eager") -> _QuantLinear:
        """Quantize ``linear`` (any float dtype, any device) per output channel, on ``device`` (default: the
        linear's own device). The float weight is read once and not kept."""
        device = torch.device(device) if device is not None else linear.weight.device
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, out_dtype=out_dtype,
                    device="meta", act_backend=act_backend)
        q, scale = quantize_rowwise(linear.weight.detach().to(device), cls.qdtype)
        bias = None if linear.bias is None else linear.bias.detach().to(device=device, dtype=out_dtype)
        return layer.load_quantized(q, scale, bias)

    def load_quantized(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> _QuantLinear:
        """Assign already-quantized tensors: ``weight [out, in]`` in this layer's 8-bit dtype, ``scale`` float32
        ``[out]`` (or a scalar, broadcast), ``bias [out]`` or None.

        Raises:
            ValueError: wrong dtype or shape (names which).
        """
        if weight.dtype != self.qdtype or tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{type(self).__name__}: weight must be {self.qdtype} "
                             f"[{self.out_features}, {self.in_features}], got {weight.dtype} {tuple(weight.shape)}")
        scale = scale.float().reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(self.out_features).clone()
        if tuple(scale.shape) != (self.out_features,):
            raise ValueError(f"{type(self).__name__}: weight_scale must have {self.out_features} entries (one per "
                             f"output channel) or 1, got {tuple(scale.shape)}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.to(weight.device), requires_grad=False)
        if (bias is None) != (self.bias is None):
            raise ValueError(f"{type(self).__name__}: bias {'missing' if bias is None else 'unexpected'}")
        if bias is not None:
            self.bias = nn.Parameter(bias.to(device=weight.device, dtype=self.out_dtype), requires_grad=False)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``weight · weight_scale[:, None]`` in ``dtype``."""
        return dequantize_rowwise(self.weight, self.weight_scale, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, out_dtype={self.out_dtype}")

    def _quantized_input(self, x) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """``(q [M, K], scale [M, 1], leading shape)`` of ``x``: quantized here, or as handed over."""
        if isinstance(x, QuantizedActivation):
            if x.q.dtype != self.qdtype or x.shape[-1] != self.in_features:
                raise ValueError(f"{type(self).__name__}: got a {x.q.dtype} activation of width {x.shape[-1]}, "
                                 f"expected {self.qdtype} of width {self.in_features}")
            return x.q, x.scale, x.shape[:-1]
        xq, xs = quantize_per_token(self._flat(x), self.qdtype, self.act_backend)
        return xq, xs, tuple(x.shape[:-1])

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.in_features}")
        return x.reshape(-1, self.in_features)


class FP8Linear(_QuantLinear):
    """W8A8 float8_e4m3fn Linear: per-channel weight scales, per-token activation scales, ``torch._scaled_mm``.

    ``y = (q_x · s_x) @ (q_w · s_w)^T + b`` with ``q_x = fp8(x / s_x)``, ``s_x = absmax_token(x) / 448``.
    Input ``[..., in_features]`` any float dtype; output ``[..., out_features]`` in ``out_dtype``.
    """

    qdtype = FP8_DTYPE
    scheme = "fp8"

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        xq, xs, lead = self._quantized_input(x)  # [M, K], [M, 1]
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale[None, :],
                             bias=self.bias, out_dtype=self.out_dtype)  # [M, N]
        return y.reshape(*lead, self.out_features)


class Int8Linear(_QuantLinear):
    """W8A8 int8 Linear: ``torch._int_mm`` (int32 accumulation), then ``· s_x · s_w + b``.

    ``q_x = round(x / s_x)`` with ``s_x = absmax_token(x) / 127``. Output in ``out_dtype``.
    """

    qdtype = torch.int8
    scheme = "int8"

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        xq, xs, lead = self._quantized_input(x)  # [M, K], [M, 1]
        if self.act_backend == "triton":
            from wanrt.kernels.quant import int8_matmul_rescale

            y = int8_matmul_rescale(xq, self.weight, xs, self.weight_scale, self.bias, self.out_dtype)
        else:
            acc = torch._int_mm(xq, self.weight.t())  # [M, N] int32
            y = acc.float() * xs * self.weight_scale[None, :]
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(self.out_dtype)
        return y.reshape(*lead, self.out_features)


class Int8WeightOnlyLinear(_QuantLinear):
    """Weight-only int8 Linear: ``(x @ q_w^T) · s_w + b`` in the activation dtype (``out_dtype``)."""

    qdtype = torch.int8
    scheme = "int8-wo"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.out_dtype)
        y = F.linear(x, self.weight.to(self.out_dtype)) * self.weight_scale.to(self.out_dtype)
        return y if self.bias is None else y + self.bias


SCHEMES: dict[str, type[_QuantLinear]] = {"fp8": FP8Linear, "int8": Int8Linear, "int8-wo": Int8WeightOnlyLinear}
