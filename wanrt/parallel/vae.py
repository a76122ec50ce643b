"""The tiled VAE decode spread over the ranks: tile ``i`` of :func:`wanrt.models.vae_tiling.decode_tiled`'s plan is
decoded (through all latent frames, with its own cache) on rank ``i % world``, sent to rank 0, and blended there in
the plan's order with the same operations, so the video equals the single-process tiled decode bit for bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..models.vae_tiling import TilingConfig, _accumulate, _check_latents, _frame_range, _plan
from .mesh import ParallelMesh
from .step import _fail


@torch.no_grad()
def _decode_tile(vae, latents: torch.Tensor, tile) -> torch.Tensor:
    """One tile through every latent frame: ``[B, 3, 1 + 4 (T-1), tile_h_px, tile_w_px]``."""
    cache = vae.new_decoder_cache()
    parts = [vae.decode_chunk(latents[:, :, t:t + 1, tile.lat_h, tile.lat_w], cache) for t in range(latents.shape[2])]
    return torch.cat(parts, dim=2)


@torch.no_grad()
def decode_tiled_parallel(vae, latents: torch.Tensor, mesh: ParallelMesh,
                          config: TilingConfig = TilingConfig()) -> torch.Tensor | None:
    """Decode ``latents`` ``[B, 16, T, h, w]`` in spatial tiles spread over every rank of ``mesh``.

    Returns on rank 0 the video ``[B, 3, 1 + 4 (T-1), 8h, 8w]`` float32 in [-1, 1] (equal to
    ``decode_tiled(vae, latents, config)``), on the other ranks None. Every rank must call it with the same
    latents. Peak memory per rank: its own decoded tiles (rank 0: the whole video and one received tile).

    Raises:
        ValueError: bad latents. RankFailure: a rank failed during the exchange.
    """
    _check_latents(vae, latents)
    b, _, t_lat, h, w = latents.shape
    tiles = _plan(vae, h, w, config)
    world, rank = mesh.world_size, mesh.rank
    if len(tiles) == 1:  # one tile: the untiled decode, as decode_tiled does, on rank 0 alone
        return vae.decode(latents) if rank == 0 else None
    mine = {i: _decode_tile(vae, latents, tile) for i, tile in enumerate(tiles) if i % world == rank}
    try:
        if rank != 0:
            for i in sorted(mine):
                dist.send(mine[i].contiguous(), dst=0)
            return None
        s, tf = vae.config.spatial_factor, vae.config.temporal_factor
        n_frames = 1 + tf * (t_lat - 1)
        out = torch.zeros(b, 3, n_frames, s * h, s * w, device=vae.device)
        for i, tile in enumerate(tiles):
            pixels = mine.pop(i, None)
            if pixels is None:
                pixels = torch.empty(b, 3, n_frames, tile.px_h.stop - tile.px_h.start,
                                     tile.px_w.stop - tile.px_w.start, device=vae.device)
                dist.recv(pixels, src=i % world)
            for t in range(t_lat):  # the single-process order of operations, latent frame by latent frame
                start, stop = _frame_range(t, tf)
                _accumulate(out[:, :, start:stop], tile, pixels[:, :, start:stop])
        return out.clamp_(-1.0, 1.0)
    except (RuntimeError, dist.DistError) as e:
        raise _fail("the parallel VAE decode", mesh, e) from e
