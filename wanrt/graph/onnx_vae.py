"""ONNX export of the Wan-VAE decoder as a streaming step graph, and an onnxruntime decoder.

The decoder runs one latent frame at a time through a :class:`~wanrt.cache.causal_cache.CausalCache`
whose per-slot state machine (``EMPTY`` / ``REPLICATE`` / ``FRAMES``) is host control flow. ONNX and
TensorRT want fixed graphs, so the decode is split into **two graphs** with the cache as explicit
fixed-shape tensors, one per slot, each ``[B, C_i, CACHE_T=2, h_i, w_i]``:

* the **first-step graph** (``DecoderFirstStep``): latent frame 0 ``z [B, z_dim, 1, h, w]`` ->
  ``frames [B, 3, 1, H, W]`` and ``cache_out_0 .. cache_out_{n-1}``;
* the **steady-state step graph** (``DecoderStep``): latent frame ``t >= 1`` and ``cache_in_i`` ->
  ``frames [B, 3, temporal_factor, H, W]`` and ``cache_out_i``, fed back as the next ``cache_in_i``.

Both contain the whole per-frame decode of :meth:`WanVAE.decode_chunk`: the latent denormalization
``z / (1/std) + mean`` (float32), ``conv2``, the decoder, and the clamp to [-1, 1]; ``z`` and
``frames`` are float32 whatever the graph's compute dtype. Nothing runs outside the graphs, so a
runtime needs no PyTorch weights.

Why the padded cache reproduces the state machine exactly. After the first latent frame every
``conv`` slot holds 1 frame (``FRAMES``, n=1) and every ``upsample3d`` slot is ``REPLICATE``
(no frames). The first-step graph emits them padded to 2 frames: ``[0, frame]`` for a conv slot
and all zeros for an ``upsample3d`` slot. On the next step the torch code prepends the 1 cached
frame and zero-pads 1 more frame in front (resp. zero-pads 2 frames after ``REPLICATE``), and
builds the new entry from ``[last cached frame, x]`` (resp. ``[zero, x]``); the step graph, which
always prepends its 2 cached frames, sees the same tensors and computes the same values (the
convolution inputs are identical, so PyTorch gives bitwise-equal frames and caches; see
``tests/test_vae_onnx.py``). From the third latent frame on every slot genuinely holds 2 frames.

Files written by :func:`export_decoder_onnx` for ``path = dir/name.onnx`` (see :func:`companion_paths`):

* ``dir/name.onnx``: the steady-state step graph (inputs ``z``, ``cache_in_{i}``; outputs
  ``frames``, ``cache_out_{i}``);
* ``dir/name.first.onnx``: the first-step graph (input ``z``; outputs ``frames``, ``cache_out_{i}``);
* ``dir/name.json``: the sidecar (:func:`load_layout`): format tag, wanrt version, sizes, dtype,
  every graph input/output with shape and dtype, the cache layout (slot index, module, kind,
  shape), and the byte size and SHA-256 of both graph files. The same JSON is stored in both
  ONNX files' ``metadata_props`` under the key ``"wanrt"``.

Shapes are static: one export per (batch, height, width, dtype).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from wanrt.cache.causal_cache import CACHE_T, CausalCache, SlotState
from wanrt.ops.backends import BackendUnavailableError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CacheSlotSpec",
    "DecoderFirstStep",
    "DecoderStep",
    "OnnxDecoder",
    "check_latents",
    "companion_paths",
    "decoder_cache_layout",
    "export_decoder_onnx",
    "load_layout",
    "pack_decoder_cache",
]

FORMAT = "wanrt-vae-decoder-step"
"""The sidecar's ``format`` tag."""

FORMAT_VERSION = 1
"""The sidecar's ``format_version``; readers reject other versions."""

_EXPORT_DTYPES = {torch.float32: "float32", torch.float16: "float16"}


