"""Per-token activation quantization and the INT8 GEMM's rescale epilogue for the W8A8 Linears, in Triton.

* :func:`quantize_per_token` — ``x [M, K]`` (fp32/bf16/fp16) to ``(q [M, K], scale float32 [M, 1])`` in
  float8_e4m3fn or int8: one program per row reads the row once into registers, takes ``amax = max|x|``
  (pass 1) and writes ``q = x / scale`` (pass 2), instead of the five eager passes (float, abs, amax,
  divide, round/clamp/cast). Twin: :func:`wanrt.quant.layers.quantize_per_token` (``backend="eager"``).
* :func:`int8_matmul_rescale` — ``y = (xq @ wq^T) · x_scale[m] · w_scale[n] + bias[n]`` in ``out_dtype``:
  the int32 product comes from ``torch._int_mm`` (see :func:`int_mm_path` for the shapes it takes), the
  rescale, bias and cast are one 2-D-tiled Triton pass over the int32 accumulator (eager: four passes).
  Twin: the eager branch of :meth:`wanrt.quant.layers.Int8Linear.forward`.

Numerics are the eager twins', bit for bit where the hardware allows:

* ``scale = amax / qmax`` (qmax 448 or 127) in float32, 1 for an all-zero row. On CUDA, torch computes a
  tensor divided by a Python number as ``amax * float32(1 / qmax)`` (``div_true_kernel_cuda``'s
  CPU-scalar optimization, which differs from the quotient in the last bit for about half of all
  amax at qmax 448); on the CPU it divides. The kernel does the same per device (``SCALE_RECIP``).
* ``q = x / scale`` is an IEEE division (``div_rn``; Triton's plain ``/`` may lower to the 2-ulp
  ``div.full.f32`` on NVIDIA), then clamp to ±448 and cast to fp8 (round to nearest even), or
  round half to even (``torch.round``) and clamp to ±127 for int8.

Triton 3.9 interpreter defects handled behind ``INTERPRET`` (set only when interpreting, so GPU code is
unaffected):

1. It loads and stores ``float8e4nv`` (fp8 tensors are uint8 arrays to it), but its fp32 -> fp8 cast
   rounds wrongly: ties go away from zero instead of to even (232 -> 240, torch 224); a value that rounds
   up to the next power of two loses the carry when the biased exponent is odd (125.8 -> 64, 31.9 -> 16,
   torch 128 and 32); values in the fp8 subnormal range (below 2^-6) are truncated toward zero. Exactly
   representable values convert correctly (all 254 finite ones checked), so under ``INTERPRET`` the value
   is first rounded to the e4m3 grid in float32 (:func:`wanrt.kernels._common.round_to_e4m3_grid`, ties to
   even) and the
   cast is then exact: the interpreter's ``q`` bits equal torch's.
2. ``libdevice.rint`` does not run in it: int8 rounding uses ``(q + 1.5·2^23) - 1.5·2^23`` (float32
   round-half-even, exact for ``|q| < 2^22``) instead of ``cvt.rni``.
3. fp32 -> bf16 casts truncate (``docs/KERNELS.md``): the epilogue stores through ``cast_rne``.

Layers: the private ``@triton.jit`` kernels; the checking launchers; the ``wanrt::quantize_per_token`` and
``wanrt::int8_matmul_rescale`` custom ops with fake registrations; the public functions of the same names.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from wanrt.kernels._common import (
    TORCH_FLOAT_DTYPES,
    cast_rne,
    check_device,
    interpreting,
    next_pow2,
    quantize_row,
    row_kernel_warps,
    row_launch,
)

FP8_DTYPE = torch.float8_e4m3fn
QMAX = {FP8_DTYPE: 448.0, torch.int8: 127.0}
QUANT_DTYPES = tuple(QMAX)
OUT_DTYPES = TORCH_FLOAT_DTYPES

# ------------------------------------------------------------------------------ kernels


@triton.jit
def _quantize_row_kernel(
    x_ptr, q_ptr, s_ptr, K, sxm, qmax, inv_qmax,
    BLOCK: tl.constexpr, IS_INT8: tl.constexpr, SCALE_RECIP: tl.constexpr, INTERPRET: tl.constexpr,
):
    # One program = one row of x, held in registers between the two passes.
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK)
    k_ok = k < K
    x = tl.load(x_ptr + row * sxm + k, mask=k_ok, other=0.0).to(tl.float32)  # [BLOCK]
    q, scale = quantize_row(x, qmax, inv_qmax, IS_INT8, SCALE_RECIP, INTERPRET)  # amax, then q = x / scale
    tl.store(q_ptr + row * K + k, q.to(q_ptr.dtype.element_ty), mask=k_ok)
    tl.store(s_ptr + row, scale)


@triton.jit
def _rescale_kernel(
    acc_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, RNE_BF16: tl.constexpr,
):
    # One program = a BLOCK_M x BLOCK_N tile of the int32 accumulator; acc and y are contiguous [M, N].
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    n_ok = n < N
    mask = m_ok[:, None] & n_ok[None, :]
    off = m.to(tl.int64)[:, None] * N + n[None, :]
    acc = tl.load(acc_ptr + off, mask=mask, other=0).to(tl.float32)
    xs = tl.load(xs_ptr + m, mask=m_ok, other=0.0)
    ws = tl.load(ws_ptr + n, mask=n_ok, other=0.0)
    y = acc * xs[:, None] * ws[None, :]  # eager order: (acc.float() * xs) * ws
    if HAS_BIAS:
        y = y + tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + off, cast_rne(y, y_ptr.dtype.element_ty, RNE_BF16), mask=mask)


# ------------------------------------------------------------------------------ launchers


def _check_quantize_args(x: torch.Tensor, dtype: torch.dtype) -> None:
    """Validate shape and dtypes (devices are checked at launch)."""
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"quantize_per_token: dtype must be one of {QUANT_DTYPES}, got {dtype}")
    if x.ndim != 2:
        raise ValueError(f"quantize_per_token: x must be 2-D [M, K], got {tuple(x.shape)}")
    if x.dtype not in TORCH_FLOAT_DTYPES:
        raise ValueError(f"quantize_per_token: x must be one of {TORCH_FLOAT_DTYPES}, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"quantize_per_token: x must have K > 0 columns, got {tuple(x.shape)}")


def _quantize_launch(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Check, allocate ``q [M, K]`` (``dtype``) and ``scale float32 [M, 1]``, launch one program per row."""
    _check_quantize_args(x, dtype)
    check_device("quantize_per_token", x)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=dtype, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    qmax = QMAX[dtype]
    block, _, num_warps = row_launch(k, max_rows=1)
    _quantize_row_kernel[(m,)](
        x, q, scale, k, x.stride(0), qmax, float(torch.tensor(1.0 / qmax, dtype=torch.float32)),
        BLOCK=block, IS_INT8=dtype == torch.int8, SCALE_RECIP=x.is_cuda, INTERPRET=interpreting(),
        num_warps=num_warps,
    )
    return q, scale


