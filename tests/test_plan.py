"""One plan names every kernel that runs: the DiT's attention and fused ops, the 8-bit Linears' activation
quantization (``quant``) and the VAE's convolutions (``vae``), resolved once by the pure ``plan()``.

The rule under test: the Triton activation-quantization kernels run only where the fused ops resolve to Triton,
so never for ``backend="eager"``, never after a failed Triton self-check, never off CUDA unless the interpreter is
asked for explicitly. The model-level tests run the fp8/int8 DiT with those kernels' launchers made to raise, and
show the opposite (the kernels are reached) so that the guard can fail.
"""

from __future__ import annotations

import pytest
import torch

import wanrt
from wanrt.kernels._common import interpreting
from wanrt.ops.backends import BackendUnavailableError, Capabilities, OpsPlan, plan

HEALTHY = frozenset({"triton", "flash_attn"})
FAILED = "CompilationError: out of shared memory"


def caps(device="cuda", sm=(9, 0), packages=HEALTHY, dtype=torch.bfloat16, **kw):
    return Capabilities(device, dtype, 128, sm if device == "cuda" else None, packages=frozenset(packages), **kw)


# ------------------------------------------------------------------------------ the pure rule


def test_quant_is_triton_only_where_the_fused_ops_are():
    assert plan("auto", caps()).quant == "triton"  # a healthy GPU with Triton
    assert plan("sdpa", caps()).quant == "triton"
    assert plan("auto", caps(triton_failed=FAILED)).quant == "eager"  # the self-check failed
    assert plan("sdpa", caps(triton_failed=FAILED)).quant == "eager"
    assert plan("eager", caps()).quant == "eager"  # the exact reference path
    assert plan("flash-attn", caps(packages={"flash_attn"})).quant == "eager"  # Triton not installed
    assert plan("sdpa", caps(sm=(7, 5))).quant == "eager"  # before Ampere: no fused kernels
    assert plan("auto", caps(device="cpu")).quant == "eager"
    assert plan("auto", caps(device="cpu", interpreter=True)).quant == "eager"  # never picked unasked on the CPU
    assert plan("triton", caps(device="cpu", interpreter=True)).quant == "triton"  # the interpreter, explicitly
    assert plan("sdpa", caps(device="cpu", interpreter=True), fused="triton").quant == "triton"
    assert plan("sdpa", caps(), fused="eager").quant == "eager"
    for p in (plan(r, c) for r in ("auto", "eager", "sdpa") for c in (caps(), caps(triton_failed=FAILED))):
        assert p.quant == p.fused, p


def test_explicit_quant_is_checked_like_the_fused_ops():
    assert plan("sdpa", caps(), quant="eager") == OpsPlan("sdpa", "triton", quant="eager")
    assert plan("eager", caps(), quant="triton") == OpsPlan("eager", "eager", quant="triton")
    with pytest.raises(BackendUnavailableError, match="self-check"):
        plan("sdpa", caps(triton_failed=FAILED), quant="triton")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        plan("sdpa", caps(device="cpu"), quant="triton")
    with pytest.raises(BackendUnavailableError, match="triton package"):
        plan("sdpa", caps(packages=set()), quant="triton")
    with pytest.raises(ValueError, match="quant backend"):
        plan("sdpa", caps(), quant="cuda")


def test_vae_backend_is_resolved_and_checked_in_the_plan():
    assert plan("auto", caps()).vae == "eager"  # never automatic
    assert plan("auto", caps(), vae="triton").vae == "triton"
    assert plan("eager", caps(device="cpu", interpreter=True), vae="triton").vae == "triton"
    assert plan("auto", caps(), vae="tensorrt").vae == "tensorrt"
    with pytest.raises(BackendUnavailableError, match="self-check"):
        plan("auto", caps(triton_failed=FAILED), vae="triton")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        plan("auto", caps(device="cpu"), vae="triton")
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        plan("auto", caps(device="cpu"), vae="tensorrt")
    with pytest.raises(ValueError, match="VAE backend"):
        plan("auto", caps(), vae="cudnn")
    with pytest.raises(ValueError, match="VAE backend"):
        OpsPlan(vae="cudnn")