# --------------------------------------------------------------------------------------------------
# Cache layout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSlotSpec:
    """One decoder cache slot as a graph tensor.

    Attributes:
        index: the slot number (``cache_in_{index}`` / ``cache_out_{index}``).
        module: the owning layer in ``WanVAE`` names, e.g. ``"decoder.upsamples.3"``.
        kind: ``"conv"`` (a causal conv: 1 frame after latent frame 0) or ``"upsample3d"`` (the
            time_conv of a temporal upsample: ``REPLICATE`` after latent frame 0).
        channels: ``C`` of the cached frames.
        scale: the slot's spatial size is the latent ``h, w`` times this (1, 2, 4, 8 for Wan2.1).
    """

    index: int
    module: str
    kind: str
    channels: int
    scale: int

    def shape(self, batch: int, latent_height: int, latent_width: int) -> tuple[int, int, int, int, int]:
        """``(B, C, CACHE_T, h * scale, w * scale)``."""
        return (batch, self.channels, CACHE_T, latent_height * self.scale, latent_width * self.scale)


@torch.no_grad()
def decoder_cache_layout(vae: nn.Module) -> tuple[CacheSlotSpec, ...]:
    """The decoder cache slots of ``vae`` (a :class:`~wanrt.models.vae.WanVAE`), in slot order.

    Found by running the real decoder on two 1x1 latent frames (cheap even for the full model):
    after the first frame a slot is ``REPLICATE`` (``upsample3d``) or ``FRAMES`` (``conv``); after
    the second, its frames have the slot's channels and ``scale x scale`` pixels.

    Raises:
        ValueError: the VAE's weights are on the meta device.
    """
    if vae.device.type == "meta":
        raise ValueError("decoder_cache_layout: the VAE's weights are on the meta device; load them first")
    decoder = vae.decoder
    names = {
        m.cache_slot: f"decoder.{name}" if name else "decoder"
        for name, m in decoder.named_modules()
        if getattr(m, "needs_cache_slot", False)
    }
    cache = CausalCache.for_module(decoder)
    z = torch.zeros(1, vae.config.z_dim, 1, 1, 1, device=vae.device, dtype=vae.dtype)
    decoder(z, cache)
    kinds = ["upsample3d" if cache.state(i) is SlotState.REPLICATE else "conv" for i in range(len(cache))]
    decoder(z, cache)
    specs = []
    for i in range(len(cache)):
        f = cache.frames(i)
        if f is None or f.shape[2] != CACHE_T or f.shape[3] != f.shape[4]:
            raise RuntimeError(f"decoder cache slot {i} has unexpected frames after 2 steps: {f if f is None else f.shape}")
        specs.append(CacheSlotSpec(i, names[i], kinds[i], int(f.shape[1]), int(f.shape[3])))
    return tuple(specs)


def pack_decoder_cache(
    cache: CausalCache, layout: Sequence[CacheSlotSpec], latent_height: int, latent_width: int
) -> list[torch.Tensor]:
    """A torch :class:`CausalCache` (after >= 1 decoded latent frame) as the step graph's ``cache_in`` tensors.

    ``FRAMES`` slots with fewer than ``CACHE_T`` frames get zero frames in front, ``REPLICATE``
    slots become all zeros (the rule explained in the module docstring). This is what the
    first-step graph outputs; use it to start the step graph from a first step run in PyTorch.

    Returns:
        One ``[B, C_i, CACHE_T, h_i, w_i]`` tensor per slot, in slot order, in the frames' dtype.

    Raises:
        ValueError: a slot is ``EMPTY`` (no frame decoded yet), or the cache does not fit ``layout``.
    """
    if len(cache) != len(layout):
        raise ValueError(f"cache has {len(cache)} slots, the layout {len(layout)}")
    ref = next((cache.frames(s.index) for s in layout if cache.frames(s.index) is not None), None)
    if ref is None:
        raise ValueError("pack_decoder_cache: the cache holds no frames (decode the first latent frame first)")
    out = []
    for spec in layout:
        shape = spec.shape(ref.shape[0], latent_height, latent_width)
        state = cache.state(spec.index)
        if state is SlotState.EMPTY:
            raise ValueError(f"cache slot {spec.index} ({spec.module}) is EMPTY")
        if state is SlotState.REPLICATE:
            out.append(ref.new_zeros(shape))
            continue
        f = cache.frames(spec.index)
        if f.shape[2] < CACHE_T:
            f = torch.cat([f.new_zeros((*f.shape[:2], CACHE_T - f.shape[2], *f.shape[3:])), f], dim=2)
        if tuple(f.shape) != shape:
            raise ValueError(f"cache slot {spec.index} ({spec.module}) has shape {tuple(f.shape)}, expected {shape}")
        out.append(f)
    return out


