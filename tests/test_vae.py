"""Wan-VAE: parity with diffusers' AutoencoderKLWan on tiny random configs, keys, cache, errors.

Parity runs in float32 with every parameter randomized (gammas 1 +- noise, biases, and the
zero-initialized attention projection included), weights converted with our key map and loaded
strictly. diffusers runs without tiling or slicing.
"""

from __future__ import annotations

import pytest
import torch

from wanrt.cache.causal_cache import CausalCache, SlotState
from wanrt.checkpoints.keymap_vae import (
    vae_from_official,
    vae_state_dict_from_official,
    vae_state_dict_to_official,
    vae_to_official,
)
from wanrt.models.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, VAEConfig, WanVAE

diffusers = pytest.importorskip("diffusers")
AutoencoderKLWan = diffusers.AutoencoderKLWan

RTOL = 1e-5  # max |ours - ref| / max |ref|

TINY = {
    # Wan2.1 layout (4 stages, temporal down in stages 2 and 3), 16 latent channels.
    "wan_like": VAEConfig(base_dim=16, num_res_blocks=2),
    # Other depth / block count / latent size: exercises the derived decoder indices.
    "small": VAEConfig(
        base_dim=8,
        z_dim=4,
        dim_mult=(1, 2, 2),
        num_res_blocks=1,
        temporal_downsample=(True, True),
        latents_mean=(0.1, -0.2, 0.3, 0.0),
        latents_std=(1.5, 0.7, 2.0, 1.1),
    ),
}


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # biases
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:  # conv weights, fan-in scaled so activations stay O(1)
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype == torch.float32
    err = _rel_err(ours, ref)
    assert err <= RTOL, f"{what}: max rel err {err:.3e} > {RTOL:.0e} (max abs {(ours - ref).abs().max():.3e})"


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request):
    """(config, our WanVAE, diffusers AutoencoderKLWan) with the same random float32 weights."""
    cfg = TINY[request.param]
    ref = AutoencoderKLWan(**cfg.to_diffusers_config()).eval().float()
    ref.disable_tiling()
    ref.disable_slicing()
    assert not ref.use_tiling and not ref.use_slicing
    _randomize_(ref, seed=1234)
    ours = WanVAE(cfg).eval()
    missing_unexpected = ours.load_state_dict(vae_state_dict_to_official(ref.state_dict(), config=cfg), strict=True)
    assert not missing_unexpected.missing_keys and not missing_unexpected.unexpected_keys
    return cfg, ours, ref


def _stats(cfg: VAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    return mean, inv_std


def _video(cfg: VAEConfig, frames: int, seed: int, hs: int = 4, ws: int = 6) -> torch.Tensor:
    s = cfg.spatial_factor  # 32x48 for the Wan-like config
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, hs * s, ws * s, generator=g) * 2 - 1


# ---- parity with diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize("frames", [9, 1])
def test_encode_decode_parity(pair, frames):
    cfg, ours, ref = pair
    x = _video(cfg, frames, seed=frames)
    mean, inv_std = _stats(cfg)
    with torch.no_grad():
        lat = ours.encode(x)
        mu = ref.encode(x).latent_dist.mode()  # diffusers returns the un-normalized mu
        _assert_close(lat, (mu - mean) * inv_std, "encode")
        t_lat = 1 + (frames - 1) // cfg.temporal_factor
        assert lat.shape == (1, cfg.z_dim, t_lat, x.shape[3] // cfg.spatial_factor, x.shape[4] // cfg.spatial_factor)

        video = ours.decode(lat)
        expected = ref.decode(lat / inv_std + mean).sample
        _assert_close(video, expected, "decode")
        assert video.shape == (1, 3, 1 + cfg.temporal_factor * (t_lat - 1), *x.shape[3:])
        assert video.min() >= -1 and video.max() <= 1
        # The comparison is meaningful only if most pixels are not clamped.
        assert (expected.abs() < 1).float().mean() > 0.5


def test_decode_parity_raw_latents_batch2(pair):
    cfg, ours, ref = pair
    g = torch.Generator().manual_seed(7)
    lat = torch.randn(2, cfg.z_dim, 3, 3, 5, generator=g)
    mean, inv_std = _stats(cfg)
    with torch.no_grad():
        _assert_close(ours.decode(lat), ref.decode(lat / inv_std + mean).sample, "decode B=2")


def test_streaming_chunks_match_whole(pair):
    cfg, ours, _ = pair
    x = _video(cfg, 9, seed=3)
    tf = cfg.temporal_factor
    whole = ours.encode(x)
    cache = ours.new_encoder_cache()
    assert cache.is_fresh
    parts = [ours.encode_chunk(x[:, :, :1], cache)]
    parts += [ours.encode_chunk(x[:, :, s : s + tf], cache) for s in range(1, 9, tf)]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=1e-6, atol=1e-6)
    # A later chunk of 2*tf frames equals two chunks of tf frames.
    cache.reset()
    assert cache.is_fresh
    parts = [ours.encode_chunk(x[:, :, :1], cache), ours.encode_chunk(x[:, :, 1:], cache)]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=1e-6, atol=1e-6)

    video = ours.decode(whole)
    cache = ours.new_decoder_cache()
    frames = [ours.decode_chunk(whole[:, :, i : i + 1], cache) for i in range(whole.shape[2])]
    assert [f.shape[2] for f in frames] == [1] + [tf] * (whole.shape[2] - 1)
    torch.testing.assert_close(torch.cat(frames, 2), video, rtol=1e-6, atol=1e-6)


