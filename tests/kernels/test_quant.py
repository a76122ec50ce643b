"""wanrt.kernels.quant (per-token quantization, INT8 GEMM rescale epilogue) against the eager twins.

The edge-case matrix runs where the kernels do: in the Triton interpreter on CPU tensors where there is no CUDA
(tests/conftest.py sets TRITON_INTERPRET=1), compiled on CUDA tensors on a CUDA host with the interpreter off
(``benchmarks/gpu_suite.sh``); see ``_device.py``. The argument checks run on CPU tensors everywhere. The ``gpu``
tests at the real shapes run only on CUDA (``pytest -m gpu``). Quantized values are compared bit for bit (fp8
through ``.view(torch.uint8)``): the interpreter's own fp32 -> fp8 cast rounds wrongly, and the kernel rounds to
the e4m3 grid itself when interpreting (see the module docstring of ``wanrt.kernels.quant``), so exactness is
expected on both the interpreter and the GPU.
"""

import pytest
import torch
from _device import COMPILED, DEVICE
from torch import nn

from wanrt.kernels._common import interpreting
from wanrt.kernels.quant import _int8_mm as int8_mm
from wanrt.kernels.quant import int8_matmul_rescale, int_mm_path, quantize_per_token
from wanrt.quant.layers import FP8Linear, Int8Linear, quantize_rowwise
from wanrt.quant.layers import quantize_per_token as quantize_per_token_eager
from wanrt.testing import TOLERANCES, Tolerance, assert_close

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FP8, INT8 = torch.float8_e4m3fn, torch.int8

def _ids(v):
    """Readable test ids: ``float32`` rather than ``x_dtype0``."""
    return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else getattr(v, "__name__", None)


def _rand(*shape, seed, dtype=F32, scale=1.0, device=None):
    """Drawn on the CPU (the same values on every host), then moved to ``device`` (default :data:`DEVICE`)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device or DEVICE, dtype=dtype)


def _assert_same_quant(q, s, rq, rs, name=""):
    """Scales equal up to float32 rounding (rtol 1e-6), q equal bit for bit."""
    assert q.dtype == rq.dtype and q.shape == rq.shape and q.is_contiguous(), name
    assert s.dtype == F32 and tuple(s.shape) == (q.shape[0], 1), name
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0, msg=f"{name}: scales differ")
    bits, rbits = q.view(torch.uint8), rq.view(torch.uint8)
    bad = bits != rbits
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{name}: {int(bad.sum())}/{q.numel()} quantized values differ; first at {i}: "
                             f"got {q[i].float().item()} (bits {bits[i].item():#04x}), "
                             f"expected {rq[i].float().item()} (bits {rbits[i].item():#04x})")


def _eager_rescale(xq, wq, xs, ws, bias, out_dtype):
    """The eager branch of Int8Linear.forward; returns the float32 value before the cast and the cast."""
    if xq.is_cuda and xq.shape[0] <= 16:  # torch._int_mm needs M > 16 on CUDA: the same integers, int64 on the CPU
        acc = (xq.cpu().long() @ wq.cpu().long().t()).to(device=xq.device, dtype=torch.int32)
    else:
        acc = torch._int_mm(xq, wq.t())
    y = acc.float() * xs * ws[None, :]
    if bias is not None:
        y = y + bias.float()
    return y, y.to(out_dtype)


def _assert_one_rounding(y, y32, ref, name):
    """``y`` within one rounding of ``y.dtype`` of the eager result (float32 ``y32``, cast ``ref``).

    Allows one ulp of the output dtype (``eps · |ref|``) plus float32 noise of the unrounded value
    (a fused multiply-add on a GPU) where the bias cancels the product.
    """
    eps = torch.finfo(y.dtype).eps
    atol = 4 * torch.finfo(F32).eps * max(y32.abs().max().item(), 1e-30)
    assert_close(y, ref, name=name, tol=Tolerance(atol=atol, rtol=eps, rel=eps))


# ------------------------------------------------------------------------------ quantize_per_token


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("k", [16, 40, 64])
@pytest.mark.parametrize("x_dtype", [F32, F16, BF16], ids=_ids)
@pytest.mark.parametrize("qdtype", [FP8, INT8], ids=_ids)
def test_quantize_matches_eager(m, k, x_dtype, qdtype):
    x = _rand(m, k, seed=m * 100 + k, dtype=x_dtype, scale=2.0)
    if m > 1:
        x[1] = 0  # an all-zero row: scale 1, q 0
        x[-1, ::3] = 0
    q, s = quantize_per_token(x, qdtype)
    rq, rs = quantize_per_token_eager(x, qdtype, backend="eager")
    _assert_same_quant(q, s, rq, rs, f"quantize {x_dtype}->{qdtype} [{m}, {k}]")
    if m > 1:
        assert s[1].item() == 1.0 and not q[1].float().any()


@pytest.mark.parametrize("x_dtype", [F32, BF16, F16], ids=_ids)
@pytest.mark.parametrize("qdtype", [FP8, INT8], ids=_ids)
def test_quantize_large_magnitudes(x_dtype, qdtype):
    x = _rand(7, 40, seed=3, dtype=x_dtype, scale=1e4)  # |x| up to ~4e4 (fp16 max 65504)
    x[2] *= 1e-4  # rows of very different magnitudes
    x[4, 5] = 6e4  # one outlier: the other values land in the fp8 subnormal range
    q, s = quantize_per_token(x, qdtype)
    rq, rs = quantize_per_token_eager(x, qdtype, backend="eager")
    _assert_same_quant(q, s, rq, rs, f"large {x_dtype}->{qdtype}")


def test_quantize_all_zero_single_row():
    for qdtype in (FP8, INT8):
        q, s = quantize_per_token(torch.zeros(1, 40, dtype=BF16, device=DEVICE), qdtype)
        assert s.tolist() == [[1.0]] and not q.float().any()


def test_quantize_int8_rounds_half_to_even():
    """Rows whose x / scale has exact .5 ties (scale 1 and 2): torch.round's half-to-even, then the clamp."""
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 125.5, 126.5, -126.5, 4.4999, -4.5001, 0.0, -0.0])
    x = torch.stack([torch.cat([torch.tensor([127.0]), ties]), torch.cat([torch.tensor([-254.0]), 2 * ties])])
    x = x.to(DEVICE)
    q, s = quantize_per_token(x, INT8)
    rq, rs = quantize_per_token_eager(x, INT8, backend="eager")
    _assert_same_quant(q, s, rq, rs, "int8 ties")
    assert s.flatten().tolist() == [1.0, 2.0]
    expected = [127, 0, 2, 2, 4, 0, -2, -2, 126, 126, -126, 4, -5, 0, 0]
    assert q[0].tolist() == expected and q[1].tolist() == [-127, *expected[1:]]


