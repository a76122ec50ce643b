"""What the ranks of a parallel run must agree on, and the CFG-parallel step.

* :class:`RankSync`: one small all-reduce per denoising step makes the NaN check and the stop (callback or
  cancel Event) collective: a NaN or a cancel on any rank stops every rank at the same step.
* :func:`teacache_agreement`: TeaCache's compute/skip decision of each branch is taken on the first rank of the
  ranks computing it and broadcast (one byte per branch and step), so every rank skips the same steps.
* :class:`CfgParallelStep`: with ``cfg=2`` each half of the world computes one guidance branch; the two
  velocities are exchanged once per step (an all-gather over the two-rank CFG group) and combined as
  ``v_u + g (v_c - v_u)``, exactly the single-process formula.
* :func:`broadcast_tensors`: conditioning computed on rank 0 (text embeddings, image conditioning) sent to all.

A collective that fails (a rank died, or the group's timeout passed) raises :class:`RankFailure`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .mesh import ParallelMesh


class RankFailure(RuntimeError):
    """A collective of a parallel run failed: another rank raised, died or stopped answering within the timeout."""


def _fail(what: str, mesh: ParallelMesh, e: BaseException) -> RankFailure:
    return RankFailure(f"rank {mesh.rank} of {mesh.world_size}: {what} failed; another rank failed, exited or did not "
                       f"answer within the group's timeout ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def _flag_device(device: torch.device) -> torch.device:
    """Where small agreement tensors live: ``device`` under NCCL, the CPU under gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


class RankSync:
    """``sync(nonfinite, stop) -> (nonfinite, stop)``: the logical OR of each flag over every rank (one
    ``all_reduce(MAX)`` of two bytes). ``calls`` counts them (one per step, one before the first)."""

    def __init__(self, mesh: ParallelMesh, device: torch.device):
        self.mesh = mesh
        self.device = _flag_device(device)
        self.calls = 0

    def __call__(self, nonfinite: bool, stop: bool) -> tuple[bool, bool]:
        flags = torch.tensor([int(nonfinite), int(stop)], dtype=torch.int32, device=self.device)
        try:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.mesh.world)
        except (RuntimeError, dist.DistError) as e:
            raise _fail("the per-step agreement (NaN check, cancel)", self.mesh, e) from e
        self.calls += 1
        nonfinite, stop = (bool(f) for f in flags.tolist())
        return nonfinite, stop


def teacache_agreement(mesh: ParallelMesh, device: torch.device):
    """The ``agree(branch, compute) -> compute`` hook of :class:`~wanrt.cache.teacache.TeaCache`: the decision of
    the sequence-parallel group's first rank (``mesh.sp_root``), broadcast within the group."""
    dev = _flag_device(device)

    def agree(branch: str, compute: bool) -> bool:
        if mesh.sp == 1:
            return compute
        flag = torch.tensor([int(compute)], dtype=torch.int32, device=dev)
        try:
            dist.broadcast(flag, src=mesh.sp_root, group=mesh.sp_group)
        except (RuntimeError, dist.DistError) as e:
            raise _fail(f"the TeaCache decision of branch {branch!r}", mesh, e) from e
        return bool(flag.item())

    return agree


def broadcast_tensors(tensors: list[torch.Tensor] | None, mesh: ParallelMesh, device: torch.device,
                      src: int = 0) -> list[torch.Tensor]:
    """``tensors`` of rank ``src`` on every rank (shapes and dtypes sent first), on ``device``. Other ranks pass
    None (or anything: it is replaced)."""
    meta = [[(tuple(t.shape), t.dtype) for t in tensors] if mesh.rank == src else None]
    try:
        dist.broadcast_object_list(meta, src=src, device=_flag_device(device))
        out = []
        for i, (shape, dtype) in enumerate(meta[0]):
            buf = tensors[i].to(device).contiguous() if mesh.rank == src else torch.empty(shape, dtype=dtype,
                                                                                           device=device)
            dist.broadcast(buf, src=src)
            out.append(buf)
    except (RuntimeError, dist.DistError) as e:
        raise _fail("broadcasting the conditioning", mesh, e) from e
    return out


class CfgParallelStep:
    """The guided velocity with the two CFG branches on the two halves of the world.

    Args:
        inner: the :class:`~wanrt.sampling.loop.GuidedStep` of this half's branch (guidance 1, one branch).
        mesh: the layout (``cfg=2``).
        guidance_scale: ``g``.
        guided: False when the request has no CFG (guidance 1): both halves compute the conditional branch and
            nothing is exchanged.

    ``__call__(x, t, step)`` returns ``[1, 16, F, H, W]`` float32, a buffer overwritten by the next call.
    """

    def __init__(self, inner, mesh: ParallelMesh, guidance_scale: float, guided: bool):
        self.inner, self.mesh = inner, mesh
        self.guidance_scale = float(guidance_scale)
        self.guided = guided
        self._out: torch.Tensor | None = None
        self.exchanged_bytes = 0

    def __call__(self, x: torch.Tensor, t: int, step: int) -> torch.Tensor:
        v = self.inner(x, t, step)  # this half's branch
        if not self.guided:
            return v
        parts = [torch.empty_like(v) for _ in range(2)]
        try:
            dist.all_gather(parts, v.contiguous(), group=self.mesh.cfg_group)  # [cond (half 0), uncond (half 1)]
        except (RuntimeError, dist.DistError) as e:
            raise _fail("the CFG velocity exchange", self.mesh, e) from e
        self.exchanged_bytes += v.numel() * v.element_size()
        if self._out is None or self._out.shape != v.shape:
            self._out = torch.empty_like(v)
        return torch.lerp(parts[1], parts[0], self.guidance_scale, out=self._out)
