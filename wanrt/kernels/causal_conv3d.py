"""Causal 3D convolution of the Wan-VAE as an implicit GEMM in Triton, reading the cache prefix in place.

The eager :meth:`wanrt.models.vae.CausalConv3d.causal_conv` concatenates the cached frames before the
new chunk, zero-pads the rest of the causal front and both spatial sides, then runs ``nn.Conv3d``: two
full copies of the input before the convolution reads it. Here the convolution is one GEMM

    out[m, n] = bias[n] + sum_k A[m, k] W[k, n],  M = B*T_out*H_out*W_out,  N = C_out,  K = kt*kh*kw*C_in

whose ``A`` tile is gathered on the fly: output position ``m = (b, t, h, w)`` and tap ``(i, j, l)`` read
frame ``t*st + i`` of the virtual sequence ``[front_pad - n zero frames, prefix (n frames), x]``, i.e. a
frame of ``prefix`` or of ``x`` (two base pointers) or nothing (zeros), and the spatial position
``(h*sh + j - ph, w*sw + l - pw)``; positions in the spatial padding are masked to 0. An M tile holds
positions of one output frame only, so the source frame of a temporal tap is a scalar per program: the
base pointer is selected once per tap (the A loads stay vectorized and software-pipelined), and taps that
fall on the zero frames in front are skipped, not loaded. The K loop runs over the taps and over blocks of
input channels with ``tl.dot`` into an fp32 accumulator; the bias is added in fp32 and the result rounded
once to the input dtype (as cuDNN does).

Memory layout: channels innermost. ``x`` and ``prefix`` are read with their own strides but need a unit
channel stride (then a ``BLOCK_K`` slice of channels is one contiguous, vectorizable load); a tensor
without one (plain NCTHW) is copied to ``torch.channels_last_3d`` first, one extra pass over it. The weight
is repacked once per call to ``[kt, kh, kw, C_in, C_out]`` (C_out innermost). The output is allocated
``channels_last_3d``: logically NCTHW, so every eager consumer works unchanged, and the next Triton conv
(after the VAE's RMSNorm and SiLU, which keep the memory format) reads it without a copy. Compiled for
sm_90a (Triton 3.9), every autotuning config fits in 227 KiB of shared memory without spills.

Layers, as every kernel file in :mod:`wanrt.kernels`: the private ``@triton.jit`` kernel (and its
autotuned twin for GPUs); :func:`_launch`, which checks, allocates and launches; the
``wanrt::causal_conv3d`` custom op with its fake registration; and the public :func:`causal_conv3d`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanrt.kernels._common import TORCH_FLOAT_DTYPES, cast_rne, check_device, interpreting, next_pow2

# ------------------------------------------------------------------------------------------------
# 1. Triton kernel
# ------------------------------------------------------------------------------------------------


@triton.jit
def _causal_conv3d_kernel(
    x_ptr, p_ptr, w_ptr, bias_ptr, o_ptr,
    C_in, C_out, T_out, H_out, W_out, H, W, n_pre, front_pad,
    sxb, sxt, sxh, sxw, spb, spt, sph, spw, sob, sot, soh, sow,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Grid: (M tiles of one output frame x N tiles, B * T_out frames). A tile never spans two output
    # frames, so the input frame of a tap, and with it the source (x, prefix or zeros), is one scalar
    # per program: a scalar select of the base pointer keeps the A loads vectorized and pipelined (a
    # per-row pointer select does not).
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_out, BLOCK_N)
    pid_m = pid // num_n  # programs sharing an M tile (the gathered input rows) are adjacent: L2 reuse
    pid_n = pid % num_n
    frame = tl.program_id(1)
    b = (frame // T_out).to(tl.int64)
    to = frame % T_out

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] output positions (h, w) in the frame
    m_ok = offs_m < H_out * W_out
    ho = offs_m // W_out
    wo = offs_m % W_out
    h0 = ho * SH - PH
    w0 = wo * SW - PW
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_out
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_cb = tl.cdiv(C_in, BLOCK_K)
    t0 = to * ST - front_pad  # x frame of temporal tap 0: >= 0 in x, in [-n_pre, 0) in the prefix, else zero
    kt_lo = tl.maximum(-n_pre - t0, 0)  # taps before kt_lo read zero frames: skipped
    for it in range(kt_lo * (KH * KW) * n_cb, KT * KH * KW * n_cb):  # taps (i, j, l) x input channel blocks
        tap = it // n_cb
        c = (it - tap * n_cb) * BLOCK_K + offs_k  # [BK]
        c_ok = c < C_in
        kw = tap % KW
        kh = (tap // KW) % KH
        ti = t0 + tap // (KW * KH)  # the input frame, scalar
        if HAS_PREFIX:
            in_x = ti >= 0
            base = tl.where(in_x, x_ptr + (b * sxb + ti.to(tl.int64) * sxt),
                            p_ptr + (b * spb + (ti + n_pre).to(tl.int64) * spt))
            s_h = tl.where(in_x, sxh, sph)
            s_w = tl.where(in_x, sxw, spw)
        else:
            base = x_ptr + (b * sxb + ti.to(tl.int64) * sxt)
            s_h = sxh
            s_w = sxw
        hi = h0 + kh
        wi = w0 + kw
        ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        row = hi.to(tl.int64) * s_h + wi.to(tl.int64) * s_w  # [BM]
        a = tl.load(base + row[:, None] + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)  # [BM, BK]
        w_ptrs = w_ptr + tap * C_in * C_out + c[:, None] * C_out + offs_n[None, :]
        w = tl.load(w_ptrs, mask=c_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
        if UPCAST:  # interpreter: bf16 x bf16 tl.dot is wrong there
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    o_row = ho.to(tl.int64) * soh + wo.to(tl.int64) * sow  # [BM]
    o_base = o_ptr + (b * sob + to.to(tl.int64) * sot)
    tl.store(o_base + o_row[:, None] + offs_n[None, :], cast_rne(acc, o_ptr.dtype.element_ty, RNE_BF16),
             mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). 16-bit inputs use the tensor cores; fp32 inputs use
# IEEE fp32 dots (FMA, no TF32: the official VAE runs in fp32), so smaller tiles. BLOCK_N 16 is for the
# decoder head (C_out 3), BLOCK_K 16 for the first convs (C_in 3 in the encoder, z_dim 16 in the decoder).
_CONFIGS_16BIT = ((128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                  (128, 64, 32, 4, 4), (64, 64, 64, 4, 3),
                  (128, 16, 64, 4, 3), (256, 16, 32, 4, 3), (128, 64, 16, 4, 4), (128, 128, 16, 8, 4))
_CONFIGS_FP32 = ((64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 32, 32, 4, 3),
                 (128, 16, 32, 4, 3), (64, 64, 16, 4, 3))

# Under the interpreter: one small fixed config (autotuning would run every config).
_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}


def _config_tuple(c: triton.Config) -> tuple[int, int, int, int, int]:
    k = c.kwargs
    return k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_warps, c.num_stages


def _prune_configs(configs, named_args, **kwargs):
    """The dtype's config set, without tiles much wider than C_out or deeper than C_in."""
    keep = set(_CONFIGS_FP32 if named_args["x_ptr"].element_size() > 2 else _CONFIGS_16BIT)
    n_max = max(16, next_pow2(named_args["C_out"]))
    k_max = max(16, next_pow2(named_args["C_in"]))
    pruned = [c for c in configs if _config_tuple(c) in keep]
    fitting = [c for c in pruned if c.kwargs["BLOCK_N"] <= n_max and c.kwargs["BLOCK_K"] <= k_max]
    return fitting or pruned