@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=_ids)
def test_quantize_fp8_ties_subnormals_and_signed_zero(x_dtype):
    """Every e4m3 midpoint (ties to even), values just around them, the subnormal range and -0.

    The interpreter's own fp32 -> fp8 cast gets ties, carries into the exponent and subnormals wrong; the
    kernel's interpreter-only rounding must give torch's bits. Compiled, the GPU's own cast must.
    """
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique().sort().values  # 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    small = torch.linspace(-2**-6, 2**-6, 97)
    row = torch.cat([torch.tensor([448.0, -0.0, -1e-7, 1e-7]), grid, mids, mids * (1 + 2**-20), mids * (1 - 2**-20),
                     small, torch.tensor([123.9, 124.1, 125.8, 31.9, 7.9, 1.99])])
    x = torch.stack([row, -row, row * 0.37, row * 3.1]).to(x_dtype).to(DEVICE)
    q, s = quantize_per_token(x, FP8)
    rq, rs = quantize_per_token_eager(x, FP8, backend="eager")
    _assert_same_quant(q, s, rq, rs, f"fp8 ties {x_dtype}")
    if x_dtype == F32:
        assert s[0].item() == 1.0 and q[0, 1].view(torch.uint8).item() == 0x80  # -0 keeps its sign


def test_quantize_strided_rows():
    """Rows of a wider buffer (row stride 3K), and a transposed view (column stride != 1, copied)."""
    base = _rand(9, 3 * 40, seed=11, dtype=BF16)
    x = base[:, 40:80]
    assert x.stride() == (120, 1) and not x.is_contiguous()
    xt = _rand(24, 9, seed=12).t()  # [9, 24], strides (1, 9)
    for t in (x, xt):
        for qdtype in (FP8, INT8):
            q, s = quantize_per_token(t, qdtype)
            rq, rs = quantize_per_token_eager(t, qdtype, backend="eager")
            _assert_same_quant(q, s, rq, rs, f"strided {tuple(t.stride())} {qdtype}")


def test_quantize_empty():
    q, s = quantize_per_token(torch.empty(0, 16, device=DEVICE), INT8)
    assert q.shape == (0, 16) and q.dtype == INT8 and s.shape == (0, 1)


