"""3-D rotary position embedding (RoPE) of the Wan2.1 DiT.

Reproduces ``rope_params`` / ``rope_apply`` of ``wan/modules/model.py``
(docs/model-reference.md §2.8, §9.6):

* ``head_dim`` is split into three axes (frame, height, width) of ``d - 4*(d//6)``,
  ``2*(d//6)`` and ``2*(d//6)`` real dims (44/42/42 for d = 128).
* Each axis has its own base: ``freq_j = theta^(-2j / dim_axis)``, angles ``pos * freq_j``
  for integer positions ``0 .. max_pos-1``; tables are complex128 ``exp(i * angle)``.
* The rotation acts on interleaved adjacent pairs ``(x[2j], x[2j+1])`` (GPT-J style, not
  rotate-half) and is computed in float64; the result is returned as float32.
* Token order is ``f * H*W + h * W + w``; tokens past ``F*H*W`` (padding) pass unrotated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RopeTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class RopeTable:
    """Per-token rotations of one token grid, in the two forms wanrt's ops consume.

    Attributes:
        rot: complex128 ``[S_grid, head_dim/2]`` (the eager path multiplies by it in float64,
            exactly as the official code).
        cos: float32 ``[S_grid, head_dim/2]``, ``rot.real`` (read by the Triton kernels).
        sin: float32 ``[S_grid, head_dim/2]``, ``rot.imag``.
    """

    rot: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def from_rot(cls, rot: torch.Tensor) -> RopeTable:
        """Build from complex rotations ``[S_grid, head_dim/2]`` (any complex dtype)."""
        if not rot.is_complex() or rot.ndim != 2:
            raise ValueError(f"RopeTable needs complex rotations [S, head_dim/2], got {rot.dtype} {tuple(rot.shape)}")
        rot = rot.to(torch.complex128)
        return cls(rot, rot.real.float().contiguous(), rot.imag.float().contiguous())

    @property
    def num_tokens(self) -> int:
        """Rotated tokens ``S_grid``; later tokens pass unrotated."""
        return self.rot.shape[0]

    @property
    def head_dim(self) -> int:
        """Head dim the table rotates (``2 * rot.shape[1]``)."""
        return 2 * self.rot.shape[1]

    def to(self, device: torch.device | str) -> RopeTable:
        """The same table on ``device``."""
        return RopeTable(self.rot.to(device), self.cos.to(device), self.sin.to(device))


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims per axis ``(t, h, w)``: ``(d - 4*(d//6), 2*(d//6), 2*(d//6))``.

    Raises:
        ValueError: if ``head_dim`` is not a positive even number.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs a positive even head_dim, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_freqs(
    head_dim: int,
    max_pos: int = 1024,
    theta: float = 10000.0,
    *,
    device: torch.device | str | None = None,
) -> RopeTables:
    """Per-axis rotation tables ``exp(i * pos * theta^(-2j/dim_axis))``.

    Args:
        head_dim: Attention head dim (even); split per :func:`rope_axis_dims`.
        max_pos: Number of positions per axis (1024 in Wan2.1).
        theta: Base (10000).
        device: Where the tables are built (the official code builds them on the CPU).

    Returns:
        ``(freqs_t, freqs_h, freqs_w)``, complex128 of shapes ``[max_pos, t/2]``,
        ``[max_pos, h/2]``, ``[max_pos, w/2]`` (``[1024, 22]``, ``[1024, 21]``, ``[1024, 21]``
        for head_dim 128).

    Raises:
        ValueError: if ``head_dim`` is not positive and even or ``max_pos < 1``.
    """
    if max_pos < 1:
        raise ValueError(f"max_pos must be >= 1, got {max_pos}")
    pos = torch.arange(max_pos, dtype=torch.float64, device=device)  # [max_pos]
    tables = []
    for dim_axis in rope_axis_dims(head_dim):
        exponent = torch.arange(0, dim_axis, 2, dtype=torch.float64, device=device) / dim_axis
        inv_freq = 1.0 / torch.pow(theta, exponent)  # [dim_axis/2]
        angles = torch.outer(pos, inv_freq)  # [max_pos, dim_axis/2]
        tables.append(torch.polar(torch.ones_like(angles), angles))  # complex128
    return tables[0], tables[1], tables[2]


def rope_grid(grid_sizes: tuple[int, int, int], freqs: RopeTables) -> torch.Tensor:
    """Per-token rotations for a ``(F, H, W)`` token grid.

    Args:
        grid_sizes: Token grid ``(F, H, W)`` after patch embedding.
        freqs: Output of :func:`rope_freqs`.

    Returns:
        complex128 ``[F*H*W, head_dim/2]``; row ``f*H*W + h*W + w`` is
        ``cat(freqs_t[f], freqs_h[h], freqs_w[w])``.

    Raises:
        ValueError: if a grid size is < 1 or exceeds the tables' ``max_pos``.
    """
    f, h, w = (int(s) for s in grid_sizes)
    ft, fh, fw = freqs
    for name, size in (("F", f), ("H", h), ("W", w)):
        if size < 1 or size > ft.shape[0]:
            raise ValueError(
                f"RoPE grid size {name}={size} out of range 1..{ft.shape[0]} (table length)"
            )
    rot = torch.cat(
        [
            ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1),  # [F, H, W, t/2]
            fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),  # [F, H, W, h/2]
            fw[:w].view(1, 1, w, -1).expand(f, h, w, -1),  # [F, H, W, w/2]
        ],
        dim=-1,
    )  # [F, H, W, head_dim/2]
    return rot.reshape(f * h * w, -1)  # [S, head_dim/2]


def rope_table(grid_sizes: tuple[int, int, int], freqs: RopeTables) -> RopeTable:
    """:class:`RopeTable` of a ``(F, H, W)`` grid (see :func:`rope_grid`)."""
    return RopeTable.from_rot(rope_grid(grid_sizes, freqs))


def rope_rotate(
    x: torch.Tensor,
    rot: torch.Tensor | RopeTable,
    *,
    out_dtype: torch.dtype = torch.float32,
    backend: str = "eager",
) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` by precomputed per-token rotations.

    ``(x[2j] + i x[2j+1]) * rot[s, j]`` for the first ``S_grid`` tokens; later tokens
    (padding) are returned unchanged. The eager path computes in float64 like the official code;
    ``backend="triton"`` computes in float32 from the table's cos/sin.

    Args:
        x: ``[B, S, heads, head_dim]``, any float dtype.
        rot: complex ``[S_grid, head_dim/2]`` from :func:`rope_grid`, or a :class:`RopeTable`;
            ``S_grid <= S``.
        out_dtype: Output dtype (float32 in the official code, which ends with ``.float()``).
        backend: ``"eager"`` or ``"triton"`` (the fused-ops backends of :mod:`wanrt.ops.backends`).

    Returns:
        ``[B, S, heads, head_dim]`` in ``out_dtype``.

    Raises:
        ValueError: on shape mismatch or an unknown backend.
    """
    if backend == "eager":
        return rope_rotate_eager(x, rot, out_dtype=out_dtype)
    from wanrt.ops.backends import fused_impl

    table = rot if isinstance(rot, RopeTable) else RopeTable.from_rot(rot)
    _check_rope_shapes(x, table.rot)
    return fused_impl(backend).norm_rope(
        x.flatten(2), None, 0.0, table.cos, table.sin, x.shape[2], out_dtype, "bshd"
    )


