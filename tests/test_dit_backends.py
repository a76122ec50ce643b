"""The DiT under each backend against the eager reference path, and backend selection through
load_transformer / Engine (tiny configs on the CPU; Triton kernels in the interpreter)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_dit import make_inputs, randomize_, tiny_config

import wanrt
from wanrt.models.dit import WanDiT
from wanrt.ops import OpsPlan
from wanrt.ops.backends import BackendUnavailableError
from wanrt.testing import Tolerance, assert_close

# Whole-model tolerances: many roundings compound through the blocks, so these are looser than a
# single op's; fp32 still has to agree to ~1e-5 of the output norm.
MODEL_TOL = {
    torch.float32: Tolerance(atol=1e-4, rtol=1e-4, rel=2e-5),
    torch.bfloat16: Tolerance(atol=0.15, rtol=0.15, rel=2.5e-2),
}


def _model(model_type="t2v", dtype=torch.float32, seed=3) -> WanDiT:
    model = WanDiT(tiny_config(model_type)).eval()
    randomize_(model, seed=seed)
    if dtype != torch.float32:
        for name, p in model.named_parameters():
            if not WanDiT.keep_fp32(name):
                p.data = p.data.to(dtype)
    return model


def _run(model: WanDiT, plan: OpsPlan, inputs: dict) -> torch.Tensor:
    model.set_backend(plan)
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v"])
@pytest.mark.parametrize("plan", [OpsPlan("sdpa", "eager"), OpsPlan("sdpa", "triton"), OpsPlan("triton", "triton"),
                                  OpsPlan("eager", "triton"), OpsPlan("triton", "triton", fuse_rope=True)],
                         ids=lambda p: p.attention + "+" + p.fused + ("-rope-fused" if p.fuse_rope else ""))
def test_dit_backends_match_eager_fp32(model_type, plan):
    model = _model(model_type)
    inputs = make_inputs(model.config)
    ref = _run(model, OpsPlan(), inputs)
    out = _run(model, plan, inputs)
    assert_close(out, ref, name=f"{model_type} velocity, {plan.name}", tol=MODEL_TOL[torch.float32])


@pytest.mark.parametrize("plan", [OpsPlan("sdpa", "eager"), OpsPlan("triton", "triton"),
                                  OpsPlan("triton", "triton", fuse_rope=True)], ids=lambda p: p.name)
def test_dit_backends_match_eager_bf16_weights(plan):
    """bf16 GEMMs (the official autocast numerics): the fused path may round differently, within bf16."""
    model = _model("t2v", torch.bfloat16)
    inputs = make_inputs(model.config)
    ref = _run(model, OpsPlan(), inputs)
    out = _run(model, plan, inputs)
    assert out.dtype == torch.float32
    assert_close(out, ref, name=f"bf16 velocity, {plan.name}", tol=MODEL_TOL[torch.bfloat16])


def test_set_backend_resolves_auto_and_rejects_unknown():
    model = _model()
    assert model.plan == OpsPlan()  # a freshly built model runs the reference path
    assert model.set_backend("auto") == OpsPlan("sdpa", "eager")  # CPU
    assert model.set_backend("triton") == OpsPlan("triton", "triton")  # interpreter (conftest)
    assert model.set_backend("sdpa", fused="triton") == OpsPlan("sdpa", "triton")
    with pytest.raises(ValueError, match="unknown backend"):
        model.set_backend("cudnn")
    with pytest.raises(BackendUnavailableError, match=r"wanrt\[flash\]"):
        model.set_backend("flash-attn")


def test_eager_plan_is_the_reference_bit_for_bit():
    """backend='eager' runs exactly the reference ops: two runs and a deep copy agree bitwise."""
    model = _model("i2v")
    inputs = make_inputs(model.config)
    a = _run(model, OpsPlan(), inputs)
    b = _run(copy.deepcopy(model), OpsPlan(), inputs)
    assert torch.equal(a, b)


def test_load_transformer_backend(tiny_official):
    model = wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.float32, backend="eager")
    assert model.plan == OpsPlan()
    assert wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.float32).plan.attention == "sdpa"
    with pytest.raises(ValueError, match="backend must be one of"):
        wanrt.load_transformer(tiny_official, device="cpu", backend="magic")
    with pytest.raises(BackendUnavailableError, match=r"pip install 'wanrt\[xformers\]'"):
        wanrt.load_transformer(tiny_official, device="cpu", backend="xformers")


@pytest.fixture(scope="module")
def eager_video(tiny_official):
    engine = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="eager")
    assert engine.plan == OpsPlan() and "backend='eager'" in repr(engine)
    return engine.generate("a corgi", **GEN)


GEN = dict(seed=5, num_inference_steps=2, num_frames=5, height=32, width=48)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_generate_with_each_backend(tiny_official, eager_video, backend):
    """A full generate() per backend equals the eager engine's video (same seed), within tolerance."""
    engine = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend=backend)
    assert engine.plan.attention == backend
    video = engine.generate("a corgi", **GEN)
    assert video.frames.shape == eager_video.frames.shape == (5, 32, 48, 3)
    assert_close(video.latents, eager_video.latents, name=f"latents, {backend}", tol=MODEL_TOL[torch.float32])
    diff = int(np.abs(video.frames.astype(np.int16) - eager_video.frames.astype(np.int16)).max())
    assert diff <= 1, f"uint8 frames differ by {diff} levels"


@pytest.mark.parametrize("plan", [OpsPlan("sdpa", "eager"), OpsPlan("triton", "triton"),
                                  OpsPlan("triton", "triton", fuse_rope=True)], ids=lambda p: p.name)
def test_dit_compiles_as_one_graph(plan):
    """The custom ops' fake registrations and the plain dispatch let torch.compile trace the whole
    forward without a graph break (fullgraph=True), and the compiled model gives the same velocity."""
    torch._dynamo.reset()
    model = _model("i2v")
    inputs = make_inputs(model.config)
    ref = _run(model, plan, inputs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(**inputs)
    assert_close(out, ref, name=f"compiled {plan.name}", tol=MODEL_TOL[torch.float32])
    torch._dynamo.reset()
