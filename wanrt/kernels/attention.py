"""FlashAttention-style forward kernel with fused 3-D RoPE and per-sample key lengths.

Three layers, as every kernel file in :mod:`wanrt.kernels`:

1. ``_attn_fwd``: the private ``@triton.jit`` kernel (online softmax, fp32 accumulation), and
   ``_attn_fwd_tuned``, the same function under ``triton.autotune`` for GPUs;
2. :func:`_launch`: checks shapes, dtypes, devices and strides, allocates the output, launches;
3. the ``wanrt::attention`` ``torch.library`` custom op with its fake registration, so
   ``torch.compile`` and CUDA graphs see one opaque op; :func:`attention` is the public entry.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from wanrt.kernels._common import TORCH_FLOAT_DTYPES, cast_rne, check_device, interpreting, next_pow2

_LOG2E = 1.4426950408889634

# ------------------------------------------------------------------------------------------------
# 1. Triton kernel
# ------------------------------------------------------------------------------------------------


@triton.jit
def _rope_tile(x, Cos, Sin, stride_cs, offs_s, S_rot,
               HALF_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate interleaved pairs of a ``[BLOCK_S, BLOCK_D]`` fp32 tile at token positions ``offs_s``.

    Tokens ``>= S_rot`` (and padded dims) get cos = 1, sin = 0, i.e. pass unrotated.
    """
    offs_j = tl.arange(0, BLOCK_D // 2)
    cs_mask = (offs_s[:, None] < S_rot) & (offs_j[None, :] < HALF_D)
    cs_off = offs_s[:, None].to(tl.int64) * stride_cs + offs_j[None, :]
    c = tl.load(Cos + cs_off, mask=cs_mask, other=1.0)  # [BLOCK_S, BLOCK_D/2]
    s = tl.load(Sin + cs_off, mask=cs_mask, other=0.0)  # [BLOCK_S, BLOCK_D/2]
    xe, xo = tl.split(tl.reshape(x, [BLOCK_S, BLOCK_D // 2, 2]))  # even / odd dims of each pair
    re = xe * c - xo * s
    ro = xe * s + xo * c
    return tl.reshape(tl.join(re, ro), [BLOCK_S, BLOCK_D])


@triton.jit
def _attn_block(acc, l_i, m_i, q, K, V, Cos, Sin, start_n, kv_len,
                stride_ks, stride_vs, stride_cs, S_rot, qk_scale,
                D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_ROPE: tl.constexpr, IEEE: tl.constexpr, INTERP_BF16: tl.constexpr, MASKED: tl.constexpr):
    """One key/value block of the online softmax; ``MASKED`` only for the last, partial block."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = K + offs_n[:, None].to(tl.int64) * stride_ks + offs_d[None, :]
    v_ptrs = V + offs_n[:, None].to(tl.int64) * stride_vs + offs_d[None, :]
    if MASKED:
        kv_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < D)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    elif BLOCK_D != D:
        k = tl.load(k_ptrs, mask=offs_d[None, :] < D, other=0.0)
        v = tl.load(v_ptrs, mask=offs_d[None, :] < D, other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if HAS_ROPE:
        k = cast_rne(_rope_tile(k.to(tl.float32), Cos, Sin, stride_cs, offs_n, S_rot, D // 2, BLOCK_N, BLOCK_D),
                     V.dtype.element_ty, INTERP_BF16)
    if INTERP_BF16:  # interpreter only: its bf16 x bf16 dot is wrong, fp32 is exact
        k = k.to(tl.float32)
    if IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_N] fp32
    else:
        qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(offs_n[None, :] < kv_len, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # running max, log2 units
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p = cast_rne(p, V.dtype.element_ty, INTERP_BF16)  # P in v's dtype before the PV dot, as FlashAttention
    if INTERP_BF16:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p, v, acc)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(Q, K, V, O, KLens, Cos, Sin, LSE,
              stride_qb, stride_qs, stride_qh,
              stride_kb, stride_ks, stride_kh,
              stride_vb, stride_vs, stride_vh,
              stride_ob, stride_os, stride_oh,
              stride_cs,
              H, Sq, Sk, S_rot, qk_scale, sk_bucket,
              D: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_KLENS: tl.constexpr, HAS_ROPE: tl.constexpr, IEEE: tl.constexpr, INTERP_BF16: tl.constexpr,
              HAS_LSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(cdiv(Sq, BLOCK_M), B*H)``: one program per query block of one (sample, head).

    ``sk_bucket`` is unused in the body; it is part of the autotuning key. With ``HAS_LSE`` the natural-log
    log-sum-exp of each query's scores is stored to ``LSE`` (float32 ``[B, H, Sq]`` contiguous; ``-inf`` for a
    query with no key).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh

    kv_len = Sk
    if HAS_KLENS:
        kv_len = tl.minimum(tl.maximum(tl.load(KLens + off_b), 0), Sk)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < Sq) & (offs_d[None, :] < D)
    q = tl.load(Q + offs_m[:, None].to(tl.int64) * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
    if HAS_ROPE:  # rotate in fp32, round to the input dtype like the reference
        q = cast_rne(_rope_tile(q.to(tl.float32), Cos, Sin, stride_cs, offs_m, S_rot, D // 2, BLOCK_M, BLOCK_D),
                     Q.dtype.element_ty, INTERP_BF16)
    if INTERP_BF16:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = (kv_len // BLOCK_N) * BLOCK_N  # blocks past kv_len are never visited
    # The partial block first, then the unmasked loop: compiled for sm_90a this order spills far fewer
    # registers than a trailing masked block (benchmarks/kernel_resources.py); the online softmax does
    # not depend on the block order beyond rounding.
    if n_full < kv_len:
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, K, V,
                                    Cos, Sin, n_full, kv_len, stride_ks, stride_vs, stride_cs, S_rot, qk_scale,
                                    D, BLOCK_N, BLOCK_D, HAS_ROPE, IEEE, INTERP_BF16, True)
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, K, V,
                                    Cos, Sin, start_n, kv_len, stride_ks, stride_vs, stride_cs, S_rot, qk_scale,
                                    D, BLOCK_N, BLOCK_D, HAS_ROPE, IEEE, INTERP_BF16, False)

    # kv_len == 0 leaves l_i == 0 and acc == 0: write zeros rather than 0/0.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :],
             cast_rne(out, O.dtype.element_ty, INTERP_BF16), mask=q_mask)
    if HAS_LSE:  # m_i is in log2 units (qk_scale folds log2(e)): lse = (m + log2(l)) * ln(2)
        lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)


# (BLOCK_M, BLOCK_N, num_warps, num_stages). The first set is for 16-bit inputs with head_dim <= 128
# (the Wan models: 128); the second, smaller tiles for fp32 or head_dim > 128, where the first set's
# K/V stages would not fit in shared memory or registers (the last one is a no-pipelining fallback).
# Configs that spilled hundreds of bytes per thread when compiled for sm_90a (128x64 and 64x128 tiles on 4
# warps; see benchmarks/kernel_resources.py) are left out.
_CONFIGS_16BIT = ((128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
                  (64, 64, 4, 3), (64, 64, 4, 4))
_CONFIGS_WIDE = ((64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2), (64, 32, 4, 1))


def _config_tuple(c: triton.Config) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _prune_configs(configs, named_args, **kwargs):
    """Keep :data:`_CONFIGS_16BIT` for 16-bit inputs with BLOCK_D <= 128, else :data:`_CONFIGS_WIDE`."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    wide = block_d > 128 or named_args["Q"].element_size() > 2
    keep = set(_CONFIGS_WIDE if wide else _CONFIGS_16BIT)
    return [c for c in configs if _config_tuple(c) in keep]


_attn_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
             for bm, bn, w, st in dict.fromkeys(_CONFIGS_16BIT + _CONFIGS_WIDE)],
    key=["D", "sk_bucket", "HAS_ROPE", "HAS_KLENS", "HAS_LSE"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _prune_configs},
)(_attn_fwd)

# Under the interpreter: one small fixed config (autotuning would run every config).
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}


# ------------------------------------------------------------------------------------------------
# 2. Launcher
# ------------------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None,
                  cos: torch.Tensor | None, sin: torch.Tensor | None) -> None:
    """Shape/dtype checks shared by the launcher and the fake; no device work, no host sync."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("attention expects q, k, v of shape [B, S, heads, head_dim]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must share B, heads, head_dim")
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if min(b, sq, sk, h) < 1:
        raise ValueError(f"attention: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")
    if d % 2 or not 8 <= d <= 256:
        raise ValueError(f"attention: head_dim must be even and in 8..256, got {d}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in TORCH_FLOAT_DTYPES:
        raise ValueError(f"attention: dtype must be one of {TORCH_FLOAT_DTYPES}, got {q.dtype}")
    if k_lens is not None:
        if tuple(k_lens.shape) != (b,):
            raise ValueError(f"attention: k_lens must be [B={b}], got {tuple(k_lens.shape)}")
        if k_lens.dtype.is_floating_point or k_lens.dtype.is_complex or k_lens.dtype == torch.bool:
            raise ValueError(f"attention: k_lens must be an integer tensor, got {k_lens.dtype}")
    if (cos is None) != (sin is None):
        raise ValueError("attention: pass both cos and sin (RoPE tables) or neither")
    if cos is not None:
        if cos.dtype != torch.float32 or sin.dtype != torch.float32:
            raise ValueError(f"attention: cos/sin must be float32, got {cos.dtype}, {sin.dtype}")
        if cos.ndim != 2 or cos.shape != sin.shape or cos.shape[1] != d // 2:
            raise ValueError(f"attention: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be "
                             f"[S_rot, head_dim/2 = {d // 2}]")
        if sq != sk:
            raise ValueError(f"attention: fused RoPE needs self-attention (Sq == Sk), got Sq={sq}, Sk={sk}")
        if cos.shape[0] > sq:
            raise ValueError(f"attention: RoPE table covers {cos.shape[0]} tokens, more than S={sq}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None,
            cos: torch.Tensor | None, sin: torch.Tensor | None, with_lse: bool = False):
    """Check, allocate ``[B, Sq, H, D]`` contiguous in ``q.dtype``, and launch :func:`_attn_fwd`; with
    ``with_lse`` return ``(out, lse [B, H, Sq] float32)``."""
    _check_inputs(q, k, v, k_lens, cos, sin)
    check_device("attention", q, k, v, k_lens, cos, sin)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, sq, h, d = q.shape
    sk = k.shape[1]
    out = q.new_empty(q.shape)  # [B, Sq, H, D] contiguous
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device) if with_lse else out  # dummy when absent

    has_klens = k_lens is not None
    klens_arg = k_lens.to(torch.int32) if has_klens else out  # dummy pointer when absent
    has_rope = cos is not None and cos.shape[0] > 0
    if has_rope:
        cos, sin = (t if t.stride(-1) == 1 and t.stride(0) == t.shape[1] else t.contiguous() for t in (cos, sin))
        cos_arg, sin_arg, s_rot, stride_cs = cos, sin, cos.shape[0], cos.stride(0)
    else:
        cos_arg, sin_arg, s_rot, stride_cs = out, out, 0, 0
    interp = interpreting()
    args = (q, k, v, out, klens_arg, cos_arg, sin_arg, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            stride_cs,
            h, sq, sk, s_rot, _LOG2E / math.sqrt(d), min(next_pow2(sk), 1 << 16))
    meta = {"D": d, "BLOCK_D": max(16, next_pow2(d)), "HAS_KLENS": has_klens, "HAS_ROPE": has_rope,
            "IEEE": q.dtype == torch.float32,  # no TF32 for fp32 inputs
            "INTERP_BF16": interp and q.dtype == torch.bfloat16, "HAS_LSE": with_lse}
    if interp:
        cfg = _INTERPRET_CONFIG
        _attn_fwd[(triton.cdiv(sq, cfg["BLOCK_M"]), b * h)](*args, **meta, **cfg)
    else:
        def grid(m):
            return (triton.cdiv(sq, m["BLOCK_M"]), b * h)

        with torch.cuda.device(q.device):
            _attn_fwd_tuned[grid](*args, **meta)
    return (out, lse) if with_lse else out


# ------------------------------------------------------------------------------------------------
# 3. Custom op and public entry
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("wanrt::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None,
                  cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    return _launch(q, k, v, k_lens, cos, sin)


@_attention_op.register_fake
def _attention_fake(q, k, v, k_lens, cos, sin):
    _check_inputs(q, k, v, k_lens, cos, sin)
    return q.new_empty(q.shape)  # contiguous [B, Sq, H, D] in q.dtype


@torch.library.custom_op("wanrt::attention_lse", mutates_args=())
def _attention_lse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_lens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, v, k_lens, None, None, with_lse=True)


@_attention_lse_op.register_fake
def _attention_lse_fake(q, k, v, k_lens):
    _check_inputs(q, k, v, k_lens, None, None)
    b, sq, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, sq), dtype=torch.float32)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` (no RoPE) that also returns each query's log-sum-exp, for merging partial attentions
    (Ring attention, ``wanrt.parallel.ring``).

    Returns:
        ``(out, lse)``: ``out`` ``[B, Sq, H, D]`` in ``q.dtype`` and ``lse`` float32 ``[B, H, Sq]``, the natural log
        of ``sum_j exp(q.k_j / sqrt(D))`` over the attended keys (``-inf`` and zero output when there is none).

    Raises:
        ValueError: as :func:`attention`.
    """
    _check_inputs(q, k, v, k_lens, None, None)
    check_device("attention", q, k, v, k_lens)
    return torch.ops.wanrt.attention_lse(q, k, v, k_lens)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None = None,
              cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """Fused multi-head attention ``softmax(rope(q) rope(k)^T / sqrt(D) + mask) v`` (Triton).

    For each sample ``b`` and head ``h``::

        S = rope(q[b, :, h]) @ rope(k[b, :, h])^T / sqrt(D)       # [Sq, Sk], fp32
        S[:, j] = -inf  for j >= k_lens[b]
        out[b, :, h] = softmax(S, dim=-1) @ v[b, :, h]

    computed tile by tile with an online softmax (FlashAttention-2, Dao 2023) in fp32, with
    ``exp2`` and the scale ``log2(e) / sqrt(D)`` folded in. The probabilities are rounded to
    ``v.dtype`` before the PV product, as FlashAttention does; fp32 inputs use IEEE fp32 dots
    (no TF32). Key blocks entirely past ``k_lens[b]`` are skipped.

    RoPE (optional, fused into the loads) is GPT-J style on interleaved adjacent pairs, as
    ``rope_apply`` of the Wan2.1 code (``wanrt.ops.rope``): for token ``s < S_rot`` and pair
    ``j``, ``x'[2j] = x[2j] cos[s, j] - x[2j+1] sin[s, j]``,
    ``x'[2j+1] = x[2j] sin[s, j] + x[2j+1] cos[s, j]``, computed in fp32 and rounded to the input
    dtype; tokens ``s >= S_rot`` (padding) pass unrotated. The same table rotates q and k.

    Args:
        q: Queries ``[B, Sq, H, D]``, float16, bfloat16 or float32, last dim stride 1 (otherwise
            copied); ``D`` even, 8..256.
        k: Keys ``[B, Sk, H, D]``, same dtype and device as ``q``.
        v: Values ``[B, Sk, H, D]``, same dtype and device as ``q``.
        k_lens: Optional integer tensor ``[B]`` on the same device: sample ``b`` attends to keys
            ``0 .. k_lens[b]-1``; a length ``>= Sk`` means no masking. Queries are never masked.
            A length ``<= 0`` gives **zeros** for that sample's rows (eager PyTorch gives NaN);
            this is not checked on the host, to avoid a device sync.
        cos: Optional float32 ``[S_rot, D/2]`` (``RopeTable.cos``); needs ``Sq == Sk`` and
            ``S_rot <= Sq``.
        sin: Optional float32 ``[S_rot, D/2]`` (``RopeTable.sin``); given together with ``cos``.

    Returns:
        ``[B, Sq, H, D]``, contiguous, in ``q.dtype``.

    Raises:
        ValueError: on rank, shape, dtype or device mismatches; an odd or out-of-range ``D``;
            only one of ``cos``/``sin``; RoPE tables with ``Sq != Sk`` or ``S_rot > Sq``; tensors
            not on CUDA (CPU tensors are accepted only under ``TRITON_INTERPRET=1``).
    """
    _check_inputs(q, k, v, k_lens, cos, sin)
    check_device("attention", q, k, v, k_lens, cos, sin)
    return torch.ops.wanrt.attention(q, k, v, k_lens, cos, sin)
