"""``Engine``: loads a Wan2.1 checkpoint and generates videos.

The eager path reproduces the official text-to-video pipeline (``wan/text2video.py``; docs:
wan21-reference.md §6): UMT5 text encoding, two batch-1 DiT passes per step combined by
classifier-free guidance, a flow-matching solver, and a causal-VAE decode.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .ops.backends import BACKEND_NAMES as BACKENDS
from .presets import Preset, check_against, default_shift, get_preset, preset_for_arch, resolution_hint
from .sampling import SOLVER_NAMES as SOLVERS
from .video import Video, to_uint8_frames

log = logging.getLogger("wanrt")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "fp8": torch.bfloat16, "int8": torch.bfloat16, "int8-wo": torch.bfloat16}
#: VAE decoders: torch conv3d (reference), wanrt's Triton causal conv3d, a TensorRT engine of the decoder step.
VAE_BACKENDS = ("eager", "triton", "tensorrt")
#: precisions that quantize the DiT's block Linears (wanrt.quant); they compute in bf16.
QUANTIZED_PRECISIONS = ("fp8", "int8", "int8-wo")
LATENT_CHANNELS = 16
VAE_STRIDE = (4, 8, 8)


class GenerationError(RuntimeError):
    """A generation failed after denoising; the finished latents are kept.

    Attributes:
        latents: the denoised latents ``[1, 16, F', H', W']`` (CPU, float32); pass them to
            ``Engine.decode`` to retry the decode, or to ``generate(latents=...)``.
        seed: the seed used.
    """

    def __init__(self, message: str, latents: torch.Tensor | None, seed: int | None):
        super().__init__(message)
        self.latents = latents
        self.seed = seed


class Cancelled(RuntimeError):
    """``generate()`` was cancelled at a step boundary (the callback returned False, or ``cancel`` was set).

    The VAE decode is skipped. Attributes:
        step: index of the last completed step (-1 if cancelled before the first).
        latents: the latents at that point ``[1, 16, F', H', W']`` (CPU, float32; partially denoised).
        seed: the seed used.
    """

    def __init__(self, step: int, latents: torch.Tensor | None, seed: int | None):
        super().__init__(f"generation cancelled after step {step}")
        self.step = step
        self.latents = latents
        self.seed = seed


_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


def _device_lock(device: torch.device) -> threading.Lock:
    """One lock per device: engines sharing a GPU run their generations one at a time."""
    key = str(device)
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(key, threading.Lock())


_UNSET = object()


@dataclass(frozen=True)
class EngineConfig:
    """How an Engine runs: device, precision and kernel backend (validated on creation).

    Attributes:
        device: torch device the models run on.
        precision: "fp32", "bf16" or "fp16": dtype of the DiT's large weights (its modulation, time MLP,
            head and norms always stay fp32) and, for bf16/fp16, of the text encoder (bf16). "fp8", "int8"
            (W8A8) and "int8-wo" (weight-only) quantize the DiT blocks' attention and FFN Linears and compute
            in bf16 (``wanrt.quant``); a checkpoint stored quantized loads as it is. The VAE runs in fp32 as in
            the official code.
        backend: the DiT's kernels, as requested: "auto" (the fastest eligible on the device, logged),
            "eager" (the exact reference path), "sdpa", "triton", "flash-attn", "sageattention" or "xformers"
            (see ``wanrt.ops.backends``). ``Engine.plan`` is what it resolved to.
        cfg_batch: run the conditional and unconditional branches in one batch-2 DiT forward. None (default):
            on CUDA when the free memory allows it (else two passes, logged), off on the CPU.
        cuda_graphs: replay the DiT forward from CUDA graphs captured per shape (an LRU of 4). None
            (default): on for CUDA; a failed capture falls back to eager with the reason logged.
        compile: ``torch.compile`` each DiT block (``True`` for the default inductor backend, or a backend
            name such as ``"aot_eager"``). Off by default.
        teacache_threshold: default TeaCache threshold of ``generate()`` (None or 0: no step skipping).
        teacache_mode: "e" (time embedding) or "e0" (time projection, with 5 warm-up steps).
        teacache_coefficients: the rescaling polynomial (highest power first); None takes the preset's
            published coefficients (t2v-1.3b, t2v-14b, i2v-14b-480p/720p), or fit your own with
            ``wanrt calibrate-teacache``.
        prompt_cache_size: text embeddings kept per prompt (LRU), so repeated prompts and negative prompts
            skip the text encoder; 0 disables.
        text_encoder_precision: None (bf16, fp32 with precision "fp32"), "bf16", "fp32", or "fp8" / "int8" /
            "int8-wo" to quantize the 5.7B UMT5's attention and FFN Linears.
        text_encoder_device: where the text encoder runs, e.g. "cpu" to keep its ~11 GB off the GPU (the
            embeddings move to ``device``). Default: ``device``.
        offload_text_encoder: keep the text encoder on the CPU and move it to ``text_encoder_device`` only
            while it encodes (freed from the GPU after each call).
        vae_backend: "eager" (torch conv3d, the reference), "triton" (wanrt's causal conv3d kernel; CUDA) or
            "tensorrt" (an engine of the decoder step, built once and cached under ``build/trt``; needs
            ``pip install 'wanrt[trt]'``). The decode API is the same for all three.
        vae_tiling: decode in overlapping spatial tiles with blended seams (memory bounded by the tile). None
            (default): automatically above 720P; True/False forces it.
        image_cache_size: i2v/flf2v conditionings (CLIP features + VAE-encoded frames, ~25 MB each at 720P) kept
            per Engine in an LRU keyed by the images' content, size and frame count, so that variations of one
            image (other prompts, seeds, step counts) skip the image encoder and the VAE encode; 0 disables.
        offload_image_encoder: keep the CLIP vision tower of i2v/flf2v models (1.2 GB in fp16) on the CPU and move
            it to ``device`` only while it encodes (freed from the GPU after each call; cached conditionings do
            not call it at all).
        image_encoder_precision: dtype of the CLIP vision tower of i2v/flf2v models: "fp16" (the official
            dtype), "bf16" or "fp32". None (default): fp32 with precision "fp32", else fp16 on CUDA and bf16 on
            the CPU (where fp16 GEMMs are slow).
    """

    device: torch.device
    precision: str = "bf16"
    backend: str = "auto"
    cfg_batch: bool | None = None
    cuda_graphs: bool | None = None
    compile: bool | str = False
    teacache_threshold: float | None = None
    teacache_mode: str = "e"
    teacache_coefficients: tuple[float, ...] | None = None
    prompt_cache_size: int = 16
    text_encoder_precision: str | None = None
    text_encoder_device: str | torch.device | None = None
    offload_text_encoder: bool = False
    vae_backend: str = "eager"
    vae_tiling: bool | None = None
    image_cache_size: int = 2
    offload_image_encoder: bool = False
    image_encoder_precision: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available in this torch build")
        if self.cfg_batch not in (None, True, False):
            raise ValueError(f"cfg_batch must be None (auto), True or False, got {self.cfg_batch!r}")
        if self.cuda_graphs not in (None, True, False):
            raise ValueError(f"cuda_graphs must be None (auto), True or False, got {self.cuda_graphs!r}")
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got {self.device}")
        if not isinstance(self.compile, (bool, str)):
            raise ValueError(f"compile must be a bool or a torch.compile backend name, got {self.compile!r}")
        from .cache.teacache import TEACACHE_MODES

        if self.teacache_mode not in TEACACHE_MODES:
            raise ValueError(f"teacache_mode must be one of {TEACACHE_MODES}, got {self.teacache_mode!r}")
        if self.teacache_threshold is not None and not self.teacache_threshold >= 0:
            raise ValueError(f"teacache_threshold must be None or >= 0, got {self.teacache_threshold!r}")
        if self.teacache_coefficients is not None:
            object.__setattr__(self, "teacache_coefficients", tuple(float(c) for c in self.teacache_coefficients))
        if self.text_encoder_precision not in (None, "bf16", "fp32", *QUANTIZED_PRECISIONS):
            raise ValueError(f"text_encoder_precision must be None, 'bf16', 'fp32' or one of {QUANTIZED_PRECISIONS}, "
                             f"got {self.text_encoder_precision!r}")
        if self.text_encoder_device is not None:
            object.__setattr__(self, "text_encoder_device", torch.device(self.text_encoder_device))
            if self.text_encoder_device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError("text_encoder_device 'cuda' requested but CUDA is not available")
        if self.vae_backend not in VAE_BACKENDS:
            raise ValueError(f"vae_backend must be one of {VAE_BACKENDS}, got {self.vae_backend!r}")
        if self.vae_tiling not in (None, True, False):
            raise ValueError(f"vae_tiling must be None (auto), True or False, got {self.vae_tiling!r}")
        if self.image_encoder_precision not in (None, "fp16", "bf16", "fp32"):
            raise ValueError("image_encoder_precision must be None, 'fp16', 'bf16' or 'fp32', "
                             f"got {self.image_encoder_precision!r}")
        if not isinstance(self.offload_image_encoder, bool):
            raise ValueError(f"offload_image_encoder must be a bool, got {self.offload_image_encoder!r}")
        if not isinstance(self.offload_text_encoder, bool):
            raise ValueError(f"offload_text_encoder must be a bool, got {self.offload_text_encoder!r}")
        if isinstance(self.image_cache_size, bool) or not isinstance(self.image_cache_size, int) \
                or self.image_cache_size < 0:
            raise ValueError(f"image_cache_size must be an int >= 0, got {self.image_cache_size!r}")
        if not isinstance(self.prompt_cache_size, int) or self.prompt_cache_size < 0:
            raise ValueError(f"prompt_cache_size must be an int >= 0, got {self.prompt_cache_size!r}")

    @property
    def use_cfg_batch(self) -> bool:
        """Batch the CFG branches: as set, else on CUDA (when memory allows, checked per call), off on the CPU."""
        return self.cfg_batch if self.cfg_batch is not None else self.device.type == "cuda"

    @property
    def use_cuda_graphs(self) -> bool:
        """Replay the DiT from CUDA graphs: as set, else on CUDA."""
        return self.cuda_graphs if self.cuda_graphs is not None else self.device.type == "cuda"

    @property
    def dit_dtype(self) -> torch.dtype:
        """Dtype of the DiT's large weights."""
        return PRECISIONS[self.precision]

    @property
    def text_dtype(self) -> torch.dtype:
        """Compute dtype of the text encoder (fp32 for fp32 precision, else bf16; ``text_encoder_precision``
        "fp32"/"bf16" overrides)."""
        # UMT5 overflows in fp16; the official encoder runs in bf16.
        if self.text_encoder_precision in ("fp32", "bf16"):
            return PRECISIONS[self.text_encoder_precision]
        return torch.float32 if self.precision == "fp32" else torch.bfloat16

    @property
    def image_dtype(self) -> torch.dtype:
        """Dtype of the CLIP vision tower (see ``image_encoder_precision``)."""
        if self.image_encoder_precision is not None:
            return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.image_encoder_precision]
        if self.precision == "fp32":
            return torch.float32
        return torch.float16 if self.device.type == "cuda" else torch.bfloat16

    @property
    def text_device(self) -> torch.device:
        """Where the text encoder runs (``text_encoder_device``, default the Engine's device)."""
        return self.text_encoder_device or self.device




@dataclass(frozen=True)
class SamplingArgs:
    """The per-call sampling settings of :meth:`Engine.generate`, resolved and validated."""

    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    shift: float
    sample_solver: str
    seed: int

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """``[1, 16, (F-1)/4+1, H/8, W/8]``: the shape of the initial noise and final latents."""
        return (1, LATENT_CHANNELS, (self.num_frames - 1) // 4 + 1, self.height // 8, self.width // 8)


def resolve_sampling_args(
    preset: Preset,
    *,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    shift: float | None = None,
    sample_solver: str | None = None,
    seed: int | None = None,
    max_area: int | None = None,
) -> SamplingArgs:
    """Fill the preset's defaults into the None arguments and validate everything.

    Needs no model, so front ends (the CLI, a server) can reject bad input before loading weights.
    A None seed is drawn at random here (and reported back through ``Video.seed``). For i2v/flf2v, the size
    comes from the image (:func:`image_size`); ``max_area`` only selects the default shift.

    Raises:
        ValueError: height/width not positive multiples of 16, num_frames not 4k+1, steps < 1,
            an unknown solver, shift <= 0, or a seed outside [0, 2**63).
    """
    p = preset
    height = p.height if height is None else height
    width = p.width if width is None else width
    num_frames = p.num_frames if num_frames is None else num_frames
    steps = p.num_inference_steps if num_inference_steps is None else num_inference_steps
    guidance_scale = p.guidance_scale if guidance_scale is None else float(guidance_scale)
    solver_name = p.sample_solver if sample_solver is None else sample_solver
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 16:
            raise ValueError(f"{name} must be a positive multiple of 16, got {v!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1 (1, 5, 9, ..., 81), got {num_frames!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")
    if solver_name not in SOLVERS:
        raise ValueError(f"sample_solver must be one of {SOLVERS}, got {solver_name!r}")
    shift = default_shift(p, height, width, max_area) if shift is None else float(shift)
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if seed is None:
        seed = random.randint(0, 2**63 - 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return SamplingArgs(height, width, num_frames, steps, guidance_scale, shift, solver_name, seed)


def image_size(preset: Preset, image_hw: tuple[int, int], *, height: int | None = None, width: int | None = None,
               max_area: int | None = None) -> tuple[int, int, int | None]:
    """The output size of an i2v/flf2v generation: ``(height, width, max_area)``.

    Official sizing (``wan21-reference.md`` §7.2): the output keeps the first image's aspect ratio within
    ``max_area`` pixels (default: the preset's ``height * width``), each side a multiple of 16. Giving both
    ``height`` and ``width`` instead asks for that exact size (the image is squashed to it, as diffusers does).

    Args:
        preset: an i2v/flf2v preset.
        image_hw: ``(H, W)`` of the first image in pixels.
        height, width: an explicit output size (both or neither).
        max_area: the pixel area to fit (``--size 832*480`` of the official CLI is ``max_area=399360``).

    Returns:
        ``(height, width, max_area)`` with ``max_area`` None when an explicit size was given.

    Raises:
        ValueError: only one of height/width, both a size and max_area, a bad max_area, or an aspect ratio
            too extreme for the area.
    """
    from .images import size_from_max_area

    if (height is None) != (width is None):
        raise ValueError("give both height and width (an exact output size) or neither (the size then follows "
                         "the image's aspect ratio within max_area)")
    if height is not None:
        if max_area is not None:
            raise ValueError("give either max_area or height and width, not both")
        return height, width, None
    if max_area is None:
        max_area = preset.max_area
    if isinstance(max_area, bool) or not isinstance(max_area, int) or max_area <= 0:
        raise ValueError(f"max_area must be a positive int (pixels, e.g. 480*832), got {max_area!r}")
    h, w = size_from_max_area(image_hw[0], image_hw[1], max_area)
    return h, w, max_area


class Engine:
    """A loaded Wan2.1 model, ready to generate.

    Example:
        >>> video = wanrt.Engine("tiny").generate("a corgi surfing a wave", seed=7)
        >>> video.save("corgi.mp4")

    Args:
        model: preset name ("t2v-1.3b", "t2v-14b", "i2v-14b-480p", "i2v-14b-720p", "flf2v-14b-720p", "tiny",
            "tiny-i2v", "tiny-flf2v"; see ``wanrt.PRESETS``). The I2V 480P and 720P checkpoints have identical
            tensors: the preset name chooses the defaults (a name in the checkpoint that says otherwise is logged).
        checkpoint_dir: the downloaded checkpoint (official or diffusers layout). May be None only for the
            tiny presets, which then generate (once) and cache a random tiny checkpoint in
            ``~/.cache/wanrt`` (``$XDG_CACHE_HOME/wanrt``).
        device: torch device (default CUDA when available, else CPU).
        precision: "fp32", "bf16" or "fp16" (see :class:`EngineConfig`).
        backend: the DiT's kernels: "auto" (default: the fastest eligible here, logged), "eager" (the exact
            reference path), "sdpa", "triton", "flash-attn", "sageattention" or "xformers"; ``engine.plan`` holds
            the resolution. An explicit backend that cannot run here raises ``BackendUnavailableError`` (a
            RuntimeError) naming the install command and the available backends, before any weight is read.
        **options: the loop options of :class:`EngineConfig`: ``cfg_batch``, ``cuda_graphs``, ``compile``,
            ``teacache_threshold``, ``teacache_mode``, ``teacache_coefficients``, ``prompt_cache_size``,
            ``text_encoder_precision``, ``text_encoder_device``, ``offload_text_encoder``, ``vae_backend``,
            ``vae_tiling``, ``image_cache_size``, ``offload_image_encoder``, ``image_encoder_precision``.

    Raises:
        ValueError: unknown preset/precision/backend, no checkpoint_dir for a non-tiny preset, or a
            checkpoint whose architecture differs from the preset's.
        FileNotFoundError, LayoutError, CheckpointError: from the loaders.
    """

    def __init__(self, model: str, checkpoint_dir: str | Path | None = None, *, device=None,
                 precision: str = "bf16", backend: str = "auto", **options):
        preset = get_preset(model)
        config = _engine_config(device, precision, backend, options)  # validated before anything is written
        if checkpoint_dir is None:
            from .checkpoints.tiny import cached_tiny_checkpoint, is_tiny

            if not is_tiny(preset):
                raise ValueError(
                    f"preset {preset.name!r} needs checkpoint_dir: download the Wan2.1 weights yourself "
                    "(official or diffusers layout) and pass the folder"
                )
            from .ops.backends import plan, probe_capabilities

            # an explicit kernel backend that cannot run here fails before the tiny checkpoint is written
            head_dim = preset.arch.dim // preset.arch.num_heads
            plan(config.backend, probe_capabilities(config.device, config.dit_dtype, head_dim))
            checkpoint_dir = cached_tiny_checkpoint("official", preset.name)
        self._init(preset, Path(checkpoint_dir), config, check=True)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, *, device=None, precision: str = "bf16",
                        backend: str = "auto", **options) -> "Engine":
        """Load a checkpoint folder and infer the task and sampling defaults from its architecture.

        A checkpoint of a size no preset describes gets the defaults of its task (the t2v defaults for
        t2v). An I2V-14B checkpoint is told 480P from 720P by its names (the folder, or ``_name_or_path`` in
        its configs, e.g. ``Wan2.1-I2V-14B-720P``); when none says, the 480P preset is used and a warning logged.
        Raises as :class:`Engine`.
        """
        self = cls.__new__(cls)
        self._init(None, Path(checkpoint_dir), _engine_config(device, precision, backend, options), check=False)
        return self

    def _init(self, preset: Preset | None, ckpt: Path, config: EngineConfig, check: bool):
        from .checkpoints.loaders import load_text_encoder, load_transformer, load_vae

        self.config = config
        self.checkpoint_dir = ckpt
        dev = self.config.device
        quant = self.config.precision if self.config.precision in QUANTIZED_PRECISIONS else None
        self.transformer = load_transformer(ckpt, device=dev, dtype=self.config.dit_dtype, backend=self.config.backend,
                                            quantization=quant)
        arch = self._arch()
        hint = resolution_hint(_checkpoint_names(ckpt)) if arch["model_type"] == "i2v" else None
        if preset is None:
            preset = preset_for_arch(arch, hint) or _generic_preset(arch)
            if arch["model_type"] == "i2v" and hint is None and preset.name.startswith("i2v-14b"):
                log.warning("%s: nothing in the checkpoint's names says 480P or 720P (the two I2V checkpoints have "
                            "identical tensors); using preset %s. Name the preset to choose: "
                            "Engine('i2v-14b-720p', path)", ckpt, preset.name)
        else:
            if check:
                check_against(preset, arch)
            if hint is not None and preset.task == "i2v" and not preset.name.endswith(hint):
                log.warning("%s: the checkpoint's name says %s but preset %s was requested; its defaults apply",
                            ckpt, hint.upper(), preset.name)
        self.preset = preset
        self.vae = load_vae(ckpt, device=dev, dtype=torch.float32)
        self.text_encoder = self._load_text_encoder(ckpt, load_text_encoder)
        self.image_encoder = None
        if preset.task != "t2v":
            from .checkpoints.loaders import load_image_encoder

            home = torch.device("cpu") if self.config.offload_image_encoder else dev
            self.image_encoder = load_image_encoder(ckpt, device=home, dtype=self.config.image_dtype)
            clip_dim = self.image_encoder.config.dim
            if clip_dim != self.transformer.config.image_dim:
                from .checkpoints.io import CheckpointError

                raise CheckpointError(f"the image encoder's width {clip_dim} differs from the DiT's image_dim "
                                      f"{self.transformer.config.image_dim}: the parts come from different models")
        self._image_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._setup_vae()
        self._lock = _device_lock(dev)
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        if self.config.compile:
            backend_name = self.config.compile if isinstance(self.config.compile, str) else "inductor"
            for block in self.transformer.blocks:
                block.compile(backend=backend_name, fullgraph=True, dynamic=False)
        self._graphs = None
        if self.config.use_cuda_graphs:
            from .sampling.loop import make_step_graphs

            self._graphs = make_step_graphs(self.transformer)

    def _setup_vae(self) -> None:
        """Select the VAE decoder backend (its availability was checked by :func:`_engine_config`)."""
        self._vae_engine = None
        if self.config.vae_backend == "triton":
            self.vae.set_backend("triton")

    def _load_text_encoder(self, ckpt: Path, loader):
        """The UMT5 encoder on ``text_device`` (on the CPU while offloaded), quantized layer by layer when
        ``text_encoder_precision`` is 8-bit."""
        cfg = self.config
        home = torch.device("cpu") if cfg.offload_text_encoder else cfg.text_device
        scheme = cfg.text_encoder_precision if cfg.text_encoder_precision in QUANTIZED_PRECISIONS else None
        te = loader(ckpt, device="cpu" if scheme else home, dtype=cfg.text_dtype,
                    text_len=self.transformer.config.text_len)
        if scheme:
            from .quant import QuantConfig, quantize_, t5_filter

            compute = torch.bfloat16 if cfg.text_dtype == torch.float32 and scheme != "int8-wo" else cfg.text_dtype
            quantize_(te.model, QuantConfig(scheme, out_dtype=compute), t5_filter, device=home)
            te.model.to(home)
        return te

    def _arch(self) -> dict:
        c = self.transformer.config
        return dict(model_type=c.model_type, dim=c.dim, ffn_dim=c.ffn_dim, num_heads=c.num_heads,
                    num_layers=c.num_layers, in_dim=c.in_dim, out_dim=c.out_dim, text_dim=c.text_dim,
                    image_dim=c.image_dim)

    @property
    def device(self) -> torch.device:
        """The device the models run on."""
        return self.config.device

    @property
    def plan(self):
        """The DiT's resolved backends (``wanrt.ops.OpsPlan``: attention and fused-op backends)."""
        return self.transformer.plan

    def __repr__(self) -> str:
        return (f"Engine(preset={self.preset.name!r}, checkpoint={str(self.checkpoint_dir)!r}, "
                f"device={self.device}, precision={self.config.precision!r}, backend={self.plan.name!r})")

    # ------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> list[torch.Tensor]:
        """UMT5 embeddings, one ``[L_i, text_dim]`` tensor per prompt (trimmed to its real tokens).

        Results are kept in an LRU of ``prompt_cache_size`` prompts (the same text encoder, so the same
        embeddings): a service that repeats its negative prompt runs the text encoder once for it.
        """
        size = self.config.prompt_cache_size
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        fresh = dict(zip(missing, self._encode(missing), strict=True)) if missing else {}
        out = [fresh[p] if p in fresh else self._prompt_cache[p] for p in prompts]
        if size:
            for p in prompts:
                if p in fresh:
                    self._prompt_cache[p] = fresh[p]
                self._prompt_cache.move_to_end(p)
            while len(self._prompt_cache) > size:
                self._prompt_cache.popitem(last=False)
        return out

    def _encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Run the text encoder; with ``offload_text_encoder`` it visits its device only for this call."""
        if not self.config.offload_text_encoder:
            return self.text_encoder.encode(prompts)
        model, device = self.text_encoder.model, self.config.text_device
        model.to(device)
        try:
            return [e.to(self.device) for e in self.text_encoder.encode(prompts)]
        finally:
            model.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def prompt_cache_info(self) -> dict[str, int]:
        """``{"size": cached prompts, "max": prompt_cache_size}``."""
        return {"size": len(self._prompt_cache), "max": self.config.prompt_cache_size}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents ``[1, 16, F', H', W']`` to a video ``[1, 3, 1+4(F'-1), 8H', 8W']`` in [-1, 1]."""
        return torch.cat(list(self.decode_stream(latents)), dim=2)

    def decode_stream(self, latents: torch.Tensor):
        """Decode chunk by chunk: yields ``[1, 3, n, H, W]`` float32 in [-1, 1] (n = 1, then 4 per latent frame).

        Untiled, activation memory is independent of the number of frames. With tiling (``vae_tiling``, or
        automatically above 720P) the tiles are decoded one at a time through all frames (one tile's cache alive
        at a time: memory bounded by the tile) and the blended video is then handed out in the same chunks.
        """
        lat = latents.to(self.device, torch.float32)
        if self._use_tiling(lat):
            from .models.vae_tiling import decode_tiled

            return _chunks(decode_tiled(self.vae, lat))
        if self.config.vae_backend == "tensorrt":
            return self._tensorrt_decoder(lat).decode_stream(lat)
        return self.vae.decode_stream(lat)

    def _tensorrt_decoder(self, latents: torch.Tensor):
        """The TensorRT decoder for this latent size: exported to ONNX and built once per (batch, size), cached on
        disk under ``build/trt`` (keyed by TensorRT version, GPU and shapes) and in this Engine."""
        from .graph.onnx_vae import export_decoder_onnx
        from .graph.tensorrt_vae import TensorRTDecoder, build_decoder_engine

        b, _, _, h, w = latents.shape
        key = (b, h, w)
        decoders = self.__dict__.setdefault("_trt_decoders", {})
        if key not in decoders:
            onnx = Path("build/trt/onnx") / f"vae-decoder-{b}x{h * 8}x{w * 8}.onnx"
            export_decoder_onnx(self.vae, onnx, height=h * 8, width=w * 8, batch=b)
            decoders[key] = TensorRTDecoder(build_decoder_engine(onnx, "build/trt"), device=self.device)
        return decoders[key]

    def _use_tiling(self, latents: torch.Tensor) -> bool:
        if self.config.vae_tiling is not None:
            return self.config.vae_tiling
        from .models.vae_tiling import should_tile

        return should_tile(latents.shape[3], latents.shape[4])

    def _check_embeds(self, name: str, e: torch.Tensor | None) -> torch.Tensor | None:
        if e is None:
            return None
        c = self.transformer.config
        if not isinstance(e, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [1, L, {c.text_dim}], got {type(e).__name__}")
        if e.ndim == 2:
            e = e[None]
        if e.ndim != 3 or e.shape[0] != 1:
            raise ValueError(f"{name} must have shape [1, L, {c.text_dim}], got {tuple(e.shape)}")
        if e.shape[2] != c.text_dim:
            raise ValueError(f"{name} has width {e.shape[2]}, but this model's text_dim is {c.text_dim}")
        if not 1 <= e.shape[1] <= c.text_len:
            raise ValueError(f"{name} has {e.shape[1]} tokens; the model takes 1..{c.text_len}")
        if not e.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {e.dtype}")
        if not torch.isfinite(e).all():
            raise ValueError(f"{name} contains NaN or Inf")
        return e

    @torch.no_grad()
    def generate(
        self,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        *,
        image=None,
        last_image=None,
        max_area: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        sample_solver: str | None = None,
        seed: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        teacache_threshold: float | None = _UNSET,
        teacache_mode: str | None = None,
        teacache_coefficients: tuple[float, ...] | None = None,
        callback: Callable[[int, int, torch.Tensor], bool | None] | None = None,
        cancel: threading.Event | None = None,
        on_frames: Callable[[np.ndarray, int], None] | None = None,
        keep_frames: bool = True,
        progress: bool = True,
    ) -> Video:
        """Generate a video from a text prompt, and for i2v/flf2v models from a first (and last) frame.

        Every argument left None takes the preset's official default; for the Wan2.1 presets these are
        height 480, width 832, num_frames 81, 50 steps (40 for i2v), guidance 5.0, the task's shift (5.0 for
        t2v; i2v 3.0 at the 480P area, else 5.0; 16 for flf2v), the UniPC solver and the official Chinese
        negative prompt (with the i2v/flf2v prefixes). The tiny presets default to 64x96, 9 frames, 4 steps so
        that a whole video takes seconds on a CPU.

        Image-to-video (``wan21-reference.md`` §7): the video starts at ``image`` (and, for flf2v, ends at
        ``last_image``); the size follows the image's aspect ratio within ``max_area`` pixels (default: the
        preset's height*width, e.g. 832*480 for i2v-14b-480p), each side a multiple of 16, unless ``height`` and
        ``width`` are both given. The DiT sees CLIP ViT-H/14 features of the frame(s) and their VAE latents
        with a 4-channel mask of the known frames; both CFG branches share them (only the text differs).

        Args:
            prompt: the text prompt (or give ``prompt_embeds``).
            negative_prompt: the CFG negative prompt; None uses the official default negative prompt.
            image: i2v/flf2v: the first frame, as a ``PIL.Image``, an ``HxWx3`` uint8 (or uint16, or float in
                [0, 1]) RGB array, or a path. Grayscale and palette images become RGB, transparency is
                composited over white, 16-bit images are scaled to 8 bits (see :func:`wanrt.images.load_image`).
            last_image: flf2v: the last frame (same types). When its size differs from the first frame's it is
                scaled to cover it and center-cropped (:func:`wanrt.images.match_last_frame`).
            max_area: i2v/flf2v: pixel area of the output (default: the preset's height*width).
            height, width: output size in pixels, multiples of 16 (for i2v/flf2v: an exact size instead of
                ``max_area``; give both).
            num_frames: output frames, 4k+1 (81 = 5 s at 16 fps).
            num_inference_steps: denoising steps, >= 1.
            guidance_scale: classifier-free guidance scale; at 1.0 the negative pass is skipped.
            shift: flow-matching sigma shift (sigma' = s*sigma / (1 + (s-1)*sigma)).
            sample_solver: "unipc" (official default), "dpm++" or "euler".
            seed: seed of the initial noise; None draws one (reported as ``Video.seed``). The noise is drawn
                on the CPU with ``torch.Generator().manual_seed(seed)``, so a seed gives the same video on
                any device (it differs from the official code, which draws on the GPU).
            prompt_embeds: precomputed text embeddings ``[1, L, text_dim]`` (L <= text_len).
            negative_prompt_embeds: precomputed negative embeddings ``[1, L, text_dim]``.
            latents: initial noise ``[1, 16, (F-1)/4+1, H/8, W/8]``, replaces the seeded noise.
            teacache_threshold: TeaCache threshold (default: the Engine's ``teacache_threshold``); None or 0
                computes every step exactly. Published starting points: 0.08 for t2v-1.3B ("e"), 0.20 for
                t2v-14B ("e0"); larger skips more steps and drifts further from the uncached video.
            teacache_mode: "e" or "e0" (default: the Engine's).
            teacache_coefficients: the rescaling polynomial (default: the Engine's, else the preset's).
            callback: called after every step as ``callback(step, num_steps, latents)`` (``step`` 0-based,
                ``latents`` the current ``[1, 16, F', H', W']`` on the device: a solver buffer that the step after
                next overwrites, so ``clone()`` what you keep, and do not modify it). Returning False cancels.
            cancel: a ``threading.Event``; when set (e.g. from another thread) the generation stops at the
                next step boundary.
            on_frames: called as ``on_frames(frames, start)`` with each decoded chunk (uint8 ``[n, H, W, 3]``,
                n = 1 for the first latent frame, then 4) as soon as the VAE produces it; e.g. the ``write`` of a
                :class:`wanrt.video.Mp4Writer` to stream the MP4 to disk.
            keep_frames: keep all frames in ``Video.frames`` (set False with ``on_frames`` to keep host memory
                independent of the video length; ``Video.frames`` is then empty).
            progress: show a tqdm progress bar.

        Returns:
            :class:`~wanrt.video.Video` with ``.frames`` uint8 ``[F, H, W, 3]``, ``.fps``, ``.seed``,
            ``.latents`` (final denoised latents, CPU float32), ``.timings`` (seconds per stage) and
            ``.stats`` (TeaCache computed/skipped steps per branch, whether CFG was batched, graph use).

        Raises:
            ValueError: invalid arguments (checked before any work is done), including an image that cannot
                be read, is too small (< 16 px) or too large (> 2**26 px), an image given to a t2v model, or a
                missing image/last_image for i2v/flf2v.
            TypeError: an image of an unsupported type.
            FileNotFoundError: an image path that does not exist.
            FloatingPointError: the DiT produced NaN/Inf (names the step).
            Cancelled: the callback returned False or ``cancel`` was set; the VAE decode is skipped and the
                latents reached so far are on the exception.
            GenerationError: the VAE decode failed; the finished latents are kept on the exception.

        Thread safety: calls are serialized per device (engines sharing a GPU take turns), so several
        threads may call ``generate()`` on one Engine; each call waits for the ones before it.
        """
        with self._lock:
            return self._generate(
                prompt, negative_prompt, image=image, last_image=last_image, max_area=max_area,
                height=height, width=width, num_frames=num_frames,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, shift=shift,
                sample_solver=sample_solver, seed=seed, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, latents=latents,
                teacache_threshold=teacache_threshold, teacache_mode=teacache_mode,
                teacache_coefficients=teacache_coefficients, callback=callback, cancel=cancel, progress=progress,
                on_frames=on_frames, keep_frames=keep_frames,
            )

    def _check_images(self, image, last_image, height, width, max_area):
        """Validate the image inputs against the task; returns ``(first, last, height, width, max_area)``
        with the images as ``[3, H, W]`` float32 tensors in [-1, 1] (None for t2v) and the output size."""
        task = self.preset.task
        if task == "t2v":
            if image is not None or last_image is not None:
                raise ValueError(f"preset {self.preset.name!r} is text-to-video and takes no image; load an i2v "
                                 "checkpoint (image) or an flf2v one (image and last_image)")
            if max_area is not None:
                raise ValueError("max_area applies to image-to-video; for text-to-video give height and width")
            return None, None, height, width, None
        if image is None:
            raise ValueError(f"preset {self.preset.name!r} ({task}) needs image=... (a PIL image, an HxWx3 array "
                             "or a path)")
        if task == "i2v" and last_image is not None:
            raise ValueError(f"preset {self.preset.name!r} is image-to-video; last_image needs a first-last-frame "
                             "(flf2v) checkpoint")
        if task == "flf2v" and last_image is None:
            raise ValueError(f"preset {self.preset.name!r} is first-last-frame-to-video and needs last_image=...")
        from .images import load_image, match_last_frame

        first = load_image(image, name="image")
        last = None
        if last_image is not None:
            last = match_last_frame(first, load_image(last_image, name="last_image"))
        height, width, max_area = image_size(self.preset, tuple(first.shape[1:]), height=height, width=width,
                                             max_area=max_area)
        return first, last, height, width, max_area

    def _image_conditioning(self, first: torch.Tensor, last: torch.Tensor | None, height: int, width: int,
                            num_frames: int, timings: dict[str, float]) -> tuple[dict[str, torch.Tensor], str]:
        """``({"y": [1, 20, F', H/8, W/8] float32, "clip_fea": [1, 257 or 514, image_dim]}, state)`` on the
        device (``wan21-reference.md`` §7.5-7.8), from an LRU (``image_cache_size``) keyed by the images'
        content, the size and the frame count; ``state`` is "cached" or "computed".

        CLIP sees the images at their own resolution (squash-resized to 224 inside the encoder); the VAE
        encodes the conditioning video (the first frame bicubic-resized to the output size, then zeros, and the
        last frame for FLF2V) chunk by chunk, never holding the whole video.
        """
        import hashlib

        from .images import conditioning_chunks, conditioning_mask, resize_bicubic

        digest = hashlib.sha1()
        for img in (first, last):
            if img is not None:
                digest.update(str(tuple(img.shape)).encode())
                digest.update(img.numpy().tobytes())
        key = (digest.hexdigest(), height, width, num_frames)
        if key in self._image_cache:
            self._image_cache.move_to_end(key)
            y, clip = self._image_cache[key]
            return {"y": y, "clip_fea": clip}, "cached"
        t0 = time.perf_counter()
        images = [first] if last is None else [first, last]
        clip = self._encode_images(images)  # [n, 257, image_dim]
        clip = clip.reshape(1, -1, clip.shape[-1]).to(self.device)  # [1, n*257, image_dim]
        self._sync()
        timings["image_encoder"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        first_r = resize_bicubic(first, height, width)
        last_r = resize_bicubic(last, height, width) if last is not None else None
        cache = self.vae.new_encoder_cache()
        parts = [self.vae.encode_chunk(chunk, cache) for chunk in conditioning_chunks(first_r, last_r, num_frames)]
        latent = torch.cat(parts, dim=2)  # [1, 16, F', H/8, W/8]
        mask = conditioning_mask(num_frames, latent.shape[3], latent.shape[4], last_frame=last is not None,
                                 device=latent.device)  # [4, F', H/8, W/8]
        y = torch.cat([mask[None], latent], dim=1).to(self.device, torch.float32)  # [1, 20, F', H/8, W/8]
        self._sync()
        timings["vae_encode"] = time.perf_counter() - t0
        self._image_cache[key] = (y, clip)
        while len(self._image_cache) > self.config.image_cache_size:
            self._image_cache.popitem(last=False)
        return {"y": y, "clip_fea": clip}, "computed"

    def _encode_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """CLIP features ``[n, 257, image_dim]``; with ``offload_image_encoder`` the tower visits the device only
        for this call."""
        if not self.config.offload_image_encoder:
            return self.image_encoder.encode(images)
        model = self.image_encoder.model
        model.to(self.device)
        try:
            return self.image_encoder.encode(images)
        finally:
            model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _teacache(self, threshold, mode, coefficients, steps: int):
        """The TeaCache state for one generation, or None (resolves Engine defaults; raises ValueError)."""
        from .cache.teacache import TeaCache, TeaCacheConfig, default_coefficients

        cfg = self.config
        threshold = cfg.teacache_threshold if threshold is _UNSET else threshold
        if threshold is None or threshold == 0:
            return None
        mode = mode or cfg.teacache_mode
        coefficients = coefficients or cfg.teacache_coefficients or default_coefficients(self.preset.name, mode)
        if coefficients is None:
            raise ValueError(
                f"no TeaCache coefficients for preset {self.preset.name!r} in mode {mode!r}: pass "
                "teacache_coefficients=... (fit them with `wanrt calibrate-teacache`)")
        return TeaCache(TeaCacheConfig(threshold=float(threshold), mode=mode, coefficients=tuple(coefficients)),
                        num_steps=steps)

    def _batch_cfg_fits(self, lat_shape: tuple[int, ...]) -> bool:
        """Whether a batch-2 DiT forward fits in the free device memory (CUDA; always True elsewhere).

        Estimate of the extra activations of the second sample, per token: the FFN hidden state, q/k/v/o
        and the attention output in the compute dtype, the float32 residual and norm outputs; times 1.5.
        """
        if self.device.type != "cuda":
            return True
        c = self.transformer.config
        tokens = lat_shape[2] * (lat_shape[3] // c.patch_size[1]) * (lat_shape[4] // c.patch_size[2])
        per_token = 2 * c.ffn_dim + 2 * 6 * c.dim + 4 * 3 * c.dim
        need = 1.5 * tokens * per_token
        free, _ = torch.cuda.mem_get_info(self.device)
        return need < free

    def _generate(self, prompt, negative_prompt=None, *, image=None, last_image=None, max_area=None, height=None,
                  width=None, num_frames=None, num_inference_steps=None, guidance_scale=None, shift=None,
                  sample_solver=None, seed=None, prompt_embeds=None, negative_prompt_embeds=None, latents=None,
                  teacache_threshold=_UNSET, teacache_mode=None, teacache_coefficients=None, callback=None,
                  cancel=None, progress=True, on_frames=None, keep_frames: bool = True, recorder=None,
                  decode: bool = True) -> Video:
        p = self.preset
        first, last, height, width, max_area = self._check_images(image, last_image, height, width, max_area)
        a = resolve_sampling_args(
            p, height=height, width=width, num_frames=num_frames, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, shift=shift, sample_solver=sample_solver, seed=seed, max_area=max_area,
        )
        if last is not None and a.num_frames < 5:
            raise ValueError(f"first-last-frame generation needs num_frames >= 5 (4k+1), got {a.num_frames}")
        height, width, num_frames, steps = a.height, a.width, a.num_frames, a.num_inference_steps
        guidance_scale, shift, solver_name, seed = a.guidance_scale, a.shift, a.sample_solver, a.seed
        if prompt is None and prompt_embeds is None:
            raise ValueError("give a prompt or prompt_embeds")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give either prompt or prompt_embeds, not both")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give either negative_prompt or negative_prompt_embeds, not both")
        prompt_embeds = self._check_embeds("prompt_embeds", prompt_embeds)
        negative_prompt_embeds = self._check_embeds("negative_prompt_embeds", negative_prompt_embeds)
        lat_shape = a.latent_shape
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != lat_shape:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"latents must have shape {lat_shape} for this size and frame count, got {got}")
            if not torch.isfinite(latents).all():
                raise ValueError("latents contain NaN or Inf")
        do_cfg = guidance_scale != 1.0
        if teacache_mode is not None and teacache_mode not in ("e", "e0"):
            raise ValueError(f"teacache_mode must be 'e' or 'e0', got {teacache_mode!r}")
        if teacache_threshold is not _UNSET and teacache_threshold is not None and not teacache_threshold >= 0:
            raise ValueError(f"teacache_threshold must be None or >= 0, got {teacache_threshold!r}")
        if cancel is not None and not hasattr(cancel, "is_set"):
            raise ValueError(f"cancel must be a threading.Event, got {type(cancel).__name__}")
        teacache = self._teacache(teacache_threshold, teacache_mode, teacache_coefficients, steps)

        from .sampling.loop import GuidedStep
        from .sampling.schedulers import make_solver

        solver = make_solver(solver_name, steps, shift)
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        # 1. text
        t0 = time.perf_counter()
        if prompt_embeds is None:
            texts = [prompt]
        else:
            texts = []
        if do_cfg and negative_prompt_embeds is None:
            texts.append(p.negative_prompt if negative_prompt is None or negative_prompt == "" else negative_prompt)
        encoded = self.encode_prompt(texts) if texts else []
        cond = prompt_embeds if prompt_embeds is not None else encoded.pop(0)[None]
        uncond = None
        if do_cfg:
            uncond = negative_prompt_embeds if negative_prompt_embeds is not None else encoded.pop(0)[None]
        cond = cond.to(self.device)
        uncond = uncond.to(self.device) if uncond is not None else None
        self._sync()
        timings["text_encoder"] = time.perf_counter() - t0

        # 2. noise (on the CPU so that a seed means the same video everywhere)
        if latents is None:
            g = torch.Generator(device="cpu").manual_seed(seed)
            latents = torch.randn(lat_shape, generator=g, dtype=torch.float32)
        x = latents.to(self.device, torch.float32)

        # 2b. image conditioning (i2v/flf2v): CLIP features and y = [mask, VAE latents of the frames]
        image_cond: dict[str, torch.Tensor] = {}
        image_state = None
        if first is not None:
            image_cond, image_state = self._image_conditioning(first, last, height, width, num_frames, timings)

        # 3. denoising loop
        t0 = time.perf_counter()
        from tqdm.auto import tqdm

        batch_cfg = do_cfg and self.config.use_cfg_batch
        if batch_cfg and not self._batch_cfg_fits(lat_shape):
            log.info("CFG branches run as two passes: a batch-2 forward would not fit in free memory")
            batch_cfg = False
        step_fn = GuidedStep(self.transformer, cond, uncond, guidance_scale, batch_cfg=batch_cfg,
                             teacache=teacache, graphs=self._graphs, recorder=recorder, **image_cond)
        if cancel is not None and cancel.is_set():
            raise Cancelled(-1, x.detach().to("cpu", torch.float32, copy=True), seed)
        bar = tqdm(total=steps, disable=not progress, desc="denoise", unit="step")
        try:
            for i, t in enumerate(solver.timesteps.tolist()):
                v = step_fn(x, int(t), i)
                if not torch.isfinite(v.sum()):  # a NaN/Inf anywhere makes the sum non-finite
                    raise FloatingPointError(f"the DiT produced NaN/Inf at step {i} (timestep {t})")
                x = solver.step(v, i, x)
                bar.update(1)
                stop = callback is not None and callback(i, steps, x) is False
                if stop or (cancel is not None and cancel.is_set()):
                    raise Cancelled(i, x.detach().to("cpu", torch.float32, copy=True), seed)
        finally:
            bar.close()
        self._sync()
        timings["denoise"] = time.perf_counter() - t0
        final = x.detach().to("cpu", torch.float32, copy=True)
        stats = {"cfg_batched": batch_cfg, "cuda_graphs": self._graph_stats(), "steps": steps}
        if image_state is not None:
            stats["image_conditioning"] = image_state
        if teacache is not None:
            stats["teacache"] = teacache.summary()

        # 4. decode; keep the latents if it fails
        if not decode:
            return Video(frames=None, fps=p.fps, seed=seed, latents=final, timings=timings, stats=stats)
        t0 = time.perf_counter()
        chunks: list[np.ndarray] = []
        delivered = 0
        try:
            for chunk in self.decode_stream(x):
                part = to_uint8_frames(chunk)  # [n, H, W, 3]
                if on_frames is not None:
                    on_frames(part, delivered)
                delivered += len(part)
                if keep_frames:
                    chunks.append(part)
        except Exception as e:
            raise GenerationError(
                f"VAE decode failed after {delivered} frames ({type(e).__name__}: {e}); the denoised latents are "
                "kept as .latents", final, seed,
            ) from e
        frames = np.concatenate(chunks) if chunks else np.zeros((0, height, width, 3), np.uint8)
        self._sync()
        timings["vae_decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        return Video(frames=frames, fps=p.fps, seed=seed, latents=final, timings=timings, stats=stats)

    def calibrate_teacache(self, prompt: str, *, mode: str = "e", degree: int = 4, progress: bool = False,
                           **sampling) -> dict:
        """Fit TeaCache coefficients for this checkpoint and resolution from one uncached run.

        Runs the denoising loop (no VAE decode) and records, per CFG branch and step, the relative L1
        change of the modulated input (``e`` or ``e0``, by ``mode``) and of the branch's velocity against
        the previous step; fits a polynomial (``degree`` 4, highest power first) from input change to output
        change over all pairs (TeaCache, Liu et al. 2024, §3.3: the rescaling polynomial).

        Args:
            prompt: a representative prompt.
            mode: "e" or "e0".
            degree: polynomial degree.
            progress: show a progress bar.
            **sampling: ``generate()`` sampling arguments (height, width, num_frames, num_inference_steps,
                guidance_scale, shift, sample_solver, seed, negative_prompt; image, last_image and max_area
                for i2v/flf2v models).

        Returns:
            ``{"mode", "coefficients", "input_changes", "output_changes", "preset", "height", "width",
            "num_frames", "num_inference_steps"}``; pass ``coefficients`` as ``teacache_coefficients``.

        Raises:
            ValueError: bad arguments, or too few steps to fit (needs ``degree + 2`` steps).
        """
        from .cache.teacache import TEACACHE_MODES, fit_coefficients, rel_l1

        if mode not in TEACACHE_MODES:
            raise ValueError(f"mode must be one of {TEACACHE_MODES}, got {mode!r}")
        prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        ins: list[float] = []
        outs: list[float] = []

        def record(branch: str, step: int, e: torch.Tensor, v: torch.Tensor) -> None:
            if branch in prev:
                ins.append(rel_l1(e, prev[branch][0]))
                outs.append(rel_l1(v, prev[branch][1]))
            prev[branch] = (e.detach().float().clone(), v.detach().float().clone())

        negative = sampling.pop("negative_prompt", None)
        args = {k: sampling.pop(k, None) for k in (
            "image", "last_image", "max_area", "height", "width", "num_frames", "num_inference_steps",
            "guidance_scale", "shift", "sample_solver", "seed")}
        if sampling:
            raise ValueError(f"unexpected arguments {sorted(sampling)}")
        steps = args["num_inference_steps"] or self.preset.num_inference_steps
        if isinstance(steps, int) and steps < degree + 2:  # other bad values are rejected by generate's checks
            raise ValueError(f"calibration needs at least {degree + 2} steps for a degree-{degree} fit, got {steps}")
        recorder = _ModeRecorder(record, mode)
        with self._lock:
            video = self._generate(prompt, negative, **args, teacache_threshold=None, progress=progress,
                                   recorder=recorder, decode=False)
        _, _, t, h, w = video.latents.shape
        return {"mode": mode, "coefficients": list(fit_coefficients(ins, outs, degree)), "input_changes": ins,
                "output_changes": outs, "preset": self.preset.name, "height": h * VAE_STRIDE[1],
                "width": w * VAE_STRIDE[2], "num_frames": (t - 1) * VAE_STRIDE[0] + 1, "num_inference_steps": steps}

    def _graph_stats(self) -> dict | None:
        if self._graphs is None:
            return None
        return {("with_residual" if k else "plain"): dict(g.stats) for k, g in self._graphs.items()}

    def warmup(self, *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
               guidance_scale: float | None = None, teacache_threshold: float | None = _UNSET) -> dict[str, float]:
        """Do the one-time work of a request shape ahead of the first request.

        Runs a 2-step generation at this size (random noise, the default negative prompt): the kernels
        compile and autotune, ``torch.compile`` (if on) traces, the CUDA graphs of this shape are captured,
        the negative prompt's embeddings enter the prompt cache and the VAE runs once. Later requests of
        the same size start at full speed. For i2v/flf2v models a mid-gray frame of exactly this size (default:
        the preset's) conditions the warm-up, so the image encoder and the VAE encoder run once too.

        Returns:
            The warm-up generation's timings (seconds per stage).

        Raises:
            ValueError: as ``generate()`` for a bad size.
        """
        images = {}
        if self.preset.task != "t2v":
            height = self.preset.height if height is None else height
            width = self.preset.width if width is None else width
            gray = np.full((height, width, 3), 128, np.uint8)
            images = {"image": gray, "last_image": gray if self.preset.task == "flf2v" else None}
        video = self.generate("warm-up", height=height, width=width, num_frames=num_frames, num_inference_steps=2,
                              guidance_scale=guidance_scale, seed=0, teacache_threshold=teacache_threshold,
                              progress=False, **images)
        return video.timings

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _engine_config(device, precision: str, backend: str, options: dict) -> EngineConfig:
    """The validated :class:`EngineConfig`, with the VAE backend checked against this machine: every option
    error is raised before a checkpoint is read or the tiny checkpoint is written.

    Raises:
        ValueError: a bad option; BackendUnavailableError: a VAE backend that cannot run here.
    """
    from .checkpoints.loaders import _device

    config = EngineConfig(_device(device), precision, backend, **options)
    if config.vae_backend == "triton":
        from .kernels._common import interpreting, triton_installed

        if not triton_installed() or (config.device.type != "cuda" and not interpreting()):
            from .ops.backends import BackendUnavailableError

            raise BackendUnavailableError("vae_backend 'triton' needs triton and a CUDA device (or the CPU with "
                                          "TRITON_INTERPRET=1)")
    elif config.vae_backend == "tensorrt":
        from .graph.tensorrt_vae import require_tensorrt

        require_tensorrt()  # raises BackendUnavailableError with the install hint
        if config.device.type != "cuda":
            raise ValueError("vae_backend 'tensorrt' needs a CUDA device")
    return config


def _chunks(video: torch.Tensor):
    """Yield a decoded video ``[B, 3, F, H, W]`` as the causal decode does: 1 frame, then 4 at a time."""
    yield video[:, :, :1]
    for start in range(1, video.shape[2], 4):
        yield video[:, :, start:start + 4]


class _ModeRecorder:
    """A GuidedStep recorder that also says which modulated input (``mode``) it wants."""

    def __init__(self, fn, mode: str):
        self.fn = fn
        self.mode = mode

    def __call__(self, branch: str, step: int, modulated_input: torch.Tensor, velocity: torch.Tensor) -> None:
        self.fn(branch, step, modulated_input, velocity)


def _generic_preset(arch: dict) -> Preset:
    """Sampling defaults for a checkpoint no preset describes (same task defaults, its own architecture)."""
    from dataclasses import replace

    from .presets import Architecture

    base = next(p for p in (get_preset("t2v-1.3b"), get_preset("i2v-14b-480p"), get_preset("flf2v-14b"))
                if p.task == arch["model_type"])
    a = Architecture(**{k: arch[k] for k in ("model_type", "dim", "ffn_dim", "num_heads", "num_layers",
                                              "in_dim", "out_dim", "text_dim", "image_dim")})
    return replace(base, name="custom", arch=a, supported_sizes=())


def _checkpoint_names(ckpt: Path) -> list[str]:
    """Names that may say which I2V checkpoint a folder is (480P or 720P): the folder's own name and the
    ``_name_or_path`` recorded in its configs (official ``config.json``, diffusers ``model_index.json`` and
    ``transformer/config.json``)."""
    import json

    names = [ckpt.resolve().name]
    for rel in ("config.json", "model_index.json", "transformer/config.json"):
        try:
            value = json.loads((ckpt / rel).read_text(encoding="utf-8")).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str):
            names.append(value)
    return names
