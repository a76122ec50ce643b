"""VACE generation: a whole run against a loop driven by diffusers' modules (the VACE conditioning written here
from the official ``wan/vace.py``), the input handling (videos as paths, arrays and lists; sizes; masks; reference
images) and its errors, which come before any weight is touched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import wanrt
from wanrt.presets import get_preset
from wanrt.request import resolve_request

PRESET = get_preset("tiny-vace")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def vace_ckpts(tmp_path_factory):
    from wanrt.checkpoints.tiny import write_checkpoint

    root = tmp_path_factory.mktemp("vace")
    return (write_checkpoint(root / "official", layout="official", preset="tiny-vace", seed=4),
            write_checkpoint(root / "diffusers", layout="diffusers", preset="tiny-vace", seed=4))


def _clip(seed: int, frames: int = 9, h: int = 64, w: int = 96) -> np.ndarray:
    """A moving gradient with a square: a video whose frames differ (uint8 [F, H, W, 3])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((frames, h, w, 3), np.uint8)
    for f in range(frames):
        out[f, ..., 0] = (xx * 255 // w + 7 * f) % 256
        out[f, ..., 1] = yy * 255 // h
        out[f, ..., 2] = rng.integers(0, 256)
        out[f, 10 + f:30 + f, 20:40] = (250, 30, 30)
    return out


# ------------------------------------------------------------------------------------------ the reference loop


def _ref_encode(vae, x):
    """diffusers' AutoencoderKLWan posterior mean, normalised as the pipelines do."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return (vae.encode(x).latent_dist.mode() - mean) / std


def _ref_mask_channels(mask: torch.Tensor, refs: int) -> torch.Tensor:
    """Official ``vace_encode_masks`` written out: channel ``8*i + j`` holds pixel ``(i, j)`` of each 8x8 block; of
    ``F`` frames, ``T = (F + 3) // 4`` are kept with nearest-exact (frame ``floor((k + 0.5) * F / T)``)."""
    f, h, w = mask.shape[1:]
    t = (f + 3) // 4
    keep = [int((k + 0.5) * f / t) for k in range(t)]
    chans = torch.stack([mask[0, keep, i::8, j::8] for i in range(8) for j in range(8)])  # [64, T, H/8, W/8]
    return torch.cat([torch.zeros(64, refs, h // 8, w // 8), chans], dim=1)


def _ref_canvas(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Official ``prepare_source``: the image fitted inside (h, w), centred on white."""
    ih, iw = img.shape[1:]
    s = min(h / ih, w / iw)
    nh, nw = int(ih * s), int(iw * s)
    out = torch.ones(3, h, w)
    top, left = (h - nh) // 2, (w - nw) // 2
    out[:, top:top + nh, left:left + nw] = F.interpolate(img[None], size=(nh, nw), mode="bilinear",
                                                         align_corners=False)[0]
    return out


@torch.no_grad()
@pytest.mark.parametrize("case", ["inpaint+reference", "control", "empty"])
def test_generation_matches_a_loop_of_diffusers_modules(vace_ckpts, case):
    diffusers = pytest.importorskip("diffusers")
    _, dif = vace_ckpts
    engine = wanrt.Engine("tiny-vace", dif, device="cpu", precision="fp32")
    ref_dit = diffusers.WanVACETransformer3DModel.from_pretrained(dif / "transformer").float().eval()
    ref_vae = diffusers.AutoencoderKLWan.from_pretrained(dif / "vae").float().eval()
    h, w, frames, steps, shift, g, scale = 64, 96, 9, 3, 16.0, 5.0, 0.75
    d = engine.transformer.config.text_dim
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 7, d, generator=gen), torch.randn(1, 11, d, generator=gen)
    video = mask = None
    refs: list[np.ndarray] = []
    if case != "empty":
        video = _clip(1)
    if case == "inpaint+reference":
        mask = np.zeros((frames, h, w), np.float32)
        mask[:, 13:45, 21:70] = 1.0  # generate the middle, keep the border (edges inside 8x8 blocks)
        refs = [_clip(2, 1, 40, 40)[0]]  # a square subject image: fitted on a white canvas
    n_ref = len(refs)
    noise = torch.randn(1, 16, n_ref + 3, h // 8, w // 8, generator=gen)
    ours = engine.generate(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=h, width=w,
                           num_frames=frames, num_inference_steps=steps, guidance_scale=g, shift=shift,
                           sample_solver="euler", video=video, mask=mask, reference_images=refs or None,
                           conditioning_scale=scale, progress=False)

    # the conditioning, from the official code's definitions
    src = torch.zeros(3, frames, h, w) if video is None else \
        torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1
    m = torch.ones(1, frames, h, w) if mask is None else torch.from_numpy(mask)[None]
    binary = (m > 0.5).float()
    z = torch.cat([_ref_encode(ref_vae, (src * (1 - binary))[None]), _ref_encode(ref_vae, (src * binary)[None])], 1)
    for r in reversed(refs):
        img = _ref_canvas(torch.from_numpy(r).permute(2, 0, 1).float() / 255 * 2 - 1, h, w)
        lat = _ref_encode(ref_vae, img[None, :, None])
        z = torch.cat([torch.cat([lat, torch.zeros_like(lat)], 1), z], dim=2)
    context = torch.cat([z, _ref_mask_channels(m, n_ref)[None]], dim=1)
    assert context.shape == (1, 96, n_ref + 3, h // 8, w // 8)

    def pad(e):
        return torch.cat([e, e.new_zeros(1, 512 - e.shape[1], e.shape[2])], dim=1)

    sig = np.linspace(0.999, 0.0, steps + 1)[:-1]
    sig = np.append(shift * sig / (1 + (shift - 1) * sig), 0.0)
    scales = torch.full((len(ref_dit.config.vace_layers),), scale)
    x = noise.clone()
    for i in range(steps):
        t = torch.tensor([int(sig[i] * 1000)])
        v_c = ref_dit(x, t, pad(cond), control_hidden_states=context, control_hidden_states_scale=scales,
                      return_dict=False)[0]
        v_u = ref_dit(x, t, pad(uncond), control_hidden_states=context, control_hidden_states_scale=scales,
                      return_dict=False)[0]
        x = x + (sig[i + 1] - sig[i]) * (v_u + g * (v_c - v_u))
    x = x[:, :, n_ref:]  # the reference frames are not part of the video
    assert ours.latents.shape == x.shape
    assert _rel(ours.latents, x) < 1e-5
    mean = torch.tensor(ref_vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(ref_vae.config.latents_std).view(1, 16, 1, 1, 1)
    decoded = ref_vae.decode(x * std + mean, return_dict=False)[0].clamp(-1, 1)
    ref_frames = ((decoded[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert ours.frames.shape == (frames, h, w, 3)
    assert np.abs(ours.frames.astype(int) - ref_frames.astype(int)).max() <= 1


@torch.no_grad()
def test_both_layouts_generate_the_same_video(vace_ckpts):
    off, dif = vace_ckpts
    kw = dict(seed=5, video=_clip(3), reference_images=[_clip(4, 1)[0]], num_inference_steps=2, progress=False)
    a = wanrt.Engine("tiny-vace", off, device="cpu", precision="fp32").generate("a red square", **kw)
    b = wanrt.Engine("tiny-vace", dif, device="cpu", precision="fp32").generate("a red square", **kw)
    assert a.latents.shape == (1, 16, 3, 8, 12)
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-5)


def test_diffusers_loads_the_written_diffusers_layout(vace_ckpts):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.WanVACEPipeline.from_pretrained(str(vace_ckpts[1]), dtype=torch.float32)
    assert type(pipe.transformer).__name__ == "WanVACETransformer3DModel"
    assert list(pipe.transformer.config.vace_layers) == [0, 1]


# ------------------------------------------------------------------------------------------ inputs


def test_videos_as_path_array_and_list_are_the_same_input(tmp_path):
    from wanrt.video import write_mp4

    clip = _clip(5)
    path = write_mp4(clip, tmp_path / "src.mp4", fps=16, crf=0)
    from wanrt.video import read_mp4

    decoded, _ = read_mp4(path)  # what a path gives (lossless coding of yuv420: close to the array, not equal)
    by_path = resolve_request(PRESET, "x", seed=0, video=str(path))
    by_array = resolve_request(PRESET, "x", seed=0, video=decoded)
    by_list = resolve_request(PRESET, "x", seed=0, video=[f for f in decoded])
    by_tensor = resolve_request(PRESET, "x", seed=0, video=torch.from_numpy(decoded))
    for r in (by_array, by_list, by_tensor):
        assert torch.equal(r.video, by_path.video)
    assert by_path.video.shape == (9, 64, 96, 3) and by_path.num_frames == 9
    assert (by_path.height, by_path.width) == (64, 96)
    floats = resolve_request(PRESET, "x", seed=0, video=decoded.astype(np.float32) / 255)
    assert torch.equal(floats.video, by_array.video)


def test_size_follows_the_video_within_the_area_and_the_video_is_cropped():
    # official sizing: the video's aspect on the 16-px grid within the preset's area (64*96 = 24 cells of 16x16)
    wide = _clip(6, 9, 90, 240)
    r = resolve_request(PRESET, "x", seed=0, video=wide)
    assert (r.height, r.width) == (48, 128)  # 3 x 8 cells: 24 cells, ratio 0.375 (the video's)
    assert r.max_area == 64 * 96
    from wanrt.vace import vace_size

    assert vace_size((1080, 1920), 480 * 832) == (480, 832)
    assert vace_size((480, 832), 720 * 1280) == (480, 832)  # never larger than the video
    # an explicit size: resized to cover it, centre-cropped
    stripes = np.zeros((5, 64, 192, 3), np.uint8)
    stripes[:, :, 64:128] = 255  # the middle third is white
    r = resolve_request(PRESET, "x", seed=0, video=stripes, height=64, width=64)
    assert r.video.shape == (5, 64, 64, 3)
    assert r.video.float().mean() > 250  # the crop is the centre: white
    small = resolve_request(PRESET, "x", seed=0, video=_clip(7, 5, 32, 48), height=64, width=96)
    assert small.video.shape == (5, 64, 96, 3)  # upscaled to cover


def test_frame_count_defaults_to_the_video_and_takes_its_first_frames():
    clip = _clip(8, 11)
    r = resolve_request(PRESET, "x", seed=0, video=clip)
    assert r.num_frames == 9 and torch.equal(r.video, torch.from_numpy(clip[:9]))  # 4k+1 frames of 11
    r = resolve_request(PRESET, "x", seed=0, video=clip, num_frames=5)
    assert r.num_frames == 5 and torch.equal(r.video, torch.from_numpy(clip[:5]))
    assert r.latent_shape == (1, 16, 2, 8, 12)


def test_masks_and_reference_images():
    clip = _clip(9)
    m = np.zeros((9, 64, 96), np.uint8)
    m[:, :, 48:] = 255
    r = resolve_request(PRESET, "x", seed=0, video=clip, mask=m)
    assert r.mask.dtype == torch.float32 and r.mask.shape == (9, 64, 96)
    assert r.mask[:, :, :48].max() == 0 and r.mask[:, :, 48:].min() == 1
    for same in (m.astype(bool), m.astype(np.float32) / 255, np.repeat(m[..., None], 3, -1)):
        assert torch.equal(resolve_request(PRESET, "x", seed=0, video=clip, mask=same).mask, r.mask)
    square = np.full((32, 32, 3), 10, np.uint8)
    r = resolve_request(PRESET, "x", seed=0, reference_images=square)
    assert len(r.reference_images) == 1 and r.latent_shape == (1, 16, 4, 8, 12)
    canvas = r.reference_images[0]
    assert canvas.shape == (3, 64, 96)
    assert torch.all(canvas[:, :, :16] == 1) and torch.all(canvas[:, :, 80:] == 1)  # white either side
    torch.testing.assert_close(canvas[:, :, 16:80], torch.full((3, 64, 64), 10 / 255 * 2 - 1))


@pytest.mark.parametrize("kw, match", [
    (dict(mask=np.ones((9, 64, 96), np.uint8)), "mask without video"),
    (dict(video=_clip(1), mask=np.ones((7, 64, 96), np.uint8)), "mask has 7 frames but video has 9"),
    (dict(video=_clip(1), mask=np.full((9, 64, 96), 1.5, np.float32)), r"values in \[0, 1\]"),
    (dict(video=_clip(1), mask=np.full((9, 64, 96), -0.1, np.float32)), r"values in \[0, 1\]"),
    (dict(video=_clip(1), num_frames=13), "num_frames=13 but the video has 9 frames"),
    (dict(reference_images=[np.zeros((8, 8, 3), np.uint8)] * 5), "at most 4"),
    (dict(video=np.zeros((9, 64, 96), np.int64)), "uint8"),
    (dict(video=np.zeros((9, 64, 96, 2), np.uint8)), r"\[F, H, W, 3\]"),
    (dict(video=np.full((9, 64, 96, 3), 2.0, np.float32)), r"in \[0, 1\]"),
    (dict(video=[]), "empty"),
    (dict(video=[np.zeros((16, 16, 3), np.uint8), np.zeros((16, 32, 3), np.uint8)]), "differ in size"),
    (dict(video="/nonexistent/clip.mp4"), "no such file"),
    (dict(video=_clip(1), height=64), "both height and width"),
    (dict(video=_clip(1), height=64, width=96, max_area=4096), "leave it out"),
    (dict(conditioning_scale=float("nan")), "conditioning_scale"),
    (dict(image=np.zeros((64, 96, 3), np.uint8)), "takes no image"),
    (dict(video=np.zeros((9, 8, 8, 3), np.uint8)), "at least 16x16"),
])
def test_bad_inputs_are_refused_before_any_weight(kw, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        resolve_request(PRESET, "x", seed=0, **kw)


def test_a_corrupt_video_file_is_named(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="broken.mp4"):
        resolve_request(PRESET, "x", seed=0, video=bad)


@pytest.mark.parametrize("kw", [dict(video=_clip(1)), dict(reference_images=[np.zeros((8, 8, 3), np.uint8)]),
                                dict(conditioning_scale=0.5)])
def test_vace_inputs_need_a_vace_model(kw):
    with pytest.raises(ValueError, match="VACE inputs"):
        resolve_request(get_preset("tiny"), "x", seed=0, **kw)


# ------------------------------------------------------------------------------------------ accelerators


def _inputs():
    mask = np.zeros((9, 64, 96), np.uint8)
    mask[:, 16:48, 24:72] = 255
    return dict(video=_clip(11), mask=mask, reference_images=[_clip(12, 1, 48, 48)[0]], seed=2, progress=False)


@pytest.fixture(scope="module")
def reference_run(vace_ckpts):
    e = wanrt.Engine("tiny-vace", vace_ckpts[0], device="cpu", precision="fp32", backend="eager")
    return e.generate("a red square", num_inference_steps=3, **_inputs())


@torch.no_grad()
@pytest.mark.parametrize("opts", [dict(backend="sdpa"), dict(cfg_batch=True), dict(offload="block"),
                                  dict(offload="model")], ids=["sdpa", "cfg-batch", "block-offload", "model-offload"])
def test_accelerators_keep_the_reference_output(vace_ckpts, reference_run, opts):
    e = wanrt.Engine("tiny-vace", vace_ckpts[0], device="cpu", precision="fp32", **{"backend": "eager", **opts})
    v = e.generate("a red square", num_inference_steps=3, **_inputs())
    assert _rel(v.latents, reference_run.latents) < 1e-5
    assert np.abs(v.frames.astype(int) - reference_run.frames.astype(int)).max() <= 1
    if "offload" in opts:
        assert v.stats["offload"]["mode"] == opts["offload"]


@torch.no_grad()
def test_graph_replay_and_teacache(vace_ckpts, reference_run):
    from test_cuda_graphs import FakeCapturer

    from wanrt.sampling.loop import make_step_graphs

    e = wanrt.Engine("tiny-vace", vace_ckpts[0], device="cpu", precision="fp32", backend="eager", cfg_batch=True)
    cap = FakeCapturer(warmup=1)  # a replay re-executes the recorded ops: the hint inputs must be static buffers
    e._graphs = make_step_graphs(e.transformer, capturer=cap)
    v = e.generate("a red square", num_inference_steps=3, **_inputs())
    plain = v.stats["cuda_graphs"]["plain"]
    assert cap.captures == 1 and plain["replays"] == 2 and plain["fallbacks"] == 0
    assert _rel(v.latents, reference_run.latents) < 1e-5
    tc = e.generate("a red square", num_inference_steps=8, teacache_threshold=0.25,
                    teacache_coefficients=(0, 0, 0, 0.1, 0), **_inputs())
    assert tc.stats["teacache"]["cond"]["skipped"] >= 1 and torch.isfinite(tc.latents).all()


@torch.no_grad()
@pytest.mark.parametrize("precision", ["int8", "fp8", "int8-wo"])
def test_the_vace_blocks_quantize_like_the_main_blocks(vace_ckpts, reference_run, precision):
    from wanrt.quant import SCHEMES

    e = wanrt.Engine("tiny-vace", vace_ckpts[0], device="cpu", precision=precision, backend="eager")
    dit = e.transformer
    kinds = tuple(SCHEMES.values())
    for blocks in (dit.blocks, dit.vace_blocks):
        assert all(isinstance(b.self_attn.q, kinds) and isinstance(b.ffn[2], kinds) for b in blocks)
    assert not isinstance(dit.vace_blocks[0].before_proj, kinds) and not isinstance(dit.vace_blocks[1].after_proj, kinds)
    v = e.generate("a red square", num_inference_steps=3, **_inputs())
    assert v.latents.shape == reference_run.latents.shape
    assert _rel(v.latents, reference_run.latents) < 0.15  # 8-bit weights: close, not equal


@torch.no_grad()
def test_conditioning_scale_steers(vace_ckpts, reference_run):
    e = wanrt.Engine("tiny-vace", vace_ckpts[0], device="cpu", precision="fp32", backend="eager")
    off = e.generate("a red square", num_inference_steps=3, conditioning_scale=0.0, **_inputs())
    assert _rel(off.latents, reference_run.latents) > 1e-3


# ------------------------------------------------------------------------------------------ text-to-image


@torch.no_grad()
def test_one_frame_is_an_image(tmp_path):
    from PIL import Image

    e = wanrt.Engine("tiny", device="cpu", precision="fp32")
    a = e.generate("a red circle", num_frames=1, seed=9, progress=False)
    b = e.generate("a red circle", num_frames=1, seed=9, progress=False)
    assert a.frames.shape == (1, 64, 96, 3) and a.latents.shape == (1, 16, 1, 8, 12)
    assert np.array_equal(a.frames, b.frames)  # the seed decides (the noise is drawn on the CPU)
    assert a.image.size == (96, 64) and np.array_equal(np.asarray(a.image), a.frames[0])
    png = a.save(tmp_path / "out" / "circle.png")
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), a.frames[0])  # lossless
    webp = a.save(tmp_path / "circle.webp")
    assert np.array_equal(np.asarray(Image.open(webp).convert("RGB")), a.frames[0])  # lossless WebP
    jpg = a.save(tmp_path / "circle.jpg")
    assert np.abs(np.asarray(Image.open(jpg)).astype(int) - a.frames[0].astype(int)).mean() < 8
    video = e.generate("a red circle", num_frames=5, seed=9, progress=False)
    with pytest.raises(ValueError, match="one-frame generation"):
        video.save(tmp_path / "x.png")
    with pytest.raises(ValueError, match="one-frame generation"):
        video.image
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.png.part").exists()


# ------------------------------------------------------------------------------------------ command line


def test_cli_vace_recipes_and_text_to_image(tmp_path, capsys):
    from PIL import Image

    from wanrt.cli import main
    from wanrt.video import read_mp4, write_mp4

    ckpt = tmp_path / "ckpt"
    assert main(["make-tiny-checkpoint", str(ckpt), "--preset", "tiny-vace"]) == 0
    assert main(["make-tiny-checkpoint", str(tmp_path / "dif"), "--preset", "tiny-vace", "--layout", "diffusers"]) == 0
    src = write_mp4(_clip(13, 9, 48, 160), tmp_path / "src.mp4", crf=0)  # 10:3, more than the 64*96 area
    mask = np.zeros((9, 48, 160, 3), np.uint8)
    mask[:, 20:52, 40:88] = 255
    mask_path = write_mp4(mask, tmp_path / "mask.mp4", crf=0)
    ref = tmp_path / "ref.png"
    Image.fromarray(_clip(14, 1, 40, 30)[0]).save(ref)
    common = ["--model", "tiny-vace", "--checkpoint-dir", str(ckpt), "--prompt", "a red square", "--steps", "2",
              "--device", "cpu", "--precision", "fp32", "--no-progress"]
    out = tmp_path / "inpaint.mp4"
    assert main(["generate", *common, "--video", str(src), "--mask", str(mask_path), "--reference-image", str(ref),
                 "--reference-image", str(ref), "--conditioning-scale", "0.8", "-o", str(out)]) == 0
    frames, _ = read_mp4(out)
    assert frames.shape == (9, 48, 128, 3)  # the video's aspect within 24 cells of 16x16: 3 x 8
    assert "vae_encode" in capsys.readouterr().out
    image = tmp_path / "still.png"
    assert main(["generate", *common, "--reference-image", str(ref), "-o", str(image)]) == 0
    assert Image.open(image).size == (96, 64)
    assert "96x64 image" in capsys.readouterr().out


def test_cli_vace_errors_come_before_loading(tmp_path, monkeypatch, capsys):
    import wanrt.engine
    from wanrt.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(wanrt.engine.Engine, "__init__", no_load)
    mask = tmp_path / "mask.npy"
    cases = (
        (["--model", "vace-1.3b", "--mask", str(mask)], "mask without video"),
        (["--model", "vace-1.3b", "--image", str(mask)], "--image needs an i2v/flf2v model"),
        (["--model", "vace-1.3b", "--video", str(tmp_path / "none.mp4")], "none.mp4"),
        (["--model", "t2v-1.3b", "--reference-image", str(mask)], "VACE inputs"),
        (["--model", "tiny", "-o", str(tmp_path / "x.png"), "--num-frames", "5"], "holds one frame"),
        (["--model", "vace-1.3b", "--reference-image", str(mask)] * 5, "at most 4"),
    )
    for argv, msg in cases:
        rc = main(["generate", "--checkpoint-dir", str(tmp_path), "--prompt", "x", *argv])
        assert rc == 2, argv
        assert msg in capsys.readouterr().err, argv


class _PoolVAE(torch.nn.Module):
    """A stand-in VAE: 'latents' are every 4th frame average-pooled over 8x8 pixels (3 channels)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return F.avg_pool3d(x[:, :, ::4], (1, 8, 8))


def test_a_soft_mask_splits_the_video_at_one_half():
    from wanrt.vace import vace_context

    video = torch.full((3, 5, 16, 16), 0.5)
    mask = torch.full((1, 5, 16, 16), 0.4)
    mask[..., 8:] = 0.6  # right half above one half: generated (reactive)
    ctx = vace_context(_PoolVAE(), video, mask)
    assert ctx.shape == (1, 3 + 3 + 64, 2, 2, 2)
    inactive, reactive, m = ctx[0, :3], ctx[0, 3:6], ctx[0, 6:]
    assert torch.all(inactive[..., 0] == 0.5) and torch.all(inactive[..., 1] == 0)
    assert torch.all(reactive[..., 0] == 0) and torch.all(reactive[..., 1] == 0.5)
    torch.testing.assert_close(m[:, :, :, 0], torch.full((64, 2, 2), 0.4))  # the mask channels stay soft
    torch.testing.assert_close(m[:, :, :, 1], torch.full((64, 2, 2), 0.6))


def test_loras_reach_the_vace_blocks_in_official_and_diffusers_names():
    """A LoRA trained on a VACE model touches vace_blocks.N too: both naming schemes resolve to those modules."""
    from wanrt.checkpoints.tiny import dit_config_for
    from wanrt.lora.formats import read_lora
    from wanrt.models.dit import WanDiT

    model = WanDiT(dit_config_for(PRESET))
    a, b = torch.randn(4, 64), torch.randn(64, 4)
    official = read_lora({"diffusion_model.vace_blocks.1.self_attn.q.lora_A.weight": a,
                          "diffusion_model.vace_blocks.1.self_attn.q.lora_B.weight": b}, model)
    diffusers = read_lora({"transformer.vace_blocks.0.proj_out.lora_A.weight": a,
                           "transformer.vace_blocks.0.proj_out.lora_B.weight": b,
                           "transformer.vace_blocks.0.attn2.to_v.lora_A.weight": a,
                           "transformer.vace_blocks.0.attn2.to_v.lora_B.weight": b}, model)
    assert set(official.deltas) == {"vace_blocks.1.self_attn.q"} and not official.unmatched
    assert set(diffusers.deltas) == {"vace_blocks.0.after_proj", "vace_blocks.0.cross_attn.v"}
    assert not diffusers.unmatched
