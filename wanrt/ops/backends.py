"""The backend registry: which kernel runs every op of the model, named once in one plan.

A model-level backend name (``Engine(backend=...)``, ``load_transformer(backend=...)``) is resolved
once, when the model is built, into an :class:`OpsPlan`: an attention backend, a fused-ops backend
for the memory-bound ops around it (QK-norm + RoPE, modulated LayerNorm, gated residuals), the
backend of the 8-bit Linears' activation quantization (``quant``) and the VAE's convolutions
(``vae``). Nothing else chooses a kernel: the models read their plan.

Attention backends (:data:`ATTENTION_BACKENDS`):

==============  ===========================================  ======  =====  ==========
name            implementation                               mask    exact  install
==============  ===========================================  ======  =====  ==========
eager           explicit softmax(QK^T)V in float32 (chunked)  yes     yes    (built in)
sdpa            torch.nn.functional.scaled_dot_product_attn   yes     yes    (built in)
triton          wanrt's Triton kernel, RoPE fused (kernels/)  yes     yes    triton
flash-attn      flash_attn (FA2) or flash_attn_interface(FA3) yes     yes    wanrt[flash]
sageattention   sageattention.sageattn (int8 QK, fp8/16 PV)   no      no     wanrt[sage]
xformers        xformers.ops.memory_efficient_attention       no      yes    wanrt[xformers]
==============  ===========================================  ======  =====  ==========

``mask``: honours a key-padding mask (``k_lens``); a backend that cannot is not eligible when a
mask is needed, and raises at call time if given a real one, never dropping it silently.
``exact``: computes softmax attention at the input precision; ``auto`` never picks a quantized
(inexact) backend, request ``sageattention`` explicitly.

:func:`resolve` and :func:`plan` are pure functions of the request and a :class:`Capabilities` record,
so the choice is unit-tested on the CPU with made-up capabilities;
:func:`wanrt.ops.selfcheck.probe_capabilities` fills the record from the running machine (Triton
self-check included) without importing optional packages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("wanrt")

_HALF = frozenset({torch.float16, torch.bfloat16})
_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32})
_ANY = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (missing package, device, dtype, mask, ...)."""


@dataclass(frozen=True)
class AttentionBackend:
    """What an attention backend needs and offers.

    Attributes:
        name: Public name.
        packages: Import names of which at least one must be installed (``()`` for built-ins).
        install: pip requirement that provides them (for the error message).
        devices: Device types it runs on (``"cpu"``, ``"cuda"``); ``"interpreter"`` marks a Triton
            kernel that also runs on the CPU under ``TRITON_INTERPRET=1`` (explicit requests only).
        dtypes: Input dtypes it accepts.
        min_sm: Minimum CUDA compute capability, or ``None``.
        bf16_min_sm: Minimum CUDA compute capability for bfloat16 inputs, or ``None`` (same as ``min_sm``).
        max_head_dim: Largest head dim it supports.
        head_dim_multiple: The head dim must be a multiple of this.
        supports_mask: Honours a key-padding mask.
        exact: Full-precision softmax attention (False for quantized kernels).
        layout: The q/k/v memory layout it reads best: ``"bshd"`` or ``"bhsd"``.
    """

    name: str
    packages: tuple[str, ...] = ()
    install: str | None = None
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[torch.dtype] = _ANY
    min_sm: tuple[int, int] | None = None
    bf16_min_sm: tuple[int, int] | None = None
    max_head_dim: int = 1 << 30
    head_dim_multiple: int = 1
    supports_mask: bool = True
    exact: bool = True
    layout: str = "bshd"


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    b.name: b
    for b in (
        AttentionBackend("eager"),
        AttentionBackend("sdpa", layout="bhsd"),
        AttentionBackend("triton", packages=("triton",), install="triton (pip install triton)",
                         devices=frozenset({"cuda", "interpreter"}), dtypes=_FLOAT, min_sm=(8, 0),
                         max_head_dim=256, head_dim_multiple=2),
        AttentionBackend("flash-attn", packages=("flash_attn_interface", "flash_attn"),
                         install="pip install 'wanrt[flash]'", devices=frozenset({"cuda"}), dtypes=_HALF,
                         min_sm=(8, 0), max_head_dim=256, head_dim_multiple=8),
        AttentionBackend("sageattention", packages=("sageattention",), install="pip install 'wanrt[sage]'",
                         devices=frozenset({"cuda"}), dtypes=_HALF, min_sm=(8, 0), max_head_dim=128,
                         head_dim_multiple=64, supports_mask=False, exact=False),
        AttentionBackend("xformers", packages=("xformers",), install="pip install 'wanrt[xformers]'",
                         devices=frozenset({"cuda"}), dtypes=_HALF, min_sm=(7, 0), bf16_min_sm=(8, 0),
                         max_head_dim=256, head_dim_multiple=8, supports_mask=False),  # xformers: bf16 on A100+
    )
}