# ------------------------------------------------------------------------------ the record


def test_repr_names_every_kernel():
    assert repr(OpsPlan("sdpa", "triton", quant="eager", vae="tensorrt")) == (
        "OpsPlan(attention='sdpa', fused='triton', quant='eager', vae='tensorrt')")
    assert str(plan("sdpa", caps())) == "OpsPlan(attention='sdpa', fused='triton', quant='triton', vae='eager')"
    assert repr(OpsPlan()) == "OpsPlan(attention='eager', fused='eager', quant='eager', vae='eager')"
    assert "fuse_rope=True" in repr(OpsPlan("triton", "triton", fuse_rope=True))


def test_positional_plans_keep_their_meaning_equality_and_hash():
    assert OpsPlan("sdpa", "eager") == OpsPlan("sdpa", "eager", quant="eager", vae="eager")
    assert OpsPlan("sdpa", "triton") == OpsPlan("sdpa", "triton", quant="triton") == plan("sdpa", caps())
    assert hash(OpsPlan("sdpa", "triton")) == hash(plan("sdpa", caps()))
    assert OpsPlan("sdpa", "triton") != OpsPlan("sdpa", "triton", quant="eager")  # graph keys tell them apart
    assert OpsPlan("sdpa", "eager") != OpsPlan("sdpa", "eager", vae="triton")
    assert OpsPlan("sdpa", "triton").name == "sdpa+triton" and OpsPlan().name == "eager"


# ------------------------------------------------------------------------------ the fp8/int8 DiT


class _TritonQuantReached(Exception):
    pass


def _forbid_triton_quant(monkeypatch):
    """Make the launchers of the Triton activation-quantization kernels raise."""
    from wanrt.kernels import modnorm_quant
    from wanrt.kernels import quant as quant_kernels

    for mod, name in ((quant_kernels, "quantize_per_token"), (quant_kernels, "int8_matmul_rescale"),
                      (modnorm_quant, "residual_norm_quant")):
        def boom(*a, _name=f"{mod.__name__}.{name}", **k):
            raise _TritonQuantReached(_name)

        monkeypatch.setattr(mod, name, boom)


def _forward(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 4, 4, generator=g)
    ctx = torch.randn(1, 5, model.config.text_dim, generator=g)
    with torch.no_grad():
        return model(x, 500, ctx)


def _act_backends(model) -> set[str]:
    return {m.act_backend for m in model.modules() if hasattr(m, "act_backend")}


def _pretend_gpu(monkeypatch, triton_failed):
    """probe_capabilities answers as on an sm_90 GPU with Triton (whose self-check failed, or not); the tensors
    stay on the CPU, where the Triton kernels run in the interpreter."""
    from wanrt.ops import selfcheck

    def probe(device, dtype, head_dim, needs_mask=False, *, self_check=True):
        return Capabilities("cuda", dtype, head_dim, (9, 0), needs_mask, frozenset({"triton"}), interpreter=True,
                            triton_failed=triton_failed)

    monkeypatch.setattr(selfcheck, "probe_capabilities", probe)


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_eager_backend_runs_no_triton_quant_kernel(tiny_official, monkeypatch, scheme):
    _forbid_triton_quant(monkeypatch)
    model = wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.float32, backend="eager",
                                   quantization=scheme)
    assert model.plan == OpsPlan("eager", "eager", quant="eager") and _act_backends(model) == {"eager"}
    assert torch.isfinite(_forward(model)).all()


@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_failed_self_check_runs_no_triton_quant_kernel(tiny_official, monkeypatch, scheme):
    _forbid_triton_quant(monkeypatch)
    _pretend_gpu(monkeypatch, triton_failed=FAILED)
    model = wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.float32, backend="auto",
                                   quantization=scheme)
    assert model.plan == OpsPlan("sdpa", "eager", quant="eager") and _act_backends(model) == {"eager"}
    assert torch.isfinite(_forward(model)).all()