@pytest.mark.parametrize(
    "x, dtype, match",
    [
        (torch.randn(16), FP8, r"x must be 2-D \[M, K\]"),
        (torch.randn(2, 3, 16), INT8, r"x must be 2-D \[M, K\]"),
        (torch.randn(4, 16).double(), INT8, "x must be one of"),
        (torch.randint(-3, 3, (4, 16), dtype=torch.int32), FP8, "x must be one of"),
        (torch.randn(4, 16), F16, "dtype must be one of"),
        (torch.randn(4, 16), torch.float8_e5m2, "dtype must be one of"),
        (torch.randn(4, 0), INT8, "K > 0"),
    ],
)
def test_quantize_errors(x, dtype, match):
    with pytest.raises(ValueError, match=match):
        quantize_per_token(x, dtype)


# ------------------------------------------------------------------------------ int8_matmul_rescale


def _int8_problem(m, k, n, seed, x_dtype=F32, bias_dtype=F32, has_bias=True, device=None):
    x = _rand(m, k, seed=seed, dtype=x_dtype, scale=2.0, device=device)
    w = _rand(n, k, seed=seed + 1, scale=0.05, device=device)
    xq, xs = quantize_per_token_eager(x, INT8, backend="eager")
    wq, ws = quantize_rowwise(w, INT8)
    bias = _rand(n, seed=seed + 2, dtype=bias_dtype, scale=0.5, device=device) if has_bias else None
    return xq, wq, xs, ws, bias


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("k", [16, 40, 64])
@pytest.mark.parametrize("n", [24, 48])
@pytest.mark.parametrize("out_dtype", [F32, BF16], ids=_ids)
@pytest.mark.parametrize("has_bias", [True, False])
def test_int8_matmul_rescale_matches_eager(m, k, n, out_dtype, has_bias):
    xq, wq, xs, ws, bias = _int8_problem(m, k, n, seed=m + k + n, bias_dtype=out_dtype, has_bias=has_bias)
    y = int8_matmul_rescale(xq, wq, xs, ws, bias, out_dtype)
    y32, ref = _eager_rescale(xq, wq, xs, ws, bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n) and y.is_contiguous()
    _assert_one_rounding(y, y32, ref, f"int8_matmul_rescale [{m}, {k}] x [{n}, {k}] -> {out_dtype}")
    if interpreting():  # no fused multiply-add in the interpreter, and bf16 stores round to nearest even
        assert torch.equal(y, ref)


@pytest.mark.parametrize(
    "m, k, n, path",
    [(33, 40, 48, "int_mm"), (17, 16, 8, "int_mm"), (16, 16, 24, "int_mm_padded"), (1, 64, 24, "int_mm_padded"),
     (5, 12, 24, "float"), (33, 40, 20, "float"), (3, 1100, 20, "float")],
)
def test_int8_mm_paths_are_exact(m, k, n, path):
    """torch._int_mm (M padded to 17 when <= 16) where K and N are multiples of 8, else an exact float matmul
    (float64 past K = 1024); the rescale on top agrees with the eager formula on every path."""
    assert int_mm_path(m, k, n) == path
    g = torch.Generator().manual_seed(m * k + n)
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=INT8)
    wq = torch.randint(-128, 128, (n, k), generator=g, dtype=INT8)
    xs, ws = torch.rand(m, 1, generator=g) + 0.01, torch.rand(n, generator=g) + 0.01
    exact = xq.long() @ wq.long().t()  # on the CPU (CUDA has no int64 matmul)
    acc = int8_mm(xq.to(DEVICE), wq.to(DEVICE))
    y = int8_matmul_rescale(xq.to(DEVICE), wq.to(DEVICE), xs.to(DEVICE), ws.to(DEVICE), None, F32)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc.cpu().long(), exact)
    assert_close(y, exact.float() * xs * ws, F32, name=f"rescale on the {path} path")


def test_int8_matmul_rescale_1d_x_scale_and_bias_dtypes():
    xq, wq, xs, ws, bias = _int8_problem(5, 40, 24, seed=40, bias_dtype=BF16)
    y = int8_matmul_rescale(xq, wq, xs.flatten(), ws, bias, F16)
    y32, ref = _eager_rescale(xq, wq, xs, ws, bias, F16)
    _assert_one_rounding(y, y32, ref, "x_scale [M], bf16 bias, fp16 out")


