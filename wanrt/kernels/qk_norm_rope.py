"""Fused QK RMS-norm + 3-D RoPE + cast (+ attention layout) for the Wan2.1 DiT, in Triton.

One pass over the projected queries or keys replaces four eager passes (norm, float64 RoPE, the
cast for attention and, for torch SDPA, the ``[B, H, S, D]`` copy). Numerics follow the official
code: ``WanRMSNorm`` (float32 statistics, the normalised value rounded to ``x.dtype`` before the
weight) and ``rope_apply`` (interleaved pairs); RoPE is computed in float32 from the table's
cos/sin instead of complex128, which is within one rounding of the output dtype.

Layers: the private ``@triton.jit`` kernel; :func:`_norm_rope_launch`, which checks and allocates;
the ``wanrt::norm_rope`` custom op with its fake registration; and the public :func:`norm_rope`.
"""


import torch
import triton
import triton.language as tl

from wanrt.kernels._common import TORCH_FLOAT_DTYPES, cast_rne, check_device, interpreting, row_launch

LAYOUTS = ("bshd", "bhsd")
OUT_DTYPES = (*TORCH_FLOAT_DTYPES, torch.float64)


# ------------------------------------------------------------------------------ kernels


@triton.jit
def _rms_scale(v, rstd, w, x_dtype: tl.constexpr, HAS_W: tl.constexpr, ROUND_W: tl.constexpr,
               RNE_BF16: tl.constexpr):
    # WanRMSNorm: (v * rstd).type_as(x) * weight, in float32; rounded again when the weight
    # has x's low-precision dtype (then the eager product is computed in that dtype).
    if HAS_W:
        v = cast_rne(v * rstd[:, None], x_dtype, RNE_BF16).to(tl.float32) * w[None, :]
        if ROUND_W:
            v = cast_rne(v, x_dtype, RNE_BF16).to(tl.float32)
    return v