#: Backend names accepted by Engine/load_transformer: the attention backends plus "auto".
BACKEND_NAMES: tuple[str, ...] = (*ATTENTION_BACKENDS, "auto")

FUSED_BACKENDS = ("eager", "triton")
#: The 8-bit Linears' per-token activation quantization (and the int8 GEMM's rescale): torch, or
#: wanrt's Triton kernels (:mod:`wanrt.kernels.quant`, :mod:`wanrt.kernels.modnorm_quant`).
QUANT_BACKENDS = ("eager", "triton")
#: The VAE's causal convolutions: torch conv3d (the reference), wanrt's Triton causal conv3d, or a
#: TensorRT engine of the decoder step (built by the Engine; the encoder then runs eager).
VAE_BACKENDS = ("eager", "triton", "tensorrt")


@dataclass(frozen=True)
class Capabilities:
    """What the running machine offers a backend (a plain record: tests build fake ones).

    Attributes:
        device_type: ``"cpu"`` or ``"cuda"``.
        sm: CUDA compute capability ``(major, minor)``, ``None`` off CUDA.
        dtype: Attention input dtype (the DiT's compute dtype).
        head_dim: Attention head dim.
        needs_mask: A key-padding mask must be honoured.
        packages: Import names of the optional packages that are installed.
        interpreter: Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).
        triton_failed: Why wanrt's Triton kernels failed their self-check on this GPU
            (:func:`wanrt.ops.selfcheck.triton_self_check`), or ``None``. A failed check makes
            them ineligible (``auto`` then picks another backend and logs the reason; no Triton
            kernel runs: attention, fused ops, activation quantization, VAE conv).
    """

    device_type: str
    dtype: torch.dtype
    head_dim: int
    sm: tuple[int, int] | None = None
    needs_mask: bool = False
    packages: frozenset[str] = field(default_factory=frozenset)
    interpreter: bool = False
    triton_failed: str | None = None


