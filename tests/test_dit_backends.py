"""The DiT under each backend against the eager reference path, and backend selection through
load_transformer / Engine (tiny configs on the CPU; Triton kernels in the interpreter)."""

from __future__ import annotations


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
    # bf16 weights, each backend against the eager bf16 run (CPU, interpreter): measured relative L2 error
    # 3.0e-3 (sdpa, triton, triton with fused RoPE; max |diff| 0.027), while the whole bf16-vs-fp32 gap is
    # 4.1e-3. Bounds at about 2x measured.
    torch.bfloat16: Tolerance(atol=0.05, rtol=0.05, rel=6e-3),
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


EAGER_OPS = {  # module -> the eager twins the reference path must reach
    "wanrt.ops.norms": ("modulated_layer_norm_eager", "gated_residual_layer_norm_eager", "qk_norm_rope_eager",
                        "layer_norm_eager"),
}


def _guard_dispatch(monkeypatch):
    """Count the eager twins' calls, and make every non-eager implementation (Triton fused ops, the Triton
    attention kernel, SDPA and the library attention backends) raise when reached."""
    import importlib

    import wanrt.ops.backends as backends

    calls: dict[str, int] = {}

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)
        return wrapper

    class Forbidden(AssertionError):
        pass

    def forbid(name):
        def fn(*a, **k):
            raise Forbidden(f"the eager plan reached {name}")
        return fn

    for mod_name, names in EAGER_OPS.items():
        mod = importlib.import_module(mod_name)
        for n in names:
            monkeypatch.setattr(mod, n, counting(n, getattr(mod, n)))
    attention_mod = importlib.import_module("wanrt.ops.attention")
    impls = dict(attention_mod._IMPLS)
    for name, (fn, pkgs) in impls.items():
        impls[name] = (counting("_attn_eager", fn) if name == "eager" else forbid(f"attention backend {name}"), pkgs)
    monkeypatch.setattr(attention_mod, "_IMPLS", impls)

    class NoFused:
        def __getattr__(self, name):
            return forbid(f"fused triton op {name}")

    monkeypatch.setattr(backends, "_FUSED_IMPLS", {"triton": NoFused()})
    import wanrt.kernels.attention as kattn

    monkeypatch.setattr(kattn, "attention", forbid("the Triton attention kernel"))
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", forbid("SDPA"))
    return calls, Forbidden


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_eager_plan_dispatches_only_to_eager_twins(monkeypatch, model_type):
    """backend='eager' runs the reference ops and nothing else: every norm, residual and attention call reaches
    its ``*_eager`` twin, and no Triton kernel, SDPA or library attention is reached."""
    model = _model(model_type)
    inputs = make_inputs(model.config)
    calls, _ = _guard_dispatch(monkeypatch)
    out = _run(model, OpsPlan(), inputs)
    assert torch.isfinite(out).all()
    n = model.config.num_layers
    assert calls["_attn_eager"] == n * (3 if model_type == "i2v" else 2)  # self + text (+ image) per block
    assert calls["modulated_layer_norm_eager"] >= 2 and calls["gated_residual_layer_norm_eager"] >= n
    assert calls.get("qk_norm_rope_eager", 0) >= 2 * n  # q and k of self-attention per block at least


@pytest.mark.parametrize("plan", [OpsPlan("sdpa", "eager"), OpsPlan("eager", "triton"), OpsPlan("triton", "eager")],
                         ids=lambda p: p.name)
def test_dispatch_guard_catches_non_eager_plans(monkeypatch, plan):
    """The guard above can fail: any plan that is not fully eager reaches a forbidden implementation."""
    model = _model("t2v")
    inputs = make_inputs(model.config)
    _, forbidden = _guard_dispatch(monkeypatch)
    with pytest.raises(forbidden):
        _run(model, plan, inputs)


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
