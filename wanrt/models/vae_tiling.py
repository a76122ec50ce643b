"""Spatially tiled decoding of the causal Wan-VAE, with linear overlap blending.

The untiled :meth:`WanVAE.decode` runs the decoder on whole frames; at 1080P one 4-frame chunk of
the Wan2.1 decoder needs many GB of activations (the upsampled input of its last stage alone is
6.4 GB in float32), and its causal cache holds 19.6 GB (two frames of the input of each of its 32
cached layers, mostly at full resolution). Here
the latent plane is split into overlapping tiles, each tile is decoded through all latent frames with
its *own* :class:`~wanrt.cache.causal_cache.CausalCache` (time causality is per tile; chunks of 1,
then ``temporal_factor`` = 4 frames, exactly as :meth:`WanVAE.decode_chunk`), and the decoded pixel
tiles are blended into the output with linear ramps over the overlaps.

Tile layout (per axis, in latent pixels): ``n = ceil((size - overlap) / (tile - overlap))`` tiles of
``tile`` pixels (the minimum count whose overlaps are all ``>= overlap``), the first at 0 and the
last aligned to the edge (``size - tile``), the others evenly spread in between, so neighbouring
tiles overlap by ``overlap`` or a little more. An axis not longer than ``tile`` is one tile of the
whole axis. A plane that fits in one tile is not tiled at all (:func:`decode_tiled` is then exactly
:meth:`WanVAE.decode`).

Blending (per axis, in pixels, ``spatial_factor`` = 8 pixels per latent pixel for Wan2.1, 16 for Wan2.2): a tile's weight
rises linearly over its overlap with the previous tile and falls over its overlap with the next one
(``(k + 0.5) / L`` for the k-th of L overlap pixels; never 0), is 1 elsewhere, and the weights are
then divided by their sum over the tiles, so they sum to 1 at every pixel and pixels covered by one
tile only get weight exactly 1. The 2D weight of a tile is the product of its row and column weights
(the grid is a product of the two axes' layouts, so the 2D weights also sum to 1).

Seams and accuracy: the tiled decode is *not* equal to the untiled one. The decoder's spatial
receptive field is large (conv1, the middle block and the first stage alone stack eleven 3x3
convolutions at latent resolution, and every tile border is zero-padded), and its middle
:class:`~wanrt.models.vae.AttentionBlock` attends over the whole latent frame, so a tile sees only
part of the context of the full-frame decode: every decoded tile differs from the untiled decode,
most near its borders, where the ramps give it little weight. Blending hides the seams (no visible
edge: in the test, no pixel column or row of the blended result has a larger mean gradient than the
untiled decode, while hard-cut tiles show a 1.6x step at the cut); it does not remove the
difference. Measured with random weights (every parameter random with fan-in scaling, a random
non-zero attention projection), tiles of 8 latent pixels with overlap 2 (2 x 3 tiles of a 12 x 16
plane, 3 latent frames), output in [-1, 1], worst over latent seeds 0..4:

* the test VAE (``VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1,
  temporal_downsample=(True, True))``, spatial factor 4): max ``|tiled - untiled|`` 0.85, mean 0.072
  (the test bounds, seed 0: max <= 0.9, mean <= 0.08); 16-latent-pixel tiles on a 24 x 32 plane:
  max 0.38, mean 0.026 (the difference falls with the tile size);
* a Wan-like layout (``VAEConfig(base_dim=16, num_res_blocks=2)``, spatial factor 8): max 0.97,
  mean 0.089 (about a third of the mean comes from the attention block);
* the Wan2.2 layout at small widths (``tiny_vae22_config()``: ``VAEConfig.wan22(base_dim=8,
  decoder_base_dim=16)``, spatial factor 16, 48 latent channels), seeds 0..2: max 1.17, mean 0.122
  (test bounds 1.25 / 0.13); hard-cut tiles (overlap 0) max 2.0, mean 0.161; 10-latent-pixel tiles with
  overlap 4: max 0.87, mean 0.083.

Everything here is in latent pixels and scales with ``vae.config.spatial_factor`` (8 for Wan2.1, 16 for
Wan2.2, whose pixel patchify is inside the decode of each tile).

Random weights are much rougher than trained ones and the default tiles are 4x larger than these, so
trained VAEs are expected to differ far less (not measured: the tests have no trained weights); take
the numbers above as a pessimistic bound, not as a quality estimate.

Memory: :func:`decode_tiled` (without ``on_frames``) decodes tile by tile, each through all latent
frames, so it holds the output, *one* tile's causal cache and the activations of one tile-chunk
decode. :func:`decode_tiled_stream` (and :func:`decode_tiled` with ``on_frames``) goes latent frame
by latent frame and must keep every tile's cache alive: its activations are those of one tile-chunk
decode, but the caches together are about ``(tile area x tile count) / plane area`` times the
untiled cache. Wan2.1 at 1080P in float32, scaled linearly from the real layout at 16 x 16 latent
pixels: untiled, a 19.6 GB cache plus up to 37 GB of new tensors per 4-frame chunk; default tiles
(6 x 10 tiles, 0.62 GB of cache and about 1.2 GB per chunk each): one-shot about 2 GB plus the 2 GB
output of 81 frames, streaming about 37 GB of caches plus 1.2 GB. Streaming therefore bounds the
activations, not the total; offloading idle tile caches (or keeping them in bf16) would be needed
for that. On a tiny random VAE (``base_dim=8``, 32 x 32 latents, 4 x 4 tiles of 12 with overlap 3),
live-tensor peaks: untiled 91 MiB, one-shot tiled 20 MiB, streaming tiled 93 MiB.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from wanrt.cache.causal_cache import CausalCache
from wanrt.models.vae import WanVAE

__all__ = [
    "WAN_720P_LATENT_PIXELS",
    "TilingConfig",
    "blend_weights",
    "decode_tiled",
    "decode_tiled_stream",
    "should_tile",
    "tile_starts",
]

WAN_720P_LATENT_PIXELS = (720 // 8) * (1280 // 8)
"""Latent pixels of a 720P (1280 x 720) Wan2.1 frame: 90 x 160 = 14400, the default auto-tiling threshold."""


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class TilingConfig:
    """Tile layout of :func:`decode_tiled`, in latent pixels (1 latent pixel = 8 pixels for Wan2.1).

    Attributes:
        tile_latent: tile side in latent pixels (32 = 256 pixels); at least 4.
        overlap_latent: minimum overlap of neighbouring tiles in latent pixels (8 = 64 pixels), over
            which the tiles are blended; ``0 <= overlap_latent < tile_latent``.

    Raises:
        ValueError: a non-integer value, ``tile_latent < 4``, or an overlap outside ``[0, tile_latent)``.
    """

    tile_latent: int = 32
    overlap_latent: int = 8

    def __post_init__(self) -> None:
        if not _is_int(self.tile_latent) or not _is_int(self.overlap_latent):
            raise ValueError(
                f"tile_latent and overlap_latent must be ints, got {self.tile_latent!r}, {self.overlap_latent!r}"
            )
        if self.tile_latent < 4:
            raise ValueError(f"tile_latent must be >= 4 latent pixels, got {self.tile_latent}")
        if not 0 <= self.overlap_latent < self.tile_latent:
            raise ValueError(
                f"overlap_latent must be in [0, tile_latent={self.tile_latent}), got {self.overlap_latent}"
            )


def should_tile(latent_h: int, latent_w: int, threshold_latent_pixels: int = WAN_720P_LATENT_PIXELS) -> bool:
    """The automatic rule: tile the decode when the latent plane is larger than a 720P frame's.

    With the default threshold, 480P and 720P (either orientation) decode untiled and 1080P
    (``135 x 240`` latent pixels) tiled.

    Args:
        latent_h: latent height (pixels / 8 for Wan2.1).
        latent_w: latent width.
        threshold_latent_pixels: tile when ``latent_h * latent_w`` exceeds this (default
            :data:`WAN_720P_LATENT_PIXELS`).

    Returns:
        Whether to use :func:`decode_tiled` / :func:`decode_tiled_stream`.

    Raises:
        ValueError: non-positive or non-integer sizes, or a negative threshold.
    """
    if not (_is_int(latent_h) and _is_int(latent_w)) or latent_h < 1 or latent_w < 1:
        raise ValueError(f"latent_h and latent_w must be positive ints, got {latent_h!r}, {latent_w!r}")
    if not _is_int(threshold_latent_pixels) or threshold_latent_pixels < 0:
        raise ValueError(f"threshold_latent_pixels must be a non-negative int, got {threshold_latent_pixels!r}")
    return latent_h * latent_w > threshold_latent_pixels


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis (see the module docstring).

    Args:
        size: axis length (>= 1).
        tile: tile length (>= 1).
        overlap: minimum overlap of neighbouring tiles, ``0 <= overlap < tile``.

    Returns:
        ``[0]`` when ``size <= tile`` (one tile of length ``size``); else the minimum number of
        starts, from 0 to ``size - tile`` inclusive, with consecutive gaps ``<= tile - overlap``
        spread as evenly as integers allow.

    Raises:
        ValueError: on values outside those ranges.
    """
    if not all(_is_int(v) for v in (size, tile, overlap)) or size < 1 or tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"need size >= 1, tile >= 1 and 0 <= overlap < tile, got {size}, {tile}, {overlap}")
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))  # >= 2
    return [k * (size - tile) // (n - 1) for k in range(n)]


def blend_weights(starts: Sequence[int], tile: int, size: int) -> list[torch.Tensor]:
    """Normalized linear-ramp blending weights of the tiles along one axis.

    Tile ``i`` covers ``[starts[i], starts[i] + tile)``. Its raw weight ramps up as
    ``(k + 0.5) / L`` over the ``L`` positions it shares with tile ``i - 1`` and down symmetrically
    over those it shares with tile ``i + 1`` (the minimum of the two where they meet), and is 1
    elsewhere; the raw weights are then divided by their sum over the tiles (in float64). Where only
    two tiles overlap, the two ramps already sum to 1.

    Args:
        starts: increasing tile starts, the first 0, the last ``size - tile``, gaps ``<= tile``
            (as from :func:`tile_starts`, in any unit: latent pixels or pixels).
        tile: tile length, ``1 <= tile <= size``.
        size: axis length.

    Returns:
        One float32 tensor ``[tile]`` per tile; at every position of the axis the weights of the
        tiles covering it sum to 1 (to float32 rounding), and a position covered by one tile has
        weight exactly 1.

    Raises:
        ValueError: if the tiles do not exactly cover ``[0, size)`` as described.
    """
    starts = list(starts)
    ok = (
        _is_int(tile) and _is_int(size) and 1 <= tile <= size and len(starts) >= 1
        and all(_is_int(s) for s in starts)
        and starts[0] == 0 and starts[-1] == size - tile
        and all(0 < b - a <= tile for a, b in itertools.pairwise(starts))
    )  # fmt: skip
    if not ok:
        raise ValueError(
            f"tile starts {starts} with tile {tile} do not cover [0, {size}) from 0 to the edge in increasing order"
        )
    raw = []
    for i, s in enumerate(starts):
        w = torch.ones(tile, dtype=torch.float64)
        if i > 0:
            n_up = starts[i - 1] + tile - s  # positions shared with the previous tile
            if n_up > 0:
                up = (torch.arange(n_up, dtype=torch.float64) + 0.5) / n_up
                w[:n_up] = torch.minimum(w[:n_up], up)
        if i < len(starts) - 1:
            n_down = s + tile - starts[i + 1]  # positions shared with the next tile
            if n_down > 0:
                down = (torch.arange(n_down, 0, -1, dtype=torch.float64) - 0.5) / n_down
                w[tile - n_down :] = torch.minimum(w[tile - n_down :], down)
        raw.append(w)
    total = torch.zeros(size, dtype=torch.float64)
    for s, w in zip(starts, raw):
        total[s : s + tile] += w
    return [(w / total[s : s + tile]).float() for s, w in zip(starts, raw)]


@dataclass(frozen=True)
class _Tile:
    """One tile: latent slices, pixel slices, and its ``[tile_h_px, tile_w_px]`` blending weight."""

    lat_h: slice
    lat_w: slice
    px_h: slice
    px_w: slice
    weight: torch.Tensor


def _check_latents(vae: WanVAE, latents: torch.Tensor) -> None:
    z_dim = vae.config.z_dim
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a 5D tensor [B, {z_dim}, T, h, w], got {shape}")
    if latents.shape[1] != z_dim:
        raise ValueError(f"latents must have z_dim={z_dim} channels at dim 1, got {tuple(latents.shape)}")
    if min(latents.shape) < 1:
        raise ValueError(f"latents must have B, T, h, w >= 1, got {tuple(latents.shape)}")


def _plan(vae: WanVAE, latent_h: int, latent_w: int, config: TilingConfig) -> list[_Tile]:
    """The tiles of a ``latent_h x latent_w`` plane, rows then columns (weights on ``vae.device``)."""
    if not isinstance(config, TilingConfig):
        raise TypeError(f"config must be a TilingConfig, got {type(config).__name__}")
    s = vae.config.spatial_factor
    axes = []
    for size in (latent_h, latent_w):
        tile = min(config.tile_latent, size)
        starts = tile_starts(size, tile, min(config.overlap_latent, tile - 1))
        weights = blend_weights([s * a for a in starts], s * tile, s * size)
        axes.append([(slice(a, a + tile), slice(s * a, s * (a + tile)), w) for a, w in zip(starts, weights)])
    return [
        _Tile(lh, lw, ph, pw, (wh[:, None] * ww[None, :]).to(vae.device))
        for lh, ph, wh in axes[0]
        for lw, pw, ww in axes[1]
    ]


def _frame_range(t: int, temporal_factor: int) -> tuple[int, int]:
    """Output frames ``[start, stop)`` decoded from latent frame ``t`` (1 frame for t = 0, then 4)."""
    if t == 0:
        return 0, 1
    start = 1 + temporal_factor * (t - 1)
    return start, start + temporal_factor


def _accumulate(out: torch.Tensor, tile: _Tile, pixels: torch.Tensor) -> None:
    """``out[..., tile rows, tile cols] += pixels * weight`` (one op order for both decode orders)."""
    out[:, :, :, tile.px_h, tile.px_w] += pixels * tile.weight


def decode_tiled_stream(vae: WanVAE, latents: torch.Tensor, config: TilingConfig = TilingConfig()) -> Iterator[torch.Tensor]:
    """Decodes latents spatially tiled, yielding the blended frames of each latent frame as they are ready.

    For latent frame ``t`` every tile is decoded with :meth:`WanVAE.decode_chunk` through that
    tile's own cache, and the tiles are blended (module docstring). Every tile's cache stays alive
    for the whole video (see the module docstring for their size); the activations are those of one
    tile-chunk decode. The chunks, concatenated along time, are bitwise equal to
    :func:`decode_tiled`. For a plane that fits in one tile the chunks are those of
    :meth:`WanVAE.decode_chunk` on the whole plane.

    Args:
        vae: the VAE (any device/dtype; the latents are moved tile by tile to its device).
        latents: ``[B, z_dim, T, h, w]`` normalized latents, any float dtype and device.
        config: the tile layout.

    Returns:
        An iterator over ``[B, 3, 1, 8h, 8w]`` for latent frame 0, then ``[B, 3, 4, 8h, 8w]``
        (``temporal_factor`` frames) per later latent frame, float32 in [-1, 1] on ``vae.device``.

    Raises:
        ValueError: bad latents (ndim, channels, empty dims); raised by this call, before any decoding.
        TypeError: ``config`` is not a :class:`TilingConfig` (also raised by this call).
    """
    _check_latents(vae, latents)
    tiles = _plan(vae, latents.shape[3], latents.shape[4], config)
    return _stream(vae, latents, tiles)


@torch.no_grad()
def _stream(vae: WanVAE, latents: torch.Tensor, tiles: list[_Tile]) -> Iterator[torch.Tensor]:
    b, _, t_lat, h, w = latents.shape
    if len(tiles) == 1:
        cache = vae.new_decoder_cache()
        for t in range(t_lat):
            yield vae.decode_chunk(latents[:, :, t : t + 1], cache)
        return
    s, tf = vae.config.spatial_factor, vae.config.temporal_factor
    caches = [vae.new_decoder_cache() for _ in tiles]
    for t in range(t_lat):
        start, stop = _frame_range(t, tf)
        out = torch.zeros(b, 3, stop - start, s * h, s * w, device=vae.device)
        for tile, cache in zip(tiles, caches):
            _accumulate(out, tile, vae.decode_chunk(latents[:, :, t : t + 1, tile.lat_h, tile.lat_w], cache))
        yield out.clamp_(-1.0, 1.0)


@torch.no_grad()
def decode_tiled(
    vae: WanVAE,
    latents: torch.Tensor,
    config: TilingConfig = TilingConfig(),
    *,
    on_frames: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Decodes latents spatially tiled with overlap blending (the tiled :meth:`WanVAE.decode`).

    Without ``on_frames`` the tiles are decoded one after the other, each through all latent frames
    with its own cache (chunks of 1, 4, 4, ... frames), and accumulated into the output: peak memory
    is the output plus one tile's cache and one tile-chunk's activations. With ``on_frames`` the
    decode goes latent frame by latent frame through :func:`decode_tiled_stream` (all tiles' caches
    alive at once) and calls ``on_frames`` with each blended chunk. Both orders give bitwise equal
    output. A plane that fits in one tile is decoded untiled: exactly :meth:`WanVAE.decode` without
    ``on_frames``, :meth:`WanVAE.decode_chunk` chunk by chunk with it.

    The result differs from the untiled decode (receptive field, global attention; see the module
    docstring): with random weights and 8-latent-pixel tiles, max abs difference <= 0.97 and mean
    <= 0.09 in [-1, 1] units; trained VAEs, with the default 32-pixel tiles, are much closer.

    Args:
        vae: the VAE (any device/dtype; the latents are moved tile by tile to its device).
        latents: ``[B, z_dim, T, h, w]`` normalized latents, any float dtype and device.
        config: the tile layout (default: 32-latent-pixel tiles, 8 overlap = 256 / 64 pixels).
        on_frames: optional ``on_frames(start, frames)``, called in order for each latent frame with
            the index of its first output frame and its blended ``[B, 3, 1 or 4, 8h, 8w]`` frames
            (a separate tensor, equal to ``result[:, :, start : start + frames.shape[2]]``).

    Returns:
        ``[B, 3, 1 + 4 (T - 1), 8h, 8w]`` float32 in [-1, 1] on ``vae.device``.

    Raises:
        ValueError: bad latents (ndim, channels, empty dims).
        TypeError: ``config`` is not a :class:`TilingConfig`.
    """
    _check_latents(vae, latents)
    b, _, t_lat, h, w = latents.shape
    s, tf = vae.config.spatial_factor, vae.config.temporal_factor
    n_frames = 1 + tf * (t_lat - 1)
    if on_frames is not None:
        out = torch.empty(b, 3, n_frames, s * h, s * w, device=vae.device)
        for t, chunk in enumerate(decode_tiled_stream(vae, latents, config)):
            start, stop = _frame_range(t, tf)
            out[:, :, start:stop] = chunk
            on_frames(start, chunk)
        return out
    tiles = _plan(vae, h, w, config)
    if len(tiles) == 1:
        return vae.decode(latents)
    out = torch.zeros(b, 3, n_frames, s * h, s * w, device=vae.device)
    for tile in tiles:
        cache: CausalCache = vae.new_decoder_cache()
        for t in range(t_lat):
            start, stop = _frame_range(t, tf)
            pixels = vae.decode_chunk(latents[:, :, t : t + 1, tile.lat_h, tile.lat_w], cache)
            _accumulate(out[:, :, start:stop], tile, pixels)
        del cache
    return out.clamp_(-1.0, 1.0)