@triton.jit
def _norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, o_ptr,
    n_rows, S, S_rot, DIM, eps,
    sxb, sxs, sob, sos, soh,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    HAS_W: tl.constexpr, ROUND_W: tl.constexpr, HAS_ROPE: tl.constexpr, RNE_BF16: tl.constexpr,
):
    # One tile = ROWS tokens x BLOCK channels (all heads of a token); rows are b * S + s.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    d = tl.arange(0, BLOCK)  # [BLOCK] channel index h * HEAD_DIM + dh
    d_ok = d < DIM
    mask = (rows < n_rows)[:, None] & d_ok[None, :]  # [ROWS, BLOCK]
    r64 = rows.to(tl.int64)
    b = r64 // S
    s = r64 % S
    x_row = x_ptr + (b * sxb + s * sxs)[:, None]  # [ROWS, 1] pointers
    x = tl.load(x_row + d[None, :], mask=mask, other=0.0).to(tl.float32)  # [ROWS, BLOCK]

    rstd = tl.zeros([ROWS], dtype=tl.float32)
    w = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_W:
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / DIM + eps)  # [ROWS]
        w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    y = _rms_scale(x, rstd, w, x_ptr.dtype.element_ty, HAS_W, ROUND_W, RNE_BF16)

    dh = d % HEAD_DIM
    if HAS_ROPE:
        # Partner of each channel in its interleaved pair (2j, 2j+1): the same values permuted,
        # so it takes the same per-token rstd and the weight of the partner channel.
        d_sw = d ^ 1
        xs = tl.load(x_row + d_sw[None, :], mask=mask, other=0.0).to(tl.float32)
        ws = w
        if HAS_W:
            ws = tl.load(w_ptr + d_sw, mask=d_ok, other=0.0).to(tl.float32)
        ys = _rms_scale(xs, rstd, ws, x_ptr.dtype.element_ty, HAS_W, ROUND_W, RNE_BF16)
        # out[2j] = y[2j] c - y[2j+1] s ; out[2j+1] = y[2j+1] c + y[2j] s. Tokens s >= S_rot
        # load c = 1, s = 0 and pass unrotated.
        rot_mask = mask & (s < S_rot)[:, None]
        cs_off = (s * (HEAD_DIM // 2))[:, None] + (dh // 2)[None, :]
        c = tl.load(cos_ptr + cs_off, mask=rot_mask, other=1.0)
        sn = tl.load(sin_ptr + cs_off, mask=rot_mask, other=0.0)
        sn = tl.where((d % 2 == 0)[None, :], -sn, sn)
        y = y * c + ys * sn

    o_off = (b * sob + s * sos)[:, None] + ((d // HEAD_DIM) * soh + dh)[None, :]
    tl.store(o_ptr + o_off, cast_rne(y, o_ptr.dtype.element_ty, RNE_BF16), mask=mask)


# ------------------------------------------------------------------------------ launcher


def _check_norm_rope_args(x, weight, cos, sin, num_heads, out_dtype, layout) -> int:
    """Validate shapes, dtypes and the layout (devices are checked at launch); return head_dim."""
    if layout not in LAYOUTS:
        raise ValueError(f"norm_rope: layout must be one of {LAYOUTS}, got {layout!r}")
    if x.ndim != 3:
        raise ValueError(f"norm_rope: x must be [B, S, num_heads*head_dim], got {tuple(x.shape)}")
    if num_heads < 1 or x.shape[2] % num_heads or (x.shape[2] // num_heads) % 2:
        raise ValueError(f"norm_rope: dim {x.shape[2]} of x {tuple(x.shape)} must be num_heads={num_heads} "
                         "times an even head_dim")
    if x.dtype not in TORCH_FLOAT_DTYPES:
        raise ValueError(f"norm_rope: x must be one of {TORCH_FLOAT_DTYPES}, got {x.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"norm_rope: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    head_dim = x.shape[2] // num_heads
    if weight is not None and (tuple(weight.shape) != (x.shape[2],) or weight.dtype not in TORCH_FLOAT_DTYPES):
        raise ValueError(f"norm_rope: weight must be a float [{x.shape[2]}] tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("norm_rope: cos and sin must be given together (or both None for no RoPE)")
    if cos is not None:
        want = f"float32 [S_rot <= {x.shape[1]}, head_dim/2 = {head_dim // 2}]"
        for name, t in (("cos", cos), ("sin", sin)):
            if t.ndim != 2 or t.shape[1] != head_dim // 2 or t.shape[0] > x.shape[1] or t.dtype != torch.float32:
                raise ValueError(f"norm_rope: {name} must be {want}, got {t.dtype} {tuple(t.shape)}")
        if cos.shape != sin.shape:
            raise ValueError(f"norm_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    return head_dim


def _storage_shape(x: torch.Tensor, num_heads: int, layout: str) -> tuple[int, int, int, int]:
    b, s, dim = x.shape
    return (b, s, num_heads, dim // num_heads) if layout == "bshd" else (b, num_heads, s, dim // num_heads)


def _norm_rope_launch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    out_dtype: torch.dtype,
    layout: str,
) -> torch.Tensor:
    """Check, allocate the output storage (``[B,S,H,D]`` or ``[B,H,S,D]`` contiguous) and launch."""
    head_dim = _check_norm_rope_args(x, weight, cos, sin, num_heads, out_dtype, layout)
    check_device("norm_rope", x, weight, cos, sin)
    if x.stride(2) != 1:  # the kernel reads channels at unit stride; B and S strides are free
        x = x.contiguous()
    weight = None if weight is None else weight.contiguous()
    has_rope = cos is not None and cos.shape[0] > 0
    if has_rope:
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(_storage_shape(x, num_heads, layout), dtype=out_dtype, device=x.device)
    b, s, dim = x.shape
    n_rows = b * s
    if n_rows == 0 or dim == 0:
        return out
    view = out if layout == "bshd" else out.transpose(1, 2)  # [B, S, H, D] strides of the storage
    block, rows, num_warps = row_launch(dim)
    _norm_rope_kernel[(triton.cdiv(n_rows, rows),)](
        x, x if weight is None else weight, cos if has_rope else x, sin if has_rope else x, out,
        n_rows, s, cos.shape[0] if has_rope else 0, dim, float(eps),
        x.stride(0), x.stride(1), view.stride(0), view.stride(1), view.stride(2),
        HEAD_DIM=head_dim, BLOCK=block, ROWS=rows,
        HAS_W=weight is not None,
        ROUND_W=weight is not None and weight.dtype == x.dtype and x.dtype != torch.float32,
        HAS_ROPE=has_rope, RNE_BF16=interpreting(),
        num_warps=num_warps,
    )
    return out


# ------------------------------------------------------------------------------ custom op


@torch.library.custom_op("wanrt::norm_rope", mutates_args=())
def _norm_rope_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    out_dtype: torch.dtype,
    layout: str,
) -> torch.Tensor:
    return _norm_rope_launch(x, weight, eps, cos, sin, num_heads, out_dtype, layout)


@_norm_rope_op.register_fake
def _norm_rope_fake(x, weight, eps, cos, sin, num_heads, out_dtype, layout):
    _check_norm_rope_args(x, weight, cos, sin, num_heads, out_dtype, layout)
    return x.new_empty(_storage_shape(x, num_heads, layout), dtype=out_dtype)


def norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    out_dtype: torch.dtype,
    layout: str = "bshd",
) -> torch.Tensor:
    """QK RMS-norm over the full dim, interleaved RoPE per head, cast, in one pass.

    Per token ``t = (b, s)`` with ``x_f = x[b, s].float()`` (all heads together):

    * ``y = (x_f * rsqrt(mean(x_f^2) + eps)).to(x.dtype).float() * weight.float()`` when
      ``weight`` is given (rounded once more to ``x.dtype`` if ``weight`` has ``x``'s
      low-precision dtype, as the eager product then is), else ``y = x_f``;
    * split into heads; for ``s < S_rot``, on each head's pairs ``j``:
      ``out[2j] = y[2j] cos[s, j] - y[2j+1] sin[s, j]``,
      ``out[2j+1] = y[2j] sin[s, j] + y[2j+1] cos[s, j]``; tokens ``s >= S_rot`` are unrotated;
    * stored in ``out_dtype``.

    Reproduces ``norm_q``/``norm_k`` (``WanRMSNorm``), ``rope_apply`` and the cast in
    ``flash_attention`` of official ``WanSelfAttention`` (``wan/modules/model.py``), with RoPE in
    float32 instead of float64. Also serves ``rms_norm`` (rows ``[1, N, D]``, one head, no RoPE)
    and ``rope_rotate`` (``weight=None``). Twin: :func:`wanrt.ops.norms.qk_norm_rope_eager`.

    Args:
        x: ``[B, S, num_heads * head_dim]`` float16/bfloat16/float32; any B and S strides (a last
            dim with a stride other than 1 is copied first).
        weight: RMS-norm weight ``[num_heads * head_dim]`` (any float dtype), or ``None``: no norm.
        eps: RMS-norm epsilon (1e-6 in Wan2.1).
        cos: float32 ``[S_rot, head_dim/2]`` with ``S_rot <= S`` (``RopeTable.cos``), or ``None``.
        sin: float32 ``[S_rot, head_dim/2]`` (``RopeTable.sin``); ``None`` exactly when ``cos`` is.
        num_heads: Heads the last dim splits into; ``head_dim`` must be even.
        out_dtype: float16, bfloat16, float32 or float64.
        layout: ``"bshd"``: contiguous ``[B, S, H, D]``; ``"bhsd"``: contiguous ``[B, H, S, D]``
            storage returned as its ``transpose(1, 2)`` view.

    Returns:
        ``[B, S, num_heads, head_dim]`` in ``out_dtype`` (a permuted view for ``"bhsd"``).

    Raises:
        ValueError: on a bad shape, dtype or layout, ``cos`` without ``sin``, or tensors that are
            not CUDA (CPU only under ``TRITON_INTERPRET=1``) or not on one device.
    """
    _check_norm_rope_args(x, weight, cos, sin, num_heads, out_dtype, layout)
    out = _norm_rope_op(x, weight, float(eps), cos, sin, int(num_heads), out_dtype, layout)
    return out if layout == "bshd" else out.transpose(1, 2)  # [B, S, H, D] view of [B, H, S, D]