def test_int8_matmul_rescale_empty():
    xq, wq, xs, ws, bias = _int8_problem(0, 16, 24, seed=41)
    assert int8_matmul_rescale(xq, wq, xs, ws, bias, BF16).shape == (0, 24)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"xq": torch.zeros(5, 16)}, "xq must be a 2-D int8 tensor"),
        ({"xq": torch.zeros(16, dtype=INT8)}, "xq must be a 2-D int8 tensor"),
        ({"wq": torch.zeros(24, 16, dtype=torch.uint8)}, "wq must be a 2-D int8 tensor"),
        ({"wq": torch.zeros(24, 8, dtype=INT8)}, "differ in K"),
        ({"x_scale": torch.ones(4, 1)}, r"x_scale must be float32 \[M=5, 1\]"),
        ({"x_scale": torch.ones(5, 1, dtype=BF16)}, "x_scale must be float32"),
        ({"w_scale": torch.ones(24, 1)}, r"w_scale must be float32 \[N=24\]"),
        ({"w_scale": torch.ones(24).double()}, "w_scale must be float32"),
        ({"bias": torch.ones(23)}, r"bias must be a float \[N=24\]"),
        ({"bias": torch.ones(24, dtype=torch.int32)}, r"bias must be a float \[N=24\]"),
        ({"out_dtype": INT8}, "out_dtype must be one of"),
    ],
)
def test_int8_matmul_rescale_errors(kwargs, match):
    args = {"xq": torch.zeros(5, 16, dtype=INT8), "wq": torch.zeros(24, 16, dtype=INT8), "x_scale": torch.ones(5, 1),
            "w_scale": torch.ones(24), "bias": None, "out_dtype": BF16}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        int8_matmul_rescale(**args)


