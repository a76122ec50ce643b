"""``ParallelMesh``: the process groups of a :class:`~wanrt.parallel.config.ParallelConfig` on the default group.

Rank order (global rank ``g``)::

    g = cfg_rank * sp + sp_rank            (sp = ulysses * ring ranks share one sequence)
    sp_rank = ring_rank * ulysses + ulysses_rank

so a Ulysses group is ``ulysses`` consecutive ranks (on one node first: its all-to-all is the heaviest
collective), a ring group strides by ``ulysses``, and the two CFG halves are the lower and upper half of the
world. The token sequence is cut into ``sp`` equal shards in ``sp_rank`` order: ring block ``j`` is the
``ulysses`` shards of ring rank ``j``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .config import ParallelConfig


@dataclass(frozen=True)
class ParallelMesh:
    """This rank's place in a layout and the groups it communicates in (built by :func:`build_mesh`).

    Attributes:
        config: the layout. rank, world_size: of the default group.
        cfg_rank: 0 (conditional branch) or 1 (unconditional) with ``cfg=2``, else 0.
        sp_rank: this rank's token shard within its CFG half; ulysses_rank, ring_rank: its coordinates.
        world, sp_group, ulysses_group, ring_group, cfg_group: process groups (``cfg_group`` joins the two
            ranks of equal ``sp_rank`` in the two halves; ``None`` with ``cfg=1``).
        sp_root: the global rank of ``sp_rank`` 0 in this rank's half (where its decisions are taken).
    """

    config: ParallelConfig
    rank: int
    world_size: int
    cfg_rank: int
    sp_rank: int
    ulysses_rank: int
    ring_rank: int
    world: object
    sp_group: object
    ulysses_group: object
    ring_group: object
    cfg_group: object
    sp_root: int

    @property
    def sp(self) -> int:
        """Ranks sharing one sequence (``ulysses * ring``)."""
        return self.config.sp

    @property
    def is_root(self) -> bool:
        """Global rank 0: loads the text encoder, prints progress, writes files."""
        return self.rank == 0

    def describe(self) -> str:
        """``"ulysses 2 x ring 2 x cfg 1 (4 ranks)"``, plus ``", sharded weights"``."""
        c = self.config
        text = f"ulysses {c.ulysses} x ring {c.ring} x cfg {c.cfg} ({self.world_size} ranks)"
        return text + (", sharded weights" if c.shard_weights else "")


def build_mesh(config: ParallelConfig, num_heads: int) -> ParallelMesh:
    """The groups of ``config`` on the initialized default group. Every rank must call this, in the same order
    (``new_group`` is collective).

    Raises:
        RuntimeError: no process group (the message names ``wanrt.distributed.init()`` and torchrun).
        ValueError: the layout does not fit the world size or ``num_heads`` (:meth:`ParallelConfig.check`).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("a parallel layout needs an initialized process group: launch with "
                           "`torchrun --nproc-per-node N ...` and call wanrt.distributed.init() before creating the "
                           "Engine (or use `wanrt generate --nproc N`)")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    config.check(world_size, num_heads)
    u, r, sp = config.ulysses, config.ring, config.sp
    cfg_rank, sp_rank = divmod(rank, sp)
    ring_rank, ulysses_rank = divmod(sp_rank, u)

    def groups(rank_lists: list[list[int]], mine: int) -> object:
        """Create every group of ``rank_lists`` (collective: all ranks create all) and return the one holding
        rank ``mine``; a one-rank group is never used for communication but created all the same."""
        chosen = None
        for ranks in rank_lists:
            group = dist.new_group(ranks)
            if mine in ranks:
                chosen = group
        return chosen

    halves = [[c * sp + s for s in range(sp)] for c in range(config.cfg)]
    sp_group = dist.group.WORLD if config.cfg == 1 else groups(halves, rank)
    ulysses_group = groups([[c * sp + j * u + i for i in range(u)] for c in range(config.cfg) for j in range(r)],
                           rank) if u > 1 else None
    ring_group = groups([[c * sp + j * u + i for j in range(r)] for c in range(config.cfg) for i in range(u)],
                        rank) if r > 1 else None
    cfg_group = groups([[c * sp + s for c in range(config.cfg)] for s in range(sp)], rank) \
        if config.cfg > 1 else None
    return ParallelMesh(config, rank, world_size, cfg_rank, sp_rank, ulysses_rank, ring_rank, dist.group.WORLD,
                        sp_group, ulysses_group, ring_group, cfg_group, sp_root=cfg_rank * sp)
