"""CLIP ViT-H/14 visual tower of Wan2.1 I2V/FLF2V, its preprocessing and the image-encoder wrapper.

Reproduces ``wan/modules/clip.py`` of the official Wan2.1 code: ``VisionTransformer`` of
``clip_xlm_roberta_vit_h_14`` called as ``visual(x, use_31_block=True)``, and the preprocessing of
``CLIPModel.visual`` (docs/model-reference.md §5.4, §7.8). Only the visual tower is used by Wan, and only
the output of its first 31 of 32 blocks (no ``post_norm``, no ``head``), so the last block is never
built. Parameter names are the official checkpoint keys of
``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` without their ``visual.`` prefix;
``wanrt/checkpoints/keymap_clip.py`` maps the official and the transformers ``CLIPVisionModel`` keys
(diffusers' ``image_encoder/``) onto them.

Math (ViT-H/14: 224 px, patch 14, dim 1280, 16 heads of 80, mlp 5120, 32 blocks)::

    x = flatten(patch_embedding(pixels)) ᵀ            [B, 256, dim]  (Conv2d stride 14, no bias)
    x = pre_norm(cat([cls_embedding, x]) + pos_embedding)   [B, 257, dim]
    for block in transformer[:31]:                        (pre-norm)
        x = x + proj(softmax(q kᵀ / sqrt(80)) v)          q, k, v = to_qkv(norm1(x)) split in 3
        x = x + mlp.2(gelu_erf(mlp.0(norm2(x))))
    out = x                                               [B, 257, dim]

    LayerNorm(x) = F.layer_norm(x.float(), eps=1e-5).type_as(x)      (fp32, cast back)

The official encoder runs in fp16 (fp16 weights under fp16 autocast): every GEMM, the attention, the
GELU and the residual stream in fp16, the LayerNorms in fp32. Loading the weights in fp16 (the
default of :func:`wanrt.checkpoints.loaders.load_image_encoder`) reproduces that without autocast.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The official CLIP LayerNorm is WanLayerNorm's: ``super().forward(x.float()).type_as(x)``.
from .dit import LayerNorm

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPVisionConfig",
    "CLIPVisionTower",
    "ImageEncoder",
    "preprocess",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of the OpenAI/open-clip normalization (official ``_clip`` transforms)."""
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel std of the OpenAI/open-clip normalization."""

_BLOCK = re.compile(r"transformer\.(\d+)\.")
_KEEP_FP32 = re.compile(r"(^|\.)(pre_norm|norm1|norm2)\.(weight|bias)$")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Shape of a CLIP ViT visual tower; the defaults are ViT-H/14 as used by Wan2.1 (docs/model-reference.md §5.4).

    Attributes:
        image_size: Input side in pixels (square input; 224).
        patch_size: Side of the square, non-overlapping patches (14), so ``(224 / 14)² = 256`` patches.
        dim: Width of the tokens (1280).
        mlp_dim: Hidden width of the MLP (5120 = 4·dim).
        num_heads: Attention heads (16, head_dim 80).
        num_layers: Blocks of the checkpoint (32). Wan uses the output of the first ``num_layers - 1``
            (:attr:`used_layers`); the last block is never built.
        eps: LayerNorm epsilon (1e-5).

    Raises:
        ValueError: in ``__post_init__`` for non-positive sizes, ``image_size`` not a multiple of
            ``patch_size``, ``dim`` not divisible by ``num_heads``, fewer than 2 layers (nothing would be
            used) or ``eps <= 0``.
    """

    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_dim: int = 5120
    num_heads: int = 16
    num_layers: int = 32
    eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "dim", "mlp_dim", "num_heads", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CLIPVisionConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.num_layers < 2:
            raise ValueError(
                f"num_layers must be >= 2 (Wan uses the output of the penultimate block), got {self.num_layers}"
            )
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"eps must be > 0, got {self.eps!r}")

    @property
    def num_patches(self) -> int:
        """Patches per image, ``(image_size // patch_size)²`` (256)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens per image: the patches and the CLS token first (257)."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        """Per-head width, ``dim // num_heads`` (80)."""
        return self.dim // self.num_heads

    @property
    def used_layers(self) -> int:
        """Blocks that are built and run: ``num_layers - 1`` (official ``use_31_block=True``)."""
        return self.num_layers - 1

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | Any) -> CLIPVisionConfig:
        """Build from a transformers ``CLIPVisionConfig`` (object or ``config.json`` dict).

        A full ``CLIPConfig`` (``model_type "clip"``) is accepted too: its ``vision_config`` is used.

        Args:
            config: Mapping with ``hidden_size, intermediate_size, num_attention_heads,
                num_hidden_layers, patch_size, image_size`` and optionally ``layer_norm_eps`` (default
                1e-5), ``hidden_act`` (default ``"gelu"``), ``num_channels`` (default 3); or an object
                with ``to_dict()``.

        Raises:
            KeyError: a required field is missing.
            ValueError: another ``model_type``, ``hidden_act`` other than exact ``"gelu"`` (e.g.
                OpenAI's ``quick_gelu``: not the Wan tower), ``num_channels != 3``, or invalid sizes.
        """
        if not isinstance(config, Mapping):
            config = config.to_dict()
        model_type = config.get("model_type", "clip_vision_model")
        if model_type == "clip" and "vision_config" in config:
            return cls.from_hf_config(config["vision_config"])
        if model_type != "clip_vision_model":
            raise ValueError(f"expected a CLIP vision config (model_type 'clip_vision_model'), got {model_type!r}")
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"only hidden_act='gelu' (exact GELU, as Wan's ViT-H/14) is supported, got {act!r}")
        channels = config.get("num_channels", 3)
        if channels != 3:
            raise ValueError(f"num_channels must be 3 (RGB), got {channels!r}")
        return cls(
            image_size=int(config["image_size"]),
            patch_size=int(config["patch_size"]),
            dim=int(config["hidden_size"]),
            mlp_dim=int(config["intermediate_size"]),
            num_heads=int(config["num_attention_heads"]),
            num_layers=int(config["num_hidden_layers"]),
            eps=float(config.get("layer_norm_eps", 1e-5)),
        )

    def to_hf_config(self, projection_dim: int = 1024) -> dict[str, Any]:
        """The transformers ``CLIPVisionConfig`` kwargs (a ``config.json`` dict) of the same tower.

        Args:
            projection_dim: Width of the CLIP projection (1024 for ViT-H/14); not used by the tower,
                stored for completeness.
        """
        return {
            "model_type": "clip_vision_model",
            "hidden_size": self.dim,
            "intermediate_size": self.mlp_dim,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_channels": 3,
            "hidden_act": "gelu",
            "layer_norm_eps": self.eps,
            "projection_dim": projection_dim,
            "attention_dropout": 0.0,
        }

    @classmethod
    def from_official_shapes(cls, shapes: Mapping[str, Any], num_heads: int | None = None) -> CLIPVisionConfig:
        """Infer the config from the shapes of an official visual state dict (the .pth carries no config).

        ``dim, patch_size`` come from ``patch_embedding.weight`` ``[dim, 3, p, p]``, the token count
        from ``pos_embedding`` ``[1, 1 + g², dim]`` (``image_size = g·p``), ``mlp_dim`` from
        ``transformer.0.mlp.0.weight``, ``num_layers`` from the ``transformer.N.`` indices (give the
        shapes of the FULL official tower, last block included). The head count is not stored: default
        ``dim // 80`` when ``dim % 80 == 0`` (ViT-H/14: 1280 -> 16 heads of 80), else ``dim // 64``.
        ``eps`` is not stored either: 1e-5.

        Args:
            shapes: key (``visual.`` prefix stripped) -> shape (a tuple, ``torch.Size``, or anything with
                ``.shape`` such as a tensor). Other keys are ignored.
            num_heads: Override of the head count.

        Raises:
            KeyError: a key needed above is missing.
            ValueError: no ``transformer.N.`` keys, non-contiguous block indices, a patch embedding that
                is not ``[dim, 3, p, p]``, a non-square patch grid, or an invalid resulting config.
        """

        def shape(key: str) -> tuple[int, ...]:
            value = shapes[key]
            return tuple(int(s) for s in getattr(value, "shape", value))

        indices = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
        if not indices:
            raise ValueError("no 'transformer.N.' keys: not an official CLIP visual state dict")
        if indices != set(range(len(indices))):
            raise ValueError(f"block indices are not 0..N-1: {sorted(indices)}")
        patch = shape("patch_embedding.weight")
        if len(patch) != 4 or patch[1] != 3 or patch[2] != patch[3]:
            raise ValueError(f"patch_embedding.weight must be [dim, 3, p, p], got {list(patch)}")
        dim, p = patch[0], patch[2]
        tokens = shape("pos_embedding")[-2]
        grid = math.isqrt(tokens - 1)
        if grid * grid != tokens - 1:
            raise ValueError(f"pos_embedding holds {tokens} tokens: not 1 + a square number of patches")
        if num_heads is None:
            num_heads = dim // 80 if dim % 80 == 0 else max(1, dim // 64)
        return cls(
            image_size=grid * p,
            patch_size=p,
            dim=dim,
            mlp_dim=shape("transformer.0.mlp.0.weight")[0],
            num_heads=num_heads,
            num_layers=len(indices),
        )