# --------------------------------------------------------------------------------------------------
# Graph caches: duck-typed CausalCache stand-ins over fixed 2-frame tensors
# --------------------------------------------------------------------------------------------------


class _FirstStepCache:
    """Every slot starts ``EMPTY``; records the padded 2-frame entries the step graph expects."""

    def __init__(self, specs: Sequence[CacheSlotSpec], batch: int, h: int, w: int, like: torch.Tensor) -> None:
        self.specs, self.batch, self.h, self.w, self.like = specs, batch, h, w, like
        self.out: list[torch.Tensor | None] = [None] * len(specs)
        self._state = [SlotState.EMPTY] * len(specs)

    def state(self, slot: int) -> SlotState:
        return self._state[slot]

    def mark_replicate(self, slot: int) -> None:
        if self._state[slot] is not SlotState.EMPTY:
            raise RuntimeError(f"slot {slot} is {self._state[slot].name}, expected EMPTY")
        self._state[slot] = SlotState.REPLICATE
        shape = self.specs[slot].shape(self.batch, self.h, self.w)
        # Zeros [B, C, 2, h_i, w_i] computed from the input: a graph output that is a constant is not
        # accepted by every runtime (TensorRT's ONNX parser). Exact for finite inputs.
        self.out[slot] = (self.like[:, :1, :1, :1, :1] * 0).expand(shape)

    def push(self, slot: int, x: torch.Tensor, num_frames: int = CACHE_T) -> None:
        if num_frames != CACHE_T:
            raise RuntimeError(f"decoder graphs only support {CACHE_T}-frame cache entries, got {num_frames}")
        if self._state[slot] is not SlotState.EMPTY:
            raise RuntimeError(f"slot {slot} pushed twice in one step")
        tail = x[:, :, -num_frames:]
        missing = num_frames - tail.shape[2]
        if missing > 0:  # EMPTY keeps a short entry; the next step zero-pads it in front: same values
            tail = torch.nn.functional.pad(tail, (0, 0, 0, 0, missing, 0))
        self.out[slot] = tail
        self._state[slot] = SlotState.FRAMES
        # returns None: the slot was EMPTY, the layer zero-pads


class _SteadyCache:
    """Every slot is ``FRAMES`` with exactly ``CACHE_T`` frames given as graph inputs."""

    def __init__(self, frames_in: Sequence[torch.Tensor]) -> None:
        self.frames_in = list(frames_in)
        self.out: list[torch.Tensor | None] = [None] * len(frames_in)

    def state(self, slot: int) -> SlotState:
        return SlotState.FRAMES

    def mark_replicate(self, slot: int) -> None:
        raise RuntimeError("the steady-state decoder step has no first-chunk slots")

    def push(self, slot: int, x: torch.Tensor, num_frames: int = CACHE_T) -> torch.Tensor:
        if num_frames != CACHE_T:
            raise RuntimeError(f"decoder graphs only support {CACHE_T}-frame cache entries, got {num_frames}")
        if self.out[slot] is not None:
            raise RuntimeError(f"slot {slot} pushed twice in one step")
        prev = self.frames_in[slot]
        missing = num_frames - x.shape[2]
        # CausalCache.push: the last frames of x, the missing leading ones from the previous entry.
        self.out[slot] = x[:, :, -num_frames:] if missing <= 0 else torch.cat([prev[:, :, -missing:].to(x), x], 2)
        return prev


# --------------------------------------------------------------------------------------------------
# Step modules (what is exported)
# --------------------------------------------------------------------------------------------------


def _refuse_wan22(vae: nn.Module) -> None:
    """The step graphs reproduce the Wan2.1 decoder only.

    Raises:
        ValueError: for the Wan2.2 layout (``config.is_residual`` or a pixel patchify): its first step drops frames
            in the DupUp3D shortcuts and its output is unpatchified, which these graphs do not implement.
    """
    cfg = vae.config
    if getattr(cfg, "is_residual", False) or getattr(cfg, "patch_size", 1) != 1:
        raise ValueError("ONNX/TensorRT export of the Wan2.2 VAE decoder (residual stages, 2x2 patchify) is not "
                         "supported; decode it with the 'eager' or 'triton' VAE backend")


