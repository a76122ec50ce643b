"""Attention over a sequence sharded across ranks: the eager reference with its log-sum-exp, the stable
log-sum-exp merge, Ring attention (K/V shards passed around a ring by point-to-point sends), Ulysses attention
(an all-to-all to a head shard, full attention, the all-to-all back) and the two combined.

Layouts: q/k/v ``[B, S, H, D]``; outputs float32 (float64 when the inputs are float64) ``[B, Sq, H, D]``;
log-sum-exp ``[B, H, Sq]``; key masks bool ``[B, Sk]`` (True: the key may be attended; padding is False).
Inference only: no autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .comm import heads_to_seq, seq_to_heads


#: ``attn(q, k, v) -> (out, lse)``: attention of ``q`` over every key of ``k``/``v`` with its log-sum-exp.
LseAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention (scale ``1/sqrt(D)``) of ``q`` ``[B, Sq, H, D]`` over ``k``/``v`` ``[B, Sk, H, D]``.

    Returns ``(out, lse)``: ``out`` ``[B, Sq, H, D]`` and ``lse`` ``[B, H, Sq]`` in float32 (float64 for
    float64 inputs). Keys where ``k_valid`` (bool ``[B, Sk]``) is False are never attended; a query with no
    valid key gets ``lse = -inf`` and ``out = 0`` (no NaN).
    """
    acc = _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), k.to(acc)) * scale
    if k_valid is not None:
        scores = scores.masked_fill(~k_valid.to(torch.bool)[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where every key is masked
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - finite[..., None])  # exp(-inf) = 0 on masked keys
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(acc))
    return out, lse


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
          lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two partial attentions over disjoint key sets into the attention over their union.

    ``out_*`` ``[B, Sq, H, D]``, ``lse_*`` ``[B, H, Sq]``. Stable (weights relative to the larger lse); a side
    with ``lse = -inf`` contributes nothing, and both ``-inf`` give ``out = 0``, ``lse = -inf``.
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w_a = torch.exp(lse_a - m)
    w_b = torch.exp(lse_b - m)
    total = w_a + w_b
    lse = m + torch.log(total)  # log(0) = -inf when both sides are empty
    safe = torch.where(total > 0, total, torch.ones_like(total))
    w_a = (w_a / safe).transpose(1, 2)[..., None]  # [B, Sq, H, 1]
    w_b = (w_b / safe).transpose(1, 2)[..., None]
    return out_a * w_a + out_b * w_b, lse


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_valid: torch.Tensor | None = None,
                   group=None, *, block_lens: Sequence[int] | None = None,
                   attn: LseAttention | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's queries over the keys of every rank of ``group`` (concatenated in rank order).

    Each rank holds equal-length shards ``q``/``k``/``v`` ``[B, S_local, H, D]`` (pad with ``pad_to_multiple``
    and mask the padding with ``k_valid``, bool ``[B, S_local]``). The K/V/mask shards travel around the ring
    (rank r sends to r+1, receives from r-1) with ``batch_isend_irecv``, the next transfer overlapping the
    current block's attention, and each block is merged into the running result. Returns ``(out, lse)`` as
    ``attention_with_lse`` over the full key sequence.

    ``block_lens`` (one int per rank of ``group``, in ring-rank order) says instead that only the first
    ``block_lens[j]`` keys of rank ``j``'s block are valid (padding at the end of the sequence): no mask
    travels, each block is sliced to its valid keys (an empty block contributes nothing), and ``attn(q, k, v)``
    (default the eager :func:`attention_with_lse`; see :func:`lse_attention`) computes each block.
    """
    if block_lens is not None:
        return _ring_prefix(q, k, v, list(block_lens), group, attn or attention_with_lse)
    if k_valid is None:
        k_valid = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
    if dist.get_world_size(group) == 1:
        return attention_with_lse(q, k, v, k_valid)
    out = lse = None
    # bool is not sent by every backend (gloo): the mask travels as uint8.
    for _, (kb, vb, valid) in _around_the_ring([k, v, k_valid.to(torch.uint8)], group):
        o, l = attention_with_lse(q, kb, vb, valid.to(torch.bool))
        out, lse = (o, l) if out is None else merge(out, lse, o, l)
    return out, lse


def _around_the_ring(blocks: list[torch.Tensor], group):
    """Yield ``(source ring rank, blocks)`` for every rank's blocks in turn, starting with this rank's own: rank r
    sends what it holds to r+1 and receives from r-1 (``batch_isend_irecv``), the next transfer started before
    the caller works on the current blocks and waited for after."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    blocks = [t.contiguous() for t in blocks]
    for step in range(world):
        reqs, incoming = [], blocks
        if step + 1 < world:
            incoming = [torch.empty_like(t) for t in blocks]
            ops = [dist.P2POp(dist.isend, t, nxt, group) for t in blocks]
            ops += [dist.P2POp(dist.irecv, t, prv, group) for t in incoming]
            reqs = dist.batch_isend_irecv(ops)
        yield (rank - step) % world, blocks  # the blocks now held came from ring rank (rank - step)
        for req in reqs:
            req.wait()
        blocks = incoming


