"""How an Engine runs (:class:`EngineConfig`) and every vocabulary of options: precisions, kernel backends, VAE
backends, solvers, TeaCache modes. The CLI reads its ``choices`` from here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .cache.teacache import TEACACHE_MODES  # what TeaCache compares between steps: "e" or "e0"
from .ops.backends import BACKEND_NAMES as BACKENDS
from .ops.backends import VAE_BACKENDS  # torch conv3d (reference), wanrt's Triton causal conv3d, TensorRT
from .offload.planner import OFFLOAD_MODES
from .parallel.config import ParallelConfig
from .sampling.schedulers import SOLVER_NAMES as SOLVERS

#: DiT precisions and the dtype of their large weights (the 8-bit ones compute in bf16).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "fp8": torch.bfloat16, "int8": torch.bfloat16, "int8-wo": torch.bfloat16}
#: precisions that quantize the DiT's block Linears (wanrt.quant); they compute in bf16.
QUANTIZED_PRECISIONS = ("fp8", "int8", "int8-wo")
#: the UMT5 text encoder's precision (None: bf16, fp32 with precision "fp32").
TEXT_ENCODER_PRECISIONS = ("bf16", "fp32", *QUANTIZED_PRECISIONS)
#: the CLIP image encoder's precision (None: fp16 on CUDA, bf16 on the CPU, fp32 with precision "fp32").
IMAGE_ENCODER_PRECISIONS = ("fp16", "bf16", "fp32")

__all__ = ["BACKENDS", "EngineConfig", "IMAGE_ENCODER_PRECISIONS", "PRECISIONS", "QUANTIZED_PRECISIONS", "SOLVERS",
           "TEACACHE_MODES", "TEXT_ENCODER_PRECISIONS", "VAE_BACKENDS", "engine_config"]


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
            "tensorrt" (an engine of the decoder step, built once and cached under ``$WANRT_CACHE_DIR/trt``, default ``~/.cache/wanrt/trt``; needs
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
        offload: where the parts live (``wanrt.offload``): "none" (default: everything on the device), "model"
            (each part on the device only while it runs), "block" (the DiT blocks stream from host memory
            through ``offload_window`` device slots; the other parts as "model"), or "auto" (the cheapest mode
            that fits ``vram_budget_gb``). ``engine.memory_plan`` reports the plan.
        vram_budget_gb: the GPU memory the plan must fit in (GiB); a budget that cannot be met raises
            ``BudgetTooSmall`` (a ValueError) naming the smallest feasible one, before anything reaches the GPU.
            With a budget, ``offload`` "none" means "auto".
        offload_window: device slots for streamed blocks (>= 2: one computing, the others arriving).
        offload_to_disk: with block offload, the streamed blocks are not held in host memory: each copy reads the
            block from the checkpoint file (memory-mapped) into a small staging ring (``wanrt.offload.disk``).
        parallel: None (one process), a :class:`~wanrt.parallel.ParallelConfig` (Ulysses x Ring sequence
            parallel, CFG parallel, sharded weights) or ``"auto"`` (a layout chosen from the world size and the
            head count, logged; ``Engine.parallel`` reports it). Needs a process group: launch with torchrun and
            call ``wanrt.distributed.init()`` first. The default device is then ``cuda:LOCAL_RANK``.
        expert_swap: Wan2.2 A14B (two experts): True keeps one expert on the device at a time (the other in pinned
            host memory; they trade places at the boundary), False keeps both there, None (default) swaps when the
            second expert would not fit beside the first (never off CUDA). Ignored for one DiT.
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
    offload: str = "none"
    vram_budget_gb: float | None = None
    offload_window: int = 2
    offload_to_disk: bool = False
    parallel: ParallelConfig | str | None = None
    expert_swap: bool | None = None

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
        if self.teacache_mode not in TEACACHE_MODES:
            raise ValueError(f"teacache_mode must be one of {TEACACHE_MODES}, got {self.teacache_mode!r}")
        if self.teacache_threshold is not None and not self.teacache_threshold >= 0:
            raise ValueError(f"teacache_threshold must be None or >= 0, got {self.teacache_threshold!r}")
        if self.teacache_coefficients is not None:
            object.__setattr__(self, "teacache_coefficients", tuple(float(c) for c in self.teacache_coefficients))
        if self.text_encoder_precision not in (None, *TEXT_ENCODER_PRECISIONS):
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
        if self.image_encoder_precision not in (None, *IMAGE_ENCODER_PRECISIONS):
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
        if self.offload not in (*OFFLOAD_MODES, "auto"):
            raise ValueError(f"offload must be one of {(*OFFLOAD_MODES, 'auto')}, got {self.offload!r}")
        if self.vram_budget_gb is not None:
            if isinstance(self.vram_budget_gb, bool) or not isinstance(self.vram_budget_gb, (int, float)) \
                    or not 0 < self.vram_budget_gb < float("inf"):
                raise ValueError(f"vram_budget_gb must be a positive number of GiB, got {self.vram_budget_gb!r}")
            if self.offload == "none":
                object.__setattr__(self, "offload", "auto")
        elif self.offload == "auto":
            raise ValueError("offload='auto' needs vram_budget_gb (the budget it plans for)")
        if isinstance(self.offload_window, bool) or not isinstance(self.offload_window, int) or self.offload_window < 2:
            raise ValueError(f"offload_window must be an int >= 2, got {self.offload_window!r}")
        if not isinstance(self.offload_to_disk, bool):
            raise ValueError(f"offload_to_disk must be a bool, got {self.offload_to_disk!r}")
        if self.offload_to_disk and self.offload not in ("block", "auto"):
            raise ValueError("offload_to_disk streams DiT blocks: it needs offload='block' (or a vram_budget_gb)")
        if self.offload_to_disk and self.precision in QUANTIZED_PRECISIONS:
            raise ValueError(f"offload_to_disk streams float weights; precision {self.precision!r} quantizes them at "
                             "load (use bf16, fp16 or fp32)")
        if getattr(self.parallel, "shard_weights", False) and self.offload != "none":
            raise ValueError("offload and shard_weights do not combine: shard_weights already spreads the DiT over "
                             "the GPUs (each holds 1/world of it); use one or the other")
        if self.parallel is not None and self.parallel != "auto" and not isinstance(self.parallel, ParallelConfig):
            raise ValueError(f"parallel must be None, 'auto' or a wanrt.ParallelConfig, got {self.parallel!r}")
        if self.expert_swap is not None and not isinstance(self.expert_swap, bool):
            raise ValueError(f"expert_swap must be None, True or False, got {self.expert_swap!r}")

    @property
    def use_cfg_batch(self) -> bool:
        """Batch the CFG branches: as set, else on CUDA (when memory allows, checked per call), off on the CPU."""
        return self.cfg_batch if self.cfg_batch is not None else self.device.type == "cuda"

    @property
    def use_cuda_graphs(self) -> bool:
        """Replay the DiT from CUDA graphs: as set, else on CUDA (never across offloaded weights)."""
        if self.offload != "none":
            return False
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


def engine_config(device, precision: str, backend: str, options: dict) -> EngineConfig:
    """The validated :class:`EngineConfig`: every option error is raised before a checkpoint is read or the tiny
    checkpoint is written. A TensorRT VAE is checked here for its package (the pure plan resolver, which decides
    whether the Triton kernels can run, imports nothing); the kernels themselves are resolved by
    :func:`check_kernels` / ``load_transformer`` before any weight is read.

    Raises:
        ValueError: a bad option; BackendUnavailableError: TensorRT is not installed.
    """
    from .checkpoints.loaders import _device

    parallel = options.get("parallel") is not None
    if parallel and device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # wanrt.distributed.init set LOCAL_RANK's
    config = EngineConfig(_device(device), precision, backend, **options)  # option errors first
    if parallel:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("parallel= needs an initialized process group: launch with `torchrun "
                               "--nproc-per-node N ...` and call wanrt.distributed.init() before creating the Engine "
                               "(or run `wanrt generate --nproc N ...`)")
    if config.vae_backend == "tensorrt":
        from .graph.tensorrt_vae import require_tensorrt

        require_tensorrt()  # raises BackendUnavailableError with the install hint
        if config.device.type != "cuda":
            raise ValueError("vae_backend 'tensorrt' needs a CUDA device")
    return config


_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


def device_lock(device: torch.device) -> threading.Lock:
    """The process-wide lock of ``device``: Engines sharing a device (a GPU) run their generations one at a time,
    whichever thread calls them. One lock per device name, created on first use."""
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(str(device), threading.Lock())


def resolve_kernels(config: EngineConfig, head_dim: int):
    """The :class:`~wanrt.ops.OpsPlan` of ``config`` on its device for a DiT of ``head_dim`` (the pure resolver with
    this machine's capabilities), whatever device the weights are on now. Raises BackendUnavailableError."""
    from .ops.backends import plan
    from .ops.selfcheck import probe_capabilities

    return plan(config.backend, probe_capabilities(config.device, config.dit_dtype, head_dim), vae=config.vae_backend)


def check_kernels(config: EngineConfig, head_dim: int) -> None:
    """Resolve the kernel plan for ``config`` and a DiT of ``head_dim`` (the pure resolver with this machine's
    capabilities), so that an explicit backend that cannot run here fails before any checkpoint is read or written.

    Raises:
        BackendUnavailableError: with the install hint.
    """
    from .ops.backends import plan
    from .ops.selfcheck import probe_capabilities

    plan(config.backend, probe_capabilities(config.device, config.dit_dtype, head_dim), vae=config.vae_backend)
