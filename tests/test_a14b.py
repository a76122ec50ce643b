"""Wan2.2 A14B (two experts): the expert switch at the boundary with guidance per expert against a loop built here
from diffusers' own modules, both layouts, the presets and the request's fields, expert swapping, TeaCache and CUDA
graphs per expert, LoRAs per expert, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import wanrt
from test_i2v import _euler_sigmas
from wanrt.presets import get_preset
from wanrt.request import resolve_request

PRESET = get_preset("tiny-a14b")
KW = dict(device="cpu", precision="fp32", backend="eager")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def a14b_ckpts(tmp_path_factory):
    from wanrt.checkpoints.tiny import write_checkpoint

    root = tmp_path_factory.mktemp("a14b")
    return (write_checkpoint(root / "official", layout="official", preset="tiny-a14b", seed=6),
            write_checkpoint(root / "diffusers", layout="diffusers", preset="tiny-a14b", seed=6))


def _embeds(d: int):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, 7, d, generator=gen), torch.randn(1, 11, d, generator=gen)


def _pad(e):
    return torch.cat([e, e.new_zeros(1, 512 - e.shape[1], e.shape[2])], dim=1)


@torch.no_grad()
@pytest.mark.parametrize("boundary", [None, 0.0, 1.0, "at-a-timestep"],
                         ids=["official", "high-only", "low-only", "at-a-timestep"])
def test_generation_matches_a_loop_of_two_diffusers_experts(a14b_ckpts, boundary):
    diffusers = pytest.importorskip("diffusers")
    _, dif = a14b_ckpts
    engine = wanrt.Engine("tiny-a14b", dif, **KW)
    high = diffusers.WanTransformer3DModel.from_pretrained(dif / "transformer").float().eval()
    low = diffusers.WanTransformer3DModel.from_pretrained(dif / "transformer_2").float().eval()
    vae = diffusers.AutoencoderKLWan.from_pretrained(dif / "vae").float().eval()
    h, w, frames, steps, shift, g_high, g_low = 64, 96, 9, 8, 12.0, 4.0, 2.5
    cond, uncond = _embeds(engine.transformer.config.text_dim)
    noise = torch.randn(1, 16, 3, h // 8, w // 8, generator=torch.Generator().manual_seed(1))
    if boundary == "at-a-timestep":  # a timestep exactly at the boundary belongs to the high-noise expert
        from wanrt.sampling.schedulers import make_solver

        ts = [int(t) for t in make_solver("euler", steps, shift).timesteps[2:]]
        boundary = next(t / 1000 for t in ts if t / 1000 * 1000 == t)
    extra = {} if boundary is None else {"boundary": boundary}
    ours = engine.generate(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=h, width=w,
                           num_frames=frames, num_inference_steps=steps, guidance_scale=g_high,
                           guidance_scale_2=g_low, shift=shift, sample_solver="euler", progress=False, **extra)

    # diffusers' WanPipeline rule: transformer (high noise) while t >= boundary_ratio * 1000, then transformer_2
    ratio = PRESET.boundary if boundary is None else boundary
    sig = _euler_sigmas(steps, shift)
    x, used = noise.clone(), []
    for i in range(steps):
        t = torch.tensor([int(sig[i] * 1000)])
        model, g = (high, g_high) if t.item() >= ratio * 1000 else (low, g_low)
        used.append("high" if model is high else "low")
        v_c = model(x, t, _pad(cond), return_dict=False)[0]
        v_u = model(x, t, _pad(uncond), return_dict=False)[0]
        x = x + (sig[i + 1] - sig[i]) * (v_u + g * (v_c - v_u))
    stats = ours.stats["experts"]
    assert (stats["steps"]["high"], stats["steps"]["low"]) == (used.count("high"), used.count("low"))
    if boundary is None:
        assert 0 < used.count("high") < steps  # both experts ran
    assert _rel(ours.latents, x) < 1e-5
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    decoded = vae.decode(x * std + mean, return_dict=False)[0].clamp(-1, 1)
    ref = ((decoded[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(ours.frames.astype(int) - ref.astype(int)).max() <= 1


@torch.no_grad()
def test_one_guidance_scale_for_both_experts_is_a_different_video(a14b_ckpts):
    """The per-expert guidance matters (a port with one scale for both experts made worse videos)."""
    e = wanrt.Engine("tiny-a14b", a14b_ckpts[0], **KW)
    kw = dict(seed=2, num_inference_steps=8, progress=False)
    official = e.generate("a red circle", **kw)
    same = e.generate("a red circle", guidance_scale_2=4.0, **kw)
    assert official.stats["experts"]["guidance_scale"] == {"high": 4.0, "low": 3.0}
    assert _rel(official.latents, same.latents) > 1e-4


@torch.no_grad()
def test_both_layouts_and_from_pretrained(a14b_ckpts):
    off, dif = a14b_ckpts
    kw = dict(seed=5, num_inference_steps=8, progress=False)
    a = wanrt.Engine("tiny-a14b", off, **KW).generate("a red square", **kw)
    b = wanrt.Engine.from_pretrained(dif, **KW)
    assert b.preset.name == "tiny-a14b" and b.transformer_2 is not None
    torch.testing.assert_close(a.latents, b.generate("a red square", **kw).latents, rtol=1e-5, atol=1e-5)
    assert a.fps == 16


def test_diffusers_loads_the_written_diffusers_layout(a14b_ckpts):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.WanPipeline.from_pretrained(str(a14b_ckpts[1]), dtype=torch.float32)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == PRESET.boundary


def test_presets_and_the_official_numbers():
    t2v, i2v = get_preset("t2v-a14b"), get_preset("i2v-a14b")
    assert (t2v.boundary, t2v.guidance_scale, t2v.guidance_scale_2, t2v.shift, t2v.num_inference_steps) == \
        (0.875, 4.0, 3.0, 12.0, 40)
    assert (i2v.boundary, i2v.guidance_scale, i2v.guidance_scale_2, i2v.shift, i2v.num_inference_steps) == \
        (0.9, 3.5, 3.5, 5.0, 40)
    assert t2v.is_moe and i2v.is_moe and not get_preset("t2v-14b").is_moe
    assert i2v.arch.image_dim is None and not i2v.uses_clip and i2v.image_conditioned
    assert (t2v.fps, i2v.fps) == (16, 16) and t2v.vae == i2v.vae == "wan2.1"
    # the Wan2.1 480P i2v shift rule is not Wan2.2's
    from wanrt.presets import default_shift

    assert default_shift(i2v, 480, 832, 480 * 832) == 5.0


def test_request_fields():
    req = resolve_request(PRESET, "a cat", seed=0)
    assert (req.guidance_scale, req.guidance_scale_2, req.boundary) == (4.0, 3.0, 0.875)
    assert req.guidance_at(875.0) == 4.0 and req.guidance_at(874.0) == 3.0
    req = resolve_request(PRESET, "a cat", seed=0, guidance_scale=1.0, guidance_scale_2=1.0)
    assert not req.do_cfg and req.negative_prompt is None
    req = resolve_request(PRESET, "a cat", seed=0, guidance_scale=1.0)
    assert req.do_cfg and req.negative_prompt is not None  # the low-noise expert still guides


@pytest.mark.parametrize("preset,kw,match", [
    ("tiny", dict(guidance_scale_2=3.0), "guidance_scale_2 apply to a Wan2.2 A14B"),
    ("tiny", dict(boundary=0.5), "boundary apply to a Wan2.2 A14B"),
    ("tiny-a14b", dict(boundary=1.5), "boundary must be in"),
    ("tiny-a14b", dict(guidance_scale_2=float("nan")), "guidance_scale_2 must be a finite"),
    ("tiny-a14b", dict(teacache_threshold=0.1, teacache_coefficients=(1.0, 0.0)), "one polynomial per expert"),
    ("tiny-a14b", dict(teacache_threshold=0.1), "no TeaCache coefficients"),
    ("tiny", dict(teacache_threshold=0.1, teacache_coefficients={"high": [1], "low": [1]}), "for a Wan2.2 A14B"),
])
def test_bad_requests(preset, kw, match):
    with pytest.raises(ValueError, match=match):
        resolve_request(get_preset(preset), "a cat", seed=0, num_inference_steps=8, **kw)


def test_preset_and_checkpoint_must_agree(a14b_ckpts, tmp_path):
    from wanrt.checkpoints.tiny import write_checkpoint

    with pytest.raises(ValueError, match="holds two experts.*use preset t2v-a14b"):
        wanrt.Engine("tiny", a14b_ckpts[0], **KW)
    single = write_checkpoint(tmp_path / "one", preset="tiny")
    with pytest.raises(ValueError, match="runs two experts"):
        wanrt.Engine("tiny-a14b", single, **KW)
    half = tmp_path / "half"
    (half / "high_noise_model").mkdir(parents=True)
    from wanrt.checkpoints.layout import LayoutError, expert_folders

    with pytest.raises(LayoutError, match="high_noise_model/ without low_noise_model/"):
        expert_folders(half)
    from wanrt.config import EngineConfig
    from wanrt.engine import _check_moe_config

    from wanrt import ParallelConfig

    with pytest.raises(ValueError, match="expert_swap and shard_weights do not combine"):
        _check_moe_config(EngineConfig(torch.device("cpu"), parallel=ParallelConfig(ulysses=2, shard_weights=True),
                                       expert_swap=True))
    _check_moe_config(EngineConfig(torch.device("cpu"), parallel="auto"))  # layouts run both experts
    with pytest.raises(ValueError, match="do not apply to Wan2.2 A14B"):
        wanrt.Engine("tiny-a14b", a14b_ckpts[0], offload="model", **KW)


@torch.no_grad()
def test_swapping_experts_keeps_the_output(a14b_ckpts):
    kw = dict(seed=4, num_inference_steps=8, progress=False)
    resident = wanrt.Engine("tiny-a14b", a14b_ckpts[0], expert_swap=False, **KW)
    swapping = wanrt.Engine("tiny-a14b", a14b_ckpts[0], expert_swap=True, **KW)
    assert resident.experts.describe() == "both experts on the device"
    a, b = resident.generate("a cat", **kw), swapping.generate("a cat", **kw)
    assert torch.equal(a.latents, b.latents)
    s = b.stats["experts"]
    assert (s["placement"], s["swaps"]) == ("swap", 2)  # high up for its steps, then low in its place
    assert s["moved_bytes"] == 2 * sum(p.numel() * 4 for p in swapping.transformer.parameters())
    assert a.stats["experts"]["swaps"] == 0
    again = swapping.generate("a cat", **kw)  # the next video starts with the high-noise expert again
    assert torch.equal(again.latents, a.latents) and again.stats["experts"]["swaps"] == 2


def test_expert_swap_moves_one_expert_at_a_time():
    from torch import nn

    from wanrt.offload.experts import ExpertSwap

    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    host_a, host_b = a.weight.detach().clone(), b.weight.detach().clone()
    swap = ExpertSwap((a, b), torch.device("cpu"), swap=True)
    swap.activate(0)
    pa = a.weight.data_ptr()
    swap.activate(0)  # already there: nothing moves
    assert a.weight.data_ptr() == pa and swap.swaps == 1
    with torch.no_grad():
        a.weight.add_(1.0)  # e.g. a LoRA fused while resident
    swap.activate(1)
    assert a.weight.data_ptr() != pa  # a left the "device" (its own copy) for host memory, b arrived
    assert torch.equal(a.weight, host_a + 1.0) and torch.equal(b.weight, host_b) and swap.swaps == 2
    with pytest.raises(ValueError, match="expert index"):
        swap.activate(2)
    still = ExpertSwap((a, b), torch.device("cpu"), swap=False)
    pa = a.weight.data_ptr()
    still.activate(1)
    assert a.weight.data_ptr() == pa and still.swaps == 0


@torch.no_grad()
def test_teacache_and_graphs_per_expert(a14b_ckpts):
    from test_cuda_graphs import FakeCapturer

    from wanrt.sampling.loop import make_step_graphs

    e = wanrt.Engine("tiny-a14b", a14b_ckpts[0], cfg_batch=True, **KW)
    ref = e.generate("a red square", seed=1, num_inference_steps=8, progress=False)
    caps = FakeCapturer(warmup=1), FakeCapturer(warmup=1)
    e._graphs = make_step_graphs(e.transformer, capturer=caps[0])
    e._graphs_2 = make_step_graphs(e.transformer_2, capturer=caps[1])
    v = e.generate("a red square", seed=1, num_inference_steps=8, progress=False)
    assert caps[0].captures == 1 and caps[1].captures == 1  # one graph per expert
    assert v.stats["cuda_graphs"]["high"]["plain"]["replays"] == 5 and v.stats["cuda_graphs"]["low"]["plain"]["replays"] == 1
    assert _rel(v.latents, ref.latents) < 1e-5
    e._graphs = e._graphs_2 = None
    tc = e.generate("a red square", seed=1, num_inference_steps=16, teacache_threshold=0.3,
                    teacache_coefficients={"high": (0, 0, 0, 0.1, 0), "low": (0, 0, 0, 0.1, 0)}, progress=False)
    high, low = tc.stats["teacache"]["high"], tc.stats["teacache"]["low"]
    assert high["cond"]["skipped"] >= 1 and torch.isfinite(tc.latents).all()
    assert high["cond"]["computed"] + high["cond"]["skipped"] == tc.stats["experts"]["steps"]["high"]
    assert low["cond"]["computed"] + low["cond"]["skipped"] == tc.stats["experts"]["steps"]["low"]


@torch.no_grad()
def test_calibration_fits_one_polynomial_per_expert(a14b_ckpts):
    e = wanrt.Engine("tiny-a14b", a14b_ckpts[0], **KW)
    out = e.calibrate_teacache("a red square", num_inference_steps=24, seed=0, degree=2)
    assert set(out["coefficients"]) == {"high", "low"}
    assert all(len(c) == 3 and all(np.isfinite(c)) for c in out["coefficients"].values())
    assert len(out["input_changes"]["high"]) > 0 and len(out["input_changes"]["low"]) > 0
    v = e.generate("a red square", seed=0, num_inference_steps=24, teacache_threshold=0.05,
                   teacache_coefficients=out["coefficients"], progress=False)
    assert set(v.stats["teacache"]) == {"high", "low"}


@torch.no_grad()
def test_loras_target_either_expert(a14b_ckpts, tmp_path):
    from safetensors.torch import save_file
    from test_lora import _pairs, lora_file

    e = wanrt.Engine("tiny-a14b", a14b_ckpts[0], **KW)
    path = tmp_path / "speed_high.safetensors"
    save_file(lora_file("official-down-up-alpha", _pairs(e.transformer, seed=3)), str(path))
    highs = {k: v.clone() for k, v in e.transformer.state_dict().items()}
    lows = {k: v.clone() for k, v in e.transformer_2.state_dict().items()}
    kw = dict(seed=1, num_inference_steps=8, progress=False)
    base = e.generate("a cat", **kw)
    assert e.load_lora(path, 1.0, expert="high") == "speed_high"
    assert e.loras["speed_high"]["experts"] == ["high"]
    assert any(not torch.equal(v, highs[k]) for k, v in e.transformer.state_dict().items())
    assert all(torch.equal(v, lows[k]) for k, v in e.transformer_2.state_dict().items())
    assert _rel(e.generate("a cat", **kw).latents, base.latents) > 1e-4
    e.unload_lora("speed_high")
    assert all(torch.equal(v, highs[k]) for k, v in e.transformer.state_dict().items())
    e.load_lora(path, 0.5, name="both", mode="runtime")
    assert e.loras["both"]["experts"] == ["high", "low"]
    e.set_lora_strengths({"both": 0.0})
    assert torch.equal(e.generate("a cat", **kw).latents, base.latents)
    assert _rel(e.generate("a cat", loras={"both": 1.0}, **kw).latents, base.latents) > 1e-4
    with pytest.raises(KeyError):
        e.set_lora_strengths({"nope": 1.0})
    with pytest.raises(ValueError, match="expert must be"):
        e.load_lora(path, expert="middle")
    single = wanrt.Engine("tiny", write_ckpt(tmp_path), **KW)
    with pytest.raises(ValueError, match="applies to a Wan2.2 A14B"):
        single.load_lora(path, expert="high")


def write_ckpt(tmp_path):
    from wanrt.checkpoints.tiny import write_checkpoint

    return write_checkpoint(tmp_path / "single", preset="tiny")


def test_cli_generates_with_expert_options(a14b_ckpts, tmp_path, capsys):
    from wanrt.cli import main

    out = tmp_path / "a.mp4"
    rc = main(["generate", "--model", "tiny-a14b", "--checkpoint-dir", str(a14b_ckpts[0]), "--prompt", "a cat",
               "--steps", "8", "--guidance-scale-2", "2.0", "--boundary", "0.5", "--expert-swap", "on",
               "--device", "cpu", "--precision", "fp32", "-o", str(out), "--seed", "1", "--no-progress"])
    assert rc == 0 and out.is_file()
    rc = main(["generate", "--model", "tiny", "--prompt", "a cat", "--guidance-scale-2", "2.0", "-o",
               str(tmp_path / "b.mp4")])
    assert rc == 2 and "guidance_scale_2 apply to a Wan2.2 A14B" in capsys.readouterr().err
    cal = tmp_path / "tc.json"
    rc = main(["calibrate-teacache", "--model", "tiny-a14b", "--checkpoint-dir", str(a14b_ckpts[0]), "--prompt",
               "a cat", "--steps", "24", "--device", "cpu", "--precision", "fp32", "-o", str(cal), "--no-progress"])
    assert rc == 0 and set(json.loads(cal.read_text())["coefficients"]) == {"high", "low"}
    rc = main(["generate", "--model", "tiny-a14b", "--checkpoint-dir", str(a14b_ckpts[0]), "--prompt", "a cat",
               "--steps", "12", "--teacache-threshold", "0.05", "--teacache-coefficients", str(cal), "--device",
               "cpu", "--precision", "fp32", "-o", str(tmp_path / "c.mp4"), "--no-progress"])
    assert rc == 0


# ------------------------------------------------------------------------------------------ I2V-A14B (no CLIP)


@pytest.fixture(scope="module")
def i2v_a14b_ckpts(tmp_path_factory):
    from wanrt.checkpoints.tiny import write_checkpoint

    root = tmp_path_factory.mktemp("i2v-a14b")
    return (write_checkpoint(root / "official", layout="official", preset="tiny-i2v-a14b", seed=7),
            write_checkpoint(root / "diffusers", layout="diffusers", preset="tiny-i2v-a14b", seed=7))


@torch.no_grad()
def test_i2v_a14b_matches_a_loop_of_two_diffusers_experts_without_clip(i2v_a14b_ckpts):
    diffusers = pytest.importorskip("diffusers")
    from test_i2v import _image, _reference_mask, _to_tensor

    off, dif = i2v_a14b_ckpts
    engine = wanrt.Engine("tiny-i2v-a14b", dif, **KW)
    assert engine.image_encoder is None and engine.transformer.config.image_dim is None
    high = diffusers.WanTransformer3DModel.from_pretrained(dif / "transformer").float().eval()
    low = diffusers.WanTransformer3DModel.from_pretrained(dif / "transformer_2").float().eval()
    vae = diffusers.AutoencoderKLWan.from_pretrained(dif / "vae").float().eval()
    assert high.config.image_dim is None and high.config.in_channels == 36
    first = _image(64, 96, 1)
    cond, uncond = _embeds(engine.transformer.config.text_dim)
    noise = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(5))
    steps, shift, g_high, g_low, boundary = 8, 5.0, 3.5, 2.0, 0.9
    ours = engine.generate(prompt_embeds=cond, negative_prompt_embeds=uncond, image=first, latents=noise,
                           num_inference_steps=steps, guidance_scale=g_high, guidance_scale_2=g_low, shift=shift,
                           sample_solver="euler", num_frames=9, progress=False)
    video = torch.zeros(1, 3, 9, 64, 96)
    video[:, :, 0] = _to_tensor(first)
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    y = torch.cat([_reference_mask(9, 8, 12, False), (vae.encode(video).latent_dist.mode() - mean) / std], 1)
    sig = _euler_sigmas(steps, shift)
    x, used = noise.clone(), []
    for i in range(steps):
        t = torch.tensor([int(sig[i] * 1000)])
        model, g = (high, g_high) if t.item() >= boundary * 1000 else (low, g_low)
        used.append(model is high)
        inp = torch.cat([x, y], dim=1)
        v_c = model(inp, t, _pad(cond), return_dict=False)[0]
        v_u = model(inp, t, _pad(uncond), return_dict=False)[0]
        x = x + (sig[i + 1] - sig[i]) * (v_u + g * (v_c - v_u))
    assert 0 < sum(used) < steps
    assert _rel(ours.latents, x) < 1e-5
    ref = ((vae.decode(x * std + mean, return_dict=False)[0].clamp(-1, 1)[0].permute(1, 2, 3, 0) + 1) * 127.5)
    ref = ref.round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(ours.frames.astype(int) - ref.astype(int)).max() <= 1
    same = wanrt.Engine("tiny-i2v-a14b", off, **KW).generate(
        prompt_embeds=cond, negative_prompt_embeds=uncond, image=first, latents=noise, num_inference_steps=steps,
        guidance_scale=g_high, guidance_scale_2=g_low, shift=shift, sample_solver="euler", num_frames=9,
        progress=False)
    torch.testing.assert_close(same.latents, ours.latents, rtol=1e-5, atol=1e-5)
    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(str(dif), dtype=torch.float32)
    assert pipe.transformer_2 is not None and pipe.image_encoder is None
    with pytest.raises(ValueError, match="needs image"):
        engine.generate("a cat", seed=0)
    assert wanrt.Engine.from_pretrained(off, **KW).preset.name == "tiny-i2v-a14b"


@torch.no_grad()
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_each_expert_quantizes(a14b_ckpts, precision):
    from wanrt.quant import SCHEMES

    kinds = tuple(SCHEMES.values())
    ref = wanrt.Engine("tiny-a14b", a14b_ckpts[0], **KW).generate("a cat", seed=3, num_inference_steps=8,
                                                                   progress=False)
    e = wanrt.Engine("tiny-a14b", a14b_ckpts[0], **{**KW, "precision": precision})
    for dit in (e.transformer, e.transformer_2):
        assert all(isinstance(b.self_attn.q, kinds) and isinstance(b.ffn[2], kinds) for b in dit.blocks)
    v = e.generate("a cat", seed=3, num_inference_steps=8, progress=False)
    assert _rel(v.latents, ref.latents) < 0.15  # 8-bit weights: close, not equal


@torch.no_grad()
def test_single_files_of_the_two_experts(a14b_ckpts):
    """ComfyUI users keep A14B as two DiT files (high and low noise) beside the VAE and UMT5 files."""
    off = a14b_ckpts[0]
    files = {"dit": off / "high_noise_model" / "diffusion_pytorch_model.safetensors",
             "dit_2": off / "low_noise_model" / "diffusion_pytorch_model.safetensors",
             "text_encoder": off / "models_t5_umt5-xxl-enc-bf16.pth", "vae": off / "Wan2.1_VAE.pth",
             "tokenizer": off / "google" / "umt5-xxl"}
    kw = dict(seed=5, num_inference_steps=8, progress=False)
    want = wanrt.Engine("tiny-a14b", off, **KW).generate("a red square", **kw)
    e = wanrt.Engine("tiny-a14b", files=files, **KW)
    assert e.transformer_2 is not None
    torch.testing.assert_close(e.generate("a red square", **kw).latents, want.latents, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"missing \['dit_2'\]"):
        wanrt.Engine("tiny-a14b", files={k: v for k, v in files.items() if k != "dit_2"}, **KW)
    with pytest.raises(ValueError, match="dit_2 .* is for a Wan2.2 A14B preset"):
        wanrt.Engine("tiny", files=files, **KW)


@torch.no_grad()
def test_warmup_runs_both_experts(a14b_ckpts):
    from test_cuda_graphs import FakeCapturer

    from wanrt.sampling.loop import make_step_graphs

    e = wanrt.Engine("tiny-a14b", a14b_ckpts[0], **KW)
    caps = FakeCapturer(warmup=0), FakeCapturer(warmup=0)
    e._graphs = make_step_graphs(e.transformer, capturer=caps[0])
    e._graphs_2 = make_step_graphs(e.transformer_2, capturer=caps[1])
    e.warmup()
    assert caps[0].captures == 1 and caps[1].captures == 1  # each expert's step graph is ready
