"""Scaled dot-product attention over ``[B, S, heads, head_dim]`` tensors.

Reproduces ``wan/modules/attention.py::flash_attention`` of the official Wan2.1 code
(docs/wan21-reference.md §2.7, §2.9): softmax scale ``1/sqrt(head_dim)``, no dropout, not
causal, optional per-sample key lengths that mask padded keys (queries are never trimmed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T / sqrt(head_dim) + mask) v``.

    Args:
        q: Queries ``[B, Sq, heads, head_dim]``.
        k: Keys ``[B, Sk, heads, head_dim]``, same dtype as ``q``.
        v: Values ``[B, Sk, heads, head_dim]``, same dtype as ``q``.
        k_lens: Optional integer tensor ``[B]``: sample ``b`` attends only to keys
            ``0 .. k_lens[b]-1``. ``None`` attends to every key (the official code passes
            ``None`` for cross-attention and the real sequence lengths for self-attention).
            Each length must be >= 1, a row with no key to attend gives NaN.

    Returns:
        ``[B, Sq, heads, head_dim]`` in the inputs' dtype.

    Raises:
        ValueError: on rank, shape or dtype mismatches.
    """
    return attention_eager(q, k, v, k_lens=k_lens)


def attention_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch :func:`attention` via ``torch.nn.functional.scaled_dot_product_attention``."""
    _check_qkv(q, k, v, k_lens)
    mask = None
    if k_lens is not None:
        sk = k.shape[1]
        pos = torch.arange(sk, device=k.device)  # [Sk]
        mask = pos[None, :] < k_lens.to(device=k.device)[:, None]  # [B, Sk] True = attend
        mask = mask[:, None, None, :]  # [B, 1, 1, Sk], broadcast over heads and queries
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # [B, heads, Sq, head_dim]
        k.transpose(1, 2),  # [B, heads, Sk, head_dim]
        v.transpose(1, 2),  # [B, heads, Sk, head_dim]
        attn_mask=mask,
        dropout_p=0.0,
        is_causal=False,
        scale=q.shape[-1] ** -0.5,
    )  # [B, heads, Sq, head_dim]
    return out.transpose(1, 2)  # [B, Sq, heads, head_dim]


def _check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None
) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects q, k, v of shape [B, S, heads, head_dim]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must share B, heads, head_dim"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if k_lens is not None and tuple(k_lens.shape) != (q.shape[0],):
        raise ValueError(f"attention: k_lens must be [B={q.shape[0]}], got {tuple(k_lens.shape)}")
