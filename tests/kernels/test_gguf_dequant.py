"""wanrt.kernels.gguf (GGUF block dequantization) against the eager twin and the ``gguf`` package's NumPy
dequantizers, in every supported type, on the interpreter (CPU) or compiled (CUDA; see ``_device.py``)."""

import numpy as np
import pytest
import torch
from _device import COMPILED, DEVICE

from wanrt.kernels.gguf import GGUF_KERNEL_TYPES, gguf_dequantize
from wanrt.quant.gguf import BLOCKS, GGUFLinear, dequantize
from wanrt.testing import random_gguf_blocks

gguf = pytest.importorskip("gguf")  # in the test extra


def test_every_eager_type_has_a_kernel():
    assert set(GGUF_KERNEL_TYPES) == set(BLOCKS)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", GGUF_KERNEL_TYPES)
def test_kernel_matches_eager_and_the_gguf_package(qtype, out_dtype):
    per = BLOCKS[qtype][0]
    rows = 7  # with 3 blocks a row: block counts that do not fill the last program
    raw = random_gguf_blocks(qtype, rows, 3 * per, seed=3)
    t = torch.from_numpy(raw).to(DEVICE)
    got = gguf_dequantize(t, qtype, out_dtype)
    assert got.dtype == out_dtype and got.shape == (rows * 3 * per,)
    eager = dequantize(t, qtype, (rows, 3 * per), out_dtype).reshape(-1)
    ref = torch.from_numpy(gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))
                           .astype(np.float32)).reshape(-1).to(out_dtype)
    if COMPILED and qtype in ("Q4_K", "Q5_K"):  # an FMA may save one float32 rounding (module docstring)
        torch.testing.assert_close(got.float().cpu(), eager.float().cpu(), rtol=2e-7 if out_dtype == torch.float32
                                   else 8e-3, atol=1e-9)
    else:
        assert torch.equal(got.cpu(), eager.cpu()), (got - eager).abs().max()
        assert torch.equal(got.cpu(), ref), (got.cpu().float() - ref.float()).abs().max()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K"])
def test_many_blocks(qtype):
    """Enough blocks for several programs, ragged tail."""
    per = BLOCKS[qtype][0]
    raw = torch.from_numpy(random_gguf_blocks(qtype, 37, 2 * per, seed=5)).to(DEVICE)
    torch.testing.assert_close(gguf_dequantize(raw, qtype).cpu(), dequantize(raw, qtype, (37 * 2 * per,)).cpu(),
                               rtol=0, atol=0)


def test_empty_and_bad_input():
    assert gguf_dequantize(torch.zeros(0, dtype=torch.uint8, device=DEVICE), "Q8_0").numel() == 0
    with pytest.raises(ValueError, match="unsupported type 'Q2_K'"):
        gguf_dequantize(torch.zeros(34, dtype=torch.uint8, device=DEVICE), "Q2_K")
    with pytest.raises(ValueError, match="not whole Q8_0 blocks"):
        gguf_dequantize(torch.zeros(35, dtype=torch.uint8, device=DEVICE), "Q8_0")
    with pytest.raises(ValueError, match="must be uint8"):
        gguf_dequantize(torch.zeros(34, dtype=torch.int8, device=DEVICE), "Q8_0")
    with pytest.raises(ValueError, match="out_dtype"):
        gguf_dequantize(torch.zeros(34, dtype=torch.uint8, device=DEVICE), "Q8_0", torch.int32)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_0"])
def test_linear_with_the_kernel_equals_eager(qtype, monkeypatch):
    """GGUFLinear with ``dequant_backend="triton"`` runs the kernel and computes what the eager one does."""
    import wanrt.kernels.gguf as kernel

    launches = []
    launch = kernel._launch
    monkeypatch.setattr(kernel, "_launch", lambda *a: launches.append(a[1]) or launch(*a))
    per = BLOCKS[qtype][0]
    lin = GGUFLinear(per, 12, qtype, out_dtype=torch.float32, device=DEVICE)
    lin.raw.copy_(torch.from_numpy(random_gguf_blocks(qtype, 12, per, seed=1)))
    lin.bias.data.normal_()
    x = torch.randn(3, 5, per).to(DEVICE)
    ref = lin(x)
    lin.dequant_backend = "triton"
    torch.testing.assert_close(lin(x), ref, rtol=1e-6, atol=1e-6)
    assert launches == [qtype]
