"""The backend registry: pure resolution with fake capabilities, error texts, mask refusal; the library adapters'
plumbing (layout, scale, varlen masks) checked with stand-in packages that refuse what the real libraries refuse
(CPU tensors, dtypes, head dims, GPU generations) and compute in half precision; the registry checked never to admit
what a library refuses; and a whole bf16 generate() per library backend on a pretended GPU."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import itertools
import json
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
    resolve,
)
from wanrt.ops.selfcheck import probe_capabilities
from wanrt.testing import Tolerance, assert_close, relative_error

attention_mod = sys.modules["wanrt.ops.attention"]  # the module (wanrt.ops.attention is also the function)
selfcheck_mod = sys.modules["wanrt.ops.selfcheck"]  # probe_capabilities and the Triton self-check
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
    c = caps(sm=(7, 5), dtype=torch.float16, packages={"xformers", "sageattention"})  # xformers: no bf16 before sm 8.0
    assert resolve("auto", c) == "sdpa"
    assert ineligibility("xformers", c) is None
    masked = caps(sm=(7, 5), dtype=torch.float16, packages={"xformers"}, needs_mask=True)
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
    ("xformers", caps(sm=(7, 5)), "compute capability >= 8.0 for torch.bfloat16 inputs, this GPU has 7.5"),
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
#
# Stand-ins for flash-attn (FA2 ``flash_attn`` and FA3 ``flash_attn_interface``), sageattention and xformers with
# the real call signatures, tensor layouts and refusals, computing as the real kernels do: scores and softmax in
# float32, the probabilities rounded to a half dtype for the P·V product, the output in the input dtype (SageAttention
# also quantizes Q and K to int8 per block and computes P·V in fp16). Their refusals follow the libraries' sources:
#
# * flash_attn (FA2, flash_api.cpp ``mha_fwd``): RuntimeError for dtypes other than fp16/bf16, tensors off CUDA, a
#   last dim that is not contiguous, head dim > 256, GPUs before Ampere; the Python wrapper zero-pads the head dim to
#   a multiple of 8, so that is accepted. ``flash_attn_varlen_func`` also wants int32 ``cu_seqlens`` on the GPU.
# * flash_attn_interface (FA3, hopper/flash_api.cpp): as FA2 (fp8 e4m3 also taken), but no padding: a head dim that is
#   not a multiple of 8 is a RuntimeError; returns ``(out, softmax_lse)``.
# * sageattention (core.py ``sageattn`` and its kernels): AssertionError off CUDA or for dtypes other than fp16/bf16 or a
#   non-contiguous last dim, ValueError for head dim > 128 (smaller ones are zero-padded to 64 or 128) or an unknown
#   ``tensor_layout`` ("HND" = [B, H, S, D], the default, or "NHD" = [B, S, H, D]).
# * xformers (fmha dispatch, cutlassF): NotImplementedError "No operator found" off CUDA, for dtypes other than
#   fp16/bf16/fp32, for bf16 before Ampere ("bf16 is only supported on A100+ GPUs"), or a head dim not a multiple of the
#   GEMM alignment (8 for fp16/bf16; 4 for fp32 from sm 8.0). fp32 on CUDA is accepted (cutlassF computes it in fp32):
#   the registry is stricter than xformers there.
#
# There is no CUDA here, so a test that wants a stand-in to run asks for the ``pretend_gpu`` fixture: the stand-ins
# then take CPU tensors for GPU tensors, and everything else they check still holds.


class FakeGPU:
    """The machine the stand-in libraries believe they run on."""

    cpu_is_cuda = False  # True only under the pretend_gpu fixture
    sm = (9, 0)


@pytest.fixture
def pretend_gpu(monkeypatch):
    monkeypatch.setattr(FakeGPU, "cpu_is_cuda", True)


def _on_gpu(*ts):
    return all(t.is_cuda or (FakeGPU.cpu_is_cuda and t.device.type == "cpu") for t in ts)


def _softmax_pv(q, k, v, scale, p_dtype):
    """Attention of ``[B, H, S, D]`` tensors as flash kernels compute it: float32 scores, max-subtracted exponentials,
    the probabilities rounded to ``p_dtype`` for the P·V product (tensor-core inputs) with a float32 sum, normalised
    by the float32 row sum at the end. Returns float32."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    p = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return (p.to(p_dtype).float() @ v.float()) / p.sum(dim=-1, keepdim=True)


