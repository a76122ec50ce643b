"""One generation request, resolved and judged before any work: :class:`Request`, :func:`resolve_request`, the
checks that need no weights (sizes, lengths, numbers, images, the output path, the memory the request needs),
and the errors a generation raises.

``resolve_request`` is pure: it loads and sizes the images but touches no model, so a front end (the CLI, a
server) builds the request once, refuses bad input before any weight is read, and hands the same request to
:meth:`wanrt.Engine.run`. Adding a generation option means one field of :class:`Request` and one check here.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache.teacache import TeaCacheConfig
from .presets import Preset, default_shift
from .sampling.schedulers import SOLVER_NAMES

LATENT_CHANNELS = 16
VAE_STRIDE = (4, 8, 8)
#: positions per axis of the DiT's RoPE table (frames, height, width in latent patches; ``wan21`` uses 1024).
ROPE_POSITIONS = 1024
#: timesteps live on 0..1000: more steps than that repeat timesteps.
MAX_STEPS = 1000
#: video extensions ``Video.save`` writes.
VIDEO_SUFFIXES = (".mp4",)

UNSET: Any = object()  # "not given": the Engine's default applies (TeaCache threshold)


class GenerationError(RuntimeError):
    """A generation failed after denoising; the finished latents are kept.

    Attributes:
        latents: the denoised latents ``[1, 16, F', H', W']`` (CPU, float32); pass them to
            ``Engine.decode`` to retry the decode, or to ``generate(latents=...)``.
        seed: the seed used.
        video: the decoded :class:`~wanrt.video.Video` when only writing it failed, else None.
    """

    def __init__(self, message: str, latents: torch.Tensor | None, seed: int | None, video=None):
        super().__init__(message)
        self.latents = latents
        self.seed = seed
        self.video = video


class Cancelled(RuntimeError):
    """``generate()`` was cancelled at a step boundary (the callback returned False, or ``cancel`` was set).

    The VAE decode is skipped. Attributes:
        step: index of the last completed step (-1 if cancelled before the first).
        latents: the latents at that point ``[1, 16, F', H', W']`` (CPU, float32; partially denoised).
        seed: the seed used.
    """

    def __init__(self, step: int, latents: torch.Tensor | None, seed: int | None):
        super().__init__(f"generation cancelled after step {step}")
        self.step = step
        self.latents = latents
        self.seed = seed


class RequestTooLarge(ValueError):
    """The request needs more memory than the device has (raised before any weight is read).

    Attributes:
        needed: the estimate in bytes; capacity: the device's memory in bytes.
    """

    def __init__(self, message: str, needed: int, capacity: int):
        super().__init__(message)
        self.needed = needed
        self.capacity = capacity


@dataclass(frozen=True)
class Request:
    """One generation, resolved and validated by :func:`resolve_request`.

    Attributes:
        preset: name of the preset whose defaults filled the request.
        task: "t2v", "i2v", "flf2v" or "vace".
        prompt: the text (None when ``prompt_embeds`` is given).
        negative_prompt: the unconditional text: the caller's, else the preset's default; None when guidance is
            off or ``negative_prompt_embeds`` is given.
        height, width: pixels, multiples of 16. num_frames: 4k+1. num_inference_steps: 1..1000.
        guidance_scale: CFG scale (1 turns the unconditional branch off). shift: flow-matching sigma shift.
        sample_solver: "unipc", "dpm++" or "euler". seed: the seed (drawn when not given).
        image, last_image: i2v/flf2v frames ``[3, H, W]`` float32 in [-1, 1] at their own resolution (the last
            frame already fitted to the first frame's size), or None.
        max_area: the pixel area the image-conditioned size was fitted to (None for an explicit size).
        prompt_embeds, negative_prompt_embeds: ``[1, L, text_dim]`` instead of the texts, or None.
        latents: the initial noise ``[1, 16, F', H/8, W/8]``, or None (drawn from ``seed`` on the CPU).
        teacache: step skipping (:class:`~wanrt.cache.teacache.TeaCacheConfig`), or None.
        timesteps, sigmas: a custom schedule (:func:`wanrt.sampling.schedulers.custom_schedule`; the few-step
            distilled models' recipes), or None for the solver's own; ``num_inference_steps`` is its length.
        loras: ``((name, strength), ...)``: strengths of the Engine's runtime LoRAs for this call only, or None.
        video: vace: the source/control video at the output size, uint8 ``[F, H, W, 3]`` (resized and cropped, its
            first ``num_frames`` frames), or None (none: the official empty input, a gray video).
        mask: vace: float32 ``[F, H, W]`` in [0, 1] at the output size (1 = generate, 0 = keep), or None (all 1).
        reference_images: vace: ``[3, H, W]`` float32 in [-1, 1], each fitted on a white canvas of the output
            size, or None. Each is one more latent frame in front of the video's (dropped before the decode).
        conditioning_scale: vace: how strongly the VACE hints steer (official ``context_scale``).
        guidance_scale_2: Wan2.2 A14B: the low-noise expert's CFG scale (``guidance_scale`` is the high-noise
            expert's); None for one DiT.
        boundary: Wan2.2 A14B: the high-noise expert runs while the timestep is ``>= boundary * 1000``; None for
            one DiT.
        teacache_2: A14B: the low-noise expert's step skipping (``teacache`` is the high-noise expert's), or None.
        latent_channels, vae_stride: the VAE's latent channels (16, or 48 for the Wan2.2 VAE) and spatial stride
            (8, or 16), from the preset.
    """

    preset: str
    task: str
    prompt: str | None
    negative_prompt: str | None
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    shift: float
    sample_solver: str
    seed: int
    image: torch.Tensor | None = None
    last_image: torch.Tensor | None = None
    max_area: int | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    teacache: TeaCacheConfig | None = None
    timesteps: tuple[float, ...] | None = None
    sigmas: tuple[float, ...] | None = None
    loras: tuple[tuple[str, float], ...] | None = None
    video: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    reference_images: tuple[torch.Tensor, ...] | None = None
    conditioning_scale: float = 1.0
    guidance_scale_2: float | None = None
    boundary: float | None = None
    latent_channels: int = LATENT_CHANNELS
    vae_stride: int = VAE_STRIDE[1]
    teacache_2: TeaCacheConfig | None = None

    def schedule(self):
        """The custom schedule ``(sigmas [n + 1], timesteps [n])`` of ``timesteps`` / ``sigmas``, or None."""
        if self.timesteps is None and self.sigmas is None:
            return None
        from .sampling.schedulers import custom_schedule

        return custom_schedule(timesteps=self.timesteps, sigmas=self.sigmas, shift=self.shift)

    @property
    def references(self) -> int:
        """The reference images' latent frames in front of the video's (vace; 0 otherwise)."""
        return len(self.reference_images) if self.reference_images else 0

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """``[1, C, R + (F-1)/4+1, H/s, W/s]``: the shape of the initial noise and denoised latents (``C``, ``s``:
        16 and 8 for the Wan2.1 VAE, 48 and 16 for Wan2.2's; ``R``: the reference images' frames, which the decode
        drops)."""
        s = self.vae_stride
        return (1, self.latent_channels, self.references + (self.num_frames - 1) // 4 + 1, self.height // s,
                self.width // s)

    @property
    def do_cfg(self) -> bool:
        """Whether the unconditional branch runs (a guidance scale other than 1; either expert's for A14B)."""
        return self.guidance_scale != 1.0 or (self.guidance_scale_2 is not None and self.guidance_scale_2 != 1.0)

    def guidance_at(self, t: float) -> float:
        """The CFG scale at timestep ``t`` (0..1000): the high-noise expert's above the boundary, else the low-noise
        expert's (A14B); ``guidance_scale`` for one DiT."""
        if self.boundary is None or t >= self.boundary * 1000:
            return self.guidance_scale
        return self.guidance_scale_2

    @property
    def tokens(self) -> int:
        """DiT tokens of one sample: ``F' * (H/16) * (W/16)``."""
        _, _, f, h, w = self.latent_shape
        return f * (h // 2) * (w // 2)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return f


def _check_size(height, width, num_frames, steps, multiple: int = 16) -> None:
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v) or v <= 0 or v % multiple:
            why = "" if multiple == 16 else " (the Wan2.2 VAE's 16x compression times the 2x2 patch)"
            raise ValueError(f"{name} must be a positive multiple of {multiple}{why}, got {v!r}")
    if not _is_int(num_frames) or num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1 (1, 5, 9, ..., 81), got {num_frames!r}")
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"num_inference_steps must be an int in 1..{MAX_STEPS} (timesteps live on 0..1000), "
                         f"got {steps!r}")
    max_side = 16 * ROPE_POSITIONS
    for name, v in (("height", height), ("width", width)):
        if v > max_side:
            raise ValueError(f"{name} {v} is beyond what the model can address: at most {max_side} px (its RoPE "
                             f"table has {ROPE_POSITIONS} positions of 16 px)")
    max_frames = 4 * (ROPE_POSITIONS - 1) + 1
    if num_frames > max_frames:
        raise ValueError(f"num_frames {num_frames} is beyond what the model can address: at most {max_frames} "
                         f"frames ({ROPE_POSITIONS} latent frames of 4)")


def _check_embeds(name: str, e, text_dim: int, text_len: int) -> torch.Tensor | None:
    if e is None:
        return None
    if not isinstance(e, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [1, L, {text_dim}], got {type(e).__name__}")
    if e.ndim == 2:
        e = e[None]
    if e.ndim != 3 or e.shape[0] != 1:
        raise ValueError(f"{name} must have shape [1, L, {text_dim}], got {tuple(e.shape)}")
    if e.shape[2] != text_dim:
        raise ValueError(f"{name} has width {e.shape[2]}, but this model's text_dim is {text_dim}")
    if not 1 <= e.shape[1] <= text_len:
        raise ValueError(f"{name} has {e.shape[1]} tokens; the model takes 1..{text_len}")
    if not e.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {e.dtype}")
    if not torch.isfinite(e).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return e


def image_size(preset: Preset, image_hw: tuple[int, int], *, height: int | None = None, width: int | None = None,
               max_area: int | None = None) -> tuple[int, int, int | None]:
    """The output size of an i2v/flf2v generation: ``(height, width, max_area)``.

    Official sizing (``docs/model-reference.md`` §7.2): the output keeps the first image's aspect ratio within
    ``max_area`` pixels (default: the preset's ``height * width``), each side a multiple of 16. Giving both
    ``height`` and ``width`` instead asks for that exact size (the image is squashed to it, as diffusers does).

    Args:
        preset: an i2v/flf2v preset.
        image_hw: ``(H, W)`` of the first image in pixels.
        height, width: an explicit output size (both or neither).
        max_area: the pixel area to fit (``--size 832*480`` of the official CLI is ``max_area=399360``).

    Returns:
        ``(height, width, max_area)`` with ``max_area`` None when an explicit size was given.

    Raises:
        ValueError: only one of height/width, both a size and max_area, a bad max_area, or an aspect ratio
            too extreme for the area.
    """
    from .images import size_from_max_area

    if (height is None) != (width is None):
        raise ValueError("give both height and width (an exact output size) or neither (the size then follows "
                         "the image's aspect ratio within max_area)")
    if height is not None:
        if max_area is not None:
            raise ValueError("give either max_area or height and width, not both")
        return height, width, None
    if max_area is None:
        max_area = preset.max_area
    if not _is_int(max_area) or max_area <= 0:
        raise ValueError(f"max_area must be a positive int (pixels, e.g. 480*832), got {max_area!r}")
    h, w = size_from_max_area(image_hw[0], image_hw[1], max_area)
    return h, w, max_area


def _images(preset: Preset, image, last_image, max_area, height, width):
    """``(first, last, height, width, max_area)``: the images loaded (and the last one fitted), the size."""
    task = preset.task
    if task == "vace":
        if image is not None or last_image is not None:
            raise ValueError(f"preset {preset.name!r} (VACE) takes no image/last_image: give the frames to keep as "
                             "video=... with a mask (first-frames extension), or subject images as "
                             "reference_images=[...]")
        return None, None, height, width, max_area
    if task == "ti2v":
        if last_image is not None:
            raise ValueError(f"preset {preset.name!r} (Wan2.2 TI2V) takes one image (its first frame), not last_image")
        if image is None:
            if max_area is not None:
                raise ValueError("max_area applies when an image is given; for text-to-video give height and width")
            return None, None, height, width, None
        from .images import best_output_size, load_image

        first = load_image(image, name="image")
        if (height is None) != (width is None):
            raise ValueError("give both height and width (the image is scaled to cover that size and centre-cropped) "
                             "or neither (the size then follows the image's aspect ratio within max_area)")
        if height is None:
            if max_area is None:
                max_area = preset.max_area
            if not _is_int(max_area) or max_area <= 0:
                raise ValueError(f"max_area must be a positive int (pixels, e.g. 704*1280), got {max_area!r}")
            height, width = best_output_size(first.shape[1], first.shape[2], max_area,
                                             multiple=preset.size_multiple)
        elif max_area is not None:
            raise ValueError("give either max_area or height and width, not both")
        return first, None, height, width, max_area
    if task == "t2v":
        if image is not None or last_image is not None:
            raise ValueError(f"preset {preset.name!r} is text-to-video and takes no image; load an i2v "
                             "checkpoint (image) or an flf2v one (image and last_image)")
        if max_area is not None:
            raise ValueError("max_area applies to image-to-video; for text-to-video give height and width")
        return None, None, height, width, None
    if image is None:
        raise ValueError(f"preset {preset.name!r} ({task}) needs image=... (a PIL image, an HxWx3 array or a path)")
    if task == "i2v" and last_image is not None:
        raise ValueError(f"preset {preset.name!r} is image-to-video; last_image needs a first-last-frame (flf2v) "
                         "checkpoint")
    if task == "flf2v" and last_image is None:
        raise ValueError(f"preset {preset.name!r} is first-last-frame-to-video and needs last_image=...")
    from .images import load_image, match_last_frame

    first = load_image(image, name="image")
    last = None
    if last_image is not None:
        last = match_last_frame(first, load_image(last_image, name="last_image"))
    height, width, max_area = image_size(preset, tuple(first.shape[1:]), height=height, width=width,
                                         max_area=max_area)
    return first, last, height, width, max_area


MIN_TEACACHE_STEPS = 8


def _experts(preset: Preset, guidance_scale_2, boundary) -> tuple[float | None, float | None]:
    """``(guidance_scale_2, boundary)`` of a Wan2.2 A14B request (the preset's where not given); refused for one
    DiT."""
    if not preset.is_moe:
        given = [n for n, v in (("guidance_scale_2", guidance_scale_2), ("boundary", boundary)) if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} apply to a Wan2.2 A14B model (two experts); preset "
                             f"{preset.name!r} runs one DiT")
        return None, None
    g2 = preset.guidance_scale_2 if guidance_scale_2 is None else _finite("guidance_scale_2", guidance_scale_2)
    b = preset.boundary if boundary is None else _finite("boundary", boundary)
    if not 0.0 <= b <= 1.0:
        raise ValueError(f"boundary must be in [0, 1] (a fraction of the 1000 training timesteps: 0 runs only the "
                         f"high-noise expert, 1 only the low-noise one), got {boundary!r}")
    return float(g2), float(b)


def _vace_inputs(preset: Preset, video, mask, reference_images, conditioning_scale, height, width, num_frames,
                 max_area):
    """The VACE fields of the request (``{}`` for other models) and the size: ``(fields, height, width, num_frames,
    max_area)``. The video and mask are loaded, sized (:func:`wanrt.vace.vace_size` without an explicit size) and
    cropped here, the reference images fitted: nothing later depends on the user's files."""
    given = [n for n, v in (("video", video), ("mask", mask), ("reference_images", reference_images),
                            ("conditioning_scale", conditioning_scale)) if v is not None]
    if preset.task != "vace":
        if given:
            raise ValueError(f"{', '.join(given)}: VACE inputs; preset {preset.name!r} ({preset.task}) takes none "
                             "(load a VACE checkpoint: vace-1.3b, vace-14b)")
        return {}, height, width, num_frames, max_area
    from .images import load_image
    from .vace import MAX_REFERENCE_IMAGES, fit_reference, load_mask, load_video, resize_crop, vace_size

    scale = 1.0 if conditioning_scale is None else _finite("conditioning_scale", conditioning_scale)
    if mask is not None and video is None:
        raise ValueError("mask without video: the mask says which pixels of the video to keep (0) and generate (1); "
                         "give video=... too")
    frames = load_video(video, name="video") if video is not None else None
    m = load_mask(mask, name="mask") if mask is not None else None
    if m is not None and m.shape[0] != frames.shape[0]:
        raise ValueError(f"mask has {m.shape[0]} frames but video has {frames.shape[0]}; give one mask frame per "
                         "video frame")
    if (height is None) != (width is None):
        raise ValueError("give both height and width (the video is resized to cover it and centre-cropped) or "
                         "neither")
    if frames is not None and height is None:
        area = preset.max_area if max_area is None else max_area
        if not _is_int(area) or area <= 0:
            raise ValueError(f"max_area must be a positive int (pixels, e.g. 480*832), got {area!r}")
        height, width = vace_size(tuple(frames.shape[1:3]), area)
        max_area = area
    elif max_area is not None:
        raise ValueError("max_area sizes a VACE generation from its video; without a video (or with height and "
                         "width) leave it out")
    height = preset.height if height is None else height
    width = preset.width if width is None else width
    if frames is not None:
        n = frames.shape[0]
        if num_frames is None:
            num_frames = (n - 1) // 4 * 4 + 1
        elif _is_int(num_frames) and num_frames > n:
            raise ValueError(f"num_frames={num_frames} but the video has {n} frames; give a longer video or fewer "
                             "frames")
    if reference_images is not None and not isinstance(reference_images, (list, tuple)):
        reference_images = [reference_images]
    refs = list(reference_images or [])
    if len(refs) > MAX_REFERENCE_IMAGES:
        raise ValueError(f"{len(refs)} reference images; at most {MAX_REFERENCE_IMAGES} (each is one more latent "
                         "frame in every step)")
    for name, v in (("height", height), ("width", width)):
        if not _is_int(v) or v <= 0 or v % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {v!r}")
    fields = {"conditioning_scale": scale}
    if refs:
        fields["reference_images"] = tuple(fit_reference(load_image(r, name=f"reference_images[{i}]"), height, width)
                                           for i, r in enumerate(refs))
    if frames is not None and _is_int(num_frames) and num_frames >= 1:
        fields["video"] = resize_crop(frames[:num_frames], height, width)
        if m is not None:
            fields["mask"] = resize_crop(m[:num_frames], height, width)
    return fields, height, width, num_frames, max_area


def _loras(loras) -> tuple[tuple[str, float], ...] | None:
    """``{name: strength}`` as a tuple of pairs, checked (names are checked against the Engine's LoRAs later)."""
    if loras is None:
        return None
    if not isinstance(loras, dict):
        raise ValueError(f"loras must be a dict {{name: strength}}, got {type(loras).__name__}")
    out = []
    for name, strength in loras.items():
        if not isinstance(name, str):
            raise ValueError(f"loras: names must be str, got {name!r}")
        out.append((name, _finite(f"loras[{name!r}]", strength)))
    return tuple(out)


def _teacache(preset: Preset, threshold, mode, coefficients, defaults) -> TeaCacheConfig | None:
    from .cache.teacache import TEACACHE_MODES, default_coefficients

    d_threshold, d_mode, d_coefficients = defaults or (None, "e", None)
    if mode is not None and mode not in TEACACHE_MODES:
        raise ValueError(f"teacache_mode must be 'e' or 'e0', got {mode!r}")
    threshold = d_threshold if threshold is UNSET else threshold
    if threshold is not None:
        threshold = _finite("teacache_threshold", threshold)
        if threshold < 0:
            raise ValueError(f"teacache_threshold must be None or >= 0, got {threshold!r}")
    if threshold is None or threshold == 0:
        return None
    mode = mode or d_mode
    coefficients = coefficients or d_coefficients or default_coefficients(preset.name, mode)
    if coefficients is None:
        raise ValueError(
            f"no TeaCache coefficients for preset {preset.name!r} in mode {mode!r}: pass "
            "teacache_coefficients=... (fit them with `wanrt calibrate-teacache`)")
    coefficients = tuple(_finite("teacache_coefficients", c) for c in coefficients)
    return TeaCacheConfig(float(threshold), mode, coefficients)


def resolve_request(
    preset: Preset,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    *,
    image=None,
    last_image=None,
    max_area: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    sample_solver: str | None = None,
    seed: int | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    teacache_threshold: float | None = UNSET,
    teacache_mode: str | None = None,
    teacache_coefficients: tuple[float, ...] | None = None,
    teacache_defaults: tuple | None = None,
    timesteps=None,
    sigmas=None,
    loras: dict[str, float] | None = None,
    video=None,
    mask=None,
    reference_images=None,
    conditioning_scale: float | None = None,
    guidance_scale_2: float | None = None,
    boundary: float | None = None,
) -> Request:
    """Fill the preset's defaults into what was not given and judge everything (pure: no model is touched).

    The arguments are those of :meth:`wanrt.Engine.generate`. Images are loaded and sized here (the official
    i2v sizing, :func:`image_size`); a None seed is drawn at random (reported back through ``Video.seed``).
    ``teacache_defaults`` is the Engine's ``(threshold, mode, coefficients)`` for what the call leaves out.

    Raises:
        ValueError: height/width not positive multiples of 16 or beyond the RoPE table, num_frames not 4k+1 or
            too long, steps outside 1..1000, a non-finite guidance scale / shift / TeaCache threshold, shift <= 0,
            an unknown solver, a seed outside [0, 2**63), bad or mismatched images, FLF2V with fewer than 5
            frames, a missing or doubled prompt, bad embeddings or latents, TeaCache without coefficients or with
            fewer than 8 steps (it has nothing to skip there), a bad custom schedule (both ``timesteps`` and
            ``sigmas``, a length other than ``num_inference_steps``, values out of range or not decreasing), LoRA
            strengths that are not ``{name: finite number}``; for VACE (:func:`_vace_inputs`): VACE inputs to
            another model, a mask without a video or with another frame count, masks outside [0, 1], a video with
            fewer frames than ``num_frames``, more than :data:`~wanrt.vace.MAX_REFERENCE_IMAGES` reference images,
            a non-finite ``conditioning_scale``; Wan2.2: ``guidance_scale_2`` / ``boundary`` (outside [0, 1]) for a
            model of one DiT, a size not a multiple of 32 for the Wan2.2 VAE, ``last_image`` for TI2V.

    Wan2.2 TI2V takes an optional ``image`` (then image-to-video: the output size follows the image within
    ``max_area`` by the official ``best_output_size``, or is the given ``height x width``, the image scaled to cover
    it and centre-cropped). A14B: ``guidance_scale`` is the high-noise expert's CFG scale, ``guidance_scale_2`` the
    low-noise one's, ``boundary`` the switch (a fraction of 1000 timesteps).
    """
    p = preset
    first, last, height, width, max_area = _images(p, image, last_image, max_area, height, width)
    vace, height, width, num_frames, max_area = _vace_inputs(p, video, mask, reference_images, conditioning_scale,
                                                             height, width, num_frames, max_area)
    height = p.height if height is None else height
    width = p.width if width is None else width
    num_frames = p.num_frames if num_frames is None else num_frames
    custom = None
    if timesteps is not None or sigmas is not None:
        from .sampling.schedulers import custom_schedule

        custom = custom_schedule(timesteps=timesteps, sigmas=sigmas)  # checks the values (shift applied later)
        n = len(custom[1])
        if num_inference_steps is not None and num_inference_steps != n:
            raise ValueError(f"num_inference_steps={num_inference_steps} but the custom schedule has {n} steps")
        num_inference_steps = n
    steps = p.num_inference_steps if num_inference_steps is None else num_inference_steps
    _check_size(height, width, num_frames, steps, p.size_multiple)
    if last is not None and num_frames < 5:
        raise ValueError(f"first-last-frame generation needs num_frames >= 5 (4k+1), got {num_frames}")
    guidance_scale = p.guidance_scale if guidance_scale is None else _finite("guidance_scale", guidance_scale)
    guidance_scale_2, boundary = _experts(p, guidance_scale_2, boundary)
    solver = p.sample_solver if sample_solver is None else sample_solver
    if solver not in SOLVER_NAMES:
        raise ValueError(f"sample_solver must be one of {SOLVER_NAMES}, got {solver!r}")
    shift = default_shift(p, height, width, max_area) if shift is None else _finite("shift", shift)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if seed is None:
        seed = random.randint(0, 2**63 - 1)
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")

    if prompt is None and prompt_embeds is None:
        raise ValueError("give a prompt or prompt_embeds")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("give either prompt or prompt_embeds, not both")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("give either negative_prompt or negative_prompt_embeds, not both")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt must be a str, got {type(negative_prompt).__name__}")
    a = p.arch
    prompt_embeds = _check_embeds("prompt_embeds", prompt_embeds, a.text_dim, a.text_len)
    negative_prompt_embeds = _check_embeds("negative_prompt_embeds", negative_prompt_embeds, a.text_dim, a.text_len)
    negative = None
    if (guidance_scale != 1.0 or guidance_scale_2 not in (None, 1.0)) and negative_prompt_embeds is None:
        negative = p.negative_prompt if negative_prompt is None or negative_prompt == "" else negative_prompt
    teacache_2 = None
    if p.is_moe and teacache_coefficients is not None and not isinstance(teacache_coefficients, dict):
        raise ValueError("teacache_coefficients of a Wan2.2 A14B model are one polynomial per expert: "
                         "{'high': [...], 'low': [...]} (what `wanrt calibrate-teacache` writes for it)")
    if isinstance(teacache_coefficients, dict):
        if not p.is_moe or set(teacache_coefficients) != {"high", "low"}:
            raise ValueError("teacache_coefficients as a dict is {'high': [...], 'low': [...]}, for a Wan2.2 A14B "
                             f"model (two experts); got keys {sorted(teacache_coefficients)} for preset {p.name!r}")
        teacache = _teacache(p, teacache_threshold, teacache_mode, teacache_coefficients["high"], teacache_defaults)
        teacache_2 = _teacache(p, teacache_threshold, teacache_mode, teacache_coefficients["low"], teacache_defaults)
    else:
        teacache = _teacache(p, teacache_threshold, teacache_mode, teacache_coefficients, teacache_defaults)
    if teacache is not None and steps < MIN_TEACACHE_STEPS:
        raise ValueError(f"TeaCache needs at least {MIN_TEACACHE_STEPS} steps (below that every step matters and it "
                         f"skips nothing useful); this request has {steps}: leave teacache_threshold unset")
    req = Request(p.name, p.task, prompt, negative, height, width, num_frames, steps, float(guidance_scale),
                  float(shift), solver, seed, first, last, max_area, prompt_embeds, negative_prompt_embeds, None,
                  teacache, None if timesteps is None else tuple(float(t) for t in timesteps),
                  None if sigmas is None else tuple(float(x) for x in sigmas), _loras(loras), **vace,
                  guidance_scale_2=guidance_scale_2, boundary=boundary, latent_channels=p.latent_channels,
                  vae_stride=p.vae_stride[1], teacache_2=teacache_2)
    if latents is not None:
        lat_shape = req.latent_shape
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != lat_shape:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must have shape {lat_shape} for this size and frame count, got {got}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or Inf")
        from dataclasses import replace

        req = replace(req, latents=latents)
    return req


# ---------------------------------------------------------------------------------------------- memory


def estimate_memory(req: Request, preset: Preset, *, dtype_bytes: int = 2, cfg_batch: bool = False,
                    tiled_vae: bool | None = None, sequence_parallel: int = 1) -> int:
    """Bytes a request needs beyond the weights (a coarse upper estimate, documented term by term).

    * latents: the noise, the solver's history (3 copies) and the guided velocity, float32;
    * one DiT forward at the request's token count ``S``: per token the float32 residual and norm outputs
      (``4 * dim`` floats), q/k/v/o and the attention output (``5 * dim``) and the FFN hidden state
      (``ffn_dim``) in the compute dtype, times the batch (2 with batched CFG) and 1.5 for allocator slack;
    * the VAE decode: the widest decoder stage (96 channels at full resolution) over a chunk of 4 frames plus
      the 2 cached ones, about 3 tensors alive, float32 — at the tile's size when tiled (automatically above
      720P), where the blended float32 video ``[3, F, H, W]`` is then held whole;
    * the uint8 frames ``[F, H, W, 3]`` the returned video keeps.

    ``sequence_parallel``: ranks sharing the token sequence (``ulysses * ring``): each holds ``ceil(S / sp)`` tokens
    of the DiT's activations (the Ulysses all-to-all trades tokens for heads, the same bytes).
    """
    return sum(memory_terms(req, preset, dtype_bytes=dtype_bytes, cfg_batch=cfg_batch, tiled_vae=tiled_vae,
                            sequence_parallel=sequence_parallel).values())


def memory_terms(req: Request, preset: Preset, *, dtype_bytes: int = 2, cfg_batch: bool = False,
                 tiled_vae: bool | None = None, sequence_parallel: int = 1) -> dict[str, int]:
    """:func:`estimate_memory` term by term: ``{"latents", "dit", "vae", "frames"}`` in bytes."""
    lat = math.prod(req.latent_shape) * 4 * 5
    dit = _dit_forward_bytes(req, preset, dtype_bytes, sequence_parallel) * (2 if cfg_batch and req.do_cfg else 1)
    h, w = req.height, req.width
    if tiled_vae is None:
        tiled_vae = h * w > 1280 * 720
    frames = req.num_frames * h * w * 3
    vae = 0
    if tiled_vae:
        vae = frames * 4  # the whole blended float32 video
        h, w = min(h, 512), min(w, 512)
    vae += h * w * 96 * 6 * 3 * 4
    return {"latents": lat, "dit": dit, "vae": vae, "frames": frames}


def _dit_forward_bytes(req: Request, preset: Preset, dtype_bytes: int, sequence_parallel: int = 1,
                       ffn: bool = True) -> int:
    """Activations of one sample's DiT forward on one rank (:func:`estimate_memory`'s DiT term, batch 1); without
    ``ffn``, only the FFN hidden state's share (``ffn_dim`` per token)."""
    a = preset.arch
    tokens = -(-req.tokens // max(1, sequence_parallel))
    if not ffn:
        return int(tokens * a.ffn_dim * dtype_bytes * 1.5)
    # VACE: the hint stream (fp32) and one hint beside the main stream (the hints are made one at a time)
    vace = tokens * a.dim * (4 + dtype_bytes) if preset.task == "vace" else 0
    return int((tokens * (4 * a.dim * 4 + (5 * a.dim + a.ffn_dim) * dtype_bytes) + vace) * 1.5)


def cfg_batch_fits(req: Request, preset: Preset, device: torch.device, dtype_bytes: int = 2,
                   sequence_parallel: int = 1) -> bool:
    """Whether a batch-2 DiT forward (both CFG branches at once) fits in the free memory of ``device``: the second
    sample's activations (:func:`estimate_memory`'s DiT term) against ``torch.cuda.mem_get_info``; always True
    off CUDA."""
    if torch.device(device).type != "cuda":
        return True
    return _dit_forward_bytes(req, preset, dtype_bytes, sequence_parallel) < torch.cuda.mem_get_info(device)[0]


def device_capacity(device: torch.device | str) -> int:
    """Total memory of ``device`` in bytes (a CUDA device's memory, else the host's physical memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover (non-POSIX)
        return 1 << 62


def check_fits(req: Request, preset: Preset, device: torch.device | str, **kw) -> int:
    """Refuse a request whose :func:`estimate_memory` exceeds the device's memory, before any weight is read.

    Returns:
        The estimate in bytes.

    Raises:
        RequestTooLarge (a ValueError): with the estimate and the capacity in GiB and what to lower.
    """
    need, cap = estimate_memory(req, preset, **kw), device_capacity(device)
    if need > cap:
        raise RequestTooLarge(
            f"this request ({req.width}x{req.height}, {req.num_frames} frames: {req.tokens} tokens) needs about "
            f"{need / 2**30:.1f} GiB beyond the weights, but {torch.device(device)} has {cap / 2**30:.1f} GiB; "
            "lower the size or the frame count", need, cap)
    return need


# ---------------------------------------------------------------------------------------------- output path


def check_output_path(path: str | os.PathLike) -> Path:
    """Judge where a video will be written, before any work: the extension is one we write (``.mp4``, or for a
    one-frame generation ``.png`` / ``.jpg`` / ``.jpeg`` / ``.webp``), the path is not a directory, and its
    directory exists (or can be created) and is writable.

    Returns:
        The path (``~`` expanded). The directory is created when missing.

    Raises:
        ValueError: another extension, or the path is a directory. PermissionError: the directory is not
            writable (or cannot be created), with the directory named.
    """
    p = Path(path).expanduser()
    from .video import IMAGE_SUFFIXES

    if p.suffix.lower() not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        raise ValueError(f"the output must end in {', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)} (an image for "
                         f"num_frames=1), got {str(path)!r}")
    if p.is_dir():
        raise ValueError(f"the output {str(p)!r} is a directory; give a file path such as {str(p / 'video.mp4')!r}")
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"cannot create the output directory {str(parent)!r}: {e.strerror or e}") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"the output directory {str(parent)!r} is not writable")
    return p
