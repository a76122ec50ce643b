"""One VAE decoder for the Engine: :class:`Decoder` streams latents to video chunks through the eager / Triton
VAE, a TensorRT engine of the decoder step, or spatial tiling, chosen once from the Engine's options.

TensorRT engines are cached on disk in an explicit directory: ``$WANRT_CACHE_DIR/trt`` or the XDG cache
(``$XDG_CACHE_HOME/wanrt/trt``, default ``~/.cache/wanrt/trt``), never under the current directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .paths import cache_root


def chunks(video: torch.Tensor) -> Iterator[torch.Tensor]:
    """Yield a decoded video ``[B, 3, F, H, W]`` as the causal decode does: 1 frame, then 4 at a time."""
    yield video[:, :, :1]
    for start in range(1, video.shape[2], 4):
        yield video[:, :, start:start + 4]


class Decoder:
    """Decodes latents ``[B, 16, F', H', W']`` to video chunks ``[B, 3, n, 8H', 8W']`` float32 in [-1, 1].

    Args:
        vae: the loaded :class:`~wanrt.models.vae.WanVAE` (its conv backend already set from the plan).
        device: where the VAE runs.
        backend: "eager", "triton" (both run ``vae`` itself) or "tensorrt" (an engine per latent size, exported
            and built once, cached on disk under ``cache_dir`` and in this object).
        tiling: decode in overlapping spatial tiles (memory bounded by the tile); None: above 720P.
        cache_dir: the TensorRT cache (default :func:`cache_root` / "trt").
    """

    def __init__(self, vae, device: torch.device, backend: str = "eager", tiling: bool | None = None,
                 cache_dir: str | os.PathLike | None = None):
        self.vae = vae
        self.device = device
        self.backend = backend
        self.tiling = tiling
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "trt"
        self._trt: dict[tuple[int, int, int], object] = {}

    def use_tiling(self, latents: torch.Tensor) -> bool:
        """Whether ``latents`` are decoded in tiles (as set, else automatically above 720P)."""
        if self.tiling is not None:
            return self.tiling
        from .models.vae_tiling import should_tile

        return should_tile(latents.shape[3], latents.shape[4])

    def decode_stream(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Decode chunk by chunk: yields ``[B, 3, n, H, W]`` float32 in [-1, 1] (n = 1, then 4 per latent frame).

        Untiled, activation memory is independent of the number of frames. With tiling the tiles are decoded one
        at a time through all frames (one tile's cache alive at a time) and the blended video is then handed out
        in the same chunks.
        """
        lat = latents.to(self.device, torch.float32)
        if self.use_tiling(lat):
            from .models.vae_tiling import decode_tiled

            return chunks(decode_tiled(self.vae, lat))
        if self.backend == "tensorrt":
            return self._tensorrt(lat).decode_stream(lat)
        return self.vae.decode_stream(lat)

    def _tensorrt(self, latents: torch.Tensor):
        """The TensorRT decoder for this latent size: exported to ONNX and built once per (batch, size), cached on
        disk under ``cache_dir`` (keyed by TensorRT version, GPU and shapes) and here."""
        from .graph.onnx_vae import export_decoder_onnx
        from .graph.tensorrt_vae import TensorRTDecoder, build_decoder_engine

        b, _, _, h, w = latents.shape
        key = (b, h, w)
        if key not in self._trt:
            s = self.vae.config.spatial_factor
            onnx = self.cache_dir / "onnx" / f"vae-decoder-{b}x{h * s}x{w * s}.onnx"
            export_decoder_onnx(self.vae, onnx, height=h * s, width=w * s, batch=b)
            self._trt[key] = TensorRTDecoder(build_decoder_engine(onnx, self.cache_dir), device=self.device)
        return self._trt[key]


def collect_frames(stream: Iterator[torch.Tensor], on_frames=None, keep_frames: bool = True,
                   size: tuple[int, int] = (0, 0)):
    """Turn a decode stream into uint8 frames ``[F, H, W, 3]``: each chunk goes to ``on_frames(frames, start)`` as
    soon as it is decoded, and is kept when ``keep_frames`` (else the result is empty, ``[0, H, W, 3]``).

    Raises:
        whatever the stream raises, with ``.delivered`` (frames handed out so far) set on the exception.
    """
    import numpy as np

    from .video import to_uint8_frames

    parts, delivered = [], 0
    try:
        for chunk in stream:
            part = to_uint8_frames(chunk)  # [n, H, W, 3]
            if on_frames is not None:
                on_frames(part, delivered)
            delivered += len(part)
            if keep_frames:
                parts.append(part)
    except Exception as e:
        e.delivered = delivered
        raise
    return np.concatenate(parts) if parts else np.zeros((0, *size, 3), np.uint8)