class _StepBase(nn.Module):
    def __init__(self, vae: nn.Module, layout: Sequence[CacheSlotSpec] | None = None) -> None:
        super().__init__()
        _refuse_wan22(vae)
        self.conv2 = vae.conv2
        self.decoder = vae.decoder
        self.layout = tuple(layout) if layout is not None else decoder_cache_layout(vae)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape)
        self.register_buffer("mean", mean.to(vae.device), persistent=False)
        self.register_buffer("inv_std", inv_std.to(vae.device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _pre(self, z: torch.Tensor) -> torch.Tensor:
        # WanVAE.denormalize_latents (float32), then conv2 in the weights' dtype.
        return self.conv2((z.float() / self.inv_std + self.mean).to(self.dtype))

    @staticmethod
    def _post(frames: torch.Tensor) -> torch.Tensor:
        return frames.float().clamp(-1.0, 1.0)

    def example_cache(self, batch: int, latent_height: int, latent_width: int) -> list[torch.Tensor]:
        """Zero ``cache_in`` tensors of the right shapes (for tracing)."""
        return [
            torch.zeros(s.shape(batch, latent_height, latent_width), dtype=self.dtype, device=self.mean.device)
            for s in self.layout
        ]


class DecoderFirstStep(_StepBase):
    """Latent frame 0 -> its decoded frame and the padded cache (the first-step graph).

    ``forward(z) -> (frames, *cache_out)``: ``z [B, z_dim, 1, h, w]`` normalized latents (any float
    dtype), ``frames [B, 3, 1, 8h, 8w]`` float32 in [-1, 1] (= ``WanVAE.decode_chunk`` on a fresh
    cache), ``cache_out[i]`` ``[B, C_i, 2, h_i, w_i]`` in the weights' dtype, padded as in the module
    docstring. Shares (does not copy) the VAE's ``conv2`` and ``decoder``.

    Args:
        vae: a :class:`~wanrt.models.vae.WanVAE`.
        layout: its :func:`decoder_cache_layout` (computed when ``None``).
    """

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, _, t, h, w = z.shape
        if t != 1:
            raise ValueError(f"DecoderFirstStep takes exactly 1 latent frame, got {t}")
        x = self._pre(z)
        cache = _FirstStepCache(self.layout, b, h, w, x)
        frames = self.decoder(x, cache)
        if any(c is None for c in cache.out):
            raise RuntimeError("a decoder cache slot was not written by the first step")
        return (self._post(frames), *cache.out)


class DecoderStep(_StepBase):
    """One steady-state decoder step (the step graph): latent frame ``t >= 1`` with the cache.

    ``forward(z, *cache_in) -> (frames, *cache_out)``: ``z [B, z_dim, 1, h, w]`` normalized latents,
    ``cache_in[i]`` / ``cache_out[i]`` ``[B, C_i, 2, h_i, w_i]`` in the weights' dtype (the previous
    step's ``cache_out`` is the next ``cache_in``), ``frames [B, 3, temporal_factor, 8h, 8w]`` float32
    in [-1, 1]. Equal to ``WanVAE.decode_chunk`` for every latent frame after the first, starting
    from :class:`DecoderFirstStep`'s cache or :func:`pack_decoder_cache`. Shares the VAE's modules.

    Args:
        vae: a :class:`~wanrt.models.vae.WanVAE`.
        layout: its :func:`decoder_cache_layout` (computed when ``None``).
    """

    def forward(self, z: torch.Tensor, *cache_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if z.shape[2] != 1:
            raise ValueError(f"DecoderStep takes exactly 1 latent frame, got {z.shape[2]}")
        if len(cache_in) != len(self.layout):
            raise ValueError(f"DecoderStep needs {len(self.layout)} cache tensors, got {len(cache_in)}")
        cache = _SteadyCache(cache_in)
        frames = self.decoder(self._pre(z), cache)
        if any(c is None for c in cache.out):
            raise RuntimeError("a decoder cache slot was not written by the step")
        return (self._post(frames), *cache.out)


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def companion_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(first_step_file, sidecar)`` of a step-graph file: ``dir/name.first<suffix>``, ``dir/name.json``.

    Used for ``.onnx`` files and the TensorRT ``.engine`` files alike.
    """
    path = Path(path)
    return path.with_name(f"{path.stem}.first{path.suffix}"), path.with_suffix(".json")


def _file_info(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp_name(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _tensor_desc(name: str, shape: Sequence[int], dtype: str) -> dict[str, Any]:
    return {"name": name, "shape": [int(s) for s in shape], "dtype": dtype}


_NEAREST_EXACT = "aten::_upsample_nearest_exact2d"


def _nearest_exact2d_symbolic(g: Any, input: Any, output_size: Any, scale_factors: Any) -> Any:
    """ONNX ``Resize`` for ``F.interpolate(mode="nearest-exact")`` with integer scales (the VAE's 2x).

    For an integer scale ``k`` nearest-exact picks source ``floor((i + 0.5) / k) = i // k``, which is
    ``Resize(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")``.
    The TorchScript exporter has no symbolic for this op.
    """
    from torch.onnx import symbolic_helper as sh

    scales = sh._maybe_get_const(scale_factors, "fs")
    if not isinstance(scales, (list, tuple)):
        in_sizes = sh._get_tensor_sizes(input)
        out_sizes = sh._maybe_get_const(output_size, "is")
        if not isinstance(out_sizes, (list, tuple)) or not in_sizes or None in in_sizes[2:]:
            return sh._unimplemented("_upsample_nearest_exact2d", "needs static sizes or scale factors")
        scales = [o / i for o, i in zip(out_sizes, in_sizes[2:])]
    if len(scales) != 2 or any(float(k) != int(k) or k < 1 for k in scales):
        return sh._unimplemented("_upsample_nearest_exact2d", f"only integer scale factors, got {scales}")
    roi = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    sc = g.op("Constant", value_t=torch.tensor([1.0, 1.0, *map(float, scales)], dtype=torch.float32))
    return g.op("Resize", input, roi, sc, coordinate_transformation_mode_s="asymmetric", mode_s="nearest",
                nearest_mode_s="floor")


@contextlib.contextmanager
def _eager_convs(*modules: nn.Module) -> Iterator[None]:
    """Temporarily runs every layer with a ``backend`` attribute (the VAE's causal convs) with ``"eager"``.

    A Triton kernel cannot be traced into ONNX; the eager path is plain PyTorch ops.
    """
    saved = []
    for root in modules:
        for m in root.modules():
            if isinstance(getattr(m, "backend", None), str) and m.backend != "eager":
                saved.append((m, m.__dict__.get("backend", _MISSING)))
                m.backend = "eager"
    try:
        yield
    finally:
        for m, value in saved:
            if value is _MISSING:
                del m.backend
            else:
                m.backend = value


_MISSING = object()


def _tmp_name(path: Path) -> Path:
    """A unique temporary name next to ``path`` (same folder, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _export_one(module: nn.Module, args: tuple, path: Path, inputs: Sequence[dict[str, Any]],
                outputs: Sequence[dict[str, Any]], opset: int, meta: str) -> None:
    """Exports ``module(*args)`` to ``path`` atomically, with ``meta`` in ``metadata_props['wanrt']``.

    ``inputs``/``outputs`` are the tensor descriptions (name, shape); the graph outputs get these
    static shapes declared (the TorchScript exporter leaves some dims unknown).
    """
    import onnx

    in_names = [d["name"] for d in inputs]
    out_names = [d["name"] for d in outputs]
    tmp = _tmp_name(path)
    try:
        torch.onnx.register_custom_op_symbolic(_NEAREST_EXACT, _nearest_exact2d_symbolic, opset)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
                torch.onnx.export(
                    module, args, str(tmp), input_names=in_names, output_names=out_names, opset_version=opset,
                    dynamo=False, do_constant_folding=True, verbose=False,
                )
        finally:
            torch.onnx.unregister_custom_op_symbolic(_NEAREST_EXACT, opset)
        model = onnx.load(str(tmp))
        got_in = [i.name for i in model.graph.input]
        got_out = [o.name for o in model.graph.output]
        if got_in != in_names or got_out != out_names:
            raise RuntimeError(f"exported graph has inputs {got_in} / outputs {got_out}, expected {in_names} / {out_names}")
        for value, desc in zip(model.graph.output, outputs):
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in desc["shape"]:
                dims.add().dim_value = size
        del model.metadata_props[:]
        entry = model.metadata_props.add()
        entry.key, entry.value = "wanrt", meta
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_decoder_onnx(
    vae: nn.Module,
    path: str | os.PathLike,
    *,
    height: int,
    width: int,
    batch: int = 1,
    opset: int = 17,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Exports the VAE decoder as the step graph ``path``, the first-step graph and the sidecar.

    Writes ``path`` (``DecoderStep``), ``companion_paths(path)[0]`` (``DecoderFirstStep``) and the
    JSON sidecar ``companion_paths(path)[1]`` (see the module docstring; the sidecar is written
    last). Each file is written to a temporary name and renamed into place. Uses the TorchScript
    exporter (``torch.onnx.export(..., dynamo=False)``; the dynamo exporter needs ``onnxscript``).
    The traced computation runs on ``vae``'s device with the eager causal convs (a conv ``backend``
    such as ``"triton"`` is switched to ``"eager"`` during the export and restored); ``vae`` is not
    modified (a copy of ``conv2`` and the decoder is cast when ``dtype`` differs from the VAE's).

    Args:
        vae: a :class:`~wanrt.models.vae.WanVAE` with real weights.
        path: the step graph's file, conventionally ``*.onnx``; parent folders are created.
        height, width: the video size in **pixels** (multiples of ``s = vae.config.spatial_factor``, 8 for
            Wan2.1); the latents are ``height // s x width // s``. Fixed in the graphs.
        batch: the batch size, fixed in the graphs.
        opset: ONNX opset (>= 14, for scaled-dot-product attention).
        dtype: compute dtype of the graphs: ``torch.float32`` (matches ``WanVAE.decode`` to float32
            rounding; for onnxruntime and for TensorRT with or without its FP16 mode) or
            ``torch.float16`` (meant for GPU runtimes, e.g. a strongly typed TensorRT engine; the
            cache tensors are float16, the RMS norms still normalize in float32, as PyTorch runs an
            fp16 VAE). ``z``/``frames`` stay float32.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: bad size, batch, opset or dtype, meta weights, or a Wan2.2 VAE (not supported).
        BackendUnavailableError: the ``onnx`` package is missing.
    """
    _refuse_wan22(vae)
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError("ONNX export needs the onnx package: pip install onnx (or 'wanrt[trt]')") from e
    cfg = vae.config
    s = cfg.spatial_factor
    if height < s or width < s or height % s or width % s:
        raise ValueError(f"height and width must be positive multiples of {s} (pixels), got {height}x{width}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if opset < 14:
        raise ValueError(f"opset must be >= 14 (scaled-dot-product attention), got {opset}")
    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {list(_EXPORT_DTYPES)}, got {dtype}")
    if vae.device.type == "meta":
        raise ValueError("export_decoder_onnx: the VAE's weights are on the meta device; load them first")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    first_path, sidecar_path = companion_paths(path)
    lh, lw = height // s, width // s
    dname = _EXPORT_DTYPES[dtype]

    src: Any = vae
    if vae.dtype != dtype:  # cast copies of the two exported parts only, never the caller's model
        src = SimpleNamespace(config=cfg, device=vae.device, dtype=dtype, conv2=copy.deepcopy(vae.conv2).to(dtype),
                              decoder=copy.deepcopy(vae.decoder).to(dtype))
    layout = decoder_cache_layout(src)
    first, step = DecoderFirstStep(src, layout), DecoderStep(src, layout)  # export() traces in eval mode

    n = len(layout)
    z_shape = (batch, cfg.z_dim, 1, lh, lw)
    cache_shapes = [spec.shape(batch, lh, lw) for spec in layout]
    cache_in = [f"cache_in_{i}" for i in range(n)]
    cache_out = [f"cache_out_{i}" for i in range(n)]
    tf = cfg.temporal_factor
    z_desc = _tensor_desc("z", z_shape, "float32")
    outs = [_tensor_desc(name, shp, dname) for name, shp in zip(cache_out, cache_shapes)]
    info: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "wanrt_version": _wanrt_version(),
        "torch_version": torch.__version__,
        "opset": opset,
        "dtype": dname,
        "batch": batch,
        "height": height,
        "width": width,
        "latent_height": lh,
        "latent_width": lw,
        "z_dim": cfg.z_dim,
        "temporal_factor": tf,
        "spatial_factor": s,
        "cache_frames": CACHE_T,
        "step_file": path.name,
        "first_step_file": first_path.name,
        "graph": "frames = clamp(decoder(conv2(z / (1/std) + mean)), -1, 1), one latent frame per step",
        "first_step": {
            "inputs": [z_desc],
            "outputs": [_tensor_desc("frames", (batch, 3, 1, height, width), "float32"), *outs],
        },
        "step": {
            "inputs": [z_desc, *(_tensor_desc(name, shp, dname) for name, shp in zip(cache_in, cache_shapes))],
            "outputs": [_tensor_desc("frames", (batch, 3, tf, height, width), "float32"), *outs],
        },
        "cache": [
            {**asdict(spec), "shape": list(shp), "dtype": dname, "input": i_name, "output": o_name}
            for spec, shp, i_name, o_name in zip(layout, cache_shapes, cache_in, cache_out)
        ],
        "vae_config": asdict(cfg),  # VAEConfig(**info["vae_config"]) rebuilds it
    }
    meta = json.dumps(info, sort_keys=True)
    z = torch.zeros(z_shape, dtype=torch.float32, device=vae.device)
    with torch.no_grad(), _eager_convs(src.conv2, src.decoder):
        _export_one(first, (z,), first_path, info["first_step"]["inputs"], info["first_step"]["outputs"], opset, meta)
        _export_one(step, (z, *first.example_cache(batch, lh, lw)), path, info["step"]["inputs"],
                    info["step"]["outputs"], opset, meta)
    info["files"] = {p.name: _file_info(p) for p in (path, first_path)}
    _atomic_write_text(sidecar_path, json.dumps(info, indent=1, sort_keys=True) + "\n")
    return path


def _wanrt_version() -> str:
    import wanrt

    return str(getattr(wanrt, "__version__", "unknown"))


def load_layout(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of a step-graph file (``.onnx`` or ``.engine``), checked against the graph files.

    Returns:
        The sidecar dict (keys as written by :func:`export_decoder_onnx`; ``"cache"`` lists the
        slots with ``index``, ``module``, ``kind``, ``channels``, ``scale``, ``shape``, ``dtype``,
        ``input``, ``output``).

    Raises:
        FileNotFoundError: the step graph, first-step graph or sidecar is missing.
        ValueError: the sidecar is not a wanrt decoder-step sidecar of a supported version.
    """
    path = Path(path)
    first, sidecar = companion_paths(path)
    for p in (path, first, sidecar):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found (export_decoder_onnx writes {path.name}, {first.name}, {sidecar.name})")
    try:
        info = json.loads(sidecar.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{sidecar} is not valid JSON: {e}") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{sidecar} is not a wanrt VAE decoder sidecar (format {FORMAT!r})")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{sidecar} has format_version {info.get('format_version')}, this wanrt reads {FORMAT_VERSION}")
    return info


# --------------------------------------------------------------------------------------------------
# onnxruntime decoder
# --------------------------------------------------------------------------------------------------


def check_latents(info: dict[str, Any], latents: Any) -> None:
    """Raises ``ValueError`` unless ``latents`` is a ``[B, z_dim, T, h, w]`` tensor matching the export."""
    b, z, lh, lw = info["batch"], info["z_dim"], info["latent_height"], info["latent_width"]
    want = f"[{b}, {z}, T, {lh}, {lw}]"
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a 5D tensor {want}, got {shape}")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be a float tensor, got {latents.dtype}")
    bb, zz, t, hh, ww = latents.shape
    if t < 1:
        raise ValueError(f"latents must have at least 1 frame, got {tuple(latents.shape)}")
    if (bb, zz, hh, ww) != (b, z, lh, lw):
        raise ValueError(
            f"this decoder was exported for latents {want} (batch {b}, {info['height']}x{info['width']} pixels), "
            f"got {tuple(latents.shape)}; export again with height={hh * info['spatial_factor']}, "
            f"width={ww * info['spatial_factor']}, batch={bb}"
        )


class OnnxDecoder:
    """Decodes latents with the two exported graphs on onnxruntime (no PyTorch weights needed).

    The first latent frame runs the first-step graph, every later one the step graph, with the
    cache tensors kept as onnxruntime values on the session's device between steps (IO binding:
    no host round trip of the cache on the CUDA provider). ``frames`` come back through the host.

    Args:
        path: the step graph written by :func:`export_decoder_onnx` (its ``.first.onnx`` and ``.json``
            companions must sit next to it).
        providers: onnxruntime execution providers (names or ``(name, options)`` pairs); default:
            ``CUDAExecutionProvider`` then ``CPUExecutionProvider`` when onnxruntime offers CUDA,
            else ``CPUExecutionProvider``.
        session_options: an optional ``onnxruntime.SessionOptions`` for both sessions.

    Attributes:
        info: the sidecar (:func:`load_layout`).
        batch, height, width, latent_height, latent_width, z_dim, temporal_factor: from the sidecar.

    Raises:
        BackendUnavailableError: onnxruntime is not installed.
        FileNotFoundError, ValueError: see :func:`load_layout`; a graph file whose size differs
            from the sidecar's (a partial or foreign export).
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[Any] | None = None, *,
                 session_options: Any = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailableError("OnnxDecoder needs onnxruntime: pip install onnxruntime (or 'wanrt[trt]')") from e
        self.path = Path(path)
        self.info = info = load_layout(self.path)
        first_path, _ = companion_paths(self.path)
        for p in (self.path, first_path):
            expected = info.get("files", {}).get(p.name, {}).get("bytes")
            if expected is not None and p.stat().st_size != expected:
                raise ValueError(f"{p} has {p.stat().st_size} bytes, the sidecar says {expected}: export again")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self._first = ort.InferenceSession(str(first_path), sess_options=session_options, providers=list(providers))
        self._step = ort.InferenceSession(str(self.path), sess_options=session_options, providers=list(providers))
        self.providers = self._step.get_providers()
        self._device, self._device_id = "cpu", 0
        if self.providers[0] == "CUDAExecutionProvider":
            opts = self._step.get_provider_options().get("CUDAExecutionProvider", {})
            self._device, self._device_id = "cuda", int(opts.get("device_id", 0))
        self.batch: int = info["batch"]
        self.height: int = info["height"]
        self.width: int = info["width"]
        self.latent_height: int = info["latent_height"]
        self.latent_width: int = info["latent_width"]
        self.z_dim: int = info["z_dim"]
        self.temporal_factor: int = info["temporal_factor"]
        self._cache_in = [c["input"] for c in info["cache"]]
        self._cache_out = [c["output"] for c in info["cache"]]

    def __repr__(self) -> str:
        return (f"OnnxDecoder({str(self.path)!r}, batch={self.batch}, {self.height}x{self.width}, "
                f"dtype={self.info['dtype']}, providers={self.providers})")

    def _run(self, session: Any, z: Any, cache: Sequence[Any] | None) -> tuple[Any, list[Any]]:
        binding = session.io_binding()
        binding.bind_cpu_input("z", z)
        if cache is not None:
            for name, value in zip(self._cache_in, cache):
                binding.bind_ortvalue_input(name, value)
        binding.bind_output("frames", "cpu")
        for name in self._cache_out:
            binding.bind_output(name, self._device, self._device_id)
        session.run_with_iobinding(binding)
        outs = binding.get_outputs()  # in binding order: frames, cache_out_0, ...
        return outs[0].numpy(), list(outs[1:])

    def decode_stream(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yields the video of :meth:`decode` chunk by chunk, one chunk per latent frame.

        Args:
            latents: ``[B, z_dim, T, h, w]`` normalized latents (any float dtype and device) with the
                exported batch and latent size.

        Yields:
            ``[B, 3, 1, H, W]`` for latent frame 0, then ``[B, 3, temporal_factor, H, W]`` per latent
            frame, float32 in [-1, 1] on ``latents.device``.

        Raises:
            ValueError: wrong rank, channels, batch or latent size (raised by this call, before any step).
        """
        check_latents(self.info, latents)
        return self._iter_frames(latents)

    def _iter_frames(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        z_all = latents.detach().to("cpu", torch.float32).numpy()
        cache = None
        for t in range(z_all.shape[2]):
            z = z_all[:, :, t : t + 1].copy()  # contiguous [B, z_dim, 1, h, w]
            frames, cache = self._run(self._first if cache is None else self._step, z, cache)
            yield torch.from_numpy(frames).to(latents.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decodes normalized latents like :meth:`WanVAE.decode <wanrt.models.vae.WanVAE.decode>`.

        Args:
            latents: ``[B, z_dim, T, h, w]`` with the exported batch and latent size.

        Returns:
            ``[B, 3, 1 + temporal_factor * (T - 1), H, W]`` float32 in [-1, 1] on ``latents.device``.

        Raises:
            ValueError: wrong rank, channels, batch or latent size.
        """
        return torch.cat(list(self.decode_stream(latents)), dim=2)
