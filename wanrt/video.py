"""The result of a generation and MP4 writing through PyAV."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """Map a decoded video in [-1, 1] to uint8 frames.

    Args:
        video: ``[3, F, H, W]`` (or ``[1, 3, F, H, W]``) float tensor in [-1, 1].

    Returns:
        ``[F, H, W, 3]`` uint8 array, ``round((x + 1) / 2 * 255)`` clamped to [0, 255]
        (the official ``cache_video`` maps (x+1)/2 to [0, 255]).
    """
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected a single video, got batch {video.shape[0]}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected [3, F, H, W], got {tuple(video.shape)}")
    x = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()  # [F, H, W, 3]


def check_crf(crf: int) -> None:
    """Raise ValueError unless ``crf`` is an x264 constant rate factor: an integer from 0 (lossless) to 51."""
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer from 0 (lossless) to 51, got {crf!r}")


class Mp4Writer:
    """Incremental H.264 MP4 writer (PyAV): frames go to disk as they are produced.

    ``with Mp4Writer(path, fps=16) as w: w.write(frames)`` any number of times. The file is written under
    ``path + ".part"`` and renamed into place on a clean close, so a failure never leaves a truncated file
    under the final name (whatever the encoder flushed stays in the ``.part`` file).

    Args:
        path: output file ending in .mp4; parent folders are created.
        fps: frames per second (Wan's native rate is 16).
        crf: x264 constant rate factor, 0 (lossless) to 51 (lower is better quality).

    Raises:
        ValueError: a path not ending in .mp4 or a crf outside 0..51 (at construction); frames of the wrong
            shape or dtype, odd sizes, or a size change between writes (at ``write``).
    """

    def __init__(self, path: str | os.PathLike, fps: int = 16, crf: int = 18):
        if Path(path).suffix.lower() != ".mp4":
            raise ValueError(f"only MP4 output is supported; the path must end in .mp4, got {str(path)!r}")
        check_crf(crf)
        self.path = Path(path)
        self.fps, self.crf = fps, crf
        self.frames_written = 0
        self._out = self._stream = None
        self._tmp = self.path.with_name(self.path.name + ".part")

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 RGB frames ``[F, H, W, 3]`` (all writes share one size)."""
        import av  # PyAV: imported here so that importing wanrt stays light

        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
        _, h, w, _ = frames.shape
        if h % 2 or w % 2:
            raise ValueError(f"H.264 yuv420p needs even height and width, got {h}x{w}")
        if self._out is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._out = av.open(str(self._tmp), mode="w", format="mp4")
            self._stream = self._out.add_stream("libx264", rate=self.fps, options={"crf": str(self.crf)})
            self._stream.width, self._stream.height, self._stream.pix_fmt = w, h, "yuv420p"
        elif (h, w) != (self._stream.height, self._stream.width):
            raise ValueError(f"frame size changed from {self._stream.height}x{self._stream.width} to {h}x{w}")
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._out.mux(packet)
        self.frames_written += len(frames)

    def close(self) -> Path:
        """Flush, close and move the file into place; returns its path.

        Raises:
            ValueError: no frame was written.
        """
        if self._out is None:
            raise ValueError(f"no frames were written to {self.path}")
        for packet in self._stream.encode():
            self._out.mux(packet)
        self._out.close()
        self._out = None
        os.replace(self._tmp, self.path)  # never leave a half-written file under the final name
        return self.path

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._out is not None:
            self._out.close()  # keep the partial .part file; do not claim the final name
            self._out = None


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 16, crf: int = 18) -> Path:
    """Write uint8 RGB frames to an H.264 MP4 with PyAV (:class:`Mp4Writer` in one call).

    Args:
        frames: ``[F, H, W, 3]`` uint8.
        path: output file; parent folders are created.
        fps: frames per second (Wan's native rate is 16).
        crf: x264 constant rate factor (lower is better quality).

    Returns:
        The path written.

    Raises:
        ValueError: a path not ending in .mp4, frames of the wrong shape or dtype, or odd height/width
            (yuv420p needs even sizes).
    """
    with Mp4Writer(path, fps=fps, crf=crf) as writer:
        writer.write(frames)
    return writer.path


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode an MP4 back to uint8 frames ``[F, H, W, 3]`` and its frame rate (for checks and tests)."""
    import av

    with av.open(str(path)) as inp:
        stream = inp.streams.video[0]
        frames = [fr.to_ndarray(format="rgb24") for fr in inp.decode(stream)]
        rate = float(stream.average_rate) if stream.average_rate else float("nan")
    return np.stack(frames), rate


#: The extensions a one-frame generation can be saved as (through Pillow).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _check_one_frame(frames, what: str) -> None:
    if frames is None:
        raise ValueError(f"{what}: the frames were not kept (keep_frames=False)")
    if frames.ndim != 4 or frames.shape[0] != 1:
        raise ValueError(f"{what} needs a one-frame generation (num_frames=1), this video has "
                         f"{frames.shape[0] if frames.ndim == 4 else '?'} frames: save it as .mp4, or take frames[i]")


def write_image(frames: np.ndarray, path: str | os.PathLike) -> Path:
    """Write the single frame of ``frames`` (uint8 ``[1, H, W, 3]``) as an image, its format from the extension
    (:data:`IMAGE_SUFFIXES`), atomically (a ``.part`` file renamed). Returns the path.

    Raises:
        ValueError: not one frame, not uint8 RGB, or another extension.
    """
    from PIL import Image

    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"an image path must end in {', '.join(IMAGE_SUFFIXES)}, got {str(path)!r}")
    _check_one_frame(frames, f"saving {p.name}")
    if frames.dtype != np.uint8 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [1, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    p.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}[suffix]
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    tmp = p.with_name(p.name + ".part")
    try:
        Image.fromarray(frames[0], mode="RGB").save(tmp, format=fmt, **options)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


@dataclass
class Video:
    """A generated video.

    Attributes:
        frames: ``[F, H, W, 3]`` uint8 RGB frames.
        fps: frames per second (16 for Wan2.1).
        seed: the seed actually used (drawn and reported when none was given).
        latents: the final denoised latents ``[1, 16, F', H/8, W/8]`` float32 on the CPU.
        timings: seconds per stage ("text_encoder", "denoise", "vae_decode", "total").
        stats: how the denoising ran: ``"steps"``, ``"cfg_batched"`` (both CFG branches in one forward),
            ``"cuda_graphs"`` (captures/replays/fallbacks, or None when off) and, with TeaCache,
            ``"teacache"``: ``{"cond": {"computed": n, "skipped": n}, "uncond": {...}}``.
    """

    frames: np.ndarray
    fps: int
    seed: int
    latents: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        """Number of frames."""
        return int(self.frames.shape[0])

    @property
    def image(self):
        """The frame of a one-frame generation (text-to-image: ``num_frames=1``) as a ``PIL.Image.Image`` (RGB).

        Raises:
            ValueError: the video has more than one frame (take ``frames[i]``) or no frames were kept.
        """
        from PIL import Image

        _check_one_frame(self.frames, "Video.image")
        return Image.fromarray(self.frames[0], mode="RGB")

    def save(self, path: str | os.PathLike, crf: int = 18) -> Path:
        """Write the video as H.264 MP4 at ``self.fps`` (see :func:`write_mp4`), or a one-frame generation as an
        image when ``path`` ends in ``.png``, ``.jpg`` / ``.jpeg`` or ``.webp`` (Pillow; JPEG at quality 95, WebP
        lossless). Returns the path.

        Raises:
            ValueError: an image path for a video of several frames, another extension; as :func:`write_mp4`.
        """
        if Path(path).suffix.lower() in IMAGE_SUFFIXES:
            return write_image(self.frames, path)
        return write_mp4(self.frames, path, fps=self.fps, crf=crf)

    def __repr__(self) -> str:
        f, h, w, _ = self.frames.shape
        return f"Video(frames={f}, size={h}x{w}, fps={self.fps}, seed={self.seed})"
