"""Normalisation ops with the official Wan2.1 dtype behaviour.

Both norms compute in float32 and round the normalised value back to the input dtype before
the (float32) weight is applied, like ``WanRMSNorm`` and ``WanLayerNorm`` in
``wan/modules/model.py`` (docs/wan21-reference.md §2.6, §2.7, §9.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMS norm over the last dim: ``(x * rsqrt(mean(x^2) + eps)).type_as(x) * weight``.

    Reproduces official ``WanRMSNorm``: the statistics and scaling run on ``x.float()``, the
    result is cast back to ``x.dtype``, then multiplied by ``weight``. With a bf16 ``x`` and a
    float32 weight the output is therefore float32 (bf16-rounded value times fp32 weight).

    Args:
        x: ``[..., D]`` any float dtype.
        weight: ``[D]`` or ``None`` (no affine).
        eps: Added to the mean square (1e-6 in Wan2.1).

    Returns:
        ``[..., D]``; dtype ``x.dtype`` promoted with ``weight.dtype``.
    """
    return rms_norm_eager(x, weight, eps)


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Pure-PyTorch :func:`rms_norm`."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x)
    return y if weight is None else y * weight


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