def test_quant_kernels_reject_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        quantize_per_token(torch.randn(3, 16), INT8)
    xq, wq, xs, ws, bias = _int8_problem(3, 16, 8, seed=42, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        int8_matmul_rescale(xq, wq, xs, ws, bias, F32)


# ------------------------------------------------------------------------------ custom ops


def test_quant_custom_ops_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert hasattr(torch.ops.wanrt, "quantize_per_token") and hasattr(torch.ops.wanrt, "int8_matmul_rescale")
    with FakeTensorMode():
        x = torch.empty(7, 40, dtype=BF16)
        for qdtype in (FP8, INT8):
            q, s = quantize_per_token(x, qdtype)
            assert q.shape == (7, 40) and q.dtype == qdtype and s.shape == (7, 1) and s.dtype == F32
        q, s = torch.ops.wanrt.quantize_per_token(x[:, :24], INT8)
        assert q.shape == (7, 24) and s.shape == (7, 1)
        xq, wq = torch.empty(7, 40, dtype=INT8), torch.empty(24, 40, dtype=INT8)
        y = int8_matmul_rescale(xq, wq, torch.empty(7, 1), torch.empty(24), torch.empty(24, dtype=BF16), BF16)
        assert y.shape == (7, 24) and y.dtype == BF16
        y = torch.ops.wanrt.int8_matmul_rescale(xq, wq, torch.empty(7), torch.empty(24), None, F32)
        assert y.shape == (7, 24) and y.dtype == F32
        with pytest.raises(ValueError, match="x must be 2-D"):
            torch.ops.wanrt.quantize_per_token(torch.empty(40), INT8)
        with pytest.raises(ValueError, match="differ in K"):
            torch.ops.wanrt.int8_matmul_rescale(xq, wq[:, :16], torch.empty(7), torch.empty(24), None, F32)


def test_quant_opcheck():
    x = _rand(5, 24, seed=50, dtype=BF16)
    for qdtype in (INT8, FP8):
        torch.library.opcheck(torch.ops.wanrt.quantize_per_token.default, (x, qdtype))
    xq, wq, xs, ws, bias = _int8_problem(5, 16, 24, seed=51)
    torch.library.opcheck(torch.ops.wanrt.int8_matmul_rescale.default, (xq, wq, xs, ws, bias, BF16))
    torch.library.opcheck(torch.ops.wanrt.int8_matmul_rescale.default, (xq, wq, xs, ws, None, F32))


# ------------------------------------------------------------------------------ quantized layers


def _eager_layer(layer, x):
    """``layer(x)``. On CUDA, torch._int_mm (the eager Int8Linear) needs more than 16 rows: there fewer tokens get zero
    rows appended up to 17, cut off after (each token is quantized and multiplied on its own: the others are equal)."""
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    if not (isinstance(layer, Int8Linear) and rows.device.type != "cpu" and m <= 16):
        return layer(x)
    padded = torch.cat([rows, rows.new_zeros(17 - m, rows.shape[1])])
    return layer(padded)[:m].reshape(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("cls", [FP8Linear, Int8Linear], ids=_ids)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=_ids)
def test_quant_layers_triton_match_eager(cls, has_bias, x_dtype):
    k, n, out_dtype = 40, 24, F32
    if COMPILED and cls is FP8Linear:
        if torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("torch._scaled_mm (FP8Linear) needs sm_89+")
        # torch._scaled_mm on CUDA needs K and N multiples of 16, and row-wise scales a bf16 output (where cuBLAS
        # does not take them: before sm_90 or cuBLAS 12.9). Fused and eager share q, scales and the GEMM: equal.
        k, n, out_dtype = 48, 32, BF16
    torch.manual_seed(60)
    lin = nn.Linear(k, n, bias=has_bias).to(DEVICE)
    eager = cls.from_linear(lin, out_dtype=out_dtype, act_backend="eager")
    fused = cls.from_linear(lin, out_dtype=out_dtype, act_backend="triton")
    x = _rand(2, 5, k, seed=61, dtype=x_dtype)  # 10 tokens: the padded torch._int_mm path
    y, ref = fused(x), _eager_layer(eager, x)
    assert y.shape == (2, 5, n) and y.dtype == out_dtype
    assert_close(y, ref, F32, name=f"{cls.__name__} triton vs eager")
    x = _rand(33, k, seed=62, dtype=x_dtype)
    assert_close(fused(x), eager(x), F32, name=f"{cls.__name__} triton vs eager, 33 tokens")


# ------------------------------------------------------------------------------ GPU, real shapes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [1536, 5120])
@pytest.mark.parametrize("qdtype", [FP8, INT8], ids=_ids)
@pytest.mark.parametrize("x_dtype", [BF16, F32], ids=_ids)
def test_quantize_gpu_real_shapes(k, qdtype, x_dtype):
    x = _rand(4096, k, seed=70, dtype=x_dtype, scale=3.0, device="cuda")
    x[7] = 0
    x[9, 11] = 500.0  # an outlier row: the rest of it in the fp8 subnormal range
    q, s = quantize_per_token(x, qdtype)
    rq, rs = quantize_per_token_eager(x, qdtype, backend="eager")
    _assert_same_quant(q, s, rq, rs, f"gpu quantize [4096, {k}] {x_dtype}->{qdtype}")
    q2, s2 = quantize_per_token(x[:, : k // 2], qdtype)  # row stride k, half width
    rq2, rs2 = quantize_per_token_eager(x[:, : k // 2], qdtype, backend="eager")
    _assert_same_quant(q2, s2, rq2, rs2, "gpu quantize strided rows")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k, n", [(1536, 1536), (1536, 8960), (5120, 1536), (5120, 8960)])
def test_int8_matmul_rescale_gpu_real_shapes(k, n):
    xq, wq, xs, ws, bias = _int8_problem(4096, k, n, seed=80, x_dtype=BF16, bias_dtype=BF16, device="cuda")
    for b, out_dtype in ((bias, BF16), (None, F32)):
        y = int8_matmul_rescale(xq, wq, xs, ws, b, out_dtype)
        y32, ref = _eager_rescale(xq, wq, xs, ws, b, out_dtype)
        _assert_one_rounding(y, y32, ref, f"gpu int8_matmul_rescale [4096, {k}] x [{n}, {k}] -> {out_dtype}")
    xs5 = xs[:5]
    y = int8_matmul_rescale(xq[:5], wq, xs5, ws, bias, BF16)  # M <= 16: the padded torch._int_mm
    y32, ref = _eager_rescale(xq[:5], wq, xs5, ws, bias, BF16)
    _assert_one_rounding(y, y32, ref, "gpu int8_matmul_rescale M=5")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [FP8Linear, Int8Linear], ids=_ids)
@pytest.mark.parametrize("k, n", [(1536, 8960), (5120, 1536)])
def test_quant_layers_gpu_real_shapes(cls, k, n):
    if cls is FP8Linear and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm needs sm_89+")
    torch.manual_seed(90)
    lin = nn.Linear(k, n, device="cuda")
    eager = cls.from_linear(lin, out_dtype=BF16, act_backend="eager")
    fused = cls.from_linear(lin, out_dtype=BF16, act_backend="triton")
    x = _rand(4096, k, seed=91, dtype=BF16, device="cuda")
    y, ref = fused(x), eager(x)
    if cls is FP8Linear:  # same q and scales: the same _scaled_mm
        assert torch.equal(y, ref)
    else:
        assert_close(y, ref, BF16, name=f"gpu {cls.__name__} [4096, {k}] -> {n}", tol=TOLERANCES[BF16])
