"""Image inputs and conditioning helpers of image-to-video (I2V) and first-last-frame-to-video (FLF2V).

Pure functions, no model. They reproduce the preprocessing of the official ``wan/image2video.py`` and
``wan/first_last_frame2video.py`` (docs/model-reference.md §7, §9.11):

- :func:`load_image`: a PIL image, an ndarray or a file path to ``[3, H, W]`` float32 in [-1, 1]
  (``to_tensor(rgb) * 2 - 1``), with the edge cases (alpha, 16-bit, EXIF rotation, size limits) made explicit.
- :func:`size_from_max_area`: the official video size for an image and a pixel budget.
- :func:`resize_bicubic`: the official bicubic resize (no antialias, no clamp).
- :func:`match_last_frame`: fits an FLF2V last frame to the first frame's size (cover, then center crop).
- :func:`conditioning_mask`: the 4-channel frame mask ``[4, T', h/8, w/8]``, for any ``4k+1`` frame count.
- :func:`conditioning_chunks` / :func:`conditioning_video`: the conditioning video fed to the VAE encoder,
  chunk by chunk (one chunk in memory at a time) or whole.

Pillow is needed only for files and PIL images; ndarrays and the other helpers work without it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("wanrt")

#: Images with a side shorter than this are rejected (too small to condition a video).
MIN_SIDE = 16
#: Images with more pixels than this are rejected (8192x8192 = 2**26): one float32 copy of such an image is
#: already 768 MiB, and the conditioning only ever uses about ``max_area`` pixels. Downscale first.
MAX_PIXELS = 2**26

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ACCEPTED = "a PIL.Image.Image, a numpy ndarray (HxW, HxWx1, HxWx3 RGB or HxWx4 RGBA) or a path (str / os.PathLike)"


# --------------------------------------------------------------------------------------------------------------
# load_image
# --------------------------------------------------------------------------------------------------------------


def load_image(image: Any, *, name: str = "image") -> torch.Tensor:
    """Load an image as the official I2V/FLF2V pipelines do: ``[3, H, W]`` float32 in [-1, 1] on the CPU.

    The value of an 8-bit channel ``v`` becomes ``v / 255 * 2 - 1`` (``TF.to_tensor(img).sub_(0.5).div_(0.5)``
    in the official code; bit for bit the same). The image is not resized: see :func:`size_from_max_area`
    and :func:`resize_bicubic`.

    Accepted inputs and how they are handled:

    - **PIL image** (``PIL.Image.Image``):
        - ``RGB`` as is; ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX`` converted to RGB
          with PIL's ``convert("RGB")`` (what the official CLI does).
        - Alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, or any mode with a ``transparency`` key, e.g. a
          palette image with a transparent index): if every pixel is fully opaque the alpha is dropped, which
          is identical to the official ``convert("RGB")``. With partial transparency the image is composited
          over a **white** background (``rgb * a + (1 - a)`` in float32; the official ``convert("RGB")`` would
          keep whatever colour hides under transparent pixels, often black); an info line is logged to the
          ``"wanrt"`` logger.
        - 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, and ``I`` holding values in 0..65535,
          which is how 16-bit PNGs open): scaled to 8 bits as ``round(v / 257)`` (PIL's own ``convert`` clips
          every value above 255 to white). A ``transparency`` key on a 16-bit image is ignored.
        - The EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``): a phone photo comes out the
          way it is displayed, not sideways. (The official code ignores the tag.) Unreadable EXIF data is
          ignored with a warning.
        - An animated or multi-page image gives its first frame.
    - **numpy ndarray**, layouts ``HxW`` (gray), ``HxWx1`` (gray), ``HxWx3`` (RGB), ``HxWx4`` (RGBA, the same
      alpha rule as above), dtypes:
        - ``uint8`` (0..255): bit for bit the same result as the equivalent PIL image;
        - ``uint16`` (0..65535): ``v / 65535`` in float32 (full precision, no 8-bit rounding);
        - ``bool``: 0 or 1;
        - ``float16/32/64`` in [0, 1].
    - **path** (``str`` or ``os.PathLike``): opened with PIL, fully loaded and closed, then handled as a PIL image.

    Args:
        image: the image, see above.
        name: what to call the image in error messages (``"image"``, ``"last_image"``).

    Returns:
        ``[3, H, W]`` float32 CPU tensor in [-1, 1], contiguous.

    Raises:
        TypeError: an unsupported type (tensor, list, bytes, None, ...) or ndarray dtype (int8, int32, complex,
            object, ...).
        FileNotFoundError: a path that does not exist (the message names it).
        ValueError: a file that is not a readable image (corrupt, truncated, not an image, a directory; the
            message names the path and the reason); a float ``F`` mode image; mode ``I`` values outside
            0..65535; an unsupported ndarray layout (e.g. channels-first ``3xHxW``, 4-D); float values
            outside [0, 1] or not finite; a side shorter than :data:`MIN_SIDE` (16) px; more than
            :data:`MAX_PIXELS` (2**26) pixels.
        ImportError: a path or a PIL image while Pillow is not installed.
    """
    if isinstance(image, np.ndarray):
        return _from_ndarray(image, name)
    if isinstance(image, (str, os.PathLike)):
        return _from_path(image, name)
    pil_image_mod = sys.modules.get("PIL.Image")
    if pil_image_mod is not None and isinstance(image, pil_image_mod.Image):
        return _from_pil(image, name)
    raise TypeError(f"{name} must be {_ACCEPTED}, got {type(image).__module__}.{type(image).__qualname__}"
                    + (" (convert a tensor with .numpy() and HxWx3 layout, values in [0, 1])"
                       if isinstance(image, torch.Tensor) else ""))


def _import_pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as e:  # pragma: no cover - Pillow is installed wherever the tests run
        raise ImportError("reading image files and PIL images needs Pillow: pip install Pillow") from e
    return Image, ImageOps


def _check_size(height: int, width: int, name: str) -> None:
    """``name`` is what the messages call the image (``"image"``, ``"last_image file '/a/b.png'"``)."""
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"{name} is {height}x{width} (HxW) pixels: a side shorter than {MIN_SIDE} px is "
                         "too small to condition a video")
    if height * width > MAX_PIXELS:
        raise ValueError(f"{name} is {height}x{width} (HxW) = {height * width} pixels, more than the "
                         f"{MAX_PIXELS} wanrt accepts: downscale it first (the video uses about max_area pixels, "
                         "and an image this large costs GBs as float tensors)")


def _from_path(path: str | os.PathLike, name: str) -> torch.Tensor:
    Image, _ = _import_pil()
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"{name} file not found: {str(p)!r}")
    if p.is_dir():
        raise ValueError(f"{name} path {str(p)!r} is a directory, not an image file")
    bad = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
    try:
        with warnings.catch_warnings():
            # wanrt enforces its own (stricter) MAX_PIXELS right below, before any pixel is decoded
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            f = Image.open(p)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name} file {str(p)!r} is too large to load ({e}); downscale it first") from e
    except bad as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{name} file {str(p)!r} is not a readable image: {e}") from e
    with f:
        width, height = f.size
        _check_size(height, width, f"{name} file {str(p)!r}")  # from the header, before decoding
        try:
            f.load()
        except bad as e:  # truncated / corrupt data
            raise ValueError(f"{name} file {str(p)!r} is not a readable image: {e}") from e
        return _from_pil(f, name, where=f"file {str(p)!r}")


def _from_pil(img, name: str, where: str = "") -> torch.Tensor:
    _, ImageOps = _import_pil()
    what = f"{name} {where}".strip()
    width, height = img.size
    _check_size(height, width, what)
    try:
        img.load()
        try:
            orientation = img.getexif().get(0x0112, 1)  # 0x0112 = EXIF Orientation; 1 = as stored
        except Exception as e:  # a damaged EXIF block must not make a good image unusable
            log.warning("%s: ignoring unreadable EXIF data (%s)", what, e)
            orientation = 1
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            img = ImageOps.exif_transpose(img)
        mode = img.mode
        if mode == "F":
            raise _UserError(f"{what} is a 32-bit float PIL image (mode 'F'), which has no standard value "
                             "range: pass an 8/16-bit image, or an ndarray of floats in [0, 1]")
        if mode in _16BIT_MODES:
            gray = np.asarray(img)
            if mode == "I":
                lo, hi = int(gray.min()), int(gray.max())
                if lo < 0 or hi > 65535:
                    raise _UserError(f"{what} is a 32-bit integer PIL image (mode 'I') with values in "
                                     f"[{lo}, {hi}], outside the 16-bit range 0..65535: convert it to "
                                     "8-bit RGB first")
            rgb = ((gray.astype(np.int64) + 128) // 257).astype(np.uint8)  # round(v / 257), integer exact
            return _uint8_to_tensor(np.repeat(rgb[:, :, None], 3, axis=2))
        if mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = np.asarray(img.convert("LA").convert("RGBA") if mode == "La" else img.convert("RGBA"))
            return _drop_or_composite_uint8(rgba, name)
        if mode != "RGB":
            img = img.convert("RGB")
        return _uint8_to_tensor(np.asarray(img))
    except _UserError as e:
        raise ValueError(str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ValueError(f"{what} could not be decoded or converted to RGB (mode {img.mode!r}): {e}") from e


class _UserError(Exception):
    """Internal: a validation failure to re-raise as ValueError (kept apart from PIL's own errors)."""


def _uint8_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 to ``[3, H, W]`` float32 ``v / 255 * 2 - 1`` (== official ``to_tensor * 2 - 1``)."""
    t = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)  # [3, H, W], exact integers (a fresh copy)
    return t.div_(255).mul_(2).sub_(1).contiguous()


def _unit_to_tensor(rgb01: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` float32 in [0, 1] to ``[3, H, W]`` float32 ``x * 2 - 1``."""
    t = torch.from_numpy(np.ascontiguousarray(rgb01, dtype=np.float32)).permute(2, 0, 1)  # [3, H, W]
    return t.mul(2).sub_(1).contiguous()


def _composite_white(rgb01: np.ndarray, a01: np.ndarray, name: str) -> torch.Tensor:
    log.info("%s has partial transparency: compositing it over a white background", name)
    return _unit_to_tensor(rgb01 * a01 + (np.float32(1) - a01))


def _drop_or_composite_uint8(rgba: np.ndarray, name: str) -> torch.Tensor:
    """``[H, W, 4]`` uint8: drop a fully opaque alpha (bit-exact RGB path), else composite over white."""
    alpha = rgba[:, :, 3]
    if bool((alpha == 255).all()):
        return _uint8_to_tensor(rgba[:, :, :3])
    rgb01 = rgba[:, :, :3].astype(np.float32) / np.float32(255)
    a01 = alpha[:, :, None].astype(np.float32) / np.float32(255)
    return _composite_white(rgb01, a01, name)


def _from_ndarray(arr: np.ndarray, name: str) -> torch.Tensor:
    layout_hint = "expected an HxWx3 RGB array (also HxW / HxWx1 gray, HxWx4 RGBA), channels last"
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim != 3:
        raise ValueError(f"{name} ndarray has shape {arr.shape}: {layout_hint}"
                         + (" (drop the batch dimension)" if arr.ndim == 4 and arr.shape[0] == 1 else ""))
    h, w, c = arr.shape
    if c not in (1, 3, 4):
        chw = arr.shape[0] in (1, 3, 4)
        raise ValueError(f"{name} ndarray has shape {arr.shape}: {layout_hint}"
                         + ("; this looks channels-first (CxHxW): use arr.transpose(1, 2, 0)" if chw else ""))
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if not ((kind == "u" and size in (1, 2)) or kind == "b" or (kind == "f" and size in (2, 4, 8))):
        raise TypeError(f"{name} ndarray has dtype {arr.dtype}: expected uint8 (0..255), uint16 (0..65535), "
                        "bool, or float16/32/64 in [0, 1], in an HxWx3 RGB layout (e.g. arr.astype(np.uint8))")
    _check_size(h, w, name)

    if kind == "u" and size == 1:  # uint8: the exact PIL path
        if c == 4:
            return _drop_or_composite_uint8(arr, name)
        return _uint8_to_tensor(arr if c == 3 else np.repeat(arr, 3, axis=2))

    if kind == "f":
        lo, hi = float(np.min(arr)), float(np.max(arr))  # NaN propagates into both
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 1:
            bad = "NaN/Inf values" if not (math.isfinite(lo) and math.isfinite(hi)) else "values outside [0, 1]"
            raise ValueError(f"{name} float ndarray has {bad} (min {lo}, max {hi}): expected floats in [0, 1] "
                             "(divide by 255 for 8-bit data)")
        x01 = arr.astype(np.float32)
    elif kind == "b":
        x01 = arr.astype(np.float32)
    else:  # uint16, any byte order
        x01 = arr.astype(np.float32) / np.float32(65535)

    if c == 4:
        a01 = x01[:, :, 3:4]
        if bool((a01 == 1).all()):
            return _unit_to_tensor(x01[:, :, :3])
        return _composite_white(x01[:, :, :3], a01, name)
    return _unit_to_tensor(x01 if c == 3 else np.repeat(x01, 3, axis=2))


# --------------------------------------------------------------------------------------------------------------
# Sizes and resizing
# --------------------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def size_from_max_area(image_height: int, image_width: int, max_area: int, *, vae_stride: int = 8,
                       patch: int = 2) -> tuple[int, int]:
    """The official I2V/FLF2V video size for an image and a pixel budget (docs/model-reference.md §7.2).

    With ``aspect = image_height / image_width``::

        lat_h = round(sqrt(max_area * aspect) // vae_stride // patch * patch)
        lat_w = round(sqrt(max_area / aspect) // vae_stride // patch * patch)

    and the size is ``(lat_h * vae_stride, lat_w * vae_stride)``, multiples of ``vae_stride * patch`` (16),
    with about ``max_area`` pixels at most and the image's aspect ratio. The same float64 operations as the
    official ``image2video.py`` (``np.sqrt`` of a Python float), so the result matches it exactly.

    Examples: 720x1280 at 720*1280 gives (720, 1280); 832x480 at 480*832 gives (832, 480); 1000x750 at 480*832
    gives (720, 544). The official float rounding is kept on purpose: a 480x832 image at 480*832 gives
    **(464, 832)**, because ``sqrt(399360 * (480 / 832))`` is 479.99999999999994, exactly as the official
    pipeline sizes it (diffusers' example rounds the sqrt first and gets 480; wanrt follows the official code).

    Args:
        image_height, image_width: the image size in pixels.
        max_area: the pixel budget ``W * H`` (the official ``--size`` of i2v/flf2v, e.g. ``720 * 1280``).
        vae_stride: the VAE's spatial stride (8).
        patch: the DiT's spatial patch size (2).

    Returns:
        ``(height, width)`` in pixels.

    Raises:
        ValueError: a non-positive or non-int argument, ``max_area < 16 * 16``, or an aspect ratio so extreme
            that the height or the width would come out shorter than ``vae_stride * patch`` (16) px (the
            message says which).
    """
    for arg, v in (("image_height", image_height), ("image_width", image_width), ("vae_stride", vae_stride),
                   ("patch", patch)):
        if not _is_int(v) or v <= 0:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    unit = vae_stride * patch
    if not _is_int(max_area) or max_area < unit * unit:
        raise ValueError(f"max_area must be an int >= {unit}*{unit} = {unit * unit} (pixels, W*H), got {max_area!r}")
    aspect = int(image_height) / int(image_width)
    lat_h = round(np.sqrt(int(max_area) * aspect) // vae_stride // patch * patch)
    lat_w = round(np.sqrt(int(max_area) / aspect) // vae_stride // patch * patch)
    for side, lat in (("height", lat_h), ("width", lat_w)):
        if lat <= 0:
            raise ValueError(f"an image of {image_height}x{image_width} (HxW) has an aspect ratio too extreme for "
                             f"max_area {max_area}: the video {side} would be shorter than {unit} px; crop the "
                             "image or raise max_area")
    return int(lat_h) * vae_stride, int(lat_w) * vae_stride


def _check_image_tensor(t: Any, arg: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor [3, H, W], got {type(t).__name__}")
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"{arg} must have shape [3, H, W], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{arg} must be a float tensor in [-1, 1] (see load_image), got {t.dtype}")


def resize_bicubic(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize an image to the video size exactly as the official code does (docs/model-reference.md §7.6, §9.11).

    ``F.interpolate(image[None], size=(height, width), mode="bicubic", align_corners=False)[0]``: no antialias,
    no clamp (the result may overshoot [-1, 1] slightly, as in the official pipeline).

    Args:
        image: ``[3, H, W]`` float tensor (any device), from :func:`load_image`.
        height, width: the target size in pixels, e.g. from :func:`size_from_max_area`.

    Returns:
        ``[3, height, width]`` float32 on the image's device. When the size already matches, the float32 input
        itself (no copy; bicubic at scale 1 is the identity, so this equals the interpolate result).

    Raises:
        TypeError: ``image`` is not a tensor.
        ValueError: ``image`` not ``[3, H, W]`` floating point, or a non-positive size.
    """
    _check_image_tensor(image, "image")
    for arg, v in (("height", height), ("width", width)):
        if not _is_int(v) or v <= 0:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    image = image.float()
    if tuple(image.shape[1:]) == (height, width):
        return image
    return F.interpolate(image[None], size=(int(height), int(width)), mode="bicubic", align_corners=False)[0]


def match_last_frame(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Fit the FLF2V last frame to the first frame's size: scale to cover, then center-crop.

    When ``last`` already has the first frame's size it is returned unchanged (the same object). Otherwise it
    is resized, keeping its own aspect ratio, by ``scale = max(H1 / H2, W1 / W2)`` to
    ``(max(H1, round(H2 * scale)), max(W1, round(W2 * scale)))``, so that it covers ``H1 x W1``, then
    center-cropped to exactly ``H1 x W1`` (offsets ``(H - H1) // 2`` and ``(W - W1) // 2``), and clamped to
    [-1, 1] like any loaded image. The resize is bicubic (``align_corners=False``) **with antialias**: this
    rescales a user photo by an arbitrary factor, where aliasing would otherwise show; the official-numerics
    resize to the video size (:func:`resize_bicubic`) comes after, for both frames.

    The official ``first_last_frame2video.py`` intends this, but its code passes PIL's ``(w, h)`` size as
    ``TF.center_crop``'s ``(h, w)`` and never resizes, so it crops the wrong region and can pad with black;
    wanrt does the intended cover-and-crop. The result then goes through the same CLIP and VAE path as the
    first frame.

    Args:
        first: ``[3, H1, W1]`` float tensor, the first frame at its original resolution.
        last: ``[3, H2, W2]`` float tensor, the last frame at its original resolution.

    Returns:
        ``last`` itself when the sizes match, else a new ``[3, H1, W1]`` float32 tensor on ``last``'s device.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: an argument is not a ``[3, H, W]`` float tensor.
    """
    _check_image_tensor(first, "first")
    _check_image_tensor(last, "last")
    h1, w1 = first.shape[1:]
    h2, w2 = last.shape[1:]
    if (h1, w1) == (h2, w2):
        return last
    scale = max(h1 / h2, w1 / w2)
    h, w = max(h1, round(h2 * scale)), max(w1, round(w2 * scale))  # covers h1 x w1, keeps last's aspect
    resized = F.interpolate(last.float()[None], size=(h, w), mode="bicubic", align_corners=False,
                            antialias=True)[0]  # [3, h, w]
    top, left = (h - h1) // 2, (w - w1) // 2
    return resized[:, top:top + h1, left:left + w1].clamp(-1, 1).contiguous()  # [3, h1, w1]


# --------------------------------------------------------------------------------------------------------------
# Conditioning mask and video
# --------------------------------------------------------------------------------------------------------------


def _check_frames(num_frames: Any, last_frame: bool, temporal_factor: Any) -> None:
    if not _is_int(temporal_factor) or temporal_factor <= 0:
        raise ValueError(f"temporal_factor must be a positive int, got {temporal_factor!r}")
    tf = temporal_factor
    if not _is_int(num_frames) or num_frames < 1 or (num_frames - 1) % tf:
        raise ValueError(f"num_frames must be {tf}k+1 (1, {tf + 1}, {2 * tf + 1}, ..., 81), got {num_frames!r}")
    if last_frame and num_frames < tf + 1:
        raise ValueError(f"first-last-frame conditioning needs distinct first and last frames: num_frames must be "
                         f">= {tf + 1}, got {num_frames}")


def conditioning_mask(num_frames: int, lat_h: int, lat_w: int, *, last_frame: bool, temporal_factor: int = 4,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The I2V/FLF2V frame mask: which latent channels hold a given (conditioning) frame.

    The official construction (docs/model-reference.md §7.5), generalised from 81 to any ``4k+1`` frame count (the
    official FLF2V hard-codes 81): a per-frame mask of ``num_frames`` ones, zero for frames ``1..F-1`` (I2V) or
    ``1..F-2`` (FLF2V, ``last_frame=True``); frame 0's value repeated 4 times followed by frames ``1..F-1``
    (``F + 3`` values), viewed as ``(T', 4)`` and transposed. So channel ``c`` of latent frame ``t`` is the
    mask of pixel frame ``4t + c - 3`` (frame 0 for ``t = 0``).

    Args:
        num_frames: the video's frame count ``F``, ``4k+1``.
        lat_h, lat_w: the latent size (pixels / 8).
        last_frame: True for FLF2V (the last frame is given too), False for I2V.
        temporal_factor: the VAE's temporal stride (4).
        device: where to build the mask (default: CPU).

    Returns:
        ``[4, T', lat_h, lat_w]`` float32 (1 = given frame, 0 = generated), contiguous,
        ``T' = (num_frames - 1) // 4 + 1``.

    Raises:
        ValueError: ``num_frames`` not ``4k+1``; ``last_frame`` with ``num_frames < 5`` (FLF2V needs distinct
            first and last frames); non-positive ``lat_h``/``lat_w``/``temporal_factor``.
    """
    _check_frames(num_frames, last_frame, temporal_factor)
    for arg, v in (("lat_h", lat_h), ("lat_w", lat_w)):
        if not _is_int(v) or v <= 0:
            raise ValueError(f"{arg} must be a positive int, got {v!r}")
    tf = temporal_factor
    per_frame = torch.zeros(num_frames, dtype=torch.float32, device=device)  # [F]
    per_frame[0] = 1
    if last_frame:
        per_frame[-1] = 1
    seq = torch.cat([per_frame[:1].repeat(tf), per_frame[1:]])  # [F + tf - 1]
    table = seq.view(-1, tf).t()  # [tf, T']: table[c, t] = frame tf*t + c - (tf - 1)
    return table[:, :, None, None].expand(-1, -1, int(lat_h), int(lat_w)).contiguous()  # [tf, T', lat_h, lat_w]


def _check_frames_pair(first: Any, last: Any) -> None:
    _check_image_tensor(first, "first")
    if last is not None:
        _check_image_tensor(last, "last")
        if last.shape != first.shape or last.dtype != first.dtype or last.device != first.device:
            raise ValueError(f"last must match first in shape, dtype and device: got {tuple(last.shape)} "
                             f"{last.dtype} {last.device} vs {tuple(first.shape)} {first.dtype} {first.device} "
                             "(fit it with match_last_frame and resize both with resize_bicubic)")


def conditioning_chunks(first: torch.Tensor, last: torch.Tensor | None, num_frames: int, *,
                        temporal_factor: int = 4) -> Iterator[torch.Tensor]:
    """The conditioning video, in the chunks the causal VAE encoder takes, one chunk in memory at a time.

    Yields ``[1, 3, 1, h, w]`` (the first frame), then ``(num_frames - 1) // 4`` chunks ``[1, 3, 4, h, w]`` of
    zeros, where for FLF2V the final frame (index ``num_frames - 1``) is ``last``. Concatenated along dim 2
    they equal the official video ``[first, zeros(F-1)]`` (I2V) or ``[first, zeros(F-2), last]`` (FLF2V),
    ``[1, 3, F, h, w]`` (docs/model-reference.md §7.6), which at 81 frames of 720P would be ~900 MB at once.

    The arguments are checked when this is called, not at the first ``next()``. Each zero chunk is a fresh
    tensor (safe to keep or modify); the first chunk is a view of ``first``.

    Args:
        first: ``[3, h, w]`` float tensor, the first frame at the video size (:func:`resize_bicubic`).
        last: ``[3, h, w]`` (same dtype and device) for FLF2V, or None for I2V.
        num_frames: the video's frame count, ``4k+1`` (``>= 5`` with ``last``).
        temporal_factor: the VAE's temporal stride (4).

    Returns:
        An iterator of ``[1, 3, n, h, w]`` tensors (``n`` = 1, then 4) of ``first``'s dtype and device.

    Raises:
        TypeError / ValueError: frames that are not ``[3, h, w]`` float tensors, ``last`` not matching
            ``first``, or a frame count rejected by :func:`conditioning_mask`.
    """
    _check_frames_pair(first, last)
    _check_frames(num_frames, last is not None, temporal_factor)
    return _chunks(first, last, num_frames, temporal_factor)


def _chunks(first: torch.Tensor, last: torch.Tensor | None, num_frames: int, tf: int) -> Iterator[torch.Tensor]:
    _, h, w = first.shape
    yield first[None, :, None]  # [1, 3, 1, h, w]
    n_chunks = (num_frames - 1) // tf
    for k in range(n_chunks):
        chunk = first.new_zeros(1, 3, tf, h, w)  # [1, 3, tf, h, w]: frames tf*k+1 .. tf*k+tf
        if last is not None and k == n_chunks - 1:
            chunk[0, :, -1] = last  # frame num_frames - 1
        yield chunk


def conditioning_video(first: torch.Tensor, last: torch.Tensor | None, num_frames: int, *,
                       temporal_factor: int = 4) -> torch.Tensor:
    """The whole conditioning video, :func:`conditioning_chunks` concatenated (for tests and small sizes).

    Returns:
        ``[1, 3, num_frames, h, w]`` of ``first``'s dtype and device: ``[first, zeros(F-1)]`` (I2V) or
        ``[first, zeros(F-2), last]`` (FLF2V).

    Raises:
        Same as :func:`conditioning_chunks`.
    """
    return torch.cat(list(conditioning_chunks(first, last, num_frames, temporal_factor=temporal_factor)), dim=2)


# ---------------------------------------------------------------------------------------------- Wan2.2 TI2V


def best_output_size(image_height: int, image_width: int, max_area: int, *, multiple: int = 32) -> tuple[int, int]:
    """Wan2.2 TI2V's output size for an image: ``(height, width)``, multiples of ``multiple`` (VAE stride 16 x patch
    2), area at most ``max_area``, aspect ratio closest to the image's (official ``wan/utils/utils.py``
    ``best_output_size``: the width rounded down first, or the height first, whichever keeps the ratio better).

    Raises:
        ValueError: ``max_area`` too small for one ``multiple x multiple`` block at this aspect ratio.
    """
    ratio = image_width / image_height
    ow = (max_area * ratio) ** 0.5
    oh = max_area / ow
    ow1 = int(ow // multiple * multiple)
    oh2 = int(oh // multiple * multiple)
    if ow1 < multiple or oh2 < multiple:
        raise ValueError(f"max_area {max_area} is too small for a {image_width}x{image_height} image: each side "
                         f"needs at least {multiple} px")
    oh1 = int(max_area / ow1 // multiple * multiple)
    ow2 = int(max_area / oh2 // multiple * multiple)
    if oh1 < multiple or ow2 < multiple:
        raise ValueError(f"max_area {max_area} is too small for a {image_width}x{image_height} image")
    r1, r2 = ow1 / oh1, ow2 / oh2
    if max(ratio / r1, r1 / ratio) < max(ratio / r2, r2 / ratio):
        return oh1, ow1
    return oh2, ow2


def resize_crop_lanczos(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Wan2.2 TI2V's image preprocessing: scale ``[3, H, W]`` (in [-1, 1]) to cover ``height x width`` with PIL's
    Lanczos filter on the 8-bit values, then centre-crop (official ``textimage2video.py``: ``scale = max(ow / iw,
    oh / ih)``, ``resize((round(iw * scale), round(ih * scale)), LANCZOS)``, crop at ``((w - ow) // 2, (h - oh) //
    2)``). Returns ``[3, height, width]`` float32 in [-1, 1]."""
    Image = _import_pil()[0]
    _check_image_tensor(image, "image")
    ih, iw = image.shape[1:]
    rgb = ((image.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    scale = max(width / iw, height / ih)
    img = img.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1, y1 = (img.width - width) // 2, (img.height - height) // 2
    img = img.crop((x1, y1, x1 + width, y1 + height))
    return _uint8_to_tensor(np.asarray(img, dtype=np.uint8))
