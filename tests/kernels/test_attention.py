"""wanrt.kernels.attention (Triton, fused RoPE + key lengths) against a float64 reference and the eager op.

On a machine without CUDA the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1),
bf16 through the kernel's interpreter flag (fp32 dots, round-to-nearest-even casts). On a CUDA machine
the same tests run on the GPU; the `gpu`-marked ones add bf16 at realistic shapes (`pytest -m gpu`).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from wanrt.kernels.attention import attention
from wanrt.ops.rope import RopeTable, rope_freqs, rope_table
from wanrt.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype, seed) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float32).to(DEVICE, dtype)


def _random_table(s_rot: int, d: int, seed: int) -> RopeTable:
    angles = torch.rand(s_rot, d // 2, generator=_gen(seed), dtype=torch.float64) * (4 * math.pi)
    return RopeTable.from_rot(torch.polar(torch.ones_like(angles), angles)).to(DEVICE)


def _rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation in float64 with the kernel's float32 tables, rounded to x.dtype."""
    b, _, h, d = x.shape
    s_rot = cos.shape[0]
    xr = x[:, :s_rot].double().reshape(b, s_rot, h, d // 2, 2)  # [B, S_rot, H, D/2, 2]
    c = cos.double()[None, :, None, :]  # [1, S_rot, 1, D/2]
    sn = sin.double()[None, :, None, :]
    even, odd = xr[..., 0], xr[..., 1]
    rot = torch.stack([even * c - odd * sn, even * sn + odd * c], dim=-1).reshape(b, s_rot, h, d)
    return torch.cat([rot.to(x.dtype), x[:, s_rot:]], dim=1)  # [B, S, H, D] in x.dtype


def _reference(q, k, v, k_lens=None, cos=None, sin=None) -> torch.Tensor:
    """float64 attention; rows of samples with no key (k_lens <= 0) are zeros, as the kernel documents."""
    if cos is not None:
        q, k = _rope_reference(q, cos, sin), _rope_reference(k, cos, sin)
    d = q.shape[-1]
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(d)  # [B, H, Sq, Sk]
    if k_lens is not None:
        keep = torch.arange(k.shape[1], device=k.device)[None, :] < k_lens.to(k.device)[:, None]  # [B, Sk]
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    return torch.einsum("bhqk,bkhd->bqhd", p, v.double())  # [B, Sq, H, D]


def _check(out, ref, dtype, name, shape):
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the output"
    assert_close(out, ref, dtype, name=name)


# (B, Sq, Sk, H, D, S_rot or None, k_lens or None); S_rot == "grid" uses the real Wan 3-D table of a
# (2, 3, 5) grid (30 tokens). Kernel tiles are 32 x 32 under the interpreter: 17 is one partial
# block, 33/50/100 several blocks with a partial tail, 64 an exact block multiple.
CASES = {
    "single_token": (1, 1, 1, 1, 16, None, None),
    "s17_h3": (2, 17, 17, 3, 24, None, None),
    "s100_d64": (1, 100, 100, 1, 64, None, None),
    "cross_50x33": (2, 50, 33, 3, 16, None, None),
    "cross_33x50": (1, 33, 50, 1, 64, None, None),
    "rope_partial": (2, 100, 100, 3, 24, 70, None),
    "rope_full": (2, 17, 17, 1, 16, 17, None),
    "rope_grid_klens": (2, 50, 50, 3, 64, "grid", (40, 50)),
    "cross_klens": (2, 50, 33, 3, 16, None, (5, 33)),
    "klens_block_multiple_and_over": (2, 100, 100, 1, 24, None, (64, 300)),
    "rope_klens_one_key": (2, 17, 17, 3, 16, 10, (1, 17)),
}


def _make_case(b, sq, sk, h, d, s_rot, lens, dtype, seed=0):
    q = _randn(b, sq, h, d, dtype=dtype, seed=seed)
    k = _randn(b, sk, h, d, dtype=dtype, seed=seed + 1)
    v = _randn(b, sk, h, d, dtype=dtype, seed=seed + 2)
    k_lens = None if lens is None else torch.tensor(lens, device=DEVICE)
    table = None
    if s_rot == "grid":
        table = rope_table((2, 3, 5), rope_freqs(d, max_pos=8)).to(DEVICE)
    elif s_rot is not None:
        table = _random_table(s_rot, d, seed + 3)
    return q, k, v, k_lens, table


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_matches_reference(case, dtype):
    b, sq, sk, h, d, s_rot, lens = CASES[case]
    q, k, v, k_lens, table = _make_case(b, sq, sk, h, d, s_rot, lens, dtype)
    cos, sin = (None, None) if table is None else (table.cos, table.sin)
    out = attention(q, k, v, k_lens, cos, sin)
    _check(out, _reference(q, k, v, k_lens, cos, sin), dtype, case, (b, sq, h, d))
    if table is None:
        from wanrt.ops.attention import attention_eager

        eager = attention_eager(q, k, v, k_lens=k_lens)
        assert_close(out, eager, dtype, name=f"{case} vs attention_eager")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_eager_with_rope(dtype):
    from wanrt.ops.attention import attention_eager

    if "rope" not in inspect.signature(attention_eager).parameters:
        pytest.skip("wanrt.ops.attention.attention_eager has no rope argument yet")
    q, k, v, k_lens, table = _make_case(2, 50, 50, 3, 64, "grid", (40, 50), dtype, seed=5)
    out = attention(q, k, v, k_lens, table.cos, table.sin)
    assert_close(out, attention_eager(q, k, v, k_lens=k_lens, rope=table), dtype, name="rope vs attention_eager")


@pytest.mark.parametrize("d", [8, 40, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_head_dims(d, dtype):
    """Smallest/largest head_dim and one that is not a power of two (BLOCK_D = 64, 24 masked dims)."""
    q, k, v, k_lens, table = _make_case(1, 33, 33, 2, d, 20, (25,), dtype, seed=d)
    out = attention(q, k, v, k_lens, table.cos, table.sin)
    _check(out, _reference(q, k, v, k_lens, table.cos, table.sin), dtype, f"d={d}", (1, 33, 2, d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(dtype):
    """q: a [B, H, S, D] tensor transposed; k: a slice of wider rows; v: last dim strided (gets copied)."""
    b, s, h, d = 2, 50, 3, 16
    q = _randn(b, h, s, d, dtype=dtype, seed=10).transpose(1, 2)  # [B, S, H, D], strides (HSD, D, SD, 1)
    k = _randn(b, s, h, 2 * d, dtype=dtype, seed=11)[..., d:]  # [B, S, H, D], row stride 2D
    v = _randn(b, s, d, h, dtype=dtype, seed=12).transpose(2, 3)  # [B, S, H, D], last-dim stride H
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(-1) != 1
    table = _random_table(37, d, 13)
    k_lens = torch.tensor([50, 21], dtype=torch.int32, device=DEVICE)
    out = attention(q, k, v, k_lens, table.cos, table.sin)
    _check(out, _reference(q, k, v, k_lens, table.cos, table.sin), dtype, "non-contiguous", (b, s, h, d))


def test_empty_key_length_gives_zeros():
    """k_lens[b] <= 0: that sample's rows are zeros (eager PyTorch gives NaN); other samples unaffected."""
    q, k, v, _, _ = _make_case(3, 17, 17, 2, 16, None, None, torch.float32, seed=20)
    k_lens = torch.tensor([0, 9, -3], device=DEVICE)
    out = attention(q, k, v, k_lens)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] == 0).all()
    _check(out, _reference(q, k, v, k_lens), torch.float32, "empty keys", (3, 17, 2, 16))


def test_key_length_masks_padded_keys():
    """Sample 1 with k_lens = 9 equals attention over its first 9 keys only, whatever the padded keys hold."""
    q, k, v, _, _ = _make_case(2, 17, 40, 2, 16, None, None, torch.float32, seed=30)
    out = attention(q, k, v, torch.tensor([40, 9], device=DEVICE))
    alone = attention(q[1:], k[1:, :9], v[1:, :9])
    assert_close(out[1:], alone, torch.float32, name="masked vs trimmed keys")


# ----------------------------------------------------------------------------------------- errors


def _qkv(b=1, sq=8, sk=8, h=2, d=16, dtype=torch.float32):
    return tuple(torch.randn(b, s, h, d, dtype=dtype, device=DEVICE) for s in (sq, sk, sk))


def _bad_inputs():
    q, k, v = _qkv()
    t = _random_table(8, 16, 0)
    qc, kc, vc = _qkv(sq=8, sk=6)
    t6 = _random_table(6, 16, 0)
    qo, ko, vo = _qkv(d=15)
    return {
        "dtype_mismatch": ((q, k.half(), v), {}, "dtypes differ"),
        "float64": ((q.double(), k.double(), v.double()), {}, "dtype must be"),
        "rank": ((q[0], k[0], v[0]), {}, r"\[B, S, heads, head_dim\]"),
        "kv_shape": ((q, k, v[:, :5]), {}, "differ in shape"),
        "heads": ((q, k[:, :, :1], v[:, :, :1]), {}, "must share"),
        "odd_head_dim": ((qo, ko, vo), {}, "even"),
        "cos_without_sin": ((q, k, v), {"cos": t.cos}, "both cos and sin"),
        "sin_without_cos": ((q, k, v), {"sin": t.sin}, "both cos and sin"),
        "rope_cross_attention": ((qc, kc, vc), {"cos": t6.cos, "sin": t6.sin}, "Sq == Sk"),
        "rope_table_too_long": ((q, k, v), {"cos": _random_table(9, 16, 0).cos,
                                            "sin": _random_table(9, 16, 0).sin}, "more than"),
        "rope_table_width": ((q, k, v), {"cos": _random_table(8, 8, 0).cos,
                                         "sin": _random_table(8, 8, 0).sin}, "head_dim/2"),
        "rope_table_fp64": ((q, k, v), {"cos": t.cos.double(), "sin": t.sin.double()}, "float32"),
        "k_lens_shape": ((q, k, v), {"k_lens": torch.tensor([3, 4], device=DEVICE)}, "k_lens must be"),
        "k_lens_float": ((q, k, v), {"k_lens": torch.tensor([3.0], device=DEVICE)}, "integer"),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_bad_inputs_raise(name):
    args, kwargs, match = _bad_inputs()[name]
    with pytest.raises(ValueError, match=match):
        attention(*args, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors are valid under the interpreter only")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        attention(*_qkv())


# ---------------------------------------------------------------------------------------- custom op


def test_custom_op_registered():
    q, k, v = _qkv()
    out = torch.ops.wanrt.attention(q, k, v, None, None, None)
    assert_close(out, _reference(q, k, v), torch.float32, name="torch.ops.wanrt.attention")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fake_registration(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4, 24, 16, dtype=dtype, device=DEVICE).transpose(1, 2)  # [B, S=24, H=4, D]
        k = torch.empty(2, 24, 4, 16, dtype=dtype, device=DEVICE)
        t = torch.empty(20, 8, device=DEVICE)
        out = torch.ops.wanrt.attention(q, k, k, torch.empty(2, dtype=torch.int64, device=DEVICE), t, t)
        assert out.shape == (2, 24, 4, 16) and out.dtype == dtype and out.is_contiguous()
        with pytest.raises(ValueError, match="Sq == Sk"):
            torch.ops.wanrt.attention(q, k[:, :10], k[:, :10], None, t[:10], t[:10])


def test_opcheck():
    q, k, v, k_lens, table = _make_case(1, 17, 17, 2, 16, 9, (12,), torch.float32, seed=40)
    torch.library.opcheck(torch.ops.wanrt.attention.default, (q, k, v, k_lens, table.cos, table.sin))


def test_compiles_as_one_opaque_op():
    q, k, v, k_lens, table = _make_case(1, 17, 17, 2, 16, 9, (12,), torch.float32, seed=50)

    def f(q, k, v):
        return attention(q * 2.0, k, v, k_lens, table.cos, table.sin) + 1.0

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    assert_close(got, f(q, k, v), torch.float32, name="compiled")


def test_autotune_config_sets():
    """The autotuner tries the 16-bit head_dim-128 set, or the small-tile set for fp32 / head_dim > 128."""
    from wanrt.kernels import attention as mod

    configs = mod._attn_fwd_tuned.configs
    for dtype, block_d, expected in [(torch.bfloat16, 128, mod._CONFIGS_16BIT), (torch.float16, 64, mod._CONFIGS_16BIT),
                                     (torch.float32, 128, mod._CONFIGS_WIDE), (torch.bfloat16, 256, mod._CONFIGS_WIDE)]:
        kept = mod._prune_configs(configs, {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=block_d)
        assert sorted(map(mod._config_tuple, kept)) == sorted(expected)
    assert all(c.kwargs["BLOCK_M"] in (64, 128) and c.kwargs["BLOCK_N"] in (64, 128)
               for c in configs if mod._config_tuple(c) in mod._CONFIGS_16BIT)


# ------------------------------------------------------------------------------- log-sum-exp (Ring attention)


def _lse_reference(q, k, k_lens=None) -> torch.Tensor:
    """float64 ``logsumexp`` of the scaled scores ``[B, H, Sq]`` (-inf for a sample with no key)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if k_lens is not None:
        keep = torch.arange(k.shape[1], device=k.device)[None, :] < k_lens.to(k.device)[:, None]
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.logsumexp(scores, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["s17_h3", "cross_50x33", "klens_block_multiple_and_over", "cross_klens"], ids=str)
def test_attention_with_lse(case, dtype):
    from wanrt.kernels.attention import attention_with_lse

    b, sq, sk, h, d, _, lens = CASES[case]
    q, k, v, k_lens, _ = _make_case(b, sq, sk, h, d, None, lens, dtype, seed=70)
    out, lse = attention_with_lse(q, k, v, k_lens)
    _check(out, _reference(q, k, v, k_lens), dtype, f"lse out {case}", (b, sq, h, d))
    assert torch.equal(out, attention(q, k, v, k_lens)), "the output must be the plain kernel's"
    assert lse.shape == (b, h, sq) and lse.dtype == torch.float32
    ref = _lse_reference(q, k, k_lens)
    torch.testing.assert_close(lse.double(), ref, rtol=0, atol=1e-5)  # fp32 scores of the same inputs


def test_attention_with_lse_no_key_is_minus_inf_and_merges():
    """A sample with no key gives lse -inf and zeros; two key halves merged with the lse rule give the whole."""
    from wanrt.kernels.attention import attention_with_lse
    from wanrt.parallel.ring import merge

    q, k, v, _, _ = _make_case(2, 33, 50, 2, 16, None, None, torch.float32, seed=80)
    out, lse = attention_with_lse(q, k, v, torch.tensor([0, 50], device=DEVICE))
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all() and torch.isfinite(lse[1]).all()
    a, la = attention_with_lse(q, k[:, :20], v[:, :20])
    b_, lb = attention_with_lse(q, k[:, 20:], v[:, 20:])
    merged, lse_m = merge(a.float(), la, b_.float(), lb)
    _check(merged, _reference(q, k, v), torch.float32, "merged halves", (2, 33, 2, 16))
    torch.testing.assert_close(lse_m.double(), _lse_reference(q, k), rtol=0, atol=1e-5)


def test_attention_with_lse_opcheck():
    q, k, v, k_lens, _ = _make_case(1, 17, 17, 2, 16, None, (12,), torch.float32, seed=90)
    torch.library.opcheck(torch.ops.wanrt.attention_lse.default, (q, k, v, k_lens))


# --------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("s, s_rot, lens", [(1000, 990, (1000, 777)), (4096, 4000, (4096, 3001))])
def test_gpu_realistic_shapes(s, s_rot, lens, dtype):
    b, h, d = 2, 2, 128
    q, k, v, k_lens, table = _make_case(b, s, s, h, d, s_rot, lens, dtype, seed=s)
    out = attention(q, k, v, k_lens, table.cos, table.sin)
    _check(out, _reference(q, k, v, k_lens, table.cos, table.sin), dtype, f"gpu s={s}", (b, s, h, d))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sq, sk", [(4096, 512), (1000, 257)])
def test_gpu_cross_attention_matches_eager(sq, sk):
    from wanrt.ops.attention import attention_eager

    q, k, v, _, _ = _make_case(1, sq, sk, 2, 128, None, None, torch.bfloat16, seed=sq)
    out = attention(q, k, v)
    _check(out, _reference(q, k, v), torch.bfloat16, "gpu cross", (1, sq, 2, 128))
    assert_close(out, attention_eager(q, k, v), torch.bfloat16, name="gpu cross vs attention_eager")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp32_uses_ieee_dots():
    """fp32 inputs must not be computed with TF32 (errors would be ~1e-3, far above the fp32 bounds)."""
    q, k, v, k_lens, table = _make_case(1, 1000, 1000, 2, 128, 900, (1000,), torch.float32, seed=60)
    out = attention(q, k, v, k_lens, table.cos, table.sin)
    _check(out, _reference(q, k, v, k_lens, table.cos, table.sin), torch.float32, "gpu fp32", (1, 1000, 2, 128))