def _ring_prefix(q, k, v, block_lens: list[int], group, attn: LseAttention):
    """Ring attention where rank ``j``'s block has ``block_lens[j]`` valid keys (a prefix)."""
    world = dist.get_world_size(group)
    if len(block_lens) != world:
        raise ValueError(f"block_lens has {len(block_lens)} entries for a ring of {world} ranks")
    acc = _acc_dtype(q.dtype)
    out = lse = None
    for source, (kb, vb) in _around_the_ring([k, v], group):
        n = block_lens[source]
        if n > 0:
            o, l = attn(q, kb[:, :n], vb[:, :n])
            o, l = o.to(acc), l.to(acc)
            out, lse = (o, l) if out is None else merge(out, lse, o, l)
    if out is None:  # no valid key anywhere
        b, s, h, d = q.shape
        out = q.new_zeros((b, s, h, d), dtype=acc)
        lse = q.new_full((b, h, s), float("-inf"), dtype=acc)
    return out, lse


def lse_attention(backend: str) -> LseAttention:
    """The attention-with-log-sum-exp of a kernel backend, for the blocks of Ring attention.

    ``triton``: wanrt's flash-attention kernel with its log-sum-exp output
    (:func:`wanrt.kernels.attention.attention_with_lse`). ``flash-attn`` (when installed, CUDA, fp16/bf16):
    ``flash_attn_func(..., return_attn_probs=True)``, whose second output is the log-sum-exp. Every other backend:
    the eager :func:`attention_with_lse` (float32 scores; memory ``B*H*Sq*Sk*4`` bytes per block, computed in query
    chunks of at most 2**28 scores).
    """
    if backend == "triton":
        from ..kernels.attention import attention_with_lse as triton_lse

        return triton_lse
    if backend == "flash-attn":
        from flash_attn import flash_attn_func  # an optional extra: only imported when selected

        def flash(q, k, v):
            if q.dtype not in (torch.float16, torch.bfloat16):
                return chunked_attention_with_lse(q, k, v)
            out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
            return out, lse

        return flash
    return chunked_attention_with_lse


def chunked_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               max_scores: int = 1 << 28) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_with_lse` (no mask) with the queries cut so that no chunk holds more than ``max_scores``
    float32 scores; the same result."""
    b, sq, h, _ = q.shape
    step = max(1, max_scores // max(1, b * h * k.shape[1]))
    if step >= sq:
        return attention_with_lse(q, k, v)
    parts = [attention_with_lse(q[:, i:i + step], k, v) for i in range(0, sq, step)]
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=2)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_valid_full: torch.Tensor | None = None,
                      group=None) -> torch.Tensor:
    """Attention of this rank's token shard ``q``/``k``/``v`` ``[B, S_local, H, D]`` over the whole sequence.

    ``seq_to_heads`` gives every rank all ``S = S_local*P`` tokens of ``H/P`` heads, full attention runs there
    with ``k_valid_full`` (bool ``[B, S]``, the padding mask over the whole sequence in rank order), and
    ``heads_to_seq`` brings the output back. Returns ``out`` ``[B, S_local, H, D]`` (float32, or float64).
    Raises ``ValueError`` when ``H`` does not divide by the group size.
    """
    qh, kh, vh = (seq_to_heads(t, group) for t in (q, k, v))
    out, _ = attention_with_lse(qh, kh, vh, k_valid_full)
    return heads_to_seq(out, group)


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_valid_block: torch.Tensor | None,
                  ulysses_group, ring_group) -> torch.Tensor:
    """Ulysses x Ring: the all-to-all over ``ulysses_group`` (U ranks), then Ring attention over ``ring_group``.

    The sequence is cut into ring blocks (one per rank of ``ring_group``, in ring-rank order), each block into
    U token shards (one per rank of ``ulysses_group``); this rank holds ``q``/``k``/``v`` ``[B, S_local, H, D]``.
    ``k_valid_block`` is the key mask of this rank's ring block (bool ``[B, U*S_local]``). Returns ``out``
    ``[B, S_local, H, D]`` (float32, or float64).
    """
    qh, kh, vh = (seq_to_heads(t, ulysses_group) for t in (q, k, v))
    out, _ = ring_attention(qh, kh, vh, k_valid_block, ring_group)
    return heads_to_seq(out, ulysses_group)
