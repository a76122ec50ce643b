"""Operator entry points used by wanrt's model code, and the backend registry.

Each op has one public entry point here and a pure-PyTorch twin with the same signature
(``*_eager``) that reproduces the official Wan2.1 numerics (docs/model-reference.md §2, §9).
Model code calls only the public names with the backends of its :class:`OpsPlan`
(:mod:`wanrt.ops.backends`): ``attention`` takes an attention backend (eager, sdpa, triton,
flash-attn, sageattention, xformers), the memory-bound ops a fused backend (eager or triton).

========================== ==================================== ==============================
op                         what                                 Triton kernel
========================== ==================================== ==============================
attention                  softmax attention, optional RoPE     kernels/attention.py
qk_norm_rope               full-dim QK RMSNorm + RoPE + cast    kernels/qk_norm_rope.py
rope_rotate                3-D RoPE on interleaved pairs        kernels/qk_norm_rope.py
rms_norm                   WanRMSNorm                           kernels/qk_norm_rope.py
modulated_layer_norm       LN, then x*(1+scale)+shift           kernels/modnorm.py
gated_residual             x + y*gate into the fp32 stream      kernels/modnorm.py
gated_residual_layer_norm  both in one pass                     kernels/modnorm.py
layer_norm                 WanLayerNorm                         (eager only)
========================== ==================================== ==============================
"""

from wanrt.ops.attention import attention, attention_eager
from wanrt.ops.backends import (
    ATTENTION_BACKENDS,
    BACKEND_NAMES,
    BackendUnavailableError,
    Capabilities,
    OpsPlan,
    plan,
    resolve,
)
from wanrt.ops.norms import (
    gated_residual,
    gated_residual_eager,
    gated_residual_layer_norm,
    gated_residual_layer_norm_eager,
    layer_norm,
    layer_norm_eager,
    modulated_layer_norm,
    modulated_layer_norm_eager,
    qk_norm_rope,
    qk_norm_rope_eager,
    rms_norm,
    rms_norm_eager,
)
from wanrt.ops.rope import (
    RopeTable,
    rope_apply,
    rope_axis_dims,
    rope_freqs,
    rope_grid,
    rope_rotate,
    rope_rotate_eager,
    rope_table,
)
from wanrt.ops.selfcheck import probe_capabilities

__all__ = [
    "ATTENTION_BACKENDS",
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "Capabilities",
    "OpsPlan",
    "RopeTable",
    "attention",
    "attention_eager",
    "gated_residual",
    "gated_residual_eager",
    "gated_residual_layer_norm",
    "gated_residual_layer_norm_eager",
    "layer_norm",
    "layer_norm_eager",
    "modulated_layer_norm",
    "modulated_layer_norm_eager",
    "plan",
    "probe_capabilities",
    "qk_norm_rope",
    "qk_norm_rope_eager",
    "resolve",
    "rms_norm",
    "rms_norm_eager",
    "rope_apply",
    "rope_axis_dims",
    "rope_freqs",
    "rope_grid",
    "rope_rotate",
    "rope_rotate_eager",
    "rope_table",
]
