"""The backend registry: pure resolution with fake capabilities, error texts, mask refusal, and the
library adapters' plumbing (layout, scale, varlen masks) checked with stand-in packages."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from wanrt.ops.attention import attention
from wanrt.ops.backends import (
    ATTENTION_BACKENDS,
    BACKEND_NAMES,
    BackendUnavailableError,
    Capabilities,
    OpsPlan,
    ineligibility,
    plan,
    probe_capabilities,
    resolve,
)
from wanrt.testing import Tolerance, assert_close

TOLERANCES_MODEL = Tolerance(atol=1e-4, rtol=1e-4, rel=2e-5)

attention_mod = sys.modules["wanrt.ops.attention"]  # the module (wanrt.ops.attention is also the function)
ALL_PKGS = frozenset({"triton", "flash_attn", "flash_attn_interface", "sageattention", "xformers"})


def caps(device="cuda", dtype=torch.bfloat16, head_dim=128, sm=(9, 0), packages=ALL_PKGS, **kw):
    return Capabilities(device, dtype, head_dim, sm if device == "cuda" else None, packages=frozenset(packages), **kw)


# ------------------------------------------------------------------------------ resolve (pure)


@pytest.mark.parametrize("c, expected", [
    (caps(), "flash-attn"),  # Hopper + FA3: fastest published
    (caps(packages={"triton", "flash_attn"}), "triton"),  # Hopper without FA3: ours before FA2
    (caps(sm=(8, 0), packages={"triton", "flash_attn"}), "flash-attn"),  # Ampere: FA2 first
    (caps(sm=(8, 9), packages={"triton"}), "triton"),
    (caps(packages=set()), "sdpa"),  # no optional package at all
    (caps(sm=(7, 5), packages={"triton", "flash_attn", "xformers"}), "sdpa"),  # Turing: triton/FA need sm80
    (caps(device="cpu"), "sdpa"),
    (caps(device="cpu", interpreter=True), "sdpa"),  # the interpreter is never picked unasked
    (caps(dtype=torch.float32, packages={"flash_attn", "xformers", "sageattention"}), "sdpa"),  # half-only libs
    (caps(dtype=torch.float32), "triton"),
    (caps(head_dim=512), "sdpa"),
    (caps(packages={"sageattention"}), "sdpa"),  # quantized: never automatic
])
def test_auto_picks_fastest_eligible(c, expected):
    assert resolve("auto", c) == expected


def test_auto_with_mask_skips_backends_that_cannot_mask():
    c = caps(sm=(7, 5), packages={"xformers", "sageattention"})
    assert resolve("auto", c) == "sdpa"
    assert ineligibility("xformers", c) is None
    masked = caps(sm=(7, 5), packages={"xformers"}, needs_mask=True)
    assert "key-padding mask" in ineligibility("xformers", masked)
    assert resolve("auto", masked) == "sdpa"


@pytest.mark.parametrize("name, pkg_hint", [
    ("flash-attn", "pip install 'wanrt[flash]'"),
    ("sageattention", "pip install 'wanrt[sage]'"),
    ("xformers", "pip install 'wanrt[xformers]'"),
    ("triton", "pip install triton"),
])
def test_explicit_missing_package_raises_install_hint(name, pkg_hint):
    with pytest.raises(BackendUnavailableError) as err:
        resolve(name, caps(packages=set()))
    msg = str(err.value)
    assert repr(name) in msg and pkg_hint in msg
    assert "Available here: eager, sdpa" in msg


def test_explicit_backend_that_would_drop_a_mask_is_refused():
    with pytest.raises(BackendUnavailableError, match="cannot honour a key-padding mask"):
        resolve("sageattention", caps(needs_mask=True))
    with pytest.raises(BackendUnavailableError, match="cannot honour a key-padding mask"):
        resolve("xformers", caps(needs_mask=True))
    for name in ("eager", "sdpa", "triton", "flash-attn"):
        assert resolve(name, caps(needs_mask=True)) == name


@pytest.mark.parametrize("name, c, reason", [
    ("flash-attn", caps(dtype=torch.float32), "does not take torch.float32"),
    ("flash-attn", caps(sm=(7, 5)), "compute capability >= 8.0"),
    ("triton", caps(device="cpu"), "TRITON_INTERPRET=1"),
    ("sageattention", caps(head_dim=96), "head_dim 96"),
    ("xformers", caps(device="cpu"), "runs on cuda, not cpu"),
])
def test_explicit_ineligible_reasons(name, c, reason):
    with pytest.raises(BackendUnavailableError, match=reason.replace("(", r"\(").replace(".", r"\.")):
        resolve(name, c)


def test_explicit_sageattention_is_allowed_when_asked():
    assert resolve("sageattention", caps()) == "sageattention"
    assert resolve("triton", caps(device="cpu", interpreter=True)) == "triton"


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'magic'"):
        resolve("magic", caps())


def test_plan_fused_ops_follow_the_attention_backend():
    assert plan("eager", caps()) == OpsPlan("eager", "eager")
    assert plan("sdpa", caps()) == OpsPlan("sdpa", "triton")  # CUDA + triton: fused kernels around SDPA
    assert plan("sdpa", caps(device="cpu")) == OpsPlan("sdpa", "eager")
    assert plan("triton", caps(device="cpu", interpreter=True)) == OpsPlan("triton", "triton")
    assert plan("sdpa", caps(device="cpu", interpreter=True), fused="triton") == OpsPlan("sdpa", "triton")
    assert plan("sdpa", caps(packages={"flash_attn"})) == OpsPlan("sdpa", "eager")  # no triton installed
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        plan("sdpa", caps(device="cpu"), fused="triton")
    with pytest.raises(ValueError, match="fused backend"):
        OpsPlan("sdpa", "cuda")
    assert OpsPlan("sdpa", "triton").name == "sdpa+triton" and OpsPlan("triton", "triton").name == "triton"


def test_auto_logs_its_choice(caplog):
    with caplog.at_level(logging.INFO, logger="wanrt"):
        plan("auto", caps(packages={"triton"}))
    assert "backend 'auto' resolved to triton" in caplog.text


def test_probe_capabilities_on_this_machine():
    c = probe_capabilities("cpu", torch.float32, 64)
    assert c.device_type == "cpu" and c.sm is None and c.head_dim == 64
    assert ("triton" in c.packages) == (importlib.util.find_spec("triton") is not None)
    assert resolve("auto", c) == "sdpa"


def test_cli_backend_choices_match_registry():
    from wanrt.cli import BACKEND_CHOICES

    assert tuple(BACKEND_CHOICES) == BACKEND_NAMES
    assert set(ATTENTION_BACKENDS) | {"auto"} == set(BACKEND_NAMES)


# ------------------------------------------------------------------------------ eager vs sdpa


def _qkv(b=2, sq=19, sk=23, n=3, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, n, d, generator=g).to(dtype) for s in (sq, sk, sk))


@pytest.mark.parametrize("k_lens", [None, [23, 5]])
def test_eager_and_sdpa_agree(k_lens):
    q, k, v = _qkv()
    lens = None if k_lens is None else torch.tensor(k_lens)
    ref = attention(q, k, v, k_lens=lens, backend="eager")
    assert_close(attention(q, k, v, k_lens=lens, backend="sdpa"), ref, name="sdpa")
    # masked keys have no influence
    if lens is not None:
        k2, v2 = k.clone(), v.clone()
        k2[1, 5:] = 1e3
        v2[1, 5:] = -7.0
        assert_close(attention(q, k2, v2, k_lens=lens, backend="eager"), ref, name="eager masked")


def test_eager_attention_chunks_queries(monkeypatch):
    q, k, v = _qkv(sq=37)
    ref = attention(q, k, v, backend="eager")
    monkeypatch.setattr(attention_mod, "EAGER_CHUNK_ELEMENTS", 1)  # one query row per chunk
    assert_close(attention(q, k, v, backend="eager"), ref, name="chunked")


def test_attention_unknown_backend():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="cudnn")


# ------------------------------------------------------------------------------ library adapters


def _install_fake(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, val in attrs.items():
        setattr(mod, k, val)
    monkeypatch.setitem(sys.modules, name, mod)
    attention_mod._checked_import.cache_clear()
    return mod


@pytest.fixture(autouse=True)
def _clear_import_cache():
    yield
    attention_mod._checked_import.cache_clear()


def _sdpa_bshd(q, k, v, scale):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=scale).transpose(1, 2)


def test_flash_attn_adapter_dense_and_varlen(monkeypatch):
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append(("dense", q.shape, dropout_p, causal))
        assert q.stride(-1) == 1 and q.shape[-1] == 16  # [B, S, H, D], D last
        return _sdpa_bshd(q, k, v, softmax_scale)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        calls.append(("varlen", tuple(cu_k.tolist()), max_k))
        outs = []
        for i in range(len(cu_q) - 1):
            qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
            outs.append(_sdpa_bshd(qi[None], ki[None], vi[None], softmax_scale)[0])
        return torch.cat(outs)

    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # no FA3: import raises ImportError
    _install_fake(monkeypatch, "flash_attn", flash_attn_func=flash_attn_func,
                  flash_attn_varlen_func=flash_attn_varlen_func)
    q, k, v = _qkv()
    assert_close(attention(q, k, v, backend="flash-attn"), attention(q, k, v, backend="eager"), name="fa dense")
    lens = torch.tensor([23, 6])
    assert_close(attention(q, k, v, k_lens=lens, backend="flash-attn"),
                 attention(q, k, v, k_lens=lens, backend="eager"), name="fa varlen")
    assert calls[0] == ("dense", q.shape, 0.0, False)
    assert calls[1] == ("varlen", (0, 23, 29), 23)


def test_flash_attn3_adapter_takes_tuple_outputs(monkeypatch):
    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        return _sdpa_bshd(q, k, v, softmax_scale), torch.zeros(1)  # FA3 returns (out, lse)

    _install_fake(monkeypatch, "flash_attn_interface", flash_attn_func=flash_attn_func)
    q, k, v = _qkv()
    assert_close(attention(q, k, v, backend="flash-attn"), attention(q, k, v, backend="eager"), name="fa3")


def test_sage_and_xformers_adapters_and_mask_refusal(monkeypatch):
    seen = {}

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
        seen["sage"] = (tensor_layout, is_causal)
        return _sdpa_bshd(q, k, v, sm_scale)

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        seen["xformers"] = (attn_bias, p)
        return _sdpa_bshd(q, k, v, scale)

    _install_fake(monkeypatch, "sageattention", sageattn=sageattn)
    xf = _install_fake(monkeypatch, "xformers")
    xf.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    _install_fake(monkeypatch, "xformers.ops", memory_efficient_attention=memory_efficient_attention)
    q, k, v = _qkv()
    ref = attention(q, k, v, backend="eager")
    full = torch.tensor([23, 30])  # a mask that keeps every key may be dropped
    for name in ("sageattention", "xformers"):
        assert_close(attention(q, k, v, backend=name), ref, name=name)
        assert_close(attention(q, k, v, k_lens=full, backend=name), ref, name=name + " no-op mask")
        with pytest.raises(BackendUnavailableError, match="cannot honour a key-padding mask"):
            attention(q, k, v, k_lens=torch.tensor([23, 4]), backend=name)
    assert seen == {"sage": ("NHD", False), "xformers": (None, 0.0)}


def test_missing_library_at_call_time(monkeypatch):
    for pkg in ("flash_attn", "flash_attn_interface"):
        monkeypatch.setitem(sys.modules, pkg, None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    attention_mod._checked_import.cache_clear()
    q, k, v = _qkv()
    with pytest.raises(BackendUnavailableError, match=r"pip install 'wanrt\[flash\]'"):
        attention(q, k, v, backend="flash-attn")


# ------------------------------------------------------------------------------ Triton self-check


def test_failed_self_check_makes_triton_ineligible():
    c = caps(packages={"triton"}, triton_failed="CompilationError: out of shared memory")
    assert resolve("auto", c) == "sdpa"
    assert plan("auto", c) == OpsPlan("sdpa", "eager")
    with pytest.raises(BackendUnavailableError, match="failed its self-check on this GPU .*shared memory"):
        resolve("triton", c)
    with pytest.raises(BackendUnavailableError, match="self-check"):
        plan("sdpa", c, fused="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_self_check_passes_in_the_interpreter(dtype):
    from wanrt.kernels.selfcheck import triton_self_check

    assert triton_self_check.__wrapped__(torch.device("cpu"), dtype, 16) is None


def test_self_check_reports_a_wrong_kernel(monkeypatch):
    from wanrt.kernels import modnorm, qk_norm_rope
    from wanrt.kernels.selfcheck import triton_self_check

    real = qk_norm_rope.norm_rope
    monkeypatch.setattr(qk_norm_rope, "norm_rope", lambda *a: real(*a) * 1.01)
    reason = triton_self_check.__wrapped__(torch.device("cpu"), torch.float32, 16)
    assert reason is not None and reason.startswith("qk_norm_rope:") and "worst at index" in reason
    monkeypatch.setattr(qk_norm_rope, "norm_rope", real)

    def boom(*a):
        raise RuntimeError("PTX assembly failed\nmore lines")

    monkeypatch.setattr(modnorm, "gated_residual_layer_norm", boom)
    assert triton_self_check.__wrapped__(torch.device("cpu"), torch.float32, 16) == "RuntimeError: PTX assembly failed"


def test_probe_does_not_self_check_off_cuda(monkeypatch):
    import wanrt.kernels.selfcheck as sc

    monkeypatch.setattr(sc, "triton_self_check", lambda *a: pytest.fail("self-check ran on the CPU"))
    assert probe_capabilities("cpu", torch.bfloat16, 128).triton_failed is None


# ------------------------------------------------------------------------------ generate() per library backend


def _fake_libraries(monkeypatch):
    """Stand-ins for flash-attn (FA2), sageattention and xformers with their real call signatures."""
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    _install_fake(monkeypatch, "flash_attn",
                  flash_attn_func=lambda q, k, v, dropout_p=0.0, softmax_scale=None, causal=False:
                  _sdpa_bshd(q, k, v, softmax_scale))
    _install_fake(monkeypatch, "sageattention",
                  sageattn=lambda q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None:
                  _sdpa_bshd(q, k, v, sm_scale))
    mea = types.SimpleNamespace(memory_efficient_attention=lambda q, k, v, attn_bias=None, p=0.0, scale=None:
                                _sdpa_bshd(q, k, v, scale))
    _install_fake(monkeypatch, "xformers").ops = mea
    _install_fake(monkeypatch, "xformers.ops", memory_efficient_attention=mea.memory_efficient_attention)


@pytest.mark.parametrize("name", ["flash-attn", "sageattention", "xformers"])
def test_generate_with_library_backends(monkeypatch, tiny_official, name):
    """A whole generate() through each library adapter (stand-in packages computing exact attention on the
    CPU, where the real ones cannot run) equals the eager engine's latents."""
    import wanrt

    kw = dict(seed=3, num_inference_steps=2, num_frames=5, height=32, width=48, progress=False)
    engine = wanrt.Engine("tiny", tiny_official, device="cpu", precision="fp32", backend="eager")
    ref = engine.generate("a corgi", **kw).latents
    _fake_libraries(monkeypatch)
    engine.transformer.set_backend(OpsPlan(name, "eager"))  # the real packages are CUDA-only: plan by hand
    got = engine.generate("a corgi", **kw).latents
    assert_close(got, ref, name=f"latents via {name}", tol=TOLERANCES_MODEL)
