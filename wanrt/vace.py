"""VACE inputs: the source video, its mask and the reference images, brought to the output size and encoded into
the DiT's hint-stream input (official ``wan/vace.py`` and ``wan/utils/vace_processor.py``; diffusers
``WanVACEPipeline``).

What a VACE generation conditions on (all optional; with none it is text-to-video):

* ``video``: a source or control video (an MP4 path, a ``[F, H, W, 3]`` uint8 array, or a list of images), resized
  to cover the output size and centre-cropped (official ``resize_crop``: bicubic with antialiasing, on the 8-bit
  frames). Pixels where ``mask`` is 0 are kept, where it is 1 generated; without a mask the whole video is a
  control signal (a pose, depth or edge video the user prepared) that the model follows.
* ``mask``: same frame count as the video; 1 = generate, 0 = keep (thresholded at 0.5, as the official code).
* ``reference_images``: subject or style images, each fitted inside the output frame on a white canvas (official
  ``prepare_source``), placed as leading latent frames that the decode drops.

The hint-stream input is ``cat(inactive latents 16, reactive latents 16, mask 64)`` over ``R + T`` latent frames:
``inactive = video * (1 - mask)``, ``reactive = video * mask``, each VAE-encoded (posterior mean, normalised); each
reference image is encoded alone (16 channels, then 16 zeros); the mask is folded from 8x8 pixel blocks into 64
channels at every 4th frame (``vace_encode_masks``), zeros on the reference frames.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: At most this many reference images per request (each is one more latent frame of every step's work).
MAX_REFERENCE_IMAGES = 4
#: The VAE's pixel stride (time, height, width) and the DiT's patch (height, width): the mask's latent folding.
VAE_STRIDE = (4, 8, 8)


# ---------------------------------------------------------------------------------------------- loading


def _frames_from_list(items: Sequence[Any], name: str) -> torch.Tensor:
    """A list of images (PIL, arrays, paths) as uint8 ``[F, H, W, 3]`` (through :func:`wanrt.images.load_image`)."""
    from .images import load_image

    if not items:
        raise ValueError(f"{name} is an empty list: give at least one frame")
    frames = [load_image(item, name=f"{name}[{i}]") for i, item in enumerate(items)]
    sizes = {tuple(f.shape[1:]) for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"{name}: the frames differ in size ({sorted(sizes)}); give frames of one size")
    x = torch.stack(frames)  # [F, 3, H, W] in [-1, 1]
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def load_video(video: Any, *, name: str = "video") -> torch.Tensor:
    """A source/control video as uint8 ``[F, H, W, 3]`` (CPU), not resized.

    Args:
        video: a path to a video file (decoded with PyAV, every frame), a ``[F, H, W, 3]`` uint8 array (numpy or
            torch; ``[F, H, W]`` gray is repeated to RGB), a float array of that layout with values in [0, 1], or a
            list of images (anything :func:`wanrt.images.load_image` takes: PIL images, arrays, paths).
        name: the argument's name, for the messages.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: an unreadable file, a wrong layout or dtype, values outside [0, 1] in a float array, an empty
            video, frames of different sizes.
    """
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: no such file: {path}")
        from .video import read_mp4

        try:
            frames, _ = read_mp4(path)
        except Exception as e:  # PyAV raises its own error types for unreadable input
            raise ValueError(f"{name}: cannot decode {path} as a video ({type(e).__name__}: {e})") from e
        return torch.from_numpy(frames)
    if isinstance(video, (list, tuple)):
        return _frames_from_list(video, name)
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"{name} must be a path, a [F, H, W, 3] array or a list of images, got "
                         f"{type(video).__name__}")
    x = video.detach().cpu()
    if x.ndim == 3:
        x = x[..., None].expand(*x.shape, 3)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must be [F, H, W, 3] (frames, height, width, RGB), got shape {list(video.shape)}")
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:3], 3)
    if min(x.shape[:3]) < 1:
        raise ValueError(f"{name} is empty (shape {list(video.shape)})")
    if x.dtype == torch.uint8:
        return x.contiguous()
    if x.dtype == torch.bool:
        return x.to(torch.uint8).mul(255)
    if not x.is_floating_point():
        raise ValueError(f"{name} must be uint8 (0..255) or float in [0, 1], got {x.dtype}")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError(f"{name}: float frames must hold values in [0, 1] (got {x.min().item():.3g}.."
                         f"{x.max().item():.3g})")
    return (x.float() * 255).round().to(torch.uint8)


def load_mask(mask: Any, *, name: str = "mask") -> torch.Tensor:
    """A mask video as float32 ``[F, H, W]`` in [0, 1] (1 = generate, 0 = keep), not resized.

    Takes what :func:`load_video` takes, and ``[F, H, W]`` arrays: uint8 (255 = 1), bool, or float in [0, 1]. Of
    an RGB mask the first channel counts (official: ``mask[:1]``).

    Raises:
        ValueError: as :func:`load_video`; float values outside [0, 1].
    """
    if isinstance(mask, (np.ndarray, torch.Tensor)):
        m = torch.as_tensor(mask).detach().cpu()
        if m.ndim == 4 and m.shape[-1] in (1, 3):
            m = m[..., 0]
        if m.ndim != 3:
            raise ValueError(f"{name} must be [F, H, W] or [F, H, W, 3], got shape {list(m.shape)}")
        if m.dtype == torch.bool:
            return m.float()
        if m.dtype == torch.uint8:
            return m.float() / 255
        if not m.is_floating_point():
            raise ValueError(f"{name} must be uint8, bool or float in [0, 1], got {m.dtype}")
        if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
            raise ValueError(f"{name} must hold values in [0, 1] (1 = generate, 0 = keep), got "
                             f"{m.min().item():.3g}..{m.max().item():.3g}")
        return m.float()
    return load_video(mask, name=name)[..., 0].float() / 255


# ---------------------------------------------------------------------------------------------- sizing


def vace_size(video_hw: tuple[int, int], max_area: int) -> tuple[int, int]:
    """The official output size for a source video of ``video_hw`` pixels within ``max_area`` pixels: its aspect
    ratio on the 16-pixel grid, never larger than the video (``VaceVideoProcessor._get_frameid_bbox_adjust_last``:
    ``area = min(max_area / 256, (h // 16) * (w // 16))`` cells, ``oh = round(sqrt(area * h / w))``,
    ``ow = int(area / oh)``). Returns ``(height, width)`` in pixels, multiples of 16.

    Raises:
        ValueError: a video smaller than 16x16 pixels.
    """
    h, w = video_hw
    if h < 16 or w < 16:
        raise ValueError(f"the video is {h}x{w} pixels; VACE needs at least 16x16")
    area = min(max_area / 256, (h // 16) * (w // 16))
    oh = max(1, round(math.sqrt(area * h / w)))
    ow = max(1, int(area / oh))
    return 16 * oh, 16 * ow


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize ``frames`` (uint8 ``[F, H, W, C]`` or float ``[F, H, W]``) to cover ``height x width`` and
    centre-crop (official ``VaceVideoProcessor.resize_crop``: scale ``max(width / W, height / H)``, bicubic with
    antialiasing, on the 8-bit values). Returns the same layout and dtype at ``[F, height, width(, C)]``."""
    gray = frames.ndim == 3
    x = frames[..., None] if gray else frames
    x = x.permute(0, 3, 1, 2)  # [F, C, H, W]
    ih, iw = x.shape[2:]
    if (ih, iw) != (height, width):
        scale = max(width / iw, height / ih)
        size = (max(height, round(scale * ih)), max(width, round(scale * iw)))
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True)
        if x.is_floating_point():
            x = x.clamp(0, 1)
        y0, x0 = (x.shape[2] - height) // 2, (x.shape[3] - width) // 2
        x = x[:, :, y0:y0 + height, x0:x0 + width]
    x = x.permute(0, 2, 3, 1)
    return (x[..., 0] if gray else x).contiguous()


def fit_reference(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A reference image ``[3, h, w]`` in [-1, 1] fitted inside ``height x width`` (aspect kept, bilinear) and
    centred on a white canvas (official ``prepare_source``). Returns ``[3, height, width]`` float32."""
    h, w = image.shape[1:]
    if (h, w) == (height, width):
        return image.float()
    scale = min(height / h, width / w)
    nh, nw = int(h * scale), int(w * scale)
    resized = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
    canvas = torch.ones(3, height, width)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[:, top:top + nh, left:left + nw] = resized
    return canvas


# ---------------------------------------------------------------------------------------------- encoding


def mask_latent(mask: torch.Tensor, references: int = 0) -> torch.Tensor:
    """The mask's hint-stream channels: ``[64, R + T, H/8, W/8]`` for a mask ``[1, F, H, W]`` (official
    ``vace_encode_masks``): each 8x8 pixel block becomes 64 channels (channel ``8 * i + j`` holds pixel ``(i, j)``
    of the block), frames are resampled to ``T = (F + 3) // 4`` with nearest-exact, and ``R = references``
    leading frames of zeros.

    Raises:
        ValueError: a mask whose height or width is not a multiple of 16.
    """
    _, f, h, w = mask.shape
    if h % 16 or w % 16:
        raise ValueError(f"the mask is {h}x{w}; VACE needs multiples of 16")
    sh, sw = VAE_STRIDE[1:]
    m = mask[0].reshape(f, h // sh, sh, w // sw, sw).permute(2, 4, 0, 1, 3).reshape(sh * sw, f, h // sh, w // sw)
    t = (f + 3) // VAE_STRIDE[0]
    m = F.interpolate(m[None], size=(t, h // sh, w // sw), mode="nearest-exact")[0]
    if references:
        m = torch.cat([m.new_zeros(m.shape[0], references, *m.shape[2:]), m], dim=1)
    return m


@torch.no_grad()
def vace_context(vae, video: torch.Tensor, mask: torch.Tensor, references: Sequence[torch.Tensor] = (), *,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The hint-stream input ``[1, 96, R + T, H/8, W/8]`` float32 (official ``vace_latent(vace_encode_frames(...),
    vace_encode_masks(...))``).

    Args:
        vae: a :class:`~wanrt.models.vae.WanVAE` (``encode`` returns normalised latents).
        video: ``[3, F, H, W]`` float32 in [-1, 1] at the output size (zeros where there is no source video).
        mask: ``[1, F, H, W]`` float32 in [0, 1] (ones where there is none).
        references: ``[3, H, W]`` float32 in [-1, 1] at the output size, in order.
        device: where the VAE runs (default: the VAE's).
    """
    dev = torch.device(device) if device is not None else next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    m = (mask > 0.5).to(torch.float32)
    inactive = video * (1 - m)
    reactive = video * m
    z = torch.cat([vae.encode(v[None].to(dev, dtype)).float() for v in (inactive, reactive)], dim=1)
    refs = [vae.encode(r[None, :, None].to(dev, dtype)).float() for r in references]  # [1, 16, 1, h, w] each
    if refs:
        z = torch.cat([torch.cat([r, torch.zeros_like(r)], dim=1) for r in refs] + [z], dim=2)
    # the mask channels take the mask as given (soft values stay soft); only the split into inactive/reactive
    # pixels thresholds it (official vace_encode_masks / vace_encode_frames)
    return torch.cat([z, mask_latent(mask.float(), len(refs)).to(z.device, z.dtype)[None]], dim=1)