def _int8_blocks(x, block):
    """SageAttention's per-block int8 quantization of ``[B, H, S, D]`` along S (one scale per block), dequantized."""
    n = x.shape[2]
    xb = F.pad(x.float(), (0, 0, 0, -n % block)).unflatten(2, (-1, block))  # [B, H, nb, block, D]
    scale = xb.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12) / 127
    return ((xb / scale).round().clamp(-127, 127) * scale).flatten(2, 3)[:, :, :n]


def _inference_only(dropout_p=0.0, causal=False):
    assert dropout_p == 0.0 and not causal, "wanrt asked for dropout or a causal mask"


def _flash_checks(q, k, v, *, fa3=False):
    if FakeGPU.sm < (8, 0):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
    dtypes = (torch.float16, torch.bfloat16, torch.float8_e4m3fn) if fa3 else (torch.float16, torch.bfloat16)
    if q.dtype not in dtypes:
        raise RuntimeError("FlashAttention only supports fp16, bf16, and fp8_e4m3 data type" if fa3
                           else "FlashAttention only support fp16 and bf16 data type")
    if not (k.dtype == v.dtype == q.dtype):
        raise RuntimeError("query and key must have the same dtype")
    if not _on_gpu(q, k, v):
        raise RuntimeError("Input tensor must be on CUDA device")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise RuntimeError("Input tensor must have contiguous last dimension")
    d = q.shape[-1]
    if fa3 and d % 8:
        raise RuntimeError("head_size should be a multiple of 8")
    if d > 256:
        raise RuntimeError("FlashAttention forward only supports head dimension at most 256")


def _flash_dense(q, k, v, softmax_scale):  # [B, S, H, D], FA2 pads the head dim: the math is unchanged
    if q.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise RuntimeError(f"q, k, v must be [B, S, H, D]: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = _softmax_pv(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, q.dtype)
    return out.to(q.dtype).transpose(1, 2).contiguous()


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale):  # q [total_q, H, D], k/v [total_k, H, D]
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dtype != torch.int32:
            raise RuntimeError(f"{name} must have dtype int32")
        if not _on_gpu(cu):
            raise RuntimeError(f"{name} must be on CUDA device")
    if q.ndim != 3 or not isinstance(max_q, int) or not isinstance(max_k, int):
        raise RuntimeError("varlen q must be [total, H, D] and max_seqlen Python ints")
    bq, bk = cu_q.tolist(), cu_k.tolist()  # a stand-in may read them; the kernel only trusts max_seqlen_*
    assert len(bq) == len(bk) and bq[-1] == q.shape[0] and bk[-1] == k.shape[0], (bq, bk)
    assert max(b - a for a, b in itertools.pairwise(bq)) <= max_q
    assert max(b - a for a, b in itertools.pairwise(bk)) <= max_k
    outs = [_flash_dense(q[a:b][None], k[c:d][None], v[c:d][None], softmax_scale)[0]
            for (a, b), (c, d) in zip(itertools.pairwise(bq), itertools.pairwise(bk), strict=True)]
    return torch.cat(outs)


def _fake_flash_attn(calls):
    """``flash_attn`` 2.x: ``flash_attn_func`` and ``flash_attn_varlen_func``."""

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        _flash_checks(q, k, v)
        _inference_only(dropout_p, causal)
        calls.append(("flash_attn_func", q.dtype, tuple(q.shape), softmax_scale))
        return _flash_dense(q, k, v, softmax_scale)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        _flash_checks(q, k, v)
        _inference_only(dropout_p, causal)
        calls.append(("flash_attn_varlen_func", tuple(cu_seqlens_k.tolist()), max_seqlen_k))
        return _flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)

    return {"flash_attn_func": flash_attn_func, "flash_attn_varlen_func": flash_attn_varlen_func}


def _fake_flash_attn3(calls):
    """``flash_attn_interface`` (FA3): no dropout argument, returns ``(out, softmax_lse)``."""

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), **kw):
        _flash_checks(q, k, v, fa3=True)
        _inference_only(causal=causal)
        calls.append(("fa3 flash_attn_func", q.dtype, tuple(q.shape), softmax_scale))
        return _flash_dense(q, k, v, softmax_scale), torch.zeros(q.shape[0], q.shape[2], q.shape[1])

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                               seqused_k=None, softmax_scale=None, causal=False, **kw):
        _flash_checks(q, k, v, fa3=True)
        _inference_only(causal=causal)
        calls.append(("fa3 flash_attn_varlen_func", tuple(cu_seqlens_k.tolist()), max_seqlen_k))
        out = _flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
        return out, torch.zeros(q.shape[1], q.shape[0])

    return {"flash_attn_func": flash_attn_func, "flash_attn_varlen_func": flash_attn_varlen_func}


