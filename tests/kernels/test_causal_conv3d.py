"""wanrt.kernels.causal_conv3d (implicit-GEMM causal conv3d) against the eager cat + pad + conv3d formula.

The tiny odd shapes run where the kernel does: in the Triton interpreter on CPU tensors where there is no CUDA
(tests/conftest.py sets TRITON_INTERPRET=1), compiled on CUDA tensors on a CUDA host with the interpreter off
(``benchmarks/gpu_suite.sh``); see ``_device.py``. Eager fp32 references of the modules run with TF32 off (the
``no_tf32`` fixture). The ``gpu`` tests at a real decoder layer size run only on CUDA (``pytest -m gpu``).
"""

import pytest
import torch
import torch.nn.functional as F
from _device import DEVICE

from wanrt.kernels.causal_conv3d import causal_conv3d
from wanrt.models.vae import CausalConv3d, VAEConfig, WanVAE
from wanrt.testing import assert_close, tf32_off

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture
def no_tf32():
    """cuDNN convolutions of the eager fp32 references in full fp32 (no TF32, ~1e-3) for one test; flags restored."""
    with tf32_off():
        yield


def _rand(*shape, seed, dtype=F32, scale=1.0, device=None):
    """Drawn on the CPU (the same values on every host), then moved to ``device`` (default :data:`DEVICE`)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device or DEVICE, dtype=dtype)


def _reference(x, prefix, weight, bias, front_pad, spatial_pad, stride):
    """The eager formula in float64 on the same (rounded) inputs."""
    n = 0 if prefix is None else prefix.shape[2]
    xx = x if prefix is None else torch.cat([prefix, x], dim=2)
    ph, pw = spatial_pad
    xx = F.pad(xx.double(), (pw, pw, ph, ph, front_pad - n, 0))
    return F.conv3d(xx, weight.double(), None if bias is None else bias.double(), stride)


def _inputs(b, c_in, c_out, t, h, w, kernel, n_prefix, dtype, seed, has_bias=True, device=None):
    fan_in = c_in * kernel[0] * kernel[1] * kernel[2]
    x = _rand(b, c_in, t, h, w, seed=seed, dtype=dtype, device=device)
    prefix = _rand(b, c_in, n_prefix, h, w, seed=seed + 1, dtype=dtype, device=device) if n_prefix else None
    weight = _rand(c_out, c_in, *kernel, seed=seed + 2, dtype=dtype, scale=fan_in**-0.5, device=device)
    bias = _rand(c_out, seed=seed + 3, dtype=dtype, scale=0.1, device=device) if has_bias else None
    return x, prefix, weight, bias


def _check(x, prefix, weight, bias, front_pad, spatial_pad, stride, name):
    out = causal_conv3d(x, prefix, weight, bias, front_pad=front_pad, spatial_pad=spatial_pad, stride=stride)
    ref = _reference(x, prefix, weight, bias, front_pad, spatial_pad, stride)
    assert out.dtype == x.dtype and out.shape == ref.shape, (out.dtype, tuple(out.shape), tuple(ref.shape))
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert_close(out, ref, x.dtype, name=name)
    return out


# The convs Wan-VAE instantiates as CausalConv3d (wanrt/models/vae.py): kernel, front_pad, (ph, pw), stride.
CONV333 = ((3, 3, 3), 2, (1, 1), (1, 1, 1))  # ResidualBlock convs, encoder/decoder conv1 and head
CONV111 = ((1, 1, 1), 0, (0, 0), (1, 1, 1))  # ResidualBlock shortcut, WanVAE.conv1 / conv2
TIME_UP = ((3, 1, 1), 2, (0, 0), (1, 1, 1))  # Resample(upsample3d).time_conv, pad (1, 0, 0)
TIME_DOWN = ((3, 1, 1), 0, (0, 0), (2, 1, 1))  # Resample(downsample3d).time_conv over [last frame, x]
# The official spatial downsample (kernel (1,3,3), stride (1,2,2) on input padded (0,1,0,1) outside); in
# wanrt's VAE it is an nn.Conv2d, so this covers the op only.
SPATIAL_DOWN = ((1, 3, 3), 0, (0, 0), (1, 2, 2))


@pytest.mark.parametrize("case, n_prefix", [
    (CONV333, 0), (CONV333, 1), (CONV333, 2), (CONV111, 0), (TIME_UP, 0), (TIME_UP, 1), (TIME_UP, 2),
    (TIME_DOWN, 0), (SPATIAL_DOWN, 0),
])
@pytest.mark.parametrize("has_bias", [True, False])
def test_vae_cases_fp32(case, n_prefix, has_bias):
    kernel, front_pad, spatial_pad, stride = case
    b, t, h, w = (2, 3, 7, 9) if kernel != (3, 3, 3) else (1, 3, 6, 7)
    x, prefix, weight, bias = _inputs(b, 5, 7, t, h, w, kernel, n_prefix, F32, seed=n_prefix + 10 * has_bias,
                                      has_bias=has_bias)
    _check(x, prefix, weight, bias, front_pad, spatial_pad, stride, f"{kernel} n={n_prefix} bias={has_bias}")


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("case, n_prefix", [(CONV333, 2), (CONV111, 0), (TIME_UP, 1), (TIME_DOWN, 0),
                                            (SPATIAL_DOWN, 0)])
def test_vae_cases_low_precision(dtype, case, n_prefix):
    kernel, front_pad, spatial_pad, stride = case
    b = 1 if kernel == (3, 3, 3) else 2
    x, prefix, weight, bias = _inputs(b, 6, 5, 3, 5, 6, kernel, n_prefix, dtype, seed=20)
    _check(x, prefix, weight, bias, front_pad, spatial_pad, stride, f"{dtype} {kernel} n={n_prefix}")


def test_several_channel_blocks_and_output_tiles():
    # C_in 20 > BLOCK_K, C_out 20 > BLOCK_N and 9x9 > BLOCK_M positions per frame (the interpreter config):
    # partial K, N and M blocks.
    x, prefix, weight, bias = _inputs(1, 20, 20, 2, 9, 9, (3, 3, 3), 1, F32, seed=30)
    _check(x, prefix, weight, bias, 2, (1, 1), (1, 1, 1), "C 20")


def test_odd_sizes_strides_and_padding():
    # Odd H/W with stride 2 (last row/column dropped), a front pad longer than the kernel needs.
    x, prefix, weight, bias = _inputs(2, 3, 4, 5, 9, 7, (2, 3, 3), 1, F32, seed=40)
    _check(x, prefix, weight, bias, 3, (1, 0), (2, 2, 2), "odd")


def test_non_contiguous_inputs():
    x, prefix, weight, bias = _inputs(2, 5, 6, 3, 6, 7, (3, 3, 3), 2, F32, seed=50)
    ref = _reference(x, prefix, weight, bias, 2, (1, 1), (1, 1, 1))
    # x: a strided slice of a bigger tensor (channel stride != 1: copied to channels-last internally).
    big = torch.zeros(2, 10, 3, 6, 14, device=DEVICE)
    big[:, ::2, :, :, ::2] = x
    xs = big[:, ::2, :, :, ::2]
    assert not xs.is_contiguous()
    # prefix: channels-last slice, read in place (its channels are unit-stride).
    pl = torch.cat([torch.zeros_like(prefix), prefix], 2).contiguous(memory_format=torch.channels_last_3d)[:, :, 2:]
    assert pl.stride(1) == 1 and not pl.is_contiguous(memory_format=torch.channels_last_3d)
    wt = weight.permute(0, 2, 3, 4, 1).contiguous().permute(0, 4, 1, 2, 3)  # same values, other strides
    out = causal_conv3d(xs, pl, wt, bias, front_pad=2, spatial_pad=(1, 1), stride=(1, 1, 1))
    assert_close(out, ref, F32, name="non-contiguous")
    # A channels-last x goes through without a copy and gives the same result.
    xl = x.contiguous(memory_format=torch.channels_last_3d)
    out2 = causal_conv3d(xl, prefix, weight, bias, front_pad=2, spatial_pad=(1, 1), stride=(1, 1, 1))
    assert_close(out2, ref, F32, name="channels-last x")


def test_batch_rows_do_not_mix_prefix_frames():
    # Different prefixes per sample and a zero x: the output depends only on each sample's own prefix.
    x, prefix, weight, _ = _inputs(2, 4, 4, 2, 5, 5, (3, 3, 3), 2, F32, seed=60)
    x = torch.zeros_like(x)
    prefix[1] = 0.0
    out = _check(x, prefix, weight, None, 2, (1, 1), (1, 1, 1), "prefix only")
    assert out[1].abs().max() == 0 and out[0, :, 0].abs().max() > 0


# ------------------------------------------------------------------------------ errors and fake


def _call(x, prefix, weight, bias=None, front_pad=2, spatial_pad=(1, 1), stride=(1, 1, 1)):
    return causal_conv3d(x, prefix, weight, bias, front_pad=front_pad, spatial_pad=spatial_pad, stride=stride)


def test_errors():
    x, prefix, weight, bias = _inputs(1, 4, 3, 2, 5, 5, (3, 3, 3), 2, F32, seed=70)
    with pytest.raises(ValueError, match="more than front_pad"):
        _call(x, torch.cat([prefix, prefix[:, :, :1]], 2), weight)
    with pytest.raises(ValueError, match="more than front_pad"):
        _call(x, prefix, weight, front_pad=1)
    with pytest.raises(ValueError, match="does not match"):
        _call(x, prefix, weight[:, :3])
    with pytest.raises(ValueError, match="prefix must be"):
        _call(x, prefix[:, :3], weight)
    with pytest.raises(ValueError, match="prefix must be"):
        _call(x, prefix[..., :4], weight)
    with pytest.raises(ValueError, match=r"x must be \[B, C_in, T, H, W\]"):
        _call(x[0], None, weight)
    with pytest.raises(ValueError, match="weight must be"):
        _call(x, prefix, weight[..., 0])
    with pytest.raises(ValueError, match="bias must be"):
        _call(x, prefix, weight, bias[:2])
    with pytest.raises(ValueError, match="dtype"):
        _call(x, prefix, weight.half())
    with pytest.raises(ValueError, match="dtype"):
        _call(x, prefix.half(), weight)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        _call(x, None, weight, front_pad=0)  # T 2 < kt 3 without front padding
    with pytest.raises(ValueError, match="strides >= 1"):
        _call(x, prefix, weight, stride=(0, 1, 1))
    with pytest.raises(ValueError, match=r"spatial_pad must be \(ph, pw\)"):
        _call(x, prefix, weight, spatial_pad=(1, 1, 1, 1))


def test_fake_registration_shapes_and_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, 4, 9, 11)
        prefix = torch.empty(2, 8, 2, 9, 11)
        weight = torch.empty(16, 8, 3, 3, 3)
        out = torch.ops.wanrt.causal_conv3d(x, prefix, weight, None, 2, 1, 1, 1, 1, 1)
        assert out.shape == (2, 16, 4, 9, 11) and out.dtype == F32
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
        down = torch.ops.wanrt.causal_conv3d(x.half(), None, torch.empty(8, 8, 3, 1, 1).half(), None, 0, 0, 0,
                                             2, 1, 1)
        assert down.shape == (2, 8, 1, 9, 11) and down.dtype == F16
        sd = torch.ops.wanrt.causal_conv3d(x, None, torch.empty(8, 8, 1, 3, 3), None, 0, 0, 0, 1, 2, 2)
        assert sd.shape == (2, 8, 4, 4, 5)
        with pytest.raises(ValueError, match="more than front_pad"):
            torch.ops.wanrt.causal_conv3d(x, prefix, weight, None, 1, 1, 1, 1, 1, 1)


def test_opcheck():
    # Schema, fake vs real (shapes and strides), autograd registration: on a cheap time conv.
    x, prefix, weight, bias = _inputs(1, 3, 4, 2, 3, 4, (3, 1, 1), 1, F32, seed=80)
    torch.library.opcheck(torch.ops.wanrt.causal_conv3d.default, (x, prefix, weight, bias, 2, 0, 0, 1, 1, 1),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_as_one_graph(no_tf32):
    conv = CausalConv3d(4, 6, 3, padding=1, cached=True).to(DEVICE)
    conv.backend = "triton"
    x, prefix = _rand(1, 4, 2, 5, 6, seed=85), _rand(1, 4, 2, 5, 6, seed=86)
    with torch.no_grad():
        f = torch.compile(lambda x, p: F.silu(conv.causal_conv(x, p)), backend="aot_eager", fullgraph=True)
        out = f(x, prefix)
        conv.backend = "eager"
        assert_close(out, F.silu(conv.causal_conv(x, prefix)), F32, name="compiled")


# ------------------------------------------------------------------------------ CausalConv3d / WanVAE


def test_module_backend_with_cache_prefix(no_tf32):
    torch.manual_seed(0)
    conv = CausalConv3d(4, 6, 3, padding=1, cached=True).to(DEVICE)
    x = _rand(1, 4, 3, 5, 7, seed=90)
    for prefix in (None, _rand(1, 4, 1, 5, 7, seed=91), _rand(1, 4, 2, 5, 7, seed=92)):
        ref = conv.causal_conv(x, prefix)
        conv.backend = "triton"
        out = conv.causal_conv(x, prefix)
        conv.backend = "eager"
        assert_close(out, ref, F32, name=f"module n={0 if prefix is None else prefix.shape[2]}")


def _randomize_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


def test_tiny_vae_decode_triton_matches_eager(no_tf32):
    cfg = VAEConfig(base_dim=4, z_dim=4, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,),
                    latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.7, 2.0, 1.1))
    vae = WanVAE(cfg).eval()
    _randomize_(vae, seed=5)  # on the CPU, then moved: the same weights on every host
    vae.to(DEVICE)
    latents = _rand(1, 4, 2, 2, 3, seed=6)
    ref = vae.decode(latents)  # [1, 3, 3, 4, 6]: frame 0, then 2 frames (temporal factor 2)
    convs = [m for m in vae.modules() if isinstance(m, CausalConv3d)]
    assert {tuple(m.kernel_size) for m in convs} == {(3, 3, 3), (1, 1, 1), (3, 1, 1)}
    try:
        for m in convs:
            m.backend = "triton"
        out = vae.decode(latents)
    finally:
        for m in convs:
            m.backend = "eager"
    assert (ref.abs() < 1).float().mean() > 0.5  # mostly unclamped: the comparison means something
    assert_close(out, ref, F32, name="tiny VAE decode")


# ------------------------------------------------------------------------------ GPU, real widths


def _reference_fp32(x, prefix, weight, bias, front_pad, spatial_pad, stride):
    """The eager formula in fp32 (TF32 off) on the GPU: for bf16 inputs, far more precise than their tolerance."""
    n = 0 if prefix is None else prefix.shape[2]
    xx = x if prefix is None else torch.cat([prefix, x], dim=2)
    ph, pw = spatial_pad
    xx = F.pad(xx.float(), (pw, pw, ph, ph, front_pad - n, 0))
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        return F.conv3d(xx, weight.float(), None if bias is None else bias.float(), stride)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case, c_in, c_out, t, n_prefix", [
    (CONV333, 384, 384, 4, 2), (CONV333, 384, 384, 1, 0), (CONV111, 384, 192, 4, 0), (TIME_UP, 384, 768, 4, 2),
    (TIME_DOWN, 384, 384, 5, 0), (CONV333, 96, 3, 4, 2),
])
def test_gpu_decoder_layer_bf16(case, c_in, c_out, t, n_prefix):
    # A decoder layer of a 480x832 video at the 1/8 (60x104) scale: a 4-frame chunk plus the 2 cached frames.
    kernel, front_pad, spatial_pad, stride = case
    x, prefix, weight, bias = _inputs(1, c_in, c_out, t, 60, 104, kernel, n_prefix, BF16, seed=100, device="cuda")
    ref = _reference_fp32(x, prefix, weight, bias, front_pad, spatial_pad, stride)
    for xi in (x, x.contiguous(memory_format=torch.channels_last_3d)):
        out = causal_conv3d(xi, prefix, weight, bias, front_pad=front_pad, spatial_pad=spatial_pad, stride=stride)
        assert_close(out, ref, BF16, name=f"gpu bf16 {kernel} C {c_in}->{c_out}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp32_uses_ieee_dots():
    # The official VAE runs in fp32: no TF32 in the kernel (TF32 would be ~1e-3 off). float64 reference.
    x, prefix, weight, bias = _inputs(1, 96, 96, 4, 60, 104, (3, 3, 3), 2, F32, seed=110, device="cuda")
    ref = _reference(x, prefix, weight, bias, 2, (1, 1), (1, 1, 1))
    out = causal_conv3d(x, prefix, weight, bias, front_pad=2, spatial_pad=(1, 1), stride=(1, 1, 1))
    assert_close(out, ref, F32, name="gpu fp32")


@pytest.mark.parametrize("mode", ["upsample2d", "upsample3d", "downsample2d", "downsample3d"])
def test_resample_layers_through_the_kernel(mode, no_tf32):
    """Every Resample conv (the per-frame 2D convs, both time_convs, the temporal downsample over the cached frame)
    through the Triton causal conv3d equals the eager module over two chunks with a cache."""
    from wanrt.cache.causal_cache import CausalCache
    from wanrt.checkpoints.tiny import randomize_
    from wanrt.models.vae import Resample, ResampleMode

    layer = Resample(4, ResampleMode(mode)).eval()
    randomize_(layer, seed=1)  # on the CPU, then moved: the same weights on every host
    layer.to(DEVICE)
    layer.cache_slot = 0
    x1 = torch.randn(1, 4, 1, 5, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    x2 = torch.randn(1, 4, 4, 5, 6, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    outs = {}
    for backend in ("eager", "triton"):
        layer.backend = backend
        if hasattr(layer, "time_conv"):
            layer.time_conv.backend = backend
        cache = CausalCache(1)
        with torch.no_grad():
            outs[backend] = [layer(x1, cache), layer(x2, cache)]
    for a, b in zip(outs["triton"], outs["eager"], strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