def ineligibility(name: str, caps: Capabilities, *, for_auto: bool = False) -> str | None:
    """Why attention backend ``name`` cannot run under ``caps``; ``None`` when it can.

    ``for_auto`` adds the rules of automatic selection: no inexact backend, no Triton kernel on
    the CPU interpreter (correct but far too slow to pick unasked).
    """
    b = ATTENTION_BACKENDS[name]
    if b.packages and not any(p in caps.packages for p in b.packages):
        return f"needs the {' or '.join(b.packages)} package ({b.install})"
    device_ok = caps.device_type in b.devices or (
        caps.device_type == "cpu" and "interpreter" in b.devices and caps.interpreter and not for_auto)
    if not device_ok:
        where = sorted(d for d in b.devices if d != "interpreter")
        extra = " (or the CPU with TRITON_INTERPRET=1)" if "interpreter" in b.devices else ""
        return f"runs on {', '.join(where)}{extra}, not {caps.device_type}"
    if caps.dtype not in b.dtypes:
        return f"does not take {caps.dtype} inputs (takes {', '.join(sorted(str(d) for d in b.dtypes))})"
    if b.min_sm is not None and caps.sm is not None and caps.sm < b.min_sm:
        return f"needs compute capability >= {b.min_sm[0]}.{b.min_sm[1]}, this GPU has {caps.sm[0]}.{caps.sm[1]}"
    if caps.dtype == torch.bfloat16 and b.bf16_min_sm is not None and caps.sm is not None and caps.sm < b.bf16_min_sm:
        return (f"needs compute capability >= {b.bf16_min_sm[0]}.{b.bf16_min_sm[1]} for torch.bfloat16 inputs, "
                f"this GPU has {caps.sm[0]}.{caps.sm[1]}")
    if caps.head_dim > b.max_head_dim or caps.head_dim % b.head_dim_multiple:
        return (f"does not support head_dim {caps.head_dim} (needs a multiple of {b.head_dim_multiple} "
                f"up to {b.max_head_dim})")
    if name == "triton" and caps.triton_failed:
        return f"failed its self-check on this GPU ({caps.triton_failed})"
    if caps.needs_mask and not b.supports_mask:
        return "cannot honour a key-padding mask, and this model needs one"
    if for_auto and not b.exact:
        return "is quantized (inexact); auto never picks it, request it explicitly"
    return None


def auto_order(caps: Capabilities) -> tuple[str, ...]:
    """Preference order of ``auto``, fastest first, from published H100/A100 figures.

    On Hopper FlashAttention-3 (~620-650 TFLOP/s bf16 at head_dim 128) leads, then wanrt's Triton
    kernel (target 550), torch SDPA (cuDNN/FA2 kernels), FlashAttention-2 (~350) and xformers. On
    other GPUs FA2 leads. On the CPU: SDPA, then eager.
    """
    if caps.device_type != "cuda":
        return ("sdpa", "eager")
    fa3 = "flash_attn_interface" in caps.packages and caps.sm is not None and caps.sm >= (9, 0)
    if fa3:
        return ("flash-attn", "triton", "sdpa", "xformers", "eager")
    if caps.sm is not None and caps.sm >= (9, 0):
        return ("triton", "sdpa", "flash-attn", "xformers", "eager")
    return ("flash-attn", "triton", "sdpa", "xformers", "eager")


def resolve(requested: str, caps: Capabilities) -> str:
    """Pick the attention backend for ``requested`` under ``caps`` (pure: no imports, no I/O).

    Args:
        requested: A name of :data:`ATTENTION_BACKENDS` or ``"auto"``.
        caps: The machine's (or a test's) capabilities.

    Returns:
        The attention backend name.

    Raises:
        ValueError: ``requested`` is not a known name.
        BackendUnavailableError: an explicit request that cannot run here; the message says why,
            how to install a missing package, and which backends are available.
    """
    if requested == "auto":
        for name in auto_order(caps):
            if ineligibility(name, caps, for_auto=True) is None:
                return name
        return "eager"  # always eligible
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {list(BACKEND_NAMES)}")
    reason = ineligibility(requested, caps)
    if reason is not None:
        avail = [n for n in ATTENTION_BACKENDS if ineligibility(n, caps) is None]
        raise BackendUnavailableError(
            f"attention backend {requested!r} {reason}. Available here: {', '.join(avail)} (or 'auto')."
        )
    return requested


