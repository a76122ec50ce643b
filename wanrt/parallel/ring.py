"""Attention over a sequence sharded across ranks: the eager reference with its log-sum-exp, the stable
log-sum-exp merge, Ring attention (K/V shards passed around a ring by point-to-point sends), Ulysses attention
(an all-to-all to a head shard, full attention, the all-to-all back) and the two combined.

Layouts: q/k/v ``[B, S, H, D]``; outputs float32 (float64 when the inputs are float64) ``[B, Sq, H, D]``;
log-sum-exp ``[B, H, Sq]``; key masks bool ``[B, Sk]`` (True: the key may be attended; padding is False).
Inference only: no autograd.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .comm import heads_to_seq, seq_to_heads


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
                   group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's queries over the keys of every rank of ``group`` (concatenated in rank order).

    Each rank holds equal-length shards ``q``/``k``/``v`` ``[B, S_local, H, D]`` (pad with ``pad_to_multiple``
    and mask the padding with ``k_valid``, bool ``[B, S_local]``). The K/V/mask shards travel around the ring
    (rank r sends to r+1, receives from r-1) with ``batch_isend_irecv``, the next transfer overlapping the
    current block's attention, and each block is merged into the running result. Returns ``(out, lse)`` as
    ``attention_with_lse`` over the full key sequence.
    """
    world = dist.get_world_size(group)
    if k_valid is None:
        k_valid = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
    if world == 1:
        return attention_with_lse(q, k, v, k_valid)
    rank = dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    # bool is not sent by every backend (gloo): the mask travels as uint8.
    blocks = [k.contiguous(), v.contiguous(), k_valid.to(torch.uint8).contiguous()]
    out = lse = None
    for step in range(world):
        reqs = []
        if step + 1 < world:
            incoming = [torch.empty_like(t) for t in blocks]
            ops = [dist.P2POp(dist.isend, t, nxt, group) for t in blocks]
            ops += [dist.P2POp(dist.irecv, t, prv, group) for t in incoming]
            reqs = dist.batch_isend_irecv(ops)
        o, l = attention_with_lse(q, blocks[0], blocks[1], blocks[2].to(torch.bool))
        out, lse = (o, l) if out is None else merge(out, lse, o, l)
        for req in reqs:
            req.wait()
        if reqs:
            blocks = incoming
    return out, lse


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
