"""Text and image conditioning of a request, cached: :class:`TextConditioner` (UMT5 embeddings per prompt) and
:class:`ImageConditioner` (CLIP features and the VAE-encoded conditioning video of i2v/flf2v), sharing one LRU
helper (:class:`LRU`) and one offload context manager (:func:`visiting`).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator

import torch
from torch import nn


class LRU:
    """A bounded least-recently-used map (``size`` 0 keeps nothing)."""

    def __init__(self, size: int):
        self.size = int(size)
        self._d: OrderedDict = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: Hashable):
        """The value of ``key`` (now the most recent), or None."""
        if key not in self._d:
            return None
        self._d.move_to_end(key)
        return self._d[key]

    def put(self, key: Hashable, value) -> None:
        """Keep ``value`` as the most recent entry, evicting the oldest beyond ``size``."""
        if not self.size:
            return
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def touch(self, key: Hashable) -> None:
        """Mark ``key`` (if kept) as the most recent."""
        if key in self._d:
            self._d.move_to_end(key)


@contextlib.contextmanager
def visiting(model: nn.Module, device: torch.device, offload: bool) -> Iterator[None]:
    """With ``offload``, move ``model`` to ``device`` for the block and back to the CPU after it (freeing the GPU
    memory); without, do nothing."""
    if not offload:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TextConditioner:
    """UMT5 embeddings of prompts, kept in an LRU of ``cache_size`` prompts (a service that repeats its negative
    prompt runs the text encoder once for it).

    Args:
        encoder: the loaded text encoder (``encode(list[str]) -> list[[L_i, text_dim]]``).
        device: where the embeddings are used (the DiT's device).
        encoder_device: where the encoder runs. offload: keep it on the CPU between calls.
        cache_size: prompts kept.
    """

    def __init__(self, encoder, device: torch.device, encoder_device: torch.device, offload: bool, cache_size: int):
        self.encoder = encoder
        self.device = device
        self.encoder_device = encoder_device
        self.offload = offload
        self.cache = LRU(cache_size)

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """One ``[L_i, text_dim]`` embedding per prompt (trimmed to its real tokens), from the cache when kept."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        fresh = dict(zip(missing, self._run(missing), strict=True)) if missing else {}
        out = [fresh[p] if p in fresh else self.cache.get(p) for p in prompts]
        for p in prompts:
            if p in fresh:
                self.cache.put(p, fresh[p])
            else:
                self.cache.touch(p)
        return out

    def _run(self, prompts: list[str]) -> list[torch.Tensor]:
        with visiting(self.encoder.model, self.encoder_device, self.offload):
            out = self.encoder.encode(prompts)
        return [e.to(self.device) for e in out] if self.offload else out

    def __call__(self, req) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(cond, uncond)``: ``[1, L, text_dim]`` on ``device``; ``uncond`` None without CFG."""
        texts = [req.prompt] if req.prompt_embeds is None else []
        if req.negative_prompt is not None:
            texts.append(req.negative_prompt)
        encoded = self.encode(texts) if texts else []
        cond = req.prompt_embeds if req.prompt_embeds is not None else encoded.pop(0)[None]
        uncond = None
        if req.do_cfg:
            uncond = req.negative_prompt_embeds if req.negative_prompt_embeds is not None else encoded.pop(0)[None]
        return cond.to(self.device), (uncond.to(self.device) if uncond is not None else None)


class ImageConditioner:
    """The i2v/flf2v conditioning of a request: ``{"y": [1, 20, F', H/8, W/8] float32, "clip_fea": [1, 257 or
    514, image_dim]}`` on ``device`` (``docs/model-reference.md`` §7.5-7.8), kept in an LRU of ``cache_size``
    keyed by the images' content, the size and the frame count.

    CLIP sees the images at their own resolution (squash-resized to 224 inside the encoder); the VAE encodes the
    conditioning video (the first frame bicubic-resized to the output size, then zeros, and the last frame for
    FLF2V) chunk by chunk, never holding the whole video.
    """

    def __init__(self, image_encoder, vae, device: torch.device, offload: bool, cache_size: int):
        self.image_encoder = image_encoder
        self.vae = vae
        self.device = device
        self.offload = offload
        self.cache = LRU(cache_size)

    @classmethod
    def load(cls, ckpt, config, vae, image_dim: int) -> ImageConditioner:
        """Load the checkpoint's CLIP vision tower for :class:`~wanrt.config.EngineConfig` ``config`` (on the CPU
        when offloaded) and check its width against the DiT's ``image_dim``.

        Raises:
            CheckpointError: the widths differ (the parts come from different models); as ``load_image_encoder``.
        """
        from .checkpoints.io import CheckpointError
        from .checkpoints.loaders import load_image_encoder

        home = torch.device("cpu") if config.offload_image_encoder else config.device
        encoder = load_image_encoder(ckpt, device=home, dtype=config.image_dtype)
        if encoder.config.dim != image_dim:
            raise CheckpointError(f"the image encoder's width {encoder.config.dim} differs from the DiT's image_dim "
                                  f"{image_dim}: the parts come from different models")
        return cls(encoder, vae, config.device, config.offload_image_encoder, config.image_cache_size)

    def encode_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """CLIP features ``[n, 257, image_dim]`` (with ``offload`` the tower visits the device only for this).
        Raises ValueError when this conditioner has no image encoder (a model without CLIP)."""
        if self.image_encoder is None:
            raise ValueError("this model conditions on images without CLIP (Wan2.2 I2V-A14B): no image encoder")
        with visiting(self.image_encoder.model, self.device, self.offload):
            return self.image_encoder.encode(images)

    def __call__(self, first: torch.Tensor, last: torch.Tensor | None, height: int, width: int, num_frames: int,
                 timings: dict[str, float]) -> tuple[dict[str, torch.Tensor], str]:
        """``(conditioning, state)`` with ``state`` "cached" or "computed"; adds the stage times to ``timings``."""
        from .images import conditioning_chunks, conditioning_mask, resize_bicubic

        digest = hashlib.sha1()
        for img in (first, last):
            if img is not None:
                digest.update(str(tuple(img.shape)).encode())
                digest.update(img.numpy().tobytes())
        key = (digest.hexdigest(), height, width, num_frames)
        kept = self.cache.get(key)
        if kept is not None:
            return self._inputs(*kept), "cached"
        clip = None
        if self.image_encoder is not None:  # Wan2.2's I2V-A14B conditions without CLIP
            t0 = time.perf_counter()
            clip = self.encode_images([first] if last is None else [first, last])  # [n, 257, image_dim]
            clip = clip.reshape(1, -1, clip.shape[-1]).to(self.device)  # [1, n*257, image_dim]
            _sync(self.device)
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
        _sync(self.device)
        timings["vae_encode"] = time.perf_counter() - t0
        self.cache.put(key, (y, clip))
        return self._inputs(y, clip), "computed"

    @staticmethod
    def _inputs(y: torch.Tensor, clip: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"y": y} if clip is None else {"y": y, "clip_fea": clip}


def load_text_encoder(ckpt, cfg, text_len: int, quant_backend: str = "eager", tokenizer=None):
    """The UMT5 encoder of checkpoint ``ckpt`` for :class:`~wanrt.config.EngineConfig` ``cfg``: on ``text_device`` (on the CPU while offloaded), quantized layer by layer when
    ``text_encoder_precision`` is 8-bit."""
    from .checkpoints.loaders import load_text_encoder as loader
    from .config import QUANTIZED_PRECISIONS

    home = torch.device("cpu") if cfg.offload_text_encoder else cfg.text_device
    scheme = cfg.text_encoder_precision if cfg.text_encoder_precision in QUANTIZED_PRECISIONS else None
    te = loader(ckpt, device="cpu" if scheme else home, dtype=cfg.text_dtype, text_len=text_len, tokenizer=tokenizer)
    if scheme:
        from .quant import QuantConfig, quantize_, t5_filter

        compute = torch.bfloat16 if cfg.text_dtype == torch.float32 and scheme != "int8-wo" else cfg.text_dtype
        # activation quantization as the plan resolved it, where the encoder runs on the DiT's kind of device
        act = quant_backend if home.type == cfg.device.type else "eager"
        quantize_(te.model, QuantConfig(scheme, out_dtype=compute, act_backend=act), t5_filter, device=home)
        te.model.to(home)
    return te