@dataclass(frozen=True, repr=False)
class OpsPlan:
    """The resolved backends of a model, one per kernel family that runs:

    * ``attention``: a name of :data:`ATTENTION_BACKENDS`;
    * ``fused``: ``"eager"`` or ``"triton"`` for QK-norm + RoPE, modulated LayerNorm and residuals;
    * ``quant``: ``"eager"`` or ``"triton"`` (:data:`QUANT_BACKENDS`) for the 8-bit Linears' per-token
      activation quantization and int8 rescale (``wanrt.quant``), and the norm fused with it. ``None``
      (the default) takes ``fused``'s value, which is what :func:`plan` resolves, so
      ``OpsPlan("sdpa", "triton")`` equals the resolved plan of ``sdpa`` on a GPU;
    * ``vae``: ``"eager"``, ``"triton"`` or ``"tensorrt"`` (:data:`VAE_BACKENDS`) for the VAE's causal
      convolutions (``WanVAE.set_backend``; ``"tensorrt"``: the Engine decodes with a TensorRT engine).

    ``OpsPlan()`` is the reference path (everything eager). Plans are equal (and hash equal) when every
    field is; the repr names every kernel.

    ``fuse_rope`` (``triton`` attention only): rotate q and k inside the attention kernel as their
    tiles are loaded, or (default) in the QK-norm pass before it. Wan2.1 always has the QK-norm pass,
    which writes q and k once either way, so fusing RoPE into attention saves no memory traffic; it
    re-rotates every K tile once per query block, adds a rounding, and, compiled for sm_90a, spills
    more registers (benchmarks/results/kernel_resources_*.md). Both forms are tested;
    ``benchmarks/bench_dit.py`` times both on a GPU.
    """

    attention: str = "eager"
    fused: str = "eager"
    fuse_rope: bool = False
    quant: str | None = None  # None: as ``fused``
    vae: str = "eager"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention!r}; choose one of {list(ATTENTION_BACKENDS)}")
        if self.fused not in FUSED_BACKENDS:
            raise ValueError(f"fused backend must be one of {FUSED_BACKENDS}, got {self.fused!r}")
        if self.quant is None:
            object.__setattr__(self, "quant", self.fused)  # frozen: set once, before anyone hashes it
        if self.quant not in QUANT_BACKENDS:
            raise ValueError(f"quant backend must be one of {QUANT_BACKENDS}, got {self.quant!r}")
        if self.vae not in VAE_BACKENDS:
            raise ValueError(f"VAE backend must be one of {VAE_BACKENDS}, got {self.vae!r}")

    def __repr__(self) -> str:
        rope = ", fuse_rope=True" if self.fuse_rope else ""
        return (f"OpsPlan(attention={self.attention!r}, fused={self.fused!r}{rope}, quant={self.quant!r}, "
                f"vae={self.vae!r})")

    @property
    def name(self) -> str:
        """Short description, e.g. ``'sdpa+triton'`` (attention + fused ops)."""
        if self.attention == "triton":
            return "triton(rope fused)" if self.fuse_rope else "triton"
        return self.attention if self.fused == "eager" else f"{self.attention}+{self.fused}"


def _triton_refusal(what: str, caps: Capabilities) -> str | None:
    """Why an explicit Triton request for ``what`` cannot run under ``caps``; ``None`` when it can."""
    if "triton" not in caps.packages:
        return f"{what} 'triton' need the triton package (pip install triton)"
    if caps.device_type != "cuda" and not caps.interpreter:
        return f"{what} 'triton' run on CUDA, or on the CPU only with TRITON_INTERPRET=1"
    if caps.triton_failed:
        return f"{what} 'triton' failed their self-check here: {caps.triton_failed}"
    return None