def _fake_sageattention(calls):
    """``sageattention.sageattn`` (SageAttention 2, the sm80 kernel): int8 Q and K per block (smoothed K), fp16 P·V."""

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
        if FakeGPU.sm < (8, 0):
            raise ValueError(f"Unsupported CUDA architecture: sm{FakeGPU.sm[0]}{FakeGPU.sm[1]}")
        assert _on_gpu(q, k, v), "Input tensors must be on cuda."
        assert q.dtype in (torch.float16, torch.bfloat16), \
            "Input tensors must be in dtype of torch.float16 or torch.bfloat16"
        assert q.dtype == k.dtype == v.dtype, "All tensors must have the same dtype."
        d = q.shape[-1]
        if d > 128:
            raise ValueError(f"Unsupported head_dim: {d}")
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "Last dim of qkv must be contiguous."
        if tensor_layout not in ("HND", "NHD"):
            raise ValueError(f"Unknown tensor layout: {tensor_layout}")
        assert not is_causal and not return_lse, "wanrt asked for a causal mask or the LSE"
        calls.append(("sageattn", q.dtype, tuple(q.shape), tensor_layout, sm_scale))
        if tensor_layout == "NHD":  # [B, S, H, D] -> [B, H, S, D]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scale = d ** -0.5 if sm_scale is None else sm_scale
        km = k.float().mean(dim=2, keepdim=True)  # smoothing K: a per-query constant, softmax ignores it
        qd, kd = _int8_blocks(q, 128), _int8_blocks(k.float() - km, 64)
        out = _softmax_pv(qd, kd, v.to(torch.float16), scale, torch.float16).to(q.dtype)
        return out.transpose(1, 2) if tensor_layout == "NHD" else out

    return {"sageattn": sageattn}


def _fake_xformers(calls):
    """``xformers.ops.memory_efficient_attention`` on [B, M, H, K] tensors, dispatched as at sm >= 8.0."""

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None,
                                   output_dtype=None):
        reasons = []
        if not _on_gpu(query, key, value):
            reasons.append(f"device={query.device.type} (supported: {{'cuda'}})")
        if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype={query.dtype} (supported: {{torch.float16, torch.bfloat16, torch.float32}})")
        else:
            if query.dtype == torch.bfloat16 and FakeGPU.sm < (8, 0):
                reasons.append("bf16 is only supported on A100+ GPUs")
            align = 8 if query.dtype != torch.float32 else 4 if FakeGPU.sm >= (8, 0) else 1  # GEMM alignment
            for name, t in (("query", query), ("value", value)):
                if t.shape[-1] % align:
                    reasons.append(f"{name}.shape[-1] % {align} != 0")
                if t.stride(-1) > 1:
                    reasons.append(f"{name}.stride(-1) > 1")
        if query.ndim != 4:
            reasons.append("query must be [B, M, H, K]")
        if reasons:
            raise NotImplementedError(
                "No operator found for `memory_efficient_attention_forward` with inputs:\n"
                f"     query : shape={tuple(query.shape)} ({query.dtype})\n"
                "`cutlassF` is not supported because:\n    " + "\n    ".join(reasons))
        assert attn_bias is None and p == 0.0, "wanrt asked for a bias or dropout"
        calls.append(("memory_efficient_attention", query.dtype, tuple(query.shape), scale))
        return _flash_dense(query, key, value, scale)  # P in fp16/bf16 (tensor cores) or fp32: as the kernel

    return {"memory_efficient_attention": memory_efficient_attention}


