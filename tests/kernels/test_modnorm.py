"""wanrt.kernels.modnorm (gated residual + modulated LayerNorm) against the eager twins.

The edge-case matrix runs where the kernels do: in the Triton interpreter on CPU tensors where there is no CUDA
(tests/conftest.py sets TRITON_INTERPRET=1), compiled on CUDA tensors on a CUDA host with the interpreter off
(``benchmarks/gpu_suite.sh``); see ``_device.py``. The ``gpu`` tests at the real widths run only on CUDA
(``pytest -m gpu``).
"""

import pytest
import torch
import torch.nn.functional as F
from _device import DEVICE, assert_close_rounded

from wanrt.kernels.modnorm import (
    gated_residual,
    gated_residual_layer_norm,
    modulated_layer_norm,
)
from wanrt.ops.norms import (
    gated_residual_eager,
    gated_residual_layer_norm_eager,
    modulated_layer_norm_eager,
)
from wanrt.testing import Tolerance, assert_close

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

_PRECISION = {torch.float64: 0, F32: 1, F16: 2, BF16: 3}
EPS = 1e-6


def _tol_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The least precise dtype the op rounds through (LayerNorm of a bf16 x rounds to bf16)."""
    return max(dtypes, key=_PRECISION.__getitem__)


def _rand(*shape, seed, dtype=F32, scale=1.0, offset=0.0, device=None):
    """Drawn on the CPU (the same values on every host), then moved to ``device`` (default :data:`DEVICE`)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + offset).to(device=device or DEVICE, dtype=dtype)


def _mods(b, d, batch, seed, device=None):
    """(gate, shift, scale) float32 [batch, 1, D] with batch in {1, B}."""
    n = 1 if batch == 1 else b
    return tuple(_rand(n, 1, d, seed=seed + i, scale=0.5, device=device) for i in range(3))


def _affine(d, seed, dtype=F32, device=None):
    return _rand(d, seed=seed, dtype=dtype, scale=0.3, offset=1.0, device=device), _rand(
        d, seed=seed + 1, dtype=dtype, scale=0.3, device=device)


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("b, s, d", [(1, 1, 16), (2, 7, 24), (2, 45, 40), (1, 13, 96)])
@pytest.mark.parametrize("x_dtype, out_dtype", [(F32, BF16), (F32, F32), (BF16, BF16), (F16, F32), (BF16, F16)])
@pytest.mark.parametrize("mod_batch", [1, "B"])
def test_modulated_layer_norm_matches_eager(b, s, d, x_dtype, out_dtype, mod_batch):
    x = _rand(b, s, d, seed=s + d, dtype=x_dtype, scale=2.0, offset=0.5)
    _, shift, scale = _mods(b, d, mod_batch, seed=3)
    h = modulated_layer_norm(x, shift, scale, None, None, EPS, out_dtype)
    ref = modulated_layer_norm_eager(x, shift, scale, EPS, out_dtype=out_dtype)
    assert h.dtype == out_dtype and h.shape == x.shape and h.is_contiguous()
    assert_close(h, ref, _tol_dtype(x_dtype, out_dtype), name=f"modulated_layer_norm {x_dtype}->{out_dtype}")


