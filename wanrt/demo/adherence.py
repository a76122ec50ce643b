"""A prompt-adherence score computed from the frames alone, independent of any model: does the clip's dominant
object have the colour the caption names, and does it move (or grow, or shrink) the way the caption says?

* Foreground: pixels far (> 60 in RGB) from their row's median colour over the whole clip (the backgrounds are plain
  or vertical gradients, and the objects cover a small part of each row over time).
* Colour: the named colour (:data:`wanrt.demo.data.COLORS`) nearest to most foreground pixels over the clip.
* Motion: the centroid and area of that colour's pixels in the first and last quarter of the frames. An area ratio
  beyond 1.6 (or below 1 / 1.6) with the centroid shifted by less than half the radius reads as grows / shrinks;
  otherwise the larger of the horizontal and vertical shifts (at least 3 pixels) gives left / right / up / down.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import COLORS, ClipSpec

_NAMES = list(COLORS)
_RGB = np.array([COLORS[n] for n in _NAMES], np.float32)  # [K, 3]


@dataclass(frozen=True)
class Reading:
    """What the frames show: the dominant colour and motion (None when no foreground is found)."""

    color: str | None
    motion: str | None


def read_clip(frames: np.ndarray) -> Reading:
    """The :class:`Reading` of ``frames`` (uint8 ``[F, H, W, 3]``)."""
    x = frames.astype(np.float32)
    bg = np.median(x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1, 3), axis=1)[None, :, None, :]  # [1, H, 1, 3]
    fg = np.linalg.norm(x - bg, axis=-1) > 60  # [F, H, W]
    if fg.sum() < 4:
        return Reading(None, None)
    pix = x[fg]  # [N, 3]
    nearest = np.argmin(((pix[:, None, :] - _RGB[None]) ** 2).sum(-1), axis=1)
    k = int(np.bincount(nearest, minlength=len(_NAMES)).argmax())
    color = _NAMES[k]
    own = fg & (np.argmin(((x[..., None, :] - _RGB) ** 2).sum(-1), axis=-1) == k)  # [F, H, W]
    f = len(frames)
    q = max(1, f // 4)

    def stats(sl):
        ys, xs = [], []
        area = 0
        for m in own[sl]:
            yy, xx = np.nonzero(m)
            area += len(yy)
            ys.extend(yy)
            xs.extend(xx)
        if not ys:
            return None
        return float(np.mean(ys)), float(np.mean(xs)), area / max(1, len(own[sl]))

    a, b = stats(slice(0, q)), stats(slice(f - q, f))
    if a is None or b is None:
        return Reading(color, None)
    dy, dx = b[0] - a[0], b[1] - a[1]
    ratio = (b[2] + 1) / (a[2] + 1)
    radius = np.sqrt(max(a[2], b[2]) / np.pi)
    if (ratio > 1.6 or ratio < 1 / 1.6) and np.hypot(dy, dx) < radius / 2:
        return Reading(color, "grows" if ratio > 1 else "shrinks")
    if max(abs(dx), abs(dy)) < 3:
        return Reading(color, None)
    if abs(dx) >= abs(dy):
        return Reading(color, "right" if dx > 0 else "left")
    return Reading(color, "down" if dy > 0 else "up")


def adheres(frames: np.ndarray, spec: ClipSpec) -> bool:
    """Whether ``frames`` show the first object of ``spec`` with its colour and motion."""
    reading = read_clip(frames)
    want = spec.objects[0]
    return reading.color == want.color and (not want.motion or reading.motion == want.motion)


def adherence(clips, specs) -> float:
    """The fraction of ``clips`` that show what their ``specs`` say (:func:`adheres`)."""
    results = [adheres(f, s) for f, s in zip(clips, specs, strict=True)]
    return sum(results) / max(1, len(results))
