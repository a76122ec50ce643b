"""What this machine can run: :func:`probe_capabilities`, and the quick run of wanrt's Triton kernels on the
target GPU against their eager twins that it includes (:func:`triton_self_check`).

``auto`` backend selection calls :func:`triton_self_check` once per (device, dtype, head_dim) in a
process before it lets the Triton kernels run a model: a kernel that fails to compile on this
GPU/Triton combination, or that disagrees with the reference, makes ``auto`` choose another backend
and log why, instead of failing (or silently drifting) in the middle of a generation. An explicit
``backend="triton"`` then raises ``BackendUnavailableError`` with the same reason, before any weight
is read. The check runs only on CUDA devices (the CPU interpreter is what CI tests directly).

It lives in :mod:`wanrt.ops`, above :mod:`wanrt.ops.backends`, because it tests the ops' fused kernels
(:mod:`wanrt.kernels`, imported lazily: Triton is optional) against their eager twins here: the pure
resolver (:func:`wanrt.ops.backends.plan`) imports none of it and acts on the verdict that
:func:`probe_capabilities` records (``Capabilities.triton_failed``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from wanrt.ops.attention import attention as attention_op
from wanrt.ops.backends import ATTENTION_BACKENDS, Capabilities
from wanrt.ops.norms import gated_residual_layer_norm_eager, qk_norm_rope_eager
from wanrt.ops.rope import rope_freqs, rope_table
from wanrt.testing import TOLERANCES, mismatch_report

log = logging.getLogger("wanrt")
_SELF_CHECKED = frozenset({torch.float16, torch.bfloat16, torch.float32})


def probe_capabilities(device: torch.device | str, dtype: torch.dtype, head_dim: int,
                       needs_mask: bool = False, *, self_check: bool = True) -> Capabilities:
    """Fill :class:`~wanrt.ops.backends.Capabilities` for ``device`` without importing any optional attention
    package.

    On a CUDA GPU with Triton (sm >= 8.0) and ``self_check``, wanrt's Triton kernels are run once per
    process and (device, dtype, head_dim) against their eager twins (a fraction of a second after
    compilation), and a failure is recorded in ``triton_failed``.
    """
    from wanrt.kernels._common import interpreting

    device = torch.device(device)
    sm = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    names = {p for b in ATTENTION_BACKENDS.values() for p in b.packages}
    installed = frozenset(p for p in names if importlib.util.find_spec(p) is not None)
    failed = None
    if self_check and device.type == "cuda" and "triton" in installed and sm >= (8, 0) and dtype in _SELF_CHECKED:
        failed = triton_self_check(str(device), dtype, head_dim)
        if failed is not None:
            log.warning("wanrt's Triton kernels failed their self-check on %s (%s): %s; no Triton kernel will "
                        "be picked automatically", torch.cuda.get_device_name(device), dtype, failed)
    return Capabilities(device.type, dtype, head_dim, sm, needs_mask, installed, interpreting(), failed)


@functools.cache
def triton_self_check(device: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Run every Triton kernel once on small random inputs; ``None`` when all match eager.

    Args:
        device: Device string (``"cuda:0"``; CPU only under ``TRITON_INTERPRET=1``).
        dtype: Compute dtype of the model (bf16, fp16 or fp32).
        head_dim: Attention head dim of the model.

    Returns:
        ``None``, or a one-line reason: the exception a kernel raised, or its mismatch report.
    """
    try:
        return _run(torch.device(device), dtype, head_dim)
    except Exception as e:  # noqa: BLE001 - any failure makes the kernels ineligible, with its reason
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _run(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    from wanrt.kernels import attention as attn_kernel  # lazy: Triton is optional
    from wanrt.kernels import modnorm, qk_norm_rope

    g = torch.Generator(device="cpu").manual_seed(0)
    heads, grid = 2, (2, 5, 7)
    seq = grid[0] * grid[1] * grid[2] + 3  # 3 unrotated padding tokens
    dim = heads * head_dim
    tol = TOLERANCES[dtype]

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    rope = rope_table(grid, rope_freqs(head_dim)).to(device)
    x, w = rand(1, seq, dim), 1 + 0.1 * rand(dim, dt=torch.float32)
    got = qk_norm_rope.norm_rope(x, w, 1e-6, rope.cos, rope.sin, heads, dtype, "bshd")
    ref = qk_norm_rope_eager(x, w, 1e-6, rope, num_heads=heads, out_dtype=dtype)
    if (report := mismatch_report(got, ref, tol, "qk_norm_rope")) is not None:
        return report

    res, y = rand(1, seq, dim, dt=torch.float32), rand(1, seq, dim)
    gate, shift, scale = (rand(1, 1, dim, dt=torch.float32) for _ in range(3))
    got = modnorm.gated_residual_layer_norm(res, y, gate, shift, scale, None, None, 1e-6, dtype)
    ref = gated_residual_layer_norm_eager(res, y, gate, 1e-6, shift=shift, scale=scale, out_dtype=dtype)
    for name, a, b in (("gated residual", got[0], ref[0]), ("modulated LayerNorm", got[1], ref[1])):
        if (report := mismatch_report(a, b, tol, name)) is not None:
            return report

    q, k, v = (rand(2, seq, heads, head_dim) for _ in range(3))
    lens = torch.tensor([seq, seq - 5], device=device)
    got = attn_kernel.attention(q, k, v, lens, rope.cos, rope.sin)
    ref = attention_op(q, k, v, k_lens=lens, rope=rope, backend="eager")
    return mismatch_report(got, ref, tol, "attention")
