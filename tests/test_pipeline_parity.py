"""A whole denoising loop (Euler) and decode against a loop driven by diffusers' modules.

Both sides read the same tiny random checkpoint (diffusers layout, written by wanrt, every parameter
random) in float32, with the same noise and the same text embeddings. The reference loop is written
here from the definitions in docs/model-reference.md §6.2 and §6.5, independently of wanrt's scheduler.
"""

import numpy as np
import pytest
import torch

import wanrt

diffusers = pytest.importorskip("diffusers")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _euler_sigmas(n: int, shift: float) -> np.ndarray:
    sigma = np.linspace(0.999, 0.0, n + 1)[:-1]
    sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return np.append(sigma, 0.0)


@pytest.fixture(scope="module")
def both(tiny_diffusers):
    engine = wanrt.Engine.from_pretrained(tiny_diffusers, device="cpu", precision="fp32")
    ref_dit = diffusers.WanTransformer3DModel.from_pretrained(tiny_diffusers / "transformer").float().eval()
    ref_vae = diffusers.AutoencoderKLWan.from_pretrained(tiny_diffusers / "vae").float().eval()
    return engine, ref_dit, ref_vae


@torch.no_grad()
def test_euler_loop_and_decode_match_diffusers(both):
    engine, ref_dit, ref_vae = both
    steps, shift, g = 4, 5.0, 5.0
    d = engine.transformer.config.text_dim
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(1, 7, d, generator=gen)
    uncond = torch.randn(1, 11, d, generator=gen)
    noise = torch.randn(1, 16, 3, 4, 6, generator=gen)  # 9 frames of 32x48

    ours = engine.generate(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=noise, height=32, width=48,
                           num_frames=9, num_inference_steps=steps, guidance_scale=g, shift=shift,
                           sample_solver="euler", progress=False)

    def pad(e):  # the pipelines zero-pad the trimmed T5 output to text_len
        return torch.cat([e, e.new_zeros(1, 512 - e.shape[1], e.shape[2])], dim=1)

    sig = _euler_sigmas(steps, shift)
    x = noise.clone()
    for i in range(steps):
        t = torch.tensor([int(sig[i] * 1000)])
        v_c = ref_dit(x, t, pad(cond), return_dict=False)[0]
        v_u = ref_dit(x, t, pad(uncond), return_dict=False)[0]
        v = v_u + g * (v_c - v_u)
        x = x + (sig[i + 1] - sig[i]) * v
    assert _rel(ours.latents, x) < 1e-5

    mean = torch.tensor(ref_vae.config.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(ref_vae.config.latents_std).view(1, 16, 1, 1, 1)
    video = ref_vae.decode(x / inv_std + mean, return_dict=False)[0].clamp(-1, 1)
    assert video.shape == (1, 3, 9, 32, 48)
    ours_video = engine.decode(ours.latents)
    assert _rel(ours_video, video) < 1e-5
    ref_frames = ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(ours.frames.astype(int) - ref_frames.astype(int)).max() <= 1


def test_written_diffusers_layout_loads_in_diffusers_and_transformers(tiny_diffusers):
    """The layout wanrt writes is the real one: diffusers' own pipeline loader accepts it."""
    pipe = diffusers.WanPipeline.from_pretrained(str(tiny_diffusers), torch_dtype=torch.float32)
    ours = wanrt.load_text_encoder(tiny_diffusers, device="cpu", dtype=torch.float32)
    ids = pipe.tokenizer(["a corgi surfing"], padding="max_length", max_length=512, truncation=True,
                         return_tensors="pt")
    n = int(ids.attention_mask.sum())
    ref = pipe.text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state[0, :n]
    got = ours.encode(["a corgi surfing"])[0]
    assert got.shape == ref.shape
    assert _rel(got, ref) < 1e-5
