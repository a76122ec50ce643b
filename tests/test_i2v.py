"""Image-to-video and first-last-frame-to-video through the Engine (docs/model-reference.md §7).

The parity tests run a whole short generation against a loop built here from diffusers' and transformers'
modules (WanTransformer3DModel, AutoencoderKLWan, CLIPVisionModel) on the same tiny random checkpoint in the
diffusers layout, in float32, with the same noise and text embeddings. The conditioning of the reference
(mask, conditioning video, CLIP preprocessing) is written in this file from the reference document and
diffusers' pipeline, independently of wanrt.images.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cuda_graphs import FakeCapturer

import wanrt
from wanrt.request import image_size
from wanrt.presets import AREA_480P, default_shift, get_preset, preset_for_arch, resolution_hint
from wanrt.sampling.loop import make_step_graphs
from wanrt.testing import Tolerance, assert_close

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
FP32_LOOP = Tolerance(atol=1e-4, rtol=1e-4, rel=2e-5)
SMALL = dict(num_frames=9, num_inference_steps=3, progress=False)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random RGB uint8 image (so that resizing it is meaningful)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, 4, 6, generator=g)
    big = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
    return (big.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255 * 2 - 1  # [3, H, W] in [-1, 1]


def _euler_sigmas(n: int, shift: float) -> np.ndarray:
    sigma = np.linspace(0.999, 0.0, n + 1)[:-1]
    sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return np.append(sigma, 0.0)


def _reference_clip(encoder, frames: list[torch.Tensor]) -> torch.Tensor:
    """Official preprocessing: squash to 224 (bicubic), [-1,1] -> [0,1], CLIP mean/std; penultimate layer."""
    px = torch.cat([F.interpolate(f[None], size=(224, 224), mode="bicubic", align_corners=False) for f in frames])
    px = (px * 0.5 + 0.5 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return encoder(pixel_values=px, output_hidden_states=True).hidden_states[-2]  # [n, 257, d]


def _reference_mask(num_frames: int, lat_h: int, lat_w: int, last: bool) -> torch.Tensor:
    """diffusers WanImageToVideoPipeline.prepare_latents' mask, for any 4k+1 frame count."""
    m = torch.ones(1, 1, num_frames, lat_h, lat_w)
    m[:, :, 1:num_frames - 1 if last else num_frames] = 0
    first = torch.repeat_interleave(m[:, :, 0:1], 4, dim=2)
    m = torch.cat([first, m[:, :, 1:]], dim=2)
    return m.view(1, -1, 4, lat_h, lat_w).transpose(1, 2)  # [1, 4, T', lat_h, lat_w]


@torch.no_grad()
def _reference_video(ckpt, first: np.ndarray, last: np.ndarray | None, noise, cond, uncond, steps, shift, g):
    """The whole generation from diffusers/transformers modules: conditioning, Euler loop with CFG, decode."""
    dit = diffusers.WanTransformer3DModel.from_pretrained(ckpt / "transformer").float().eval()
    vae = diffusers.AutoencoderKLWan.from_pretrained(ckpt / "vae").float().eval()
    clip = transformers.CLIPVisionModel.from_pretrained(ckpt / "image_encoder").float().eval()
    num_frames = 1 + 4 * (noise.shape[2] - 1)
    lat_h, lat_w = noise.shape[3:]
    frames = [_to_tensor(first)] + ([_to_tensor(last)] if last is not None else [])
    image_embeds = _reference_clip(clip, frames)  # [n, 257, d]: diffusers takes the images as samples
    h, w = frames[0].shape[1:]
    video = torch.zeros(1, 3, num_frames, h, w)
    video[:, :, 0] = frames[0]
    if last is not None:
        video[:, :, -1] = frames[1]
    x, out, _ = _reference_loop(dit, vae, video, last is not None, image_embeds, noise, cond, uncond, steps, shift, g)
    return x, out