def plan(requested: str, caps: Capabilities, fused: str | None = None, vae: str = "eager", *,
         quant: str | None = None) -> OpsPlan:
    """Resolve a model-level backend name (and the VAE's) into an :class:`OpsPlan`.

    The attention backend comes from :func:`resolve`. The fused ops follow it: ``eager`` for the
    ``eager`` backend (the exact reference path), ``triton`` for the ``triton`` backend, and for
    the others ``triton`` on a CUDA GPU with Triton installed (sm >= 8.0) whose self-check passed,
    else ``eager``. Pass ``fused`` to override (``"triton"`` off CUDA needs the interpreter).

    The 8-bit Linears' activation quantization follows the fused ops: ``triton`` exactly when
    they resolve to ``triton`` (so never for ``eager``, never without Triton, after a failed
    self-check, or on the CPU unless the interpreter was asked for explicitly). Pass ``quant`` to
    override; ``"triton"`` is checked as ``fused``.

    ``vae`` is the VAE's request, never automatic: ``"eager"``; ``"triton"`` (checked as ``fused``);
    ``"tensorrt"`` (a CUDA device; the ``tensorrt`` import itself is checked by
    :func:`wanrt.graph.tensorrt_vae.require_tensorrt`, which this pure function does not call).

    Raises:
        ValueError, BackendUnavailableError: as :func:`resolve`, or a ``fused``, ``quant`` or ``vae``
            that is unknown or cannot run.
    """
    attn = resolve(requested, caps)
    if fused is None:
        if attn == "eager":
            fused = "eager"
        elif attn == "triton":
            fused = "triton"
        else:
            on_gpu = caps.device_type == "cuda" and "triton" in caps.packages and (caps.sm or (0, 0)) >= (8, 0)
            fused = "triton" if on_gpu and not caps.triton_failed else "eager"
    elif fused == "triton" and (reason := _triton_refusal("fused ops", caps)) is not None:
        raise BackendUnavailableError(reason)
    if quant is None:
        quant = fused  # fused == "triton" passed every check above
    elif quant == "triton" and (reason := _triton_refusal("activation quantization kernels", caps)) is not None:
        raise BackendUnavailableError(reason)
    if vae not in VAE_BACKENDS:
        raise ValueError(f"VAE backend must be one of {VAE_BACKENDS}, got {vae!r}")
    if vae == "triton" and (reason := _triton_refusal("VAE convolutions", caps)) is not None:
        raise BackendUnavailableError(reason)
    if vae == "tensorrt" and caps.device_type != "cuda":
        raise BackendUnavailableError(f"VAE backend 'tensorrt' needs a CUDA device, not {caps.device_type}")
    result = OpsPlan(attn, fused, quant=quant, vae=vae)
    if requested == "auto":
        log.info("backend 'auto' resolved to %s (device %s, %s, head_dim %d)",
                 result.name, caps.device_type, str(caps.dtype).replace("torch.", ""), caps.head_dim)
    return result


class _TritonFused:
    """The Triton launchers of :mod:`wanrt.kernels`, imported on first use (a plain class so that
    ``torch.compile`` traces through the dispatch without a graph break)."""

    @staticmethod
    def norm_rope(*args):
        from wanrt.kernels.qk_norm_rope import norm_rope

        return norm_rope(*args)

    @staticmethod
    def modulated_layer_norm(*args):
        from wanrt.kernels.modnorm import modulated_layer_norm

        return modulated_layer_norm(*args)

    @staticmethod
    def gated_residual(*args):
        from wanrt.kernels.modnorm import gated_residual

        return gated_residual(*args)

    @staticmethod
    def gated_residual_layer_norm(*args):
        from wanrt.kernels.modnorm import gated_residual_layer_norm

        return gated_residual_layer_norm(*args)


_FUSED_IMPLS = {"triton": _TritonFused}


def fused_impl(backend: str):
    """The fused-op implementation of ``backend`` (``"triton"``).

    Returns an object with ``norm_rope``, ``modulated_layer_norm``, ``gated_residual`` and
    ``gated_residual_layer_norm`` (the launchers of :mod:`wanrt.kernels`; the module is imported on
    the first call, which raises ``ImportError`` if triton is missing — :func:`plan` checks first).

    Raises:
        ValueError: unknown backend.
    """
    impl = _FUSED_IMPLS.get(backend)
    if impl is None:
        raise ValueError(f"fused-op backend must be one of {FUSED_BACKENDS}, got {backend!r}")
    return impl