def _check_rope_shapes(x: torch.Tensor, rot: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"rope expects x of shape [B, S, heads, head_dim], got {tuple(x.shape)}")
    if rot.ndim != 2 or 2 * rot.shape[1] != x.shape[3] or rot.shape[0] > x.shape[1]:
        raise ValueError(
            f"rope: rotations {tuple(rot.shape)} do not fit x {tuple(x.shape)} "
            "(need [S_grid <= S, head_dim/2])"
        )


def rope_rotate_eager(
    x: torch.Tensor, rot: torch.Tensor | RopeTable, *, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Pure-PyTorch :func:`rope_rotate` (complex128 multiply, like the official code)."""
    if isinstance(rot, RopeTable):
        rot = rot.rot
    if x.ndim != 4:
        raise ValueError(f"rope expects x of shape [B, S, heads, head_dim], got {tuple(x.shape)}")
    b, s, n, d = x.shape
    s_rot = rot.shape[0]
    if rot.ndim != 2 or 2 * rot.shape[1] != d or s_rot > s:
        raise ValueError(
            f"rope: rotations {tuple(rot.shape)} do not fit x {tuple(x.shape)} "
            "(need [S_grid <= S, head_dim/2])"
        )
    xr = x[:, :s_rot].to(torch.float64).reshape(b, s_rot, n, d // 2, 2)  # [B, S_grid, n, d/2, 2]
    xc = torch.view_as_complex(xr.contiguous())  # [B, S_grid, n, d/2] complex128
    out = torch.view_as_real(xc * rot[None, :, None, :])  # [B, S_grid, n, d/2, 2]
    out = out.reshape(b, s_rot, n, d)  # [B, S_grid, n, d]
    out = out.float()
    if s_rot < s:
        out = torch.cat([out, x[:, s_rot:].float()], dim=1)  # [B, S, n, d]
    return out.to(out_dtype)


def rope_apply(
    x: torch.Tensor, grid_sizes: tuple[int, int, int], freqs: RopeTables
) -> torch.Tensor:
    """RoPE on ``x`` for a ``(F, H, W)`` token grid: ``rope_rotate(x, rope_grid(grid, freqs))``.

    Args:
        x: ``[B, S, heads, head_dim]`` with ``S >= F*H*W``.
        grid_sizes: ``(F, H, W)``.
        freqs: Output of :func:`rope_freqs` for ``head_dim``.

    Returns:
        float32 ``[B, S, heads, head_dim]``.

    Raises:
        ValueError: on shape mismatch or a grid larger than the tables.
    """
    return rope_rotate(x, rope_grid(grid_sizes, freqs).to(x.device))