@pytest.mark.parametrize("use_shift, use_scale", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("use_weight, use_bias", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("x_dtype", [F32, BF16])
def test_modulated_layer_norm_variants(use_shift, use_scale, use_weight, use_bias, x_dtype):
    b, s, d = 2, 9, 40
    x = _rand(b, s, d, seed=5, dtype=x_dtype)
    _, shift, scale = _mods(b, d, "B", seed=6)
    weight, bias = _affine(d, seed=7, dtype=BF16 if x_dtype == BF16 else F32)
    args = (shift if use_shift else None, scale if use_scale else None)
    kw = {"weight": weight if use_weight else None, "bias": bias if use_bias else None}
    h = modulated_layer_norm(x, *args, kw["weight"], kw["bias"], EPS, F32)
    ref = modulated_layer_norm_eager(x, *args, EPS, out_dtype=F32, **kw)
    assert_close(h, ref, _tol_dtype(x_dtype, F32), name="modulated_layer_norm variant")


@pytest.mark.parametrize("b, s, d", [(1, 1, 16), (2, 7, 24), (2, 45, 40)])
@pytest.mark.parametrize("x_dtype, y_dtype", [(F32, BF16), (F32, F32), (BF16, BF16), (F32, F16)])
@pytest.mark.parametrize("gate_batch", [1, "B", None])
def test_gated_residual_matches_eager(b, s, d, x_dtype, y_dtype, gate_batch):
    x = _rand(b, s, d, seed=1, dtype=x_dtype)
    y = _rand(b, s, d, seed=2, dtype=y_dtype)
    gate = None if gate_batch is None else _mods(b, d, gate_batch, seed=3)[0]
    out = gated_residual(x, y, gate)
    assert out.dtype == F32 and out.is_contiguous() and out.data_ptr() != x.data_ptr()
    assert_close(out, gated_residual_eager(x, y, gate), F32, name="gated_residual")


@pytest.mark.parametrize("b, s, d", [(1, 1, 16), (2, 7, 24), (2, 45, 40)])
@pytest.mark.parametrize("out_dtype", [BF16, F32, F16])
@pytest.mark.parametrize("mod_batch", [1, "B"])
@pytest.mark.parametrize("affine", [True, False])
def test_gated_residual_layer_norm_matches_eager(b, s, d, out_dtype, mod_batch, affine):
    x = _rand(b, s, d, seed=1, scale=3.0)
    y = _rand(b, s, d, seed=2, dtype=BF16)
    gate, shift, scale = _mods(b, d, mod_batch, seed=3)
    weight, bias = _affine(d, seed=4) if affine else (None, None)
    x_new, h = gated_residual_layer_norm(x, y, gate, shift, scale, weight, bias, EPS, out_dtype)
    rx, rh = gated_residual_layer_norm_eager(x, y, gate, EPS, shift=shift, scale=scale, weight=weight, bias=bias,
                                             out_dtype=out_dtype)
    assert x_new.dtype == F32 and h.dtype == out_dtype
    assert_close(x_new, rx, F32, name="gated_residual_layer_norm x_new")
    assert_close(h, rh, out_dtype, name="gated_residual_layer_norm h")


def _token_mods(b, s, d, batch, seed):
    """(gate, shift, scale) float32 per token [batch, S, D] (batch in {1, B}), chunks of one [batch, S, 6, D]
    table as the DiT's per-token timesteps give them: views with token stride 6*D."""
    table = _rand(1 if batch == 1 else b, s, 6, d, seed=seed, scale=0.5)
    return table[:, :, 0], table[:, :, 1], table[:, :, 2]


@pytest.mark.parametrize("b, s, d", [(1, 1, 16), (2, 7, 24), (2, 45, 40)])
@pytest.mark.parametrize("mod_batch", [1, "B"])
@pytest.mark.parametrize("x_dtype, out_dtype", [(F32, BF16), (F32, F32), (BF16, BF16)])
def test_per_token_modulation_matches_eager(b, s, d, mod_batch, x_dtype, out_dtype):
    """Wan2.2 per-token timesteps: modulation [B or 1, S, D] read row by row (the token stride) in all three ops."""
    x = _rand(b, s, d, seed=11, dtype=x_dtype, scale=2.0)
    y = _rand(b, s, d, seed=12, dtype=BF16)
    gate, shift, scale = _token_mods(b, s, d, mod_batch, seed=13)
    assert gate.stride(1) == 6 * d  # a strided view reaches the kernel as it is
    hm = modulated_layer_norm(x, shift, scale, None, None, EPS, out_dtype)
    ref = modulated_layer_norm_eager(x, shift, scale, EPS, out_dtype=out_dtype)
    assert_close(hm, ref, _tol_dtype(x_dtype, out_dtype), name="per-token modulated_layer_norm")
    assert_close(gated_residual(x, y, gate), gated_residual_eager(x, y, gate), F32, name="per-token gated_residual")
    x_new, h = gated_residual_layer_norm(x, y, gate, shift, scale, None, None, EPS, out_dtype)
    rx, rh = gated_residual_layer_norm_eager(x, y, gate, EPS, shift=shift, scale=scale, out_dtype=out_dtype)
    assert_close(x_new, rx, F32, name="per-token gated_residual_layer_norm x_new")
    assert_close(h, rh, out_dtype, name="per-token gated_residual_layer_norm h")
    if s > 1:  # each token reads its own row: a per-sample modulation of row 0 gives another result
        other = modulated_layer_norm(x, shift[:, :1], scale[:, :1], None, None, EPS, out_dtype)
        assert not torch.equal(other[:, 1:], hm[:, 1:])


@pytest.mark.parametrize(
    "gate, shift, scale", [(False, False, False), (True, False, False), (False, True, True), (False, False, True)]
)
def test_gated_residual_layer_norm_none_variants(gate, shift, scale):
    """The cross-attention add (no gate) then norm3 (affine, no modulation), and the other mixes."""
    b, s, d = 2, 7, 24
    x = _rand(b, s, d, seed=8, dtype=BF16)  # block 0's residual is bf16
    y = _rand(b, s, d, seed=9, dtype=BF16)
    g, sh, sc = _mods(b, d, "B", seed=10)
    mods = (g if gate else None, sh if shift else None, sc if scale else None)
    weight, bias = _affine(d, seed=11)
    x_new, h = gated_residual_layer_norm(x, y, *mods, weight, bias, EPS, BF16)
    rx, rh = gated_residual_layer_norm_eager(x, y, mods[0], EPS, shift=mods[1], scale=mods[2], weight=weight,
                                             bias=bias, out_dtype=BF16)
    assert_close(x_new, rx, F32, name="x_new")
    assert_close(h, rh, BF16, name="h")


@pytest.mark.parametrize("x_dtype", [BF16, F16])
def test_modulated_layer_norm_rounds_like_eager(x_dtype):
    """LN(x) of a low-precision x is rounded to x.dtype before the modulation (WanLayerNorm's
    .type_as(x)), and low-precision stores round to nearest even: checked tighter than one rounding.

    Compiled, a float32 LN value next to a rounding boundary may round the other way (FMAs, another reduction
    order): there the float32 bound must hold for all but a few elements (``assert_close_rounded``).
    """
    b, s, d = 2, 9, 40
    x = _rand(b, s, d, seed=24, dtype=x_dtype, scale=2.0)
    _, shift, scale = _mods(b, d, "B", seed=25)
    weight, bias = _affine(d, seed=26)
    h = modulated_layer_norm(x, shift, scale, weight, bias, EPS, F32)
    ref = modulated_layer_norm_eager(x, shift, scale, EPS, weight=weight, bias=bias, out_dtype=F32)
    assert_close_rounded(h, ref, F32, x_dtype, name="rounded to x.dtype before the modulation")
    hb = modulated_layer_norm(x.float(), shift, scale, weight, bias, EPS, BF16)
    rb = modulated_layer_norm_eager(x.float(), shift, scale, EPS, weight=weight, bias=bias, out_dtype=BF16)
    assert (hb != rb).float().mean().item() < 0.02, "bf16 store does not round to nearest"


def test_layer_norm_large_offset_two_pass_variance():
    """Rows with mean ~100 and unit spread: E[z^2] - mean^2 in float32 loses ~3 digits; two-pass does not.

    Compared with a float64 LayerNorm of the kernel's own float32 residual (the eager twin itself is
    less accurate here, so it is not the judge). A float32 mean of values ~100 is itself off by up to
    ~1e-5 of the spread, so the bound is 1e-4 elementwise / 2e-5 relative L2; a naive variance
    errs by ~5e-3 / 6e-4 on these rows.
    """
    tol = Tolerance(atol=1e-4, rtol=1e-4, rel=2e-5)
    b, s, d = 2, 45, 40
    x = _rand(b, s, d, seed=12, offset=100.0)
    y = _rand(b, s, d, seed=13, dtype=BF16)
    gate, shift, scale = _mods(b, d, "B", seed=14)
    weight, bias = _affine(d, seed=15)
    x_new, h = gated_residual_layer_norm(x, y, gate, shift, scale, weight, bias, EPS, F32)
    z = x_new.double()
    ref = F.layer_norm(z, (d,), weight.double(), bias.double(), EPS) * (1 + scale.double()) + shift.double()
    assert_close(h, ref, name="h with offset 100 vs float64", tol=tol)
    h2 = modulated_layer_norm(x, shift, scale, weight, bias, EPS, F32)
    ref2 = F.layer_norm(x.double(), (d,), weight.double(), bias.double(), EPS) * (1 + scale.double()) + shift.double()
    assert_close(h2, ref2, name="modulated_layer_norm with offset 100 vs float64", tol=tol)
    hb = modulated_layer_norm(x.to(BF16), shift, scale, None, None, EPS, BF16)
    assert_close(hb, modulated_layer_norm_eager(x.to(BF16), shift, scale, EPS, out_dtype=BF16), BF16, name="bf16")


def test_modnorm_non_contiguous_inputs():
    """x and y slices of wider buffers, x seen through a [S, B] transpose, shift/scale/gate as rows of e [B, 6, D]."""
    b, s, d = 2, 9, 24
    x = _rand(s, b, d, seed=16).transpose(0, 1)  # [B, S, D], S stride b*d
    y = _rand(b, s, 3 * d, seed=17, dtype=BF16)[:, :, d:2 * d]
    e = _rand(b, 6, d, seed=18, scale=0.5)
    shift, scale, gate = e[:, 0:1], e[:, 1:2], e[:, 2:3]
    assert not (x.is_contiguous() or y.is_contiguous() or gate.is_contiguous())
    x_new, h = gated_residual_layer_norm(x, y, gate, shift, scale, None, None, EPS, BF16)
    rx, rh = gated_residual_layer_norm_eager(x, y, gate, EPS, shift=shift, scale=scale, out_dtype=BF16)
    assert_close(x_new, rx, F32, name="x_new")
    assert_close(h, rh, BF16, name="h")
    assert_close(gated_residual(x, y, gate), gated_residual_eager(x, y, gate), F32, name="gated_residual")
    h2 = modulated_layer_norm(x, shift, scale, None, None, EPS, F32)
    assert_close(h2, modulated_layer_norm_eager(x, shift, scale, EPS, out_dtype=F32), F32, name="modnorm")


def test_modnorm_empty():
    x = torch.empty(2, 0, 16, device=DEVICE)
    assert modulated_layer_norm(x, None, None, None, None, EPS, BF16).shape == (2, 0, 16)
    x_new, h = gated_residual_layer_norm(x, x, None, None, None, None, None, EPS, BF16)
    assert x_new.shape == h.shape == (2, 0, 16)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x": torch.randn(6, 16)}, r"x must be \[B, S, D\]"),
        ({"y": torch.randn(2, 3, 8)}, "y must be a float tensor shaped like x"),
        ({"gate": torch.randn(2, 1, 8)}, r"gate must be float32 \[B=2 or 1, 1 or S=3, D=16\]"),
        ({"gate": torch.randn(3, 1, 16)}, r"gate must be float32 \[B=2 or 1"),
        ({"shift": torch.randn(2, 2, 16)}, "shift must be float32"),
        ({"scale": torch.randn(2, 1, 16).bfloat16()}, "scale must be float32"),
        ({"weight": torch.randn(8)}, r"weight must be a float \[D=16\]"),
        ({"bias": torch.randn(16, 1)}, r"bias must be a float \[D=16\]"),
        ({"x": torch.randn(2, 3, 16).double()}, "x must be one of"),
        ({"out_dtype": torch.int32}, "out_dtype must be one of"),
    ],
)
def test_modnorm_errors(kwargs, match):
    args = {"x": torch.randn(2, 3, 16), "y": torch.randn(2, 3, 16), "gate": None, "shift": None, "scale": None,
            "weight": None, "bias": None, "eps": EPS, "out_dtype": BF16}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gated_residual_layer_norm(**args)
    if "y" not in kwargs and "gate" not in kwargs:
        with pytest.raises(ValueError, match=match):
            modulated_layer_norm(args["x"], args["shift"], args["scale"], args["weight"], args["bias"], EPS,
                                 args["out_dtype"])
    if set(kwargs) <= {"x", "y", "gate"}:
        with pytest.raises(ValueError, match=match):
            gated_residual(args["x"], args["y"], args["gate"])


