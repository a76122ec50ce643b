"""Sharded DiT weights with FSDP2 (``torch.distributed.fsdp.fully_shard``), for inference.

Each large Linear of every block (self-attention q/k/v/o, cross-attention q/k/v/o and the image k/v, the two FFN
Linears) becomes one FSDP unit sharded over all ranks: its weight is all-gathered just before its forward and freed
right after it, and on CUDA the next unit's all-gather is started when a unit begins (prefetch, overlapping the
GEMM). The small parameters (norms, modulation tables, embeddings, head) stay replicated: the blocks read the
modulation outside any unit's forward, and a unit's parameters must share one dtype, which the Linears' do.

The 8-bit Linears of ``wanrt.quant`` stay replicated (not sharded), with a log line.

Memory per rank: ``replicated + (sum of the Linears) / world_size + the two largest Linears`` (one gathered, one
prefetched); communication per step: every Linear once per forward, ``(world-1)/world`` of its bytes per rank.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..models.dit import Linear, WanDiT
from .mesh import ParallelMesh

log = logging.getLogger("wanrt")


def _units(model: WanDiT) -> tuple[list[nn.Module], int]:
    """The Linears to shard, in the order a forward calls them, and the count of 8-bit ones left replicated."""
    units, kept = [], 0
    for block in model.blocks:
        sa, ca = block.self_attn, block.cross_attn
        order = [sa.v, sa.q, sa.k, sa.o, ca.q, ca.k, ca.v]
        if hasattr(ca, "k_img"):
            order += [ca.k_img, ca.v_img]
        order += [ca.o, block.ffn[0], block.ffn[2]]
        for m in order:
            if isinstance(m, Linear):
                units.append(m)
            else:
                kept += 1
    return units, kept


def shard_weights(model: WanDiT, mesh: ParallelMesh, device: torch.device) -> dict[str, int]:
    """Shard ``model``'s block Linears over every rank of ``mesh`` and move the rest of the model to ``device``.

    ``model`` may sit on the CPU (load it there so the whole replica never occupies the GPU): the shards are
    placed on ``device`` by FSDP. Call :meth:`WanDiT.set_backend` afterwards. Returns ``{"units", "replicated_8bit",
    "sharded_bytes", "replicated_bytes"}`` (bytes per rank).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dmesh = init_device_mesh(device.type, (mesh.world_size,))
    units, kept = _units(model)
    full = sum(p.numel() * p.element_size() for u in units for p in u.parameters())
    for unit in units:  # each unit is its own FSDP root: reshard_after_forward must be explicit to free it
        fully_shard(unit, mesh=dmesh, reshard_after_forward=True)
    if device.type == "cuda":  # start the next unit's all-gather when a unit begins
        for unit, nxt in zip(units, units[1:]):
            unit.register_forward_pre_hook(lambda mod, args, nxt=nxt: nxt.unshard(async_op=True))
    sharded_ids = {id(p) for u in units for p in u.parameters()}
    replicated = 0
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) in sharded_ids:
                continue
            replicated += p.numel() * p.element_size()
            if p.device != device:
                setattr(module, name, nn.Parameter(p.detach().to(device), requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            if b.device != device:
                module.register_buffer(name, b.to(device))
    model._rope_tables = {}
    model._rope_last = None
    if kept:
        log.info("shard_weights: %d 8-bit Linears stay replicated (FSDP shards the float Linears only)", kept)
    return {"units": len(units), "replicated_8bit": kept, "sharded_bytes": full // mesh.world_size,
            "replicated_bytes": replicated}