@pytest.mark.skipif(not interpreting(), reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("scheme", ["fp8", "int8"])
def test_healthy_self_check_reaches_the_triton_quant_kernels(tiny_official, monkeypatch, scheme):
    """The opposite of the test above (the same pretended GPU, its self-check passed): the guard can fail."""
    _forbid_triton_quant(monkeypatch)
    _pretend_gpu(monkeypatch, triton_failed=None)
    model = wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.float32, backend="auto",
                                   quantization=scheme)
    assert model.plan.quant == "triton" and _act_backends(model) == {"triton"}
    with pytest.raises(_TritonQuantReached):
        _forward(model)


@pytest.mark.skipif(not interpreting(), reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1")
def test_explicit_interpreter_reaches_the_triton_quant_kernels(tiny_official, monkeypatch, scheme="int8"):
    """backend="triton" on the CPU asks for the interpreter explicitly: the Triton quant kernels are reached
    (the norm fused with quantization, and the Linears' own activation quantization)."""
    from wanrt.kernels import modnorm_quant
    from wanrt.kernels import quant as quant_kernels

    model = wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.float32, backend="triton",
                                   quantization=scheme)
    assert model.plan == OpsPlan("triton", "triton", quant="triton") and _act_backends(model) == {"triton"}
    reached = []

    def spy(name, real):
        def f(*a, **k):
            reached.append(name)
            return real(*a, **k)

        return f

    for mod, name in ((quant_kernels, "quantize_per_token"), (modnorm_quant, "residual_norm_quant")):
        monkeypatch.setattr(mod, name, spy(name, getattr(mod, name)))
    assert torch.isfinite(_forward(model)).all()
    assert {"quantize_per_token", "residual_norm_quant"} <= set(reached), reached


def test_set_backend_gives_the_linears_the_plans_quant_backend(tiny_official, monkeypatch):
    """Re-planning a loaded model re-plans its 8-bit Linears too: the plan is the only record of their kernel."""
    model = wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.float32, backend="eager",
                                   quantization="int8")
    assert _act_backends(model) == {"eager"}
    assert model.set_backend(OpsPlan("sdpa", "triton")).quant == "triton" and _act_backends(model) == {"triton"}
    assert model.set_backend(OpsPlan("sdpa", "triton", quant="eager")).quant == "eager"
    assert _act_backends(model) == {"eager"}
    model.set_backend(OpsPlan("sdpa", "triton"))
    _forbid_triton_quant(monkeypatch)
    assert model.set_backend("eager").quant == "eager" and _act_backends(model) == {"eager"}
    assert torch.isfinite(_forward(model)).all()


@pytest.mark.skipif(not interpreting(), reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1")
def test_triton_fused_ops_with_eager_quant_run_no_triton_quant_kernel(tiny_official, monkeypatch):
    """A plan that mixes Triton fused ops with eager activation quantization: the norms run in Triton without
    quantizing (no fused norm + quantization kernel), the Linears quantize eagerly."""
    model = wanrt.load_transformer(tiny_official, device="cpu", dtype=torch.float32, backend="eager",
                                   quantization="int8")
    ref = _forward(model)
    _forbid_triton_quant(monkeypatch)
    assert model.set_backend("sdpa", fused="triton", quant="eager") == OpsPlan("sdpa", "triton", quant="eager")
    out = _forward(model)
    assert ((out - ref).norm() / ref.norm()).item() < 5e-3
    model.set_backend(OpsPlan("sdpa", "triton"))
    with pytest.raises(_TritonQuantReached):
        _forward(model)


def test_vae_takes_its_backend_from_the_plan(tiny_official):
    from wanrt.models.vae import CausalConv3d, Resample

    vae = wanrt.load_vae(tiny_official, device="cpu", dtype=torch.float32)
    convs = [m for m in vae.modules() if isinstance(m, (CausalConv3d, Resample))]
    vae.set_backend(OpsPlan("sdpa", "eager", vae="triton"))
    assert convs and all(m.backend == "triton" for m in convs)
    vae.set_backend("tensorrt")  # the Engine's TensorRT decoder; the module itself (the encoder) runs eager
    assert all(m.backend == "eager" for m in convs)
    vae.set_backend(OpsPlan(vae="triton").vae)
    assert all(m.backend == "triton" for m in convs)
    with pytest.raises(ValueError, match="VAE backend"):
        vae.set_backend("cudnn")