def test_modnorm_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 3, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        gated_residual(x, x, None)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        modulated_layer_norm(x, None, None, None, None, EPS, F32)


# ------------------------------------------------------------------------------ custom ops


def test_modnorm_custom_ops_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in ("modulated_layer_norm", "gated_residual", "gated_residual_layer_norm"):
        assert hasattr(torch.ops.wanrt, name)
    with FakeTensorMode():
        x = torch.empty(2, 9, 48)
        y = torch.empty(2, 9, 48, dtype=BF16)
        mod = torch.empty(1, 1, 48)
        h = modulated_layer_norm(y, mod, mod, None, None, EPS, F16)
        assert h.shape == (2, 9, 48) and h.dtype == F16
        out = gated_residual(y, y, mod)
        assert out.shape == (2, 9, 48) and out.dtype == F32
        x_new, h = torch.ops.wanrt.gated_residual_layer_norm(x, y, mod, mod, mod, None, None, EPS, BF16)
        assert x_new.shape == h.shape == (2, 9, 48) and x_new.dtype == F32 and h.dtype == BF16
        with pytest.raises(ValueError, match="gate must be"):
            torch.ops.wanrt.gated_residual(x, y, torch.empty(2, 48))


def test_modnorm_opcheck():
    b, s, d = 2, 3, 16
    x, y = _rand(b, s, d, seed=20), _rand(b, s, d, seed=21, dtype=BF16)
    gate, shift, scale = _mods(b, d, "B", seed=22)
    weight, bias = _affine(d, seed=23)
    torch.library.opcheck(torch.ops.wanrt.modulated_layer_norm.default, (y, shift, scale, weight, bias, EPS, F32))
    torch.library.opcheck(torch.ops.wanrt.gated_residual.default, (x, y, gate))
    torch.library.opcheck(torch.ops.wanrt.gated_residual_layer_norm.default,
                          (x, y, gate, shift, None, None, bias, EPS, BF16))


