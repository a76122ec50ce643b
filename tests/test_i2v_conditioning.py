"""Image conditioning when the images are not at the output size: parity of a whole i2v/flf2v generation with a
loop of diffusers/transformers modules whose conditioning is written here, independently of ``wanrt.images``.

``test_i2v.py``'s parity test feeds an image already at the output size, so the sizing, the bicubic resize to the
video size and the FLF2V last-frame fit never run there. Here the first image has another size and aspect ratio
than the video, and the FLF2V last frame a third size, so each of those steps has to be right:

* the output size: the official formula (``image2video.py``): ``lat = sqrt(max_area * aspect) // 8 // 2 * 2``
  for the height, with ``1 / aspect`` for the width, in float64;
* CLIP sees each image at its own resolution, squash-resized to 224 (bicubic, no antialias);
* the VAE sees the first (and last) frame bicubic-resized to the video size (``align_corners=False``, no
  antialias, no clamp), zeros between;
* the FLF2V last frame is first scaled (bicubic, antialiased) to cover the first frame and center-cropped to it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_i2v import _embeds, _image, _reference_clip, _reference_loop, _to_tensor

import wanrt
from wanrt.testing import Tolerance, assert_close

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


TIGHT = Tolerance(atol=1e-5, rtol=1e-5, rel=1e-5)


def _textured(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth image plus per-pixel noise, so that the choice of resampling filter and crop window shows."""
    noise = np.random.default_rng(seed).integers(-40, 41, size=(h, w, 3))
    return np.clip(_image(h, w, seed).astype(int) + noise, 0, 255).astype(np.uint8)


def _official_size(h: int, w: int, max_area: int) -> tuple[int, int]:
    aspect = h / w
    lat_h = round(np.sqrt(max_area * aspect) // 8 // 2 * 2)
    lat_w = round(np.sqrt(max_area / aspect) // 8 // 2 * 2)
    return int(lat_h) * 8, int(lat_w) * 8


def _cover_and_crop(last: torch.Tensor, h1: int, w1: int) -> torch.Tensor:
    """The last frame scaled (keeping its aspect) to cover h1 x w1, then center-cropped to it."""
    h2, w2 = last.shape[1:]
    s = max(h1 / h2, w1 / w2)
    h, w = max(h1, int(math.floor(h2 * s + 0.5))), max(w1, int(math.floor(w2 * s + 0.5)))
    big = F.interpolate(last[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = (h - h1) // 2, (w - w1) // 2
    return big[:, top:top + h1, left:left + w1].clamp(-1, 1)


@torch.no_grad()
def _reference(ckpt, first: np.ndarray, last: np.ndarray | None, size, noise, cond, uncond, steps, shift, g):
    dit = diffusers.WanTransformer3DModel.from_pretrained(ckpt / "transformer").float().eval()
    vae = diffusers.AutoencoderKLWan.from_pretrained(ckpt / "vae").float().eval()
    clip = transformers.CLIPVisionModel.from_pretrained(ckpt / "image_encoder").float().eval()
    f = _to_tensor(first)
    frames = [f] + ([_cover_and_crop(_to_tensor(last), *f.shape[1:])] if last is not None else [])
    image_embeds = _reference_clip(clip, frames)  # each image at its own resolution
    h, w = size
    num_frames = 1 + 4 * (noise.shape[2] - 1)
    video = torch.zeros(1, 3, num_frames, h, w)
    video[:, :, 0] = F.interpolate(frames[0][None], size=(h, w), mode="bicubic", align_corners=False)[0]
    if last is not None:
        video[:, :, -1] = F.interpolate(frames[1][None], size=(h, w), mode="bicubic", align_corners=False)[0]
    x, out, condition = _reference_loop(dit, vae, video, last is not None, image_embeds, noise, cond, uncond,
                                        steps, shift, g)
    return x, out, condition, image_embeds


@pytest.mark.parametrize("task", ["i2v", "flf2v"])
def test_generation_with_images_of_other_sizes_matches_diffusers_modules(task, tiny_i2v_diffusers,
                                                                         tiny_flf2v_diffusers):
    ckpt = tiny_i2v_diffusers if task == "i2v" else tiny_flf2v_diffusers
    engine = wanrt.Engine.from_pretrained(ckpt, device="cpu", precision="fp32", backend="eager")
    first = _textured(100, 70, 1)  # portrait; the tiny presets' default area is 96*64
    last = _textured(50, 90, 2) if task == "flf2v" else None  # landscape: a third size
    size = _official_size(100, 70, 96 * 64)
    assert size == (80, 64)  # another shape than the image, and than the preset's 64x96
    cond, uncond = _embeds(engine)
    noise = torch.randn(1, 16, 2, size[0] // 8, size[1] // 8, generator=torch.Generator().manual_seed(5))
    steps, shift, g = 2, 5.0, 5.0
    seen = {}
    prepare = engine.transformer.prepare

    def spy(x, t, context, *, y=None, clip_fea=None):
        seen.setdefault("y", y.clone())
        seen.setdefault("clip_fea", clip_fea.clone())
        return prepare(x, t, context, y=y, clip_fea=clip_fea)

    engine.transformer.prepare = spy
    ours = engine.generate(prompt_embeds=cond, negative_prompt_embeds=uncond, image=first, last_image=last,
                           latents=noise, guidance_scale=g, shift=shift, sample_solver="euler", num_frames=5,
                           num_inference_steps=steps, progress=False)
    ref_x, ref_video, ref_y, ref_clip = _reference(ckpt, first, last, size, noise, cond, uncond, steps, shift, g)
    assert ours.frames.shape == (5, *size, 3)
    # the conditioning the DiT received: mask + VAE latents of the resized frames, and the CLIP features
    assert seen["y"].shape == ref_y.shape == (1, 20, 2, size[0] // 8, size[1] // 8)
    assert torch.equal(seen["y"][:, :4], ref_y[:, :4])
    assert_close(seen["y"][:, 4:], ref_y[:, 4:], name=f"{task} conditioning latents", tol=TIGHT)
    assert_close(seen["clip_fea"], ref_clip.reshape(1, -1, ref_clip.shape[-1]), name=f"{task} CLIP features",
                 tol=TIGHT)
    rel = ((ours.latents.double() - ref_x.double()).norm() / ref_x.double().norm()).item()
    assert rel < 1e-5, rel
    ref_frames = ((ref_video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(ours.frames.astype(int) - ref_frames.astype(int)).max() <= 1