# --------------------------------------------------------------------------------------------------
# Modules (attribute names = official checkpoint keys without "visual.")
# --------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused ``to_qkv`` GEMM and no mask (official ``SelfAttention``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, dim]`` -> ``[B, S, dim]``; scale ``1/sqrt(head_dim)``, computed in x's dtype."""
        b, s, c = x.shape
        n, d = self.num_heads, self.head_dim
        qkv = self.to_qkv(x).view(b, s, 3, n, d).permute(2, 0, 3, 1, 4)  # [3, B, n, S, d]
        q, k, v = qkv.unbind(0)  # each [B, n, S, d]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, n, S, d]
        return self.proj(out.transpose(1, 2).reshape(b, s, c))  # [B, S, dim]


class AttentionBlock(nn.Module):
    """Pre-norm ViT block (official ``AttentionBlock`` with ``post_norm=False``, ``activation='gelu'``)::

    x = x + attn(norm1(x));  x = x + mlp(norm2(x)),  mlp = Linear -> exact GELU -> Linear
    """

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps)
        # indices 0 and 2 are the official keys mlp.0 / mlp.2 (mlp.3 is an inactive Dropout there)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Linear(cfg.mlp_dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, dim]`` -> ``[B, S, dim]`` in x's dtype."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionTower(nn.Module):
    """The visual tower of Wan2.1's CLIP up to its penultimate block (official
    ``VisionTransformer.forward(x, use_31_block=True)``).

    ``state_dict()`` keys are the official ones without ``visual.``: ``patch_embedding.weight``
    ``[dim, 3, p, p]``, ``cls_embedding`` ``[1, 1, dim]``, ``pos_embedding`` ``[1, num_tokens, dim]``,
    ``pre_norm.{weight,bias}``, ``transformer.N.{norm1, attn.to_qkv, attn.proj, norm2, mlp.0,
    mlp.2}.{weight,bias}`` for ``N < used_layers``. The last block, ``post_norm`` and ``head`` are not
    built: they never influence the output. No buffers. Constructible under ``torch.device("meta")``
    and loadable with ``load_state_dict(sd, assign=True)``. Runs in the weights' dtype (LayerNorms in
    float32); dropout is omitted (eval only).

    Args:
        cfg: Shapes; default ViT-H/14 (31 blocks built, 0.611 B parameters, 1.22 GB in fp16).
    """

    def __init__(self, cfg: CLIPVisionConfig | None = None) -> None:
        super().__init__()
        cfg = CLIPVisionConfig() if cfg is None else cfg
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embedding = nn.Conv2d(3, cfg.dim, kernel_size=p, stride=p, bias=False)
        scale = 1.0 / math.sqrt(cfg.dim)
        self.cls_embedding = nn.Parameter(scale * torch.randn(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(scale * torch.randn(1, cfg.num_tokens, cfg.dim))
        self.pre_norm = LayerNorm(cfg.dim, eps=cfg.eps)
        self.transformer = nn.Sequential(*(AttentionBlock(cfg) for _ in range(cfg.used_layers)))

    @staticmethod
    def keep_fp32(name: str) -> bool:
        """True for the LayerNorm parameters (``pre_norm``, ``norm1``, ``norm2``): they stay float32 when
        the rest is loaded in fp16/bf16.

        The official LayerNorms compute in float32 under autocast, which upcasts their fp16 weights;
        float32 copies of the (fp16) checkpoint values give the same numbers without a cast per call.

        Args:
            name: A key of this module's state dict, e.g. ``'transformer.3.norm1.weight'``.
        """
        return _KEEP_FP32.search(name) is not None

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the patch embedding's dtype)."""
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode normalized images.

        Args:
            pixels: ``[B, 3, image_size, image_size]``, already resized and normalized (see
                :func:`preprocess`), any float dtype; cast to the weights' dtype first.

        Returns:
            ``[B, num_tokens, dim]`` (CLS token first) in the weights' dtype: the output of block
            ``used_layers - 1``, without ``post_norm``.

        Raises:
            ValueError: ``pixels`` is not ``[B, 3, image_size, image_size]``.
        """
        size = self.cfg.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [B, 3, {size}, {size}], got shape {tuple(pixels.shape)}")
        b = pixels.shape[0]
        x = self.patch_embedding(pixels.to(self.dtype))  # [B, dim, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g², dim]
        x = torch.cat([self.cls_embedding.expand(b, -1, -1).to(x.dtype), x], dim=1)  # [B, num_tokens, dim]
        x = self.pre_norm(x + self.pos_embedding.to(x.dtype))
        return self.transformer(x)


# --------------------------------------------------------------------------------------------------
# Preprocessing and the wrapper
# --------------------------------------------------------------------------------------------------
def preprocess(
    images: torch.Tensor | Sequence[torch.Tensor], size: int = 224, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Official CLIP preprocessing of ``CLIPModel.visual``: squash-resize, then normalize.

    Per image: ``F.interpolate(img[None], size=(size, size), mode='bicubic', align_corners=False)``
    (the whole image to a square, whatever its aspect ratio: no crop, no antialias, no clamp), then
    ``(x·0.5 + 0.5 - CLIP_MEAN) / CLIP_STD`` per channel, all in float32.

    This differs from diffusers' Wan I2V pipeline, whose ``CLIPImageProcessor`` resizes the shortest
    side to 224 and center-crops 224×224 (with PIL's antialiased bicubic): on a non-square image the
    official encoder sees the whole, squashed image while diffusers' sees its center only.

    Args:
        images: A sequence of ``[3, H_i, W_i]`` float tensors in [-1, 1] (sizes may differ), a
            ``[B, 3, H, W]`` float tensor, or a single ``[3, H, W]`` image.
        size: Output side (the tower's ``image_size``).
        device: Where to compute (default: the images' device).

    Returns:
        ``[B, 3, size, size]`` float32.

    Raises:
        TypeError: not a tensor or a sequence of tensors, or a non-floating dtype.
        ValueError: an empty sequence, a wrong rank, a channel count other than 3, an empty image, or
            ``size < 1``.
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = [images]
        elif images.ndim == 4:
            if not images.is_floating_point():
                raise TypeError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")
            if images.shape[1] != 3 or 0 in images.shape:
                raise ValueError(f"images must be a non-empty [B, 3, H, W] batch, got shape {tuple(images.shape)}")
            batch = images.to(device=device, dtype=torch.float32)
            return _normalize(F.interpolate(batch, size=(size, size), mode="bicubic", align_corners=False))
        else:
            raise ValueError(f"images must be [B, 3, H, W] or [3, H, W], got shape {tuple(images.shape)}")
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a tensor or a sequence of [3, H, W] tensors, got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images must be a non-empty sequence of [3, H, W] tensors")
    out = []
    for i, img in enumerate(images):
        _check_image(img, f"images[{i}]")
        x = img.to(device=device, dtype=torch.float32)[None]  # [1, 3, H, W]
        out.append(F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False))
    return _normalize(torch.cat(out))


def _check_image(img: Any, name: str) -> None:
    """TypeError/ValueError unless ``img`` is a floating ``[3, H, W]`` tensor with H, W >= 1."""
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(img).__name__}")
    if not img.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in [-1, 1], got dtype {img.dtype}")
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"{name} must be [3, H, W] (RGB in [-1, 1]), got shape {tuple(img.shape)}")
    if img.shape[1] == 0 or img.shape[2] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(img.shape)}")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [-1, 1] -> ``(x·0.5 + 0.5 - mean) / std`` (official ``mul_(0.5).add_(0.5)``
    then torchvision ``Normalize``), float32."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return x.mul(0.5).add(0.5).sub(mean).div(std)


class ImageEncoder:
    """Preprocessing + :class:`CLIPVisionTower`: images in, CLIP tokens for the DiT's ``clip_fea`` out.

    Reproduces the official ``CLIPModel.visual(videos)`` of Wan2.1 (I2V: one image -> ``[1, 257,
    1280]``; FLF2V: first and last frame -> ``[2, 257, 1280]``).

    Args:
        model: The tower; runs on its own device and dtype.
        config: Its config (default ``model.cfg``).
    """

    def __init__(self, model: CLIPVisionTower, config: CLIPVisionConfig | None = None) -> None:
        self.model = model
        self.config = model.cfg if config is None else config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Encode images.

        Args:
            images: As for :func:`preprocess`: ``[3, H_i, W_i]`` float tensors in [-1, 1] (any sizes,
                any device), a ``[N, 3, H, W]`` tensor, or one ``[3, H, W]`` image. They are moved to
                the model's device and preprocessed there in float32.

        Returns:
            ``[N, num_tokens, dim]`` (257 × 1280 for ViT-H/14) in the model's dtype, on its device.

        Raises:
            TypeError, ValueError: bad images (see :func:`preprocess`).
        """
        pixels = preprocess(images, self.config.image_size, device=self.device)  # [N, 3, S, S] fp32
        return self.model(pixels.to(self.dtype))

    __call__ = encode
