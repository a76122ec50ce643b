"""Operator entry points used by wanrt's model code.

Each op has one public entry point here (``attention``, ``rope_apply`` / ``rope_rotate``,
``rms_norm``, ``layer_norm``) and a pure-PyTorch twin with the same signature
(``*_eager``) that reproduces the official Wan2.1 numerics (docs/wan21-reference.md §2, §9).
Model code calls only the public names, so fused backends (Triton kernels, flash-attn, ...)
can later be selected behind them by a backend registry without touching the models.
Today every entry point runs its eager implementation.
"""

from wanrt.ops.attention import attention, attention_eager
from wanrt.ops.norms import layer_norm, layer_norm_eager, rms_norm, rms_norm_eager
from wanrt.ops.rope import (
    rope_apply,
    rope_axis_dims,
    rope_freqs,
    rope_grid,
    rope_rotate,
    rope_rotate_eager,
)

__all__ = [
    "attention",
    "attention_eager",
    "layer_norm",
    "layer_norm_eager",
    "rms_norm",
    "rms_norm_eager",
    "rope_apply",
    "rope_axis_dims",
    "rope_freqs",
    "rope_grid",
    "rope_rotate",
    "rope_rotate_eager",
]
