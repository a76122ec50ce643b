"""Wan2.1 and Wan2.2 causal 3D VAEs (Wan-VAE) in eager PyTorch, with the official numerics.

Reproduces ``WanVAE_`` of the official ``wan/modules/vae.py`` (Wan2.1) and of ``wan/modules/vae2_2.py``
(Wan2.2, the TI2V-5B VAE: ``VAEConfig.wan22()``) (docs/model-reference.md §4, §9.8, "Wan2.2 VAE"):
parameter names are the ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` keys, the encoder runs on chunks of 1,
4, 4, ... frames and the decoder on one latent frame at a time, with an explicit :class:`CausalCache` in
place of the official ``feat_cache`` list and counter. Everything runs in the weights' dtype (float32 in
the official code); ``encode``/``decode`` return float32.

Shapes: video ``[B, 3, F, H, W]`` in [-1, 1] with ``F = 1 + 4k`` and ``H, W`` multiples of
``s = config.spatial_factor`` (8 for Wan2.1, 16 for Wan2.2) <-> latents
``[B, z_dim, 1 + (F - 1) / 4, H / s, W / s]`` (z_dim 16 / 48), normalized with the published
per-channel mean/std.

The Wan2.2 layout (``is_residual=True``, ``patch_size=2``) differs in four places: the video is
pixel-patchified 2x2 into 12 channels around the encoder and decoder; each encoder stage is a
:class:`DownResidualBlock` (its blocks plus an :class:`AvgDown3D` parameter-free shortcut); each decoder
stage an :class:`UpResidualBlock` (its blocks plus a :class:`DupUp3D` shortcut that drops leading frames on
the first latent frame); and the decoder's upsampling convs keep their channel count.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wanrt.cache.causal_cache import CausalCache, SlotState, assign_cache_slots
from wanrt.ops import attention

__all__ = [
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WAN22_LATENTS_MEAN",
    "WAN22_LATENTS_STD",
    "VAEConfig",
    "WanVAE",
    "CausalConv3d",
    "RMSNorm",
    "ResidualBlock",
    "AttentionBlock",
    "Resample",
    "ResampleMode",
    "Encoder3d",
    "Decoder3d",
    "AvgDown3D",
    "DupUp3D",
    "DownResidualBlock",
    "UpResidualBlock",
    "patchify",
    "unpatchify",
]

WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
# Wan2.2 (TI2V-5B) VAE, 48 latent channels: the ``mean`` / ``std`` of ``Wan2_2_VAE.__init__`` in the official
# ``wan/modules/vae2_2.py`` (the same values as the diffusers ``Wan2.2-TI2V-5B-Diffusers`` ``vae/config.json``).
WAN22_LATENTS_MEAN: tuple[float, ...] = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD: tuple[float, ...] = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of a Wan-VAE (defaults: the released ``Wan2.1_VAE.pth``; :meth:`wan22`: ``Wan2.2_VAE.pth``).

    Attributes:
        base_dim: channels of the first encoder stage (official ``dim``; 96 for Wan2.1, 160 for Wan2.2).
        z_dim: latent channels (16; 48 for Wan2.2).
        dim_mult: channel multiplier per stage; ``len(dim_mult) - 1`` stages halve H and W.
        num_res_blocks: residual blocks per encoder stage (the decoder has one more per stage).
        attn_scales: spatial scales (1.0, 0.5, ...) that get an AttentionBlock after each residual
            block (empty for Wan2.1; diffusers' decoder does not implement them; the residual layout has none).
        temporal_downsample: per downsampling stage, whether it also halves time (official and
            diffusers spell it ``temperal_downsample``); the decoder uses it reversed.
        latents_mean: per-channel latent mean, ``z_dim`` values (published Wan2.1 values).
        latents_std: per-channel latent std, ``z_dim`` positive values (published Wan2.1 values).
        is_residual: the Wan2.2 layout: encoder stages are :class:`DownResidualBlock` (with an
            :class:`AvgDown3D` shortcut), decoder stages :class:`UpResidualBlock` (with a :class:`DupUp3D`
            shortcut), and the decoder's upsampling convs keep their channels (Wan2.1 halves them).
        patch_size: pixel patchify ``p``: the video is rearranged ``b c f (h q) (w r) -> b (c r q) f h w``
            (``q = r = p``) before the encoder, whose input has ``3 p²`` channels; the decoder outputs ``3 p²``
            channels, rearranged back (1 for Wan2.1, 2 for Wan2.2).
        decoder_base_dim: the decoder's base width (official ``dec_dim``; diffusers ``decoder_base_dim``);
            None means ``base_dim`` (Wan2.1). 256 for Wan2.2.

    Raises:
        ValueError: on inconsistent values (see ``__post_init__``).
    """

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    patch_size: int = 1
    decoder_base_dim: int | None = None

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples so the config stays hashable and frozen.
        for name, conv in (
            ("dim_mult", int),
            ("attn_scales", float),
            ("temporal_downsample", bool),
            ("latents_mean", float),
            ("latents_std", float),
        ):
            object.__setattr__(self, name, tuple(conv(v) for v in getattr(self, name)))
        object.__setattr__(self, "is_residual", bool(self.is_residual))
        if self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1:
            raise ValueError(
                f"base_dim, z_dim and num_res_blocks must be >= 1, got "
                f"{self.base_dim}, {self.z_dim}, {self.num_res_blocks}"
            )
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        if self.decoder_base_dim is not None and self.decoder_base_dim < 1:
            raise ValueError(f"decoder_base_dim must be >= 1 or None, got {self.decoder_base_dim}")
        if len(self.dim_mult) < 2 or min(self.dim_mult) < 1:
            raise ValueError(f"dim_mult needs >= 2 positive entries, got {self.dim_mult}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, "
                f"got {self.temporal_downsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"latents_mean/latents_std need z_dim={self.z_dim} values each, got "
                f"{len(self.latents_mean)} and {len(self.latents_std)}"
            )
        if min(self.latents_std) <= 0:
            raise ValueError(f"latents_std must be positive, got {self.latents_std}")
        if self.is_residual:
            if self.attn_scales:
                raise ValueError(f"the residual (Wan2.2) layout has no attention blocks, got attn_scales={self.attn_scales}")
            last = len(self.dim_mult) - 1
            enc = [self.base_dim * m for m in (1, *self.dim_mult)]
            dec = [self.dec_dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
            for i in range(len(self.dim_mult)):
                f = (4 * (2 if self.temporal_downsample[i] else 1)) if i != last else 1
                if enc[i] * f % enc[i + 1]:  # AvgDown3D groups in * factor channels into out groups
                    raise ValueError(f"encoder stage {i}: AvgDown3D {enc[i]} -> {enc[i + 1]} channels at factor {f} "
                                     "does not divide evenly")
                f = 4 * (2 if self.temporal_upsample[i] else 1) if i != last else 0
                if f and dec[i + 1] * f % dec[i]:  # DupUp3D repeats each in channel out * factor / in times
                    raise ValueError(f"decoder stage {i}: DupUp3D {dec[i]} -> {dec[i + 1]} channels at factor {f} "
                                     "does not divide evenly")

    @classmethod
    def wan22(cls, base_dim: int = 160, decoder_base_dim: int | None = 256, **overrides: Any) -> VAEConfig:
        """The Wan2.2 (TI2V-5B) VAE layout: residual stages, 2x2 patchify, 48 latent channels, its mean/std.

        The defaults are the released ``Wan2.2_VAE.pth`` (official ``Wan2_2_VAE``: ``c_dim=160``, ``dec_dim=256``,
        ``z_dim=48``, ``dim_mult=[1, 2, 4, 4]``, ``temperal_downsample=[False, True, True]``); small widths
        (e.g. ``VAEConfig.wan22(base_dim=8, decoder_base_dim=16)``) give tiny test models of the same layout.

        Args:
            base_dim: encoder base width.
            decoder_base_dim: decoder base width (None: ``base_dim``).
            overrides: any other field.
        """
        fields: dict[str, Any] = dict(
            base_dim=base_dim, decoder_base_dim=decoder_base_dim, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
            attn_scales=(), temporal_downsample=(False, True, True), latents_mean=WAN22_LATENTS_MEAN,
            latents_std=WAN22_LATENTS_STD, is_residual=True, patch_size=2,
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def is_wan22(self) -> bool:
        """True for the Wan2.2 (residual, patchified) layout."""
        return self.is_residual

    @property
    def dec_dim(self) -> int:
        """The decoder's base width (``decoder_base_dim``, or ``base_dim`` when None)."""
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @property
    def io_channels(self) -> int:
        """Channels entering the encoder and leaving the decoder: ``3 * patch_size**2`` (3; 12 for Wan2.2)."""
        return 3 * self.patch_size**2

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame after the first (4 for Wan2.1 and Wan2.2)."""
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W, the patchify included (8 for Wan2.1, 16 for Wan2.2)."""
        return 2 ** (len(self.dim_mult) - 1) * self.patch_size

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        """Per decoder upsampling stage, whether it doubles time (``temporal_downsample`` reversed)."""
        return self.temporal_downsample[::-1]

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Builds the config from diffusers ``AutoencoderKLWan``'s ``config.json`` dict.

        Missing keys take the diffusers defaults (which equal ours); ``_class_name``, ``dropout``,
        ``clip_output`` and the scale-factor keys are ignored (``scale_factor_spatial`` is checked against the
        layout when given). ``patch_size: null`` means 1.

        Raises:
            ValueError: for a layout this module does not implement: ``in_channels`` / ``out_channels`` other
                than ``3 * patch_size**2``, or a ``scale_factor_spatial`` that contradicts the layout.
        """
        d = cls()
        patch = config.get("patch_size") or 1
        io = 3 * patch * patch
        unsupported = []
        for key in ("in_channels", "out_channels"):
            if config.get(key, 3) != io:
                unsupported.append(f"{key}={config.get(key, 3)} (patch_size={patch} needs {io})")
        if unsupported:
            raise ValueError(f"unsupported AutoencoderKLWan config: {', '.join(unsupported)}")
        dec_dim = config.get("decoder_base_dim")
        base = config.get("base_dim", d.base_dim)
        cfg = cls(
            base_dim=base,
            z_dim=config.get("z_dim", d.z_dim),
            dim_mult=config.get("dim_mult", d.dim_mult),
            num_res_blocks=config.get("num_res_blocks", d.num_res_blocks),
            attn_scales=config.get("attn_scales", d.attn_scales),
            temporal_downsample=config.get("temperal_downsample", d.temporal_downsample),
            latents_mean=config.get("latents_mean", d.latents_mean),
            latents_std=config.get("latents_std", d.latents_std),
            is_residual=config.get("is_residual", False),
            patch_size=patch,
            decoder_base_dim=None if dec_dim is None or dec_dim == base else dec_dim,
        )
        sf = config.get("scale_factor_spatial")
        if patch > 1 and sf is not None and sf != cfg.spatial_factor:  # (Wan2.1 files keep diffusers' default 8)
            raise ValueError(f"AutoencoderKLWan config: scale_factor_spatial={sf}, but the layout gives "
                             f"{cfg.spatial_factor}")
        return cfg

    def to_diffusers_config(self) -> dict[str, Any]:
        """The ``AutoencoderKLWan`` constructor kwargs for this config (JSON-serializable lists).

        The Wan2.2 fields (``is_residual``, ``patch_size``, ``decoder_base_dim``, ``in/out_channels`` and the
        scale factors) are written only when they differ from Wan2.1's, so a Wan2.1 config gives the same dict
        as before.
        """
        out: dict[str, Any] = {
            "base_dim": self.base_dim,
            "z_dim": self.z_dim,
            "dim_mult": list(self.dim_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_scales": list(self.attn_scales),
            "temperal_downsample": list(self.temporal_downsample),
            "latents_mean": list(self.latents_mean),
            "latents_std": list(self.latents_std),
        }
        if self.decoder_base_dim is not None:
            out["decoder_base_dim"] = self.decoder_base_dim
        if self.is_residual or self.patch_size != 1:
            out.update(
                is_residual=self.is_residual,
                in_channels=self.io_channels,
                out_channels=self.io_channels,
                patch_size=self.patch_size,
                scale_factor_temporal=self.temporal_factor,
                scale_factor_spatial=self.spatial_factor,
            )
        return out


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _triple(v: int | Sequence[int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding=(0, 0, 0)) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, stride, padding)``; on the CPU in float32 through oneDNN.

    For 3-D convolutions on the CPU torch's own dispatch takes its reference loop (``aten::slow_conv3d``, an
    im2col per sample plus a GEMM) even where oneDNN is built in; oneDNN's direct convolution is several times
    faster and agrees to float32 rounding (the same sums in another order). Autograd works through both.
    Other devices and dtypes, and tracing / ONNX export / torch.compile, go to ``F.conv3d`` (cuDNN on CUDA).

    Args:
        x: ``[B, C_in, T, H, W]``.
        weight: ``[C_out, C_in, kt, kh, kw]``, the dtype of ``x``.
        bias: ``[C_out]`` or None.
        stride: ``(st, sh, sw)``.
        padding: symmetric zero padding ``(pt, ph, pw)``.

    Returns:
        ``[B, C_out, T', H', W']``.
    """
    if (_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not _exporting()):
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight, bias, list(padding), list(stride), [1, 1, 1],
                                                 1)
    return F.conv3d(x, weight, bias, stride, padding)


_ONEDNN = torch.backends.mkldnn.is_available()


def _exporting() -> bool:
    """Tracing, ONNX export or torch.compile: they get the portable ``F.conv3d``."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


class CausalConv3d(nn.Conv3d):
    """3D convolution that is causal in time (official ``CausalConv3d``).

    With ``padding=(pt, ph, pw)`` the input is zero-padded by ``2*pt`` frames in front and none
    after, ``ph``/``pw`` on both spatial sides. Frames given as a prefix (from the cache) replace
    that many leading zero frames.

    Args:
        in_channels, out_channels, kernel_size, stride: as ``nn.Conv3d``.
        padding: ``(pt, ph, pw)`` or an int; never passed to ``nn.Conv3d`` (its padding is 0).
        cached: the layer keeps its own frame cache slot (the standard rule of
            :meth:`CausalCache.push`); needs ``pt > 0``.

    Raises:
        ValueError: if ``cached`` and there is no temporal padding.
    """

    # "eager": cat + pad + nn.Conv3d (the official numerics). "triton": wanrt.kernels.causal_conv3d, an implicit
    # GEMM reading the prefix and x in place (output in channels_last_3d memory format). Set by the model owner.
    backend: str = "eager"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        *,
        cached: bool = False,
    ) -> None:
        super().__init__(in_channels, out_channels, _triple(kernel_size), stride=_triple(stride), padding=0)
        pt, ph, pw = _triple(padding)
        self.front_pad = 2 * pt
        self.spatial_pad = (pw, pw, ph, ph)
        if cached and self.front_pad == 0:
            raise ValueError("a cached CausalConv3d needs temporal padding")
        self.needs_cache_slot = cached
        self.cache_slot: int | None = None

    def causal_conv(self, x: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Pads causally (after prepending ``prefix``) and convolves.

        Args:
            x: ``[B, C_in, T, H, W]``.
            prefix: ``[B, C_in, n, H, W]`` with ``n <= 2*pt`` earlier frames, or ``None``.

        Returns:
            ``[B, C_out, T', H', W']`` in the weight dtype.
        """
        if self.backend == "triton":
            from wanrt.kernels.causal_conv3d import causal_conv3d  # lazy: Triton is optional

            pw, _, ph, _ = self.spatial_pad
            prefix = prefix.to(x) if prefix is not None and self.front_pad > 0 else None  # as eager below
            return causal_conv3d(x, prefix, self.weight, self.bias, front_pad=self.front_pad, spatial_pad=(ph, pw),
                                 stride=self.stride)
        front = self.front_pad
        parts = [x]
        if prefix is not None and front > 0:
            parts.insert(0, prefix.to(x))
            front -= prefix.shape[2]
        if front > 0:  # zero frames in front of the prefix (or of x)
            parts.insert(0, x.new_zeros((x.shape[0], x.shape[1], front, *x.shape[3:])))
        if len(parts) > 1:
            x = torch.cat(parts, dim=2)  # [B, C_in, front + n + T, H, W]: one copy
        pw, _, ph, _ = self.spatial_pad  # symmetric: zero-padded by the convolution itself, no padded copy
        return conv3d(x, self.weight, self.bias, self.stride, (0, ph, pw))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``[B, C_in, T, H, W] -> [B, C_out, T', H', W']``, reading and updating this layer's slot."""
        prefix = None
        if cache is not None and self.cache_slot is not None:
            prefix = cache.push(self.cache_slot, x)
        return self.causal_conv(x, prefix)


class RMSNorm(nn.Module):
    """Channel-first L2 "RMS" norm of the official VAE: ``F.normalize(x, dim=1) * sqrt(C) * gamma``.

    ``F.normalize`` divides by ``max(||x||_2, 1e-12)`` over channels; there is no mean and no eps
    inside a square root (docs/model-reference.md §4.2). The official ``bias`` is the constant 0, so
    there is no bias parameter. Low-precision inputs are normalized in float32.

    Args:
        dim: channels C.
        images: gamma is ``[C, 1, 1]`` for 4D ``[N, C, H, W]`` inputs, else ``[C, 1, 1, 1]`` for 5D.
    """

    def __init__(self, dim: int, *, images: bool) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, ...] -> [N, C, ...]``, same dtype.

        Computed as ``x * rsqrt(max(sum_c x², 1e-24)) * (sqrt(C) gamma)``: ``F.normalize``'s value to float32
        rounding, in two passes over ``x`` instead of four (its strided norm over channels, the division, and two
        scalings are the VAE decode's largest cost on the CPU after the convolutions)."""
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        inv = torch.rsqrt(xf.square().sum(1, keepdim=True).clamp_min(1e-24))  # 1 / max(||x||_2, 1e-12)
        return (xf * inv).to(x.dtype) * (self.gamma * self.scale).to(x.dtype)


class ResidualBlock(nn.Module):
    """``shortcut(x) + conv(drop(silu(norm(conv(silu(norm(x)))))))`` (official ``ResidualBlock``).

    Parameters sit at ``residual.{0,2,3,6}`` and ``shortcut`` (a 1x1x1 conv when channels change).
    Index 5 is the official ``Dropout`` (p = 0 in every released config; an identity here).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1, cached=True),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1, cached=True),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``[B, C_in, T, H, W] -> [B, C_out, T, H, W]``."""
        r = self.residual
        h = self.shortcut(x)
        x = r[2](r[1](r[0](x)), cache)
        x = r[6](r[5](r[4](r[3](x))), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Per-frame single-head spatial self-attention (official ``AttentionBlock``).

    For each frame: RMSNorm, 1x1 conv to q, k, v (C channels each), softmax(q k^T / sqrt(C)) v over
    the H*W positions (through :func:`wanrt.ops.attention`, one head of size C), 1x1 projection,
    plus the input. No temporal mixing, so no cache.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``[B, C, T, H, W] -> [B, C, T, H, W]``; ``cache`` is ignored."""
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [B*T, C, H, W]
        qkv = self.to_qkv(self.norm(y))  # [B*T, 3C, H, W]
        # contiguous() as in the official code: same q/k/v strides, so SDPA reduces in the same order.
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).transpose(2, 3).contiguous()  # [B*T, 1, H*W, 3C]
        q, k, v = qkv.chunk(3, dim=-1)  # each [B*T, 1, H*W, C]
        # wanrt.ops.attention takes [N, S, heads, head_dim]; scale 1/sqrt(C), one head.
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="sdpa")  # [B*T, H*W, 1, C]
        o = o.squeeze(2).transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, C, H, W]
        o = self.proj(o).view(b, t, c, h, w).permute(0, 2, 1, 3, 4)  # [B, C, T, H, W]
        return o + x


class _NearestUpsample2x(nn.Module):
    """2x spatial 'nearest-exact' upsampling computed in float32 (official ``Upsample``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W] -> [N, C, 2H, 2W]``, same dtype."""
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").to(x.dtype)


class ResampleMode(enum.Enum):
    """Kinds of :class:`Resample` (official ``Resample.mode``)."""

    UPSAMPLE2D = "upsample2d"
    UPSAMPLE3D = "upsample3d"
    DOWNSAMPLE2D = "downsample2d"
    DOWNSAMPLE3D = "downsample3d"


class Resample(nn.Module):
    """Spatial (and optionally temporal) 2x resampling (official ``Resample``).

    * upsample: nearest-exact 2x (float32) then ``Conv2d(C, C/2, 3, p=1)`` per frame
      (``resample.1``; ``Conv2d(C, C, ...)`` in Wan2.2, ``upsample_out_dim=C``). ``UPSAMPLE3D`` first doubles time with ``time_conv``:
      ``CausalConv3d(C, 2C, (3,1,1), pad (1,0,0))`` whose two channel halves become frames 2i, 2i+1.
    * downsample: ``ZeroPad2d((0,1,0,1))`` then ``Conv2d(C, C, 3, stride 2)`` per frame.
      ``DOWNSAMPLE3D`` then halves time with ``time_conv``: ``CausalConv3d(C, C, (3,1,1), stride (2,1,1))``
      over ``[last cached frame, x]``.

    The 3D modes own one cache slot with the official first-chunk rules: the first chunk skips
    ``time_conv`` (upsample: slot -> ``REPLICATE``, so latent frame 0 gives one frame; downsample:
    the chunk's last frame is stored); see :meth:`CausalCache.push`.
    """

    def __init__(self, dim: int, mode: ResampleMode, upsample_out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode in (ResampleMode.UPSAMPLE2D, ResampleMode.UPSAMPLE3D):
            out = dim // 2 if upsample_out_dim is None else upsample_out_dim  # Wan2.2 keeps dim
            self.resample = nn.Sequential(_NearestUpsample2x(), nn.Conv2d(dim, out, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode is ResampleMode.UPSAMPLE3D:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode is ResampleMode.DOWNSAMPLE3D:
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.needs_cache_slot = mode in (ResampleMode.UPSAMPLE3D, ResampleMode.DOWNSAMPLE3D)
        self.cache_slot: int | None = None
        self.backend = "eager"  # "triton": the per-frame 2D convs and the time_conv run as causal_conv3d

    def _conv2d_per_frame(self, x: torch.Tensor) -> torch.Tensor:
        """``resample`` on every frame of ``[B, C, T, H, W]`` -> ``[B, C', T, H', W']``."""
        b, c, t, h, w = x.shape
        if self.backend == "triton":  # the same conv as a (1, k, k) causal conv3d over the whole clip
            from wanrt.kernels.causal_conv3d import causal_conv3d

            pre, conv = self.resample[0], self.resample[1]
            if isinstance(pre, nn.ZeroPad2d):  # downsample: pad right/bottom by 1, then stride 2
                x, pad, stride = F.pad(x, (0, 1, 0, 1)), (0, 0), (1, 2, 2)
            else:  # upsample: nearest-exact 2x per frame, then 3x3 with padding 1
                x = pre(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
                x = x.view(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)
                pad, stride = (1, 1), (1, 1, 1)
            return causal_conv3d(x, None, conv.weight.unsqueeze(2), conv.bias, front_pad=0, spatial_pad=pad,
                                 stride=stride)
        y = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # [B*T, C', H', W']
        return y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)  # [B, C', T, H', W']

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``[B, C, T, H, W] -> [B, C', T', H', W']``.

        Raises:
            ValueError: for a 3D mode without a cache (the official code then silently skips
                ``time_conv``; wanrt always runs chunked).
        """
        if self.needs_cache_slot and cache is None:
            raise ValueError(f"{self.mode.value} needs a CausalCache")
        if self.mode is ResampleMode.UPSAMPLE3D:
            x = self._upsample_time(x, cache)
        x = self._conv2d_per_frame(x)  # [B, C', T, H', W']
        if self.mode is ResampleMode.DOWNSAMPLE3D:
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        slot = self.cache_slot
        if cache.state(slot) is SlotState.EMPTY:
            cache.mark_replicate(slot)  # first chunk: no time_conv, T frames stay T
            return x
        prefix = cache.push(slot, x)  # None after REPLICATE: plain zero padding
        y = self.time_conv.causal_conv(x, prefix)  # [B, 2C, T, H, W]
        b, c2, t, h, w = y.shape
        y = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5)  # [B, C, T, 2, H, W]
        return y.reshape(b, c2 // 2, 2 * t, h, w)  # frames 2i (half 0), 2i+1 (half 1)

    def _downsample_time(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        prev = cache.push(self.cache_slot, x, num_frames=1)
        if prev is None:  # first chunk: keep its last frame, skip time_conv
            return x
        if self.backend == "triton":  # reads the cached frame and the chunk in place, no concatenation
            from wanrt.kernels.causal_conv3d import causal_conv3d

            tc = self.time_conv
            return causal_conv3d(x, prev.to(x), tc.weight, tc.bias, front_pad=1, spatial_pad=(0, 0), stride=(2, 1, 1))
        return self.time_conv.causal_conv(torch.cat([prev.to(x), x], dim=2))  # [B, C, (T+1-3)//2+1, H, W]


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Pixel patchify of the Wan2.2 VAE: ``b c f (h q) (w r) -> b (c r q) f h w`` with ``q = r = p``.

    Output channel ``c * p² + r * p + q`` holds pixel ``(h * p + q, w * p + r)`` of input channel ``c``
    (the column offset ``r`` before the row offset ``q``, as in the official ``patchify``).

    Args:
        x: ``[B, C, F, H, W]``, ``H`` and ``W`` multiples of ``p``.
        p: patch size (1: ``x`` unchanged).

    Returns:
        ``[B, C p², F, H / p, W / p]``.
    """
    if p == 1:
        return x
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f, h // p, p, w // p, p)  # [B, C, F, h, q, w, r]
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, f, h // p, w // p)  # [B, (C r q), F, h, w]


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``b (c r q) f h w -> b c f (h q) (w r)``.

    Args:
        x: ``[B, C p², F, h, w]``.
        p: patch size (1: ``x`` unchanged).

    Returns:
        ``[B, C, F, h p, w p]``.
    """
    if p == 1:
        return x
    b, cpp, f, h, w = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, c, p, p, f, h, w)  # [B, C, r, q, F, h, w]
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c, f, h * p, w * p)  # [B, C, F, (h q), (w r)]


class AvgDown3D(nn.Module):
    """Parameter-free downsampling shortcut of a Wan2.2 encoder stage (official ``AvgDown3D``).

    Time is zero-padded in front to a multiple of ``factor_t``; every ``factor_t x factor_s x factor_s`` block of
    each input channel becomes ``factor = ft fs²`` channels (channel index ``c * factor + (i_t fs + i_h) fs + i_w``),
    and consecutive groups of ``g = C_in * factor / C_out`` of those are averaged into one output channel:

        ``y[o, t, h, w] = mean_{k < g} x'[o g + k, t, h, w]``.

    Chunk-local (no cache): on a 1-frame first chunk with ``factor_t = 2`` the average includes the padded zero
    frame, exactly as the official chunked encode.

    Args:
        in_channels, out_channels: ``C_in``, ``C_out`` (``C_in * factor`` divisible by ``C_out``).
        factor_t, factor_s: temporal and spatial factors (1 or 2).
    """

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if in_channels * factor % out_channels:
            raise ValueError(f"AvgDown3D: {in_channels} * {factor} channels do not split into {out_channels} groups")
        self.group_size = in_channels * factor // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, T, H, W] -> [B, C_out, ceil(T / ft), H / fs, W / fs]``."""
        ft, fs = self.factor_t, self.factor_s
        if ft == fs == 1 and self.group_size == 1:
            return x  # the last stage: a mean over one value
        pad = -x.shape[2] % ft
        if pad:
            x = F.pad(x, (0, 0, 0, 0, pad, 0))  # zero frames in front
        b, c, t, h, w = x.shape
        x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs)  # [B, C, T', ft, H', fs, W', fs]
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, C, ft, fs_h, fs_w, T', H', W']
        x = x.reshape(b, self.out_channels, self.group_size, t // ft, h // fs, w // fs)  # [B, C_out, g, T', H', W']
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free upsampling shortcut of a Wan2.2 decoder stage (official ``DupUp3D``); the inverse layout of
    :class:`AvgDown3D`: each input channel is repeated ``r = C_out * factor / C_in`` times (``repeat_interleave``),
    and the ``C_out * factor`` channels are unfolded into ``factor_t x factor_s x factor_s`` blocks:

        ``y[o, t ft + i_t, h fs + i_h, w fs + i_w] = x[(o factor + (i_t fs + i_h) fs + i_w) // r, t, h, w]``.

    On the first latent frame (``first_chunk``) the first ``factor_t - 1`` output frames are dropped, so one
    latent frame gives one frame there, as the main path (whose ``upsample3d`` skips its time_conv then).

    Args:
        in_channels, out_channels: ``C_in``, ``C_out`` (``C_out * factor`` divisible by ``C_in``).
        factor_t, factor_s: temporal and spatial factors.
    """

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels, self.factor_t, self.factor_s = out_channels, factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if out_channels * factor % in_channels:
            raise ValueError(f"DupUp3D: {out_channels} * {factor} channels are not a multiple of {in_channels}")
        self.repeats = out_channels * factor // in_channels

    def forward(self, x: torch.Tensor, first_chunk: bool = False) -> torch.Tensor:
        """``[B, C_in, T, H, W] -> [B, C_out, T ft (- (ft - 1) on the first chunk), H fs, W fs]``."""
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1)  # [B, C_out * factor, T, H, W]
        x = x.view(b, self.out_channels, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        if first_chunk:
            x = x[:, :, ft - 1:]
        return x


class DownResidualBlock(nn.Module):
    """One Wan2.2 encoder stage (official ``Down_ResidualBlock``): ``downsamples(x) + avg_shortcut(x)``.

    ``downsamples`` holds ``num_res_blocks`` :class:`ResidualBlock` and, except in the last stage, a downsampling
    :class:`Resample` (``downsample3d`` where the stage halves time); ``avg_shortcut`` is an :class:`AvgDown3D`
    with the same factors (1, 1 in the last stage).
    """

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal and down else 1, 2 if down else 1)
        blocks: list[nn.Module] = []
        for _ in range(num_res_blocks):
            blocks.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if down:
            blocks.append(Resample(out_dim, ResampleMode.DOWNSAMPLE3D if temporal else ResampleMode.DOWNSAMPLE2D))
        self.downsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """``[B, C_in, T, H, W] -> [B, C_out, T', H', W']``."""
        shortcut = self.avg_shortcut(x)
        for block in self.downsamples:
            x = block(x, cache)
        return x + shortcut


class UpResidualBlock(nn.Module):
    """One Wan2.2 decoder stage (official ``Up_ResidualBlock``): ``upsamples(x) + avg_shortcut(x, first_chunk)``.

    ``upsamples`` holds ``num_res_blocks + 1`` :class:`ResidualBlock` and, except in the last stage, an upsampling
    :class:`Resample` keeping ``out_dim`` channels; ``avg_shortcut`` is then a :class:`DupUp3D` (factor_t 2 where
    the stage doubles time, factor_s 2). The last stage has no shortcut (``avg_shortcut`` is None).
    """

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        blocks: list[nn.Module] = []
        for _ in range(num_res_blocks + 1):
            blocks.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if up:
            mode = ResampleMode.UPSAMPLE3D if temporal else ResampleMode.UPSAMPLE2D
            blocks.append(Resample(out_dim, mode, upsample_out_dim=out_dim))
        self.upsamples = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, cache: CausalCache, first_chunk: bool = False) -> torch.Tensor:
        """``[B, C_in, T, H, W] -> [B, C_out, T', 2H, 2W]`` (``T' = 2T``, or ``2T - 1`` on the first chunk, where
        the stage doubles time)."""
        y = x
        for block in self.upsamples:
            y = block(y, cache)
        if self.avg_shortcut is None:
            return y
        return y + self.avg_shortcut(x, first_chunk)  # after the main path: the shortcut is 4-8x the input


# --------------------------------------------------------------------------------------------------
# Encoder / decoder
# --------------------------------------------------------------------------------------------------


class Encoder3d(nn.Module):
    """Official ``Encoder3d``: conv1, flat ``downsamples``, ``middle`` (Res, Attn, Res), ``head``.

    Output channels are ``2 * z_dim`` (mu and log-variance). Cache slots are numbered at build time.
    Wan2.2 (``is_residual``): ``conv1`` takes the ``3 p²`` patchified channels and ``downsamples`` holds one
    :class:`DownResidualBlock` per stage.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(config.io_channels, dims[0], 3, padding=1, cached=True)
        blocks: list[nn.Module] = []
        scale = 1.0
        last = len(config.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if config.is_residual:  # Wan2.2: one DownResidualBlock per stage
                temporal = i != last and config.temporal_downsample[i]
                blocks.append(DownResidualBlock(in_dim, out_dim, config.num_res_blocks, temporal, down=i != last))
                continue
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != last:
                temporal = config.temporal_downsample[i]
                blocks.append(Resample(out_dim, ResampleMode.DOWNSAMPLE3D if temporal else ResampleMode.DOWNSAMPLE2D))
                scale /= 2.0
        self.downsamples = nn.ModuleList(blocks)
        c = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c)])
        self.head = nn.ModuleList(
            [RMSNorm(c, images=False), nn.SiLU(), CausalConv3d(c, 2 * config.z_dim, 3, padding=1, cached=True)]
        )
        self.num_cache_slots = assign_cache_slots(self)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """One (patchified) chunk ``[B, 3 p², T, H, W]`` -> ``[B, 2*z_dim, T', H p/s, W p/s]`` (T'=1 for T in {1, 4})."""
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        for block in self.middle:
            x = block(x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


class Decoder3d(nn.Module):
    """Official ``Decoder3d``: conv1, ``middle`` (Res, Attn, Res), flat ``upsamples``, ``head``.

    Wan2.2 (``is_residual``): width ``decoder_base_dim``, one :class:`UpResidualBlock` per stage in
    ``upsamples`` (no channel halving between stages), and a head to ``3 p²`` channels.

    Each stage has ``num_res_blocks + 1`` residual blocks, then (except the last) a Resample that
    halves the channels, so stages after the first start from ``dims[i] // 2`` channels.
    ``attn_scales`` are matched as in the official code, whose decoder scale starts at
    ``1 / 2**(len(dim_mult) - 2)`` for the bottom stage and doubles per stage (so the same scale
    value marks different resolutions in the encoder and the decoder).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.dec_dim * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1, cached=True)
        c = dims[0]
        self.middle = nn.ModuleList([ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c)])
        blocks: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(config.dim_mult) - 2)
        last = len(config.dim_mult) - 1
        self.is_residual = config.is_residual
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if config.is_residual:  # Wan2.2: one UpResidualBlock per stage, channels not halved
                temporal = i != last and config.temporal_upsample[i]
                blocks.append(UpResidualBlock(in_dim, out_dim, config.num_res_blocks, temporal, up=i != last))
                continue
            if i > 0:
                in_dim //= 2  # the previous stage's Resample halved the channels
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != last:
                temporal = config.temporal_upsample[i]
                blocks.append(Resample(out_dim, ResampleMode.UPSAMPLE3D if temporal else ResampleMode.UPSAMPLE2D))
                scale *= 2.0
        self.upsamples = nn.ModuleList(blocks)
        c = dims[-1]
        self.head = nn.ModuleList(
            [RMSNorm(c, images=False), nn.SiLU(), CausalConv3d(c, config.io_channels, 3, padding=1, cached=True)]
        )
        self.num_cache_slots = assign_cache_slots(self)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """One latent frame ``[B, z_dim, 1, h, w]`` -> ``[B, 3 p², 1 or 4, h s/p, w s/p]`` (unclamped, patchified).

        The first latent frame is the one that meets a fresh ``cache`` (official ``first_chunk=True``)."""
        first_chunk = self.is_residual and cache.is_fresh
        x = self.conv1(x, cache)
        for block in self.middle:
            x = block(x, cache)
        for block in self.upsamples:
            x = block(x, cache, first_chunk) if self.is_residual else block(x, cache)
        return self.head[2](self.head[1](self.head[0](x)), cache)


# --------------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """The Wan2.1 / Wan2.2 VAE; ``state_dict()`` keys are exactly those of the official ``Wan2.1_VAE.pth``
    (``Wan2.2_VAE.pth`` for :meth:`VAEConfig.wan22`).

    Below, ``s = config.spatial_factor`` (8 for Wan2.1, 16 for Wan2.2) and ``z_dim`` is 16 or 48. Wan2.2 patchifies
    the video 2x2 (:func:`patchify`) before the encoder and unpatchifies the decoder's output per chunk.

    Build on the meta device and load with ``load_state_dict(sd, assign=True)``. The module has no
    buffers: the latent mean/std are config values, turned into tensors on first use per device.
    Computation runs in the weights' dtype (float32 for the official numerics).

    Args:
        config: the architecture (default: Wan2.1).
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def keep_fp32(name: str) -> bool:
        """Parameters kept float32 when the rest is loaded in bf16/fp16: none.

        The VAE is normally loaded and run entirely in float32 (the official code does). With
        low-precision weights every layer runs in that dtype; norms still normalize in float32.
        """
        return False

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the weights' dtype)."""
        return self.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    def set_backend(self, backend) -> None:
        """Run every causal conv as the plan says: ``backend`` is an :class:`~wanrt.ops.OpsPlan` (its ``vae``)
        or that value, resolved and checked by :func:`wanrt.ops.backends.plan`. ``"eager"``: ``torch`` conv3d,
        the reference; ``"triton"``: wanrt's implicit-GEMM causal conv3d reading the cache prefix in place
        (CUDA, or the CPU interpreter); ``"tensorrt"``: the Engine decodes with a TensorRT engine of the
        decoder step, and this module (the encoder, and any decode outside that engine) runs eager.

        Raises:
            ValueError: another name.
        """
        backend = getattr(backend, "vae", backend)  # an OpsPlan
        if backend not in ("eager", "triton", "tensorrt"):
            raise ValueError(f"VAE backend must be 'eager', 'triton' or 'tensorrt', got {backend!r}")
        conv = "triton" if backend == "triton" else "eager"
        for m in self.modules():
            if isinstance(m, (CausalConv3d, Resample)):
                m.backend = conv

    def new_encoder_cache(self) -> CausalCache:
        """An empty cache for one :meth:`encode_chunk` sequence (24 slots for Wan2.1 and Wan2.2)."""
        return CausalCache.for_module(self.encoder)

    def new_decoder_cache(self) -> CausalCache:
        """An empty cache for one :meth:`decode_chunk` sequence (32 slots for Wan2.1 and Wan2.2)."""
        return CausalCache.for_module(self.decoder)

    # ---- latent normalization -----------------------------------------------------------------

    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, 1/std)`` as float32 ``[1, z_dim, 1, 1, 1]`` on ``device`` (cached)."""
        stats = self._stats.get(device)
        if stats is None:
            shape = (1, self.config.z_dim, 1, 1, 1)
            mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(shape)
            inv_std = 1.0 / torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(shape)
            stats = self._stats[device] = (mean, inv_std)
        return stats

    def normalize_latents(self, mu: torch.Tensor) -> torch.Tensor:
        """``(mu - mean) * (1 / std)`` in float32 (official ``scale = [mean, 1/std]``)."""
        mean, inv_std = self._latent_stats(mu.device)
        return (mu.float() - mean) * inv_std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """``z / (1 / std) + mean`` in float32 (official ``decode(z, scale)``)."""
        mean, inv_std = self._latent_stats(z.device)
        return z.float() / inv_std + mean

    # ---- encode -------------------------------------------------------------------------------

    def _check_video(self, video: torch.Tensor, *, frames_rule: bool = True) -> None:
        if not isinstance(video, torch.Tensor) or video.ndim != 5:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be a 5D tensor [B, 3, F, H, W], got {shape}")
        b, c, f, h, w = video.shape
        s, tf = self.config.spatial_factor, self.config.temporal_factor
        if c != 3:
            raise ValueError(f"video must have 3 channels (RGB) at dim 1, got shape {tuple(video.shape)}")
        if frames_rule and (f < 1 or (f - 1) % tf != 0):
            raise ValueError(f"video frame count must be 1 + {tf}k (e.g. 1, {1 + tf}, 81), got F={f}")
        if h < s or w < s or h % s or w % s:
            raise ValueError(f"video height and width must be positive multiples of {s}, got {h}x{w}")

    def _mu(self, feats: torch.Tensor) -> torch.Tensor:
        """Encoder features ``[B, 2z, T, h, w]`` -> normalized mu ``[B, z, T, h, w]`` float32."""
        mu = self.conv1(feats)[:, : self.config.z_dim]  # official: conv1(out).chunk(2, dim=1)[0]
        return self.normalize_latents(mu)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encodes a video to normalized latents (the posterior mean; no sampling).

        Runs the encoder on frame 0, then on chunks of ``temporal_factor`` (4) frames, through one
        :class:`CausalCache` (official ``WanVAE_.encode``), then ``conv1`` on the concatenation.

        Args:
            video: ``[B, 3, F, H, W]`` in [-1, 1], any float dtype (cast to the weights' dtype),
                ``F = 1 + 4k``, ``H`` and ``W`` multiples of ``s``.

        Returns:
            ``[B, z_dim, 1 + (F - 1) // 4, H // s, W // s]`` float32, ``(mu - mean) / std``.

        Raises:
            ValueError: wrong ndim, channel count, frame count or spatial size.
        """
        self._check_video(video)
        x = patchify(video.to(device=self.device, dtype=self.dtype), self.config.patch_size)  # [B, 3p², F, H/p, W/p]
        tf = self.config.temporal_factor
        cache = self.new_encoder_cache()
        feats = [self.encoder(x[:, :, :1], cache)]  # frame 0 alone
        for start in range(1, x.shape[2], tf):
            feats.append(self.encoder(x[:, :, start : start + tf], cache))  # [B, 2z, 1, h, w]
        return self._mu(torch.cat(feats, dim=2))  # [B, z, T, h, w]

    @torch.no_grad()
    def encode_chunk(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """Encodes one chunk of a video, for streaming; ``cache`` carries the state between chunks.

        Successive calls on frame 0, then frames 1..4, 5..8, ... give the latents of :meth:`encode`
        (up to the GEMM order of the pointwise ``conv1``). Later chunks may also hold any multiple
        of 4 frames (the computation is then identical to several 4-frame chunks).

        Args:
            x: ``[B, 3, T, H, W]``; ``T = 1`` when ``cache.is_fresh``, else a multiple of 4.
            cache: from :meth:`new_encoder_cache`; updated in place.

        Returns:
            ``[B, z_dim, 1 (first chunk) or T / 4, H // s, W // s]`` float32 normalized latents.

        Raises:
            ValueError: bad shape or chunk length, or a cache of the wrong size.
        """
        self._check_video(x, frames_rule=False)
        if len(cache) != self.encoder.num_cache_slots:
            raise ValueError(f"cache has {len(cache)} slots, the encoder needs {self.encoder.num_cache_slots}")
        t, tf = x.shape[2], self.config.temporal_factor
        if t < 1:
            raise ValueError(f"a chunk needs at least 1 frame, got shape {tuple(x.shape)}")
        if cache.is_fresh and t != 1:
            raise ValueError(f"the first chunk must be exactly 1 frame, got {t}")
        if not cache.is_fresh and t % tf:
            raise ValueError(f"chunks after the first must hold a multiple of {tf} frames, got {t}")
        x = patchify(x.to(device=self.device, dtype=self.dtype), self.config.patch_size)  # [B, 3p², T, H/p, W/p]
        return self._mu(self.encoder(x, cache))

    # ---- decode -------------------------------------------------------------------------------

    def _check_latents(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.ndim != 5:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"latents must be a 5D tensor [B, {self.config.z_dim}, T, h, w], got {shape}")
        if z.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must have z_dim={self.config.z_dim} channels at dim 1, got {tuple(z.shape)}")
        if min(z.shape[2:]) < 1:
            raise ValueError(f"latents must have T, h, w >= 1, got {tuple(z.shape)}")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decodes normalized latents to a video, one latent frame at a time (official ``decode``).

        ``z = latents * std + mean`` (as ``latents / (1/std) + mean``), ``conv2`` over all frames,
        then the decoder per latent frame through one :class:`CausalCache`; clamped to [-1, 1].

        Args:
            latents: ``[B, z_dim, T, h, w]``, normalized, any float dtype.

        Returns:
            ``[B, 3, 1 + 4 (T - 1), s h, s w]`` float32 in [-1, 1].

        Raises:
            ValueError: wrong ndim or channel count.
        """
        self._check_latents(latents)
        z = self.denormalize_latents(latents.to(self.device)).to(self.dtype)
        x = self.conv2(z)  # [B, z, T, h, w]
        cache = self.new_decoder_cache()
        frames = [self.decoder(x[:, :, i : i + 1], cache) for i in range(x.shape[2])]
        video = unpatchify(torch.cat(frames, dim=2), self.config.patch_size)  # [B, 3, 1 + 4(T-1), H, W]
        return video.float().clamp_(-1.0, 1.0)

    @torch.no_grad()
    def decode_stream(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Decodes like :meth:`decode`, yielding the frames of each latent frame as soon as they exist.

        The first chunk is 1 frame, every later one 4. Memory holds one latent frame's activations and the
        causal cache, whatever the video length; the concatenation of the chunks equals :meth:`decode`.

        Args:
            latents: ``[B, z_dim, T, h, w]``, normalized.

        Yields:
            ``[B, 3, 1 or 4, s h, s w]`` float32 chunks in [-1, 1].

        Raises:
            ValueError: as :meth:`decode` (checked before the first chunk).
        """
        self._check_latents(latents)
        cache = self.new_decoder_cache()
        for i in range(latents.shape[2]):
            z = self.denormalize_latents(latents[:, :, i : i + 1].to(self.device)).to(self.dtype)
            yield unpatchify(self.decoder(self.conv2(z), cache), self.config.patch_size).float().clamp_(-1.0, 1.0)

    @torch.no_grad()
    def decode_chunk(self, latent_frame: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """Decodes one latent frame, for streaming; ``cache`` carries the state between frames.

        Args:
            latent_frame: ``[B, z_dim, 1, h, w]`` normalized latents.
            cache: from :meth:`new_decoder_cache`; updated in place.

        Returns:
            ``[B, 3, 1 (first frame) or 4, s h, s w]`` float32 in [-1, 1].

        Raises:
            ValueError: bad shape (more than one frame), or a cache of the wrong size.
        """
        self._check_latents(latent_frame)
        if latent_frame.shape[2] != 1:
            raise ValueError(f"decode_chunk takes exactly 1 latent frame, got {latent_frame.shape[2]}")
        if len(cache) != self.decoder.num_cache_slots:
            raise ValueError(f"cache has {len(cache)} slots, the decoder needs {self.decoder.num_cache_slots}")
        z = self.denormalize_latents(latent_frame.to(self.device)).to(self.dtype)
        return unpatchify(self.decoder(self.conv2(z), cache), self.config.patch_size).float().clamp_(-1.0, 1.0)