def test_low_precision_weights_run_and_return_fp32():
    cfg = TINY["small"]
    ours = WanVAE(cfg).eval()
    _randomize_(ours, seed=9)
    half = WanVAE(cfg)
    half.load_state_dict(ours.state_dict())
    half = half.to(torch.bfloat16).eval()
    x = _video(cfg, 5, seed=11)
    lat = half.encode(x)
    assert lat.dtype == torch.float32 and torch.isfinite(lat).all()
    video = half.decode(lat)
    assert video.dtype == torch.float32 and video.shape == (1, 3, 5, *x.shape[3:])
    # max |diff| / max |ref| against the fp32 VAE, measured (CPU): encode 0.0161; decode of the same (fp32)
    # latents 0.0965. Bounds at 2x.
    ref_lat = ours.encode(x)
    assert 0 < _rel_err(lat, ref_lat) < 0.032
    assert 0 < _rel_err(half.decode(ref_lat), ours.decode(ref_lat)) < 0.19


# ---- real config: keys, parameter count, meta device -------------------------------------------


def test_real_config_keys_on_meta():
    with torch.device("meta"):
        ours = WanVAE()
        ref = AutoencoderKLWan()
    sd = ours.state_dict()
    assert len(sd) == 194
    n_params = sum(p.numel() for p in ours.parameters())
    assert abs(n_params - 126.9e6) < 0.05e6, n_params
    assert list(ours.buffers()) == []
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    ref_sd = ref.state_dict()
    mapped = {vae_to_official(k): v for k, v in ref_sd.items()}
    assert set(mapped) == set(sd)
    for key, value in mapped.items():
        assert sd[key].shape == value.shape, key
    # Spot checks of the official names (docs/model-reference.md §4.3, §4.4).
    for key in (
        "encoder.conv1.weight",
        "encoder.downsamples.3.shortcut.weight",
        "encoder.downsamples.5.time_conv.weight",
        "encoder.downsamples.2.resample.1.weight",
        "encoder.middle.1.to_qkv.weight",
        "encoder.head.0.gamma",
        "encoder.head.2.weight",
        "conv1.weight",
        "conv2.bias",
        "decoder.upsamples.3.time_conv.weight",
        "decoder.upsamples.4.shortcut.weight",
        "decoder.upsamples.11.resample.1.weight",
        "decoder.upsamples.14.residual.6.weight",
        "decoder.head.2.bias",
    ):
        assert key in sd, key
    assert sd["encoder.head.0.gamma"].shape == (384, 1, 1, 1)
    assert sd["encoder.middle.1.norm.gamma"].shape == (384, 1, 1)
    assert sd["decoder.upsamples.3.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    # One cache slot per cached causal conv / 3D resample (official counts 26 / 33 include the
    # never-cached 1x1x1 shortcuts: 2 in the encoder, 1 in the decoder).
    assert len(ours.new_encoder_cache()) == 24
    assert len(ours.new_decoder_cache()) == 32
    assert not any(WanVAE.keep_fp32(k) for k in sd)


def test_meta_build_then_assign_load():
    cfg = TINY["small"]
    src = WanVAE(cfg)
    _randomize_(src, seed=5)
    with torch.device("meta"):
        model = WanVAE(cfg)
    model.load_state_dict(src.state_dict(), assign=True)
    x = _video(cfg, 5, seed=2)
    torch.testing.assert_close(model.encode(x), src.encode(x), rtol=0, atol=0)


# ---- key map -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY))
def test_keymap_roundtrip_tiny(name):
    cfg = TINY[name]
    with torch.device("meta"):
        ref = AutoencoderKLWan(**cfg.to_diffusers_config())
        ours = WanVAE(cfg)
    keys = list(ref.state_dict())
    official = [vae_to_official(k, config=cfg) for k in keys]
    assert sorted(official) == sorted(ours.state_dict())
    assert [vae_from_official(k, config=cfg) for k in official] == keys
    back = vae_state_dict_from_official(vae_state_dict_to_official(dict.fromkeys(keys, 0), config=cfg), config=cfg)
    assert list(back) == keys


def test_keymap_examples_and_errors():
    assert vae_to_official("quant_conv.weight") == "conv1.weight"
    assert vae_to_official("post_quant_conv.bias") == "conv2.bias"
    pairs = {
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight": "decoder.upsamples.4.shortcut.weight",
        "decoder.up_blocks.2.upsamplers.0.resample.1.bias": "decoder.upsamples.11.resample.1.bias",
        "decoder.up_blocks.1.upsamplers.0.time_conv.weight": "decoder.upsamples.7.time_conv.weight",
        "encoder.mid_block.resnets.1.norm2.gamma": "encoder.middle.2.residual.3.gamma",
        "encoder.down_blocks.5.time_conv.bias": "encoder.downsamples.5.time_conv.bias",
        "decoder.norm_out.gamma": "decoder.head.0.gamma",
    }
    for diffusers_key, official_key in pairs.items():
        assert vae_to_official(diffusers_key) == official_key
        assert vae_from_official(official_key) == diffusers_key
    # num_res_blocks=1: stages of 2 resnets + 1 upsampler; config may be passed positionally.
    small = TINY["small"]
    assert vae_to_official("decoder.up_blocks.1.resnets.1.conv1.bias", small) == "decoder.upsamples.4.residual.2.bias"
    assert vae_from_official("decoder.upsamples.2.resample.1.weight", small) == (
        "decoder.up_blocks.0.upsamplers.0.resample.1.weight"
    )
    for bad in (
        "encoder.foo.weight",
        "decoder.up_blocks.0.resnets.3.conv1.weight",
        "decoder.mid_block.resnets.2.norm1.gamma",
    ):
        with pytest.raises(ValueError):
            vae_to_official(bad)
    for bad in ("decoder.upsamples.3.residual.0.gamma", "encoder.middle.1.residual.2.weight", "model.conv1.weight"):
        with pytest.raises(ValueError):
            vae_from_official(bad)
    with pytest.raises(ValueError, match="attn_scales"):
        vae_to_official("decoder.up_blocks.0.resnets.0.conv1.weight", config=VAEConfig(attn_scales=(1.0,)))


# ---- config --------------------------------------------------------------------------------------


def test_config_defaults_and_diffusers_roundtrip():
    cfg = VAEConfig()
    assert (cfg.base_dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks) == (96, 16, (1, 2, 4, 4), 2)
    assert cfg.temporal_downsample == (False, True, True) and cfg.temporal_upsample == (True, True, False)
    assert (cfg.temporal_factor, cfg.spatial_factor) == (4, 8)
    assert cfg.latents_mean == WAN21_LATENTS_MEAN and cfg.latents_std == WAN21_LATENTS_STD
    assert cfg.latents_mean[7] == 1.5508 and cfg.latents_std[8] == 3.2687
    # The published values are diffusers' defaults too.
    with torch.device("meta"):
        default_ref = AutoencoderKLWan()
    assert VAEConfig.from_diffusers_config(dict(default_ref.config)) == cfg
    for c in TINY.values():
        assert VAEConfig.from_diffusers_config(c.to_diffusers_config()) == c
    # The Wan2.2 fields are accepted (tests/test_vae22.py); channel counts that contradict the patchify are not.
    assert VAEConfig.from_diffusers_config({"is_residual": True}).is_residual
    with pytest.raises(ValueError, match="in_channels"):
        VAEConfig.from_diffusers_config({"patch_size": 2})
    with pytest.raises(ValueError):
        VAEConfig(z_dim=4)  # 16 default mean/std values
    with pytest.raises(ValueError):
        VAEConfig(temporal_downsample=(True, True))
    with pytest.raises(Exception):
        cfg.base_dim = 8  # frozen


# ---- input validation, cache ---------------------------------------------------------------------


def test_value_errors():
    model = WanVAE(TINY["small"])  # spatial factor 4, temporal factor 4, z_dim 4
    ok = torch.zeros(1, 3, 5, 8, 8)
    model.encode(ok)
    for bad in (
        torch.zeros(3, 5, 8, 8),  # ndim
        torch.zeros(1, 4, 5, 8, 8),  # channels
        torch.zeros(1, 3, 4, 8, 8),  # frames not 1 + 4k
        torch.zeros(1, 3, 5, 10, 8),  # height
        torch.zeros(1, 3, 5, 8, 6),  # width
    ):
        with pytest.raises(ValueError):
            model.encode(bad)
    with pytest.raises(ValueError):
        model.encode([ok])
    for bad in (torch.zeros(1, 4, 2, 2), torch.zeros(1, 16, 1, 2, 2)):
        with pytest.raises(ValueError):
            model.decode(bad)
    with pytest.raises(ValueError, match="first chunk"):
        model.encode_chunk(ok, model.new_encoder_cache())
    cache = model.new_encoder_cache()
    model.encode_chunk(ok[:, :, :1], cache)
    with pytest.raises(ValueError, match="multiple of 4"):
        model.encode_chunk(ok[:, :, :3], cache)
    with pytest.raises(ValueError, match="slots"):
        model.encode_chunk(ok[:, :, :1], model.new_decoder_cache())
    with pytest.raises(ValueError, match="1 latent frame"):
        model.decode_chunk(torch.zeros(1, 4, 2, 2, 2), model.new_decoder_cache())


def test_causal_cache_push_rules():
    cache = CausalCache(3)
    x1 = torch.arange(1.0, 2.0).view(1, 1, 1, 1, 1)  # one frame: value 1
    x4 = torch.arange(2.0, 6.0).view(1, 1, 4, 1, 1)  # frames 2, 3, 4, 5
    # EMPTY: nothing to prepend, short entry kept as is.
    assert cache.push(0, x1) is None and cache.frames(0).flatten().tolist() == [1.0]
    # FRAMES: previous returned; new entry is the last 2 frames.
    assert cache.push(0, x4).flatten().tolist() == [1.0]
    assert cache.frames(0).flatten().tolist() == [4.0, 5.0]
    # One-frame input: the missing frame comes from the previous entry.
    assert cache.push(0, x1).flatten().tolist() == [4.0, 5.0]
    assert cache.frames(0).flatten().tolist() == [5.0, 1.0]
    # REPLICATE (upsample3d after its first chunk): missing frames are zeros, nothing to prepend.
    cache.mark_replicate(1)
    assert cache.state(1) is SlotState.REPLICATE and not cache.is_fresh
    assert cache.push(1, x1) is None and cache.frames(1).flatten().tolist() == [0.0, 1.0]
    with pytest.raises(RuntimeError):
        cache.mark_replicate(1)
    # downsample3d keeps one frame.
    cache.push(2, x4, num_frames=1)
    assert cache.frames(2).flatten().tolist() == [5.0]
    assert cache.nbytes > 0 and "slots=3" in repr(cache)
    cache.reset()
    assert cache.is_fresh and cache.nbytes == 0 and cache.frames(0) is None


def test_cache_for_module_rejects_overlapping_slots():
    model = WanVAE(TINY["small"])
    with pytest.raises(ValueError, match="slots"):
        CausalCache.for_module(model)  # encoder and decoder slots both start at 0


def test_attn_scales_layout():
    # Official layout: an AttentionBlock after each residual block at the listed scales. diffusers
    # builds the same encoder blocks (flat indices) but none in the decoder.
    # The official scales: encoder stages 1, 1/2, ...; decoder stages (bottom up) start at
    # 1 / 2**(len(dim_mult) - 2), here 1 then 2.
    cfg = VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2), num_res_blocks=1, attn_scales=(1.0,),
                    temporal_downsample=(True,), latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    model = WanVAE(cfg)
    sd = model.state_dict()
    res, attn, resample = "ResidualBlock", "AttentionBlock", "Resample"
    assert [type(b).__name__ for b in model.encoder.downsamples] == [res, attn, resample, res]
    assert [type(b).__name__ for b in model.decoder.upsamples] == [res, attn, res, attn, resample, res, res]
    assert "encoder.downsamples.1.to_qkv.weight" in sd and "decoder.upsamples.3.proj.weight" in sd
    with torch.device("meta"):
        ref = AutoencoderKLWan(**cfg.to_diffusers_config())
    enc = [k for k in ref.state_dict() if k.startswith("encoder.")]
    assert {vae_to_official(k, cfg) for k in enc} == {k for k in sd if k.startswith("encoder.")}
    lat = model.encode(torch.zeros(1, 3, 3, 4, 4))
    assert lat.shape == (1, 4, 2, 2, 2)
    assert model.decode(lat).shape == (1, 3, 3, 4, 4)