def _reference_loop(dit, vae, video, last: bool, image_embeds, noise, cond, uncond, steps, shift, g):
    """From the conditioning video on: its VAE latents with the mask, the Euler loop with CFG, the decode.
    Returns ``(latents, decoded video in [-1, 1], conditioning y)``."""
    num_frames, lat_h, lat_w = video.shape[2], noise.shape[3], noise.shape[4]
    mu = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    condition = torch.cat([_reference_mask(num_frames, lat_h, lat_w, last), (mu - mean) * inv_std], 1)

    def pad(e):
        return torch.cat([e, e.new_zeros(1, 512 - e.shape[1], e.shape[2])], dim=1)

    sig = _euler_sigmas(steps, shift)
    x = noise.clone()
    for i in range(steps):
        t = torch.tensor([int(sig[i] * 1000)])
        inp = torch.cat([x, condition], dim=1)
        v_c = dit(inp, t, pad(cond), encoder_hidden_states_image=image_embeds, return_dict=False)[0]
        v_u = dit(inp, t, pad(uncond), encoder_hidden_states_image=image_embeds, return_dict=False)[0]
        x = x + (sig[i + 1] - sig[i]) * (v_u + g * (v_c - v_u))
    return x, vae.decode(x / inv_std + mean, return_dict=False)[0].clamp(-1, 1), condition


def _embeds(engine, seed=0):
    d = engine.transformer.config.text_dim
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 7, d, generator=gen), torch.randn(1, 11, d, generator=gen)


@pytest.fixture(scope="module")
def i2v(tiny_i2v_diffusers):
    return wanrt.Engine.from_pretrained(tiny_i2v_diffusers, device="cpu", precision="fp32", backend="eager")


@pytest.fixture(scope="module")
def flf2v(tiny_flf2v_diffusers):
    return wanrt.Engine.from_pretrained(tiny_flf2v_diffusers, device="cpu", precision="fp32", backend="eager")


