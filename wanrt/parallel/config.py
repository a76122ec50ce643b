"""``ParallelConfig``: how the ranks of a multi-GPU run split the work (pure, no torch.distributed).

Three axes multiply to the world size: ``cfg`` (1 or 2: the conditional and unconditional branches of
classifier-free guidance on different ranks), ``ulysses`` (attention heads split by an all-to-all) and
``ring`` (the key/value sequence circulated around a ring of ranks). ``ulysses * ring`` ranks share one
sequence (``sp``, sequence parallel degree).
"""

from __future__ import annotations

from dataclasses import dataclass


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_layouts(world_size: int, num_heads: int) -> list[str]:
    """Every (cfg, ulysses, ring) layout valid for ``world_size`` ranks and ``num_heads`` heads, as text."""
    out = []
    for cfg in (1, 2):
        if world_size % cfg:
            continue
        sp = world_size // cfg
        for u in _divisors(sp):
            if num_heads % u:
                continue
            text = f"ulysses {u} x ring {sp // u}"
            out.append(text + (" x cfg 2" if cfg == 2 else ""))
    return out


@dataclass(frozen=True)
class ParallelConfig:
    """A layout of ranks: ``ulysses * ring * cfg`` ranks in all.

    Attributes:
        ulysses: ranks whose all-to-all trades token shards for head shards (divides the head count).
        ring: ranks passing key/value shards around a ring (any count).
        cfg: 2 puts the conditional and unconditional guidance branches on the two halves of the world.
        shard_weights: shard the DiT blocks' Linears over every rank with FSDP2 (``wanrt.parallel.shard``).
        frames_on_all_ranks: every rank's ``Video.frames`` holds the video (broadcast from rank 0); otherwise
            the other ranks get ``frames=None`` and the same metadata.

    Raises ``ValueError`` (from ``__post_init__``) when ``ulysses`` or ``ring`` is not a positive int, ``cfg``
    is not 1 or 2, or ``shard_weights`` / ``frames_on_all_ranks`` is not a bool.
    """

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    shard_weights: bool = False
    frames_on_all_ranks: bool = False

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring", "cfg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelConfig.{name} must be a positive int, got {value!r}")
        if self.cfg not in (1, 2):
            raise ValueError(f"ParallelConfig.cfg must be 1 or 2 (the two guidance branches), got {self.cfg!r}")
        for name in ("shard_weights", "frames_on_all_ranks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ParallelConfig.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def sp(self) -> int:
        """Ranks sharing one sequence: ``ulysses * ring``."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        """Ranks in all: ``ulysses * ring * cfg``."""
        return self.ulysses * self.ring * self.cfg

    def check(self, world_size: int, num_heads: int) -> None:
        """Raise ``ValueError`` unless this layout fits ``world_size`` ranks and a model of ``num_heads`` heads.

        The message lists the valid layouts for that world size and head count.
        """
        problems = []
        if self.world_size != world_size:
            problems.append(f"ulysses {self.ulysses} x ring {self.ring} x cfg {self.cfg} = {self.world_size} ranks, "
                            f"but the world size is {world_size}")
        if num_heads % self.ulysses:
            problems.append(f"{num_heads} heads do not divide by ulysses {self.ulysses}")
        if problems:
            layouts = valid_layouts(world_size, num_heads)
            raise ValueError("; ".join(problems) + f". Valid layouts for {world_size} ranks and {num_heads} heads: "
                             + (", ".join(layouts) if layouts else "none"))

    @classmethod
    def auto(cls, world_size: int, num_heads: int, guidance: bool) -> "ParallelConfig":
        """The default layout: ``cfg=2`` first when ``guidance`` and ``world_size`` is even, then Ulysses over the
        largest divisor of ``num_heads`` that divides the remaining ranks, Ring for the rest.

        Raises ``ValueError`` when ``world_size`` or ``num_heads`` is not a positive int.
        """
        for name, value in (("world_size", world_size), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        cfg = 2 if guidance and world_size % 2 == 0 else 1
        sp = world_size // cfg
        ulysses = max(d for d in _divisors(sp) if num_heads % d == 0)
        return cls(ulysses=ulysses, ring=sp // ulysses, cfg=cfg)


def resolve_layout(parallel: ParallelConfig | str, world_size: int, num_heads: int, guidance: bool) -> ParallelConfig:
    """``parallel`` itself (checked against ``world_size`` and ``num_heads``), or for ``"auto"`` the layout of
    :meth:`ParallelConfig.auto`.

    Raises:
        ValueError: a layout that does not fit (the message lists the valid ones), or ``parallel`` neither a
            ``ParallelConfig`` nor ``"auto"``.
    """
    if parallel == "auto":
        return ParallelConfig.auto(world_size, num_heads, guidance)
    if not isinstance(parallel, ParallelConfig):
        raise ValueError(f"parallel must be a ParallelConfig, 'auto' or None, got {parallel!r}")
    parallel.check(world_size, num_heads)
    return parallel