_causal_conv3d_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
             for bm, bn, bk, w, st in dict.fromkeys(_CONFIGS_16BIT + _CONFIGS_FP32)],
    key=["C_in", "C_out", "KT", "KH", "KW"],  # the autotuner adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _prune_configs},
)(_causal_conv3d_kernel)


# ------------------------------------------------------------------------------------------------
# 2. Launcher
# ------------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_args(x: torch.Tensor, prefix: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                front_pad: int, pad_h: int, pad_w: int, stride_t: int, stride_h: int,
                stride_w: int) -> tuple[int, int, int, int, int]:
    """Validate shapes, dtypes and the int arguments (devices are checked at launch).

    Returns:
        The output shape ``(B, C_out, T_out, H_out, W_out)``.
    """
    op = "causal_conv3d"
    if x.ndim != 5:
        raise ValueError(f"{op}: x must be [B, C_in, T, H, W], got {_shape(x)}")
    if x.dtype not in TORCH_FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be one of {TORCH_FLOAT_DTYPES}, got {x.dtype}")
    bsz, c_in, t, h, w = x.shape
    if weight.ndim != 5:
        raise ValueError(f"{op}: weight must be [C_out, C_in, kt, kh, kw], got {_shape(weight)}")
    c_out, wc_in, kt, kh, kw = weight.shape
    if wc_in != c_in or c_in < 1 or c_out < 1:
        raise ValueError(f"{op}: weight {_shape(weight)} does not match x {_shape(x)} (C_in={c_in})")
    if weight.dtype != x.dtype:
        raise ValueError(f"{op}: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None and (_shape(bias) != (c_out,) or bias.dtype != x.dtype):
        raise ValueError(f"{op}: bias must be [C_out={c_out}] in {x.dtype}, got {bias.dtype} {_shape(bias)}")
    if min(front_pad, pad_h, pad_w) < 0 or min(stride_t, stride_h, stride_w) < 1:
        raise ValueError(f"{op}: paddings must be >= 0 and strides >= 1, got front_pad={front_pad}, "
                         f"spatial_pad=({pad_h}, {pad_w}), stride=({stride_t}, {stride_h}, {stride_w})")
    n = 0
    if prefix is not None:
        if prefix.ndim != 5 or prefix.shape[:2] != x.shape[:2] or prefix.shape[3:] != x.shape[3:]:
            raise ValueError(f"{op}: prefix must be [B, C_in, n, H, W] like x {_shape(x)}, got {_shape(prefix)}")
        n = prefix.shape[2]
        if n > front_pad:
            raise ValueError(f"{op}: prefix has {n} frames, more than front_pad={front_pad}")
        if prefix.dtype != x.dtype:
            raise ValueError(f"{op}: prefix dtype {prefix.dtype} differs from x dtype {x.dtype}")
    t_out = (front_pad + t - kt) // stride_t + 1
    h_out = (h + 2 * pad_h - kh) // stride_h + 1
    w_out = (w + 2 * pad_w - kw) // stride_w + 1
    if min(t, h, w) < 1 or min(t_out, h_out, w_out) < 1:
        raise ValueError(f"{op}: input {_shape(x)} (front_pad={front_pad}, spatial_pad=({pad_h}, {pad_w})) is "
                         f"smaller than the kernel {(kt, kh, kw)}")
    return bsz, c_out, t_out, h_out, w_out


def _channels_inner(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its channels (dim 1) are unit-stride, else a ``channels_last_3d`` copy."""
    if t.stride(1) == 1 or t.shape[1] == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last_3d)


def _new_output(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)


def _launch(x: torch.Tensor, prefix: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
            front_pad: int, pad_h: int, pad_w: int, stride_t: int, stride_h: int, stride_w: int) -> torch.Tensor:
    """Check, allocate the ``channels_last_3d`` output and launch :func:`_causal_conv3d_kernel`."""
    out_shape = _check_args(x, prefix, weight, bias, front_pad, pad_h, pad_w, stride_t, stride_h, stride_w)
    check_device("causal_conv3d", x, prefix, weight, bias)
    out = _new_output(x, out_shape)
    bsz, c_out, t_out, h_out, w_out = out_shape
    m = bsz * t_out * h_out * w_out
    if m == 0:
        return out
    if bsz * t_out > 65535:
        raise ValueError(f"causal_conv3d: B * T_out = {bsz * t_out} output frames, more than one launch takes (65535)")
    if prefix is not None and prefix.shape[2] == 0:
        prefix = None
    x = _channels_inner(x)
    prefix = None if prefix is None else _channels_inner(prefix)
    c_in, kt, kh, kw = weight.shape[1:]
    wt = weight.permute(2, 3, 4, 1, 0).contiguous()  # [kt, kh, kw, C_in, C_out]
    bias = None if bias is None else bias.contiguous()
    p = x if prefix is None else prefix  # dummy pointer when absent (HAS_PREFIX off)
    interp = interpreting()
    args = (x, p, wt, x if bias is None else bias, out,
            c_in, c_out, t_out, h_out, w_out, x.shape[3], x.shape[4],
            0 if prefix is None else prefix.shape[2], front_pad,
            x.stride(0), x.stride(2), x.stride(3), x.stride(4),
            p.stride(0), p.stride(2), p.stride(3), p.stride(4),
            out.stride(0), out.stride(2), out.stride(3), out.stride(4))
    meta = {"KT": kt, "KH": kh, "KW": kw, "ST": stride_t, "SH": stride_h, "SW": stride_w, "PH": pad_h, "PW": pad_w,
            "HAS_PREFIX": prefix is not None, "HAS_BIAS": bias is not None,
            "IEEE": x.dtype == torch.float32 or (interp and x.dtype == torch.bfloat16),
            "UPCAST": interp and x.dtype == torch.bfloat16, "RNE_BF16": interp}
    if interp:
        cfg = _INTERPRET_CONFIG
        grid = (triton.cdiv(h_out * w_out, cfg["BLOCK_M"]) * triton.cdiv(c_out, cfg["BLOCK_N"]), bsz * t_out)
        _causal_conv3d_kernel[grid](*args, **meta, **cfg)
    else:
        def grid(meta_):
            return (triton.cdiv(h_out * w_out, meta_["BLOCK_M"]) * triton.cdiv(c_out, meta_["BLOCK_N"]), bsz * t_out)

        with torch.cuda.device(x.device):
            _causal_conv3d_tuned[grid](*args, **meta)
    return out


# ------------------------------------------------------------------------------------------------
# 3. Custom op and public entry
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("wanrt::causal_conv3d", mutates_args=())
def _causal_conv3d_op(x: torch.Tensor, prefix: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                      front_pad: int, pad_h: int, pad_w: int, stride_t: int, stride_h: int,
                      stride_w: int) -> torch.Tensor:
    return _launch(x, prefix, weight, bias, front_pad, pad_h, pad_w, stride_t, stride_h, stride_w)


@_causal_conv3d_op.register_fake
def _causal_conv3d_fake(x, prefix, weight, bias, front_pad, pad_h, pad_w, stride_t, stride_h, stride_w):
    out_shape = _check_args(x, prefix, weight, bias, front_pad, pad_h, pad_w, stride_t, stride_h, stride_w)
    return _new_output(x, out_shape)


def causal_conv3d(x: torch.Tensor, prefix: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, *,
                  front_pad: int, spatial_pad: tuple[int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """Causal 3D convolution over ``[prefix, x]`` without materializing the concatenation or the padding.

    Equals ``F.conv3d(F.pad(torch.cat([prefix, x], 2), (pw, pw, ph, ph, front_pad - n, 0)), weight, bias,
    stride)`` (``n`` prefix frames, ``(ph, pw) = spatial_pad``): the eager
    :meth:`wanrt.models.vae.CausalConv3d.causal_conv`. An implicit GEMM with fp32 accumulation; the bias is
    added in fp32 and the result rounded once to ``x.dtype``. fp32 inputs use IEEE fp32 dots (no TF32).

    Args:
        x: ``[B, C_in, T, H, W]`` float32/bfloat16/float16, any strides (copied to ``channels_last_3d``
            unless the channels are already unit-stride).
        prefix: ``[B, C_in, n, H, W]`` cached frames before ``x``, ``n <= front_pad``, in ``x.dtype``; or
            ``None`` (``n = 0``).
        weight: ``[C_out, C_in, kt, kh, kw]`` in ``x.dtype``.
        bias: ``[C_out]`` in ``x.dtype``, or ``None``.
        front_pad: frames before ``x`` (prefix, then zeros in front of it); ``2 * pt`` of the VAE's convs.
        spatial_pad: ``(ph, pw)`` zeros on both sides of H and W.
        stride: ``(st, sh, sw)``.

    Returns:
        ``[B, C_out, (front_pad + T - kt) // st + 1, (H + 2ph - kh) // sh + 1, (W + 2pw - kw) // sw + 1]`` in
        ``x.dtype``, a new tensor in ``torch.channels_last_3d`` memory format (channels innermost).

    Raises:
        ValueError: wrong ndim, channel or shape mismatch, dtypes that differ or are not float, a prefix
            longer than ``front_pad``, an output with no frame/row/column, negative paddings or strides < 1,
            or tensors that are not CUDA (CPU only under ``TRITON_INTERPRET=1``) or not on one device.
    """
    if len(spatial_pad) != 2 or len(stride) != 3:
        raise ValueError(f"causal_conv3d: spatial_pad must be (ph, pw) and stride (st, sh, sw), got {spatial_pad}, "
                         f"{stride}")
    ph, pw = (int(v) for v in spatial_pad)
    st, sh, sw = (int(v) for v in stride)
    _check_args(x, prefix, weight, bias, int(front_pad), ph, pw, st, sh, sw)
    return _causal_conv3d_op(x, prefix, weight, bias, int(front_pad), ph, pw, st, sh, sw)
