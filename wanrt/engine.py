"""``Engine``: the loaded parts of a Wan2.1 model (DiT, VAE, text and image encoders) and their caches. A
generation is a few plain parts over one :class:`~wanrt.request.Request` (``docs/architecture.md``)::

    req = engine.request(prompt, **options)   # resolve_request: pure, judged before any work
    cond = engine.text(req), engine.image(...)  # text + image conditioning, cached
    x = denoise(guided_step, make_solver(...), noise, callback=..., cancel=...)
    frames = collect_frames(engine.decoder.decode_stream(x))

The eager path reproduces the official pipeline (``wan/text2video.py``; ``docs/model-reference.md`` §6).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .conditioning import ImageConditioner, TextConditioner, load_text_encoder
from .config import QUANTIZED_PRECISIONS, EngineConfig, check_kernels, device_lock, engine_config
from .decode import Decoder, collect_frames
from .presets import Preset, choose_preset, get_preset
from .request import UNSET, Cancelled, GenerationError, Request, cfg_batch_fits, check_fits, resolve_request
from .video import Video

__all__ = ["Cancelled", "Engine", "EngineConfig", "GenerationError"]

log = logging.getLogger("wanrt")


class Engine:
    """A loaded Wan2.1 or Wan2.2 model, ready to generate (Wan2.2 A14B: two experts, ``transformer`` the high-noise
    one and ``transformer_2`` the low-noise one, placed by ``experts``, an :class:`~wanrt.offload.experts.ExpertSwap`).

    Example:
        >>> video = wanrt.Engine("tiny").generate("a corgi surfing a wave", seed=7)
        >>> video.save("corgi.mp4")

    Args:
        model: preset name (see ``wanrt.PRESETS``; the I2V 480P and 720P checkpoints have identical tensors: the
            preset name chooses the defaults).
        files: instead of ``checkpoint_dir``, one file per part, as ComfyUI users keep them: ``{"dit": the DiT
            (.safetensors in fp16/bf16/fp8/fp8-scaled, or .gguf), "text_encoder": UMT5 (.safetensors, also ComfyUI's
            scaled fp8 with its embedded tokenizer), "vae": ..., "image_encoder": CLIP vision (i2v/flf2v),
            "tokenizer": a tokenizer folder, when the text-encoder file carries none; Wan2.2 A14B: "dit" the high-noise
            expert's file and "dit_2" the low-noise one's}``.
        checkpoint_dir: the checkpoint folder (official or diffusers layout); None only for the tiny presets
            (``tiny``: the model trained by the project, shipped in the package; ``tiny-i2v``/``tiny-flf2v``: a
            random checkpoint written once to ``$XDG_CACHE_HOME/wanrt``).
        device: torch device (default CUDA when available). precision, backend, **options: :class:`EngineConfig`
            (``engine.plan`` holds the resolved kernels; an explicit backend that cannot run here raises
            ``BackendUnavailableError`` with the install command, before any weight is read).

    Raises:
        ValueError: unknown preset/option, no checkpoint_dir for a non-tiny preset, or a checkpoint whose
            architecture differs from the preset's; FileNotFoundError, LayoutError, CheckpointError: the loaders'.
    """

    def __init__(self, model: str, checkpoint_dir: str | Path | None = None, *, files: dict | None = None,
                 device=None, precision: str = "bf16", backend: str = "auto", **options):
        preset = get_preset(model)
        config = engine_config(device, precision, backend, options)  # validated before anything is written
        if files is not None:
            if checkpoint_dir is not None:
                raise ValueError("give checkpoint_dir or files, not both")
            self._files = _check_files(files, preset)
            if config.parallel is not None:
                _layout(config, preset.arch.num_heads, preset.guidance_scale, quiet=True)
            self._load(preset, Path(self._files["dit"]), config, check=True)
            return
        self._files = None
        if config.parallel is not None:  # a layout that cannot fit fails before any weight is read or written
            _layout(config, preset.arch.num_heads, preset.guidance_scale, quiet=True)
        if checkpoint_dir is None:
            from .checkpoints.tiny import default_tiny_checkpoint, is_tiny

            if not is_tiny(preset):
                raise ValueError(f"preset {preset.name!r} needs checkpoint_dir: download the Wan2.1 weights yourself "
                                 "(official or diffusers layout) and pass the folder")
            check_kernels(config, preset.arch.dim // preset.arch.num_heads)  # before the tiny checkpoint is written
            checkpoint_dir = default_tiny_checkpoint(preset.name)  # tiny: the trained model in the package
        self._load(preset, Path(checkpoint_dir), config, check=True)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, *, device=None, precision: str = "bf16",
                        backend: str = "auto", **options) -> Engine:
        """Load a checkpoint folder and infer the task and sampling defaults from its architecture.

        A checkpoint of a size no preset describes gets the defaults of its task (the t2v defaults for
        t2v). An I2V-14B checkpoint is told 480P from 720P by its names (the folder, or ``_name_or_path`` in
        its configs, e.g. ``Wan2.1-I2V-14B-720P``); when none says, the 480P preset is used and a warning logged.
        Raises as :class:`Engine`.
        """
        self = cls.__new__(cls)
        self._files = None
        self._load(None, Path(checkpoint_dir), engine_config(device, precision, backend, options), check=False)
        return self

    def _load(self, preset: Preset | None, ckpt: Path, config: EngineConfig, check: bool) -> None:
        from .checkpoints.loaders import load_transformer, load_vae

        self.config, self.checkpoint_dir = config, ckpt
        dev = config.device
        quant = config.precision if config.precision in QUANTIZED_PRECISIONS else None
        shard = getattr(config.parallel, "shard_weights", False)  # then loaded on the CPU: no replica on the GPU
        offload = config.offload != "none"  # every part read into host memory first, placed by the memory plan
        host = shard or offload
        arch = None
        if getattr(self, "_files", None) and preset is not None:  # single files carry no config: the preset's
            from .checkpoints.tiny import dit_config_for

            if preset.fixture_archs and ckpt.suffix == ".safetensors":  # tiny: trained or fixture size, by shape
                from .checkpoints.loaders import dit_config_of_file

                shapes = dit_config_of_file(ckpt)
                preset = preset.for_arch({f: getattr(shapes, f) for f in
                                          ("model_type", "dim", "ffn_dim", "num_layers", "in_dim")}) or preset
            arch = dit_config_for(preset)
        from .checkpoints.layout import expert_folders

        single = getattr(self, "_files", None)
        experts = expert_folders(ckpt) if not single else \
            (single["dit"], single["dit_2"]) if single.get("dit_2") else None  # Wan2.2 A14B: (high, low)
        if experts is not None:
            _check_moe_config(config)
        swap = config.expert_swap if experts is not None else False
        self.transformer = load_transformer(experts[0] if experts else ckpt, device="cpu" if host or swap else dev,
                                            dtype=config.dit_dtype, backend="eager" if host or swap else config.backend,
                                            quantization=quant, vae_backend=config.vae_backend, config=arch,
                                            defer_blocks=config.offload_to_disk)  # disk: read when placed
        self.preset = preset = choose_preset(preset, ckpt, self.transformer.config, check, moe=experts is not None)
        self.transformer_2, self.experts = None, None  # A14B: the low-noise expert, the placement of the two
        if experts is not None:
            self._load_low_noise_expert(Path(experts[1]), config, quant, swap, host, arch)
        self.mesh, self._shard_stats = None, None
        if config.parallel is not None:
            from .parallel.mesh import build_mesh

            layout = _layout(config, self.transformer.config.num_heads, preset.guidance_scale)
            self.mesh = build_mesh(layout, self.transformer.config.num_heads)
            log.info("parallel layout: %s (rank %d)", self.mesh.describe(), self.mesh.rank)
            if shard:
                from .parallel.shard import shard_weights

                for i, dit in enumerate(self._dits()):  # A14B: each expert sharded the same way
                    stats = shard_weights(dit, self.mesh, dev)
                    self._shard_stats = stats if i == 0 else {k: v + stats[k] for k, v in self._shard_stats.items()}
                    dit.set_backend(config.backend, vae=config.vae_backend)
        files = self._files or {}
        self.vae = load_vae(files.get("vae", ckpt), device="cpu" if offload else dev, dtype=torch.float32)
        self.vae.set_backend(self.plan)  # the VAE's convolution, as resolved with the DiT's kernels
        self.decoder = Decoder(self.vae, dev, self.plan.vae, config.vae_tiling)
        self.text_encoder = self.text = None
        # Offloading: the encoders are read into host memory and visit the device while they run.
        parts = dataclasses.replace(config, offload_text_encoder=True, offload_image_encoder=True) if offload \
            else config
        if self.mesh is None or self.mesh.is_root:  # in a parallel run rank 0 encodes and broadcasts
            self.text_encoder = load_text_encoder(files.get("text_encoder", ckpt), parts,
                                                  self.transformer.config.text_len, self.plan.quant,
                                                  tokenizer=files.get("tokenizer"))
            self.text = TextConditioner(self.text_encoder, dev, config.text_device, parts.offload_text_encoder,
                                        config.prompt_cache_size)
        if self.mesh is not None:
            from .parallel.runner import BroadcastText

            self.text = BroadcastText(self.text, self.mesh, dev)
        self.image = None
        if preset.uses_clip:
            self.image = ImageConditioner.load(files.get("image_encoder", ckpt), parts, self.vae,
                                               self.transformer.config.image_dim)
        elif preset.image_conditioned:  # Wan2.2 I2V-A14B: the conditioning latent alone, no CLIP
            self.image = ImageConditioner(None, self.vae, dev, False, config.image_cache_size)
        self.image_encoder = self.image.image_encoder if self.image is not None else None
        self._first_frames = None  # TI2V: the last image's VAE latent, keyed by content and size
        self.memory_plan = None  # the offload plan (wanrt.offload.MemoryPlan), when the Engine offloads
        if offload:
            from .offload.placement import place, plan_for

            self.memory_plan = plan_for(self, self._default_request())  # BudgetTooSmall before the GPU is touched
            place(self, self.memory_plan)
        self._lock = device_lock(dev)
        if config.compile:
            name = config.compile if isinstance(config.compile, str) else "inductor"
            for dit in self._dits():
                for block in (*dit.blocks, *getattr(dit, "vace_blocks", ())):
                    block.compile(backend=name, fullgraph=True, dynamic=False)
        self.dit = self.transformer  # what the step runs: the DiT, or its sequence-parallel wrapper
        self.dit_2 = self.transformer_2  # A14B: the low-noise expert's
        if self.mesh is not None and self.mesh.sp > 1:
            from .parallel.dit import SequenceParallelDiT

            self.dit = SequenceParallelDiT(self.transformer, self.mesh)
            if self.transformer_2 is not None:
                self.dit_2 = SequenceParallelDiT(self.transformer_2, self.mesh)
        self._graphs = self._graphs_2 = None
        if config.use_cuda_graphs and shard:
            log.info("CUDA graphs are off with shard_weights (FSDP's gathers allocate per call)")
        elif config.use_cuda_graphs:
            from .sampling.loop import make_step_graphs

            self._graphs = make_step_graphs(self.dit)  # under sequence parallel the graph holds the collectives
            if self.transformer_2 is not None:  # A14B: each expert its own graphs
                self._graphs_2 = make_step_graphs(self.dit_2)

    def _load_low_noise_expert(self, folder: Path, config: EngineConfig, quant, swap: bool | None,
                               host: bool = False, arch=None) -> None:
        """A14B: load the low-noise expert beside the high-noise one (``self.transformer``) and decide where the two
        live (:class:`~wanrt.offload.experts.ExpertSwap`: both on the device, or one at a time)."""
        from .checkpoints.io import CheckpointError
        from .checkpoints.loaders import load_transformer
        from .offload.experts import RESERVE_BYTES, ExpertSwap, module_bytes

        dev = config.device
        if swap is None:  # auto: both on the device when the second fits beside the first (sharded: always both)
            swap = not host and dev.type == "cuda" and module_bytes(self.transformer) + RESERVE_BYTES > \
                torch.cuda.mem_get_info(dev)[0]
        self.transformer_2 = load_transformer(folder, device="cpu" if swap or host else dev, dtype=config.dit_dtype,
                                              backend="eager" if swap or host else config.backend,
                                              quantization=quant, vae_backend=config.vae_backend, config=arch)
        if self.transformer_2.config != self.transformer.config:
            raise CheckpointError(f"{folder}: the low-noise expert's architecture differs from the high-noise one's "
                                  f"({self.transformer_2.config} vs {self.transformer.config})")
        if swap:  # the kernels are resolved for the compute device, not for the host the weights wait on
            from .config import resolve_kernels

            kernels = resolve_kernels(config, self.transformer.config.head_dim)
            for dit in self._dits():
                dit.set_backend(kernels)
        self.experts = ExpertSwap((self.transformer, self.transformer_2), dev, swap)
        log.info("A14B experts: %s", self.experts.describe())

    def _dits(self) -> tuple:
        """The DiTs of this Engine: the one, or A14B's (high-noise, low-noise) experts."""
        return (self.transformer,) if self.transformer_2 is None else (self.transformer, self.transformer_2)

    @property
    def device(self) -> torch.device:
        """The device the models run on."""
        return self.config.device

    def _default_request(self) -> Request:
        """The preset's default request (its size and frame count), which the memory plan is made for."""
        kw = {} if not self.preset.image_conditioned else {"image": np.zeros((self.preset.height,
                                                                                  self.preset.width, 3), np.uint8)}
        return resolve_request(self.preset, "memory plan", seed=0, **kw)

    @property
    def parallel(self):
        """The layout this Engine runs under (a :class:`~wanrt.parallel.ParallelConfig`, ``"auto"`` resolved), or
        None for a single process."""
        return self.mesh.config if self.mesh is not None else None

    @property
    def plan(self):
        """The resolved kernels (``wanrt.ops.OpsPlan``): attention, fused ops, activation quantization, VAE."""
        return self.transformer.plan

    def __repr__(self) -> str:
        return (f"Engine(preset={self.preset.name!r}, checkpoint={str(self.checkpoint_dir)!r}, "
                f"device={self.device}, precision={self.config.precision!r}, backend={self.plan.name!r})")

    def encode_prompt(self, prompts: list[str]) -> list[torch.Tensor]:
        """UMT5 embeddings, one ``[L_i, text_dim]`` tensor per prompt (trimmed to its real tokens), kept in an LRU
        of ``prompt_cache_size`` prompts."""
        return self.text.encode(prompts)

    @property
    def prompt_cache_info(self) -> dict[str, int]:
        """``{"size": cached prompts, "max": prompt_cache_size}``."""
        return {"size": len(self.text.cache), "max": self.config.prompt_cache_size}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode latents ``[1, 16, F', H', W']`` to a video ``[1, 3, 1+4(F'-1), 8H', 8W']`` in [-1, 1]."""
        return torch.cat(list(self.decode_stream(latents)), dim=2)

    def decode_stream(self, latents: torch.Tensor):
        """Decode chunk by chunk (:meth:`wanrt.decode.Decoder.decode_stream`): yields ``[1, 3, n, H, W]``."""
        return self.decoder.decode_stream(latents)

    def request(self, prompt: str | None = None, negative_prompt: str | None = None, **options) -> Request:
        """:func:`~wanrt.request.resolve_request` with this Engine's preset and TeaCache defaults, then the memory
        check against the device (:func:`~wanrt.request.check_fits`). Raises ValueError before any work."""
        c = self.config
        req = resolve_request(self.preset, prompt, negative_prompt,
                              teacache_defaults=(c.teacache_threshold, c.teacache_mode, c.teacache_coefficients),
                              **options)
        check_fits(req, self.preset, self.device, dtype_bytes=self.config.dit_dtype.itemsize,
                   tiled_vae=c.vae_tiling, sequence_parallel=self.mesh.sp if self.mesh is not None else 1)
        self._check_loras(req)
        if self.memory_plan is not None and self.memory_plan.budget is not None:
            from .offload.placement import check_budget

            check_budget(self, req)  # RequestTooLarge when this size does not fit the placed plan's budget
        return req

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt: str | None = None, negative_prompt: str | None = None, *, callback=None,
                 cancel: threading.Event | None = None, on_frames=None, keep_frames: bool = True,
                 progress: bool = True, **options) -> Video:
        """Generate a video from a text prompt, and for i2v/flf2v models from a first (and last) frame.

        ``options`` are the request's fields (:func:`wanrt.request.resolve_request` documents each; every one
        left out takes the preset's official default): ``image``, ``last_image``, ``max_area``, ``height``,
        ``width``, ``num_frames``, ``num_inference_steps``, ``guidance_scale``, ``shift``, ``sample_solver``,
        ``seed``, ``prompt_embeds``, ``negative_prompt_embeds``, ``latents``, ``teacache_threshold``,
        ``teacache_mode``, ``teacache_coefficients``, ``timesteps`` / ``sigmas`` (a custom few-step schedule),
        ``loras`` (``{name: strength}`` of runtime LoRAs for this call); for VACE models ``video``, ``mask``,
        ``reference_images``, ``conditioning_scale`` (:mod:`wanrt.vace`); for Wan2.2 A14B ``guidance_scale_2`` (the
        low-noise expert's; ``guidance_scale`` is the high-noise one's) and ``boundary``; Wan2.2 TI2V takes an
        optional ``image`` (image-to-video). The run itself is :meth:`run`.

        Returns / Raises: as :meth:`run`; ValueError for a bad request, before any work.
        """
        return self.run(self.request(prompt, negative_prompt, **options), callback=callback, cancel=cancel,
                        on_frames=on_frames, keep_frames=keep_frames, progress=progress)

    @torch.no_grad()
    def run(self, req: Request, *, callback=None, cancel: threading.Event | None = None, on_frames=None,
            keep_frames: bool = True, progress: bool = True, recorder=None, decode: bool = True) -> Video:
        """Run a resolved request: conditioning, the denoising loop, the streamed VAE decode.

        ``req`` comes from :meth:`request`. ``callback(step, num_steps, latents)`` runs after every step
        (``latents`` is a solver buffer on the device: ``clone()`` what you keep); returning False, or setting the
        ``cancel`` Event, stops at the next step. ``on_frames(frames, start)`` gets each decoded uint8 chunk
        ``[n, H, W, 3]`` (e.g. ``Mp4Writer.write``); ``keep_frames`` keeps them in ``Video.frames``. ``recorder``:
        a ``GuidedStep`` recorder (calibration); ``decode=False`` skips the VAE.

        Returns a :class:`~wanrt.video.Video` (uint8 ``frames [F, H, W, 3]``, ``fps``, ``seed``, CPU float32
        ``latents``, ``timings`` per stage, ``stats``). Raises FloatingPointError (NaN/Inf, naming the step),
        :class:`~wanrt.request.Cancelled` (with the latents so far) or :class:`~wanrt.request.GenerationError`
        (the decode failed; the finished latents are kept). Calls are serialized per device.
        """
        if cancel is not None and not hasattr(cancel, "is_set"):
            raise ValueError(f"cancel must be a threading.Event, got {type(cancel).__name__}")
        with self._lock:
            return self._run(req, callback, cancel, on_frames, keep_frames, progress, recorder, decode)

    def _run(self, req, callback, cancel, on_frames, keep_frames, progress, recorder, decode) -> Video:
        from .sampling.loop import GuidedStep, KeepFrames, denoise
        from .sampling.schedulers import make_solver

        mesh = self.mesh
        if mesh is not None:
            from .parallel import runner

            if recorder is not None:
                raise ValueError("TeaCache calibration runs in one process, not under a parallel layout")
        timings: dict[str, float] = {}
        t_start = t0 = time.perf_counter()
        cond, uncond = self.text(req)
        self._sync()
        timings["text_encoder"] = time.perf_counter() - t0
        x = req.latents  # the noise is drawn on the CPU so that a seed means the same video everywhere
        if x is None:
            x = torch.randn(req.latent_shape, generator=torch.Generator("cpu").manual_seed(req.seed))
        x = x.to(self.device, torch.float32)
        image_cond, stats = {}, {}
        from .offload.placement import visiting

        if req.image is not None and self.image is not None:
            with visiting(self, "vae"):  # the VAE encodes the conditioning frames
                image_cond, stats["image_conditioning"] = self.image(req.image, req.last_image, req.height,
                                                                     req.width, req.num_frames, timings)
            if mesh is not None:
                image_cond = runner.broadcast_image(image_cond, mesh, self.device)
        elif req.task == "vace":
            with visiting(self, "vae"):  # the VAE encodes the source video and the reference images
                image_cond = self._vace_conditioning(req, timings)
            if mesh is not None:
                image_cond = runner.broadcast_image(image_cond, mesh, self.device)
        streaming = self.transformer.offload is not None  # block offload: one forward per step, each block once
        batch_cfg = req.do_cfg and (self.config.use_cfg_batch or streaming) and (mesh is None or mesh.config.cfg == 1)
        if batch_cfg and not streaming and not cfg_batch_fits(req, self.preset, self.device, self.config.dit_dtype.itemsize,
                                            mesh.sp if mesh is not None else 1):
            log.info("CFG branches run as two passes: a batch-2 forward would not fit in free memory")
            batch_cfg = False
        from .cache.teacache import TeaCache

        solver = make_solver(req.sample_solver, req.num_inference_steps, req.shift, schedule=req.schedule(),
                             seed=req.seed)
        if req.task == "ti2v" and req.image is not None:  # TI2V image-to-video: the first latent frame is the image's
            with visiting(self, "vae"):
                fixed = self._ti2v_first_frame(req, timings)  # [1, 48, 1, H/16, W/16]
            x = x.clone()  # (the caller's latents stay as given)
            x[:, :, :1] = fixed
            image_cond = {"token_mask": _first_frame_token_mask(req).to(self.device)}
            solver = KeepFrames(solver, fixed)
        experts = None
        if self.transformer_2 is not None:
            step, teacache = self._expert_step(req, cond, uncond, batch_cfg, recorder, image_cond, solver)
            experts = step
        elif mesh is None:
            teacache = TeaCache(req.teacache, req.num_inference_steps) if req.teacache is not None else None
            step = GuidedStep(self.transformer, cond, uncond, req.guidance_scale, batch_cfg=batch_cfg,
                              teacache=teacache, graphs=self._graphs, recorder=recorder, **image_cond)
        else:
            step, teacache = runner.make_step(self.dit, mesh, cond, uncond, req.guidance_scale,
                                              batch_cfg=batch_cfg, teacache_config=req.teacache,
                                              num_steps=req.num_inference_steps, graphs=self._graphs,
                                              image_cond=image_cond, device=self.device)
        t0 = time.perf_counter()
        moved = self.transformer.offload.moved_bytes if streaming else 0
        swaps = self.experts.stats() if self.experts is not None else None
        with visiting(self, "dit"):
            with self._request_loras(req):
                x = denoise(step, solver, x, seed=req.seed, callback=callback, cancel=cancel,
                            progress=progress and (mesh is None or mesh.is_root),
                            sync=runner.RankSync(mesh, self.device) if mesh is not None else None)
        self._sync()
        timings["denoise"] = time.perf_counter() - t0
        if req.references:  # VACE: the reference images' leading latent frames are not part of the video
            x = x[:, :, req.references:]
        final = x.detach().to("cpu", torch.float32, copy=True)
        stats = {"cfg_batched": batch_cfg, "cuda_graphs": self._graph_stats(), "steps": req.num_inference_steps,
                 **stats}
        if experts is not None:
            after = self.experts.stats()
            stats["experts"] = {"boundary": req.boundary, "steps": {"high": experts.counts[0], "low": experts.counts[1]},
                                "guidance_scale": {"high": req.guidance_scale, "low": req.guidance_scale_2},
                                "placement": after["mode"], "swaps": after["swaps"] - swaps["swaps"],
                                "moved_bytes": after["moved_bytes"] - swaps["moved_bytes"]}
            if teacache is not None:
                stats["teacache"] = {name: tc.summary() if mesh is None else runner.teacache_summary(tc, mesh)
                                     for name, tc in zip(("high", "low"), teacache) if tc is not None}
        elif teacache is not None:
            stats["teacache"] = teacache.summary() if mesh is None else runner.teacache_summary(teacache, mesh)
        if self.memory_plan is not None:
            stats["offload"] = {"plan": self.memory_plan.describe(), "mode": self.memory_plan.mode,
                                "graphed": "nothing: CUDA graphs are not captured across offloaded weights",
                                "moved_bytes": (self.transformer.offload.moved_bytes - moved) if streaming else 0}
        fps = self.preset.fps
        if not decode:
            if mesh is not None:
                stats["parallel"] = runner.stats(mesh, self._graphs is not None, None, self._shard_stats)
            return Video(frames=None, fps=fps, seed=req.seed, latents=final, timings=timings, stats=stats)
        t0 = time.perf_counter()
        try:
            if mesh is not None:
                frames, how = runner.decode(self.decoder, x, mesh, on_frames, keep_frames, (req.height, req.width))
                stats["parallel"] = runner.stats(mesh, self._graphs is not None, how, self._shard_stats)
            else:
                with visiting(self, "vae"):
                    frames = collect_frames(self.decode_stream(x), on_frames, keep_frames, (req.height, req.width))
        except Exception as e:
            raise GenerationError(f"VAE decode failed after {getattr(e, 'delivered', 0)} frames ({type(e).__name__}: "
                                  f"{e}); the denoised latents are kept as .latents", final, req.seed) from e
        self._sync()
        timings["vae_decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        return Video(frames=frames, fps=fps, seed=req.seed, latents=final, timings=timings, stats=stats)

    def _expert_step(self, req, cond, uncond, batch_cfg, recorder, shared, solver):
        """A14B: ``(expert_step, (teacache_high, teacache_low) or None)``: one :class:`GuidedStep` per expert (its own
        guidance scale, TeaCache state, CUDA graphs and calibration record), switched at the boundary by
        :class:`~wanrt.sampling.loop.ExpertStep`, which also puts each expert on the device for its steps."""
        from .cache.teacache import TeaCache
        from .sampling.loop import ExpertStep, GuidedStep, expert_counts

        timesteps = solver.timesteps.tolist()
        counts = expert_counts(timesteps, req.boundary)
        configs = (req.teacache, req.teacache_2)
        scales = (req.guidance_scale, req.guidance_scale_2)
        graphs = (self._graphs, self._graphs_2)
        caches, steps = [], []
        for e, dit in enumerate((self.dit, self.dit_2)):
            # an expert at guidance 1 needs no unconditional branch (its velocity is the conditional one)
            unc = uncond if scales[e] != 1.0 else None
            config = configs[e] if counts[e] > 0 else None
            if self.mesh is not None:
                from .parallel import runner

                step, tc = runner.make_step(dit, self.mesh, cond, unc, scales[e], batch_cfg=batch_cfg,
                                            teacache_config=config, num_steps=counts[e], graphs=graphs[e],
                                            image_cond=shared, device=self.device)
            else:
                tc = TeaCache(config, counts[e]) if config is not None else None
                rec = recorder[e] if isinstance(recorder, (tuple, list)) else recorder
                step = GuidedStep(dit, cond, unc, scales[e], batch_cfg=batch_cfg, teacache=tc, graphs=graphs[e],
                                  recorder=rec, **shared)
            steps.append(step)
            caches.append(tc)
        step = ExpertStep(steps, timesteps, req.boundary, activate=self.experts.activate)
        teacache = tuple(caches) if any(c is not None for c in caches) else None
        return step, teacache

    def _ti2v_first_frame(self, req: Request, timings: dict[str, float]) -> torch.Tensor:
        """TI2V image-to-video: the image scaled to cover the output size with Lanczos, centre-cropped, VAE-encoded:
        ``[1, 48, 1, H/16, W/16]`` float32 on the device (official ``textimage2video.py``), kept for the last image."""
        import hashlib

        from .images import resize_crop_lanczos

        key = (hashlib.sha1(req.image.numpy().tobytes()).hexdigest(), tuple(req.image.shape), req.height, req.width)
        if self._first_frames is not None and self._first_frames[0] == key and self.config.image_cache_size > 0:
            return self._first_frames[1]
        t0 = time.perf_counter()
        img = resize_crop_lanczos(req.image, req.height, req.width)  # [3, H, W] in [-1, 1]
        z = self.vae.encode(img[None, :, None]).to(self.device, torch.float32)  # [1, 48, 1, H/16, W/16]
        self._sync()
        timings["vae_encode"] = time.perf_counter() - t0
        self._first_frames = (key, z)
        return z

    def _vace_conditioning(self, req: Request, timings: dict[str, float]) -> dict[str, torch.Tensor]:
        """VACE's shared DiT inputs for ``req``: ``{"vace_context": [1, 96, R + T, H/8, W/8], "vace_scale":
        [len(vace_layers)]}`` float32 on the device (:func:`wanrt.vace.vace_context`; no source video is the
        official empty input: a gray video, all to generate)."""
        from .vace import vace_context

        t0 = time.perf_counter()
        shape = (req.num_frames, req.height, req.width)
        video = (req.video.permute(3, 0, 1, 2).float() / 127.5 - 1) if req.video is not None else torch.zeros(3, *shape)
        mask = req.mask[None] if req.mask is not None else torch.ones(1, *shape)
        context = vace_context(self.vae, video, mask, req.reference_images or ())
        scale = torch.full((len(self.transformer.config.vace_layers),), req.conditioning_scale,
                           dtype=torch.float32, device=self.device)
        self._sync()
        timings["vae_encode"] = time.perf_counter() - t0
        return {"vace_context": context.to(self.device, torch.float32), "vace_scale": scale}

    def calibrate_teacache(self, prompt: str, *, mode: str = "e", degree: int = 4, progress: bool = False,
                           **options) -> dict:
        """Fit TeaCache coefficients (``mode`` "e" or "e0", a ``degree`` polynomial) for this checkpoint and size
        from one uncached run of ``prompt`` with the request ``options`` of :meth:`generate` (TeaCache, Liu et al.
        2024, §3.3: the rescaling polynomial from the modulated input's change to the output's change).

        Returns ``{"mode", "coefficients", "input_changes", "output_changes", "preset", "height", "width",
        "num_frames", "num_inference_steps"}`` (pass ``coefficients`` as ``teacache_coefficients``). Raises
        ValueError for bad arguments or fewer than ``degree + 2`` steps.
        """
        from .cache.teacache import CalibrationRecord

        record = CalibrationRecord(mode)  # raises for an unknown mode
        records = (record, CalibrationRecord(mode)) if self.transformer_2 is not None else None
        bad = set(options) - _CALIBRATION_OPTIONS
        if bad:
            raise ValueError(f"unexpected arguments {sorted(bad)}")
        req = self.request(prompt, options.pop("negative_prompt", None), teacache_threshold=None, **options)
        if req.num_inference_steps < degree + 2:
            raise ValueError(f"calibration needs at least {degree + 2} steps for a degree-{degree} fit, got "
                             f"{req.num_inference_steps}")
        self.run(req, progress=progress, recorder=records or record, decode=False)
        common = {"mode": mode, "preset": self.preset.name, "height": req.height, "width": req.width,
                  "num_frames": req.num_frames, "num_inference_steps": req.num_inference_steps}
        if records is None:
            return {**common, "coefficients": list(record.fit(degree)), "input_changes": record.input_changes,
                    "output_changes": record.output_changes}
        # A14B: one polynomial per expert, each from its own steps (pass the dict as teacache_coefficients)
        fits = {}
        for label, rec in zip(("high", "low"), records):
            if len(rec.input_changes) < degree + 1:
                raise ValueError(f"the {label}-noise expert runs too few steps of this request to fit a degree-{degree} "
                                 "polynomial: calibrate with more num_inference_steps")
            fits[label] = list(rec.fit(degree))
        return {**common, "coefficients": fits,
                "input_changes": {"high": records[0].input_changes, "low": records[1].input_changes},
                "output_changes": {"high": records[0].output_changes, "low": records[1].output_changes}}

    def warmup(self, *, height: int | None = None, width: int | None = None, num_frames: int | None = None,
               guidance_scale: float | None = None, teacache_threshold: float | None = UNSET) -> dict[str, float]:
        """Do the one-time work of a request shape ahead of the first request: a 2-step generation at this size
        (kernels compile and autotune, CUDA graphs of this shape are captured, the negative prompt enters the
        prompt cache, the VAE runs once; for i2v/flf2v a mid-gray frame of exactly this size conditions it).
        Returns its timings; raises ValueError as ``generate()`` for a bad size."""
        images = {}
        if self.preset.image_conditioned:
            height = self.preset.height if height is None else height
            width = self.preset.width if width is None else width
            gray = np.full((height, width, 3), 128, np.uint8)
            images = {"image": gray, "last_image": gray if self.preset.task == "flf2v" else None}
        if self.preset.is_moe:  # A14B: one step per expert (the first timestep is 999, the second below 990)
            images["boundary"] = 0.99
        return self.generate("warm-up", height=height, width=width, num_frames=num_frames, num_inference_steps=2,
                             guidance_scale=guidance_scale, seed=0, teacache_threshold=teacache_threshold,
                             progress=False, **images).timings

    # ------------------------------------------------------------------ LoRA
    def load_lora(self, path, strength: float = 1.0, name: str | None = None, mode: str = "fuse",
                  expert: str = "both") -> str:
        """Apply a LoRA file (any format of :mod:`wanrt.lora.formats`) to the DiT; returns its name (default: the
        file's stem).

        ``mode="fuse"`` writes ``strength · scale · B A`` into the weights (8-bit layers are requantized; the base
        of every touched tensor is kept on the host so that unloading restores it bit for bit);
        ``mode="runtime"`` adds a low-rank branch beside the Linears, whose strength can change per call
        (``generate(..., loras={name: s})``). CUDA graphs are recaptured when runtime branches come or go; fused
        changes are in place. The prompt and image caches stay valid. See :mod:`wanrt.lora.apply`.

        ``expert`` (Wan2.2 A14B): ``"high"``, ``"low"`` or ``"both"`` (default) experts; the Wan2.2 speed LoRAs
        ship as a high/low pair: load each with its expert (under one name each, or the same name for both).

        Raises:
            FileNotFoundError; LoraError (a ValueError): a refused format, no matching key, a shape mismatch, a name
            already loaded, fusing into GGUF, sharded or block-offloaded weights (use ``mode="runtime"``); ValueError:
            an ``expert`` other than high/low/both, or high/low for a model of one DiT.
        """
        from .lora import manager_of, read_lora

        targets = self._lora_targets(expert)
        with self._lock:
            out = None
            for dit in targets:
                adapter = read_lora(path, dit, name)
                out = manager_of(dit, self.device).add(adapter, strength, mode)
            self._lora_changed()
            return out

    def _lora_targets(self, expert: str) -> tuple:
        if expert not in ("both", "high", "low"):
            raise ValueError(f"expert must be 'high', 'low' or 'both', got {expert!r}")
        if self.transformer_2 is None:
            if expert != "both":
                raise ValueError(f"expert={expert!r} applies to a Wan2.2 A14B model (two experts); "
                                 f"{self.preset.name!r} has one DiT")
            return (self.transformer,)
        return {"both": self._dits(), "high": (self.transformer,), "low": (self.transformer_2,)}[expert]

    def _managers(self) -> list:
        """The LoRA managers of the DiTs that have one."""
        return [m for m in (getattr(d, "lora", None) for d in self._dits()) if m is not None]

    def set_lora_strengths(self, strengths: dict[str, float]) -> None:
        """Set the strengths of loaded LoRAs (``{name: strength}``); fused ones are recomputed from their base.
        Raises KeyError for a name not loaded (on either A14B expert)."""
        with self._lock:
            managers = self._managers()
            unknown = [n for n in strengths if not any(n in m.loaded for m in managers)]
            if unknown or not managers:
                raise KeyError(f"LoRA(s) {unknown or list(strengths)} not loaded")
            for m in managers:
                mine = {n: v for n, v in strengths.items() if n in m.loaded}
                if mine:
                    m.set_strengths(mine)

    def unload_lora(self, name: str | None = None) -> None:
        """Unload LoRA ``name`` (every LoRA with None; from each A14B expert that has it); fused weights return to
        their base bit for bit. Raises KeyError for a name not loaded."""
        with self._lock:
            managers = self._managers()
            if name is not None and not any(name in m.loaded for m in managers):
                raise KeyError(f"LoRA {name!r} is not loaded")
            if not managers:
                self._lora_manager().remove(name)  # raises as the manager does
            for m in managers:
                if name is None or name in m.loaded:
                    m.remove(name)
            self._lora_changed()

    @property
    def loras(self) -> dict[str, dict]:
        """The loaded LoRAs: ``{name: {"strength", "mode", "format", "source", "targets", "rank"}}`` (A14B: also
        ``"experts"``, the experts it is loaded on, ``["high"]``, ``["low"]`` or both)."""
        if self.transformer_2 is None:
            mgr = getattr(self.transformer, "lora", None)
            return {} if mgr is None else mgr.info()
        out: dict[str, dict] = {}
        for label, dit in zip(("high", "low"), self._dits()):
            mgr = getattr(dit, "lora", None)
            for n, info in ({} if mgr is None else mgr.info()).items():
                entry = out.setdefault(n, dict(info, experts=[]))
                entry["experts"].append(label)
        return out

    def _lora_manager(self):
        from .lora import manager_of

        return manager_of(self.transformer, self.device)

    def _lora_changed(self) -> None:
        """Runtime branches changed the blocks' ops: the captured CUDA graphs are dropped (recaptured on next use).
        Fused changes write the weights in place, so the graphs stay valid."""
        generation = sum(m.generation for m in self._managers())
        if generation != getattr(self, "_lora_generation", 0):
            for graphs in (self._graphs, self._graphs_2):
                if graphs is not None:
                    graphs.plain.clear()
                    graphs.with_residual.clear()
        self._lora_generation = generation

    def _runtime_loras(self) -> set[str]:
        return {n for m in self._managers() for n in m.runtime_names()}

    def _check_loras(self, req) -> None:
        """Per-call strengths name runtime LoRAs of this Engine (ValueError otherwise, before any work)."""
        runtime = self._runtime_loras()
        for name, _ in req.loras or ():
            if name not in runtime:
                fused = any(name in m.loaded for m in self._managers())
                what = "is fused (change it with set_lora_strengths)" if fused else "is not loaded"
                raise ValueError(f"loras: {name!r} {what}; per-call strengths apply to runtime LoRAs "
                                 f"(loaded with mode='runtime': {sorted(runtime) or 'none'})")

    def _request_loras(self, req):
        """A context applying the request's runtime-LoRA strengths for this call, then restoring the Engine's."""
        import contextlib

        if not req.loras:
            return contextlib.nullcontext()
        self._check_loras(req)
        wanted = dict(req.loras)

        @contextlib.contextmanager
        def applied():
            managers = [(m, {n: v for n, v in wanted.items() if n in m.loaded}) for m in self._managers()]
            before = [(m, {n: m.loaded[n].strength for n in mine}) for m, mine in managers]
            for m, mine in managers:
                if mine:
                    m.set_strengths(mine)
            try:
                yield
            finally:
                for m, old in before:
                    if old:
                        m.set_strengths(old)

        return applied()

    def _graph_stats(self) -> dict | None:
        if self._graphs is None:
            return None
        if self._graphs_2 is not None:
            return {"high": self._graphs.stats(), "low": self._graphs_2.stats()}
        return self._graphs.stats()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _first_frame_token_mask(req: Request) -> torch.Tensor:
    """TI2V image-to-video: ``[L]`` float64, 0 on the first latent frame's tokens (timestep 0: the image is clean),
    1 elsewhere (official ``mask2[0][0][:, ::2, ::2]``; tokens run frame by frame)."""
    _, _, _, h, w = req.latent_shape
    mask = torch.ones(req.tokens, dtype=torch.float64)
    mask[: (h // 2) * (w // 2)] = 0
    return mask


def _check_moe_config(config: EngineConfig) -> None:
    """What an A14B Engine (two experts) does not take; ValueError before any weight is read."""
    if getattr(config.parallel, "shard_weights", False) and config.expert_swap:
        raise ValueError("expert_swap and shard_weights do not combine: sharded experts stay on the GPUs (each rank "
                         "holds 1/world of both)")
    if config.offload != "none":
        raise ValueError("offload / vram_budget_gb do not apply to Wan2.2 A14B yet: its experts take turns on the "
                         "device with expert_swap=True (the default when both do not fit)")


#: the parts ``Engine(files=...)`` takes (ComfyUI's single files); "tokenizer" is a folder, optional.
FILE_PARTS = ("dit", "dit_2", "text_encoder", "vae", "image_encoder", "tokenizer")


def _check_files(files: dict, preset: Preset) -> dict[str, Path]:
    """``files`` of ``Engine(files=...)`` as paths: known parts only, "dit", "text_encoder", "vae" (and
    "image_encoder" for i2v/flf2v with CLIP, "dit_2" for A14B) present, every path existing. Raises ValueError /
    FileNotFoundError naming the part."""
    if not isinstance(files, dict):
        raise ValueError(f"files must be a dict of part -> path, got {type(files).__name__}")
    unknown = set(files) - set(FILE_PARTS)
    if unknown:
        raise ValueError(f"files: unknown part(s) {sorted(unknown)}; parts are {list(FILE_PARTS)}")
    task, moe = preset.task, preset.is_moe
    needed = ["dit", "text_encoder", "vae"] + (["image_encoder"] if preset.uses_clip else []) + \
        (["dit_2"] if moe else [])
    if not moe and files.get("dit_2") is not None:
        raise ValueError("files: dit_2 (the low-noise expert) is for a Wan2.2 A14B preset (t2v-a14b, i2v-a14b)")
    missing = [p for p in needed if files.get(p) is None]
    if missing:
        raise ValueError(f"files: missing {missing} (a {task} Engine needs {needed})")
    out = {}
    for part, path in files.items():
        if path is None:
            continue
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"files[{part!r}]: {path} does not exist")
        out[part] = path
    return out


def _layout(config: EngineConfig, num_heads: int, guidance_scale: float, quiet: bool = False):
    """The :class:`~wanrt.parallel.ParallelConfig` of ``config.parallel`` for this world (``"auto"`` resolved with
    CFG parallel when the preset's guidance is above 1). Raises ValueError naming the valid layouts."""
    import torch.distributed as dist

    from .parallel.config import resolve_layout

    layout = resolve_layout(config.parallel, dist.get_world_size(), num_heads, guidance_scale > 1)
    if config.parallel == "auto" and not quiet:
        log.info("parallel='auto' chose ulysses %d x ring %d x cfg %d for %d ranks and %d heads", layout.ulysses,
                 layout.ring, layout.cfg, layout.world_size, num_heads)
    return layout


_CALIBRATION_OPTIONS = {"negative_prompt", "image", "last_image", "max_area", "height", "width", "num_frames",
                        "num_inference_steps", "guidance_scale", "shift", "sample_solver", "seed", "video", "mask",
                        "reference_images", "conditioning_scale", "guidance_scale_2", "boundary"}
