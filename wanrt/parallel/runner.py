"""The parts of :class:`~wanrt.engine.Engine` that change under a parallel layout, in one place.

* :class:`BroadcastText`: the text encoder lives on rank 0 only; its embeddings are broadcast.
* :func:`make_step`: the denoising step of a layout (sequence-parallel DiT, CFG halves, TeaCache agreement).
* :func:`decode`: the VAE decode (tiles over the ranks when the video is tiled, else rank 0 alone).
* :func:`stats`: what ``video.stats["parallel"]`` reports.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .mesh import ParallelMesh
from .step import CfgParallelStep, RankFailure, RankSync, _fail, broadcast_tensors, teacache_agreement


class BroadcastText:
    """``(cond, uncond)`` of a request on every rank: computed by rank 0's
    :class:`~wanrt.conditioning.TextConditioner` (``local``; None on the other ranks, which load no text encoder)
    and broadcast. Prompt embeddings given in the request are broadcast from rank 0 as well."""

    def __init__(self, local, mesh: ParallelMesh, device: torch.device):
        from ..conditioning import LRU

        self.local, self.mesh, self.device = local, mesh, device
        self.cache = local.cache if local is not None else LRU(0)

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Rank 0's :meth:`TextConditioner.encode`; raises RuntimeError on the other ranks."""
        if self.local is None:
            raise RuntimeError(f"the text encoder is on rank 0 only (this is rank {self.mesh.rank})")
        return self.local.encode(prompts)

    def __call__(self, req) -> tuple[torch.Tensor, torch.Tensor | None]:
        mine = None
        if self.mesh.is_root:
            cond, uncond = self.local(req)
            mine = [cond] + ([uncond] if uncond is not None else [])
        got = broadcast_tensors(mine, self.mesh, self.device)
        return got[0], (got[1] if len(got) > 1 else None)


def broadcast_image(image_cond: dict, mesh: ParallelMesh, device: torch.device) -> dict:
    """Rank 0's image conditioning (``{"y", "clip_fea"}``) on every rank (each computed it; rank 0's is kept so
    that every rank conditions on the same bits)."""
    keys = sorted(image_cond)
    return dict(zip(keys, broadcast_tensors([image_cond[k] for k in keys], mesh, device), strict=True))


def make_step(dit, mesh: ParallelMesh, cond, uncond, guidance_scale: float, *, batch_cfg: bool, teacache_config,
              num_steps: int, graphs, image_cond: dict, device: torch.device):
    """The step of ``mesh``'s layout and its TeaCache (or None): ``(step, teacache)``.

    ``dit`` is the :class:`~wanrt.parallel.dit.SequenceParallelDiT` when ``mesh.sp > 1`` (else the DiT itself), the
    model ``graphs`` (a :class:`~wanrt.sampling.loop.StepGraphSet` or None) were made for. ``cfg=1``: one
    :class:`~wanrt.sampling.loop.GuidedStep` with both branches on every rank, batched when ``batch_cfg``.
    ``cfg=2``: this half's branch alone, then :class:`CfgParallelStep`.
    """
    from ..cache.teacache import TeaCache
    from ..sampling.loop import GuidedStep

    agree = teacache_agreement(mesh, device)
    if mesh.config.cfg == 1:
        teacache = TeaCache(teacache_config, num_steps, agree=agree) if teacache_config is not None else None
        step = GuidedStep(dit, cond, uncond, guidance_scale, batch_cfg=batch_cfg, teacache=teacache,
                          graphs=graphs, **image_cond)
        return step, teacache
    guided = uncond is not None
    mine = uncond if guided and mesh.cfg_rank == 1 else cond
    teacache = TeaCache(teacache_config, num_steps, branches=("cond",), agree=agree) \
        if teacache_config is not None else None
    inner = GuidedStep(dit, mine, None, 1.0, teacache=teacache, graphs=graphs, **image_cond)
    return CfgParallelStep(inner, mesh, guidance_scale, guided), teacache


def teacache_summary(teacache, mesh: ParallelMesh) -> dict:
    """The TeaCache summary of the whole run (with ``cfg=2``, each branch from the half that computed it)."""
    local = teacache.summary()
    if mesh.config.cfg == 1:
        return local
    everyone = [None] * mesh.world_size
    try:
        dist.all_gather_object(everyone, local)
    except (RuntimeError, dist.DistError) as e:
        raise _fail("gathering the TeaCache summary", mesh, e) from e
    return {"cond": everyone[0]["cond"], "uncond": everyone[mesh.sp]["cond"]}


def decode(decoder, latents: torch.Tensor, mesh: ParallelMesh, on_frames, keep_frames: bool,
           size: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """Frames on rank 0 (None elsewhere, or everywhere with ``frames_on_all_ranks``) and how they were decoded.

    A tiled decode (``decoder.use_tiling``) spreads its tiles over every rank; otherwise rank 0 decodes alone.
    ``on_frames`` is called on rank 0 only.
    """
    from ..decode import chunks, collect_frames

    lat = latents.to(decoder.device, torch.float32)
    if decoder.use_tiling(lat) and mesh.world_size > 1:
        from .vae import decode_tiled_parallel

        how = f"tiles over {mesh.world_size} ranks"
        video = decode_tiled_parallel(decoder.vae, lat, mesh)
        frames = collect_frames(chunks(video), on_frames, keep_frames, size) if video is not None else None
    else:
        how = "rank 0"
        frames = collect_frames(decoder.decode_stream(lat), on_frames, keep_frames, size) if mesh.is_root else None
    if mesh.config.frames_on_all_ranks:
        frames = _broadcast_frames(frames, mesh, decoder.device)
    return frames, how


def _broadcast_frames(frames: np.ndarray | None, mesh: ParallelMesh, device: torch.device) -> np.ndarray:
    mine = [torch.from_numpy(np.ascontiguousarray(frames))] if mesh.is_root else None
    return broadcast_tensors(mine, mesh, device)[0].cpu().numpy()


def stats(mesh: ParallelMesh, graphs_on: bool, decoded: str | None, shard: dict | None) -> dict:
    """``video.stats["parallel"]``: the layout, this rank, and what ran across ranks."""
    c = mesh.config
    out = {"layout": mesh.describe(), "world_size": mesh.world_size, "rank": mesh.rank, "ulysses": c.ulysses,
           "ring": c.ring, "cfg": c.cfg, "shard_weights": c.shard_weights, "backend": dist.get_backend(),
           "cuda_graphs_capture_collectives": bool(graphs_on) and mesh.world_size > 1}
    if decoded is not None:
        out["vae_decode"] = decoded
    if shard is not None:
        out["sharded"] = dict(shard)
    return out


__all__ = ["BroadcastText", "RankFailure", "RankSync", "broadcast_image", "decode", "make_step", "stats", "teacache_summary"]