def _install_fake(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    for k, val in attrs.items():
        setattr(mod, k, val)
    monkeypatch.setitem(sys.modules, name, mod)
    attention_mod._checked_import.cache_clear()
    return mod


def _fake_libraries(monkeypatch, *, fa3=False):
    """Install every stand-in (FA3 as well when ``fa3``, else importing flash_attn_interface fails); returns the
    list their calls are recorded in."""
    calls = []
    if fa3:
        _install_fake(monkeypatch, "flash_attn_interface", **_fake_flash_attn3(calls))
    else:
        monkeypatch.setitem(sys.modules, "flash_attn_interface", None)  # import raises ImportError
    _install_fake(monkeypatch, "flash_attn", **_fake_flash_attn(calls))
    _install_fake(monkeypatch, "sageattention", **_fake_sageattention(calls))
    xops = _fake_xformers(calls)
    _install_fake(monkeypatch, "xformers").ops = types.SimpleNamespace(**xops)
    _install_fake(monkeypatch, "xformers.ops", **xops)
    return calls


FAKE_PACKAGES = frozenset({"flash_attn", "sageattention", "xformers"})


@pytest.fixture(autouse=True)
def _clear_import_cache():
    yield
    attention_mod._checked_import.cache_clear()


# Stand-in vs the eager reference (float32 math on the same bf16 inputs, one rounding to bf16) on _qkv(dtype=bf16):
# the flash-style kernels differ by the bf16 rounding of P (measured rel 2.2e-3, max abs 7.8e-3), SageAttention also
# by the int8 Q/K and fp16 V (measured rel 9.6e-3, max abs 2.0e-2). Bounds ~2x.
BF16_ADAPTER = Tolerance(atol=1.6e-2, rtol=2e-2, rel=5e-3)
BF16_SAGE = Tolerance(atol=4e-2, rtol=4e-2, rel=2e-2)


def test_flash_attn_adapter_dense_and_varlen(monkeypatch, pretend_gpu):
    calls = _fake_libraries(monkeypatch)
    q, k, v = _qkv(dtype=torch.bfloat16)
    out = attention(q, k, v, backend="flash-attn")
    assert out.dtype == torch.bfloat16
    assert_close(out, attention(q, k, v, backend="eager"), name="fa dense", tol=BF16_ADAPTER)
    lens = torch.tensor([23, 6])
    assert_close(attention(q, k, v, k_lens=lens, backend="flash-attn"),
                 attention(q, k, v, k_lens=lens, backend="eager"), name="fa varlen", tol=BF16_ADAPTER)
    assert calls == [("flash_attn_func", torch.bfloat16, tuple(q.shape), 16 ** -0.5),
                     ("flash_attn_varlen_func", (0, 23, 29), 23)]


def test_flash_attn3_adapter_takes_tuple_outputs(monkeypatch, pretend_gpu):
    calls = _fake_libraries(monkeypatch, fa3=True)
    q, k, v = _qkv(dtype=torch.bfloat16)
    assert_close(attention(q, k, v, backend="flash-attn"), attention(q, k, v, backend="eager"), name="fa3",
                 tol=BF16_ADAPTER)
    lens = torch.tensor([7, 23])
    assert_close(attention(q, k, v, k_lens=lens, backend="flash-attn"),
                 attention(q, k, v, k_lens=lens, backend="eager"), name="fa3 varlen", tol=BF16_ADAPTER)
    assert [c[0] for c in calls] == ["fa3 flash_attn_func", "fa3 flash_attn_varlen_func"]  # FA3 preferred


def test_sage_and_xformers_adapters_and_mask_refusal(monkeypatch, pretend_gpu):
    calls = _fake_libraries(monkeypatch)
    q, k, v = _qkv(dtype=torch.bfloat16)
    ref = attention(q, k, v, backend="eager")
    full = torch.tensor([23, 30])  # a mask that keeps every key may be dropped
    for name, tol in (("sageattention", BF16_SAGE), ("xformers", BF16_ADAPTER)):
        assert_close(attention(q, k, v, backend=name), ref, name=name, tol=tol)
        assert_close(attention(q, k, v, k_lens=full, backend=name), ref, name=name + " no-op mask", tol=tol)
        with pytest.raises(BackendUnavailableError, match="cannot honour a key-padding mask"):
            attention(q, k, v, k_lens=torch.tensor([23, 4]), backend=name)
    scale = 16 ** -0.5
    assert calls == [("sageattn", torch.bfloat16, tuple(q.shape), "NHD", scale)] * 2 + \
        [("memory_efficient_attention", torch.bfloat16, tuple(q.shape), scale)] * 2


def test_stand_ins_compute_in_half_precision(monkeypatch, pretend_gpu):
    """The stand-ins carry the rounding of half-precision kernels: an exact attention rounded once to bf16 would equal
    the eager reference (rel 0.0); theirs differ by the bf16 P (measured 2.2e-3), SageAttention's more (9.6e-3)."""
    _fake_libraries(monkeypatch)
    q, k, v = _qkv(dtype=torch.bfloat16)
    ref = attention(q, k, v, backend="eager")
    err = {n: relative_error(attention(q, k, v, backend=n), ref) for n in ("flash-attn", "xformers", "sageattention")}
    assert 1e-3 < err["flash-attn"] < 5e-3 and 1e-3 < err["xformers"] < 5e-3, err
    assert err["sageattention"] > 2 * err["flash-attn"], err


@pytest.mark.parametrize("name, fa3, dtype, head_dim, sm, error, match", [
    ("flash-attn", False, torch.float32, 64, (9, 0), RuntimeError, "FlashAttention only support fp16 and bf16"),
    ("flash-attn", False, torch.bfloat16, 264, (9, 0), RuntimeError, "head dimension at most 256"),
    ("flash-attn", False, torch.float16, 64, (7, 5), RuntimeError, "only supports Ampere GPUs or newer"),
    ("flash-attn", True, torch.float32, 64, (9, 0), RuntimeError, "only supports fp16, bf16, and fp8_e4m3"),
    ("flash-attn", True, torch.bfloat16, 36, (9, 0), RuntimeError, "head_size should be a multiple of 8"),
    ("flash-attn", True, torch.bfloat16, 264, (9, 0), RuntimeError, "head dimension at most 256"),
    ("sageattention", False, torch.float32, 64, (9, 0), AssertionError, "torch.float16 or torch.bfloat16"),
    ("sageattention", False, torch.bfloat16, 192, (9, 0), ValueError, "Unsupported head_dim: 192"),
    ("sageattention", False, torch.float16, 64, (7, 5), ValueError, "Unsupported CUDA architecture: sm75"),
    ("xformers", False, torch.float64, 64, (9, 0), NotImplementedError, "dtype=torch.float64"),
    ("xformers", False, torch.bfloat16, 36, (9, 0), NotImplementedError, r"query.shape\[-1\] % 8 != 0"),
    ("xformers", False, torch.float32, 34, (9, 0), NotImplementedError, r"query.shape\[-1\] % 4 != 0"),
    ("xformers", False, torch.bfloat16, 64, (7, 5), NotImplementedError, "bf16 is only supported on A100"),
])
def test_stand_ins_refuse_what_the_libraries_refuse(monkeypatch, pretend_gpu, name, fa3, dtype, head_dim, sm, error,
                                                    match):
    _fake_libraries(monkeypatch, fa3=fa3)
    monkeypatch.setattr(FakeGPU, "sm", sm)
    q, k, v = _qkv(b=1, sq=5, sk=7, n=2, d=head_dim, dtype=dtype)
    with pytest.raises(error, match=match):
        attention(q, k, v, backend=name)


@pytest.mark.parametrize("name, fa3, error, match", [
    ("flash-attn", False, RuntimeError, "must be on CUDA"),
    ("flash-attn", True, RuntimeError, "must be on CUDA"),
    ("sageattention", False, AssertionError, "must be on cuda"),
    ("xformers", False, NotImplementedError, "device=cpu"),
])
def test_stand_ins_refuse_cpu_tensors(monkeypatch, name, fa3, error, match):
    """Without the pretend_gpu fixture the stand-ins refuse this machine's tensors, as the libraries would."""
    _fake_libraries(monkeypatch, fa3=fa3)
    q, k, v = _qkv(d=64, dtype=torch.bfloat16)
    with pytest.raises(error, match=match):
        attention(q, k, v, backend=name)


@pytest.mark.parametrize("sm", [(7, 0), (7, 5), (8, 0), (9, 0)])
@pytest.mark.parametrize("fa3", [False, True])
def test_registry_never_admits_what_a_library_refuses(monkeypatch, pretend_gpu, fa3, sm):
    """Every (GPU, dtype, head_dim) on which the registry lets a library backend run is accepted by its stand-in
    (the registry may be stricter: xformers takes fp32, FA2 pads head dims, SageAttention pads small ones)."""
    _fake_libraries(monkeypatch, fa3=fa3)
    monkeypatch.setattr(FakeGPU, "sm", sm)
    admitted = []
    for name in ("flash-attn", "sageattention", "xformers"):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for d in (16, 24, 36, 64, 96, 128, 160, 192, 256, 264):
                c = Capabilities("cuda", dtype, d, sm, packages=FAKE_PACKAGES | {"flash_attn_interface"})
                if ineligibility(name, c) is None:
                    q, k, v = _qkv(b=1, sq=3, sk=4, n=1, d=d, dtype=dtype)
                    try:
                        attention(q, k, v, backend=name)
                    except Exception as e:  # noqa: BLE001 - reported with the case
                        pytest.fail(f"the registry admits {name} for {dtype}, head_dim {d} on sm {sm}; the library "
                                    f"refuses it: {type(e).__name__}: {e}")
                    admitted.append(name)
    # fp16/bf16 from Ampere: flash and xformers 8 head dims each, sage 64 and 128; before Ampere xformers fp16 only
    assert len(admitted) == (2 * (8 + 2 + 8) if sm >= (8, 0) else 8), admitted


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
    from wanrt.ops.selfcheck import triton_self_check

    assert triton_self_check.__wrapped__(torch.device("cpu"), dtype, 16) is None


def test_self_check_reports_a_wrong_kernel(monkeypatch):
    from wanrt.kernels import modnorm, qk_norm_rope
    from wanrt.ops.selfcheck import triton_self_check

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
    import wanrt.ops.selfcheck as sc

    monkeypatch.setattr(sc, "triton_self_check", lambda *a: pytest.fail("self-check ran on the CPU"))
    assert probe_capabilities("cpu", torch.bfloat16, 128).triton_failed is None


# ------------------------------------------------------------------------------ generate() per library backend

GEN = {"seed": 3, "num_inference_steps": 2, "num_frames": 5, "height": 32, "width": 48, "progress": False}


@pytest.fixture(scope="module")
def head_dim_64_checkpoint(tiny_official, tmp_path_factory):
    """The tiny checkpoint read with one attention head (head_dim 64 instead of 32; the same tensors): a head dim
    that the registry admits for every library backend (SageAttention: a multiple of 64)."""
    folder = tmp_path_factory.mktemp("tiny-one-head")
    for f in tiny_official.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((tiny_official / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_heads": 1}))
    return folder


@pytest.fixture(scope="module")
def sdpa_bf16_latents(head_dim_64_checkpoint):
    import wanrt

    engine = wanrt.Engine.from_pretrained(head_dim_64_checkpoint, device="cpu", precision="bf16", backend="sdpa")
    assert engine.transformer.config.head_dim == 64
    return engine.generate("a corgi", **GEN).latents


# Relative L2 error of the 2-step bf16 latents against the bf16 SDPA engine's (measured: flash-attn 4.5e-3, xformers
# 4.5e-3, sageattention 6.4e-3; the fp32 eager engine is 5.0e-3 away); bounds ~2x. A softmax scale 10% off gives
# 2.8e-2, a wrong layout fails outright.
GENERATE_REL = {"flash-attn": 9e-3, "xformers": 9e-3, "sageattention": 1.3e-2}


@pytest.mark.parametrize("name", ["flash-attn", "sageattention", "xformers"])
def test_generate_with_library_backends(monkeypatch, pretend_gpu, head_dim_64_checkpoint, sdpa_bf16_latents, name):
    """A whole bf16 generate() through each library adapter, the backend chosen by wanrt's registry for a (fake)
    CUDA GPU, with the DiT step replayed from a recorded graph (the adapters must be capture-safe), stays within
    bf16 error of the SDPA engine."""
    from test_cuda_graphs import FakeCapturer

    import wanrt
    from wanrt.sampling.loop import make_step_graphs

    calls = _fake_libraries(monkeypatch)
    monkeypatch.setattr(selfcheck_mod, "probe_capabilities",
                        lambda device, dtype, head_dim, needs_mask=False, **kw:
                        Capabilities("cuda", dtype, head_dim, FakeGPU.sm, needs_mask, FAKE_PACKAGES))
    engine = wanrt.Engine.from_pretrained(head_dim_64_checkpoint, device="cpu", precision="bf16", backend=name)
    assert engine.plan == OpsPlan(name, "eager")  # resolved by the registry, no Triton: eager fused ops
    cap = FakeCapturer(warmup=1)
    engine._graphs = make_step_graphs(engine.transformer, capturer=cap)
    v = engine.generate("a corgi", **GEN)
    # 2 steps x 2 CFG branches = 4 DiT calls of one shape: the first is captured (a warm-up run and the recorded
    # run call the library, 2 blocks x (self + cross) attention each), the other 3 replay without Python.
    assert v.stats["cuda_graphs"]["plain"] == {"captures": 1, "replays": 3, "evictions": 0, "fallbacks": 0,
                                               "eager_calls": 0}
    assert len(calls) == 2 * 2 * 2 and {c[1] for c in calls} == {torch.bfloat16}
    assert {c[2][2:] for c in calls} == {(1, 64)}  # [B, S, heads, head_dim] on every call
    rel = relative_error(v.latents, sdpa_bf16_latents)
    assert rel < GENERATE_REL[name], f"{name}: relative error {rel:.2e} vs the bf16 SDPA engine"
