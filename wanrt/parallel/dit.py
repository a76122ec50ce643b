"""Sequence parallelism of the DiT: every rank of a sequence-parallel group holds ``ceil(L / sp)`` tokens of the
patchified video; self-attention alone crosses ranks (Ulysses all-to-all, Ring K/V passing, or both), and the
head's per-token output is gathered back into the whole velocity.

:class:`SequenceParallelDiT` has the interface the denoising step drives (``prepare`` / ``run_blocks`` /
``run_head`` / ``time_embeddings``, ``config``, ``plan``, ``blocks``), so :class:`~wanrt.sampling.loop.GuidedStep`,
TeaCache (its residual is per rank: ``[B, S_local, dim]``) and CUDA graphs run on it unchanged.

Padding is masked, never attended: the sequence is padded at its end to a multiple of ``sp`` (zero tokens,
identity RoPE rows); after the Ulysses all-to-all every rank sees the whole sequence and drops the padded keys,
and in the ring each rank knows the valid key count of every block without communication. Padded queries are
computed and dropped before the unpatchify, so the result equals the single-process forward up to float
summation order.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models.dit import DiTInputs, WanDiT
from ..ops import RopeTable, attention
from .comm import heads_to_seq, seq_to_heads
from .mesh import ParallelMesh
from .ring import lse_attention, ring_attention


@dataclasses.dataclass(frozen=True)
class TokenShards:
    """How ``length`` tokens are cut into ``sp`` shards of ``shard`` tokens (the last ones padded)."""

    length: int
    sp: int

    @property
    def shard(self) -> int:
        """Tokens per rank, ``ceil(length / sp)``."""
        return -(-self.length // self.sp)

    @property
    def padded(self) -> int:
        """``shard * sp``."""
        return self.shard * self.sp

    def valid(self, start: int, size: int) -> int:
        """How many of the tokens ``[start, start + size)`` are real (not padding)."""
        return max(0, min(size, self.length - start))


class SeqParallelAttention:
    """Self-attention over a sequence sharded across the ranks of ``mesh`` (the ``sp`` of :class:`DiTInputs`).

    ``__call__(q, k, v, plan)``: this rank's ``[B, S_local, n, d]`` → ``[B, S_local, n, d]`` in ``v``'s dtype.
    Ulysses only: the all-to-all, the plan's attention backend over the unpadded keys, the all-to-all back.
    With Ring: the all-to-all (when ``ulysses > 1``), Ring attention with the plan backend's log-sum-exp
    variant (:func:`~wanrt.parallel.ring.lse_attention`), the all-to-all back.
    """

    def __init__(self, mesh: ParallelMesh, shards: TokenShards):
        self.mesh, self.shards = mesh, shards
        u = mesh.config.ulysses
        block = u * shards.shard  # the tokens of one ring block
        self.block_lens = [shards.valid(j * block, block) for j in range(mesh.config.ring)]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> torch.Tensor:
        m = self.mesh
        u, r = m.config.ulysses, m.config.ring
        if u > 1:
            q, k, v = (seq_to_heads(t, m.ulysses_group) for t in (q, k, v))  # [B, U*S_local, n/U, d]
        if r == 1:  # every key of the sequence is here: drop the padded ones
            n = self.shards.length
            out = attention(q, k[:, :n], v[:, :n], backend=plan.attention)
        else:
            out, _ = ring_attention(q, k, v, group=m.ring_group, block_lens=self.block_lens,
                                    attn=lse_attention(plan.attention))
            out = out.to(v.dtype)
        if u > 1:
            out = heads_to_seq(out, m.ulysses_group)  # [B, S_local, n, d]
        return out


def _gather_tokens(x: torch.Tensor, mesh: ParallelMesh, length: int) -> torch.Tensor:
    """This rank's ``[B, S_local, C]`` → the whole ``[B, length, C]`` (every rank of the sp group)."""
    sp = mesh.sp
    if sp == 1:
        return x[:, :length]
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(sp)]
    dist.all_gather(parts, x, group=mesh.sp_group)  # in sp-rank order = token order
    return torch.cat(parts, dim=1)[:, :length]