# ----------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("task", ["i2v", "flf2v"])
def test_generation_matches_a_loop_of_diffusers_modules(task, i2v, flf2v, tiny_i2v_diffusers, tiny_flf2v_diffusers):
    engine, ckpt = (i2v, tiny_i2v_diffusers) if task == "i2v" else (flf2v, tiny_flf2v_diffusers)
    assert engine.preset.name == f"tiny-{task}"
    first = _image(64, 96, 1)
    last = _image(64, 96, 2) if task == "flf2v" else None
    cond, uncond = _embeds(engine)
    noise = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(5))
    steps, shift, g = 3, 5.0, 5.0
    ours = engine.generate(prompt_embeds=cond, negative_prompt_embeds=uncond, image=first, last_image=last,
                           latents=noise, guidance_scale=g, shift=shift, sample_solver="euler", **SMALL)
    ref_x, ref_video = _reference_video(ckpt, first, last, noise, cond, uncond, steps, shift, g)
    assert ours.frames.shape == (9, 64, 96, 3)
    assert _rel(ours.latents, ref_x) < 1e-5, _rel(ours.latents, ref_x)
    ref_frames = ((ref_video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(ours.frames.astype(int) - ref_frames.astype(int)).max() <= 1


def test_official_and_diffusers_layouts_give_the_same_video(tiny_i2v_official, i2v):
    official = wanrt.Engine("tiny-i2v", tiny_i2v_official, device="cpu", precision="fp32", backend="eager")
    assert official.preset.name == "tiny-i2v" and official.image_encoder is not None
    img = _image(64, 96, 3)
    a = official.generate("a corgi", image=img, seed=4, **SMALL)
    b = i2v.generate("a corgi", image=img, seed=4, **SMALL)
    # the official CLIP file is fp16, the diffusers one holds the same values in fp32
    assert_close(a.latents, b.latents, name="official vs diffusers layout latents", tol=FP32_LOOP)


# ------------------------------------------------------------------------------------ conditioning


def test_conditioning_is_mask_plus_vae_latents_and_clip_features(flf2v):
    from wanrt.images import conditioning_video, resize_bicubic

    first, last = _to_tensor(_image(40, 60, 1)), _to_tensor(_image(40, 60, 2))
    timings = {}
    cond, state = flf2v.image(first, last, 32, 48, 9, timings)
    assert set(timings) == {"image_encoder", "vae_encode"} and state in ("computed", "cached")
    y, clip = cond["y"], cond["clip_fea"]
    assert y.shape == (1, 20, 3, 4, 6) and y.dtype == torch.float32
    video = conditioning_video(resize_bicubic(first, 32, 48), resize_bicubic(last, 32, 48), 9)
    assert_close(y[:, 4:], flf2v.vae.encode(video), name="conditioning latents", tol=FP32_LOOP)
    assert torch.equal(y[:, :4], _reference_mask(9, 4, 6, last=True))
    assert clip.shape == (1, 514, 160)
    ref = flf2v.image_encoder.encode([first, last]).reshape(1, 514, 160)
    assert torch.equal(clip, ref)


def test_cfg_branches_share_the_image_conditioning(tiny_i2v_official, monkeypatch):
    """Batched CFG (one batch-2 forward whose two samples get the same y and CLIP features) equals two passes."""
    img = _image(64, 96, 3)
    base = dict(device="cpu", precision="fp32", backend="sdpa")
    ref = wanrt.Engine("tiny-i2v", tiny_i2v_official, cfg_batch=False, **base).generate("a", image=img, seed=1,
                                                                                          **SMALL)
    e = wanrt.Engine("tiny-i2v", tiny_i2v_official, cfg_batch=True, **base)
    seen = []
    orig = e.transformer.prepare

    def prepare(x, t, context, **kw):
        seen.append((x.shape[0], kw["y"], kw["clip_fea"]))
        return orig(x, t, context, **kw)

    monkeypatch.setattr(e.transformer, "prepare", prepare)
    v = e.generate("a", image=img, seed=1, **SMALL)
    assert v.stats["cfg_batched"] is True and [b for b, _, _ in seen] == [2] * 3
    for _, y, clip in seen:
        assert torch.equal(y[0], y[1]) and torch.equal(clip[0], clip[1])
    assert_close(v.latents, ref.latents, name="batched CFG i2v latents", tol=FP32_LOOP)


def test_graph_replay_and_teacache_with_image_inputs(tiny_i2v_official):
    img = _image(64, 96, 3)
    base = dict(device="cpu", precision="fp32", backend="sdpa")
    ref = wanrt.Engine("tiny-i2v", tiny_i2v_official, **base).generate("a", image=img, seed=1, **SMALL)
    e = wanrt.Engine("tiny-i2v", tiny_i2v_official, cfg_batch=True, **base)
    cap = FakeCapturer(warmup=1)  # records the DiT forward's ops; a replay re-executes them and no Python
    e._graphs = make_step_graphs(e.transformer, capturer=cap)
    e.warmup(num_frames=SMALL["num_frames"])  # the preset's 64x96, the size of img: same y and CLIP shapes
    assert cap.captures == 1 and e._graphs.plain.fallback_reasons == {}
    warm = dict(e._graphs.plain.stats)
    v = e.generate("a", image=img, seed=1, **SMALL)
    plain = v.stats["cuda_graphs"]["plain"]
    assert plain["captures"] == warm["captures"] == 1 and cap.captures == 1  # no new capture at the warm-up size
    assert plain["replays"] - warm["replays"] == SMALL["num_inference_steps"] > 0  # one batch-2 forward a step
    assert plain["fallbacks"] == 0 and plain["eager_calls"] == 0
    assert_close(v.latents, ref.latents, name="graph replay i2v latents", tol=FP32_LOOP)
    tc = e.generate("a", image=img, seed=1, teacache_threshold=0.25, teacache_coefficients=(0, 0, 0, 0.1, 0),
                    **dict(SMALL, num_inference_steps=8))
    assert tc.stats["teacache"]["cond"]["skipped"] >= 1 and torch.isfinite(tc.latents).all()


def test_image_conditioning_cache(tiny_i2v_official, monkeypatch):
    e = wanrt.Engine("tiny-i2v", tiny_i2v_official, device="cpu", precision="fp32", backend="sdpa")
    img = _image(64, 96, 3)
    a = e.generate("a", image=img, seed=1, **SMALL)
    assert a.stats["image_conditioning"] == "computed" and "vae_encode" in a.timings
    monkeypatch.setattr(e.image_encoder, "encode", lambda *a, **k: pytest.fail("CLIP ran for a cached image"))
    b = e.generate("another prompt", image=img.copy(), seed=2, **SMALL)
    assert b.stats["image_conditioning"] == "cached" and "vae_encode" not in b.timings
    c = e.generate("a", image=img, seed=1, **SMALL)
    assert torch.equal(a.latents, c.latents)
    monkeypatch.undo()
    d = e.generate("a", image=_image(64, 96, 4), seed=1, **SMALL)
    assert d.stats["image_conditioning"] == "computed"
    assert len(e.image.cache) == 2
    off = wanrt.Engine("tiny-i2v", tiny_i2v_official, device="cpu", precision="fp32", image_cache_size=0)
    for _ in range(2):
        assert off.generate("a", image=img, seed=1, **SMALL).stats["image_conditioning"] == "computed"
    assert len(off.image.cache) == 0
    with pytest.raises(ValueError, match="image_cache_size"):
        wanrt.Engine("tiny-i2v", tiny_i2v_official, device="cpu", image_cache_size=-1)
    with pytest.raises(ValueError, match="image_encoder_precision"):
        wanrt.Engine("tiny-i2v", tiny_i2v_official, device="cpu", image_encoder_precision="fp8")


# ------------------------------------------------------------------------------------------ sizing


def test_size_follows_the_image_within_max_area(i2v):
    v = i2v.generate("a", image=_image(120, 90, 1), seed=0, **dict(SMALL, num_inference_steps=1))
    h, w, _ = image_size(i2v.preset, (120, 90))
    assert (h, w) == (80, 64)  # portrait 4:3 within the default 64*96 area: lat 10x8
    assert v.frames.shape == (9, h, w, 3)
    v = i2v.generate("a", image=_image(120, 90, 1), max_area=48 * 64, seed=0,
                     **dict(SMALL, num_inference_steps=1))
    assert v.frames.shape[1:3] == (64, 48)
    v = i2v.generate("a", image=_image(120, 90, 1), height=32, width=48, seed=0,
                     **dict(SMALL, num_inference_steps=1))
    assert v.frames.shape[1:3] == (32, 48)  # an explicit size squashes the image to it


def test_official_sizes_and_shift_defaults():
    p = get_preset("i2v-14b-720p")
    assert image_size(p, (720, 1280)) == (720, 1280, 720 * 1280)
    assert image_size(get_preset("i2v-14b-480p"), (1080, 1920)) == (464, 832, AREA_480P)
    assert default_shift(get_preset("i2v-14b-480p"), 464, 832, AREA_480P) == 3.0
    assert default_shift(p, 720, 1280, 720 * 1280) == 5.0
    assert default_shift(get_preset("flf2v-14b-720p"), 720, 1280, 720 * 1280) == 16.0
    assert get_preset("flf2v-14b").name == "flf2v-14b-720p"
    assert get_preset("i2v-14b-480p").num_inference_steps == 40 and p.max_area == 720 * 1280
    assert get_preset("i2v-14b-480p").negative_prompt.startswith("镜头晃动，")
    assert get_preset("flf2v-14b-720p").negative_prompt.startswith("镜头切换，镜头晃动，")
    assert get_preset("t2v-14b").max_area is None
    with pytest.raises(ValueError, match="both height and width"):
        image_size(p, (720, 1280), height=480)
    with pytest.raises(ValueError, match="either max_area or height"):
        image_size(p, (720, 1280), height=480, width=832, max_area=AREA_480P)
    with pytest.raises(ValueError, match="max_area"):
        image_size(p, (720, 1280), max_area=-5)


def test_telling_480p_from_720p(tmp_path, caplog):
    from wanrt.presets import checkpoint_names as _checkpoint_names

    arch = dict(model_type="i2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36)
    assert preset_for_arch(arch).name == "i2v-14b-480p"
    assert preset_for_arch(arch, "720p").name == "i2v-14b-720p"
    assert preset_for_arch(arch, "480p").name == "i2v-14b-480p"
    assert resolution_hint(["Wan2.1-I2V-14B-720P"]) == "720p"
    assert resolution_hint(["wan/i2v_480p_diffusers"]) == "480p"
    assert resolution_hint(["Wan2.1-I2V-14B-480P", "Wan-AI/Wan2.1-I2V-14B-720P"]) is None  # they disagree
    assert resolution_hint(["checkpoint", "1720p", "720px"]) is None
    ckpt = tmp_path / "my-i2v"
    (ckpt / "transformer").mkdir(parents=True)
    (ckpt / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    (ckpt / "transformer" / "config.json").write_text(
        json.dumps({"_name_or_path": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"}))
    assert resolution_hint(_checkpoint_names(ckpt)) == "720p"


def test_engine_reads_the_resolution_from_the_name(tiny_i2v_official, tmp_path, caplog):
    import shutil

    named = tmp_path / "Wan2.1-I2V-tiny-720P"
    shutil.copytree(tiny_i2v_official, named)
    with caplog.at_level(logging.WARNING, logger="wanrt"):
        e = wanrt.Engine("tiny-i2v", named, device="cpu", precision="fp32")
    assert e.preset.name == "tiny-i2v"  # the named preset wins; only 14B has two resolutions
    assert e.image_encoder.dtype == torch.float32


# ----------------------------------------------------------------------------------------- errors


def test_task_and_image_errors(i2v, flf2v, tiny_engine):
    img = _image(64, 96, 1)
    with pytest.raises(ValueError, match="text-to-video and takes no image"):
        tiny_engine.generate("a", image=img, **SMALL)
    with pytest.raises(ValueError, match="max_area applies to image-to-video"):
        tiny_engine.generate("a", max_area=4096, **SMALL)
    with pytest.raises(ValueError, match="needs image="):
        i2v.generate("a", **SMALL)
    with pytest.raises(ValueError, match="last_image needs a first-last-frame"):
        i2v.generate("a", image=img, last_image=img, **SMALL)
    with pytest.raises(ValueError, match="needs last_image"):
        flf2v.generate("a", image=img, **SMALL)
    with pytest.raises(ValueError, match="num_frames >= 5"):
        flf2v.generate("a", image=img, last_image=img, **dict(SMALL, num_frames=1))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        i2v.generate("a", image="nope.png", **SMALL)
    with pytest.raises(TypeError):
        i2v.generate("a", image=torch.zeros(3, 64, 96), **SMALL)
    with pytest.raises(ValueError, match="too small"):
        i2v.generate("a", image=np.zeros((8, 8, 3), np.uint8), **SMALL)
    with pytest.raises(ValueError, match="last_image"):
        flf2v.generate("a", image=img, last_image=np.zeros((4, 4, 3), np.uint8), **SMALL)


def test_flf2v_with_a_last_frame_of_another_size(flf2v):
    v = flf2v.generate("a", image=_image(64, 96, 1), last_image=_image(90, 90, 2), seed=0,
                       **dict(SMALL, num_inference_steps=1, num_frames=5))
    assert v.frames.shape == (5, 64, 96, 3)


def test_i2v_single_frame_and_longer_videos(i2v):
    v = i2v.generate("a", image=_image(64, 96, 1), seed=0, **dict(SMALL, num_inference_steps=1, num_frames=1))
    assert v.frames.shape == (1, 64, 96, 3)
    v = i2v.generate("a", image=_image(64, 96, 1), seed=0, **dict(SMALL, num_inference_steps=1, num_frames=13))
    assert v.frames.shape == (13, 64, 96, 3) and v.latents.shape == (1, 16, 4, 8, 12)


def test_warmup_and_teacache_calibration_take_images(flf2v):
    timings = flf2v.warmup(height=32, width=48, num_frames=5)
    assert "image_encoder" in timings and "vae_encode" in timings
    res = flf2v.calibrate_teacache("a", image=_image(64, 96, 1), last_image=_image(64, 96, 2), num_frames=5,
                                   num_inference_steps=6, degree=2)
    assert len(res["coefficients"]) == 3 and res["height"] == 64 and res["width"] == 96


# ------------------------------------------------------------------------------- written layouts


@pytest.mark.parametrize("preset", ["tiny-i2v", "tiny-flf2v"])
def test_make_tiny_checkpoint_writes_layouts_the_real_loaders_accept(preset, tmp_path, capsys):
    """`wanrt make-tiny-checkpoint --preset tiny-i2v|tiny-flf2v` in both layouts: diffusers' own pipeline
    loader accepts the diffusers one (image_encoder/ as a transformers CLIPVisionModel, image_processor/),
    and both load in wanrt as the same model."""
    from wanrt.checkpoints.layout import OFFICIAL_CLIP, detect_layout
    from wanrt.cli import main

    off, dif = tmp_path / "official", tmp_path / "diffusers"
    assert main(["make-tiny-checkpoint", str(off), "--preset", preset]) == 0
    assert main(["make-tiny-checkpoint", str(dif), "--preset", preset, "--layout", "diffusers"]) == 0
    assert detect_layout(off).image_encoder == off / OFFICIAL_CLIP
    assert detect_layout(dif).image_encoder == dif / "image_encoder"
    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(str(dif), torch_dtype=torch.float32)
    assert type(pipe.image_encoder).__name__ == "CLIPVisionModel"
    assert pipe.transformer.config.pos_embed_seq_len == (514 if preset == "tiny-flf2v" else None)
    a = wanrt.load_image_encoder(off, device="cpu", dtype=torch.float32)
    b = wanrt.load_image_encoder(dif, device="cpu", dtype=torch.float32)
    img = [_to_tensor(_image(50, 70, 1))]
    assert torch.equal(a.encode(img), b.encode(img))
    px = torch.nn.functional.interpolate(img[0][None], size=(224, 224), mode="bicubic", align_corners=False)
    px = (px * 0.5 + 0.5 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    ref = pipe.image_encoder(pixel_values=px, output_hidden_states=True).hidden_states[-2]
    assert_close(a.encode(img), ref, name="wanrt CLIP vs the pipeline's image encoder")
    e = wanrt.Engine.from_pretrained(off, device="cpu", precision="fp32")
    assert e.preset.name == preset and e.transformer.config.model_type == preset[5:]


def test_offloaded_image_encoder_visits_the_device_only_to_encode(tiny_i2v_official, monkeypatch):
    e = wanrt.Engine("tiny-i2v", tiny_i2v_official, device="cpu", precision="fp32", offload_image_encoder=True)
    moves = []
    model = e.image_encoder.model
    orig = model.to
    monkeypatch.setattr(model, "to", lambda *a, **k: moves.append(str(a[0])) or orig(*a, **k))
    img = _image(64, 96, 3)
    ref = wanrt.Engine("tiny-i2v", tiny_i2v_official, device="cpu", precision="fp32").generate(
        "a", image=img, seed=1, **SMALL)
    v = e.generate("a", image=img, seed=1, **SMALL)
    assert moves == ["cpu", "cpu"]  # to the Engine's device (the CPU here) for the encode, then home
    assert torch.equal(v.latents, ref.latents)
    e.generate("b", image=img, seed=1, **SMALL)
    assert len(moves) == 2  # a cached conditioning does not call the encoder
    with pytest.raises(ValueError, match="offload_image_encoder"):
        wanrt.Engine("tiny-i2v", tiny_i2v_official, device="cpu", offload_image_encoder=1)
