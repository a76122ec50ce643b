"""GPU checks (marker `gpu`; run with `python -m pytest -m gpu` on a CUDA machine)."""

import pytest
import torch

import wanrt

pytestmark = pytest.mark.gpu

SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=3, progress=False)


def test_same_seed_same_video_on_cpu_and_cuda(tiny_official, tiny_engine):
    """Noise is drawn on the CPU, so a seed gives the same latents on CUDA (up to kernel rounding)."""
    gpu = wanrt.Engine("tiny", tiny_official, device="cuda", precision="fp32")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    a = tiny_engine.generate("a corgi", seed=7, **SMALL)
    b = gpu.generate("a corgi", seed=7, **SMALL)
    assert ((a.latents - b.latents).norm() / a.latents.norm()).item() < 1e-4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_cuda(tiny_official, tiny_engine, precision):
    e = wanrt.Engine("tiny", tiny_official, device="cuda", precision=precision)
    ref = tiny_engine.generate("a corgi", seed=7, **SMALL).latents
    got = e.generate("a corgi", seed=7, **SMALL).latents
    assert e.transformer.patch_embedding.weight.is_cuda
    assert ((got - ref).norm() / ref.norm()).item() < 3e-2


# ----------------------------------------------------------------------------- backends on a GPU


def _real_block_model(dim=1536, heads=12, ffn=8960):
    """A one-block DiT at the 1.3B widths, random weights, bf16 Linears (official autocast numerics)."""
    from wanrt.checkpoints.tiny import randomize_
    from wanrt.models.dit import DiTConfig, WanDiT

    cfg = DiTConfig(dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=1, in_dim=16, out_dim=16)
    with torch.device("cuda"):
        model = WanDiT(cfg).eval()
    randomize_(model, seed=0)
    for name, p in model.named_parameters():
        if not WanDiT.keep_fp32(name):
            p.data = p.data.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("backend", ["sdpa", "triton", "triton-rope-fused"])
def test_real_size_block_backend_matches_eager_bf16(backend):
    """One 1.3B-width block over a 21x30x52 latent grid (8 frames x 480x832 here: 6240 tokens)."""
    from wanrt.testing import Tolerance, assert_close

    model = _real_block_model()
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, 4, 60, 104, device="cuda", generator=g)  # 4*30*52 = 6240 tokens
    ctx = torch.randn(1, 300, 4096, device="cuda", generator=g)
    with torch.no_grad():
        model.set_backend("eager")
        ref = model(x, torch.tensor([700], device="cuda"), ctx)
        if backend == "triton-rope-fused":
            from wanrt.ops import OpsPlan

            model.set_backend(OpsPlan("triton", "triton", fuse_rope=True))
        else:
            assert model.set_backend(backend).attention == backend
        out = model(x, torch.tensor([700], device="cuda"), ctx)
    assert_close(out, ref, name=f"1.3B block velocity, {backend}", tol=Tolerance(atol=0.1, rtol=0.1, rel=2e-2))


def test_auto_on_cuda_picks_a_gpu_backend_and_fused_kernels(tiny_official):
    e = wanrt.Engine("tiny", tiny_official, device="cuda", precision="bf16", backend="auto")
    assert e.plan.attention in ("triton", "flash-attn", "sdpa") and e.plan.fused == "triton"


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_generate_per_backend_on_cuda(tiny_official, backend):
    ref = wanrt.Engine("tiny", tiny_official, device="cuda", precision="bf16", backend="eager")
    e = wanrt.Engine("tiny", tiny_official, device="cuda", precision="bf16", backend=backend)
    a = ref.generate("a corgi", seed=7, **SMALL).latents
    b = e.generate("a corgi", seed=7, **SMALL).latents
    assert ((a - b).norm() / a.norm()).item() < 3e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_self_check_passes_on_this_gpu(dtype):
    from wanrt.kernels.selfcheck import triton_self_check

    assert triton_self_check("cuda:0", dtype, 128) is None


# ----------------------------------------------------------------------------- the fast loop on a GPU


@pytest.mark.parametrize("teacache", [None, 0.25])
def test_graphs_and_batched_cfg_equal_the_eager_loop(tiny_official, teacache):
    """CUDA defaults (batched CFG, CUDA graphs) against the reference loop, with TeaCache off and on."""
    kw = dict(SMALL, num_inference_steps=6, teacache_threshold=teacache, teacache_coefficients=(0, 0, 0, 0.1, 0))
    ref = wanrt.Engine("tiny", tiny_official, device="cuda", precision="fp32", backend="sdpa", cfg_batch=False,
                       cuda_graphs=False).generate("a corgi", seed=7, **kw)
    fast = wanrt.Engine("tiny", tiny_official, device="cuda", precision="fp32", backend="sdpa")
    assert fast.config.use_cfg_batch and fast.config.use_cuda_graphs
    v = fast.generate("a corgi", seed=7, **kw)
    v = fast.generate("a corgi", seed=7, **kw)  # the second call replays
    graphs = v.stats["cuda_graphs"]["with_residual" if teacache else "plain"]
    assert graphs["replays"] > 0 and graphs["fallbacks"] == 0, graphs
    assert v.stats["cfg_batched"] is True
    if teacache:
        assert v.stats["teacache"] == ref.stats["teacache"]
    assert ((v.latents - ref.latents).norm() / ref.latents.norm()).item() < 1e-4


def test_warmup_then_generate_on_cuda(tiny_official):
    e = wanrt.Engine("tiny", tiny_official, device="cuda", precision="bf16")
    e.warmup(height=32, width=48, num_frames=5)
    v = e.generate("a corgi", seed=7, **SMALL)
    assert v.stats["cuda_graphs"]["plain"]["captures"] >= 1


# ----------------------------------------------------------------------------- image-to-video on a GPU


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_i2v_and_flf2v_on_cuda_match_the_cpu(tiny_i2v_official, tiny_flf2v_official, precision):
    """The whole image-conditioned loop on CUDA (CLIP in fp16 for bf16, the default) against the CPU fp32
    reference, with CUDA graphs and batched CFG on (the CUDA defaults)."""
    import numpy as np

    torch.backends.cuda.matmul.allow_tf32 = False
    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    for ckpt, preset, last in ((tiny_i2v_official, "tiny-i2v", None), (tiny_flf2v_official, "tiny-flf2v", img[::-1])):
        ref = wanrt.Engine(preset, ckpt, device="cpu", precision="fp32").generate(
            "a corgi", image=img, last_image=last, seed=7, **SMALL)
        gpu = wanrt.Engine(preset, ckpt, device="cuda", precision=precision)
        assert gpu.image_encoder.dtype == (torch.float32 if precision == "fp32" else torch.float16)
        got = gpu.generate("a corgi", image=img, last_image=last, seed=7, **SMALL)
        assert got.stats["cfg_batched"] is True
        limit = 1e-4 if precision == "fp32" else 3e-2
        assert ((got.latents - ref.latents).norm() / ref.latents.norm()).item() < limit
    off = wanrt.Engine("tiny-flf2v", tiny_flf2v_official, device="cuda", precision=precision,
                       offload_image_encoder=True)
    assert off.image_encoder.device.type == "cpu"
    v = off.generate("a corgi", image=img, last_image=img[::-1], seed=7, **SMALL)
    assert off.image_encoder.device.type == "cpu" and torch.isfinite(v.latents).all()
