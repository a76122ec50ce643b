"""Spatially tiled VAE decode: layout, blending weights, seams vs the untiled decode, streaming, errors.

Runs on a tiny random VAE (spatial factor 4, 4 latent channels) so the tiled decodes stay cheap;
the tile geometry in pixels is also checked for the Wan2.1 layout (spatial factor 8) on meta.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import weakref
from collections.abc import Iterator

import pytest
import torch
from test_vae import (
    _randomize_,  # every parameter random, attention projection included
)

from wanrt.models.vae import VAEConfig, WanVAE
from wanrt.models.vae_tiling import (
    WAN_720P_LATENT_PIXELS,
    TilingConfig,
    _plan,
    blend_weights,
    decode_tiled,
    decode_tiled_stream,
    should_tile,
    tile_starts,
)

SMALL = VAEConfig(
    base_dim=8,
    z_dim=4,
    dim_mult=(1, 2, 2),
    num_res_blocks=1,
    temporal_downsample=(True, True),
    latents_mean=(0.1, -0.2, 0.3, 0.0),
    latents_std=(1.5, 0.7, 2.0, 1.1),
)
TILES = TilingConfig(tile_latent=8, overlap_latent=2)  # a 12 x 16 plane -> 2 x 3 tiles
SEAM_MAX, SEAM_MEAN = 0.9, 0.08  # |tiled - untiled| in [-1, 1] units (module docstring)


def _latents(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    model = WanVAE(SMALL).eval()
    _randomize_(model, seed=1234)
    return model


@contextlib.contextmanager
def _count_live_caches(vae: WanVAE) -> Iterator[list[int]]:
    """Wraps ``vae.new_decoder_cache``; the yielded list gets the number of live caches at each creation."""
    live: weakref.WeakSet = weakref.WeakSet()
    counts: list[int] = []
    make = vae.new_decoder_cache

    def new_cache():
        cache = make()
        live.add(cache)
        counts.append(len(live))
        return cache

    vae.new_decoder_cache = new_cache
    try:
        yield counts
    finally:
        del vae.new_decoder_cache


@pytest.fixture(scope="module")
def decoded(vae):
    """(latents [1, 4, 3, 12, 16], untiled decode, one-shot tiled decode with TILES, its cache counts)."""
    lat = _latents((1, SMALL.z_dim, 3, 12, 16))
    with _count_live_caches(vae) as counts:
        tiled = decode_tiled(vae, lat, TILES)
    return lat, vae.decode(lat), tiled, counts


# ---- layout and weights --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "tile", "overlap"),
    [(12, 8, 2), (16, 8, 2), (17, 8, 2), (33, 8, 3), (135, 32, 8), (240, 32, 8), (9, 8, 0), (8, 8, 2), (5, 8, 2),
     (29, 5, 4)],
)
def test_tile_starts_cover_plane(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    if size <= tile:
        assert starts == [0]
        return
    assert starts[0] == 0 and starts[-1] == size - tile  # last tile aligned to the edge
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(0 < g <= tile - overlap for g in gaps)  # every overlap >= the configured one
    assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert len(starts) == math.ceil((size - overlap) / (tile - overlap))  # the minimum count
    covered = torch.zeros(size, dtype=torch.int64)
    for s in starts:
        covered[s : s + tile] += 1
    assert covered.min() >= 1


def test_tile_starts_1080p_default():
    cfg = TilingConfig()
    assert len(tile_starts(135, cfg.tile_latent, cfg.overlap_latent)) == 6
    assert len(tile_starts(240, cfg.tile_latent, cfg.overlap_latent)) == 10


@pytest.mark.parametrize(
    "starts,tile,size",
    [([0, 6, 8], 8, 16), ([0, 4], 8, 12), ([0, 8], 8, 16), ([0, 2, 4, 6], 8, 14), ([0], 8, 8), ([0, 3, 5, 9], 6, 15)],
)
def test_blend_weights_sum_to_one(starts, tile, size):
    weights = blend_weights(starts, tile, size)
    assert len(weights) == len(starts)
    total = torch.zeros(size)
    count = torch.zeros(size, dtype=torch.int64)
    for s, w in zip(starts, weights):
        assert w.shape == (tile,) and w.dtype == torch.float32
        assert (w > 0).all() and (w <= 1).all()
        total[s : s + tile] += w
        count[s : s + tile] += 1
    torch.testing.assert_close(total, torch.ones(size), rtol=0, atol=1e-6)
    for s, w in zip(starts, weights):  # positions covered by one tile only: weight exactly 1
        assert (w[count[s : s + tile] == 1] == 1).all()


def test_blend_weights_linear_ramps():
    # Two tiles overlapping by 4: complementary linear ramps (k + 0.5) / 4 over the overlap.
    w0, w1 = blend_weights([0, 4], 8, 12)
    ramp = torch.tensor([0.125, 0.375, 0.625, 0.875])
    torch.testing.assert_close(w1[:4], ramp)
    torch.testing.assert_close(w0[4:], ramp.flip(0))
    assert (w0[:4] == 1).all() and (w1[4:] == 1).all()
    # No overlap: hard cut.
    assert all((w == 1).all() for w in blend_weights([0, 8], 8, 16))


def test_plan_weights_2d_sum_to_one(vae):
    tiles = _plan(vae, 12, 17, TILES)  # odd width: 2 x 3 tiles, the last column tile at the edge
    s = SMALL.spatial_factor
    assert len(tiles) == 6
    total = torch.zeros(12 * s, 17 * s)
    for t in tiles:
        assert t.weight.shape == (8 * s, 8 * s)
        assert (t.px_h.start, t.px_h.stop) == (s * t.lat_h.start, s * t.lat_h.stop)
        assert (t.px_w.start, t.px_w.stop) == (s * t.lat_w.start, s * t.lat_w.stop)
        total[t.px_h, t.px_w] += t.weight
    assert {t.lat_w.stop for t in tiles} >= {17} and {t.lat_h.stop for t in tiles} >= {12}
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=2e-6)


def test_plan_wan21_pixel_geometry():
    # Wan2.1 layout on meta: 8 pixels per latent pixel, pixel overlap = 8 x latent overlap (or more).
    with torch.device("meta"):
        model = WanVAE()
    tiles = _plan(model, 135, 240, TilingConfig())
    assert len(tiles) == 60
    widths = {(t.px_w.stop - t.px_w.start) for t in tiles} | {(t.px_h.stop - t.px_h.start) for t in tiles}
    assert widths == {256}
    cols = sorted({t.px_w.start for t in tiles})
    assert cols[0] == 0 and cols[-1] == 1920 - 256
    assert all(a + 256 - b >= 64 for a, b in itertools.pairwise(cols))  # >= 8 x 8 pixels of overlap
    # One tile along an axis shorter than a tile.
    assert len(_plan(model, 20, 100, TilingConfig())) == 4


def test_should_tile():
    assert WAN_720P_LATENT_PIXELS == 90 * 160
    assert not should_tile(90, 160) and not should_tile(160, 90) and not should_tile(60, 104)  # 720P, 480P
    assert should_tile(135, 240)  # 1080P
    assert should_tile(10, 10, threshold_latent_pixels=99) and not should_tile(10, 10, threshold_latent_pixels=100)


# ---- decode ---------------------------------------------------------------------------------------


def test_plane_within_one_tile_is_untiled(vae):
    lat = _latents((1, SMALL.z_dim, 2, 5, 7), seed=3)
    ref = vae.decode(lat)
    assert torch.equal(decode_tiled(vae, lat), ref)  # default 32-pixel tiles
    assert torch.equal(decode_tiled(vae, lat, TilingConfig(7, 3)), ref)  # plane == tile along w
    seen = []
    out = decode_tiled(vae, lat, TilingConfig(8, 2), on_frames=lambda start, f: seen.append((start, f)))
    assert [(s, f.shape[2]) for s, f in seen] == [(0, 1), (1, 4)]
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # decode_chunk path (bitwise on CPU)


def test_tiled_vs_untiled_seams(vae, decoded):
    lat, ref, tiled, _ = decoded
    assert len(_plan(vae, 12, 16, TILES)) == 6
    assert tiled.shape == ref.shape == (1, 3, 9, 48, 64) and tiled.dtype == torch.float32
    assert tiled.min() >= -1 and tiled.max() <= 1
    assert (ref.abs() < 1).float().mean() > 0.9  # mostly unclamped: the comparison means something
    diff = (tiled - ref).abs()
    assert diff.max() <= SEAM_MAX, f"max |tiled - untiled| {diff.max():.3f} > {SEAM_MAX}"
    assert diff.mean() <= SEAM_MEAN, f"mean |tiled - untiled| {diff.mean():.4f} > {SEAM_MEAN}"

    # No visible seam: the mean |gradient| across every pixel column / row boundary stays within
    # that of the untiled decode; hard-cut tiles (no overlap) show a clear step at the cut.
    def steps(x: torch.Tensor, dim: int) -> torch.Tensor:
        other = [d for d in range(5) if d != dim]
        return x.diff(dim=dim).abs().mean(dim=other)

    for dim in (3, 4):
        assert (steps(tiled, dim) / steps(ref, dim)).max() < 1.15
    hard = decode_tiled(vae, lat, TilingConfig(8, 0))  # columns [0, 32) and [32, 64): cut at 31|32
    ratio = steps(hard, 4) / steps(ref, 4)
    assert ratio.argmax() == 31 and ratio.max() > 1.3


def test_stream_equals_one_shot(vae, decoded):
    lat, _, tiled, one_shot_counts = decoded
    assert len(one_shot_counts) == 6 and max(one_shot_counts) == 1  # one-shot: one tile's cache alive at a time
    with _count_live_caches(vae) as counts:
        chunks = list(decode_tiled_stream(vae, lat, TILES))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert torch.equal(torch.cat(chunks, 2), tiled)
    assert max(counts) == 6  # streaming: one cache per tile, all alive

    # on_frames (the streaming order inside decode_tiled) on a prefix of the latent frames: causal in
    # time per tile, so the first 1 + 4 frames are those of the whole decode.
    seen = []
    out = decode_tiled(vae, lat[:, :, :2], TILES, on_frames=lambda start, f: seen.append((start, f)))
    assert torch.equal(out, tiled[:, :, :5])
    assert [s for s, _ in seen] == [0, 1]
    assert all(torch.equal(f, c) for (_, f), c in zip(seen, chunks))


def test_batch_and_dtype(vae):
    lat = _latents((2, SMALL.z_dim, 1, 9, 10), seed=5)
    out = decode_tiled(vae, lat.to(torch.bfloat16), TilingConfig(6, 2))
    assert out.shape == (2, 3, 1, 36, 40) and out.dtype == torch.float32
    one = decode_tiled(vae, lat[1:].to(torch.bfloat16), TilingConfig(6, 2))
    torch.testing.assert_close(out[1:], one, rtol=1e-5, atol=1e-5)


# ---- errors ---------------------------------------------------------------------------------------


def test_config_and_input_errors(vae):
    for kwargs in (
        {"tile_latent": 3},
        {"tile_latent": 8, "overlap_latent": 8},
        {"tile_latent": 8, "overlap_latent": -1},
        {"tile_latent": 8.0},
        {"overlap_latent": True},
    ):
        with pytest.raises(ValueError):
            TilingConfig(**kwargs)
    assert TilingConfig(4, 0) == TilingConfig(tile_latent=4, overlap_latent=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TilingConfig().tile_latent = 16

    for args in ((0, 10), (10, -1), (10.0, 10), (10, 10, -1)):
        with pytest.raises(ValueError):
            should_tile(*args)
    for args in ((0, 8, 2), (10, 8, 8), (10, 0, 0), (10, 8, -1)):
        with pytest.raises(ValueError):
            tile_starts(*args)
    for starts, tile, size in (([0, 6], 8, 16), ([1, 8], 8, 16), ([0, 9, 8], 8, 17), ([0, 8], 9, 16), ([], 8, 8)):
        with pytest.raises(ValueError):
            blend_weights(starts, tile, size)

    ok = torch.zeros(1, SMALL.z_dim, 1, 4, 4)
    for bad in (
        torch.zeros(SMALL.z_dim, 1, 4, 4),  # ndim
        torch.zeros(1, SMALL.z_dim + 1, 1, 4, 4),  # channels
        torch.zeros(1, SMALL.z_dim, 0, 4, 4),  # no frames
        torch.zeros(0, SMALL.z_dim, 1, 4, 4),  # empty batch
        ok.numpy(),  # not a tensor
    ):
        with pytest.raises(ValueError):
            decode_tiled(vae, bad)
        with pytest.raises(ValueError):
            decode_tiled_stream(vae, bad)  # raised at the call, not on the first next()
    with pytest.raises(TypeError):
        decode_tiled(vae, ok, config=(8, 2))
    with pytest.raises(TypeError):
        decode_tiled_stream(vae, ok, config=(8, 2))