def int_mm_path(m: int, k: int, n: int) -> str:
    """How :func:`int8_matmul_rescale` forms the int32 product of ``[m, k] @ [k, n]``.

    ``torch._int_mm`` on CUDA needs ``m > 16`` and ``k``, ``n`` multiples of 8 (the CPU takes any shape;
    the same rule is used on every device so the paths are tested in CI):

    * ``"int_mm"``: ``torch._int_mm`` as is;
    * ``"int_mm_padded"``: ``m <= 16``: ``xq`` padded with zero rows to 17, the result sliced back;
    * ``"float"``: ``k`` or ``n`` not a multiple of 8: a float32 matmul of the int8 values (float64 when
      ``k > 1024``), exact as integers (every partial sum is below 2^24, resp. 2^53), then cast to int32.
    """
    if k % 8 or n % 8:
        return "float"
    return "int_mm_padded" if m <= 16 else "int_mm"


_INT_MM_MIN_M = 17
_FLOAT32_EXACT_K = 1024  # k * 128 * 128 <= 2^24


def _int8_mm(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """``xq [M, K] @ wq[N, K]^T`` as int32 ``[M, N]`` (see :func:`int_mm_path`)."""
    (m, k), n = xq.shape, wq.shape[0]
    path = int_mm_path(m, k, n)
    if path == "float":
        ft = torch.float32 if k <= _FLOAT32_EXACT_K else torch.float64
        return (xq.to(ft) @ wq.to(ft).t()).to(torch.int32)
    xq = xq.contiguous()
    wt = wq.contiguous().t()  # [K, N] column-major, as cuBLASLt takes it
    if path == "int_mm_padded":
        pad = xq.new_zeros((_INT_MM_MIN_M - m, k))
        return torch._int_mm(torch.cat([xq, pad]), wt)[:m]
    return torch._int_mm(xq, wt)


def _check_rescale_args(xq, wq, x_scale, w_scale, bias, out_dtype) -> None:
    """Validate shapes and dtypes (devices are checked at launch)."""
    op = "int8_matmul_rescale"
    for name, t in (("xq", xq), ("wq", wq)):
        if t.ndim != 2 or t.dtype != torch.int8:
            raise ValueError(f"{op}: {name} must be a 2-D int8 tensor, got {t.dtype} {tuple(t.shape)}")
    (m, k), (n, kw) = xq.shape, wq.shape
    if k != kw:
        raise ValueError(f"{op}: xq [M, K] {tuple(xq.shape)} and wq [N, K] {tuple(wq.shape)} differ in K")
    if x_scale.dtype != torch.float32 or tuple(x_scale.shape) not in ((m, 1), (m,)):
        raise ValueError(f"{op}: x_scale must be float32 [M={m}, 1] or [M={m}], got {x_scale.dtype} "
                         f"{tuple(x_scale.shape)}")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (n,):
        raise ValueError(f"{op}: w_scale must be float32 [N={n}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype not in TORCH_FLOAT_DTYPES):
        raise ValueError(f"{op}: bias must be a float [N={n}] tensor, got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def _rescale_launch(xq, wq, x_scale, w_scale, bias, out_dtype) -> torch.Tensor:
    """Check, form the int32 product, allocate ``y [M, N]`` in ``out_dtype``, launch the epilogue."""
    _check_rescale_args(xq, wq, x_scale, w_scale, bias, out_dtype)
    check_device("int8_matmul_rescale", xq, wq, x_scale, w_scale, bias)
    m, n = xq.shape[0], wq.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return y
    acc = _int8_mm(xq, wq).contiguous()
    xs = x_scale.reshape(m).contiguous()
    ws = w_scale.contiguous()
    b = None if bias is None else bias.contiguous()
    block_m = min(32, next_pow2(m))
    block_n = min(128, next_pow2(n))
    _rescale_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        acc, xs, ws, acc if b is None else b, y, m, n,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=b is not None, RNE_BF16=interpreting(),
        num_warps=row_kernel_warps(block_m * block_n),
    )
    return y


# ------------------------------------------------------------------------------ custom ops


@torch.library.custom_op("wanrt::quantize_per_token", mutates_args=())
def _quantize_per_token_op(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_launch(x, dtype)


@_quantize_per_token_op.register_fake
def _quantize_per_token_fake(x, dtype):
    _check_quantize_args(x, dtype)
    m, k = x.shape
    return x.new_empty((m, k), dtype=dtype), x.new_empty((m, 1), dtype=torch.float32)


@torch.library.custom_op("wanrt::int8_matmul_rescale", mutates_args=())
def _int8_matmul_rescale_op(
    xq: torch.Tensor,
    wq: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _rescale_launch(xq, wq, x_scale, w_scale, bias, out_dtype)


@_int8_matmul_rescale_op.register_fake
def _int8_matmul_rescale_fake(xq, wq, x_scale, w_scale, bias, out_dtype):
    _check_rescale_args(xq, wq, x_scale, w_scale, bias, out_dtype)
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)


# ------------------------------------------------------------------------------ public API


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) symmetric quantization of ``x [M, K]``, one read of ``x`` and one write of ``q``.

    ``amax = max|x_row|`` in float32; ``scale = amax / qmax`` (qmax 448 for float8_e4m3fn, 127 for int8;
    1 when ``amax == 0``); ``q = x / scale`` clamped to ±448 and cast to fp8 (nearest even), or rounded half to
    even and clamped to ±127 for int8. Twin: :func:`wanrt.quant.layers.quantize_per_token` (eager), which it
    matches exactly (same scales and ``q`` bits; see the module docstring for the CUDA scale rounding).

    Args:
        x: ``[M, K]`` float32/bfloat16/float16, ``K > 0``; any row stride (a non-unit column stride is copied).
        dtype: ``torch.float8_e4m3fn`` or ``torch.int8``.

    Returns:
        ``(q, scale)``: ``q [M, K]`` contiguous in ``dtype``; ``scale`` float32 ``[M, 1]``.

    Raises:
        ValueError: on a bad dtype or shape, or a tensor that is not CUDA (CPU only under
            ``TRITON_INTERPRET=1``).
    """
    _check_quantize_args(x, dtype)
    return _quantize_per_token_op(x, dtype)


def int8_matmul_rescale(
    xq: torch.Tensor,
    wq: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """W8A8 INT8 Linear after quantization: ``y = ((xq @ wq^T) · x_scale · w_scale + bias).to(out_dtype)``.

    The int32 product is ``torch._int_mm`` (padded or replaced by an exact float matmul for shapes it does not
    take, :func:`int_mm_path`); the float32 rescale ``acc · x_scale[m] · w_scale[n] + bias[n]`` and the cast
    are one Triton pass. Twin: the eager branch of :meth:`wanrt.quant.layers.Int8Linear.forward` (within one
    rounding of ``out_dtype``; on a GPU the multiply-add may be fused).

    Args:
        xq: int8 ``[M, K]`` activations (per-token quantized).
        wq: int8 ``[N, K]`` weight (per-channel quantized).
        x_scale: float32 ``[M, 1]`` or ``[M]``.
        w_scale: float32 ``[N]``.
        bias: ``[N]`` float tensor (any float dtype, added in float32) or ``None``.
        out_dtype: float16, bfloat16 or float32.

    Returns:
        ``y [M, N]`` in ``out_dtype`` (contiguous).

    Raises:
        ValueError: on bad shapes, dtypes or devices.
    """
    _check_rescale_args(xq, wq, x_scale, w_scale, bias, out_dtype)
    return _int8_matmul_rescale_op(xq, wq, x_scale, w_scale, bias, out_dtype)
