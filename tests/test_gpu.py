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
