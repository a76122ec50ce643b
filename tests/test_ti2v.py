"""Wan2.2 TI2V (one 5B-shaped DiT over the Wan2.2 VAE's 48 channels): text-to-video and image-to-video (the first
latent frame is the image's, its tokens at timestep 0) against a loop built here from diffusers' own modules (its
UniPC scheduler, ``WanTransformer3DModel`` with per-token timesteps, ``AutoencoderKLWan`` in the Wan2.2 config),
both layouts, the preset, the sizing, the CLI."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import wanrt
from wanrt.presets import get_preset
from wanrt.request import resolve_request

PRESET = get_preset("tiny-ti2v")
KW = dict(device="cpu", precision="fp32", backend="eager")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def ti2v_ckpts(tmp_path_factory):
    from wanrt.checkpoints.tiny import write_checkpoint

    root = tmp_path_factory.mktemp("ti2v")
    return (write_checkpoint(root / "official", layout="official", preset="tiny-ti2v", seed=8),
            write_checkpoint(root / "diffusers", layout="diffusers", preset="tiny-ti2v", seed=8))


def _image(h: int = 80, w: int = 120) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1).astype(np.uint8)
    img[20:50, 30:70] = (240, 30, 30)
    return img


def _pad(e):
    return torch.cat([e, e.new_zeros(1, 512 - e.shape[1], e.shape[2])], dim=1)


def _unipc(shift: float, steps: int):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2,
                                              prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=shift, solver_type="bh2", predict_x0=True,
                                              lower_order_final=True, final_sigmas_type="zero")
    s.set_timesteps(sigmas=np.linspace(float(np.float32(1 - 1 / 1000)), 0.0, steps + 1)[:-1])
    s.set_begin_index(0)
    return s


@torch.no_grad()
@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_generation_matches_a_loop_of_diffusers_modules(ti2v_ckpts, mode):
    diffusers = pytest.importorskip("diffusers")
    from PIL import Image

    _, dif = ti2v_ckpts
    engine = wanrt.Engine("tiny-ti2v", dif, **KW)
    dit = diffusers.WanTransformer3DModel.from_pretrained(dif / "transformer").float().eval()
    vae = diffusers.AutoencoderKLWan.from_pretrained(dif / "vae").float().eval()
    h, w, frames, steps, shift, g = 64, 96, 9, 6, 5.0, 5.0
    gen = torch.Generator().manual_seed(0)
    d = engine.transformer.config.text_dim
    cond, uncond = torch.randn(1, 7, d, generator=gen), torch.randn(1, 11, d, generator=gen)
    noise = torch.randn(1, 48, 3, h // 16, w // 16, generator=gen)
    image = _image() if mode == "i2v" else None
    ours = engine.generate(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=h, width=w,
                           num_frames=frames, num_inference_steps=steps, guidance_scale=g, shift=shift,
                           image=image, progress=False)

    mean = torch.tensor(vae.config.latents_mean).view(1, 48, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 48, 1, 1, 1)
    x = noise.clone()
    mask = torch.ones_like(x)
    if image is not None:  # official textimage2video.py: Lanczos to cover, centre crop, encode, first frame fixed
        pil = Image.fromarray(image)
        scale = max(w / pil.width, h / pil.height)
        pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.LANCZOS)
        x1, y1 = (pil.width - w) // 2, (pil.height - h) // 2
        pil = pil.crop((x1, y1, x1 + w, y1 + h))
        img = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255 * 2 - 1
        z = (vae.encode(img[None, :, None]).latent_dist.mode() - mean) / std
        mask[:, :, 0] = 0
        x = (1 - mask) * z + mask * x
    sched = _unipc(shift, steps)
    for t in sched.timesteps:
        ts = (mask[0, 0, :, ::2, ::2] * t).flatten()[None]  # [1, L]: the fixed frame's tokens at 0
        v_c = dit(x, ts, _pad(cond), return_dict=False)[0]
        v_u = dit(x, ts, _pad(uncond), return_dict=False)[0]
        x = sched.step(v_u + g * (v_c - v_u), t, x, return_dict=False)[0]
        if image is not None:
            x = (1 - mask) * z + mask * x
    assert _rel(ours.latents, x) < 1e-5
    decoded = vae.decode(x * std + mean, return_dict=False)[0].clamp(-1, 1)
    ref = ((decoded[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert ours.frames.shape == (frames, h, w, 3) and ours.fps == 24
    assert np.abs(ours.frames.astype(int) - ref.astype(int)).max() <= 1


@torch.no_grad()
def test_both_layouts_the_same_video_and_from_pretrained(ti2v_ckpts):
    off, dif = ti2v_ckpts
    kw = dict(seed=3, num_inference_steps=2, image=_image(), progress=False)
    a = wanrt.Engine("tiny-ti2v", off, **KW).generate("a red square", **kw)
    e = wanrt.Engine.from_pretrained(dif, **KW)
    assert e.preset.name == "tiny-ti2v" and e.vae.config.z_dim == 48
    b = e.generate("a red square", **kw)
    assert a.latents.shape == (1, 48, 3, 4, 6)
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-5)


def test_diffusers_loads_the_written_diffusers_layout(ti2v_ckpts):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.WanPipeline.from_pretrained(str(ti2v_ckpts[1]), dtype=torch.float32)
    assert pipe.config.expand_timesteps and pipe.vae.config.z_dim == 48 and pipe.transformer.config.in_channels == 48


def test_preset_sizes_and_request():
    p = get_preset("ti2v-5b")
    assert (p.height, p.width, p.num_frames, p.fps, p.num_inference_steps, p.guidance_scale, p.shift) == \
        (704, 1280, 121, 24, 50, 5.0, 5.0)
    assert (p.arch.dim, p.arch.num_layers, p.arch.num_heads, p.arch.ffn_dim, p.arch.in_dim) == (3072, 30, 24, 14336, 48)
    req = resolve_request(p, "a cat", seed=0)
    assert req.latent_shape == (1, 48, 31, 44, 80) and req.tokens == 31 * 22 * 40 and req.image is None
    # an image: the official best_output_size within the preset's area, multiples of 32
    req = resolve_request(p, "a cat", seed=0, image=np.zeros((1080, 1920, 3), np.uint8))
    assert (req.height, req.width) == (704, 1248)  # the official rule keeps 16:9 closer at 1248 than 1280
    req = resolve_request(p, "a cat", seed=0, image=np.zeros((1000, 1000, 3), np.uint8))
    assert req.height % 32 == 0 and req.width % 32 == 0 and req.height * req.width <= 704 * 1280
    assert abs(req.height / req.width - 1) < 0.1
    with pytest.raises(ValueError, match="multiple of 32"):
        resolve_request(p, "a cat", seed=0, height=720, width=1280)
    with pytest.raises(ValueError, match="not last_image"):
        resolve_request(p, "a cat", seed=0, image=_image(), last_image=_image())
    with pytest.raises(ValueError, match="max_area applies when an image is given"):
        resolve_request(p, "a cat", seed=0, max_area=704 * 1280)


def test_best_output_size_is_the_official_rule():
    from wanrt.images import best_output_size

    def official(w, h, dw, dh, area):  # wan/utils/utils.py, written out
        ratio = w / h
        ow = (area * ratio) ** 0.5
        oh = area / ow
        ow1 = int(ow // dw * dw)
        oh1 = int(area / ow1 // dh * dh)
        oh2 = int(oh // dh * dh)
        ow2 = int(area / oh2 // dw * dw)
        r1, r2 = ow1 / oh1, ow2 / oh2
        return (ow1, oh1) if max(ratio / r1, r1 / ratio) < max(ratio / r2, r2 / ratio) else (ow2, oh2)

    for ih, iw in ((1080, 1920), (1920, 1080), (1000, 1000), (480, 832), (333, 1000), (768, 512)):
        for area in (704 * 1280, 480 * 832):
            ow, oh = official(iw, ih, 32, 32, area)
            assert best_output_size(ih, iw, area) == (oh, ow)
    with pytest.raises(ValueError, match="too small"):
        best_output_size(100, 100, 500)


@torch.no_grad()
def test_the_image_frame_is_kept_and_cached(ti2v_ckpts):
    e = wanrt.Engine("tiny-ti2v", ti2v_ckpts[0], **KW)
    img = _image()
    v = e.generate("a cat", seed=1, num_inference_steps=3, image=img, progress=False)
    z = e._first_frames[1]
    assert torch.equal(v.latents[:, :, :1], z.cpu())  # the first latent frame is exactly the image's
    again = e.generate("a cat", seed=1, num_inference_steps=3, image=img, progress=False)
    assert "vae_encode" not in again.timings and torch.equal(again.latents, v.latents)
    t2v = e.generate("a cat", seed=1, num_inference_steps=3, progress=False)
    assert not torch.equal(t2v.latents[:, :, :1], z.cpu())


def test_cli_text_and_image_to_video(ti2v_ckpts, tmp_path):
    from PIL import Image

    from wanrt.cli import main

    img = tmp_path / "in.png"
    Image.fromarray(_image()).save(img)
    for extra, name in (([], "t.mp4"), (["--image", str(img)], "i.mp4")):
        out = tmp_path / name
        rc = main(["generate", "--model", "tiny-ti2v", "--checkpoint-dir", str(ti2v_ckpts[0]), "--prompt", "a cat",
                   "--steps", "2", "--device", "cpu", "--precision", "fp32", "-o", str(out), "--no-progress", *extra])
        assert rc == 0 and out.is_file()
