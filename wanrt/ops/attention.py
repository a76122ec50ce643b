"""Multi-head attention over ``[B, S, heads, head_dim]`` tensors, with a backend per call.

Reproduces ``wan/modules/attention.py::flash_attention`` of the official Wan2.1 code
(docs/model-reference.md §2.7, §2.9): softmax scale ``1/sqrt(head_dim)``, no dropout, not
causal, optional per-sample key lengths that mask padded keys (queries are never trimmed), and
optionally the DiT's 3-D RoPE applied to q and k first. The backends are described in
:mod:`wanrt.ops.backends`; the optional packages are imported on first use only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from wanrt.ops.backends import ATTENTION_BACKENDS, BackendUnavailableError
from wanrt.ops.rope import RopeTable, _check_rope_shapes, rope_rotate_eager

AttentionFn = Callable[..., torch.Tensor]

#: Scores materialised at once by the eager path (elements of [B, heads, q-chunk, Sk] in fp32).
EAGER_CHUNK_ELEMENTS = 1 << 26


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_lens: torch.Tensor | None = None,
    rope: RopeTable | None = None,
    backend: str = "eager",
) -> torch.Tensor:
    """Multi-head attention ``softmax(q' k'^T / sqrt(head_dim) + mask) v``.

    ``q' = rope(q)``, ``k' = rope(k)`` rounded back to the input dtype when ``rope`` is given (the
    official self-attention), else ``q``, ``k``.

    Args:
        q: Queries ``[B, Sq, heads, head_dim]`` (any strides).
        k: Keys ``[B, Sk, heads, head_dim]``, same dtype as ``q``.
        v: Values ``[B, Sk, heads, head_dim]``, same dtype as ``q``.
        k_lens: Optional integer tensor ``[B]``: sample ``b`` attends only to keys
            ``0 .. k_lens[b]-1``. ``None`` attends to every key (the official code passes
            ``None`` for cross-attention and the real sequence lengths for self-attention).
            Each length must be >= 1.
        rope: Optional rotations of the first ``S_grid`` tokens (self-attention, ``Sq == Sk``).
        backend: A name of :data:`wanrt.ops.backends.ATTENTION_BACKENDS`. ``triton`` fuses the
            RoPE into the kernel; the others rotate first with the eager float64 RoPE.

    Returns:
        ``[B, Sq, heads, head_dim]`` in the inputs' dtype.

    Raises:
        ValueError: on rank, shape or dtype mismatches, or an unknown backend.
        BackendUnavailableError: the backend's package is missing, or it cannot honour a real
            key-padding mask.
    """
    _check_qkv(q, k, v, k_lens)
    if rope is not None:
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"attention: rope needs Sq == Sk (self-attention), got {q.shape[1]} and {k.shape[1]}")
        _check_rope_shapes(q, rope.rot)
    if backend == "triton":
        from wanrt.kernels import attention as kernel

        cos, sin = (None, None) if rope is None else (rope.cos, rope.sin)
        return kernel.attention(q, k, v, k_lens, cos, sin)
    if rope is not None:
        q = rope_rotate_eager(q, rope.rot).to(v.dtype)
        k = rope_rotate_eager(k, rope.rot).to(v.dtype)
    return _impl(backend)(q, k, v, k_lens=k_lens)


def attention_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_lens: torch.Tensor | None = None,
    rope: RopeTable | None = None,
) -> torch.Tensor:
    """Reference :func:`attention`: explicit ``softmax(q k^T * scale) v`` in float32.

    Scores, softmax and the weighted sum are float32 whatever the input dtype (the accumulation
    precision of FlashAttention); queries are processed in chunks so at most
    :data:`EAGER_CHUNK_ELEMENTS` scores exist at once. RoPE (if any) is the float64 eager one.
    """
    return attention(q, k, v, k_lens=k_lens, rope=rope, backend="eager")


def _attn_eager(q, k, v, *, k_lens=None):
    b, sq, n, d = q.shape
    sk = k.shape[1]
    qf = q.float().transpose(1, 2) * (1.0 / math.sqrt(d))  # [B, n, Sq, d]
    kf = k.float().transpose(1, 2)  # [B, n, Sk, d]
    vf = v.float().transpose(1, 2)  # [B, n, Sk, d]
    bias = None
    if k_lens is not None:
        keep = torch.arange(sk, device=k.device)[None, :] < k_lens.to(k.device)[:, None]  # [B, Sk]
        bias = torch.zeros(b, 1, 1, sk, device=q.device).masked_fill(~keep[:, None, None, :], float("-inf"))
    chunk = max(1, EAGER_CHUNK_ELEMENTS // max(1, b * n * sk))
    out = torch.empty(b, n, sq, d, dtype=torch.float32, device=q.device)
    for s0 in range(0, sq, chunk):
        scores = qf[:, :, s0:s0 + chunk] @ kf.transpose(-1, -2)  # [B, n, c, Sk]
        if bias is not None:
            scores = scores + bias
        out[:, :, s0:s0 + chunk] = torch.softmax(scores, dim=-1) @ vf  # [B, n, c, d]
    return out.transpose(1, 2).to(q.dtype)  # [B, Sq, n, d]


def _attn_sdpa(q, k, v, *, k_lens=None):
    mask = None
    if k_lens is not None:
        pos = torch.arange(k.shape[1], device=k.device)  # [Sk]
        mask = (pos[None, :] < k_lens.to(device=k.device)[:, None])[:, None, None, :]  # [B, 1, 1, Sk]
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


def _attn_flash(q, k, v, *, k_lens=None):
    scale = q.shape[-1] ** -0.5
    try:  # FlashAttention-3 (Hopper)
        import flash_attn_interface as fa

        fa3 = True
    except ImportError:
        import flash_attn as fa

        fa3 = False
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if k_lens is None:
        kw = {} if fa3 else {"dropout_p": 0.0}
        out = fa.flash_attn_func(q, k, v, softmax_scale=scale, causal=False, **kw)
    else:
        b, sq, n, d = q.shape
        sk = k.shape[1]
        lens = k_lens.to(device=q.device, dtype=torch.int32).clamp(max=sk)
        keep = torch.arange(sk, device=q.device)[None, :] < lens[:, None]  # [B, Sk]
        cu_q = torch.arange(0, (b + 1) * sq, sq, device=q.device, dtype=torch.int32)  # [B+1]
        cu_k = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # [B+1]
        max_k = int(lens.max())
        kw = {} if fa3 else {"dropout_p": 0.0}
        out = fa.flash_attn_varlen_func(
            q.reshape(b * sq, n, d), k[keep], v[keep], cu_q, cu_k, sq, max_k,
            softmax_scale=scale, causal=False, **kw,
        )
        if isinstance(out, tuple):
            out = out[0]
        out = out.reshape(b, sq, n, d)
    return out[0] if isinstance(out, tuple) else out


def _attn_sage(q, k, v, *, k_lens=None):
    import sageattention

    _drop_noop_mask("sageattention", k, k_lens)
    return sageattention.sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=q.shape[-1] ** -0.5)


def _attn_xformers(q, k, v, *, k_lens=None):
    import xformers.ops as xops

    _drop_noop_mask("xformers", k, k_lens)
    return xops.memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=q.shape[-1] ** -0.5)


def _drop_noop_mask(name: str, k: torch.Tensor, k_lens: torch.Tensor | None) -> None:
    """A mask that keeps every key may be dropped; a real one must not be (no silent drop)."""
    if k_lens is not None and bool((k_lens < k.shape[1]).any()):
        able = [n for n, b in ATTENTION_BACKENDS.items() if b.supports_mask]
        raise BackendUnavailableError(
            f"attention backend {name!r} cannot honour a key-padding mask (k_lens < {k.shape[1]}); "
            f"use one of {able}"
        )


_IMPLS: dict[str, tuple[AttentionFn, tuple[str, ...]]] = {
    "eager": (_attn_eager, ()),
    "sdpa": (_attn_sdpa, ()),
    "flash-attn": (_attn_flash, ("flash_attn_interface", "flash_attn")),
    "sageattention": (_attn_sage, ("sageattention",)),
    "xformers": (_attn_xformers, ("xformers",)),
}


@functools.cache
def _checked_import(packages: tuple[str, ...]) -> bool:
    import importlib.util

    return not packages or any(importlib.util.find_spec(p) is not None for p in packages)


def _impl(backend: str) -> AttentionFn:
    if backend not in _IMPLS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(ATTENTION_BACKENDS)}")
    fn, packages = _IMPLS[backend]
    if packages and not _checked_import(packages):  # built-ins skip the (cached) package probe
        spec = ATTENTION_BACKENDS[backend]
        raise BackendUnavailableError(
            f"attention backend {backend!r} needs the {' or '.join(packages)} package: {spec.install}")
    return fn


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