class SequenceParallelDiT:
    """A :class:`~wanrt.models.dit.WanDiT` run sequence-parallel over ``mesh.sp`` ranks (its weights unchanged).

    ``prepare`` embeds the whole input on every rank (the patch embedding, time and text embeddings are cheap and
    replicated) and keeps this rank's token shard and RoPE rows; ``run_blocks`` runs the blocks on the shard;
    ``run_head`` runs the head on the shard and all-gathers the tokens into the whole velocity ``[B, 16, F, H,
    W]`` (identical on every rank). The blocks' output of ``run_head`` stays the shard (for TeaCache).
    """

    def __init__(self, model: WanDiT, mesh: ParallelMesh):
        self.model, self.mesh = model, mesh

    # what the step reads of a model
    @property
    def config(self):
        return self.model.config

    @property
    def plan(self):
        return self.model.plan

    @property
    def blocks(self):
        return self.model.blocks

    @property
    def head(self):
        return self.model.head

    def time_embeddings(self, t, batch, device=None):
        return self.model.time_embeddings(t, batch, device)

    def prepare(self, x, t, context, *, y=None, clip_fea=None, vace_context=None, vace_scale=1.0) -> DiTInputs:
        """:meth:`WanDiT.prepare`, then this rank's shard: ``x`` ``[B, S_local, dim]`` (and VACE's hint-stream
        tokens and the per-token timesteps' ``t_index`` alike), ``rope`` its rows (identity on the padding), ``sp`` the cross-rank self-attention."""
        inp = self.model.prepare(x, t, context, y=y, clip_fea=clip_fea, vace_context=vace_context,
                                 vace_scale=vace_scale)
        shards = TokenShards(inp.x.shape[1], self.mesh.sp)
        lo, hi = self.mesh.sp_rank * shards.shard, (self.mesh.sp_rank + 1) * shards.shard
        tokens = F.pad(inp.x, (0, 0, 0, shards.padded - shards.length))[:, lo:hi]  # [B, S_local, dim]
        if inp.vace is not None:
            inp = dataclasses.replace(inp, vace=F.pad(inp.vace, (0, 0, 0, shards.padded - shards.length))[:, lo:hi])
        if inp.t_index is not None:  # per-token timesteps: each token's modulation row, sharded as the tokens (pad
            # tokens read row 0: any row will do, their queries are dropped and their keys masked)
            inp = dataclasses.replace(inp, t_index=F.pad(inp.t_index, (0, shards.padded - shards.length))[:, lo:hi])
        rot = inp.rope.rot[:shards.length]  # [L, d/2] complex128 (rows past the grid rotate by 1)
        if rot.shape[0] < shards.padded:
            rot = torch.cat([rot, rot.new_ones(shards.padded - rot.shape[0], rot.shape[1])])
        rope = RopeTable.from_rot(rot[lo:hi])
        return dataclasses.replace(inp, x=tokens, rope=rope, sp=SeqParallelAttention(self.mesh, shards))

    def run_blocks(self, inp: DiTInputs):
        """:meth:`WanDiT.run_blocks` on this rank's shard."""
        return self.model.run_blocks(inp)

    def run_head(self, inp: DiTInputs, x: torch.Tensor, pending=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(velocity [B, 16, F, H, W] float32, the whole sequence; blocks' output [B, S_local, dim], the shard)``."""
        tokens, out = self.model.head_tokens(inp, x, pending)  # [B, S_local, C], [B, S_local, dim]
        tokens = _gather_tokens(tokens, self.mesh, inp.sp.shards.length)  # [B, L, C]
        return self.model._unpatchify(tokens, inp.grid).float(), out
