"""wanrt.ops eager implementations against direct references (docs/model-reference.md §2, §9)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wanrt.ops import (
    attention,
    layer_norm,
    rms_norm,
    rope_apply,
    rope_axis_dims,
    rope_freqs,
    rope_grid,
    rope_rotate,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize(
    "head_dim, dims",
    [(128, (44, 42, 42)), (12, (4, 4, 4)), (16, (8, 4, 4)), (24, (8, 8, 8)), (10, (6, 2, 2))],
)
def test_rope_axis_split(head_dim, dims):
    assert rope_axis_dims(head_dim) == dims
    tables = rope_freqs(head_dim, max_pos=7)
    assert [tuple(f.shape) for f in tables] == [(7, d // 2) for d in dims]
    assert all(f.dtype == torch.complex128 for f in tables)


@pytest.mark.parametrize("head_dim", [0, 7, -2])
def test_rope_bad_head_dim(head_dim):
    with pytest.raises(ValueError, match="even head_dim"):
        rope_freqs(head_dim)


def test_rope_freqs_values_head_dim_128():
    ft, fh, fw = rope_freqs(128)
    assert ft.shape == (1024, 22) and fh.shape == (1024, 21) and fw.shape == (1024, 21)
    for table, dim_axis in ((ft, 44), (fh, 42)):
        for pos, j in ((0, 0), (1, 0), (5, 3), (1023, dim_axis // 2 - 1)):
            angle = pos * 10000.0 ** (-2 * j / dim_axis)
            z = table[pos, j].item()
            assert abs(z.real - math.cos(angle)) < 1e-12
            assert abs(z.imag - math.sin(angle)) < 1e-12


def _rope_reference(x: torch.Tensor, grid, head_dim: int, theta: float = 10000.0):
    """Explicit cos/sin rotation of interleaved pairs, float64, token by token."""
    b, s, n, d = x.shape
    f_, h_, w_ = grid
    dims = rope_axis_dims(head_dim)
    out = x.to(torch.float64).clone()
    for tok in range(f_ * h_ * w_):
        pos = (tok // (h_ * w_), (tok // w_) % h_, tok % w_)
        pair = 0
        for axis in range(3):
            for j in range(dims[axis] // 2):
                angle = pos[axis] * theta ** (-2.0 * j / dims[axis])
                c, sn = math.cos(angle), math.sin(angle)
                x0 = x[:, tok, :, 2 * pair].to(torch.float64)
                x1 = x[:, tok, :, 2 * pair + 1].to(torch.float64)
                out[:, tok, :, 2 * pair] = x0 * c - x1 * sn
                out[:, tok, :, 2 * pair + 1] = x0 * sn + x1 * c
                pair += 1
    return out.float()


@pytest.mark.parametrize("head_dim, grid", [(16, (3, 2, 5)), (12, (1, 3, 3)), (128, (2, 2, 3))])
def test_rope_apply_matches_explicit_rotation(head_dim, grid):
    s_grid = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, s_grid + 3, 3, head_dim, generator=_gen())  # 3 padded tokens
    got = rope_apply(x, grid, rope_freqs(head_dim))
    want = _rope_reference(x, grid, head_dim)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert torch.equal(got[:, s_grid:], x[:, s_grid:])  # padding passes unrotated


def test_rope_rotate_bf16_input_returns_fp32():
    grid = (2, 3, 4)
    x = torch.randn(1, 24, 2, 16, generator=_gen(1)).to(torch.bfloat16)
    rot = rope_grid(grid, rope_freqs(16))
    got = rope_rotate(x, rot)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rope_rotate(x.float(), rot), rtol=0, atol=0)


def test_rope_grid_token_order():
    ft, fh, fw = rope_freqs(12, max_pos=8)
    rot = rope_grid((2, 3, 4), (ft, fh, fw))
    assert rot.shape == (24, 6)
    tok = 1 * 12 + 2 * 4 + 3  # f=1, h=2, w=3
    torch.testing.assert_close(rot[tok], torch.cat([ft[1], fh[2], fw[3]]))


def test_rope_errors():
    tables = rope_freqs(16, max_pos=4)
    with pytest.raises(ValueError, match="out of range"):
        rope_grid((5, 1, 1), tables)
    with pytest.raises(ValueError, match="do not fit"):
        rope_rotate(torch.zeros(1, 3, 1, 16), rope_grid((2, 2, 1), tables))
    with pytest.raises(ValueError, match="do not fit"):
        rope_rotate(torch.zeros(1, 4, 1, 12), rope_grid((2, 2, 1), tables))


# ------------------------------------------------------------------------- attention


def _attention_reference(q, k, v, k_lens=None):
    qd, kd, vd = (t.to(torch.float64).transpose(1, 2) for t in (q, k, v))  # [B, n, S, d]
    scores = qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, n, Sq, Sk]
    if k_lens is not None:
        keep = torch.arange(k.shape[1])[None, :] < k_lens[:, None]  # [B, Sk]
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ vd).transpose(1, 2)  # [B, Sq, n, d]


@pytest.mark.parametrize("sq, sk", [(7, 7), (5, 11), (13, 3)])
def test_attention_matches_reference(sq, sk):
    g = _gen(2)
    q = torch.randn(2, sq, 3, 8, generator=g)
    k = torch.randn(2, sk, 3, 8, generator=g)
    v = torch.randn(2, sk, 3, 8, generator=g)
    got = attention(q, k, v)
    assert got.shape == (2, sq, 3, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _attention_reference(q, k, v), rtol=0, atol=2e-6)


def test_attention_key_lengths_mask_padded_keys():
    g = _gen(3)
    q = torch.randn(2, 6, 2, 8, generator=g)
    k = torch.randn(2, 9, 2, 8, generator=g)
    v = torch.randn(2, 9, 2, 8, generator=g)
    k_lens = torch.tensor([9, 4])
    got = attention(q, k, v, k_lens=k_lens)
    torch.testing.assert_close(
        got.double(), _attention_reference(q, k, v, k_lens), rtol=0, atol=2e-6
    )
    # Sample 1 equals attention over its first 4 keys only.
    torch.testing.assert_close(got[1:], attention(q[1:], k[1:, :4], v[1:, :4]))


def test_attention_bf16_runs_in_bf16():
    g = _gen(4)
    q, k, v = (torch.randn(1, 5, 2, 8, generator=g) for _ in range(3))
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), attention(q, k, v), rtol=0, atol=3e-2)


def test_attention_errors():
    x = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(x, x, x.double())
    with pytest.raises(ValueError, match="share B, heads, head_dim"):
        attention(x, torch.zeros(1, 4, 2, 4), torch.zeros(1, 4, 2, 4))
    with pytest.raises(ValueError, match=r"\[B, S, heads, head_dim\]"):
        attention(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="k_lens"):
        attention(x, x, x, k_lens=torch.tensor([1, 2]))


# ------------------------------------------------------------------------- norms


def test_rms_norm_fp32():
    g = _gen(5)
    x = torch.randn(2, 5, 24, generator=g)
    w = 1 + 0.2 * torch.randn(24, generator=g)
    got = rms_norm(x, w, 1e-6)
    want = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, F.rms_norm(x, (24,), w, 1e-6))


def test_rms_norm_bf16_input_fp32_weight():
    """WanRMSNorm: normalise in fp32, round to bf16, multiply by the fp32 weight → fp32."""
    g = _gen(6)
    x = torch.randn(3, 16, generator=g).bfloat16()
    w = 1 + 0.2 * torch.randn(16, generator=g)
    got = rms_norm(x, w, 1e-6)
    assert got.dtype == torch.float32
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    torch.testing.assert_close(got, normed.float() * w, rtol=0, atol=0)
    assert rms_norm(x, None, 1e-6).dtype == torch.bfloat16


def test_layer_norm_fp32_compute_and_cast_back():
    g = _gen(7)
    x = torch.randn(2, 4, 32, generator=g) * 3 + 1
    w = 1 + 0.2 * torch.randn(32, generator=g)
    b = 0.2 * torch.randn(32, generator=g)
    torch.testing.assert_close(layer_norm(x, w, b, 1e-6), F.layer_norm(x, (32,), w, b, 1e-6))
    xb = x.bfloat16()
    got = layer_norm(xb, w, b, 1e-6)
    assert got.dtype == torch.bfloat16
    want = F.layer_norm(xb.float(), (32,), w, b, 1e-6).bfloat16()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got = layer_norm(xb, None, None, 1e-6)
    torch.testing.assert_close(
        got, F.layer_norm(xb.float(), (32,), eps=1e-6).bfloat16(), rtol=0, atol=0
    )


# ------------------------------------------------------------------------- entry points by backend


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_entry_point_backends(backend, with_weight):
    from wanrt.testing import assert_close

    g = _gen(3)
    x = torch.randn(2, 7, 40, generator=g).to(torch.float16)
    w = 1 + 0.1 * torch.randn(40, generator=g) if with_weight else None
    out = rms_norm(x, w, 1e-6, out_dtype=torch.float32, backend=backend)
    # float64 formula with the official rounding point (WanRMSNorm: the normalized value is cast back to x's
    # dtype, fp16 here, before the weight multiplies it)
    x64 = x.double()
    want = (x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.float16).double()
    if w is not None:
        want = want * w.double()
    assert_close(out, want, torch.float16, name=f"rms_norm {backend}")
    assert out.shape == x.shape and out.dtype == torch.float32


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_rope_rotate_entry_point_backends(backend):
    from wanrt.ops import rope_table
    from wanrt.testing import assert_close

    x = torch.randn(2, 33, 3, 16, generator=_gen(4))
    table = rope_table((2, 3, 5), rope_freqs(16))  # 30 rotated tokens, 3 padding tokens
    out = rope_rotate(x, table, backend=backend)
    assert_close(out, _rope_reference(x, (2, 3, 5), 16), name=f"rope {backend}")
    assert torch.equal(out[:, 30:], x[:, 30:])