# ------------------------------------------------------------------------------ GPU, real widths


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d", [1536, 5120])
@pytest.mark.parametrize("affine", [True, False])
def test_modnorm_gpu_real_widths(d, affine):
    b, s = 2, 4096
    x = _rand(b, s, d, seed=30, scale=3.0, device="cuda")
    y = _rand(b, s, d, seed=31, dtype=BF16, device="cuda")
    gate, shift, scale = _mods(b, d, "B", seed=32, device="cuda")
    weight, bias = _affine(d, seed=33, device="cuda") if affine else (None, None)
    x_new, h = gated_residual_layer_norm(x, y, gate, shift, scale, weight, bias, EPS, BF16)
    rx, rh = gated_residual_layer_norm_eager(x, y, gate, EPS, shift=shift, scale=scale, weight=weight, bias=bias,
                                             out_dtype=BF16)
    assert_close(x_new, rx, F32, name=f"x_new gpu d={d}")
    assert_close(h, rh, BF16, name=f"h gpu d={d}")
    assert_close(gated_residual(x, y, gate), rx, F32, name=f"gated_residual gpu d={d}")
    xb = x.to(BF16)
    h0 = modulated_layer_norm(xb, shift, scale, weight, bias, EPS, BF16)
    r0 = modulated_layer_norm_eager(xb, shift, scale, EPS, weight=weight, bias=bias, out_dtype=BF16)
    assert_close(h0, r0, BF16, name=f"modulated_layer_norm gpu d={d}")
