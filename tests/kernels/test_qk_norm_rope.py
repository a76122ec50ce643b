"""wanrt.kernels.qk_norm_rope (fused QK RMS-norm + RoPE + cast) against its eager twin.

The edge-case matrix runs where the kernel does: in the Triton interpreter on CPU tensors where there is no CUDA
(tests/conftest.py sets TRITON_INTERPRET=1), compiled on CUDA tensors on a CUDA host with the interpreter off
(``benchmarks/gpu_suite.sh``); see ``_device.py``. The argument checks run on CPU tensors everywhere. The ``gpu``
tests at the real widths run only on CUDA (``pytest -m gpu``).
"""

import math

import pytest
import torch
from _device import DEVICE, assert_close_rounded

from wanrt.kernels.qk_norm_rope import norm_rope
from wanrt.ops.norms import qk_norm_rope_eager, rms_norm_eager
from wanrt.ops.rope import RopeTable, rope_freqs, rope_rotate_eager, rope_table
from wanrt.testing import Tolerance, assert_close

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EXACT = Tolerance(atol=0.0, rtol=0.0, rel=0.0)
_PRECISION = {torch.float64: 0, F32: 1, F16: 2, BF16: 3}


def _tol_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The least precise dtype the op rounds through (the norm rounds to x.dtype, the store to out)."""
    return max(dtypes, key=_PRECISION.__getitem__)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Inputs are drawn on the CPU (the same values on every host), then moved to ``device`` (default DEVICE).


def _x(b, s, dim, dtype, seed=0, device=None):
    return (torch.randn(b, s, dim, generator=_gen(seed)) * 1.5 + 0.25).to(device=device or DEVICE, dtype=dtype)


def _weight(dim, dtype=F32, seed=1, device=None):
    return (torch.rand(dim, generator=_gen(seed)) * 1.5 + 0.25).to(device=device or DEVICE, dtype=dtype)


def _random_rope(s_rot, head_dim, seed=2, device=None):
    """Rotations by random angles in [-pi, pi] (stronger than a grid table: every pair differs)."""
    angles = (torch.rand(s_rot, head_dim // 2, generator=_gen(seed), dtype=torch.float64) * 2 - 1) * math.pi
    return RopeTable.from_rot(torch.polar(torch.ones_like(angles), angles)).to(device or DEVICE)


def _run(x, weight, rope, heads, out_dtype, layout, eps=1e-6):
    cos, sin = (None, None) if rope is None else (rope.cos, rope.sin)
    out = norm_rope(x, weight, eps, cos, sin, heads, out_dtype, layout)
    ref = qk_norm_rope_eager(x, weight, eps, rope, num_heads=heads, out_dtype=out_dtype, layout=layout)
    return out, ref


def _check_layout(out, ref, shape, layout):
    _b, s, h, d = shape
    assert tuple(out.shape) == shape
    want = (s * h * d, h * d, d, 1) if layout == "bshd" else (h * s * d, d, s * d, 1)
    assert out.stride() == want == ref.stride(), (out.stride(), want)


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("b, s, s_rot", [(1, 1, 1), (2, 7, 5), (1, 45, 45), (2, 45, 20)])
@pytest.mark.parametrize("heads, head_dim", [(1, 16), (3, 24), (3, 40)])
@pytest.mark.parametrize("x_dtype, out_dtype", [(F32, F32), (BF16, BF16), (F16, F32), (BF16, F16)])
def test_norm_rope_matches_eager(b, s, s_rot, heads, head_dim, x_dtype, out_dtype):
    x = _x(b, s, heads * head_dim, x_dtype, seed=s + head_dim)
    rope = _random_rope(s_rot, head_dim, seed=s_rot)
    out, ref = _run(x, _weight(heads * head_dim), rope, heads, out_dtype, "bshd")
    _check_layout(out, ref, (b, s, heads, head_dim), "bshd")
    assert out.dtype == out_dtype
    assert_close(out, ref, _tol_dtype(x_dtype, out_dtype), name=f"norm_rope {x_dtype}->{out_dtype}")


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("use_weight", [True, False])
@pytest.mark.parametrize("use_rope", [True, False])
@pytest.mark.parametrize("x_dtype, out_dtype", [(F32, F32), (BF16, BF16), (F16, BF16), (F32, F16)])
def test_norm_rope_variants_and_layouts(layout, use_weight, use_rope, x_dtype, out_dtype):
    b, s, heads, head_dim = 2, 13, 3, 24
    x = _x(b, s, heads * head_dim, x_dtype, seed=3)
    weight = _weight(heads * head_dim) if use_weight else None
    rope = _random_rope(9, head_dim) if use_rope else None
    out, ref = _run(x, weight, rope, heads, out_dtype, layout)
    _check_layout(out, ref, (b, s, heads, head_dim), layout)
    assert_close(out, ref, _tol_dtype(x_dtype, out_dtype), name=f"norm_rope {layout} w={use_weight} rope={use_rope}")


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_norm_rope_grid_table(layout):
    """The real 3-D table of a (2, 3, 5) grid on 33 tokens (3 padding tokens unrotated: equal to the eager norm bit
    for bit; compiled, up to the rare bf16 rounding a last-bit float32 difference of the norm moves)."""
    heads, head_dim = 3, 40
    x = _x(1, 33, heads * head_dim, BF16, seed=4)
    rope = rope_table((2, 3, 5), rope_freqs(head_dim, max_pos=8)).to(DEVICE)
    out, ref = _run(x, _weight(heads * head_dim), rope, heads, BF16, layout)
    assert_close(out, ref, BF16, name="norm_rope grid table")
    assert_close_rounded(out[:, 30:].float(), ref[:, 30:].float(), EXACT, BF16, name="padding tokens unrotated")


@pytest.mark.parametrize("x_dtype", [F32, BF16, F16])
def test_norm_rope_non_contiguous_x(x_dtype):
    """x a slice of a wider projection (row stride > dim), and a [S, B] buffer seen as [B, S]."""
    heads, head_dim = 3, 16
    dim = heads * head_dim
    wide = _x(2, 11, 3 * dim, x_dtype, seed=5)[:, :, dim:2 * dim]  # like k of a fused qkv
    sb = _x(11, 2, dim, x_dtype, seed=6).transpose(0, 1)  # [B, S, dim] with S stride != dim
    for x in (wide, sb):
        assert not x.is_contiguous()
        for layout in ("bshd", "bhsd"):
            out, ref = _run(x, _weight(dim), _random_rope(7, head_dim), heads, x_dtype, layout)
            assert_close(out, ref, x_dtype, name="norm_rope non-contiguous x")


@pytest.mark.parametrize("x_dtype", [BF16, F16])
def test_norm_rope_low_precision_weight(x_dtype):
    """A weight in x's dtype: the eager product is rounded to that dtype before RoPE.

    Checked at float32 tolerance (the kernel rounds at the same points as the eager twin; the
    seeds are fixed, so no rounding tie flips), which a missing second rounding fails. Compiled, a
    float32 norm value next to a rounding boundary may round the other way (another reduction order,
    rsqrt): there the float32 bound must hold for all but a few elements (``assert_close_rounded``).
    """
    heads, head_dim = 3, 24
    x = _x(2, 7, heads * head_dim, x_dtype, seed=7)
    out, ref = _run(x, _weight(heads * head_dim, x_dtype), _random_rope(5, head_dim), heads, F32, "bshd")
    assert_close_rounded(out, ref, F32, x_dtype, name="norm_rope low-precision weight")


def test_norm_rope_large_eps_and_scale():
    x = _x(1, 7, 48, F32, seed=8) * 1e3
    for eps in (1e-6, 1e-2, 10.0):
        out, ref = _run(x, _weight(48), _random_rope(7, 16), 3, F32, "bshd", eps=eps)
        assert_close(out, ref, F32, name=f"norm_rope eps={eps}")


@pytest.mark.parametrize("x_dtype, out_dtype", [(F32, F32), (BF16, BF16), (BF16, F32), (F16, F16)])
@pytest.mark.parametrize("use_weight", [True, False])
def test_norm_rope_serves_rms_norm(x_dtype, out_dtype, use_weight):
    """rms_norm(backend="triton") calls norm_rope on rows [1, N, D] with one head and no RoPE.

    ``norm_rope``'s ``weight=None`` means *no norm*; an un-affine RMS norm is a weight of ones.
    """
    x = _x(3, 5, 40, x_dtype, seed=9)
    weight = _weight(40) if use_weight else None
    ones = torch.ones(40, device=DEVICE)
    out = norm_rope(x.reshape(1, -1, 40), ones if weight is None else weight, 1e-6, None, None, 1, out_dtype,
                    "bshd").reshape(x.shape)
    ref = rms_norm_eager(x, weight, 1e-6, out_dtype=out_dtype)
    assert_close(out, ref, _tol_dtype(x_dtype, out_dtype), name="rms_norm via norm_rope")


@pytest.mark.parametrize("x_dtype", [F32, BF16])
def test_norm_rope_serves_rope_rotate(x_dtype):
    """rope_rotate(backend="triton") calls norm_rope with weight None on x.flatten(2)."""
    x = _x(2, 9, 3 * 24, x_dtype, seed=10).unflatten(2, (3, 24))  # [B, S, H, D]
    rope = _random_rope(6, 24)
    out = norm_rope(x.flatten(2), None, 0.0, rope.cos, rope.sin, 3, F32, "bshd")
    assert_close(out, rope_rotate_eager(x, rope.rot), F32, name="rope_rotate via norm_rope")


def test_norm_rope_empty_batch():
    out = norm_rope(torch.empty(0, 4, 32, device=DEVICE), None, 1e-6, None, None, 2, F32, "bhsd")
    assert tuple(out.shape) == (0, 4, 2, 16)


# ------------------------------------------------------------------------------ errors


def _args(**over):
    """Valid arguments on the CPU (the checks run before the device check; the CPU-rejection test needs CPU)."""
    args = {"x": _x(1, 6, 32, F32, device="cpu"), "weight": _weight(32, device="cpu"), "eps": 1e-6,
            "cos": torch.ones(4, 8), "sin": torch.zeros(4, 8), "num_heads": 2, "out_dtype": F32, "layout": "bshd"}
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, match",
    [
        ({"layout": "bsdh"}, "layout must be one of"),
        ({"x": _x(1, 6, 32, F32, device="cpu")[0]}, r"x must be \[B, S, num_heads\*head_dim\]"),
        ({"num_heads": 3}, "num_heads=3 times an even head_dim"),
        ({"num_heads": 32}, "even head_dim"),
        ({"weight": _weight(16, device="cpu")}, r"weight must be a float \[32\]"),
        ({"cos": None}, "cos and sin must be given together"),
        ({"sin": None}, "cos and sin must be given together"),
        ({"cos": torch.ones(7, 8), "sin": torch.zeros(7, 8)}, r"S_rot <= 6"),
        ({"cos": torch.ones(4, 16), "sin": torch.zeros(4, 16)}, "head_dim/2 = 8"),
        ({"cos": torch.ones(4, 8, dtype=torch.float64)}, "cos must be float32"),
        ({"sin": torch.zeros(3, 8)}, "differ"),
        ({"x": _x(1, 6, 32, torch.float64, device="cpu")}, "x must be one of"),
        ({"out_dtype": torch.int8}, "out_dtype must be one of"),
    ],
)
def test_norm_rope_errors(over, match):
    with pytest.raises(ValueError, match=match):
        norm_rope(**_args(**over))


def test_norm_rope_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        norm_rope(**_args())


# ------------------------------------------------------------------------------ custom op


def test_norm_rope_custom_op_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert hasattr(torch.ops.wanrt, "norm_rope")
    with FakeTensorMode():
        x = torch.empty(2, 9, 48, dtype=BF16)
        cos, sin = torch.empty(5, 8), torch.empty(5, 8)
        for layout, stride in (("bshd", (432, 48, 16, 1)), ("bhsd", (432, 16, 144, 1))):
            out = norm_rope(x, torch.empty(48), 1e-6, cos, sin, 3, F16, layout)
            assert tuple(out.shape) == (2, 9, 3, 16) and out.dtype == F16 and out.stride() == stride
        raw = torch.ops.wanrt.norm_rope(x, None, 1e-6, None, None, 3, F32, "bhsd")
        assert tuple(raw.shape) == (2, 3, 9, 16) and raw.dtype == F32 and raw.is_contiguous()
        with pytest.raises(ValueError, match="layout"):
            torch.ops.wanrt.norm_rope(x, None, 1e-6, None, None, 3, F32, "sbhd")


def test_norm_rope_opcheck():
    x = _x(1, 5, 32, BF16, seed=11)
    rope = _random_rope(3, 16)
    torch.library.opcheck(torch.ops.wanrt.norm_rope.default, (x, _weight(32), 1e-6, rope.cos, rope.sin, 2, F32, "bhsd"))


# ------------------------------------------------------------------------------ GPU, real widths


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dim", [1536, 5120])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("use_weight", [True, False])
def test_norm_rope_gpu_real_widths(dim, layout, use_weight):
    heads, head_dim = dim // 128, 128
    x = _x(2, 4096, dim, BF16, seed=12, device="cuda")
    weight = _weight(dim, device="cuda") if use_weight else None
    rope = rope_table((4, 30, 32), rope_freqs(head_dim)).to("cuda")  # 3840 rotated + 256 padding tokens
    out, ref = _run(x, weight, rope, heads, BF16, layout)
    _check_layout(out, ref, (2, 4096, heads, head_dim), layout)
    assert_close(out, ref, BF16, name=f"norm_rope gpu dim={dim} {layout}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_norm_rope_gpu_rms_rows():
    x = _x(1, 4096, 5120, BF16, seed=13, device="cuda")
    out = norm_rope(x, _weight(5120, device="cuda"), 1e-6, None, None, 1, F32, "bshd").reshape(x.shape)
    assert_close(out, rms_norm_eager(x, _weight(5120, device="cuda"), 1e-6, out_dtype=F32), BF16, name="rms gpu")
